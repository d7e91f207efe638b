//! `examples/c/generate.c`, compiled with the system C compiler against the C ABI's shared
//! library, run on a W4KV4 plan of the demo model: its output equals `wkvc run`'s. Also the
//! ABI's errors: a missing file and NULL arguments are statuses with a message, not crashes.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use wkvc_tests::{demo_model, temp_dir};

/// The directory with `libwkvc.so` and the `wkvc` binary (the test binary's profile dir).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

fn cargo_build(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let release = target_dir().ends_with("release");
    let mut c = Command::new(cargo);
    c.arg("build").args(args);
    if release {
        c.arg("--release");
    }
    let st = c.status().expect("cargo runs");
    assert!(st.success(), "cargo build {args:?}");
}

#[test]
fn the_c_example_generates_what_wkvc_run_does() {
    let Some(model) = demo_model() else {
        return;
    };
    // the shared library and the CLI (cargo test builds neither for this package)
    cargo_build(&["-p", "wkvc-capi", "-p", "wkvc"]);
    let td = target_dir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = temp_dir("capi");
    let exe = dir.join("generate");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .arg(root.join("examples/c/generate.c"))
        .arg("-I")
        .arg(root.join("capi/include"))
        .arg("-L")
        .arg(&td)
        .args(["-lwkvc", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .output()
        .expect("the C compiler runs");
    assert!(
        out.status.success(),
        "{cc}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = dir.join("demo.wkv");
    let wkvc = td.join("wkvc");
    let st = Command::new(&wkvc)
        .arg("compile")
        .arg(&model)
        .arg("-o")
        .arg(&plan)
        .args(["--calib-tokens", "256", "--threads", "2"])
        .output()
        .expect("wkvc compile");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let prompt = "The capital of France is";
    let c_out = Command::new(&exe)
        .arg(&plan)
        .arg(prompt)
        .arg("24")
        .env("LD_LIBRARY_PATH", &td)
        .output()
        .expect("the C example runs");
    assert!(
        c_out.status.success(),
        "{}",
        String::from_utf8_lossy(&c_out.stderr)
    );
    let run = Command::new(&wkvc)
        .arg("run")
        .arg(&plan)
        .args(["-p", prompt, "-n", "24", "--threads", "2"])
        .output()
        .expect("wkvc run");
    assert!(run.status.success());
    let (c_text, run_text) = (
        String::from_utf8_lossy(&c_out.stdout),
        String::from_utf8_lossy(&run.stdout),
    );
    eprintln!("C example: {c_text}");
    assert_eq!(c_text, run_text, "the C example and wkvc run differ");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn abi_errors_are_statuses_with_messages() {
    use wkvc::*;
    let mut m: *mut wkvc_model = std::ptr::null_mut();
    let path = CString::new("/nonexistent/plan.wkv").expect("c string");
    // SAFETY: valid arguments of the ABI.
    let st = unsafe { wkvc_model_open(path.as_ptr(), &mut m) };
    assert_eq!(st, wkvc_status::Model);
    assert!(m.is_null());
    // SAFETY: the ABI's error string is NUL-terminated and lives until the next call.
    let msg = unsafe { std::ffi::CStr::from_ptr(wkvc_last_error()) }
        .to_string_lossy()
        .into_owned();
    assert!(msg.contains("/nonexistent/plan.wkv"), "{msg}");
    // SAFETY: NULL arguments are refused, not dereferenced.
    let st = unsafe { wkvc_model_open(std::ptr::null(), &mut m) };
    assert_eq!(st, wkvc_status::InvalidArgument);
    let mut e: *mut wkvc_engine = std::ptr::null_mut();
    // SAFETY: as above.
    let st = unsafe { wkvc_engine_new(std::ptr::null(), 1, &mut e) };
    assert_eq!(st, wkvc_status::InvalidArgument);
    // SAFETY: as above; NULL frees are no-ops.
    unsafe {
        assert_eq!(
            wkvc_generate(
                std::ptr::null_mut(),
                std::ptr::null(),
                1,
                0.0,
                1.0,
                0,
                None,
                std::ptr::null_mut(),
                std::ptr::null_mut()
            ),
            wkvc_status::InvalidArgument
        );
        wkvc_model_free(std::ptr::null_mut());
        wkvc_engine_free(std::ptr::null_mut());
        wkvc_session_free(std::ptr::null_mut());
    }
}
