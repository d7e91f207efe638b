//! Memory of `wkvc compile` is bounded by a block, not the model: random LLaMA models of
//! the same widths with 2 and 24 layers (GGUF F16, and the 24-layer one also as a sharded
//! bf16 Hugging Face folder) are compiled (RTN W4KV4, no smoothing, the default quick
//! quality check, sampling from the compiled model as for a model too large for the
//! interpreter); each compile's peak RSS is its own high-water mark (VmHWM, printed by
//! `wkvc compile`). The 24-layer compile may exceed the 2-layer one by what grows with the
//! output (the plan's tensors, which the quality check's engine copies: twice the plan's
//! growth) plus a few blocks' weights in f32; holding the model's f32 weights once would
//! already break that bound.

use std::path::Path;
use std::process::Command;
use wkvc_tests::random_model::RandomModel;
use wkvc_tests::temp_dir;

/// (peak RSS in bytes, plan size in bytes) of one compile.
fn compile(model: &Path, out: &Path) -> (u64, u64) {
    let o = Command::new(env!("CARGO_BIN_EXE_wkvc"))
        .arg("compile")
        .arg(model)
        .arg("-o")
        .arg(out)
        .args([
            "--method",
            "rtn",
            "--no-smooth",
            "--threads",
            "2",
            "--interp-limit-mib",
            "0",
        ])
        .output()
        .expect("wkvc compile runs");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mib: f64 = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("peak RSS"))
        .and_then(|r| r.trim().strip_suffix("MiB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS line in:\n{stdout}"));
    assert!(
        stdout.contains("quality       KLD vs FP"),
        "the quality check ran:\n{stdout}"
    );
    let plan = std::fs::metadata(out).expect("plan written").len();
    ((mib * 1048576.0) as u64, plan)
}

#[test]
fn compile_memory_is_bounded_by_a_block_not_the_model() {
    let dir = temp_dir("compile-memory");
    let shape = |layers: usize, hf_shards: usize| RandomModel {
        hidden: 384,
        layers,
        heads: 6,
        kv_heads: 2,
        ffn: 1024,
        vocab: 2048,
        ctx: 512,
        seed: 7,
        tied: true,
        hf_shards,
    };
    let small = shape(2, 0);
    let big = shape(24, 0);
    let write = |m: &RandomModel, name: &str| {
        let p = dir.join(name);
        m.write(&p, &mut |_, _| {}).expect("random model written");
        p
    };
    let (peak_small, plan_small) = compile(&write(&small, "l2.gguf"), &dir.join("l2.wkv"));
    let block_f32 = 4 * big.block_params() as u64;
    let model_f32 = 4 * big.params() as u64;
    for (name, m) in [("l24.gguf", big.clone()), ("l24-hf", shape(24, 3))] {
        let (peak, plan) = compile(&write(&m, name), &dir.join(format!("{name}.wkv")));
        let bound = peak_small + 2 * plan.saturating_sub(plan_small) + 4 * block_f32;
        eprintln!(
            "{name}: peak RSS {:.1} MiB (2 layers: {:.1} MiB), bound {:.1} MiB, model in f32 \
             {:.1} MiB, one block {:.1} MiB, plan {:.1} MiB",
            peak as f64 / 1048576.0,
            peak_small as f64 / 1048576.0,
            bound as f64 / 1048576.0,
            model_f32 as f64 / 1048576.0,
            block_f32 as f64 / 1048576.0,
            plan as f64 / 1048576.0
        );
        assert!(
            peak <= bound,
            "{name}: peak RSS {peak} exceeds {bound} (2-layer peak {peak_small} + twice the \
             plan's growth + 4 blocks of {block_f32} bytes in f32)"
        );
        // the bound itself is below the model's f32 weights: a compile holding them fails
        assert!(bound < model_f32, "bound {bound} vs model {model_f32}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
