//! The kernel checks that the table of `kernel_table.rs` does not cover: `rope_kv` and
//! `attention` (they change the KV cache) against `rope` and `attention` with a cache, on
//! the Cranelift back end, the native attention of each CPU ISA variant the host runs
//! (`wkvc_codegen::native`) and the CUDA host emulator; the int8 head against the same int8
//! arithmetic in f64; and the CUDA GEMMs' fused prologues (`_gemv_rms`, `_gemv_silu`) and
//! GEMM parts launched one by one, against f64. Tolerances come from f32 accumulation:
//! |err| <= c * n * 2^-24 * sum|terms| (plus f16 operand rounding for the tensor-core GEMM).

use std::collections::BTreeMap;
use wkvc_codegen::cpu::{CpuJit, KernelFn};
use wkvc_codegen::cuda;
use wkvc_codegen::cuda_host::{self, HostModule};
use wkvc_codegen::kernels::prep_int8;
use wkvc_codegen::native::{self, CpuIsa, CpuKernel};
use wkvc_ir::graph::{Attr, Builder, OpKind, Operand, attrs, seq_f32};
use wkvc_ir::kernel::args::{
    AttentionArgs, GemmArgs, KernelArgs, LogitsArgs, QGemmArgs, RopeKvArgs, f32_word,
};
use wkvc_ir::{
    Act, DType, Dim, Interpreter, KernelSpec, KvCache, Module, RunMode, Tensor, TensorType, Weight,
    WeightStore,
};

struct Rng(u64);

impl Rng {
    fn f(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
}

fn ty(shape: &[usize]) -> TensorType {
    TensorType::new(DType::F32, shape.iter().map(|&d| Dim::Const(d)).collect())
}

fn call_k<A: KernelArgs>(f: CpuKernel, args: &A) {
    // SAFETY: as for `call`
    unsafe { f.call(args as *const A as *const u64) }
}

fn call<A: KernelArgs>(f: KernelFn, args: &A) {
    // SAFETY: each test passes the argument struct of the kernel's kind with buffers of the
    // sizes the kernel reads and writes.
    unsafe { f(args as *const A as *const u64) }
}

/// Host memory for the CUDA host emulator: zeroed, 16-byte aligned (the kernels' 128-bit
/// loads need it, as device allocations are). Kernels write through the pointer taken at
/// allocation.
struct HBuf {
    _mem: Vec<u128>,
    ptr: *mut u8,
    len: usize,
}

impl HBuf {
    fn new(bytes: usize) -> HBuf {
        let mut mem = vec![0u128; bytes.div_ceil(16).max(1)];
        let ptr = mem.as_mut_ptr() as *mut u8;
        HBuf {
            _mem: mem,
            ptr,
            len: bytes,
        }
    }
    fn from_f32(v: &[f32]) -> HBuf {
        let b = HBuf::new(4 * v.len());
        // SAFETY: b holds 4 * v.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), b.ptr as *mut f32, v.len()) };
        b
    }
    fn from_bytes(v: &[u8]) -> HBuf {
        let b = HBuf::new(v.len());
        // SAFETY: b holds v.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), b.ptr, v.len()) };
        b
    }
    fn nan_f32(n: usize) -> HBuf {
        HBuf::from_f32(&vec![f32::NAN; n])
    }
    fn p(&self) -> u64 {
        self.ptr as u64
    }
    fn f32(&self, n: usize) -> Vec<f32> {
        assert!(4 * n <= self.len);
        // SAFETY: n f32 within the buffer (checked); any bit pattern is an f32.
        unsafe { std::slice::from_raw_parts(self.ptr as *const f32, n) }.to_vec()
    }
}

/// The CUDA C of a spec built for the host emulator.
fn emulated(spec: &KernelSpec) -> (cuda::CudaKernel, HostModule) {
    let k = cuda::emit(spec).expect("CUDA C emits");
    let m = cuda_host::build(&k).expect("the host emulator builds the CUDA C");
    (k, m)
}

fn launch<A: KernelArgs>(
    m: &HostModule,
    entry: usize,
    grid: (u32, u32, u32),
    block: u32,
    args: &A,
) {
    // SAFETY: each test passes the kernel's argument struct with host buffers of the sizes it
    // reads and writes.
    unsafe { m.launch(entry, grid, (block, 1, 1), args.words()) }.expect("emulated launch");
}

fn check(name: &str, got: &[f32], want: &[f32], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let worst = got
        .iter()
        .zip(want)
        .zip(bound)
        .map(|((g, w), b)| {
            let d = (*g as f64 - *w as f64).abs();
            match (*b > 0.0, d == 0.0) {
                (true, _) => d / b,
                (false, true) => 0.0,
                (false, false) => f64::INFINITY,
            }
        })
        .fold(
            0f64,
            |a, q| if q.is_nan() { f64::INFINITY } else { a.max(q) },
        );
    eprintln!("{name}: worst |diff| / bound {worst:.3}");
    for (i, ((g, w), b)) in got.iter().zip(want).zip(bound).enumerate() {
        let d = (*g as f64 - *w as f64).abs();
        assert!(
            d <= *b,
            "{name}[{i}]: got {g}, want {w}, |diff| {d:e} > {b:e}"
        );
    }
}

/// The int8 head: against the same int8 arithmetic in f64 (table and activations quantized
/// per block of 32), and within the quantization bound of the f32 logits.
#[test]
fn logits_int8_is_the_int8_dot() {
    let mut jit = CpuJit::host().expect("host JIT");
    let mut rng = Rng(3);
    let (m, vocab, dim) = (2usize, 37usize, 96usize);
    let table = rng.vec(vocab * dim, 0.3);
    let x = rng.vec(m * dim, 2.0);
    let nb = dim / 32;
    // quantize like the engine: per block max|w|/127, permuted evens then odds
    let mut wq = vec![0i8; vocab * dim];
    let mut wsc = vec![0f32; vocab * nb];
    for r in 0..vocab {
        let mut gs = [0f32];
        prep_int8(
            &table[r * dim..][..dim],
            dim,
            dim,
            &mut wq[r * dim..][..dim],
            &mut wsc[r * nb..][..nb],
            &mut gs,
        );
    }
    let mut xq = vec![0i8; m * dim];
    let mut dx = vec![0f32; m * nb];
    for i in 0..m {
        let mut gs = [0f32];
        prep_int8(
            &x[i * dim..][..dim],
            dim,
            dim,
            &mut xq[i * dim..][..dim],
            &mut dx[i * nb..][..nb],
            &mut gs,
        );
    }
    let (f, _) = jit
        .compile_kernel(&KernelSpec::Logits {
            vocab,
            dim,
            act: Act::Int8,
        })
        .expect("compiles");
    let mut y = vec![f32::NAN; m * vocab];
    call(
        f,
        &LogitsArgs {
            xq: xq.as_ptr() as u64,
            dx: dx.as_ptr() as u64,
            m: m as u64,
            wq: wq.as_ptr() as u64,
            ws: wsc.as_ptr() as u64,
            y: y.as_mut_ptr() as u64,
            ldy: vocab as u64,
            n0: 0,
            n1: vocab as u64,
            ..Default::default()
        },
    );
    for i in 0..m {
        for v in 0..vocab {
            let mut want = 0f64;
            let mut exact = 0f64;
            let mut mag = 0f64;
            for b in 0..nb {
                let d: i64 = (0..32)
                    .map(|t| wq[v * dim + 32 * b + t] as i64 * xq[i * dim + 32 * b + t] as i64)
                    .sum();
                want += d as f64 * wsc[v * nb + b] as f64 * dx[i * nb + b] as f64;
                mag += (0..32)
                    .map(|t| {
                        (wq[v * dim + 32 * b + t] as f64 * xq[i * dim + 32 * b + t] as f64).abs()
                    })
                    .sum::<f64>()
                    * wsc[v * nb + b] as f64
                    * dx[i * nb + b] as f64;
            }
            for c in 0..dim {
                exact += table[v * dim + c] as f64 * x[i * dim + c] as f64;
            }
            let got = y[i * vocab + v] as f64;
            assert!(
                (got - want).abs() <= 4.0 * nb as f64 * 6e-8 * mag + 1e-6,
                "int8 logits [{i},{v}]: {got} vs {want}"
            );
            // each factor within half a step of its block: |err| <= sum(|w| dx + |x| dw) / 2
            let bound: f64 = (0..dim)
                .map(|c| {
                    let b = c / 32;
                    0.5 * (table[v * dim + c].abs() as f64 * dx[i * nb + b] as f64
                        + x[i * dim + c].abs() as f64 * wsc[v * nb + b] as f64)
                        + 0.25 * dx[i * nb + b] as f64 * wsc[v * nb + b] as f64
                })
                .sum();
            assert!(
                (got - exact).abs() <= bound * 1.0001 + 1e-5,
                "int8 logits [{i},{v}] vs f32"
            );
        }
    }
}

/// rope + attention with a packed cache (two chunks: the second reads the first from the
/// cache) vs the rope_kv and attention kernels, for GQA ratios, head dims, partial rotary,
/// 3/4-bit and f32 caches, smoothing, past-only or not, prefill and decode-equivalent; the
/// attention kernel generated and native (each ISA variant the host runs).
#[test]
fn rope_kv_and_attention_match_rope_and_attention() {
    let mut jit = CpuJit::host().expect("host JIT");
    let mut rng = Rng(21);
    // heads, kv heads, head dim, rope dim, kv bits, smooth, past-only, K/V rotation, K/V
    // (scale, zero) group (0: a kv head)
    type Case = (usize, usize, usize, usize, u32, bool, bool, usize, usize);
    let cases: &[Case] = &[
        (4, 2, 32, 32, 4, true, true, 0, 0),
        (6, 1, 64, 64, 4, false, true, 0, 0),
        (3, 3, 32, 16, 3, true, false, 0, 0),
        (2, 1, 64, 64, 16, false, false, 0, 0),
        (4, 2, 32, 32, 4, false, false, 0, 0),
        (4, 2, 32, 32, 4, true, false, 0, 0),
        (9, 3, 64, 64, 4, true, true, 0, 0),
        // rotated: the block the head dim (the default), smaller blocks, partial rotary
        (9, 3, 64, 64, 4, true, true, 64, 0),
        (4, 2, 32, 32, 3, false, false, 8, 0),
        (3, 3, 32, 16, 4, true, true, 2, 0),
        (2, 1, 64, 64, 16, false, true, 32, 0),
        // groups of 32 or 64 channels within a head (2 or 4 a head)
        (9, 3, 64, 64, 4, true, true, 64, 32),
        (4, 2, 64, 64, 3, false, false, 0, 32),
        (6, 1, 128, 128, 4, true, false, 0, 64),
        (2, 1, 128, 128, 4, false, true, 0, 32),
    ];
    for &(h, kvh, hd, rd, bits, smooth, past_only, rot, kvg) in cases {
        for mode in [RunMode::Prefill, RunMode::DecodeEquivalent] {
            attention_case(
                &mut jit,
                &mut rng,
                (h, kvh, hd, rd, rot, kvg),
                bits,
                smooth,
                past_only,
                mode,
                &[5, 3, 12],
            );
        }
    }
    // a long context: the CUDA kernel's online softmax over several tiles of 128 tokens
    attention_case(
        &mut jit,
        &mut rng,
        (4, 2, 32, 32, 0, 0),
        4,
        true,
        true,
        RunMode::Prefill,
        &[150, 140, 2],
    );
}

#[allow(clippy::too_many_arguments)]
fn attention_case(
    jit: &mut CpuJit,
    rng: &mut Rng,
    (h, kvh, hd, rd, rot, kvg): (usize, usize, usize, usize, usize, usize),
    bits: u32,
    smooth: bool,
    past_only: bool,
    mode: RunMode,
    chunks: &[usize],
) {
    let (qw, kw) = (h * hd, kvh * hd);
    let width = qw + 2 * kw;
    // reference graph
    let mut b = Builder::new("attn");
    let qi = b.input("q", seq_f32(qw));
    let ki = b.input("k", seq_f32(kw));
    let vi = b.input("v", seq_f32(kw));
    let pi = b.input(
        "pos",
        TensorType::new(DType::I32, vec![Dim::Sym("seq".into())]),
    );
    let rope_attrs = |heads: usize| {
        let mut a = attrs([
            ("heads", Attr::Int(heads as i64)),
            ("head_dim", Attr::Int(hd as i64)),
            ("theta", Attr::Float(10000.0)),
        ]);
        if rd != hd {
            a.insert("rope_dim".into(), Attr::Int(rd as i64));
        }
        if rot > 0 {
            a.insert("rotate".into(), Attr::Int(rot as i64));
        }
        a
    };
    let rq = b.push(
        OpKind::Rope,
        vec![Operand::Value(qi), Operand::Value(pi)],
        rope_attrs(h),
        seq_f32(qw),
    );
    let rk = b.push(
        OpKind::Rope,
        vec![Operand::Value(ki), Operand::Value(pi)],
        rope_attrs(kvh),
        seq_f32(kw),
    );
    let mut args = vec![Operand::Value(rq), Operand::Value(rk), Operand::Value(vi)];
    let mut ws = WeightStore::new();
    let sm: BTreeMap<&str, Vec<f32>> = [
        ("ksh", rng.vec(kw, 0.3)),
        ("ksc", (0..kw).map(|_| 0.5 + rng.f().abs()).collect()),
        ("vsh", rng.vec(kw, 0.3)),
        ("vsc", (0..kw).map(|_| 0.5 + rng.f().abs()).collect()),
    ]
    .into_iter()
    .collect();
    if smooth {
        for name in ["ksh", "ksc", "vsh", "vsc"] {
            args.push(b.param(name, ty(&[kw])));
            ws.insert(name, Weight::from_f32(vec![kw], sm[name].clone()));
        }
    }
    let mut at = attrs([
        ("heads", Attr::Int(h as i64)),
        ("kv_heads", Attr::Int(kvh as i64)),
        ("head_dim", Attr::Int(hd as i64)),
        ("layer", Attr::Int(0)),
        ("causal", Attr::Bool(true)),
        ("past_only", Attr::Bool(past_only)),
    ]);
    if bits < 16 {
        at.insert("kv_bits".into(), Attr::Int(bits as i64));
        if kvg > 0 {
            at.insert("kv_group".into(), Attr::Int(kvg as i64));
        }
    }
    let y = b.push(OpKind::Attention, args, at, seq_f32(qw));
    b.output("y", y);
    let g = b.finish();
    let rope_node = g
        .nodes
        .iter()
        .find(|n| n.op == OpKind::Rope)
        .expect("rope")
        .clone();
    let module = Module {
        graph: g,
        weights: ws,
    };
    module.verify().expect("reference verifies");
    let it = Interpreter::new(&module, 1).expect("interpreter");
    let max: usize = chunks.iter().sum();
    let mut cache = KvCache::new(max);

    let rope_spec = KernelSpec::RopeKv {
        heads: h,
        kv_heads: kvh,
        head_dim: hd,
        rope_dim: rd,
        kv_bits: bits,
        smooth,
        factors: false,
        layer: 0,
        rotate: rot,
        kv_group: if bits < 16 { kvg } else { 0 },
    };
    let attn_spec = KernelSpec::Attention {
        heads: h,
        kv_heads: kvh,
        head_dim: hd,
        kv_bits: bits,
        past_only,
        smooth,
        layer: 0,
        kv_group: if bits < 16 { kvg } else { 0 },
    };
    let (fr, _) = jit.compile_kernel(&rope_spec).expect("rope_kv compiles");
    let (fa, _) = jit.compile_kernel(&attn_spec).expect("attention compiles");
    // the CUDA kernels on the host emulator, with their own cache in the CUDA layout (codes
    // as the CPU's; a word of two f16 (scale, zero) per token and group, or the f32 rows at
    // 16 bits)
    let (_, cr) = emulated(&rope_spec);
    let (_, ca) = emulated(&attn_spec);
    let cmax = max;
    let (gkc, gvc) = (
        HBuf::new(cmax * kw.div_ceil(2)),
        HBuf::new(cmax * kw.div_ceil(2)),
    );
    // (scale, zero) words a row
    let words = kw / if kvg > 0 { kvg } else { hd };
    let gp = if bits == 16 { kw } else { words };
    let (gkp, gvp) = (HBuf::new(4 * cmax * gp), HBuf::new(4 * cmax * gp));
    let gsm: Vec<HBuf> = ["ksh", "ksc", "vsh", "vsc"]
        .iter()
        .map(|n| HBuf::from_f32(&sm[n]))
        .collect();
    let gsmp = |i: usize| if smooth { gsm[i].p() } else { 0 };

    let inv = wkvc_ir::interp::rope_inv_freq(&rope_node, rd, None);
    let ginv = HBuf::from_f32(&inv);
    let (rb, np) = (kw.div_ceil(2), words);
    let (mut kc, mut vc) = (vec![0u8; max * rb], vec![0u8; max * rb]);
    let cache_f = if bits == 16 { kw } else { np };
    let (mut kp, mut vp) = (vec![0f32; max * cache_f], vec![0f32; max * cache_f]);
    let group = h / kvh;
    let mut scratch = vec![0f32; 4 * hd * (group + 1)];
    let zero = vec![0f32; kw];
    let smp = |n: &str| {
        if smooth {
            sm[n].as_ptr() as u64
        } else {
            zero.as_ptr() as u64
        }
    };
    let mut past = 0;
    for &s in chunks {
        let q = rng.vec(s * qw, 1.0);
        let mut k = rng.vec(s * kw, 1.0);
        let mut v = rng.vec(s * kw, 1.0);
        // kv head 0 of every third token in a range of 1e-4 (a subnormal f16 scale: the
        // cache words' conversion), of the next one shifted to all-positive values (a negative
        // zero-point)
        for i in 0..s {
            let (kr, vr) = (&mut k[i * kw..][..hd], &mut v[i * kw..][..hd]);
            match (past + i) % 3 {
                1 => kr.iter_mut().chain(vr.iter_mut()).for_each(|x| *x *= 1e-4),
                2 => vr.iter_mut().for_each(|x| *x = 3.0 + 0.5 * *x),
                _ => {}
            }
        }
        let pos: Vec<i32> = (0..s).map(|i| (past + i) as i32).collect();
        let want = {
            let mut out = it
                .run_mode(
                    &[
                        ("q", Tensor::f32(vec![s, qw], q.clone())),
                        ("k", Tensor::f32(vec![s, kw], k.clone())),
                        ("v", Tensor::f32(vec![s, kw], v.clone())),
                        ("pos", Tensor::i32(vec![s], pos.clone())),
                    ],
                    &mut cache,
                    mode,
                )
                .expect("reference runs");
            out.remove("y").and_then(Tensor::into_f32).expect("y")
        };
        // the kernels: rows [q | k | v], rope tables as the engine computes them
        let mut qkv: Vec<f32> = (0..s)
            .flat_map(|i| {
                q[i * qw..][..qw]
                    .iter()
                    .chain(&k[i * kw..][..kw])
                    .chain(&v[i * kw..][..kw])
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect();
        let half = rd / 2;
        let (mut cos, mut sin) = (vec![0f32; s * half], vec![0f32; s * half]);
        for i in 0..s {
            for (j, &f) in inv.iter().enumerate() {
                let a = (pos[i] as f32 * f) as f64;
                cos[i * half + j] = a.cos() as f32;
                sin[i * half + j] = a.sin() as f32;
            }
        }
        // the CUDA kernels, before the CPU's rope rotates qkv in place; 1 and 3 context splits
        for splits in [1usize, 3] {
            let x = HBuf::from_f32(&qkv);
            let gpos = HBuf::from_bytes(
                &pos.iter()
                    .flat_map(|p| p.to_le_bytes())
                    .collect::<Vec<u8>>(),
            );
            let state = HBuf::from_bytes(&(past as i32).to_le_bytes());
            launch(
                &cr,
                0,
                (s as u32, 1, 1),
                128,
                &RopeKvArgs {
                    x: x.p(),
                    m: s as u64,
                    pos: gpos.p(),
                    inv_freq: ginv.p(),
                    kc: gkc.p(),
                    kp: gkp.p(),
                    vc: gvc.p(),
                    vp: gvp.p(),
                    state: state.p(),
                    ksh: gsmp(0),
                    ksc: gsmp(1),
                    vsh: gsmp(2),
                    vsc: gsmp(3),
                    ..Default::default()
                },
            );
            let part = HBuf::new(4 * s * kvh * splits * group * (hd + 2));
            let out = HBuf::nan_f32(s * qw);
            let args = AttentionArgs {
                q: x.p(),
                m: s as u64,
                kc: gkc.p(),
                kp: gkp.p(),
                vc: gvc.p(),
                vp: gvp.p(),
                state: state.p(),
                decode: u64::from(mode == RunMode::DecodeEquivalent),
                ksh: gsmp(0),
                ksc: gsmp(1),
                vsh: gsmp(2),
                vsc: gsmp(3),
                part: part.p(),
                splits: splits as u64,
                out: out.p(),
                ..Default::default()
            };
            launch(
                &ca,
                0,
                (splits as u32, kvh as u32, s as u32),
                cuda::ATTN_TILE,
                &args,
            );
            launch(&ca, 1, (h as u32, s as u32, 1), hd as u32, &args);
            let vmax = v.iter().fold(0f32, |a, x| a.max(x.abs())) as f64 * 3.0;
            let bound = vec![1e-5 * vmax.max(1.0) * hd as f64 / 8.0; s * qw];
            check(
                &format!(
                    "CUDA (emulated, {splits} splits) attention h{h} kv{kvh} hd{hd} rd{rd} b{bits} smooth {smooth} past_only {past_only} {mode:?} chunk {s}"
                ),
                &out.f32(s * qw),
                &want,
                &bound,
            );
        }
        let (kcp, vcp) = if bits == 16 {
            (kp.as_mut_ptr() as u64, vp.as_mut_ptr() as u64)
        } else {
            (kc.as_mut_ptr() as u64, vc.as_mut_ptr() as u64)
        };
        call(
            fr,
            &RopeKvArgs {
                x: qkv.as_mut_ptr() as u64,
                m: s as u64,
                cos: cos.as_ptr() as u64,
                sin: sin.as_ptr() as u64,
                kc: kcp,
                kp: kp.as_mut_ptr() as u64,
                vc: vcp,
                vp: vp.as_mut_ptr() as u64,
                row0: past as u64,
                ksh: smp("ksh"),
                ksc: smp("ksc"),
                vsh: smp("vsh"),
                vsc: smp("vsc"),
                ..Default::default()
            },
        );
        let base = qkv.as_ptr() as u64;
        // the generated kernel, then the native kernel of each ISA variant the host runs
        let mut kernels = vec![("cranelift".to_string(), CpuKernel::Jit(fa))];
        for isa in CpuIsa::available() {
            if let Some(f) = native::kernel(&attn_spec, isa) {
                kernels.push((format!("native {}", isa.name()), f));
            }
        }
        for (kname, fk) in &kernels {
            let mut got = vec![f32::NAN; s * qw];
            for i in 0..s {
                for gk in 0..kvh {
                    let row = base + (i * width * 4) as u64;
                    let kf = base + (qw * 4) as u64;
                    let vf = base + ((qw + kw) * 4) as u64;
                    let (nq, kf, vf, ldf, f0, f1) = if bits == 16 {
                        (
                            0,
                            kp.as_ptr() as u64,
                            vp.as_ptr() as u64,
                            kw,
                            0,
                            past + i + 1,
                        )
                    } else if !past_only {
                        (past + i + 1, 0, 0, 0, 0, 0)
                    } else if mode == RunMode::Prefill {
                        (past, kf, vf, width, 0, i + 1)
                    } else {
                        (past + i, kf, vf, width, i, i + 1)
                    };
                    call_k(
                        *fk,
                        &AttentionArgs {
                            q: row,
                            kc: kc.as_ptr() as u64,
                            kp: kp.as_ptr() as u64,
                            vc: vc.as_ptr() as u64,
                            vp: vp.as_ptr() as u64,
                            nq: nq as u64,
                            kf,
                            vf,
                            ldf: ldf as u64,
                            f0: f0 as u64,
                            f1: f1 as u64,
                            g: gk as u64,
                            out: got.as_mut_ptr() as u64 + (i * qw * 4) as u64,
                            scratch: scratch.as_mut_ptr() as u64,
                            ksh: smp("ksh"),
                            ksc: smp("ksc"),
                            vsh: smp("vsh"),
                            vsc: smp("vsc"),
                            ..Default::default()
                        },
                    );
                }
            }
            // rope is bit-exact and the quantizer the same, so the codes agree; what differs is
            // the order of f32 sums (scores over hd terms, softmax over the tokens, V sums) and
            // exp by polynomial: relative 1e-5 of the values' scale
            let vmax = v.iter().fold(0f32, |a, x| a.max(x.abs())) as f64 * 3.0;
            let bound = vec![1e-5 * vmax.max(1.0) * hd as f64 / 8.0; got.len()];
            check(
                &format!(
                    "{kname} attention h{h} kv{kvh} hd{hd} rd{rd} b{bits} smooth {smooth} past_only {past_only} {mode:?} chunk {s}"
                ),
                &got,
                &want,
                &bound,
            );
        }
        past += s;
    }
}

/// f16 bits of a normal value that f16 represents exactly (the tests pick such scales).
fn f16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    assert!(
        (1..31).contains(&exp) && b & 0x1fff == 0,
        "{v} is not an exact f16"
    );
    (((b >> 16) & 0x8000) | ((exp as u32) << 10) | ((b >> 13) & 0x3ff)) as u16
}

/// The CUDA GEMM kernels (`_gemv` for up to 8 rows, with the RMSNorm or the SiLU-mul before it
/// fused (`_gemv_rms`, `_gemv_silu`), `_tiled`, and `_mma` on tensor cores where the shape has
/// it) on the host emulator against an f64 reference, for quantized (int4 codes,
/// f16 scale/zero) and f32 weights: block and group tails, per-channel groups, several parts
/// written at their column offset, residuals, and row counts around the GEMV limit and the
/// tiles. Bounds from f32 accumulation over k terms of the dequantization algebra
/// s (x.q - z sum x): 2 k 2^-24 sum s (|q| + |z|) |x|; the mma variant rounds both operands to
/// f16 (relative 2^-11 each, 2^-25 absolute for subnormal activations) and sums in f32.
#[test]
fn cuda_gemm_kernels_on_the_host_emulator_match_f64() {
    let mut rng = Rng(31);
    // (k, parts, group (0: f32 weights), residual)
    let cases: &[(usize, &[usize], i64, bool)] = &[
        (64, &[5], 32, false),
        (96, &[7, 3], 64, true),
        (70, &[9], 32, false),
        (40, &[8], -1, true),
        (576, &[40, 24], 128, true),
        (200, &[11], 128, false),
        (128, &[70], 32, false),
        (96, &[6, 5], 0, true),
        (70, &[9], 0, false),
    ];
    for &(k, parts, group, residual) in cases {
        let quant = group != 0;
        let spec = if quant {
            KernelSpec::QGemm {
                k,
                parts: parts.to_vec(),
                bits: 4,
                group,
                residual,
                act: Act::F32,
            }
        } else {
            KernelSpec::Gemm {
                k,
                parts: parts.to_vec(),
                residual,
            }
        };
        let (kern, module) = emulated(&spec);
        let gl = if quant {
            wkvc_ir::quant::group_len(k, group)
        } else {
            k
        };
        let ng = k.div_ceil(gl);
        let ntot: usize = parts.iter().sum();
        // per part: weights (codes or f32), scale/zero bits, and the dequantized f64 rows
        let mut w64 = vec![0f64; ntot * k];
        // per element: s (|q| + |z|) for the bound
        let mut wabs = vec![0f64; ntot * k];
        let mut bufs = Vec::new();
        let mut base = 0;
        for &nj in parts {
            if quant {
                let mut codes = vec![0u8; nj * k / 2];
                let mut s16 = Vec::new();
                let mut z16 = Vec::new();
                for j in 0..nj {
                    for g in 0..ng {
                        let s = (1 + (rng.f().abs() * 63.0) as u32) as f32 / 1024.0;
                        let z = (rng.f().abs() * 15.0).round();
                        s16.extend(f16_bits(s).to_le_bytes());
                        z16.extend(if z == 0.0 { 0 } else { f16_bits(z) }.to_le_bytes());
                        for c in g * gl..((g + 1) * gl).min(k) {
                            let q = ((rng.f().abs() * 16.0) as u8).min(15);
                            codes[j * k / 2 + c / 2] |= if c % 2 == 0 { q } else { q << 4 };
                            w64[(base + j) * k + c] = s as f64 * (q as f64 - z as f64);
                            wabs[(base + j) * k + c] = s as f64 * (q as f64 + z as f64);
                        }
                    }
                }
                bufs.push([
                    HBuf::from_bytes(&codes),
                    HBuf::from_bytes(&s16),
                    HBuf::from_bytes(&z16),
                ]);
            } else {
                let w = rng.vec(nj * k, 0.5);
                for (i, &v) in w.iter().enumerate() {
                    w64[base * k + i] = v as f64;
                    wabs[base * k + i] = v.abs() as f64;
                }
                bufs.push([HBuf::from_f32(&w), HBuf::new(16), HBuf::new(16)]);
            }
            base += nj;
        }
        for m in [1usize, 3, 8, 9, 33, 70] {
            let x = rng.vec(m * k, 1.0);
            let r = rng.vec(m * ntot, 1.0);
            // the fused prologues' inputs: the RMSNorm's weight, SiLU-mul's [g | u]
            let nw = rng.vec(k, 1.0);
            let gu = rng.vec(m * 2 * k, 3.0);
            let (xb, rb, nwb, gub) = (
                HBuf::from_f32(&x),
                HBuf::from_f32(&r),
                HBuf::from_f32(&nw),
                HBuf::from_f32(&gu),
            );
            let eps = 1e-5f32;
            // the activations each entry sees, in f64
            let plain: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let normed: Vec<f64> = (0..m)
                .flat_map(|i| {
                    let row = &x[i * k..][..k];
                    let ss: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
                    let inv = 1.0 / (ss / k as f64 + eps as f64).sqrt();
                    row.iter()
                        .zip(&nw)
                        .map(move |(&v, &w)| v as f64 * inv * w as f64)
                        .collect::<Vec<_>>()
                })
                .collect();
            let silu: Vec<f64> = (0..m)
                .flat_map(|i| {
                    let row = &gu[i * 2 * k..][..2 * k];
                    (0..k)
                        .map(|c| {
                            let (g, u) = (row[c] as f64, row[k + c] as f64);
                            g / (1.0 + (-g).exp()) * u
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            // y = xe . w (+ r) in f64; bounds: f32 sums (b32), plus f16 operands (b16), plus
            // the prologue's own rounding (the norm's 1/rms over k squares; exp and a division)
            let reference = |xe: &[f64], extra: f64| {
                let (mut want, mut b32, mut b16) = (
                    vec![0f32; m * ntot],
                    vec![0f64; m * ntot],
                    vec![0f64; m * ntot],
                );
                for i in 0..m {
                    for j in 0..ntot {
                        let (mut acc, mut t, mut tx) = (0f64, 0f64, 0f64);
                        for c in 0..k {
                            let xv = xe[i * k + c];
                            acc += xv * w64[j * k + c];
                            t += xv.abs() * wabs[j * k + c];
                            tx += w64[j * k + c].abs();
                        }
                        let rv = if residual {
                            r[i * ntot + j] as f64
                        } else {
                            0.0
                        };
                        want[i * ntot + j] = (acc + rv) as f32;
                        let f32b = 2.0 * k as f64 * 2f64.powi(-24) * t
                            + 2f64.powi(-23) * rv.abs()
                            + extra * t;
                        b32[i * ntot + j] = f32b;
                        b16[i * ntot + j] = f32b + 1.1 * 2f64.powi(-10) * t + 2f64.powi(-24) * tx;
                    }
                }
                (want, b32, b16)
            };
            let (want, b32, b16) = reference(&plain, 0.0);
            let (want_rms, b_rms, _) = reference(&normed, k as f64 * 2f64.powi(-24));
            let (want_silu, b_silu, _) = reference(&silu, 2f64.powi(-20));
            let names: Vec<&str> = kern.entries.iter().map(String::as_str).collect();
            for (e, name) in names.iter().enumerate() {
                let gemv = name.contains("_gemv");
                if gemv && m as u32 > cuda::GEMV_MAX_M {
                    continue;
                }
                let (gy, block, want, bound, xin) = if gemv {
                    let (w, b, xin) = if name.ends_with("_gemv_rms") {
                        (&want_rms, &b_rms, &xb)
                    } else if name.ends_with("_gemv_silu") {
                        (&want_silu, &b_silu, &gub)
                    } else {
                        (&want, &b32, &xb)
                    };
                    (1, 32 * cuda::GEMV_ROWS, w, b, xin)
                } else if name.ends_with("_tiled") {
                    ((m as u32).div_ceil(cuda::TILE_M), 256, &want, &b32, &xb)
                } else {
                    assert!(name.ends_with("_mma"), "{name}");
                    ((m as u32).div_ceil(cuda::MMA_M), 128, &want, &b16, &xb)
                };
                let y = HBuf::nan_f32(m * ntot);
                let yp = y.ptr as u64;
                let mut base = 0u64;
                for (&nj, b) in parts.iter().zip(&bufs) {
                    let gx = if gemv {
                        (nj as u32).div_ceil(cuda::GEMV_ROWS)
                    } else if name.ends_with("_tiled") {
                        (nj as u32).div_ceil(cuda::TILE_N)
                    } else {
                        (nj as u32).div_ceil(cuda::MMA_N)
                    };
                    let r = if residual {
                        rb.ptr as u64 + 4 * base
                    } else {
                        0
                    };
                    let (nw, eps) = if name.ends_with("_gemv_rms") {
                        (nwb.p(), f32_word(eps))
                    } else {
                        (0, 0)
                    };
                    let a = QGemmArgs {
                        x: xin.p(),
                        m: m as u64,
                        w: b[0].p(),
                        s: b[1].p(),
                        z: b[2].p(),
                        y: yp + 4 * base,
                        ldy: ntot as u64,
                        n1: nj as u64,
                        r,
                        ldr: ntot as u64,
                        nw,
                        eps,
                        ..Default::default()
                    };
                    if quant {
                        launch(&module, e, (gx, gy, 1), block, &a);
                    } else {
                        let a = GemmArgs {
                            x: a.x,
                            m: a.m,
                            w: a.w,
                            y: a.y,
                            ldy: a.ldy,
                            n1: a.n1,
                            r: a.r,
                            ldr: a.ldr,
                            nw: a.nw,
                            eps: a.eps,
                            ..Default::default()
                        };
                        launch(&module, e, (gx, gy, 1), block, &a);
                    }
                    base += nj as u64;
                }
                check(
                    &format!("CUDA (emulated) {name} k {k} parts {parts:?} m {m}"),
                    &y.f32(m * ntot),
                    want,
                    bound,
                );
            }
        }
    }
}
