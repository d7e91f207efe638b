//! Every kernel kind of the CPU back end against the interpreter running the kernel's
//! reference subgraph (the unfused ops), on random inputs over several shapes, including
//! widths and groups that are not multiples of the vector width or of the 32-column block;
//! and every CUDA kernel kind on the CUDA host emulator (`wkvc_codegen::cuda_host`) against
//! the same references or f64. Tolerances come from f32 accumulation:
//! |err| <= c * n * 2^-24 * sum|terms| (plus f16 operand rounding for the tensor-core GEMM).

use std::collections::BTreeMap;
use wkvc_codegen::cpu::{CpuJit, KernelFn};
use wkvc_codegen::cuda;
use wkvc_codegen::cuda_host::{self, HostArg, HostModule};
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
    fn p(&self) -> HostArg {
        HostArg::Ptr(self.ptr as u64)
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

fn launch(m: &HostModule, entry: usize, grid: (u32, u32, u32), block: u32, args: &[HostArg]) {
    // SAFETY: each test passes the kernel's arguments (see wkvc_codegen::cuda) with host
    // buffers of the sizes it reads and writes.
    unsafe { m.launch(entry, grid, (block, 1, 1), args) }.expect("emulated launch");
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
        (4, 2, 32, 32, 4, true, false),
        (9, 3, 64, 64, 4, true, true),
    ];
    for &(h, kvh, hd, rd, bits, smooth, past_only) in cases {
        for mode in [RunMode::Prefill, RunMode::DecodeEquivalent] {
            attention_case(
                &mut jit,
                &mut rng,
                (h, kvh, hd, rd),
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
        (4, 2, 32, 32),
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
    (h, kvh, hd, rd): (usize, usize, usize, usize),
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
    // the CUDA kernels on the host emulator, with their own cache in the CUDA layout (codes
    // as the CPU's; an f32 scale and zero per token and kv head, or the f32 rows at 16 bits)
    let (_, cr) = emulated(&rope_spec);
    let (_, ca) = emulated(&attn_spec);
    let cmax = max;
    let (gkc, gvc) = (
        HBuf::new(cmax * kw.div_ceil(2)),
        HBuf::new(cmax * kw.div_ceil(2)),
    );
    let gp = if bits == 16 { kw } else { kvh * 2 };
    let (gkp, gvp) = (HBuf::new(4 * cmax * gp), HBuf::new(4 * cmax * gp));
    let gsm: Vec<HBuf> = ["ksh", "ksc", "vsh", "vsc"]
        .iter()
        .map(|n| HBuf::from_f32(&sm[n]))
        .collect();
    let gsmp = |i: usize| if smooth { gsm[i].p() } else { HostArg::Ptr(0) };

    let inv = wkvc_ir::interp::rope_inv_freq(&rope_node, rd, None);
    let ginv = HBuf::from_f32(&inv);
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
    for &s in chunks {
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
        // the CUDA kernels, before the CPU's rope rotates qkv in place; 1 and 3 context splits
        for splits in [1usize, 3] {
            let x = HBuf::from_f32(&qkv);
            let gpos = HBuf::from_bytes(
                &pos.iter()
                    .flat_map(|p| p.to_le_bytes())
                    .collect::<Vec<u8>>(),
            );
            let state = HBuf::from_bytes(&(past as i32).to_le_bytes());
            let si = HostArg::I32(s as i32);
            launch(
                &cr,
                0,
                (s as u32, 1, 1),
                128,
                &[
                    x.p(),
                    si,
                    gpos.p(),
                    ginv.p(),
                    gkc.p(),
                    gkp.p(),
                    gvc.p(),
                    gvp.p(),
                    state.p(),
                    gsmp(0),
                    gsmp(1),
                    gsmp(2),
                    gsmp(3),
                ],
            );
            let part = HBuf::new(4 * s * kvh * splits * group * (hd + 2));
            let out = HBuf::nan_f32(s * qw);
            launch(
                &ca,
                0,
                (splits as u32, kvh as u32, s as u32),
                cuda::ATTN_TILE,
                &[
                    x.p(),
                    si,
                    gkc.p(),
                    gkp.p(),
                    gvc.p(),
                    gvp.p(),
                    state.p(),
                    HostArg::I32(i32::from(mode == RunMode::DecodeEquivalent)),
                    gsmp(0),
                    gsmp(1),
                    gsmp(2),
                    gsmp(3),
                    part.p(),
                    HostArg::I32(splits as i32),
                ],
            );
            launch(
                &ca,
                1,
                (h as u32, s as u32, 1),
                hd as u32,
                &[part.p(), HostArg::I32(splits as i32), out.p(), si],
            );
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
                    let rp = if residual {
                        HostArg::Ptr(rb.ptr as u64 + 4 * base)
                    } else {
                        HostArg::Ptr(0)
                    };
                    let mut args = vec![
                        xin.p(),
                        HostArg::I32(m as i32),
                        b[0].p(),
                        b[1].p(),
                        b[2].p(),
                        HostArg::Ptr(yp + 4 * base),
                        HostArg::I32(ntot as i32),
                        HostArg::I32(nj as i32),
                        rp,
                        HostArg::I32(ntot as i32),
                    ];
                    if name.ends_with("_gemv_rms") {
                        args.extend([nwb.p(), HostArg::F32(eps)]);
                    }
                    launch(&module, e, (gx, gy, 1), block, &args);
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

/// The CUDA row kernels on the host emulator: RMSNorm against f64 (bound: f32 sums of the
/// squares over the row, one rounding per product), SiLU-mul (exp and a division: relative
/// 2^-21), and the embedding gather (exact); widths that are not multiples of the block.
#[test]
fn cuda_row_kernels_on_the_host_emulator_match_f64() {
    let mut rng = Rng(41);
    for &(dim, m) in &[(576usize, 3usize), (70, 5), (1000, 1)] {
        let (_, md) = emulated(&KernelSpec::RmsNorm { dim, eps: 1e-5 });
        let x = rng.vec(m * dim, 2.0);
        let w = rng.vec(dim, 1.0);
        let (xb, wb) = (HBuf::from_f32(&x), HBuf::from_f32(&w));
        let y = HBuf::nan_f32(m * dim);
        launch(
            &md,
            0,
            (m as u32, 1, 1),
            cuda::BLOCK,
            &[xb.p(), wb.p(), y.p(), HostArg::I32(m as i32)],
        );
        let (mut want, mut bound) = (Vec::new(), Vec::new());
        for i in 0..m {
            let r = &x[i * dim..][..dim];
            let ss: f64 = r.iter().map(|&v| v as f64 * v as f64).sum();
            let inv = 1.0 / (ss / dim as f64 + 1e-5).sqrt();
            for c in 0..dim {
                let v = r[c] as f64 * inv * w[c] as f64;
                want.push(v as f32);
                bound.push(v.abs() * (dim as f64 * 2f64.powi(-24) + 4.0 * 2f64.powi(-24)));
            }
        }
        check(
            &format!("CUDA (emulated) rms_norm {dim} x {m}"),
            &y.f32(m * dim),
            &want,
            &bound,
        );

        let n = dim;
        let (_, ms) = emulated(&KernelSpec::SiluMul { n });
        let gu = rng.vec(m * 2 * n, 4.0);
        let gb = HBuf::from_f32(&gu);
        let y = HBuf::nan_f32(m * n);
        launch(
            &ms,
            0,
            (((m * n) as u32).div_ceil(256), 1, 1),
            256,
            &[gb.p(), y.p(), HostArg::I32(m as i32)],
        );
        let (mut want, mut bound) = (Vec::new(), Vec::new());
        for i in 0..m {
            for c in 0..n {
                let (g, u) = (gu[i * 2 * n + c] as f64, gu[i * 2 * n + n + c] as f64);
                let v = g / (1.0 + (-g).exp()) * u;
                want.push(v as f32);
                bound.push(v.abs() * 2f64.powi(-21) + 1e-30);
            }
        }
        check(
            &format!("CUDA (emulated) silu_mul {n} x {m}"),
            &y.f32(m * n),
            &want,
            &bound,
        );

        let vocab = 37;
        let (_, me) = emulated(&KernelSpec::Embed { vocab, dim });
        let table = rng.vec(vocab * dim, 1.0);
        let ids: Vec<i32> = (0..m).map(|i| ((i * 13 + 5) % vocab) as i32).collect();
        let (tb, ib) = (
            HBuf::from_f32(&table),
            HBuf::from_bytes(
                &ids.iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
        );
        let y = HBuf::nan_f32(m * dim);
        launch(
            &me,
            0,
            (m as u32, 1, 1),
            128,
            &[ib.p(), tb.p(), y.p(), HostArg::I32(m as i32)],
        );
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&t| table[t as usize * dim..][..dim].to_vec())
            .collect();
        check(
            &format!("CUDA (emulated) embed {dim} x {m}"),
            &y.f32(m * dim),
            &want,
            &vec![0.0; m * dim],
        );
    }
}
