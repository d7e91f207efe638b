//! Every kernel kind of the CPU back end against the interpreter running the kernel's
//! reference subgraph (the unfused ops), on random inputs over several shapes, including
//! widths and groups that are not multiples of the vector width or of the 32-column block.
//! Tolerances come from f32 accumulation: |err| <= c * n * 2^-24 * sum|terms|.

use std::collections::BTreeMap;
use wkvc_codegen::cpu::{CpuJit, KernelFn};
use wkvc_codegen::kernels::{prep_f32, prep_int8, tile_codes, tile_params};
use wkvc_ir::graph::{Attr, Builder, OpKind, Operand, attrs, seq_f32};
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

fn call(f: KernelFn, args: &[u64]) {
    // SAFETY: each test passes the argument words of the kind (`kernels::*_ARGS`) with
    // buffers of the sizes the kernel reads and writes.
    unsafe { f(args.as_ptr()) }
}

fn run(g: wkvc_ir::Graph, w: WeightStore, inputs: &[(&str, Tensor)]) -> Vec<f32> {
    let m = Module {
        graph: g,
        weights: w,
    };
    m.verify().expect("reference graph verifies");
    let it = Interpreter::new(&m, 1).expect("interpreter");
    let mut cache = KvCache::new(64);
    let mut out = it.run(inputs, &mut cache).expect("reference runs");
    out.remove("y").and_then(Tensor::into_f32).expect("y")
}

fn check(name: &str, got: &[f32], want: &[f32], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, ((g, w), b)) in got.iter().zip(want).zip(bound).enumerate() {
        let d = (*g as f64 - *w as f64).abs();
        assert!(
            d <= *b,
            "{name}[{i}]: got {g}, want {w}, |diff| {d:e} > {b:e}"
        );
    }
}

/// qlinear (+ add) reference vs the qgemm kernel, exact and int8 paths.
#[test]
fn qgemm_matches_qlinear() {
    let mut jit = CpuJit::host().expect("host JIT");
    let mut rng = Rng(7);
    // (m, n, k, group, residual): tails of the group (96 % 64), of the block (70, 40, 200 %
    // 128 = 72 -> 2 blocks + 8), per-channel groups, one and several rows
    for &(m, n, k, group, residual) in &[
        (1usize, 5usize, 64usize, 32i64, false),
        (3, 7, 96, 64, true),
        (5, 9, 70, 32, false),
        (4, 8, 40, -1, true),
        (6, 11, 200, 128, true),
        (9, 4, 576, 128, false),
        // whole tiles of 8 rows in both calls, calls that start and end mid-tile, tails in
        // tiles
        (2, 37, 96, 32, true),
        (1, 24, 40, -1, false),
        (1, 40, 200, 128, true),
    ] {
        let gl = wkvc_ir::quant::group_len(k, group);
        let ng = k.div_ceil(gl);
        let w = rng.vec(n * k, 0.5);
        let ones = vec![1f32; n * ng];
        let (codes, s16, z16) = wkvc_ir::quant::quantize_rows(&w, k, 4, group, &ones, &ones);
        let x = rng.vec(m * k, 1.0);
        let r = rng.vec(m * n, 1.0);
        // reference
        let mut b = Builder::new("qgemm");
        let xi = b.input("x", seq_f32(k));
        let c = b.param(
            "c",
            TensorType::new(DType::U4, vec![Dim::Const(n), Dim::Const(k)]),
        );
        let sp = b.param(
            "s",
            TensorType::new(DType::F16, vec![Dim::Const(n), Dim::Const(ng)]),
        );
        let zp = b.param(
            "z",
            TensorType::new(DType::F16, vec![Dim::Const(n), Dim::Const(ng)]),
        );
        let q = b.push(
            OpKind::QLinear,
            vec![Operand::Value(xi), c, sp, zp],
            attrs([("bits", Attr::Int(4)), ("group", Attr::Int(group))]),
            seq_f32(n),
        );
        let y = if residual {
            let ri = b.input("r", seq_f32(n));
            b.push(
                OpKind::Add,
                vec![Operand::Value(ri), Operand::Value(q)],
                Default::default(),
                seq_f32(n),
            )
        } else {
            q
        };
        b.output("y", y);
        let mut ws = WeightStore::new();
        ws.insert(
            "c",
            Weight::from_bytes(vec![n, k], DType::U4, wkvc_ir::quant::pack_u4(&codes, k)),
        );
        ws.insert("s", Weight::from_f16(vec![n, ng], &s16));
        ws.insert("z", Weight::from_f16(vec![n, ng], &z16));
        let mut inputs = vec![("x", Tensor::f32(vec![m, k], x.clone()))];
        if residual {
            inputs.push(("r", Tensor::f32(vec![m, n], r.clone())));
        }
        let want = run(b.finish(), ws, &inputs);
        let packed = wkvc_ir::quant::pack_u4(&codes, k);
        let sf: Vec<f32> = s16.iter().map(|v| v.to_f32()).collect();
        let zf: Vec<f32> = z16.iter().map(|v| v.to_f32()).collect();
        // the kernel's weight layout
        let (packed_t, sf_t, zf_t) = (
            tile_codes(&packed, n, k, gl),
            tile_params(&sf, n, ng),
            tile_params(&zf, n, ng),
        );
        // f32 error bound per output: terms |x| * 15 * s plus the zero-point term
        let mag: Vec<f64> = (0..m * n)
            .map(|o| {
                let (i, j) = (o / n, o % n);
                (0..k)
                    .map(|c| {
                        let g = j * ng + c / gl;
                        (x[i * k + c].abs() * (15.0 + zf[g].abs()) * sf[g]) as f64
                    })
                    .sum::<f64>()
                    + if residual { r[o].abs() as f64 } else { 0.0 }
            })
            .collect();
        for act in [Act::F32, Act::Int8] {
            let spec = KernelSpec::QGemm {
                k,
                parts: vec![n],
                bits: 4,
                group,
                residual,
                act,
            };
            let (f, _) = jit.compile_kernel(&spec).expect("compiles");
            let nb = (k / gl) * (gl / 32) + (k % gl) / 32;
            let mut xp = vec![0f32; m * k];
            let mut xq = vec![0i8; m * k];
            let mut dx = vec![0f32; m * nb.max(1)];
            let mut gs = vec![0f32; m * ng];
            for i in 0..m {
                let xr = &x[i * k..][..k];
                match act {
                    Act::F32 => prep_f32(xr, k, gl, &mut xp[i * k..][..k], &mut gs[i * ng..][..ng]),
                    Act::Int8 => prep_int8(
                        xr,
                        k,
                        gl,
                        &mut xq[i * k..][..k],
                        &mut dx[i * nb..][..nb],
                        &mut gs[i * ng..][..ng],
                    ),
                }
            }
            let mut y = vec![f32::NAN; m * n];
            // two calls over a split of the rows, as two threads would
            for (n0, n1) in [(0, n / 2), (n / 2, n)] {
                let xpp = match act {
                    Act::F32 => xp.as_ptr() as u64,
                    Act::Int8 => xq.as_ptr() as u64,
                };
                call(
                    f,
                    &[
                        xpp,
                        gs.as_ptr() as u64,
                        dx.as_ptr() as u64,
                        x.as_ptr() as u64,
                        m as u64,
                        packed_t.as_ptr() as u64,
                        sf_t.as_ptr() as u64,
                        zf_t.as_ptr() as u64,
                        y.as_mut_ptr() as u64,
                        n as u64,
                        n0 as u64,
                        n1 as u64,
                        r.as_ptr() as u64,
                        n as u64,
                    ],
                );
            }
            let name = format!("qgemm m{m} n{n} k{k} g{group} {act:?}");
            match act {
                // f32 sums of k terms in a different order
                Act::F32 => {
                    let bound: Vec<f64> = mag
                        .iter()
                        .map(|v| 4.0 * k as f64 * 6e-8 * v + 1e-6)
                        .collect();
                    check(&name, &y, &want, &bound);
                }
                // int8 activations: each x moves by at most half a step (max|x|/127 of its
                // block), so y moves by at most sum |w| * step / 2 (plus f32 rounding)
                Act::Int8 => {
                    let bound: Vec<f64> = (0..m * n)
                        .map(|o| {
                            let (i, j) = (o / n, o % n);
                            let mut e = 0f64;
                            for c in 0..k {
                                let g = j * ng + c / gl;
                                let start = (c / gl) * gl;
                                let inb = (c - start) / 32 * 32 + 32 <= gl.min(k - start);
                                if inb {
                                    let b0 = start + (c - start) / 32 * 32;
                                    let amax = x[i * k + b0..i * k + b0 + 32]
                                        .iter()
                                        .fold(0f32, |a, v| a.max(v.abs()));
                                    let wq = (codes[j * k + c] as f32 - zf[g]) * sf[g];
                                    e += (wq.abs() * amax / 127.0 * 0.5) as f64;
                                }
                            }
                            e * 1.0001 + 4.0 * k as f64 * 6e-8 * mag[o] + 1e-6
                        })
                        .collect();
                    check(&name, &y, &want, &bound);
                }
            }
        }
    }
}

/// linear (+ add) with f32 weights vs the gemm kernel, and the f32 logits kernel.
#[test]
fn gemm_and_logits_match_linear() {
    let mut jit = CpuJit::host().expect("host JIT");
    let mut rng = Rng(11);
    for &(m, n, k, residual) in &[
        (1usize, 7usize, 5usize, false),
        (3, 9, 33, true),
        (2, 16, 576, false),
    ] {
        let w = rng.vec(n * k, 0.5);
        let x = rng.vec(m * k, 1.0);
        let r = rng.vec(m * n, 1.0);
        let mut b = Builder::new("gemm");
        let xi = b.input("x", seq_f32(k));
        let wp = b.param("w", ty(&[n, k]));
        let l = b.push(
            OpKind::Linear,
            vec![Operand::Value(xi), wp],
            Default::default(),
            seq_f32(n),
        );
        let y = if residual {
            let ri = b.input("r", seq_f32(n));
            b.push(
                OpKind::Add,
                vec![Operand::Value(ri), Operand::Value(l)],
                Default::default(),
                seq_f32(n),
            )
        } else {
            l
        };
        b.output("y", y);
        let mut ws = WeightStore::new();
        ws.insert("w", Weight::from_f32(vec![n, k], w.clone()));
        let mut inputs = vec![("x", Tensor::f32(vec![m, k], x.clone()))];
        if residual {
            inputs.push(("r", Tensor::f32(vec![m, n], r.clone())));
        }
        let want = run(b.finish(), ws, &inputs);
        let bound: Vec<f64> = (0..m * n)
            .map(|o| {
                let (i, j) = (o / n, o % n);
                let s: f64 = (0..k)
                    .map(|c| (x[i * k + c] * w[j * k + c]).abs() as f64)
                    .sum();
                4.0 * k as f64 * 6e-8 * s + 1e-6
            })
            .collect();
        let specs = if residual {
            vec![KernelSpec::Gemm {
                k,
                parts: vec![n],
                residual,
            }]
        } else {
            vec![
                KernelSpec::Gemm {
                    k,
                    parts: vec![n],
                    residual,
                },
                KernelSpec::Logits {
                    vocab: n,
                    dim: k,
                    act: Act::F32,
                },
            ]
        };
        for spec in specs {
            let (f, _) = jit.compile_kernel(&spec).expect("compiles");
            let mut y = vec![f32::NAN; m * n];
            for (n0, n1) in [(0, n / 2), (n / 2, n)] {
                call(
                    f,
                    &[
                        x.as_ptr() as u64,
                        m as u64,
                        w.as_ptr() as u64,
                        y.as_mut_ptr() as u64,
                        n as u64,
                        n0 as u64,
                        n1 as u64,
                        r.as_ptr() as u64,
                        n as u64,
                    ],
                );
            }
            check(
                &format!("{} m{m} n{n} k{k}", spec.code_name()),
                &y,
                &want,
                &bound,
            );
        }
    }
}

/// rms_norm, silu+mul and embedding vs their ops.
#[test]
fn small_kernels_match_their_ops() {
    let mut jit = CpuJit::host().expect("host JIT");
    let mut rng = Rng(5);
    for &(m, d) in &[(1usize, 5usize), (3, 64), (2, 577), (4, 1536)] {
        // rms_norm: the mean and root in f64 like the interpreter; products in f32
        let x = rng.vec(m * d, 2.0);
        let w = rng.vec(d, 1.0);
        let mut b = Builder::new("rms");
        let xi = b.input("x", seq_f32(d));
        let wp = b.param("w", ty(&[d]));
        let y = b.push(
            OpKind::RmsNorm,
            vec![Operand::Value(xi), wp],
            attrs([("eps", Attr::Float(1e-5))]),
            seq_f32(d),
        );
        b.output("y", y);
        let mut ws = WeightStore::new();
        ws.insert("w", Weight::from_f32(vec![d], w.clone()));
        let want = run(b.finish(), ws, &[("x", Tensor::f32(vec![m, d], x.clone()))]);
        let (f, _) = jit
            .compile_kernel(&KernelSpec::RmsNorm { dim: d, eps: 1e-5 })
            .expect("compiles");
        let mut got = vec![f32::NAN; m * d];
        call(
            f,
            &[
                x.as_ptr() as u64,
                w.as_ptr() as u64,
                got.as_mut_ptr() as u64,
                m as u64,
            ],
        );
        // the f64 sum of squares in another order, then two f32 roundings
        let bound: Vec<f64> = want.iter().map(|v| v.abs() as f64 * 4e-7 + 1e-7).collect();
        check(&format!("rms_norm m{m} d{d}"), &got, &want, &bound);

        // silu_mul: exp by a polynomial (a few ulp) vs libm
        let g = rng.vec(m * d, 6.0);
        let u = rng.vec(m * d, 2.0);
        let mut b = Builder::new("silu");
        let gi = b.input("g", seq_f32(d));
        let ui = b.input("u", seq_f32(d));
        let s = b.push(
            OpKind::Silu,
            vec![Operand::Value(gi)],
            Default::default(),
            seq_f32(d),
        );
        let y = b.push(
            OpKind::Mul,
            vec![Operand::Value(s), Operand::Value(ui)],
            Default::default(),
            seq_f32(d),
        );
        b.output("y", y);
        let want = run(
            b.finish(),
            WeightStore::new(),
            &[
                ("g", Tensor::f32(vec![m, d], g.clone())),
                ("u", Tensor::f32(vec![m, d], u.clone())),
            ],
        );
        let gu: Vec<f32> = (0..m)
            .flat_map(|i| {
                g[i * d..(i + 1) * d]
                    .iter()
                    .chain(&u[i * d..(i + 1) * d])
                    .copied()
            })
            .collect();
        let (f, _) = jit
            .compile_kernel(&KernelSpec::SiluMul { n: d })
            .expect("compiles");
        let mut got = vec![f32::NAN; m * d];
        call(f, &[gu.as_ptr() as u64, got.as_mut_ptr() as u64, m as u64]);
        let bound: Vec<f64> = want.iter().map(|v| v.abs() as f64 * 2e-6 + 1e-7).collect();
        check(&format!("silu_mul m{m} n{d}"), &got, &want, &bound);

        // embedding: exact copies
        let vocab = 13;
        let table = rng.vec(vocab * d, 1.0);
        let ids: Vec<i32> = (0..m).map(|i| ((i * 5 + 3) % vocab) as i32).collect();
        let mut b = Builder::new("embed");
        let ii = b.input(
            "ids",
            TensorType::new(DType::I32, vec![Dim::Sym("seq".into())]),
        );
        let tp = b.param("t", ty(&[vocab, d]));
        let y = b.push(
            OpKind::Embedding,
            vec![Operand::Value(ii), tp],
            Default::default(),
            seq_f32(d),
        );
        b.output("y", y);
        let mut ws = WeightStore::new();
        ws.insert("t", Weight::from_f32(vec![vocab, d], table.clone()));
        let want = run(
            b.finish(),
            ws,
            &[("ids", Tensor::i32(vec![m], ids.clone()))],
        );
        let (f, _) = jit
            .compile_kernel(&KernelSpec::Embed { vocab, dim: d })
            .expect("compiles");
        let mut got = vec![f32::NAN; m * d];
        call(
            f,
            &[
                ids.as_ptr() as u64,
                table.as_ptr() as u64,
                got.as_mut_ptr() as u64,
                m as u64,
            ],
        );
        assert_eq!(got, want, "embed m{m} d{d}");
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
        &[
            xq.as_ptr() as u64,
            dx.as_ptr() as u64,
            m as u64,
            wq.as_ptr() as u64,
            wsc.as_ptr() as u64,
            y.as_mut_ptr() as u64,
            vocab as u64,
            0,
            vocab as u64,
        ],
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
/// 3/4-bit and f32 caches, smoothing, past-only or not, prefill and decode-equivalent.
#[test]
fn rope_kv_and_attention_match_rope_and_attention() {
    let mut jit = CpuJit::host().expect("host JIT");
    let mut rng = Rng(21);
    let cases: &[(usize, usize, usize, usize, u32, bool, bool)] = &[
        // heads, kv heads, head dim, rope dim, kv bits, smooth, past-only
        (4, 2, 32, 32, 4, true, true),
        (6, 1, 64, 64, 4, false, true),
        (3, 3, 32, 16, 3, true, false),
        (2, 1, 64, 64, 16, false, false),
        (4, 2, 32, 32, 4, false, false),
    ];
    for &(h, kvh, hd, rd, bits, smooth, past_only) in cases {
        for mode in [RunMode::Prefill, RunMode::DecodeEquivalent] {
            attention_case(
                &mut jit, &mut rng, h, kvh, hd, rd, bits, smooth, past_only, mode,
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn attention_case(
    jit: &mut CpuJit,
    rng: &mut Rng,
    h: usize,
    kvh: usize,
    hd: usize,
    rd: usize,
    bits: u32,
    smooth: bool,
    past_only: bool,
    mode: RunMode,
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
    let mut cache = KvCache::new(64);

    let rope_spec = KernelSpec::RopeKv {
        heads: h,
        kv_heads: kvh,
        head_dim: hd,
        rope_dim: rd,
        kv_bits: bits,
        smooth,
        factors: false,
        layer: 0,
    };
    let attn_spec = KernelSpec::Attention {
        heads: h,
        kv_heads: kvh,
        head_dim: hd,
        kv_bits: bits,
        past_only,
        smooth,
        layer: 0,
    };
    let (fr, _) = jit.compile_kernel(&rope_spec).expect("rope_kv compiles");
    let (fa, _) = jit.compile_kernel(&attn_spec).expect("attention compiles");
    let inv = wkvc_ir::interp::rope_inv_freq(&rope_node, rd, None);
    let max = 16;
    let (rb, np) = (kw.div_ceil(2), kvh * 2);
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
    for s in [5usize, 3] {
        let q = rng.vec(s * qw, 1.0);
        let k = rng.vec(s * kw, 1.0);
        let v = rng.vec(s * kw, 1.0);
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
        let (kcp, vcp) = if bits == 16 {
            (kp.as_mut_ptr() as u64, vp.as_mut_ptr() as u64)
        } else {
            (kc.as_mut_ptr() as u64, vc.as_mut_ptr() as u64)
        };
        call(
            fr,
            &[
                qkv.as_mut_ptr() as u64,
                s as u64,
                cos.as_ptr() as u64,
                sin.as_ptr() as u64,
                kcp,
                kp.as_mut_ptr() as u64,
                vcp,
                vp.as_mut_ptr() as u64,
                past as u64,
                smp("ksh"),
                smp("ksc"),
                smp("vsh"),
                smp("vsc"),
            ],
        );
        let mut got = vec![f32::NAN; s * qw];
        let base = qkv.as_ptr() as u64;
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
                call(
                    fa,
                    &[
                        row,
                        kc.as_ptr() as u64,
                        kp.as_ptr() as u64,
                        vc.as_ptr() as u64,
                        vp.as_ptr() as u64,
                        nq as u64,
                        kf,
                        vf,
                        ldf as u64,
                        f0 as u64,
                        f1 as u64,
                        gk as u64,
                        got.as_mut_ptr() as u64 + (i * qw * 4) as u64,
                        scratch.as_mut_ptr() as u64,
                        smp("ksh"),
                        smp("ksc"),
                        smp("vsh"),
                        smp("vsc"),
                    ],
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
                "attention h{h} kv{kvh} hd{hd} rd{rd} b{bits} smooth {smooth} past_only {past_only} {mode:?} chunk {s}"
            ),
            &got,
            &want,
            &bound,
        );
        past += s;
    }
}
