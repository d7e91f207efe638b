//! The quantization passes on a tiny model: IR snapshots before/after each pass, packed ==
//! fake-quant, decode-equivalent evaluation == token-by-token decoding with the real
//! quantized cache, past-only semantics, and the plan file (round trip, corruption).

use std::path::Path;
use wkvc_ir::text::print;
use wkvc_ir::{Module, RunMode};
use wkvc_passes::quant::{KvQuant, KvSmooth, Pack, PastOnly, WeightQuant, collect_kv_stats};
use wkvc_passes::{Pass, PassManager, PassReport};
use wkvc_runtime::compile::{self, CompileOptions};
use wkvc_runtime::{Model, plan};
use wkvc_tests::*;

fn tiny_model(tag: &str) -> (Model, std::path::PathBuf) {
    let cfg = tiny_config("llama");
    let w = tiny_weights(&cfg, 21);
    let dir = temp_dir(tag);
    write_gguf(&dir.join("tiny.gguf"), &cfg, &w, false);
    (Model::open(&dir.join("tiny.gguf")).expect("open tiny"), dir)
}

const IDS: [u32; 24] = [
    5, 17, 290, 3, 3, 100, 42, 7, 255, 1, 0, 64, 9, 9, 120, 33, 250, 2, 77, 78, 79, 80, 8, 16,
];

fn logits(m: &Model, mode: RunMode) -> Vec<f32> {
    let e = m.engine(2).expect("engine");
    let mut s = e.session(64);
    s.forward_mode(&IDS, mode).expect("forward")
}

/// Print the graph's first layer only (enough to review each rewrite).
fn layer0(m: &Module) -> String {
    print(&m.graph)
        .lines()
        .filter(|l| !l.contains("layers.1.") && !l.contains("rope_freqs"))
        .take(60)
        .collect::<Vec<_>>()
        .join("\n")
}

fn run_pass(m: &mut Module, p: impl Pass + 'static) {
    PassManager::new()
        .with(p)
        .run(m)
        .expect("pass runs and verifies");
}

#[test]
fn pass_snapshots_on_a_tiny_model() {
    let (fp, dir) = tiny_model("snap");
    let mut m = fp.module.clone();
    insta::assert_snapshot!("0_fp", layer0(&m));
    run_pass(
        &mut m,
        WeightQuant {
            bits: 4,
            group: 16,
            f32_params: false,
        },
    );
    insta::assert_snapshot!("1_weight_quant", layer0(&m));
    let windows = vec![IDS.to_vec()];
    let stats = collect_kv_stats(&fp.module, &windows, 1, &mut |_, _| {}).expect("stats");
    assert_eq!(stats.tokens, IDS.len());
    run_pass(&mut m, KvSmooth { stats: Some(stats) });
    insta::assert_snapshot!("2_kv_smooth", layer0(&m));
    run_pass(
        &mut m,
        KvQuant {
            bits: 4,
            f32_params: false,
            per_layer: None,
            group: 0,
        },
    );
    run_pass(&mut m, PastOnly);
    insta::assert_snapshot!("3_kv_quant_past_only", layer0(&m));
    run_pass(&mut m, Pack);
    insta::assert_snapshot!("4_pack", layer0(&m));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn packed_equals_fake_quant() {
    let (fp, dir) = tiny_model("pack");
    for (bits, group) in [(4, 16), (4, -1), (3, 8), (2, 32)] {
        let mut fq = fp.module.clone();
        run_pass(
            &mut fq,
            WeightQuant {
                bits,
                group,
                f32_params: false,
            },
        );
        let mut packed = fq.clone();
        let mut r = PassReport::default();
        Pack.run(&mut packed, &mut r).expect("pack");
        packed.verify().expect("verify");
        assert_eq!(r.stats["linears"], 14.0);
        assert!(
            packed
                .graph
                .nodes
                .iter()
                .all(|n| n.op != wkvc_ir::OpKind::FakeQuant)
        );
        // 4-bit codes plus f16 scale and zero per group: at most (0.5 + 4/8) bytes per weight
        // for the smallest group here (8), against 4 bytes in f32
        assert!(
            r.stats["bytes_after"] <= r.stats["bytes_before"] / 4.0,
            "{:?}",
            r.stats
        );
        let a = logits(&fp.with_module(fq, None), RunMode::Prefill);
        let b = logits(&fp.with_module(packed, None), RunMode::Prefill);
        // Same codes, same f16 scales and zeros, same dequantized matrix: identical arithmetic.
        assert_eq!(a, b, "bits {bits} group {group}");
        // and quantization did change the model
        assert_ne!(a, logits(&fp, RunMode::Prefill));
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn compiled(fp: &Model, wbits: u32, kvbits: u32, poq: bool, smooth: bool) -> Model {
    let opts = CompileOptions {
        wbits,
        wgroup: 16,
        kvbits,
        past_only: poq,
        smooth,
        threads: 2,
        calib_tokens: Some(48),
        calib_window: 24,
        ..Default::default()
    };
    let data = smooth.then(|| compile::calibration_data(fp, &opts, &mut |_| {}).expect("calib"));
    let c = compile::quantize(fp, &opts, data.as_ref(), &mut |_| {}).expect("quantize");
    fp.with_module(c.module, None)
}

/// Decode `IDS` token by token on the interpreter and compare each step's logits with the
/// decode-equivalent protocol's; returns the session (its cache).
fn decoding_matches_decode_equivalent(q: &Model, what: &str) -> wkvc_runtime::Session {
    let par = logits(q, RunMode::DecodeEquivalent);
    let e = q.engine(2).expect("engine");
    let mut s = e.session(64);
    let v = q.config.vocab_size;
    for (t, &id) in IDS.iter().enumerate() {
        let l = s.prefill(&[id]).expect("step");
        let (d, scale) = max_abs_diff(&l, &par[t * v..(t + 1) * v]);
        // The same quantized cache contents either way; only summation order differs.
        assert!(
            d <= 1e-4 * scale.max(1.0),
            "{what}: step {t} differs by {d}"
        );
    }
    s
}

#[test]
fn decode_equivalent_equals_token_by_token_decoding() {
    let (fp, dir) = tiny_model("deq");
    for (poq, smooth) in [(true, true), (false, false), (true, false)] {
        let q = compiled(&fp, 4, 4, poq, smooth);
        let s = decoding_matches_decode_equivalent(&q, &format!("poq {poq}"));
        assert!(
            s.kv_bytes() < 24 * 2 * 2 * 16 * 4 / 3,
            "the cache holds packed codes ({} bytes)",
            s.kv_bytes()
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn past_only_semantics() {
    let (fp, dir) = tiny_model("poq");
    let fpl = logits(&fp, RunMode::Prefill);
    let v = fp.config.vocab_size;
    // KV quantization without past-only changes even the first position (it reads its own
    // quantized K/V); with past-only the first position sees only FP K/V, so it is exact.
    let nopoq = logits(
        &compiled(&fp, 16, 4, false, false),
        RunMode::DecodeEquivalent,
    );
    let poq = logits(
        &compiled(&fp, 16, 4, true, false),
        RunMode::DecodeEquivalent,
    );
    assert_eq!(&poq[..v], &fpl[..v]);
    assert_ne!(&nopoq[..v], &fpl[..v]);
    // In prefill, past-only uses the whole chunk's FP K/V: a one-chunk prefill is exact.
    let pre = logits(&compiled(&fp, 16, 4, true, false), RunMode::Prefill);
    assert_eq!(pre, fpl);
    // 8-bit KV is closer to FP than 2-bit
    let err = |l: &[f32]| max_abs_diff(l, &fpl).0;
    let kv8 = logits(
        &compiled(&fp, 16, 8, true, false),
        RunMode::DecodeEquivalent,
    );
    let kv2 = logits(
        &compiled(&fp, 16, 2, true, false),
        RunMode::DecodeEquivalent,
    );
    assert!(
        err(&kv8) < err(&kv2),
        "kv8 {} vs kv2 {}",
        err(&kv8),
        err(&kv2)
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn write_tiny_plan(fp: &Model, path: &Path) {
    let opts = CompileOptions {
        wgroup: 16,
        threads: 2,
        calib_tokens: Some(48),
        calib_window: 24,
        ..Default::default()
    };
    let data = compile::calibration_data(fp, &opts, &mut |_| {}).expect("calib");
    let c = compile::quantize(fp, &opts, Some(&data), &mut |_| {}).expect("quantize");
    let q = fp.with_module(c.module.clone(), None);
    let quality = compile::measure_quality(fp, &q, &data.held_out, 2).expect("quality");
    let man = compile::manifest(fp, &c, quality, "0".repeat(64));
    plan::write(path, &c.module, man).expect("write plan");
}

/// The FP model run block by block (each block's weights in f32 only while it runs) gives
/// the whole-graph interpreter's logits and K/V statistics bit for bit.
#[test]
fn streamed_fp_model_equals_the_whole_graph() {
    let (fp, dir) = tiny_model("stream");
    let windows = vec![
        IDS.to_vec(),
        IDS.iter().rev().copied().collect::<Vec<u32>>(),
    ];
    let out = wkvc_passes::stream::run(&fp.module, &windows, 2, true, true, &mut |_, _| {})
        .expect("streamed run");
    let it = wkvc_ir::interp::Interpreter::new(&fp.module, 2).expect("interp");
    for (w, l) in windows.iter().zip(&out.logits) {
        let n = w.len();
        let mut cache = wkvc_ir::KvCache::new(n);
        let r = it
            .run(
                &[
                    (
                        "tokens",
                        wkvc_ir::interp::Tensor::i32(
                            vec![n],
                            w.iter().map(|&t| t as i32).collect(),
                        ),
                    ),
                    (
                        "positions",
                        wkvc_ir::interp::Tensor::i32(vec![n], (0..n as i32).collect()),
                    ),
                ],
                &mut cache,
            )
            .expect("whole graph");
        let whole = r["logits"].as_f32().expect("f32 logits");
        assert_eq!(whole.len(), l.len());
        assert!(
            whole == &l[..],
            "streamed logits differ from the whole graph's"
        );
    }
    let whole = collect_kv_stats(&fp.module, &windows, 2, &mut |_, _| {}).expect("stats");
    let streamed = out.kv_stats.expect("stats asked for");
    assert_eq!(whole.tokens, streamed.tokens);
    assert_eq!(whole.layers, streamed.layers);
    let _ = std::fs::remove_dir_all(dir);
}

/// Packed tensors written to a spill file as they are made (`spill_dir`) give the same plan
/// as tensors kept in memory, and the spill file leaves nothing behind.
#[test]
fn spilled_compile_writes_the_same_plan() {
    let (fp, dir) = tiny_model("spill");
    let mut files = Vec::new();
    for spill in [false, true] {
        let opts = CompileOptions {
            wgroup: 16,
            threads: 2,
            calib_tokens: Some(48),
            calib_window: 24,
            spill_dir: spill.then(|| dir.clone()),
            ..Default::default()
        };
        let data = compile::calibration_data(&fp, &opts, &mut |_| {}).expect("calib");
        let c = compile::quantize(&fp, &opts, Some(&data), &mut |_| {}).expect("quantize");
        assert_eq!(c.module.weights.spilled_bytes() > 0, spill);
        let man = compile::manifest(&fp, &c, serde_json::json!({}), "0".repeat(64));
        let p = dir.join(format!("s{spill}.wkv"));
        plan::write(&p, &c.module, man).expect("write plan");
        let opened = Model::open(&p).expect("open plan");
        let man = opened.plan.clone().expect("manifest");
        // the tensors (by their hashes) and the graph; pass reports hold timings
        files.push((
            serde_json::to_string(&man.tensors).expect("json"),
            man.graph.clone(),
        ));
    }
    assert!(
        files[0] == files[1],
        "spilled and in-memory compiles differ"
    );
    let left: Vec<String> = dir
        .read_dir()
        .expect("dir")
        .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("spill") && !n.ends_with(".wkv"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The plan writer streams the container tensor by tensor; the file must be exactly what
/// the safetensors crate's own serializer makes of the same tensors and metadata.
#[test]
fn streamed_plan_container_equals_the_safetensors_serializer() {
    let (fp, dir) = tiny_model("plan-stream");
    let p = dir.join("tiny.wkv");
    write_tiny_plan(&fp, &p);
    let file = std::fs::read(&p).expect("read plan");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&file).expect("header");
    let st = safetensors::SafeTensors::deserialize(&file).expect("container");
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    assert!(tensors.len() > 10, "{} tensors", tensors.len());
    let again = safetensors::serialize(tensors, meta.metadata().clone()).expect("serialize");
    assert_eq!(again.len(), file.len());
    assert!(
        again == file,
        "the streamed container differs from safetensors::serialize"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn plan_round_trip_and_corruption() {
    let (fp, dir) = tiny_model("plan");
    let p = dir.join("tiny.wkv");
    write_tiny_plan(&fp, &p);
    assert!(plan::is_plan(&p));
    assert!(
        !dir.read_dir().expect("dir").any(|e| e
            .expect("e")
            .file_name()
            .to_string_lossy()
            .contains("wkvc-tmp")),
        "no temp file left"
    );
    let opened = Model::open(&p).expect("open plan");
    let man = opened.plan.as_ref().expect("manifest");
    assert_eq!(man.quant.wbits, 4);
    assert!(
        man.quant.calibration.contains("sampled from the FP model"),
        "{}",
        man.quant.calibration
    );
    assert!(man.quality["kld_vs_fp"].as_f64().expect("kld") > 0.0);
    // the lowered plan is recorded with its memory plan
    let lowered = man.lowered.as_ref().expect("the lowered record");
    assert!(lowered.memory.kv_bytes_per_token > 0 && lowered.memory.weights_bytes > 0);
    // the plan runs on its own and equals the in-memory compile
    let opts = CompileOptions {
        wgroup: 16,
        threads: 2,
        calib_tokens: Some(48),
        calib_window: 24,
        ..Default::default()
    };
    let data = compile::calibration_data(&fp, &opts, &mut |_| {}).expect("calib");
    let c = compile::quantize(&fp, &opts, Some(&data), &mut |_| {}).expect("quantize");
    let mem = fp.with_module(c.module, None);
    assert_eq!(
        logits(&opened, RunMode::DecodeEquivalent),
        logits(&mem, RunMode::DecodeEquivalent)
    );
    assert_eq!(
        opened
            .tokenizer()
            .expect("tok")
            .encode("the 42", false)
            .expect("e"),
        vec![116, 257, 32, 52, 50]
    );

    let good = std::fs::read(&p).expect("read");
    let bad = dir.join("bad.wkv");
    let open_bad = |bytes: &[u8]| -> Result<(), String> {
        std::fs::write(&bad, bytes).expect("write");
        plan::open(&bad).map(|_| ()).map_err(|e| e.to_string())
    };
    // truncation anywhere
    for cut in [0, 4, 8, 9, 100, good.len() / 2, good.len() - 1] {
        let e = open_bad(&good[..cut]).expect_err("truncated");
        assert!(e.contains("bad.wkv"), "{e}");
    }
    // a flipped data byte is a hash mismatch naming the tensor
    let mut b = good.clone();
    let last = b.len() - 3;
    b[last] ^= 0x55;
    let e = open_bad(&b).expect_err("tampered data");
    assert!(e.contains("content hash mismatch"), "{e}");
    // version and dtype tampering in the manifest (same-length edits of the header bytes)
    let replace = |from: &str, to: &str| -> Option<Vec<u8>> {
        let (f, t) = (from.as_bytes(), to.as_bytes());
        let at = good.windows(f.len()).position(|w| w == f)?;
        let mut b = good.clone();
        b[at..at + f.len()].copy_from_slice(t);
        Some(b)
    };
    for (from, to, want) in [
        (
            "\\\"version\\\":2",
            "\\\"version\\\":9",
            "version 9 is not supported",
        ),
        (
            "\\\"dtype\\\":\\\"f16\\\"",
            "\\\"dtype\\\":\\\"f32\\\"",
            "the manifest says f32",
        ),
        (
            "\\\"format\\\":\\\"wkvc-plan\\\"",
            "\\\"format\\\":\\\"wkvc-nope\\\"",
            "manifest format",
        ),
    ] {
        let t = replace(from, to).unwrap_or_else(|| panic!("{from} not in the header"));
        let e = open_bad(&t).expect_err(want);
        assert!(e.contains(want), "expected `{want}` in `{e}`");
    }
    // every header byte and a stride of data bytes, each set to a few values: never a panic
    let header = 8 + u64::from_le_bytes(good[..8].try_into().expect("8")) as usize;
    let mut errors = 0usize;
    let mut tries = 0usize;
    for i in (0..header)
        .step_by(5)
        .chain((header..good.len()).step_by(251))
    {
        for v in [0x00u8, 0xFF, b'"', b'9'] {
            if good[i] == v {
                continue;
            }
            let mut b = good.clone();
            b[i] = v;
            tries += 1;
            if open_bad(&b).is_err() {
                errors += 1;
            }
        }
    }
    assert!(
        errors * 10 >= tries * 9,
        "only {errors} of {tries} corruptions detected"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `Scoring::Llama` is llama-perplexity's protocol: each chunk's first token replaced by the
/// BOS (when the model adds one), only positions ctx/2 .. ctx-2 scored; `Scoring::Windows`
/// scores every prediction of the text as it is. Checked against the NLL summed by hand from
/// each window's logits.
#[test]
fn llama_scoring_scores_the_second_half_of_each_chunk_after_a_bos() {
    use wkvc_runtime::eval::{self, Scoring};
    let (m, _dir) = tiny_model("llama-scoring");
    let e = m.engine(1).expect("engine");
    let ids: Vec<u32> = (0..3 * 12 + 5).map(|i| (i * 37 % 290) as u32).collect();
    let ctx = 12;
    let vocab = e.vocab_size();
    let by_hand = |bos: Option<u32>, first: usize| {
        let mut s = e.session(ctx);
        let (mut sum, mut n) = (0f64, 0usize);
        for w in 0..3 {
            let mut win = ids[w * ctx..(w + 1) * ctx].to_vec();
            if let Some(b) = bos {
                win[0] = b;
            }
            s.reset();
            let l = s
                .forward_mode(&win, RunMode::DecodeEquivalent)
                .expect("fwd");
            for t in first..ctx - 1 {
                sum += eval::nll(&l[t * vocab..(t + 1) * vocab], win[t + 1] as usize);
                n += 1;
            }
        }
        (sum / n as f64, n)
    };
    for (scoring, bos, first) in [
        (Scoring::Llama { bos: Some(297) }, Some(297), ctx / 2),
        (Scoring::Llama { bos: None }, None, ctx / 2),
        (Scoring::Windows, None, 0),
    ] {
        let r = eval::evaluate_scored(
            &e,
            None,
            &ids,
            ctx,
            None,
            RunMode::DecodeEquivalent,
            scoring,
            &mut |_, _| {},
        )
        .expect("evaluate");
        let (mean, n) = by_hand(bos, first);
        assert_eq!(
            r.windows, 3,
            "{scoring:?}: the 5 tokens after 3 windows are not a window"
        );
        assert_eq!(r.tokens, n, "{scoring:?}");
        assert_eq!(r.tokens, 3 * (ctx - 1 - first), "{scoring:?}");
        // the same f64 sums in the same order
        assert_eq!(r.mean_nll, mean, "{scoring:?}");
        assert_eq!(r.bos, bos.is_some());
    }
    // the BOS changes what the model sees (else the first case above checked nothing)
    assert_ne!(by_hand(Some(297), 6).0, by_hand(None, 6).0);
}

/// The K/V rotation is exact in real arithmetic: with an FP cache the rotated model's logits
/// are the model's up to float rounding (prefill and decode-equivalent), for every Hadamard
/// block dividing the head; its RoPE nodes carry the block and `v_proj`/`o_proj` changed.
#[test]
fn kv_rotation_leaves_the_fp_model_unchanged() {
    use wkvc_passes::quant::KvRotate;
    let (m, _dir) = tiny_model("kv-rotate");
    let base_pre = logits(&m, RunMode::Prefill);
    let base_de = logits(&m, RunMode::DecodeEquivalent);
    let scale = base_pre.iter().fold(0f32, |a, &x| a.max(x.abs()));
    for block in [8usize, 4, 2] {
        let mut module = m.module.clone();
        run_pass(&mut module, KvRotate { block });
        let ropes: Vec<i64> = module
            .graph
            .nodes
            .iter()
            .filter(|n| n.op == wkvc_ir::OpKind::Rope)
            .map(|n| n.int_attr("rotate").unwrap_or(0))
            .collect();
        assert!(
            !ropes.is_empty() && ropes.iter().all(|&r| r == block as i64),
            "{ropes:?}"
        );
        let w = |md: &Module, n: &str| md.weights.get(n).expect(n).f32().into_owned();
        for name in [
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.1.self_attn.o_proj.weight",
        ] {
            assert_ne!(w(&module, name), w(&m.module, name), "{name} unchanged");
        }
        let r = m.with_module(module, None);
        for (mode, base) in [
            (RunMode::Prefill, &base_pre),
            (RunMode::DecodeEquivalent, &base_de),
        ] {
            let got = logits(&r, mode);
            let diff = got
                .iter()
                .zip(base.iter())
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            // f32 rounding of a few extra sums per value through two layers: a few ulps of
            // the logits' scale, far below any effect of the rotation being wrong (O(scale))
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "block {block} {mode:?}: max |logit diff| {diff} (logit scale {scale})"
            );
        }
    }
}

/// `--kv-bits-per-layer`: each attention gets its layer's bits (16: none, and no past-only),
/// the plan records them, decode-equivalent evaluation is still token-by-token decoding, and
/// the compiled engine's cache holds each layer at its own width.
#[test]
fn per_layer_kv_bits_reach_each_attention_the_plan_and_the_engine() {
    use compile::KvLayerBits;
    let (fp, dir) = tiny_model("perlayer");
    let layers = fp.config.num_layers;
    assert_eq!(layers, 2, "the tiny model's layers");
    for bits in [vec![3, 4], vec![16, 2], vec![4, 16]] {
        let o = CompileOptions {
            wgroup: 16,
            threads: 2,
            calib_tokens: Some(48),
            calib_window: 24,
            kv_layer_bits: KvLayerBits::List(bits.clone()),
            quality_check: compile::QualityCheck::None,
            ..Default::default()
        };
        let data = compile::calibration_data(&fp, &o, &mut |_| {}).expect("calibration data");
        let c = compile::quantize(&fp, &o, Some(&data), &mut |_| {}).expect("compile");
        assert_eq!(c.quant.kv_bits_per_layer.as_deref(), Some(&bits[..]));
        let mut seen = vec![false; layers];
        for n in c
            .module
            .graph
            .nodes
            .iter()
            .filter(|n| n.op == wkvc_ir::OpKind::Attention)
        {
            let l = n.int_attr("layer").expect("layer") as usize;
            seen[l] = true;
            let want = (bits[l] < 16).then_some(bits[l] as i64);
            assert_eq!(n.int_attr("kv_bits"), want, "{bits:?}: layer {l}");
            assert_eq!(
                n.bool_attr("past_only").unwrap_or(false),
                bits[l] < 16,
                "{bits:?}: past-only on the quantized layers only"
            );
        }
        assert!(seen.iter().all(|&s| s), "every layer has an attention");

        // the compiled engine's cache: each layer at its own width
        let q = fp.with_module(c.module.clone(), None);
        let lp = q.lowered(wkvc_ir::Act::F32).expect("lowers");
        let want: usize = bits
            .iter()
            .map(|&b| {
                wkvc_ir::kvcache::bytes_per_token(
                    fp.config.num_kv_heads * fp.config.head_dim,
                    fp.config.num_kv_heads,
                    b,
                    2,
                )
            })
            .sum();
        assert_eq!(lp.memory.kv_bytes_per_token, want, "{bits:?}");

        // decode-equivalent == token by token on the interpreter, as for uniform bits
        decoding_matches_decode_equivalent(&q, &format!("{bits:?}"));

        // the plan records them
        let p = dir.join("perlayer.wkv");
        let man = compile::manifest(&fp, &c, serde_json::Value::Null, String::new());
        plan::write(&p, &c.module, man).expect("write plan");
        let (_, m) = plan::open(&p).expect("plan opens");
        assert_eq!(m.quant.kv_bits_per_layer.as_deref(), Some(&bits[..]));
        assert!(
            m.quant.kv_label().starts_with("KV per layer"),
            "{}",
            m.quant.kv_label()
        );
    }

    // a list of the wrong length names the layers
    let o = CompileOptions {
        kv_layer_bits: KvLayerBits::List(vec![4, 4, 4]),
        calib_tokens: Some(48),
        calib_window: 24,
        threads: 1,
        quality_check: compile::QualityCheck::None,
        ..Default::default()
    };
    let data = compile::calibration_data(&fp, &o, &mut |_| {}).expect("calibration data");
    let e = compile::quantize(&fp, &o, Some(&data), &mut |_| {})
        .err()
        .expect("three bits for two layers is an error");
    assert!(
        e.to_string()
            .contains("3 per-layer bits given for a model of 2 layers"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn kv_layer_bits_parse_and_validate() {
    use compile::KvLayerBits;
    assert_eq!(
        KvLayerBits::parse("auto:3.5").expect("budget"),
        KvLayerBits::Budget(3.5)
    );
    assert_eq!(
        KvLayerBits::parse("4, 3,16").expect("list"),
        KvLayerBits::List(vec![4, 3, 16])
    );
    for bad in ["auto:x", "4,,3", "four", "auto:"] {
        assert!(KvLayerBits::parse(bad).is_err(), "{bad}");
    }
    let check = |kvbits, l: KvLayerBits| {
        CompileOptions {
            kvbits,
            kv_layer_bits: l,
            ..Default::default()
        }
        .validate()
    };
    assert!(check(4, KvLayerBits::Budget(3.5)).is_ok());
    assert!(check(4, KvLayerBits::Budget(4.0)).is_ok());
    assert!(
        check(4, KvLayerBits::Budget(2.9)).is_err(),
        "below one bit less"
    );
    assert!(
        check(4, KvLayerBits::Budget(4.1)).is_err(),
        "above --kvbits"
    );
    assert!(
        check(2, KvLayerBits::Budget(2.0)).is_err(),
        "no width below 2 bits"
    );
    assert!(check(4, KvLayerBits::Budget(f64::NAN)).is_err());
    assert!(check(4, KvLayerBits::List(vec![4, 9])).is_err(), "9 bits");
    assert!(check(4, KvLayerBits::List(vec![4, 1])).is_err(), "1 bit");
}

/// `--kv-group`: a multiple of 32 (the option), dividing the head dim (the pass, which knows
/// the model).
#[test]
fn kv_group_must_be_a_multiple_of_32_dividing_the_head_dim() {
    let e = CompileOptions {
        kv_group: 48,
        ..Default::default()
    }
    .validate()
    .expect_err("48");
    assert!(
        e.to_string()
            .contains("--kv-group must be a multiple of 32"),
        "{e}"
    );
    let fp = Model::open(&tiny_gguf(&temp_dir("kvgroup")))
        .expect("tiny")
        .module
        .clone();
    let hd = fp
        .graph
        .nodes
        .iter()
        .find_map(|n| n.int_attr("head_dim"))
        .expect("an attention") as usize;
    let mut m = fp.clone();
    let err = PassManager::new()
        .with(KvQuant {
            group: 2 * hd.max(32).next_multiple_of(32),
            ..KvQuant::uniform(4, false)
        })
        .run(&mut m)
        .expect_err("a group wider than the head");
    assert!(err.to_string().contains("dividing the head dim"), "{err}");
}

/// `--calib-schedule weights-first` orders two learned things, so it needs both.
#[test]
fn weights_first_schedule_needs_clipping_and_smoothing_learned() {
    use compile::{CalibConfig, CalibSchedule, Method};
    let check = |wbits, kvbits, smooth, lwc, sm| {
        CompileOptions {
            wbits,
            kvbits,
            smooth,
            method: Method::WkvQuant,
            calib_cfg: CalibConfig {
                schedule: CalibSchedule::WeightsFirst,
                learn_lwc: lwc,
                learn_smooth: sm,
                ..CalibConfig::default()
            },
            ..Default::default()
        }
        .validate()
    };
    assert!(check(4, 4, true, true, true).is_ok());
    for (w, kv, smooth, lwc, sm, why) in [
        (16, 4, true, true, true, "weights in full precision"),
        (4, 16, true, true, true, "cache in full precision"),
        (4, 4, false, true, true, "no smoothing"),
        (4, 4, true, false, true, "clipping not learned"),
        (4, 4, true, true, false, "smoothing not learned"),
    ] {
        let e = check(w, kv, smooth, lwc, sm).expect_err(why).to_string();
        assert!(e.contains("--calib-schedule weights-first"), "{why}: {e}");
    }
}

/// The budget goes to the layers whose divergence grows least, never above the average asked.
#[test]
fn kv_budget_lowers_the_layers_that_lose_least() {
    let scan = compile::KvScan {
        bits: [3, 4],
        tokens: 10,
        // costs (lower - higher), exact in binary: 0.75, 0.25, 0.5, 0.25
        kld: vec![[1.0, 0.25], [0.5, 0.25], [0.75, 0.25], [0.375, 0.125]],
        seconds: 0.0,
    };
    assert_eq!(scan.allocate(4.0), vec![4, 4, 4, 4]);
    assert_eq!(scan.allocate(3.0), vec![3, 3, 3, 3]);
    // two layers down: the two cheapest (a tie: the earlier first)
    assert_eq!(scan.allocate(3.5), vec![4, 3, 4, 3]);
    // 3.8 on 4 layers: one layer down (3.75; none would be 4, above the budget)
    assert_eq!(scan.allocate(3.8), vec![4, 3, 4, 4]);
    assert_eq!(scan.allocate(3.75), vec![4, 3, 4, 4]);
    // the average never exceeds the budget, and one layer fewer down would
    for budget in [3.0, 3.1, 3.25, 3.5, 3.74, 3.75, 3.8, 3.99, 4.0] {
        let b = scan.allocate(budget);
        let avg = b.iter().sum::<u32>() as f64 / 4.0;
        assert!(avg <= budget + 1e-12, "{budget}: {b:?}");
        assert!(avg + 0.25 > budget, "{budget}: {b:?} spends too little");
    }
}

/// `--kv-bits-per-layer auto:B`: the scan measures each layer alone at each width (checked
/// against the same divergence computed here from a plan with only that layer quantized), the
/// plan gets the scan's allocation and records the scan.
#[test]
fn kv_sensitivity_scan_measures_each_layer_alone() {
    use compile::KvLayerBits;
    let (fp, dir) = tiny_model("kvscan");
    let o = CompileOptions {
        wgroup: 16,
        threads: 2,
        calib_tokens: Some(48),
        calib_window: 24,
        kv_layer_bits: KvLayerBits::Budget(3.5),
        kv_scan_tokens: 20,
        smooth: false,
        quality_check: compile::QualityCheck::None,
        ..Default::default()
    };
    let data = compile::calibration_data(&fp, &o, &mut |_| {}).expect("calibration data");
    let c = compile::quantize(&fp, &o, Some(&data), &mut |_| {}).expect("compile");
    let scan = c
        .quant
        .kv_sensitivity
        .clone()
        .expect("the plan records the scan");
    assert_eq!(scan.bits, [3, 4]);
    assert_eq!(scan.tokens, 20);
    assert_eq!(scan.kld.len(), 2);
    let bits = c.quant.kv_bits_per_layer.clone().expect("per-layer bits");
    assert_eq!(bits, scan.allocate(3.5));
    assert_eq!(bits.iter().filter(|&&b| b == 3).count(), 1, "{bits:?}");

    let ids: Vec<u32> = data.windows.iter().flatten().copied().take(20).collect();
    let v = fp.config.vocab_size;
    let run = |m: &Model| {
        let e = m.engine(1).expect("engine");
        let mut s = e.session(64);
        s.forward_mode(&ids, RunMode::DecodeEquivalent)
            .expect("forward")
    };
    let reference = run(&fp);
    for l in 0..2 {
        for (i, b) in [3u32, 4].into_iter().enumerate() {
            let mut per = vec![16; 2];
            per[l] = b;
            let mut m = fp.module.clone();
            PassManager::new()
                .with(KvQuant {
                    bits: b,
                    f32_params: false,
                    per_layer: Some(per),
                    group: 0,
                })
                .with(PastOnly)
                .run(&mut m)
                .expect("passes");
            let got = run(&fp.with_module(m, None));
            let kld = (0..ids.len())
                .map(|t| {
                    let r = t * v..(t + 1) * v;
                    wkvc_runtime::eval::kl_divergence(&reference[r.clone()], &got[r])
                })
                .sum::<f64>()
                / ids.len() as f64;
            // the same computation on the same engine: equal up to the sum's rounding
            let d = (kld - scan.kld[l][i]).abs();
            assert!(
                d <= 1e-9 + 1e-6 * kld,
                "layer {l} at {b} bits: scan {} vs {kld}",
                scan.kld[l][i]
            );
            assert!(kld > 0.0, "layer {l} at {b} bits changes the model");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `wkvc inspect --plots`' K/V probe: a rotated plan's captured K/V, its rotation undone, are
/// the unrotated plan's (the rotation leaves the FP model unchanged), and the views the charts
/// draw are the definitions: the smoothed view is (rotated x - shift) / scale per channel.
#[test]
fn kv_probe_undoes_the_rotation_and_applies_the_plans_smoothing() {
    use wkvc_runtime::kvprobe::kv_channels;
    let (fp, dir) = tiny_model("kvprobe");
    let plan = |rotate: usize| {
        let o = CompileOptions {
            wbits: 16,
            kv_rotate: rotate,
            calib_tokens: Some(48),
            calib_window: 24,
            threads: 1,
            quality_check: compile::QualityCheck::None,
            ..Default::default()
        };
        let data = compile::calibration_data(&fp, &o, &mut |_| {}).expect("calibration data");
        let c = compile::quantize(&fp, &o, Some(&data), &mut |_| {}).expect("compile");
        fp.with_module(c.module, None)
    };
    let (plain, rotated) = (plan(0), plan(8));
    let a = kv_channels(&plain, &IDS, &[], 1).expect("probe");
    let b = kv_channels(&rotated, &IDS, &[1], 1).expect("probe");
    assert_eq!(a.len(), 2, "every layer when none is named");
    assert_eq!(b.len(), 1);
    let (a, b) = (&a[1], &b[0]);
    assert_eq!((a.layer, b.layer, a.rotate, b.rotate), (1, 1, 0, 8));
    for (x, y) in [(&a.k, &b.k), (&a.v, &b.v)] {
        let (d, scale) = max_abs_diff(x, y);
        // two f32 Hadamard transforms of values ~1: rounding of a few ulps
        assert!(d <= 1e-5 * scale.max(1.0), "unrotated K/V differ by {d}");
    }
    // the smoothed view: the plan's shift and scale on the rotated values
    let s = b.smoothing.as_ref().expect("the plan smooths");
    let rot = b.rotated(false, 8);
    let sm = b.smoothed(false).expect("smoothed view");
    for (i, (&r, &z)) in rot.iter().zip(&sm).enumerate() {
        let c = i % b.width;
        assert_eq!(z, (r - s[0][c]) / s[1][c]);
    }
    assert!(kv_channels(&plain, &IDS, &[7], 1).is_err(), "no layer 7");
    let _ = std::fs::remove_dir_all(dir);
}
