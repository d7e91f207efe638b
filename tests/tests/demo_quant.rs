//! Quantized configurations of the demo model against the independent PyTorch fake-quant
//! figures in ../shared/reference (same definitions; wkvc stores scales and zeros in f16,
//! the reference in f32), the decode-equivalent protocol against real token-by-token
//! decoding, and the plan round trip.

use std::sync::OnceLock;
use wkvc_ir::RunMode;
use wkvc_runtime::compile::{self, CompileOptions};
use wkvc_runtime::{Model, eval, plan};
use wkvc_tests::{data_dir, demo_model, max_abs_diff, reference_dir, temp_dir};

fn model() -> Option<&'static Model> {
    static M: OnceLock<Option<Model>> = OnceLock::new();
    M.get_or_init(|| demo_model().map(|p| Model::open(&p).expect("demo model opens")))
        .as_ref()
}

fn eval_ids() -> Option<Vec<u32>> {
    let (m, d) = (model()?, data_dir()?);
    let text = std::fs::read_to_string(d.join("wikitext2-eval.txt")).expect("eval text");
    Some(
        m.tokenizer()
            .expect("tok")
            .encode(&text, false)
            .expect("encode"),
    )
}

fn opts(wbits: u32, wgroup: i64, kvbits: u32, poq: bool, smooth: bool) -> CompileOptions {
    let calib = data_dir().map(|d| d.join("wikitext2-calib.txt"));
    CompileOptions {
        wbits,
        wgroup,
        kvbits,
        past_only: poq,
        smooth,
        calib,
        threads: 2,
        ..Default::default()
    }
}

/// The reference's definition: scale and zero kept in f32.
fn ref_opts(wbits: u32, wgroup: i64, kvbits: u32, poq: bool, smooth: bool) -> CompileOptions {
    CompileOptions {
        f32_params: true,
        ..opts(wbits, wgroup, kvbits, poq, smooth)
    }
}

fn ppl(m: &Model, o: &CompileOptions, data: &compile::CalibData, ids: &[u32]) -> f64 {
    let c = compile::quantize(m, o, Some(data), &mut |_| {}).expect("quantize");
    let q = m.with_module(c.module, None);
    let e = q.engine(2).expect("engine");
    eval::evaluate(
        &e,
        None,
        ids,
        512,
        Some(8),
        RunMode::DecodeEquivalent,
        &mut |_, _| {},
    )
    .expect("eval")
    .perplexity
}

#[test]
fn quantized_perplexities_match_the_reference() {
    let (Some(m), Some(ids), Some(rd)) = (model(), eval_ids(), reference_dir()) else {
        return;
    };
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rd.join("smollm2.json")).expect("read"))
            .expect("json");
    let want = |k: &str| {
        r["perplexity"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("reference {k}"))
    };
    // Smoothing statistics: the reference used min/max over the first 16 windows of 512
    // tokens of the calibration text, as --calib-tokens 8192 does.
    let smooth_data =
        compile::calibration_data(m, &opts(16, 128, 4, true, true), &mut |_| {}).expect("calib");
    assert_eq!(smooth_data.windows.len(), 16);
    let cases: [(&str, f64, CompileOptions); 9] = [
        ("w4g128", want("w4g128"), ref_opts(4, 128, 16, false, false)),
        ("w4ch", want("w4ch"), ref_opts(4, -1, 16, false, false)),
        (
            "kv4_full",
            want("kv4_full"),
            ref_opts(16, 128, 4, false, false),
        ),
        (
            "kv4_poq",
            want("kv4_poq"),
            ref_opts(16, 128, 4, true, false),
        ),
        (
            "w4g128_kv4_full",
            want("w4g128_kv4_full"),
            ref_opts(4, 128, 4, false, false),
        ),
        (
            "w4g128_kv4_poq",
            want("w4g128_kv4_poq"),
            ref_opts(4, 128, 4, true, false),
        ),
        (
            "kv3_poq",
            want("kv3_poq"),
            ref_opts(16, 128, 3, true, false),
        ),
        (
            "kv8_poq",
            want("kv8_poq"),
            ref_opts(16, 128, 8, true, false),
        ),
        // "kv4_poq + smoothing init" in the reference README's table
        ("kv4_poq_smooth", 20.2904, ref_opts(16, 128, 4, true, true)),
    ];
    let mut got = std::collections::BTreeMap::new();
    let mut bad = Vec::new();
    for (name, reference, o) in cases {
        if std::env::var("WKVC_ONLY").is_ok_and(|only| !name.starts_with(&only)) {
            continue;
        }
        let p = ppl(m, &o, &smooth_data, &ids);
        let rel = p / reference - 1.0;
        eprintln!(
            "{name} (f32 scale/zero): {p:.4} (reference {reference:.4}, {:+.3}%)",
            100.0 * rel
        );
        // Without past-only, every position (the attention-sink token 0 too) reads its own
        // quantized K/V, and the result is ill-conditioned: perturbing the K/V inputs by one
        // ulp (+-1.2e-7 relative, what a different matmul summation order does) moved kv4_full
        // between 21.62 and 21.92 (the reference, 21.689, lies inside). So those rows get 2%;
        // every other row is well conditioned and gets the 1%.
        let tol = if name.ends_with("_full") { 0.02 } else { 0.01 };
        if rel.abs() > tol {
            bad.push(format!(
                "{name}: {p} is not within {}% of {reference}",
                100.0 * tol
            ));
        }
        got.insert(name, p);
    }
    assert!(bad.is_empty(), "{bad:?}");
    // The plans' storage: scale and zero in f16 (scale rounded up). Rounding every scale by up
    // to 2^-11 relative moves 4-bit perplexities by up to ~1% on this model (perturbing the
    // KV scales by 1e-4 relative moved KV3 by 1.5%), so the bound here is 2%.
    for (name, reference, o) in [
        ("w4g128", want("w4g128"), opts(4, 128, 16, false, false)),
        ("kv4_poq", want("kv4_poq"), opts(16, 128, 4, true, false)),
        (
            "w4g128_kv4_poq",
            want("w4g128_kv4_poq"),
            opts(4, 128, 4, true, false),
        ),
    ] {
        let p = ppl(m, &o, &smooth_data, &ids);
        let rel = p / reference - 1.0;
        eprintln!(
            "{name} (f16 scale/zero, as stored in plans): {p:.4} ({:+.3}% vs reference)",
            100.0 * rel
        );
        assert!(
            rel.abs() <= 0.02,
            "{name}: f16 storage gives {p}, not within 2% of {reference}"
        );
    }
    assert!(
        got["kv4_poq"] < got["kv4_full"],
        "past-only must beat reading quantized own K/V"
    );
    assert!(got["w4g128_kv4_poq"] < got["w4g128_kv4_full"]);
    assert!(
        got["kv4_poq_smooth"] < got["kv4_poq"],
        "smoothing init must help"
    );
}

#[test]
fn decode_equivalent_equals_incremental_decoding_on_256_tokens() {
    let (Some(m), Some(ids)) = (model(), eval_ids()) else {
        return;
    };
    let o = CompileOptions {
        calib_tokens: Some(1024),
        ..opts(4, 128, 4, true, true)
    };
    let data = compile::calibration_data(m, &o, &mut |_| {}).expect("calib");
    let c = compile::quantize(m, &o, Some(&data), &mut |_| {}).expect("quantize");
    let q = m.with_module(c.module, None);
    let e = q.engine(2).expect("engine");
    let toks = &ids[1000..1256];
    let mut s = e.session(256);
    let par = s
        .forward_mode(toks, RunMode::DecodeEquivalent)
        .expect("parallel");
    let v = m.config.vocab_size;
    let mut s = e.session(256);
    let mut worst = 0f32;
    for (t, &id) in toks.iter().enumerate() {
        let l = s.prefill(&[id]).expect("step");
        let (d, _) = max_abs_diff(&l, &par[t * v..(t + 1) * v]);
        worst = worst.max(d);
    }
    eprintln!("max |logit difference| over 256 steps: {worst:.2e}");
    assert!(
        worst <= 1e-4,
        "decode-equivalent differs from decoding by {worst}"
    );
    // 256 tokens of W4KV4 cache: 30 layers x 2 x (96 code bytes + 3 heads x 4 bytes)
    assert_eq!(s.kv_bytes(), 256 * 30 * 2 * (96 + 12));
}

#[test]
fn plan_round_trip_matches_in_memory_compile() {
    let (Some(m), Some(ids)) = (model(), eval_ids()) else {
        return;
    };
    let o = CompileOptions {
        calib_tokens: Some(1024),
        ..opts(4, 128, 4, true, true)
    };
    let data = compile::calibration_data(m, &o, &mut |_| {}).expect("calib");
    let c = compile::quantize(m, &o, Some(&data), &mut |_| {}).expect("quantize");
    let q = m.with_module(c.module.clone(), None);
    let quality = compile::measure_quality(m, &q, &data.held_out, 2).expect("quality");
    let dir = temp_dir("demo-plan");
    let p = dir.join("w4kv4.wkv");
    let size = plan::write(
        &p,
        &c.module,
        compile::manifest(m, &c, quality, String::new()),
    )
    .expect("write");
    // packed 4-bit linears + f32 embedding/norms: far below the 538 MB of f32 weights
    assert!(size < 200 << 20, "plan is {size} bytes");
    let opened = Model::open(&p).expect("open");
    let ev = |model: &Model| {
        let e = model.engine(2).expect("engine");
        eval::evaluate(
            &e,
            None,
            &ids,
            512,
            Some(1),
            RunMode::DecodeEquivalent,
            &mut |_, _| {},
        )
        .expect("eval")
        .perplexity
    };
    assert_eq!(ev(&opened), ev(&q));
    let man = opened.plan.as_ref().expect("manifest");
    // per layer and token, K and V: 192 channels as 4-bit codes (96 bytes) and 3 kv heads'
    // (scale, zero) in f16, as the compiled engines keep them (q4_0's 18 bytes a 32 values)
    let lowered = man.lowered.as_ref().expect("the plan's lowered record");
    assert_eq!(lowered.memory.kv_bytes_per_token, 30 * 2 * (96 + 3 * 2 * 2));
    assert!(man.quant.calibration.contains("wikitext2-calib.txt"));
    let _ = std::fs::remove_dir_all(dir);
}
