//! Past-only attention's recent window (`--kv-window`, the `kv_window` attribute) on the
//! reference interpreter: decoding token by token equals the decode-equivalent protocol (the
//! window's full-precision tail carried from step to step reads as the chunk's own rows), a
//! window covering the context equals the full-precision cache, the CPU engine keeps the
//! window as the interpreter does (also across the rounds of a call longer than a chunk, and
//! counts the tail's bytes), and so does the CUDA engine on the host emulator. Batched window
//! sessions: `runtime_core.rs`.

use std::sync::OnceLock;
use wkvc_ir::{Act, RunMode};
use wkvc_runtime::compile::{self, CompileOptions};
use wkvc_runtime::{EngineKind, Model};
use wkvc_tests::agree::{Agreement, agreement, check_call};
use wkvc_tests::{demo_model, max_abs_diff, temp_dir, tiny_config, tiny_weights, write_gguf};

fn model() -> Option<&'static Model> {
    static M: OnceLock<Option<Model>> = OnceLock::new();
    M.get_or_init(|| demo_model().map(|p| Model::open(&p).expect("demo model opens")))
        .as_ref()
}

/// FP weights, RTN KV cache without smoothing (no calibration text needed), `window`.
fn plan(m: &Model, kvbits: u32, window: usize) -> Model {
    let o = CompileOptions {
        wbits: 16,
        kvbits,
        smooth: false,
        kv_window: window,
        threads: 2,
        ..Default::default()
    };
    let c = compile::quantize(m, &o, None, &mut |_| {}).expect("quantize");
    m.with_module(c.module, None)
}

fn tokens(m: &Model, n: usize) -> Vec<u32> {
    let text = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. ".repeat(8);
    let ids = m
        .tokenizer()
        .expect("tok")
        .encode(&text, false)
        .expect("encode");
    assert!(ids.len() >= n, "{} tokens", ids.len());
    ids[..n].to_vec()
}

/// Logits of every position: the first `chunk` tokens as one prefill, then one at a time.
fn stepped(q: &Model, ids: &[u32], chunk: usize) -> Vec<f32> {
    let e = q.engine(2).expect("engine");
    let mut s = e.session(ids.len());
    let mut all = s.forward(&ids[..chunk]).expect("prefill");
    for &id in &ids[chunk..] {
        all.extend(s.prefill(&[id]).expect("step"));
    }
    all
}

/// Logits of every position under the decode-equivalent protocol, a fresh session.
fn decode_equivalent(q: &Model, ids: &[u32]) -> Vec<f32> {
    q.engine(2)
        .expect("engine")
        .session(ids.len())
        .forward_mode(ids, RunMode::DecodeEquivalent)
        .expect("decode-equivalent")
}

#[test]
fn decoding_with_a_window_equals_the_decode_equivalent_protocol() {
    let Some(m) = model() else {
        return;
    };
    let ids = tokens(m, 40);
    let q = plan(m, 4, 8);
    let e = q.engine(2).expect("engine");
    let mut s = e.session(ids.len());
    let de = s
        .forward_mode(&ids, RunMode::DecodeEquivalent)
        .expect("decode-equivalent");
    // a reset session starts without a tail (as `wkvc eval` runs window after window)
    s.reset();
    let again = s
        .forward_mode(&ids, RunMode::DecodeEquivalent)
        .expect("after a reset");
    assert_eq!(again, de);
    // token by token from the first position: every step reads its window's earlier rows from
    // the tail the previous steps left
    let (d, _) = max_abs_diff(&stepped(&q, &ids, 1), &de);
    assert!(d <= 1e-4, "token by token differs by {d}");
    // the window matters: the same plan with a window of 1 reads differently
    let de1 = decode_equivalent(&plan(m, 4, 1), &ids);
    let (d1, _) = max_abs_diff(&de1, &de);
    assert!(
        d1 > 1e-2,
        "a window of 8 reads as a window of 1 (difference {d1})"
    );
}

#[test]
fn a_window_covering_the_context_is_the_full_precision_cache() {
    let Some(m) = model() else {
        return;
    };
    let ids = tokens(m, 24);
    let fp = decode_equivalent(&plan(m, 16, 1), &ids);
    let q = plan(m, 3, 24);
    let de = decode_equivalent(&q, &ids);
    let (d, _) = max_abs_diff(&de, &fp);
    assert!(d <= 1e-4, "decode-equivalent differs from FP by {d}");
    // a prefill of 10, then decoding: the tail holds every earlier position
    let (d, _) = max_abs_diff(&stepped(&q, &ids, 10), &fp);
    assert!(d <= 1e-4, "prefill + decode differs from FP by {d}");
}

#[test]
fn a_window_of_one_is_no_attribute() {
    let Some(m) = model() else {
        return;
    };
    // a window of 1 is past-only as before: no attribute
    let windowed = |w: usize| {
        plan(m, 4, w)
            .module
            .graph
            .nodes
            .iter()
            .filter(|n| n.attr("kv_window").is_some())
            .count()
    };
    assert_eq!(windowed(1), 0);
    assert_eq!(windowed(8), m.config.num_layers);
}

#[test]
fn the_cpu_engine_keeps_the_window_as_the_interpreter_does() {
    let Some(m) = model() else {
        return;
    };
    // smoothing from text sampled by the model is not needed: RTN without smoothing, and
    // with the rotation (the window's rows are read in the rotated basis)
    let o = CompileOptions {
        wbits: 16,
        kvbits: 4,
        smooth: false,
        kv_rotate: 64,
        kv_window: 8,
        threads: 2,
        ..Default::default()
    };
    let c = compile::quantize(m, &o, None, &mut |_| {}).expect("quantize");
    let q = m.with_module(c.module, None);
    let it = q.engine_kind(2, EngineKind::Interp).expect("interpreter");
    let eng = q
        .engine_kind(2, EngineKind::Cpu { act: Act::F32 })
        .expect("the CPU engine takes a window plan");
    let prompt = tokens(m, 20);
    let more = tokens(m, 32)[20..].to_vec();
    let mut steps: Vec<&[u32]> = vec![&prompt[..5], &prompt[5..]];
    steps.extend(more.iter().map(std::slice::from_ref));
    // prefill chunks (the second reads the first's tail), then decode steps crossing the
    // window's length; and the decode-equivalent protocol in two chunks; each call against
    // the interpreter replaying the engine's cache (the bounds of demo_cpu's exact path)
    for (mode, chunks) in [
        (RunMode::Prefill, &steps[..]),
        (
            RunMode::DecodeEquivalent,
            &[&prompt[..12], &prompt[12..]][..],
        ),
    ] {
        let a = agreement(&it, &eng, chunks, mode, 64);
        eprintln!("window 8 {mode:?}: {}", a.summary());
        assert!(a.max_abs <= 1e-3, "max |diff| {}", a.max_abs);
        assert!(a.kv_excess <= 1e-3, "K/V {}", a.summary());
    }
    // a cache exported after a prefill and loaded into a fresh session decodes the same
    let mut s = eng.session(64);
    s.forward(&prompt).expect("prefill");
    let cache = s.kv_cache().expect("export");
    let next = s.prefill(&more[..1]).expect("step").to_vec();
    let mut t = eng.session(64);
    t.load_kv(&cache).expect("load");
    assert_eq!(t.prefill(&more[..1]).expect("step"), &next[..]);
}

#[test]
fn a_call_longer_than_a_chunk_carries_the_window_from_round_to_round() {
    // a tiny model with a context beyond the engine's chunk of 512 rows: one call of 700
    // tokens runs in two rounds, the second reading the tails the first staged
    let mut cfg = tiny_config("llama");
    cfg.max_position_embeddings = 1024;
    // the CPU engine's rope_kv takes head dims in multiples of 32
    cfg.head_dim = 32;
    cfg.hidden_size = 128;
    cfg.intermediate_size = 160;
    let dir = temp_dir("kv-window-long");
    write_gguf(&dir.join("tiny.gguf"), &cfg, &tiny_weights(&cfg, 5), false);
    let m = Model::open(&dir.join("tiny.gguf")).expect("open tiny");
    let window = 6;
    let q = plan(&m, 4, window);
    let it = q.engine_kind(1, EngineKind::Interp).expect("interpreter");
    let eng = q
        .engine_kind(2, EngineKind::Cpu { act: Act::F32 })
        .expect("CPU engine");
    let cuda = q
        .engine_kind(1, EngineKind::CudaEmulated { mma: false })
        .expect("the CUDA engine on the host emulator");
    let ids: Vec<u32> = (0..720).map(|i| ((i * 37 + 11) % 300) as u32).collect();
    let mut chunks: Vec<&[u32]> = vec![&ids[..700]];
    chunks.extend(ids[700..710].chunks(1));
    for e in [&eng, &cuda] {
        for (mode, chunks) in [
            (RunMode::Prefill, &chunks[..]),
            (RunMode::DecodeEquivalent, &[&ids[..600], &ids[600..]][..]),
        ] {
            let a = agreement(&it, e, chunks, mode, 1024);
            let what = format!("{}: 700-token call, window {window} {mode:?}", e.describe());
            eprintln!("{what}: {}", a.summary());
            assert!(a.max_abs <= 1e-3, "{what}: max |diff| {}", a.max_abs);
            assert!(a.kv_excess <= 1e-3, "{what}: K/V {}", a.summary());
        }
    }
    // last-token calls, as `wkvc run` makes them: decode steps (the CUDA engine records a
    // session's one-token graph on the first), then a prefill of 513 tokens whose second
    // round is one token after the staged tail of the first (not the graph's), then steps
    for e in [&eng, &cuda] {
        let mut s = e.session(1024);
        let mut a = Agreement::default();
        let calls: Vec<&[u32]> = vec![
            &ids[..3],
            &ids[3..4],
            &ids[4..5],
            &ids[5..518],
            &ids[518..519],
            &ids[519..520],
        ];
        for c in calls {
            let past = s.len();
            let before = s.kv_cache().expect("the engine's cache");
            let got = s.prefill(c).expect("call");
            let written = s.kv_cache().expect("the engine's cache");
            let call = (c, RunMode::Prefill);
            check_call(&it, 1024, past, &written, Some(&before), call, &got, &mut a);
        }
        let what = format!("{}: steps, a 513-token prefill, steps", e.describe());
        eprintln!("{what}: {}", a.summary());
        assert!(a.max_abs <= 1e-3, "{what}: max |diff| {}", a.max_abs);
        assert!(a.kv_excess <= 1e-3, "{what}: K/V {}", a.summary());
        // the cache (with its tail) loaded into a fresh session, and into one whose graph was
        // recorded on another sequence, decodes as the session it came from
        let cache = s.kv_cache().expect("export");
        let next = s.prefill(&ids[520..521]).expect("step");
        let mut fresh = e.session(1024);
        fresh.load_kv(&cache).expect("load");
        assert_eq!(fresh.prefill(&ids[520..521]).expect("step"), next);
        let mut used = e.session(1024);
        used.prefill(&ids[600..601]).expect("step");
        used.prefill(&ids[601..602]).expect("step");
        used.load_kv(&cache).expect("load");
        assert_eq!(used.prefill(&ids[520..521]).expect("step"), next);
    }
    // the tail's bytes: (window - 1) rows of K and V in f32 per layer, beside the codes
    let mut s = eng.session(1024);
    s.forward(&ids[..3]).expect("prefill");
    let kvw = cfg.num_kv_heads * cfg.head_dim;
    let row = cfg.num_layers * 2 * kvw * 4;
    assert_eq!(s.kv_bytes(), 3 * eng.kv_bytes_per_token() + 3 * row);
    s.forward(&ids[3..40]).expect("more");
    let tail = (window - 1) * row;
    assert_eq!(s.kv_bytes(), 40 * eng.kv_bytes_per_token() + tail);
    assert_eq!(eng.kv_tail_bytes(1024), tail);
    assert_eq!(it.kv_tail_bytes(1024), tail);
    assert_eq!(cuda.kv_tail_bytes(1024), tail);
    let memory = eng.cpu().expect("a CPU engine").memory_plan();
    assert_eq!(memory.kv_tail_bytes, tail);
    assert_eq!(
        s.kv_capacity_bytes(),
        1024 * eng.kv_bytes_per_token() + tail
    );
    // without a window there is no tail
    let q1 = plan(&m, 4, 1);
    let e1 = q1
        .engine_kind(1, EngineKind::Cpu { act: Act::F32 })
        .expect("CPU engine");
    assert_eq!(e1.kv_tail_bytes(1024), 0);
    assert_eq!(e1.cpu().expect("cpu").memory_plan().kv_tail_bytes, 0);
}
