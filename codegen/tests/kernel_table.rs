//! One table of kernel cases, in the spirit of llama.cpp's test-backend-ops: every
//! stateless kernel kind (embed, rms_norm, silu_mul, qgemm, gemm, logits) over a list of
//! shapes and configurations, on every back end available here (Cranelift with the spec's
//! activation mode, the native kernels of each CPU ISA variant the host runs
//! (`wkvc_codegen::native`), and the CUDA C on the host emulator: GEMV, tiled and
//! tensor-core entry points), each against the interpreter running `KernelSpec::reference()` on the same
//! inputs. A new kind or shape is one line in `cases()`. The cases are printed as they run.
//! (`rope_kv` and `attention` change the KV cache: `kernels.rs` checks them against `rope`
//! and `attention` with a cache; a GPU runs the CUDA kernels in `scripts/gpu-check.sh`.)
//!
//! Bounds, per output element, with t = sum over the dot product's terms of |x| |w|:
//! - f32 sums of k terms in another order: 4 k 2^-24 t (+ 2^-23 |residual|);
//! - int8 activations (CPU qgemm and logits): each activation moves by at most half its
//!   block's step (max|x| / 127), each int8 table entry by half of its own: the sum of those
//!   moves times the other factor, plus the f32 bound;
//! - f16 operands (the tensor-core GEMM): 2^-10 relative per product, 1.1 2^-10 t;
//! - rms_norm: the CPU sums squares in f64 like the interpreter (two f32 roundings: 4e-7
//!   relative), the CUDA kernel in f32 (dim 2^-24 relative more); silu: exp by polynomial
//!   (CPU) or expf (CUDA), 2e-6 relative; embed: exact.

use wkvc_codegen::cpu::CpuJit;
use wkvc_codegen::cuda;
use wkvc_codegen::cuda_host::{self, HostModule};
use wkvc_codegen::kernels::{prep_f32, prep_int8, tile_codes, tile_params};
use wkvc_codegen::native::{self, CpuIsa, CpuKernel};
use wkvc_ir::kernel::args::{
    EmbedArgs, GemmArgs, KernelArgs, LogitsArgs, QGemmArgs, RmsNormArgs, SiluMulArgs,
};
use wkvc_ir::{Act, DType, Interpreter, KernelSpec, KvCache, Module, Tensor, Weight, WeightStore};

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

/// Every case: a spec and the rows of the call.
fn cases() -> Vec<(KernelSpec, usize)> {
    let mut c = Vec::new();
    for &(m, d) in &[(1usize, 5usize), (3, 64), (2, 577), (4, 1536)] {
        c.push((KernelSpec::RmsNorm { dim: d, eps: 1e-5 }, m));
        c.push((KernelSpec::SiluMul { n: d }, m));
        c.push((KernelSpec::Embed { vocab: 13, dim: d }, m));
    }
    // (m, k, parts, group, residual): tails of the group (96 % 64), of the 32-column block
    // (70, 40, 200 % 128 = 72), per-channel groups, several parts, one and many rows (the
    // CUDA GEMV takes up to 8, the tiled kernel more)
    for &(m, k, parts, group, residual) in &[
        (1usize, 64usize, &[5usize][..], 32i64, false),
        (3, 96, &[7], 64, true),
        (5, 70, &[9], 32, false),
        (4, 40, &[8], -1, true),
        (6, 200, &[11], 128, true),
        (9, 576, &[4], 128, false),
        (2, 96, &[37], 32, true),
        (1, 200, &[40], 128, true),
        (12, 576, &[40, 24], 128, true),
        (33, 128, &[70], 32, false),
        (7, 1536, &[24, 13], 128, true),
        (16, 576, &[64], 128, false),
    ] {
        for act in [Act::F32, Act::Int8] {
            c.push((
                KernelSpec::QGemm {
                    k,
                    parts: parts.to_vec(),
                    bits: 4,
                    group,
                    residual,
                    act,
                },
                m,
            ));
        }
    }
    for &(m, k, parts, residual) in &[
        (1usize, 5usize, &[7usize][..], false),
        (3, 64, &[9], true),
        (2, 70, &[6, 5], true),
        (10, 96, &[33], false),
    ] {
        c.push((
            KernelSpec::Gemm {
                k,
                parts: parts.to_vec(),
                residual,
            },
            m,
        ));
    }
    for &(m, vocab, dim) in &[(1usize, 37usize, 96usize), (3, 100, 64), (9, 41, 576)] {
        for act in [Act::F32, Act::Int8] {
            c.push((KernelSpec::Logits { vocab, dim, act }, m));
        }
    }
    c
}

/// A case's inputs and weights, made from its reference graph's declarations.
#[derive(Clone)]
struct Data {
    /// graph inputs by name (f32 rows, or ids)
    inputs: Vec<(String, Tensor)>,
    weights: WeightStore,
    /// per GEMM part: (codes packed, scales f32, zeros f32) or f32 rows
    parts: Vec<Part>,
}

#[derive(Clone)]
enum Part {
    Quant {
        packed: Vec<u8>,
        s: Vec<f32>,
        z: Vec<f32>,
        s16: Vec<u16>,
        z16: Vec<u16>,
    },
    F32(Vec<f32>),
}

impl Data {
    fn input(&self, name: &str) -> &[f32] {
        self.inputs
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, t)| t.as_f32())
            .unwrap_or(&[])
    }
}

fn data(spec: &KernelSpec, m: usize, rng: &mut Rng) -> Data {
    let g = spec.reference().expect("a reference graph");
    let mut inputs = Vec::new();
    for i in &g.inputs {
        let cols = i.ty.shape.get(1).and_then(|d| d.as_const()).unwrap_or(1);
        let t = match i.ty.dtype {
            DType::I32 => {
                let vocab = match spec {
                    KernelSpec::Embed { vocab, .. } => *vocab,
                    _ => 1,
                };
                Tensor::i32(
                    vec![m],
                    (0..m).map(|r| ((r * 5 + 3) % vocab) as i32).collect(),
                )
            }
            _ => Tensor::f32(
                vec![m, cols],
                rng.vec(m * cols, if i.name == "g" { 6.0 } else { 1.5 }),
            ),
        };
        inputs.push((i.name.clone(), t));
    }
    let mut weights = WeightStore::new();
    let mut parts = Vec::new();
    match spec {
        KernelSpec::QGemm {
            k,
            parts: ns,
            group,
            ..
        } => {
            let ng = k.div_ceil(wkvc_ir::quant::group_len(*k, *group));
            for (j, &n) in ns.iter().enumerate() {
                let w = rng.vec(n * k, 0.5);
                let ones = vec![1f32; n * ng];
                let (codes, s16, z16) =
                    wkvc_ir::quant::quantize_rows(&w, *k, 4, *group, &ones, &ones);
                let packed = wkvc_ir::quant::pack_u4(&codes, *k);
                weights.insert(
                    format!("codes{j}"),
                    Weight::from_bytes(vec![n, *k], DType::U4, packed.clone()),
                );
                weights.insert(format!("scales{j}"), Weight::from_f16(vec![n, ng], &s16));
                weights.insert(format!("zeros{j}"), Weight::from_f16(vec![n, ng], &z16));
                parts.push(Part::Quant {
                    packed,
                    s: s16.iter().map(|v| v.to_f32()).collect(),
                    z: z16.iter().map(|v| v.to_f32()).collect(),
                    s16: s16.iter().map(|v| v.to_bits()).collect(),
                    z16: z16.iter().map(|v| v.to_bits()).collect(),
                });
            }
        }
        KernelSpec::Gemm { k, parts: ns, .. } => {
            for (j, &n) in ns.iter().enumerate() {
                let w = rng.vec(n * k, 0.5);
                weights.insert(format!("w{j}"), Weight::from_f32(vec![n, *k], w.clone()));
                parts.push(Part::F32(w));
            }
        }
        _ => {
            for p in &g.params {
                let shape: Vec<usize> = p.ty.shape.iter().filter_map(|d| d.as_const()).collect();
                let n = shape.iter().product();
                let w = rng.vec(n, 0.5);
                weights.insert(p.name.clone(), Weight::from_f32(shape, w.clone()));
                parts.push(Part::F32(w));
            }
        }
    }
    Data {
        inputs,
        weights,
        parts,
    }
}

fn reference(spec: &KernelSpec, d: &Data) -> Vec<f32> {
    let m = Module {
        graph: spec.reference().expect("reference"),
        weights: d.weights.clone(),
    };
    m.verify().expect("the reference graph verifies");
    let it = Interpreter::new(&m, 1).expect("interpreter");
    let inputs: Vec<(&str, Tensor)> = d
        .inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let mut out = it
        .run(&inputs, &mut KvCache::new(1 << 16))
        .expect("the reference runs");
    out.remove("y").and_then(Tensor::into_f32).expect("y")
}

/// The dequantized (or f32) weight rows of all parts, side by side.
fn rows_f32(spec: &KernelSpec, d: &Data) -> Vec<Vec<f32>> {
    let k = match spec {
        KernelSpec::QGemm { k, .. } | KernelSpec::Gemm { k, .. } => *k,
        KernelSpec::Logits { dim, .. } => *dim,
        _ => 0,
    };
    let mut rows = Vec::new();
    for p in &d.parts {
        match p {
            Part::Quant { packed, s, z, .. } => {
                let KernelSpec::QGemm { group, .. } = spec else {
                    unreachable!("quantized parts belong to a qgemm")
                };
                let gl = wkvc_ir::quant::group_len(k, *group);
                let ng = k.div_ceil(gl);
                for (j, r) in packed.chunks(k / 2).enumerate() {
                    rows.push(
                        (0..k)
                            .map(|c| {
                                let q = if c % 2 == 0 {
                                    r[c / 2] & 15
                                } else {
                                    r[c / 2] >> 4
                                };
                                (q as f32 - z[j * ng + c / gl]) * s[j * ng + c / gl]
                            })
                            .collect(),
                    );
                }
            }
            Part::F32(w) => rows.extend(w.chunks(k).map(<[f32]>::to_vec)),
        }
    }
    rows
}

/// t = sum |x| |w| per output (the qgemm with |w| <= (15 + |z|) s, what its algebra sums).
fn magnitudes(spec: &KernelSpec, d: &Data, m: usize) -> Vec<f64> {
    let x = d.input("x");
    let k = x.len() / m.max(1);
    let mut out = Vec::new();
    let bound_rows: Vec<Vec<f32>> = match spec {
        KernelSpec::QGemm { group, .. } => {
            let gl = wkvc_ir::quant::group_len(k, *group);
            let ng = k.div_ceil(gl);
            let mut rows = Vec::new();
            for p in &d.parts {
                if let Part::Quant { s, z, packed, .. } = p {
                    for j in 0..packed.len() / (k / 2) {
                        rows.push(
                            (0..k)
                                .map(|c| (15.0 + z[j * ng + c / gl].abs()) * s[j * ng + c / gl])
                                .collect(),
                        );
                    }
                }
            }
            rows
        }
        _ => rows_f32(spec, d),
    };
    for i in 0..m {
        for w in &bound_rows {
            out.push(
                (0..k)
                    .map(|c| (x[i * k + c].abs() * w[c].abs()) as f64)
                    .sum::<f64>(),
            );
        }
    }
    out
}

/// The int8 activation mode's extra bound per output (module docs).
fn int8_bound(spec: &KernelSpec, d: &Data, m: usize) -> Vec<f64> {
    let x = d.input("x");
    let k = x.len() / m.max(1);
    let rows = rows_f32(spec, d);
    let amax = |v: &[f32]| v.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
    let gl = match spec {
        KernelSpec::QGemm { group, .. } => wkvc_ir::quant::group_len(k, *group),
        _ => k,
    };
    let mut out = Vec::new();
    for i in 0..m {
        let xr = &x[i * k..][..k];
        for w in &rows {
            let mut e = 0f64;
            for c in 0..k {
                // activations are quantized per whole 32-column block of a group
                let start = c / gl * gl;
                let b0 = start + (c - start) / 32 * 32;
                if b0 + 32 > (start + gl).min(k) {
                    continue;
                }
                let dx = amax(&xr[b0..b0 + 32]) / 127.0;
                e += 0.5 * w[c].abs() as f64 * dx;
                if matches!(spec, KernelSpec::Logits { .. }) {
                    // the int8 table: its own block step
                    let dw = amax(&w[b0..b0 + 32]) / 127.0;
                    e += 0.5 * xr[c].abs() as f64 * dw + 0.25 * dx * dw;
                }
            }
            out.push(e * 1.0001);
        }
    }
    out
}

fn call<A: KernelArgs>(f: CpuKernel, a: &A) {
    // SAFETY: the argument struct of the kernel's kind, with buffers of the sizes it reads and
    // writes (the case's rows and columns).
    unsafe { f.call(a as *const A as *const u64) }
}

/// The spec on the CPU engine's kernel `f` (generated by Cranelift, or native).
fn run_cpu(f: CpuKernel, spec: &KernelSpec, d: &Data, m: usize) -> Vec<f32> {
    let n = spec.out_cols();
    let mut y = vec![f32::NAN; m * n];
    let yp = y.as_mut_ptr() as u64;
    let x = d.input("x");
    let r = d.input("r");
    match spec {
        KernelSpec::Embed { .. } => {
            let ids: Vec<i32> = match &d.inputs[0].1.data {
                wkvc_ir::TensorData::I32(v) => v.clone(),
                _ => unreachable!("embed takes ids"),
            };
            let Part::F32(t) = &d.parts[0] else {
                unreachable!("an f32 table")
            };
            call(
                f,
                &EmbedArgs {
                    ids: ids.as_ptr() as u64,
                    table: t.as_ptr() as u64,
                    y: yp,
                    m: m as u64,
                },
            );
        }
        KernelSpec::RmsNorm { .. } => {
            let Part::F32(w) = &d.parts[0] else {
                unreachable!("an f32 weight")
            };
            call(
                f,
                &RmsNormArgs {
                    x: x.as_ptr() as u64,
                    w: w.as_ptr() as u64,
                    y: yp,
                    m: m as u64,
                },
            );
        }
        KernelSpec::SiluMul { n } => {
            let gu = concat_halves(d.input("g"), d.input("u"), m, *n);
            call(
                f,
                &SiluMulArgs {
                    x: gu.as_ptr() as u64,
                    y: yp,
                    m: m as u64,
                },
            );
        }
        KernelSpec::QGemm {
            k,
            parts,
            group,
            act,
            ..
        } => {
            let k = *k;
            let gl = wkvc_ir::quant::group_len(k, *group);
            let ng = k.div_ceil(gl);
            let nb = (k / gl) * (gl / 32) + (k % gl) / 32;
            let (mut xp, mut xq) = (vec![0f32; m * k], vec![0i8; m * k]);
            let (mut dx, mut gs) = (vec![0f32; m * nb.max(1)], vec![0f32; m * ng]);
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
            let xpp = match act {
                Act::F32 => xp.as_ptr() as u64,
                Act::Int8 => xq.as_ptr() as u64,
            };
            let mut base = 0;
            for (p, &nj) in d.parts.iter().zip(parts) {
                let Part::Quant { packed, s, z, .. } = p else {
                    unreachable!("quantized parts")
                };
                let (ct, st, zt) = (
                    tile_codes(packed, nj, k, gl),
                    tile_params(s, nj, ng),
                    tile_params(z, nj, ng),
                );
                // two calls over a split of the part's rows, as two threads would
                for (n0, n1) in [(0, nj / 2), (nj / 2, nj)] {
                    call(
                        f,
                        &QGemmArgs {
                            x: x.as_ptr() as u64,
                            xp: xpp,
                            gsum: gs.as_ptr() as u64,
                            dx: dx.as_ptr() as u64,
                            m: m as u64,
                            w: ct.as_ptr() as u64,
                            s: st.as_ptr() as u64,
                            z: zt.as_ptr() as u64,
                            y: yp + 4 * base as u64,
                            ldy: n as u64,
                            n0: n0 as u64,
                            n1: n1 as u64,
                            r: if r.is_empty() {
                                0
                            } else {
                                r.as_ptr() as u64 + 4 * base as u64
                            },
                            ldr: n as u64,
                            ..Default::default()
                        },
                    );
                }
                base += nj;
            }
        }
        KernelSpec::Gemm { parts, .. } => {
            let mut base = 0;
            for (p, &nj) in d.parts.iter().zip(parts) {
                let Part::F32(w) = p else {
                    unreachable!("f32 parts")
                };
                for (n0, n1) in [(0, nj / 2), (nj / 2, nj)] {
                    call(
                        f,
                        &GemmArgs {
                            x: x.as_ptr() as u64,
                            m: m as u64,
                            w: w.as_ptr() as u64,
                            y: yp + 4 * base as u64,
                            ldy: n as u64,
                            n0: n0 as u64,
                            n1: n1 as u64,
                            r: if r.is_empty() {
                                0
                            } else {
                                r.as_ptr() as u64 + 4 * base as u64
                            },
                            ldr: n as u64,
                            ..Default::default()
                        },
                    );
                }
                base += nj;
            }
        }
        KernelSpec::Logits { vocab, dim, act } => {
            let Part::F32(w) = &d.parts[0] else {
                unreachable!("an f32 table")
            };
            let (vocab, dim) = (*vocab, *dim);
            let mut a = LogitsArgs {
                x: x.as_ptr() as u64,
                m: m as u64,
                w: w.as_ptr() as u64,
                y: yp,
                ldy: vocab as u64,
                n0: 0,
                n1: vocab as u64,
                ..Default::default()
            };
            // the int8 head: table and rows per block of 32, permuted like the GEMM prep
            let nb = dim / 32;
            let quant = |v: &[f32], rows: usize| {
                let (mut q, mut s) = (vec![0i8; rows * dim], vec![0f32; rows * nb]);
                for r in 0..rows {
                    prep_int8(
                        &v[r * dim..][..dim],
                        dim,
                        dim,
                        &mut q[r * dim..][..dim],
                        &mut s[r * nb..][..nb],
                        &mut [0f32],
                    );
                }
                (q, s)
            };
            let (wq, ws) = quant(w, vocab);
            let (xq, dx) = quant(x, m);
            if *act == Act::Int8 {
                a.xq = xq.as_ptr() as u64;
                a.dx = dx.as_ptr() as u64;
                a.wq = wq.as_ptr() as u64;
                a.ws = ws.as_ptr() as u64;
            }
            call(f, &a);
        }
        KernelSpec::RopeKv { .. } | KernelSpec::Attention { .. } => {
            unreachable!("stateful kinds are not in the table")
        }
    }
    y
}

fn concat_halves(g: &[f32], u: &[f32], m: usize, n: usize) -> Vec<f32> {
    (0..m)
        .flat_map(|i| g[i * n..][..n].iter().chain(&u[i * n..][..n]).copied())
        .collect()
}

/// Host memory standing for device memory: 16-byte aligned (the kernels' 128-bit loads).
struct HBuf(Vec<u128>);

impl HBuf {
    fn bytes(b: &[u8]) -> HBuf {
        let mut v = vec![0u128; b.len().div_ceil(16).max(1)];
        // SAFETY: v holds at least b.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), v.as_mut_ptr() as *mut u8, b.len()) };
        HBuf(v)
    }
    fn f32s(v: &[f32]) -> HBuf {
        HBuf::bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    }
    fn p(&self) -> u64 {
        self.0.as_ptr() as u64
    }
    fn read(&self, n: usize) -> Vec<f32> {
        // SAFETY: n floats within the buffer (the caller's output size).
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const f32, n) }.to_vec()
    }
}

fn launch<A: KernelArgs>(m: &HostModule, entry: usize, grid: (u32, u32, u32), block: u32, a: &A) {
    // SAFETY: the kernel's argument struct with host buffers of the sizes it reads and writes.
    unsafe { m.launch(entry, grid, (block, 1, 1), a.words()) }.expect("emulated launch");
}

/// The spec's CUDA C on the host emulator: every entry point that computes the plain kernel
/// (for the GEMMs: the GEMV when the rows fit it, the tiled kernel, the tensor-core one),
/// each with its name.
fn run_cuda(spec: &KernelSpec, d: &Data, m: usize) -> Vec<(String, Vec<f32>)> {
    let k = cuda::emit(spec).expect("CUDA C emits");
    let module = cuda_host::build(&k).expect("the host emulator builds the CUDA C");
    let n = spec.out_cols();
    let x = HBuf::f32s(d.input("x"));
    let r = HBuf::f32s(d.input("r"));
    let has_r = !d.input("r").is_empty();
    let mut out = Vec::new();
    match spec {
        KernelSpec::Embed { .. } => {
            let ids: Vec<u8> = match &d.inputs[0].1.data {
                wkvc_ir::TensorData::I32(v) => v.iter().flat_map(|i| i.to_le_bytes()).collect(),
                _ => unreachable!("embed takes ids"),
            };
            let Part::F32(t) = &d.parts[0] else {
                unreachable!("an f32 table")
            };
            let (ib, tb, y) = (
                HBuf::bytes(&ids),
                HBuf::f32s(t),
                HBuf::f32s(&vec![f32::NAN; m * n]),
            );
            let a = EmbedArgs {
                ids: ib.p(),
                table: tb.p(),
                y: y.p(),
                m: m as u64,
            };
            launch(&module, 0, (m as u32, 1, 1), 128, &a);
            out.push((k.entries[0].clone(), y.read(m * n)));
        }
        KernelSpec::RmsNorm { .. } => {
            let Part::F32(w) = &d.parts[0] else {
                unreachable!("an f32 weight")
            };
            let (wb, y) = (HBuf::f32s(w), HBuf::f32s(&vec![f32::NAN; m * n]));
            let a = RmsNormArgs {
                x: x.p(),
                w: wb.p(),
                y: y.p(),
                m: m as u64,
            };
            launch(&module, 0, (m as u32, 1, 1), cuda::BLOCK, &a);
            out.push((k.entries[0].clone(), y.read(m * n)));
        }
        KernelSpec::SiluMul { n } => {
            let gu = HBuf::f32s(&concat_halves(d.input("g"), d.input("u"), m, *n));
            let y = HBuf::f32s(&vec![f32::NAN; m * n]);
            let a = SiluMulArgs {
                x: gu.p(),
                y: y.p(),
                m: m as u64,
            };
            launch(&module, 0, (((m * n) as u32).div_ceil(256), 1, 1), 256, &a);
            out.push((k.entries[0].clone(), y.read(m * n)));
        }
        KernelSpec::QGemm { .. } | KernelSpec::Gemm { .. } | KernelSpec::Logits { .. } => {
            // the parts side by side, one launch (as the CUDA engine uploads them)
            let (mut w, mut s, mut z) = (Vec::new(), Vec::new(), Vec::new());
            for p in &d.parts {
                match p {
                    Part::Quant {
                        packed, s16, z16, ..
                    } => {
                        w.extend_from_slice(packed);
                        s.extend(s16.iter().flat_map(|v| v.to_le_bytes()));
                        z.extend(z16.iter().flat_map(|v| v.to_le_bytes()));
                    }
                    Part::F32(f) => w.extend(f.iter().flat_map(|v| v.to_le_bytes())),
                }
            }
            let (wb, sb, zb) = (HBuf::bytes(&w), HBuf::bytes(&s), HBuf::bytes(&z));
            for (e, name) in k.entries.iter().enumerate() {
                let (grid, block) = if name.ends_with("_gemv") {
                    if m as u32 > cuda::GEMV_MAX_M {
                        continue;
                    }
                    (
                        ((n as u32).div_ceil(cuda::GEMV_ROWS), 1, 1),
                        32 * cuda::GEMV_ROWS,
                    )
                } else if name.ends_with("_tiled") {
                    (
                        (
                            (n as u32).div_ceil(cuda::TILE_N),
                            (m as u32).div_ceil(cuda::TILE_M),
                            1,
                        ),
                        256,
                    )
                } else if name.ends_with("_mma") {
                    (
                        (
                            (n as u32).div_ceil(cuda::MMA_N),
                            (m as u32).div_ceil(cuda::MMA_M),
                            1,
                        ),
                        128,
                    )
                } else {
                    // the fused prologues (`_gemv_rms`, `_gemv_silu`): kernels.rs
                    continue;
                };
                let y = HBuf::f32s(&vec![f32::NAN; m * n]);
                let q = QGemmArgs {
                    x: x.p(),
                    m: m as u64,
                    w: wb.p(),
                    s: sb.p(),
                    z: zb.p(),
                    y: y.p(),
                    ldy: n as u64,
                    n1: n as u64,
                    r: if has_r { r.p() } else { 0 },
                    ldr: n as u64,
                    ..Default::default()
                };
                match spec {
                    KernelSpec::QGemm { .. } => launch(&module, e, grid, block, &q),
                    KernelSpec::Gemm { .. } => {
                        let a = GemmArgs {
                            x: q.x,
                            m: q.m,
                            w: q.w,
                            y: q.y,
                            ldy: q.ldy,
                            n1: q.n1,
                            r: q.r,
                            ldr: q.ldr,
                            ..Default::default()
                        };
                        launch(&module, e, grid, block, &a)
                    }
                    _ => {
                        let a = LogitsArgs {
                            x: q.x,
                            m: q.m,
                            w: q.w,
                            y: q.y,
                            ldy: q.ldy,
                            n1: q.n1,
                            ..Default::default()
                        };
                        launch(&module, e, grid, block, &a)
                    }
                }
                out.push((name.clone(), y.read(m * n)));
            }
        }
        KernelSpec::RopeKv { .. } | KernelSpec::Attention { .. } => {
            unreachable!("stateful kinds are not in the table")
        }
    }
    out
}

/// The bound for each output of `spec` on a back end (`cuda`: the CUDA C; `mma`: f16
/// operands).
fn bounds(spec: &KernelSpec, d: &Data, m: usize, want: &[f32], cuda: bool, mma: bool) -> Vec<f64> {
    let f32_sum = |k: usize, t: &[f64]| -> Vec<f64> {
        let r = d.input("r");
        t.iter()
            .enumerate()
            .map(|(o, v)| {
                4.0 * k as f64 * 2f64.powi(-24) * v
                    + r.get(o).map_or(0.0, |x| 2f64.powi(-23) * x.abs() as f64)
                    + 1e-6
            })
            .collect()
    };
    match spec {
        KernelSpec::Embed { .. } => vec![0.0; want.len()],
        KernelSpec::RmsNorm { dim, .. } => want
            .iter()
            .map(|v| {
                let rel = if cuda {
                    *dim as f64 * 2f64.powi(-24)
                } else {
                    0.0
                } + 4e-7;
                v.abs() as f64 * rel + 1e-7
            })
            .collect(),
        KernelSpec::SiluMul { .. } => want.iter().map(|v| v.abs() as f64 * 2e-6 + 1e-7).collect(),
        KernelSpec::QGemm { k, act, .. } | KernelSpec::Logits { dim: k, act, .. } => {
            let t = magnitudes(spec, d, m);
            let mut b = f32_sum(*k, &t);
            if mma {
                for (b, t) in b.iter_mut().zip(&t) {
                    *b += 1.1 * 2f64.powi(-10) * t;
                }
            }
            if *act == Act::Int8 && !cuda {
                for (b, e) in b.iter_mut().zip(int8_bound(spec, d, m)) {
                    *b += e;
                }
            }
            b
        }
        KernelSpec::Gemm { k, .. } => f32_sum(*k, &magnitudes(spec, d, m)),
        KernelSpec::RopeKv { .. } | KernelSpec::Attention { .. } => Vec::new(),
    }
}

/// The largest |got - want| relative to its bound (<= 1 passes).
fn worst(got: &[f32], want: &[f32], bound: &[f64]) -> (f64, usize) {
    assert_eq!(got.len(), want.len());
    let mut w = (0f64, 0usize);
    for (i, ((g, r), b)) in got.iter().zip(want).zip(bound).enumerate() {
        let d = (*g as f64 - *r as f64).abs();
        let q = if *b > 0.0 {
            d / b
        } else if d == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        if q > w.0 || q.is_nan() {
            w = (if q.is_nan() { f64::INFINITY } else { q }, i);
        }
    }
    w
}

#[test]
fn every_kernel_kind_on_every_back_end_matches_its_reference() {
    let mut jit = CpuJit::host().expect("host JIT");
    let mut rng = Rng(17);
    let mut failures = Vec::new();
    let mut count = 0;
    for (spec, m) in cases() {
        let d = data(&spec, m, &mut rng);
        let want = reference(&spec, &d);
        let (f, _) = jit.compile_kernel(&spec).expect("compiles");
        let mut runs = vec![(
            format!("cranelift {}", act_name(&spec)),
            run_cpu(CpuKernel::Jit(f), &spec, &d, m),
            false,
            false,
        )];
        // the native kernels of every ISA variant this host runs
        for isa in CpuIsa::available() {
            if let Some(f) = native::kernel(&spec, isa) {
                runs.push((
                    format!("native {} {}", isa.name(), act_name(&spec)),
                    run_cpu(f, &spec, &d, m),
                    false,
                    false,
                ));
            }
        }
        // the CUDA kernels have one activation mode (f32): run them once per shape
        if !matches!(
            spec,
            KernelSpec::QGemm { act: Act::Int8, .. } | KernelSpec::Logits { act: Act::Int8, .. }
        ) {
            for (name, y) in run_cuda(&spec, &d, m) {
                let mma = name.ends_with("_mma");
                runs.push((format!("cuda emulated {name}"), y, true, mma));
            }
        }
        for (backend, got, cuda, mma) in runs {
            let b = bounds(&spec, &d, m, &want, cuda, mma);
            let (q, at) = worst(&got, &want, &b);
            count += 1;
            eprintln!(
                "case {:<40} m {m:>2}  {backend:<44} worst |diff| / bound {q:.3}",
                spec.code_name()
            );
            if q > 1.0 {
                failures.push(format!(
                    "{} m {m} on {backend}: output {at}: got {}, want {}, bound {:e}",
                    spec.code_name(),
                    got[at],
                    want[at],
                    b[at]
                ));
            }
        }
    }
    eprintln!("{count} kernel runs against their references");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn act_name(spec: &KernelSpec) -> &'static str {
    match spec {
        KernelSpec::QGemm { act, .. } | KernelSpec::Logits { act, .. } => act.name(),
        _ => "f32",
    }
}

/// Int8 GEMMs (a residual and a partial tile; the demo's down projection; a tail of columns
/// past the last 32-column block and groups of 64) and the int8 head (a vocabulary that is
/// not a multiple of 4): the native kernels' checks below run on these.
fn int8_native_specs() -> Vec<KernelSpec> {
    vec![
        KernelSpec::QGemm {
            k: 576,
            parts: vec![37],
            bits: 4,
            group: 128,
            residual: true,
            act: Act::Int8,
        },
        KernelSpec::QGemm {
            k: 1536,
            parts: vec![64],
            bits: 4,
            group: 128,
            residual: false,
            act: Act::Int8,
        },
        KernelSpec::QGemm {
            k: 200,
            parts: vec![24],
            bits: 4,
            group: 64,
            residual: false,
            act: Act::Int8,
        },
        KernelSpec::Logits {
            vocab: 41,
            dim: 576,
            act: Act::Int8,
        },
    ]
}

/// The wider variants sum the int8 products by `vpdpbusd` instead of `vpmaddubsw` +
/// `vpmaddwd` (exact integers either way) and `avx512` holds two of the 256-bit registers in
/// one with each lane's operations unchanged, so their outputs equal the AVX2 kernels' bit
/// for bit: GEMMs with and without a tail of columns past the last 32-column block, and the
/// head.
#[test]
fn wider_kernels_give_the_avx2_bits() {
    let wider: Vec<CpuIsa> = CpuIsa::available()
        .into_iter()
        .filter(|i| !matches!(i, CpuIsa::Base | CpuIsa::Avx2))
        .collect();
    if wider.is_empty() {
        eprintln!(
            "SKIPPED: this CPU has no AVX-VNNI or AVX512-VNNI (runs {:?})",
            CpuIsa::available()
        );
        return;
    }
    let mut rng = Rng(31);
    let specs = int8_native_specs();
    let mut checked = 0;
    for &isa in &wider {
        for spec in &specs {
            let (Some(a), Some(b)) = (
                native::kernel(spec, CpuIsa::Avx2),
                native::kernel(spec, isa),
            ) else {
                panic!("{}: no native kernel on {}", spec.code_name(), isa.name());
            };
            for m in [1, 3, 4, 9] {
                let d = data(spec, m, &mut rng);
                let (ya, yb) = (run_cpu(a, spec, &d, m), run_cpu(b, spec, &d, m));
                assert_eq!(ya.len(), yb.len());
                for (i, (x, y)) in ya.iter().zip(&yb).enumerate() {
                    assert_eq!(
                        x.to_bits(),
                        y.to_bits(),
                        "{} m {m}: output {i}: avx2 {x} against {} {y}",
                        spec.code_name(),
                        isa.name()
                    );
                }
                checked += ya.len();
            }
        }
    }
    eprintln!("{checked} outputs of {wider:?} equal to avx2's");
}

/// The native kernels sum every output the same way whatever the rows of the call: each row
/// of a 7-row call (micro-tiles of 4 + 3 rows) equals, bit for bit, the row computed alone,
/// and a split of the columns at an odd place changes nothing (the CPU engine's batches and
/// thread splits rely on it).
#[test]
fn native_kernels_give_a_row_the_same_bits_alone_or_in_a_batch() {
    let mut rng = Rng(29);
    let specs = int8_native_specs();
    let mut checked = 0;
    for isa in CpuIsa::available() {
        for spec in &specs {
            let Some(f) = native::kernel(spec, isa) else {
                continue;
            };
            let m = 7;
            let d = data(spec, m, &mut rng);
            let all = run_cpu(f, spec, &d, m);
            let n = spec.out_cols();
            for i in 0..m {
                let mut one = d.clone();
                for (_, t) in one.inputs.iter_mut() {
                    if let Some(v) = t.as_f32() {
                        let c = v.len() / m;
                        *t = Tensor::f32(vec![1, c], v[i * c..][..c].to_vec());
                    }
                }
                let alone = run_cpu(f, spec, &one, 1);
                let same = alone
                    .iter()
                    .zip(&all[i * n..][..n])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{} on {}: row {i} alone differs",
                    spec.code_name(),
                    isa.name()
                );
                checked += 1;
            }
        }
    }
    if checked == 0 {
        eprintln!("SKIPPED native kernel checks: this CPU runs no native kernel variant");
    } else {
        eprintln!(
            "{checked} rows checked on the native kernels of {:?}",
            CpuIsa::available()
        );
    }
}
