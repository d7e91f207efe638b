//! Lowering and the compiled CPU engine on tiny synthetic models: the lowered graph of a
//! W4KV4 plan (snapshot), the memory plan's byte counts, the engine against the interpreter
//! for several configurations (kv 16/4/3 bits, smoothing, past-only or not, both protocols),
//! context overflow and bad ids, and the fallback to the interpreter for a plan the kernels do
//! not cover.

use wkvc_ir::{Act, RunMode};
use wkvc_runtime::compile::{self, CompileOptions};
use wkvc_runtime::{Engine, EngineKind, Model};
use wkvc_tests::*;

/// A tiny LLaMA with head dim 32 (the kernels' attention works on blocks of 32 channels).
fn tiny32(tag: &str, head_dim: usize) -> Model {
    let mut cfg = tiny_config("llama");
    cfg.head_dim = head_dim;
    cfg.num_heads = 4;
    cfg.num_kv_heads = 2;
    cfg.hidden_size = 4 * head_dim;
    cfg.intermediate_size = 160;
    let w = tiny_weights(&cfg, 5);
    let dir = temp_dir(tag);
    write_gguf(&dir.join("tiny.gguf"), &cfg, &w, false);
    Model::open(&dir.join("tiny.gguf")).expect("open tiny")
}

fn compile(
    m: &Model,
    kvbits: u32,
    smooth: bool,
    past_only: bool,
) -> wkvc_runtime::compile::Compiled {
    compile_grouped(m, kvbits, smooth, past_only, 0)
}

fn compile_grouped(
    m: &Model,
    kvbits: u32,
    smooth: bool,
    past_only: bool,
    kv_group: usize,
) -> wkvc_runtime::compile::Compiled {
    let o = CompileOptions {
        wgroup: 32,
        kvbits,
        smooth,
        past_only,
        kv_group,
        calib_tokens: Some(64),
        calib_window: 32,
        threads: 1,
        ..Default::default()
    };
    let data = compile::calibration_data(m, &o, &mut |_| {}).expect("calibration data");
    compile::quantize(m, &o, Some(&data), &mut |_| {}).expect("compile")
}

/// The engines' configurations against the interpreter: (KV bits, smoothing, past-only).
const CONFIGS: [(u32, bool, bool); 4] = [
    (16, false, false),
    (4, true, true),
    (4, false, false),
    (3, true, true),
];

const IDS: [u32; 12] = [5, 17, 290, 3, 3, 100, 42, 7, 255, 1, 0, 64];

/// A compiled plan's interpreter and CPU engine (exact path), and IDS as a 7-token chunk then
/// one token at a time.
fn interp_and_cpu(m: &Model, c: &compile::Compiled) -> (Engine, Engine, Vec<&'static [u32]>) {
    let q = m.with_module(c.module.clone(), None);
    let it = q.engine_kind(1, EngineKind::Interp).expect("interp");
    let cpu = q
        .engine_kind(2, EngineKind::Cpu { act: Act::F32 })
        .expect("cpu engine");
    let mut steps: Vec<&'static [u32]> = vec![&IDS[..7]];
    steps.extend(IDS[7..].iter().map(std::slice::from_ref));
    (it, cpu, steps)
}

#[test]
fn lowered_graph_and_memory_plan() {
    let m = tiny32("lower-snap", 32);
    let c = compile(&m, 4, true, true);
    let q = m.with_module(c.module.clone(), None);
    let lp = q.lowered(Act::F32).expect("lowers");
    let g = &lp.graph;
    let text = wkvc_ir::text::print(g);
    // the text form parses back to the same graph
    assert_eq!(
        wkvc_ir::text::print(&wkvc_ir::text::parse(&text).expect("parses")),
        text
    );
    let layer0: String = text
        .lines()
        .filter(|l| l.contains("kernel(") && !l.contains("layers.1."))
        .take(10)
        .collect::<Vec<_>>()
        .join("\n");
    insta::assert_snapshot!("lowered_layer0", layer0);
    // 2 layers x (norm, qkv, rope_kv, attention, o+residual, norm, gate|up, silu_mul,
    // down+residual) + embed, final norm, logits
    assert_eq!(g.nodes.len(), 2 * 9 + 3);
    let pb = |p: &str| c.module.weights.get(p).map(|w| w.size()).unwrap_or((0, 0));
    let mp = wkvc_passes::lower::memplan(g, 8, 100, &pb).expect("plans");
    // per layer and token: K and V, 2 kv heads x 32 channels as 4-bit codes, f16 scale and
    // zero per kv head
    assert_eq!(mp.kv_bytes_per_token, 2 * 2 * (64 / 2 + 2 * 4));
    assert_eq!(mp.kv_bytes, 100 * mp.kv_bytes_per_token);
    // buffers reuse: fewer bytes than one buffer per kernel
    let all: usize = mp.buffers.values().map(|b| b.1).sum();
    assert!(mp.arena_bytes < all, "arena {} vs {}", mp.arena_bytes, all);
    // live buffers never overlap: a value's range is not reused before its last use
    assert!(mp.arena_bytes >= 8 * (128 + 2 * 64) * 4);
    // the engine's own copies (tiled codes, f32 scale/zero, int8 head) are what the plan
    // says, and the plan's pages of the quantized GEMMs are not counted again
    for act in [Act::F32, Act::Int8] {
        let e = q.engine_kind(1, EngineKind::Cpu { act }).expect("engine");
        let eng = e.cpu().expect("a CPU engine");
        assert_eq!(
            eng.derived_bytes,
            eng.memory_plan().derived_bytes,
            "{act:?}"
        );
    }
    let codes: usize = c
        .module
        .weights
        .iter()
        .filter(|(n, _)| n.ends_with(".qweight"))
        .map(|(_, w)| w.storage_bytes())
        .sum();
    assert!(codes > 0);
    let all: usize = c
        .module
        .weights
        .iter()
        .map(|(_, w)| w.storage_bytes())
        .sum();
    assert!(
        mp.weights_bytes <= all - codes,
        "{} vs {}",
        mp.weights_bytes,
        all - codes
    );
}

/// Each configuration on the CPU engine against the interpreter replaying the engine's own
/// cache (`wkvc_tests::agree`): a 7-token chunk then a 5-token chunk, and token by token,
/// under both protocols. f32 summation order only: logits within 1e-3, and the written K/V
/// within half of each one's step plus 1e-3 of the group's range.
#[test]
fn engine_matches_interpreter_on_tiny_models() {
    let m = tiny32("lower-eng", 32);
    for &(kvbits, smooth, past_only) in &CONFIGS {
        let c = compile(&m, kvbits, smooth, past_only);
        let (it, cpu, steps) = interp_and_cpu(&m, &c);
        let label = format!("cpu kv{kvbits} smooth {smooth} po {past_only}");
        for mode in [RunMode::Prefill, RunMode::DecodeEquivalent] {
            // the replay is faithful: the interpreter replaying its own cache computes what
            // it computed, bit for bit
            let a = agree::agreement(&it, &it, &steps, mode, 64);
            assert_eq!(
                (a.max_abs, a.kv_code_diffs, a.kv_excess),
                (0.0, 0, 0.0),
                "{label} {mode:?}: the interpreter against its own replay: {}",
                a.summary()
            );
            for chunks in [&[&IDS[..7], &IDS[7..]][..], &steps[..]] {
                let a = agree::agreement(&it, &cpu, chunks, mode, 64);
                assert_exact(&a, &format!("{label} {mode:?} {} chunks", chunks.len()));
            }
        }
    }
}

/// A cache in groups of 32 channels (two (scale, zero) pairs a head of 64) on the CPU engine
/// and the CUDA kernels (host emulator) against the interpreter, as
/// `engine_matches_interpreter_on_tiny_models`; the written cache has a pair a group.
#[test]
fn grouped_cache_matches_interpreter_on_the_cpu_and_cuda_engines() {
    let m = tiny32("lower-eng-g32", 64);
    for (kvbits, smooth) in [(4, true), (3, true), (4, false)] {
        let c = compile_grouped(&m, kvbits, smooth, true, 32);
        assert_eq!(c.quant.kv_group, 32);
        let (it, cpu, steps) = interp_and_cpu(&m, &c);
        let label = format!("cpu kv{kvbits} g32 smooth {smooth}");
        for mode in [RunMode::Prefill, RunMode::DecodeEquivalent] {
            for chunks in [&[&IDS[..7], &IDS[7..]][..], &steps[..]] {
                let a = agree::agreement(&it, &cpu, chunks, mode, 64);
                assert_exact(&a, &format!("{label} {mode:?} {} chunks", chunks.len()));
            }
        }
        // the written cache has 4 pairs a token and layer (2 kv heads x 2 groups)
        let mut s = cpu.session(16);
        s.forward_mode(&IDS[..5], RunMode::Prefill).expect("run");
        let kv = s.kv_cache().expect("the cache");
        for l in kv.layers().values() {
            assert_eq!((l.groups, l.group_len(), l.kp.len()), (4, 32, 5 * 4));
        }
        // the CUDA kernels on the host emulator (one configuration: the emulator is slow)
        if (kvbits, smooth) == (4, true) {
            let q = m.with_module(c.module.clone(), None);
            let cuda = q
                .engine_kind(1, EngineKind::CudaEmulated { mma: false })
                .expect("the CUDA engine on the host emulator");
            matches_the_interpreter(&q, &cuda, &format!("cuda-emulated kv{kvbits} g32"));
        }
    }
}

/// The exact paths' bounds (f32 summation order only): every logit within 1e-3 and the K/V
/// the engine wrote within half of each one's step, plus 1e-3 of the group's range.
fn assert_exact(a: &agree::Agreement, label: &str) {
    eprintln!("{label}: {}", a.summary());
    assert!(a.max_abs < 1e-3, "{label}: {}", a.summary());
    assert!(a.kv_excess < 1e-3, "{label}: {}", a.summary());
}

#[test]
fn engine_errors_and_fallback() {
    let m = tiny32("lower-err", 32);
    let c = compile(&m, 4, true, true);
    let q = m.with_module(c.module.clone(), None);
    let eng = q
        .engine_kind(1, EngineKind::Cpu { act: Act::Int8 })
        .expect("engine");
    let mut s = eng.session(8);
    let vocab = q.config.vocab_size as u32;
    let err = s.step(&[1, vocab]).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");
    assert_eq!(s.len(), 0, "a refused call leaves the session unchanged");
    s.step(&IDS[..6]).expect("fits");
    let err = s.step(&IDS[..3]).unwrap_err().to_string();
    assert!(err.contains("context overflow"), "{err}");
    assert_eq!(s.len(), 6);
    // head dim 8: the attention kernel needs blocks of 32 channels -> a clear error, and
    // engine_auto falls back to the interpreter for such a plan
    let m8 = tiny32("lower-hd8", 8);
    let c8 = compile(&m8, 4, true, true);
    let err = m8
        .with_module(c8.module.clone(), None)
        .engine_kind(1, EngineKind::Cpu { act: Act::F32 })
        .err()
        .expect("unsupported")
        .to_string();
    assert!(err.contains("multiple of 32"), "{err}");
    let mf = compile::manifest(&m8, &c8, serde_json::Value::Null, String::new());
    let q8 = m8.with_module(c8.module.clone(), Some(mf));
    let e = q8.engine_auto(1).expect("falls back");
    assert_eq!(e.describe(), "interp");
    let mut s = e.session(16);
    assert_eq!(
        s.forward(&IDS[..4]).expect("runs").len(),
        4 * q8.config.vocab_size
    );
    // and a plan the kernels cover gets the compiled engine with the plan's activation mode
    // (int8 by default, f32 where the plan asks for it)
    let mf = compile::manifest(&m, &c, serde_json::Value::Null, String::new());
    let qp = m.with_module(c.module.clone(), Some(mf));
    let isa = wkvc_runtime::CpuIsa::detect().name();
    assert_eq!(
        qp.engine_auto(1).expect("engine").describe(),
        format!("cpu (int8 activations, {isa})")
    );
    let mut exact = compile(&m, 4, true, true);
    exact.cpu_act = Act::F32;
    let mf = compile::manifest(&m, &exact, serde_json::Value::Null, String::new());
    let qp = m.with_module(c.module.clone(), Some(mf));
    assert_eq!(
        qp.engine_auto(1).expect("engine").describe(),
        format!("cpu (f32 activations, {isa})")
    );
}

/// `compile --target cpu,cuda`: every kernel of the lowered graph has its CUDA C (one module
/// per distinct source, keyed by its sha256) and PTX in the plan, and the plan reopens with
/// them. Needs NVRTC (required where WKVC_REQUIRE_NVRTC is set, as in scripts/test.sh).
#[test]
fn cuda_code_is_stored_in_the_plan() {
    if !nvrtc_present() {
        return;
    }
    let m = tiny32("lower-cuda", 32);
    let c = compile(&m, 4, true, true);
    let q = m.with_module(c.module.clone(), None);
    let cp = compile::cuda_plan(&q, 80).expect("cuda plan");
    assert_eq!(cp.ptx_arch, 80);
    let lp = q.lowered(Act::F32).expect("lowers");
    let mut sources = std::collections::BTreeSet::new();
    for st in &lp.steps {
        let spec = &st.spec;
        let src = wkvc_codegen::cuda::emit(spec).expect("emits").source;
        let sha = wkvc_runtime::plan::sha256_hex(&src);
        let k = cp
            .kernels
            .iter()
            .find(|k| k.sha256 == sha)
            .unwrap_or_else(|| panic!("{}: not in the plan", spec.code_name()));
        assert_eq!(k.source, src);
        for e in &k.entries {
            assert!(k.ptx.contains(&format!(".entry {e}(")), "{e}");
        }
        sources.insert(sha);
    }
    // the layers share their kernels
    assert_eq!(cp.kernels.len(), sources.len());
    assert!(cp.kernels.len() < lp.steps.len());
    // written and read back with the plan
    let dir = temp_dir("lower-cuda-plan");
    let path = dir.join("p.wkv");
    let mut man = compile::manifest(&m, &c, serde_json::Value::Null, String::new());
    man.cuda = Some(cp.clone());
    wkvc_runtime::plan::write(&path, &c.module, man).expect("writes");
    let (_, back) = wkvc_runtime::plan::open(&path).expect("opens");
    assert_eq!(back.cuda, Some(cp));
}

/// `Engine::Cuda`: without a driver (this machine, CI) a clean error naming libcuda before any
/// call that could panic, and an error for a device that does not exist. With a GPU
/// (`scripts/gpu-check.sh`) the CUDA engine's logits equal the interpreter's on tiny models
/// of every configuration (16/4/3-bit caches, smoothing, past-only or not, both protocols,
/// prefill chunks and single-token graph steps).
#[test]
fn cuda_engine_is_a_clean_error_without_a_gpu_and_matches_the_interpreter_with_one() {
    let m = tiny32("lower-cuda-eng", 32);
    let present = wkvc_runtime::cuda::driver_present();
    assert!(
        present || std::env::var_os("WKVC_REQUIRE_GPU").is_none(),
        "WKVC_REQUIRE_GPU is set but no NVIDIA driver (libcuda.so.1) was found"
    );
    for &(kvbits, smooth, past_only) in &CONFIGS {
        let c = compile(&m, kvbits, smooth, past_only);
        let q = m.with_module(c.module.clone(), None);
        let bad = q
            .engine_kind(
                1,
                EngineKind::Cuda {
                    device: 999,
                    mma: false,
                },
            )
            .err()
            .expect("no device 999");
        let bad = bad.to_string();
        assert!(
            bad.contains(if present {
                "no CUDA device 999"
            } else {
                "libcuda.so.1"
            }),
            "{bad}"
        );
        let cuda = match q.engine_kind(
            1,
            EngineKind::Cuda {
                device: 0,
                mma: false,
            },
        ) {
            Err(e) => {
                let e = e.to_string();
                assert!(!present, "a driver is present but the engine failed: {e}");
                assert!(
                    e.contains("libcuda.so.1") && e.contains("--engine cpu"),
                    "{e}"
                );
                skip(
                    Group::Gpu,
                    "no NVIDIA driver (libcuda.so.1): the CUDA engine on tiny models is checked \
                     on the host emulator only",
                );
                return;
            }
            Ok(e) => e,
        };
        let label = format!("cuda kv{kvbits} smooth {smooth} po {past_only}");
        matches_the_interpreter(&q, &cuda, &label);
    }
}

/// The CUDA engine against the interpreter replaying its cache (`wkvc_tests::agree`): a
/// 7-token prefill in one chunk, then token by token (the first step is captured as a graph,
/// the others replay it), and all 12 at once (more rows than the GEMV kernel takes: the tiled
/// GEMM), under both protocols. f32 summation order only, as the CPU engine's bounds.
fn matches_the_interpreter(q: &Model, cuda: &Engine, label: &str) {
    let it = q.engine_kind(1, EngineKind::Interp).expect("interp");
    let mut steps: Vec<&[u32]> = vec![&IDS[..7]];
    steps.extend(IDS[7..].iter().map(std::slice::from_ref));
    for mode in [RunMode::Prefill, RunMode::DecodeEquivalent] {
        for chunks in [&steps[..], &[&IDS[..]][..]] {
            let a = agree::agreement(&it, cuda, chunks, mode, 64);
            assert_exact(&a, &format!("{label} {mode:?} {} chunks", chunks.len()));
        }
    }
}

/// The same engine, kernels and launches on the CUDA host emulator (the CUDA C compiled by
/// the host's C++ compiler, one fiber per CUDA thread): every configuration against the
/// interpreter without a GPU. The tiled prefill GEMM runs on chunks of more than 8 rows.
#[test]
fn cuda_engine_on_the_host_emulator_matches_the_interpreter() {
    let m = tiny32("lower-cuda-emu", 32);
    for &(kvbits, smooth, past_only) in &CONFIGS {
        let c = compile(&m, kvbits, smooth, past_only);
        let q = m.with_module(c.module.clone(), None);
        let cuda = q
            .engine_kind(1, EngineKind::CudaEmulated { mma: false })
            .expect("the CUDA engine on the host emulator");
        let ce = cuda.cuda().expect("a CUDA engine");
        assert!(ce.is_emulated());
        // a decode step: embed, then per layer qkv (its norm fused), rope_kv, attention split
        // and merge, o, gate/up (its norm fused), down (SiLU-mul fused), then the logits (the
        // final norm fused); a prefill of 12 rows also runs the 2 norms and the SiLU-mul of
        // every layer (the tiled GEMMs have no prologue) but not the final norm (logits of
        // one row)
        let layers = q.config.num_layers;
        assert_eq!(ce.launches(1), 2 + 7 * layers);
        assert_eq!(ce.launches(12), 2 + 10 * layers);
        let label = format!("emulated kv{kvbits} smooth {smooth} po {past_only}");
        matches_the_interpreter(&q, &cuda, &label);
        if kvbits == 16 {
            // the tensor-core prefill: 12 rows through the mma GEMM (f16 operands)
            let mm = q
                .engine_kind(1, EngineKind::CudaEmulated { mma: true })
                .expect("the CUDA engine (mma) on the host emulator");
            let it = q.engine_kind(1, EngineKind::Interp).expect("interp");
            let ra = it.session(64).forward(&IDS).expect("interp");
            let rb = mm.session(64).forward(&IDS).expect("mma");
            let d = ra
                .iter()
                .zip(&rb)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            // f16 operands round at 2^-11 each: 2^-10 of the logits' scale (a wrong fragment
            // or tile is of the order of the logits themselves)
            let scale = ra.iter().fold(0f32, |a, x| a.max(x.abs()));
            assert!(
                d < scale / 1024.0,
                "mma prefill: max |diff| {d}, max |logit| {scale}"
            );
        }
    }
}
