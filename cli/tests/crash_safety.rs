//! Crash safety of `wkvc compile`: killed with SIGKILL at moments spread over a whole
//! compile, it never leaves a file at the plan's path unless that file is a complete, valid
//! plan; the temp files that killed compiles leave are removed by the next compile into the
//! same folder, while a temp file that a live compile holds (locked) stays.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use wkvc_tests::{temp_dir, tiny_gguf};

fn compile(model: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wkvc"));
    c.arg("compile")
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(["--calib-tokens", "128", "--threads", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    c
}

fn temp_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".wkvc-tmp-") || n.starts_with(".wkvc-probe-"))
        .collect();
    v.sort();
    v
}

#[test]
fn kill_9_never_leaves_a_partial_plan_and_the_next_compile_cleans_up() {
    let dir = temp_dir("crash-safety");
    let model = tiny_gguf(&dir);
    let out_dir = dir.join("plans");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let target: PathBuf = out_dir.join("p.wkv");

    // one whole compile: its duration spreads the kills
    let t0 = Instant::now();
    let o = compile(&model, &target)
        .output()
        .expect("wkvc compile runs");
    let full = t0.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wkvc_runtime::plan::open(&target).expect("the plan opens");

    let (mut killed, mut finished) = (0, 0);
    for i in 0..10 {
        let _ = std::fs::remove_file(&target);
        let mut child = compile(&model, &target).spawn().expect("spawn");
        std::thread::sleep(full.mul_f64((i as f64 + 0.5) / 10.0));
        let done = child.try_wait().expect("try_wait").is_some();
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        if target.exists() {
            // only a finished compile puts a file there, and it is a whole plan
            wkvc_runtime::plan::open(&target)
                .unwrap_or_else(|e| panic!("kill #{i}: the file at the plan's path: {e}"));
            finished += 1;
        } else {
            assert!(!done, "kill #{i}: the compile exited but wrote no plan");
            killed += 1;
        }
    }
    println!(
        "compile takes {:.2} s: {killed} kills before the plan existed, {finished} after; temp \
         files left: {:?}",
        full.as_secs_f64(),
        temp_files(&out_dir)
    );
    assert!(killed > 0, "every kill came after the compile finished");

    // what a compile killed mid-write leaves (its lock died with it) and what a live one
    // holds
    let stale = out_dir.join(".q.wkv.wkvc-tmp-4000000-0");
    std::fs::write(&stale, b"partial").expect("write");
    let live = out_dir.join(".r.wkv.wkvc-tmp-4000001-0");
    let held = std::fs::File::create(&live).expect("create");
    held.lock().expect("lock");

    let _ = std::fs::remove_file(&target);
    let o = compile(&model, &target)
        .output()
        .expect("wkvc compile runs");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(".q.wkv.wkvc-tmp-4000000-0") && err.contains("interrupted compile"),
        "the cleanup is reported: {err}"
    );
    wkvc_runtime::plan::open(&target).expect("the plan opens");
    assert_eq!(
        temp_files(&out_dir),
        vec![".r.wkv.wkvc-tmp-4000001-0".to_string()],
        "stale temp files removed, the locked one kept"
    );
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}
