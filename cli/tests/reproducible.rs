//! Reproducible compiles: the same command (model, options, seed, thread count) writes the
//! same plan file byte for byte, WKVQuant calibration included; another seed writes another
//! plan (so the comparison can fail). The plan records no timings or memory figures of the
//! run, and the interpreter's matrix products sum in an order that depends on the shapes
//! alone, not the host's caches (`wkvc_ir::math::MATMUL_KC`).

use std::path::Path;
use std::process::Command;
use wkvc_tests::{temp_dir, tiny_gguf};

fn compile(model: &Path, out: &Path, seed: &str) -> Vec<u8> {
    let o = Command::new(env!("CARGO_BIN_EXE_wkvc"))
        .arg("compile")
        .arg(model)
        .arg("-o")
        .arg(out)
        .args([
            "--method",
            "wkvquant",
            "--calib-samples",
            "2",
            "--calib-len",
            "32",
            "--epochs",
            "2",
            "--threads",
            "2",
            "--seed",
            seed,
        ])
        .output()
        .expect("wkvc compile runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).expect("the plan")
}

#[test]
fn the_same_compile_writes_the_same_plan() {
    let dir = temp_dir("reproducible");
    let model = tiny_gguf(&dir);
    let a = compile(&model, &dir.join("a.wkv"), "7");
    let b = compile(&model, &dir.join("b.wkv"), "7");
    let first_difference = a.iter().zip(&b).position(|(x, y)| x != y);
    assert!(
        a == b,
        "two runs of the same compile differ: {} vs {} bytes, first difference at byte {:?}",
        a.len(),
        b.len(),
        first_difference
    );
    // the calibration did learn something that depends on the seed (data-free text sampled
    // with it): another seed, another plan
    let c = compile(&model, &dir.join("c.wkv"), "8");
    assert_ne!(a, c, "the seed changed nothing in the plan");
}
