//! The runtime core's contract for embedding: owned handles with the thread-safety bounds a
//! service needs (checked at compile time), one engine used by several threads at once giving
//! exactly what it gives serially, and batched steps (many sessions, prefill chunks and
//! decode tokens mixed in one call) giving exactly what the same calls give one by one.
//!
//! Exactly on the CPU engine and the interpreter: every kernel computes a row the same way
//! whatever rows share the call (the GEMMs keep one accumulation order per row; attention and
//! the cache writes are per row), so a batch changes no bit of any row's logits. The CUDA
//! engine runs a few rows as a GEMV and more as a tiled GEMM (another summation order): each
//! of its batched calls is checked against the interpreter replaying its cache
//! (`wkvc_tests::agree`), with the exact paths' bounds.

use wkvc_ir::{Act, RunMode};
use wkvc_runtime::compile::{self, CompileOptions};
use wkvc_runtime::{BatchItem, Engine, EngineKind, Model, Session};
use wkvc_tests::*;

/// Bit for bit, per sequence and call (the first difference named).
fn same(got: &[Vec<Vec<f32>>], want: &[Vec<Vec<f32>>], label: &str) {
    assert_eq!(got.len(), want.len(), "{label}: sequences");
    for (s, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{label}: calls of sequence {s}");
        for (c, (a, b)) in g.iter().zip(w).enumerate() {
            if a != b {
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                panic!("{label}: sequence {s}, call {c}: max |diff| {d:e}");
            }
        }
    }
}

fn assert_send_sync<T: Send + Sync>() {}
fn assert_send<T: Send>() {}

#[test]
fn handles_have_the_bounds_a_service_needs() {
    assert_send_sync::<Model>();
    assert_send_sync::<Engine>();
    assert_send::<Session>();
}

/// A tiny LLaMA with head dim 32, compiled W4 with a `kvbits` cache.
fn plan(tag: &str, kvbits: u32) -> Model {
    plan_window(tag, kvbits, 1)
}

/// `plan` with a recent window of `window` positions read in full precision.
fn plan_window(tag: &str, kvbits: u32, window: usize) -> Model {
    let mut cfg = tiny_config("llama");
    cfg.head_dim = 32;
    cfg.hidden_size = 128;
    cfg.intermediate_size = 160;
    let w = tiny_weights(&cfg, 9);
    let dir = temp_dir(tag);
    write_gguf(&dir.join("tiny.gguf"), &cfg, &w, false);
    let m = Model::open(&dir.join("tiny.gguf")).expect("open tiny");
    let o = CompileOptions {
        wgroup: 32,
        kvbits,
        calib_tokens: Some(64),
        calib_window: 32,
        kv_window: window,
        threads: 1,
        ..Default::default()
    };
    let data = compile::calibration_data(&m, &o, &mut |_| {}).expect("calibration data");
    let c = compile::quantize(&m, &o, Some(&data), &mut |_| {}).expect("compile");
    m.with_module(c.module, None)
}

fn prompt(s: usize, n: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((s * 97 + i * 31 + 5) % 300) as u32)
        .collect()
}

fn argmax(l: &[f32]) -> u32 {
    wkvc_runtime::sample::argmax(l) as u32
}

/// One sequence's calls: a prompt, then greedy decode steps; every call's last logits.
fn serial(engine: &Engine, s: usize, plen: usize, steps: usize) -> Vec<Vec<f32>> {
    let mut sess = engine.session(64);
    let mut out = vec![sess.step(&prompt(s, plen)).expect("prefill").to_vec()];
    for _ in 0..steps {
        let t = argmax(out.last().expect("logits"));
        out.push(sess.step(&[t]).expect("decode").to_vec());
    }
    out
}

#[test]
fn threads_sharing_one_engine_get_what_one_thread_gets() {
    for (kind, label) in [
        (EngineKind::Cpu { act: Act::F32 }, "cpu f32"),
        (EngineKind::Cpu { act: Act::Int8 }, "cpu int8"),
        (EngineKind::Interp, "interp"),
    ] {
        let m = plan(&format!("core-threads-{}", label.replace(' ', "-")), 4);
        let engine = m.engine_kind(2, kind).expect("engine");
        let want: Vec<_> = (0..4).map(|s| serial(&engine, s, 5 + s, 6)).collect();
        let got: Vec<_> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|s| {
                    let e = engine.clone();
                    sc.spawn(move || serial(&e, s, 5 + s, 6))
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        same(
            &got,
            &want,
            &format!("{label}: concurrent sessions against serial ones"),
        );
        eprintln!("{label}: 4 threads x 7 calls on one engine equal the serial run bit for bit");
    }
}

/// How a batch is held to the serial run.
#[derive(Clone, Copy)]
enum Check<'a> {
    /// bit for bit (every kernel computes a row the same way whatever rows share the call)
    Exact,
    /// each call against the interpreter replaying the engine's cache (the CUDA engine runs
    /// a few rows as a GEMV and more as a tiled GEMM: another summation order)
    Replay(&'a Engine),
}

/// Three sessions: prompts of 5 and 3 tokens together; then the first two decode while the
/// third's 7-token prompt runs in the same call; then all three decode together.
fn batch_equals_serial(engine: &Engine, label: &str, check: Check) {
    let lens = [5usize, 3, 7];
    let prompts: Vec<Vec<u32>> = (0..3).map(|s| prompt(s, lens[s])).collect();
    let mut ss: Vec<Session> = (0..3).map(|_| engine.session(64)).collect();
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
    let mut agree = agree::Agreement::default();
    for round in 0..6 {
        // (session, tokens) of this call
        let toks: Vec<Vec<u32>> = (0..3)
            .map(|s| match (round, s) {
                (0, 2) => Vec::new(),
                (0, _) => prompts[s].clone(),
                (1, 2) => prompts[2].clone(),
                _ => vec![got[s].last().map_or(0, |l| argmax(l))],
            })
            .collect();
        let past: Vec<usize> = ss.iter().map(Session::len).collect();
        // the caches before the call (a recent window's tail is replayed from them)
        let before: Vec<_> = match check {
            Check::Replay(_) => ss
                .iter()
                .map(|s| Some(s.kv_cache().expect("the engine's cache")))
                .collect(),
            Check::Exact => vec![None; ss.len()],
        };
        let mut batch: Vec<BatchItem> = ss
            .iter_mut()
            .zip(&toks)
            .filter(|(_, t)| !t.is_empty())
            .map(|(sess, t)| BatchItem::new(sess, t))
            .collect();
        engine.step(&mut batch).expect("batched step");
        drop(batch);
        for (s, sess) in ss.iter().enumerate() {
            if toks[s].is_empty() {
                continue;
            }
            got[s].push(sess.logits().to_vec());
            if let Check::Replay(it) = check {
                let written = sess.kv_cache().expect("the engine's cache");
                agree::check_call(
                    it,
                    64,
                    past[s],
                    &written,
                    before[s].as_ref(),
                    (&toks[s], RunMode::Prefill),
                    sess.logits(),
                    &mut agree,
                );
            }
        }
    }
    match check {
        Check::Exact => {
            // the same calls one session at a time
            let want: Vec<_> = (0..3)
                .map(|s| serial(engine, s, lens[s], if s == 2 { 4 } else { 5 }))
                .collect();
            same(
                &got,
                &want,
                &format!("{label}: the batched calls against the serial ones"),
            );
        }
        Check::Replay(_) => {
            eprintln!("{label}: {}", agree.summary());
            assert!(agree.max_abs < 1e-3, "{label}: {}", agree.summary());
            assert!(agree.kv_excess < 1e-3, "{label}: {}", agree.summary());
        }
    }
    // all rows' logits of one item and the last row of another in one call
    let mut a = engine.session(64);
    let mut b = engine.session(64);
    let mut all = Vec::new();
    engine
        .step(&mut [
            BatchItem {
                session: &mut a,
                tokens: &prompts[2],
                mode: RunMode::DecodeEquivalent,
                all_logits: Some(&mut all),
            },
            BatchItem::new(&mut b, &prompts[0]),
        ])
        .expect("mixed batch");
    if let Check::Exact = check {
        let alone = engine
            .session(64)
            .forward_mode(&prompts[2], RunMode::DecodeEquivalent)
            .expect("alone");
        same(
            &[vec![all]],
            &[vec![alone]],
            &format!("{label}: all rows in a batch"),
        );
        let first = engine.session(64).prefill(&prompts[0]).expect("alone");
        same(
            &[vec![b.logits().to_vec()]],
            &[vec![first]],
            &format!("{label}: last row"),
        );
    } else {
        assert_eq!(
            all.len(),
            lens[2] * engine.vocab_size(),
            "{label}: all rows"
        );
    }
    eprintln!("{label}: batched steps checked");
}

#[test]
fn batched_steps_equal_one_session_at_a_time() {
    for kvbits in [16, 4] {
        let m = plan(&format!("core-batch-kv{kvbits}"), kvbits);
        for act in [Act::F32, Act::Int8] {
            let e = m.engine_kind(2, EngineKind::Cpu { act }).expect("engine");
            batch_equals_serial(&e, &format!("cpu {act:?} kv{kvbits}"), Check::Exact);
        }
        let it = m.engine_kind(1, EngineKind::Interp).expect("interp");
        batch_equals_serial(&it, &format!("interp kv{kvbits}"), Check::Exact);
        let e = m
            .engine_kind(1, EngineKind::CudaEmulated { mma: false })
            .expect("the CUDA engine on the host emulator");
        batch_equals_serial(
            &e,
            &format!("cuda (emulated) kv{kvbits}"),
            Check::Replay(&it),
        );
    }
    // a recent window of 4: each session's tail advances in its own segment of the batched
    // calls, crossing the window's length as the sessions decode
    let m = plan_window("core-batch-window", 4, 4);
    for act in [Act::F32, Act::Int8] {
        let e = m.engine_kind(2, EngineKind::Cpu { act }).expect("engine");
        batch_equals_serial(&e, &format!("cpu {act:?} kv4 window 4"), Check::Exact);
    }
    let it = m.engine_kind(1, EngineKind::Interp).expect("interp");
    batch_equals_serial(&it, "interp kv4 window 4", Check::Exact);
    let e = m
        .engine_kind(1, EngineKind::CudaEmulated { mma: false })
        .expect("the CUDA engine on the host emulator");
    batch_equals_serial(&e, "cuda (emulated) kv4 window 4", Check::Replay(&it));
}

#[test]
fn a_bad_item_fails_the_whole_batch_and_changes_no_session() {
    let m = plan("core-bad", 4);
    let e = m
        .engine_kind(1, EngineKind::Cpu { act: Act::F32 })
        .expect("engine");
    let other = m
        .engine_kind(1, EngineKind::Cpu { act: Act::F32 })
        .expect("engine");
    let mut a = e.session(16);
    let mut b = e.session(4);
    let mut c = other.session(16);
    let p = prompt(0, 3);
    let long = prompt(1, 5);
    let bad = [7u32, 300];
    for (what, want) in [
        ("overflow", "context overflow"),
        ("vocab", "out of range"),
        ("foreign", "another engine"),
        ("empty", "no tokens"),
    ] {
        let mut batch = vec![BatchItem::new(&mut a, &p)];
        match what {
            "overflow" => batch.push(BatchItem::new(&mut b, &long)),
            "vocab" => batch.push(BatchItem::new(&mut b, &bad)),
            "foreign" => batch.push(BatchItem::new(&mut c, &p)),
            _ => batch.push(BatchItem::new(&mut b, &[])),
        }
        let err = e.step(&mut batch).expect_err(what).to_string();
        assert!(err.contains(want), "{what}: {err}");
        drop(batch);
        assert_eq!((a.len(), b.len(), c.len()), (0, 0, 0), "{what}");
    }
}
