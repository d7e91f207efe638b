//! Throughput of the CPU kernels on the demo model's shapes, one thread: bytes of weights
//! (or cache) read per second for the memory-bound kinds, and a memcpy of the same size as
//! the machine's reference bandwidth.
//!
//! The quantized GEMM runs on each kernel variant of the host (Cranelift, and the native
//! kernels of each ISA it supports).
//!
//!   cargo bench -p wkvc-codegen --bench kernels

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use wkvc_codegen::cpu::CpuJit;
use wkvc_codegen::kernels::{prep_f32, prep_int8, tile_codes, tile_params};
use wkvc_codegen::native::{self, CpuIsa, CpuKernel};
use wkvc_ir::kernel::args::{AttentionArgs, KernelArgs, LogitsArgs, QGemmArgs};
use wkvc_ir::{Act, KernelSpec};

fn call<A: KernelArgs>(f: CpuKernel, a: &A) {
    // SAFETY: the argument struct of each kind with buffers of the sizes the kernel uses.
    unsafe { f.call(a as *const A as *const u64) }
}

fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let mut jit = CpuJit::host().expect("host JIT");
    // reference: copy of 8 MiB (in and out counted)
    {
        let src = vec![1u8; 8 << 20];
        let mut dst = vec![0u8; 8 << 20];
        let mut g = c.benchmark_group("memcpy");
        g.throughput(Throughput::Bytes(2 * src.len() as u64));
        g.bench_function("8MiB", |b| b.iter(|| dst.copy_from_slice(black_box(&src))));
        g.finish();
    }
    // quantized GEMV/GEMM: gate|up of the demo model (n = 3072, k = 576) and down (k = 1536)
    for &(n, k) in &[(3072usize, 576usize), (576, 1536)] {
        let gl = 128;
        let ng = k.div_ceil(gl);
        let nb = k / 32;
        let codes: Vec<u8> = (0..n * k / 2).map(|i| (i * 37 % 251) as u8).collect();
        let codes = tile_codes(&codes, n, k, gl);
        let s = tile_params(&vec![0.01f32; n * ng], n, ng);
        let z = tile_params(&vec![8f32; n * ng], n, ng);
        for &m in &[1usize, 8, 64, 512] {
            let x = rnd(m * k, 3);
            let mut xp = vec![0f32; m * k];
            let mut xq = vec![0i8; m * k];
            let mut dx = vec![0f32; m * nb];
            let mut gs = vec![0f32; m * ng];
            let mut y = vec![0f32; m * n];
            for act in [Act::F32, Act::Int8] {
                for i in 0..m {
                    match act {
                        Act::F32 => prep_f32(
                            &x[i * k..][..k],
                            k,
                            gl,
                            &mut xp[i * k..][..k],
                            &mut gs[i * ng..][..ng],
                        ),
                        Act::Int8 => prep_int8(
                            &x[i * k..][..k],
                            k,
                            gl,
                            &mut xq[i * k..][..k],
                            &mut dx[i * nb..][..nb],
                            &mut gs[i * ng..][..ng],
                        ),
                    }
                }
                let spec = KernelSpec::QGemm {
                    k,
                    parts: vec![n],
                    bits: 4,
                    group: 128,
                    residual: false,
                    act,
                };
                let (f, _) = jit.compile_kernel(&spec).expect("compiles");
                let xpp = if act == Act::F32 {
                    xp.as_ptr() as u64
                } else {
                    xq.as_ptr() as u64
                };
                let args = QGemmArgs {
                    x: x.as_ptr() as u64,
                    xp: xpp,
                    gsum: gs.as_ptr() as u64,
                    dx: dx.as_ptr() as u64,
                    m: m as u64,
                    w: codes.as_ptr() as u64,
                    s: s.as_ptr() as u64,
                    z: z.as_ptr() as u64,
                    y: y.as_mut_ptr() as u64,
                    ldy: n as u64,
                    n0: 0,
                    n1: n as u64,
                    ..Default::default()
                };
                let mut g = c.benchmark_group(format!("qgemm_n{n}_k{k}_m{m}"));
                if m == 1 {
                    // GB/s of packed weights + scales/zeros (f32 copies)
                    g.throughput(Throughput::Bytes((n * k / 2 + 8 * n * ng) as u64));
                } else {
                    // multiply-adds (criterion prints elements/s: read as GMAC/s)
                    g.throughput(Throughput::Elements((m * n * k) as u64));
                }
                let f = CpuKernel::Jit(f);
                g.bench_function(act.name(), |b| b.iter(|| call(f, black_box(&args))));
                for isa in CpuIsa::available() {
                    if let Some(f) = native::kernel(&spec, isa) {
                        let name = format!("{}_{}", act.name(), isa.name());
                        g.bench_function(name, |b| b.iter(|| call(f, black_box(&args))));
                    }
                }
                g.finish();
            }
        }
    }
    // logits: f32 table vs int8 table (49152 x 576), one row
    {
        let (vocab, dim) = (49152usize, 576usize);
        let x = rnd(dim, 5);
        let mut y = vec![0f32; vocab];
        let table = rnd(vocab * dim, 7);
        let (f, _) = jit
            .compile_kernel(&KernelSpec::Logits {
                vocab,
                dim,
                act: Act::F32,
            })
            .expect("compiles");
        let f = CpuKernel::Jit(f);
        let a = LogitsArgs {
            x: x.as_ptr() as u64,
            m: 1,
            w: table.as_ptr() as u64,
            y: y.as_mut_ptr() as u64,
            ldy: vocab as u64,
            n0: 0,
            n1: vocab as u64,
            ..Default::default()
        };
        let mut g = c.benchmark_group("logits_49152x576");
        g.throughput(Throughput::Bytes((vocab * dim * 4) as u64));
        g.bench_function("f32", |b| b.iter(|| call(f, black_box(&a))));
        let wq: Vec<i8> = (0..vocab * dim).map(|i| (i % 251) as i8).collect();
        let ws = vec![0.01f32; vocab * dim / 32];
        let mut xq = vec![0i8; dim];
        let mut dx = vec![0f32; dim / 32];
        let mut gs = [0f32];
        prep_int8(&x, dim, dim, &mut xq, &mut dx, &mut gs);
        let (f8, _) = jit
            .compile_kernel(&KernelSpec::Logits {
                vocab,
                dim,
                act: Act::Int8,
            })
            .expect("compiles");
        let f8 = CpuKernel::Jit(f8);
        let a8 = LogitsArgs {
            xq: xq.as_ptr() as u64,
            dx: dx.as_ptr() as u64,
            m: 1,
            wq: wq.as_ptr() as u64,
            ws: ws.as_ptr() as u64,
            y: y.as_mut_ptr() as u64,
            ldy: vocab as u64,
            n0: 0,
            n1: vocab as u64,
            ..Default::default()
        };
        g.throughput(Throughput::Bytes((vocab * dim + vocab * dim / 8) as u64));
        g.bench_function("int8", |b| b.iter(|| call(f8, black_box(&a8))));
        let spec8 = KernelSpec::Logits {
            vocab,
            dim,
            act: Act::Int8,
        };
        for isa in CpuIsa::available() {
            if let Some(f) = native::kernel(&spec8, isa) {
                let name = format!("int8_{}", isa.name());
                g.bench_function(name, |b| b.iter(|| call(f, black_box(&a8))));
            }
        }
        g.finish();
    }
    // attention decode over a packed 4-bit cache: one query row, one kv head with its 3 query
    // heads (the demo model), 512 and 2048 past tokens
    for &ctx in &[512usize, 2048] {
        let (h, kvh, hd) = (9usize, 3usize, 64usize);
        let kw = kvh * hd;
        let rb = kw / 2;
        let kc: Vec<u8> = (0..ctx * rb).map(|i| (i * 29 % 251) as u8).collect();
        let vc = kc.clone();
        // a (scale, zero) word a token and kv head, as the engines store it
        let kp: Vec<u32> = vec![wkvc_ir::kvcache::pack_params(0.05, 7.0); ctx * kvh];
        let vp = kp.clone();
        let q = rnd(h * hd, 9);
        let mut out = vec![0f32; h * hd];
        let mut scr = vec![0f32; 4 * hd * 4];
        let sm = vec![1f32; kw];
        let spec = KernelSpec::Attention {
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            kv_bits: 4,
            past_only: true,
            smooth: true,
            layer: 0,
            kv_group: 0,
        };
        let (f, _) = jit.compile_kernel(&spec).expect("compiles");
        let kf = rnd(kw, 4);
        let vf = rnd(kw, 6);
        let f = CpuKernel::Jit(f);
        let a = AttentionArgs {
            q: q.as_ptr() as u64,
            kc: kc.as_ptr() as u64,
            kp: kp.as_ptr() as u64,
            vc: vc.as_ptr() as u64,
            vp: vp.as_ptr() as u64,
            nq: ctx as u64,
            kf: kf.as_ptr() as u64,
            vf: vf.as_ptr() as u64,
            ldf: kw as u64,
            f0: 0,
            f1: 1,
            g: 0,
            out: out.as_mut_ptr() as u64,
            scratch: scr.as_mut_ptr() as u64,
            ksh: sm.as_ptr() as u64,
            ksc: sm.as_ptr() as u64,
            vsh: sm.as_ptr() as u64,
            vsc: sm.as_ptr() as u64,
            ..Default::default()
        };
        let mut g = c.benchmark_group(format!("attention_decode_ctx{ctx}"));
        // the kv head's codes and (scale, zero) words read: K and V
        g.throughput(Throughput::Bytes((2 * ctx * (hd / 2 + 4)) as u64));
        g.bench_function("kv_head", |b| b.iter(|| call(f, black_box(&a))));
        g.finish();
    }
}

criterion_group!(name = kernels; config = Criterion::default().sample_size(20); targets = benches);
criterion_main!(kernels);
