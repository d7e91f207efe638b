//! Checks that need an NVIDIA GPU (run by `scripts/gpu-check.sh`; here, without a driver,
//! each test says so and returns, unless WKVC_REQUIRE_GPU is set, which makes that a failure).
//!
//! - a model of the demo model's shapes (the demo model itself when WKVC_DEMO_MODEL points to
//!   it, else random weights of SmolLM2-135M's architecture): the CUDA engine's logits and
//!   KV cache against the interpreter replaying the engine's cache (`wkvc_tests::agree`), W4
//!   KV16 and W4KV4 (f32 summation order only: 1e-3); the tensor-core prefill variant by KL
//!   divergence (f16 operands);
//! - the int4 GEMV bandwidth on a 4096 x 11008 matrix against the device's copy bandwidth.
//!
//! Figures go to stderr and, as JSON, to `$WKVC_GPU_REPORT_DIR/*.json` when set.

use wkvc_ir::RunMode;
use wkvc_runtime::compile::{self, CompileOptions};
use wkvc_runtime::{EngineKind, Model};
use wkvc_tests::agree::{agreement, kld};
use wkvc_tests::*;

fn gpu() -> bool {
    if wkvc_runtime::cuda::driver_present() {
        return true;
    }
    skip(
        Group::Gpu,
        "no NVIDIA driver (libcuda.so.1) on this machine (scripts/gpu-check.sh runs these)",
    );
    false
}

fn report(name: &str, v: serde_json::Value) {
    eprintln!("{name}: {v}");
    if let Some(d) = std::env::var_os("WKVC_GPU_REPORT_DIR") {
        let p = std::path::Path::new(&d).join(format!("{name}.json"));
        std::fs::write(&p, v.to_string()).expect("write report");
    }
}

/// The demo model, or random weights of its architecture (SmolLM2-135M: 30 layers, width
/// 576, 9 heads and 3 kv heads of 64, MLP 1536, vocabulary 49152), written as a Q8_0 GGUF.
fn demo_shaped() -> Model {
    if let Some(p) = std::env::var_os("WKVC_DEMO_MODEL").filter(|p| !p.is_empty()) {
        return Model::open(std::path::Path::new(&p)).expect("demo model");
    }
    let mut cfg = tiny_config("llama");
    cfg.vocab_size = 49152;
    cfg.hidden_size = 576;
    cfg.intermediate_size = 1536;
    cfg.num_layers = 30;
    cfg.num_heads = 9;
    cfg.num_kv_heads = 3;
    cfg.head_dim = 64;
    cfg.rope_theta = 100000.0;
    cfg.max_position_embeddings = 8192;
    let dir = match std::env::var_os("WKVC_GPU_REPORT_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => temp_dir("gpu-demo-shaped"),
    };
    let path = dir.join("demo-shaped.gguf");
    if !path.exists() {
        let w = tiny_weights(&cfg, 11);
        write_gguf(&path, &cfg, &w, true);
    }
    Model::open(&path).expect("open demo-shaped model")
}

#[test]
fn cuda_engine_matches_the_interpreter_on_the_demo_shapes() {
    if !gpu() {
        return;
    }
    let m = demo_shaped();
    let ids: Vec<u32> = (0..48).map(|i| (1000 + i * 7919 % 20000) as u32).collect();
    // KV16, KV4, and KV4 with a recent window of 8 (the 16 steps cross its length)
    for (kvbits, window) in [(16u32, 1usize), (4, 1), (4, 8)] {
        let o = CompileOptions {
            kvbits,
            kv_window: window,
            calib_tokens: Some(64),
            calib_window: 64,
            threads: 8,
            ..Default::default()
        };
        let data = compile::calibration_data(&m, &o, &mut |_| {}).expect("calibration data");
        let c = compile::quantize(&m, &o, Some(&data), &mut |_| {}).expect("compile");
        let q = m.with_module(c.module.clone(), None);
        let it = q.engine_kind(8, EngineKind::Interp).expect("interp");
        let cu = q
            .engine_kind(
                8,
                EngineKind::Cuda {
                    device: 0,
                    mma: false,
                },
            )
            .expect("cuda engine");
        // a prefill of 32 rows (the tiled GEMMs), then 16 steps (a captured graph, replayed)
        let mut chunks: Vec<&[u32]> = vec![&ids[..32]];
        chunks.extend(ids[32..].iter().map(std::slice::from_ref));
        let ag = agreement(&it, &cu, &chunks, RunMode::Prefill, 128);
        let de = agreement(&it, &cu, &[&ids[..32]], RunMode::DecodeEquivalent, 128);
        let tag = if window > 1 {
            format!("kv{kvbits}_window{window}")
        } else {
            format!("kv{kvbits}")
        };
        report(
            &format!("logits_{tag}"),
            serde_json::json!({
                "kv_bits": kvbits,
                "kv_window": window,
                "rows": ag.rows + de.rows,
                "max_abs_diff": ag.max_abs.max(de.max_abs),
                "mean_kld": (ag.mean_kld() + de.mean_kld()) / 2.0,
                "kv_values": ag.kv_values + de.kv_values,
                "kv_code_diffs": ag.kv_code_diffs + de.kv_code_diffs,
                "kv_excess": ag.kv_excess.max(de.kv_excess),
            }),
        );
        // f32 summation order only, as the CPU engine's exact path (tests/demo_cpu.rs)
        for (what, a) in [("prefill + steps", &ag), ("decode-equivalent", &de)] {
            assert!(a.max_abs < 1e-3, "{tag} {what}: {}", a.summary());
            assert!(a.kv_excess < 1e-3, "{tag} {what}: {}", a.summary());
        }
        if kvbits == 16 {
            let v = q.config.vocab_size;
            // the tensor-core prefill (32 rows: the quantized GEMMs take the mma kernel):
            // activations rounded to f16 (relative 2^-11), so compared by KL divergence
            let mm = q
                .engine_kind(
                    8,
                    EngineKind::Cuda {
                        device: 0,
                        mma: true,
                    },
                )
                .expect("cuda engine (mma)");
            let mut c = mm.session(128);
            let ra = it
                .session(128)
                .forward_mode(&ids[..32], RunMode::DecodeEquivalent)
                .expect("interp");
            let rc = c
                .forward_mode(&ids[..32], RunMode::DecodeEquivalent)
                .expect("cuda mma");
            let kl = (0..32)
                .map(|r| kld(&ra[r * v..][..v], &rc[r * v..][..v]))
                .sum::<f64>()
                / 32.0;
            report(
                "logits_kv16_mma_prefill",
                serde_json::json!({"rows": 32, "mean_kld": kl}),
            );
            assert!(kl < 3e-2, "mma prefill: mean KLD {kl}");
        }
    }
}

#[test]
fn qgemv_reaches_the_copy_bandwidth() {
    if !gpu() {
        return;
    }
    let (gemv, copy, bytes) =
        wkvc_runtime::cuda::qgemv_bandwidth(0, 11008, 4096, 200).expect("bandwidth run");
    report(
        "qgemv_bandwidth",
        serde_json::json!({"n": 11008, "k": 4096, "bytes": bytes, "gemv_gb_s": gemv, "copy_gb_s": copy, "ratio": gemv / copy}),
    );
    assert!(gemv > 0.0 && copy > 0.0);
}
