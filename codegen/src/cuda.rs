//! CUDA C emitter: one translation unit per kernel spec of the lowered graph, every constant
//! of the spec folded in (widths, group, bits, head dim, GQA ratio, smoothing). Activations
//! are f32 and every sum accumulates in f32; weights and the KV cache keep the plan's formats
//! (packed int4 rows, f16 scale/zero; the cache as packed codes with f32 scale/zero per token
//! and kv head, like the CPU engine's). No header is included, so NVRTC needs no include path:
//! f16 conversions and the tensor-core product are PTX helpers (`h2f`, `f2h`, `pack_h2`,
//! `mma_16816`), left out under `WKVC_HOST_EMULATION`, where `crate::cuda_host` brings host
//! versions to run the same source on a CPU.
//!
//! Each kernel's launch is described by [`Launch`]; the argument lists are in the doc of
//! every `emit_*` function and in a comment at the top of the source.

use crate::CodegenError;
use std::fmt::Write;
use wkvc_ir::KernelSpec;

/// Threads per block of the row kernels.
pub const BLOCK: u32 = 256;
/// Output rows per block of the GEMV kernels (one warp each).
pub const GEMV_ROWS: u32 = 8;
/// Activation rows a GEMV launch handles (more: the tiled kernel).
pub const GEMV_MAX_M: u32 = 8;
/// Tile of the shared-memory GEMM: activation rows x output columns x depth.
pub const TILE_M: u32 = 32;
pub const TILE_N: u32 = 64;
pub const TILE_K: u32 = 32;
/// Tile of the tensor-core GEMM variant: activation rows x outputs per block.
pub const MMA_M: u32 = 64;
pub const MMA_N: u32 = 32;
/// Context tokens per block step of the attention split kernel (one per thread).
pub const ATTN_TILE: u32 = 128;

/// How a kernel's entry points are launched (`m` = activation rows of the call, `n` = output
/// columns of the part).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Launch {
    /// grid (m), block `block`
    PerRow { block: u32 },
    /// grid (ceil(m * n / 256)), block 256
    Elementwise,
    /// `{name}_gemv` for m <= GEMV_MAX_M: grid (ceil(n / GEMV_ROWS)), block 32 * GEMV_ROWS
    /// (also `{name}_gemv_rms`, fused with the RMSNorm before it, two more arguments: the
    /// norm's weight and eps as a float; and `{name}_gemv_silu`, fused with the SiLU-mul before
    /// it, x = [g | u] of width 2k);
    /// `{name}_tiled` otherwise: grid (ceil(n / TILE_N), ceil(m / TILE_M)), block 256; a
    /// quantized GEMM whose width and group are multiples of 16 also has `{name}_mma`
    /// (tensor cores): grid (ceil(n / MMA_N), ceil(m / MMA_M)), block 128
    Gemm,
    /// `{name}_split`: grid (splits, kv_heads, m), block ATTN_TILE, writing partial results
    /// to scratch; `{name}_merge`: grid (heads, m), block head_dim
    Attention { splits_max: u32 },
}

/// A kernel's CUDA C.
#[derive(Clone, Debug)]
pub struct CudaKernel {
    /// entry points (`extern "C"`)
    pub entries: Vec<String>,
    pub source: String,
    pub launch: Launch,
}

const PRELUDE: &str = r#"typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// the only PTX: f16 conversions and the tensor-core product (the host emulator, which runs
// this source on a CPU to check it, defines WKVC_HOST_EMULATION and brings its own)
#ifndef WKVC_HOST_EMULATION
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// two f32 as an f16x2 register, `lo` in the low half
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// d += a b for one warp: A 16 x 16 (row-major f16, a0..a3), B 16 x 8 (column-major f16,
// b0, b1), D 16 x 8 f32 (d0..d3), fragments as PTX's mma.m16n8k16
__device__ __forceinline__ void mma_16816(float& d0, float& d1, float& d2, float& d3, u32 a0,
        u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_min(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// sum (or max) over the block; `red` holds one float per warp; every thread gets the result
__device__ __forceinline__ float block_sum(float v, float* red) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    v = l < nw ? red[l] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* red) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    v = l < nw ? red[l] : -INFINITY;
    return warp_max(v);
}
"#;

/// The CUDA C of one kernel spec.
pub fn emit(spec: &KernelSpec) -> Result<CudaKernel, CodegenError> {
    let name = entry_base(spec);
    let mut s = String::new();
    // only what the code depends on (not the layer or the part widths): kernels with the same
    // source share one module, keyed by its hash
    let _ = writeln!(s, "// wkvc kernel {name}");
    s.push_str(PRELUDE);
    let (entries, launch) = match spec {
        KernelSpec::Embed { vocab, dim } => {
            emit_embed(&mut s, &name, *vocab, *dim);
            (vec![name.clone()], Launch::PerRow { block: 128 })
        }
        KernelSpec::RmsNorm { dim, eps } => {
            emit_rms(&mut s, &name, *dim, *eps);
            (vec![name.clone()], Launch::PerRow { block: BLOCK })
        }
        KernelSpec::SiluMul { n } => {
            emit_silu_mul(&mut s, &name, *n);
            (vec![name.clone()], Launch::Elementwise)
        }
        KernelSpec::QGemm {
            k,
            bits,
            group,
            residual,
            ..
        } => {
            let gl = crate::qgemm_group(*k, *bits, *group)?;
            emit_gemm(&mut s, &name, *k, Some(gl), *residual);
            let mut e = gemm_entries(&name);
            if mma_ok(*k, gl) {
                e.push(format!("{name}_mma"));
            }
            (e, Launch::Gemm)
        }
        KernelSpec::Gemm { k, residual, .. } => {
            emit_gemm(&mut s, &name, *k, None, *residual);
            (gemm_entries(&name), Launch::Gemm)
        }
        KernelSpec::Logits { dim, .. } => {
            // the tied f32 table (the CPU's int8 activation mode has no CUDA counterpart: the
            // GPU reads the table at f32)
            emit_gemm(&mut s, &name, *dim, None, false);
            (gemm_entries(&name), Launch::Gemm)
        }
        KernelSpec::RopeKv {
            heads,
            kv_heads,
            head_dim,
            rope_dim,
            kv_bits,
            smooth,
            ..
        } => {
            check_head_dim(*head_dim)?;
            emit_rope_kv(
                &mut s, &name, *heads, *kv_heads, *head_dim, *rope_dim, *kv_bits, *smooth,
            );
            (vec![name.clone()], Launch::PerRow { block: 128 })
        }
        KernelSpec::Attention {
            heads,
            kv_heads,
            head_dim,
            kv_bits,
            past_only,
            smooth,
            ..
        } => {
            check_head_dim(*head_dim)?;
            if !heads.is_multiple_of(*kv_heads) {
                return Err(CodegenError::Unsupported(format!(
                    "attention: {heads} heads are not a multiple of {kv_heads} kv heads"
                )));
            }
            emit_attention(
                &mut s, &name, *heads, *kv_heads, *head_dim, *kv_bits, *past_only, *smooth,
            );
            (
                vec![format!("{name}_split"), format!("{name}_merge")],
                Launch::Attention { splits_max: 64 },
            )
        }
    };
    Ok(CudaKernel {
        entries,
        source: s,
        launch,
    })
}

/// The entry points every GEMM kernel has (the tensor-core one is added where it applies).
fn gemm_entries(name: &str) -> Vec<String> {
    ["gemv", "tiled", "gemv_rms", "gemv_silu"]
        .iter()
        .map(|e| format!("{name}_{e}"))
        .collect()
}

/// The spec's code name as a C identifier (a per-channel group is `g-1` in code names).
pub fn entry_base(spec: &KernelSpec) -> String {
    spec.code_name().replace('-', "m")
}

fn check_head_dim(hd: usize) -> Result<(), CodegenError> {
    if !hd.is_multiple_of(32) || hd > 256 {
        return Err(CodegenError::Unsupported(format!(
            "the CUDA attention kernels need a head dim that is a multiple of 32 (at most 256), \
             got {hd}"
        )));
    }
    Ok(())
}

/// `(const int* ids, const float* table, float* y, int m)`: y[i] = table[ids[i]] (the ids are
/// checked by the host).
fn emit_embed(s: &mut String, name: &str, vocab: usize, dim: usize) {
    let _ = write!(
        s,
        r#"
#define VOCAB {vocab}
#define DIM {dim}
extern "C" __global__ void {name}(const int* __restrict__ ids, const float* __restrict__ table,
                                  float* __restrict__ y, int m) {{
    int i = blockIdx.x;
    if (i >= m) return;
    int id = ids[i];
    if (id < 0 || id >= VOCAB) return;
    const float* src = table + (size_t)id * DIM;
    for (int c = threadIdx.x; c < DIM; c += blockDim.x) y[(size_t)i * DIM + c] = src[c];
}}
"#
    );
}

/// `(const float* x, const float* w, float* y, int m)`: y = x / sqrt(mean(x^2) + eps) * w.
fn emit_rms(s: &mut String, name: &str, dim: usize, eps: f64) {
    let _ = write!(
        s,
        r#"
#define DIM {dim}
extern "C" __global__ void {name}(const float* __restrict__ x, const float* __restrict__ w,
                                  float* __restrict__ y, int m) {{
    __shared__ float red[32];
    int i = blockIdx.x;
    if (i >= m) return;
    const float* xr = x + (size_t)i * DIM;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < DIM; c += blockDim.x) ss = fmaf(xr[c], xr[c], ss);
    ss = block_sum(ss, red);
    float inv = (float)(1.0 / sqrt((double)ss / DIM + {eps:e}));
    for (int c = threadIdx.x; c < DIM; c += blockDim.x)
        y[(size_t)i * DIM + c] = xr[c] * inv * w[c];
}}
"#
    );
}

/// `(const float* gu, float* y, int m)`: y = g / (1 + e^-g) * u with gu = [g | u] per row.
fn emit_silu_mul(s: &mut String, name: &str, n: usize) {
    let _ = write!(
        s,
        r#"
#define N {n}
extern "C" __global__ void {name}(const float* __restrict__ gu, float* __restrict__ y, int m) {{
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)m * N) return;
    size_t i = t / N, c = t % N;
    float g = gu[i * 2 * N + c], u = gu[i * 2 * N + N + c];
    y[t] = g / (1.0f + expf(-g)) * u;
}}
"#
    );
}

/// GEMM against quantized rows (`gl` = Some(group length): packed int4 codes `k / 2` bytes per
/// row, low nibble first, f16 scale and zero per (row, group)) or f32 rows (`gl` = None):
/// `(const float* x, int m, const void* w, const u16* s, const u16* z, float* y, int ldy,
/// int n, const float* r, int ldr)` computes y[i, j] (+= r[i, j]) = x[i] . w[j] for the part's
/// n rows (s, z unused for f32 rows, r unused without residual).
fn emit_gemm(s: &mut String, name: &str, k: usize, gl: Option<usize>, residual: bool) {
    let quant = gl.is_some();
    let gl = gl.unwrap_or(k);
    let ng = k.div_ceil(gl);
    // 16-byte loads of 32 codes when whole 32-column blocks never straddle a group and rows
    // stay 16-byte aligned
    let vec = k.is_multiple_of(32) && gl.is_multiple_of(32);
    let _ = write!(
        s,
        r#"
#define K {k}
#define GL {gl}
#define NG {ng}
#define QUANT {quant}
#define VEC {vec}
#define RESIDUAL {residual}
#define MAXM {maxm}

// weight (row j, column c) as f32
__device__ __forceinline__ float wval(const void* w, const u16* s, const u16* z, int j, int c) {{
#if QUANT
    u8 b = ((const u8*)w)[(size_t)j * (K / 2) + c / 2];
    float q = (float)((c & 1) ? (b >> 4) : (b & 15));
    int g = c / GL;
    return h2f(s[(size_t)j * NG + g]) * (q - h2f(z[(size_t)j * NG + g]));
#else
    return ((const float*)w)[(size_t)j * K + c];
#endif
}}

__device__ __forceinline__ void store(float v, float* y, int ldy, const float* r, int ldr, int i, int j) {{
#if RESIDUAL
    v += r[(size_t)i * ldr + j];
#endif
    y[(size_t)i * ldy + j] = v;
}}

// The activations a GEMV reads, through its prologue PRO: 0 = x itself ([m, K]); 1 = the
// RMSNorm of x without its 1/rms factor, x * nw (the GEMV scales its sums by 1/rms at the
// end), summing x^2 into *ss; 2 = SiLU-mul of x = [g | u] ([m, 2K]): g / (1 + e^-g) * u.
template <int PRO>
__device__ __forceinline__ float4 ld4(const float* x, const float* nw, int i, int c, float* ss) {{
    if (PRO == 2) {{
        float4 g = *(const float4*)(x + (size_t)i * 2 * K + c);
        float4 u = *(const float4*)(x + (size_t)i * 2 * K + K + c);
        return make_float4(g.x / (1.0f + expf(-g.x)) * u.x, g.y / (1.0f + expf(-g.y)) * u.y,
                           g.z / (1.0f + expf(-g.z)) * u.z, g.w / (1.0f + expf(-g.w)) * u.w);
    }}
    float4 v = *(const float4*)(x + (size_t)i * K + c);
    if (PRO == 1) {{
        float4 a = *(const float4*)(nw + c);
        *ss = fmaf(v.x, v.x, fmaf(v.y, v.y, fmaf(v.z, v.z, fmaf(v.w, v.w, *ss))));
        v = make_float4(v.x * a.x, v.y * a.y, v.z * a.z, v.w * a.w);
    }}
    return v;
}}
template <int PRO>
__device__ __forceinline__ float ld1(const float* x, const float* nw, int i, int c, float* ss) {{
    if (PRO == 2) {{
        float g = x[(size_t)i * 2 * K + c], u = x[(size_t)i * 2 * K + K + c];
        return g / (1.0f + expf(-g)) * u;
    }}
    float v = x[(size_t)i * K + c];
    if (PRO == 1) {{
        *ss = fmaf(v, v, *ss);
        v *= nw[c];
    }}
    return v;
}}

// one warp per weight row, all (up to MAXM) activation rows at once: each weight is read once
template <int PRO>
__device__ __forceinline__ void gemv(const float* __restrict__ x, int m, const void* __restrict__ w,
        const u16* __restrict__ s, const u16* __restrict__ z, float* __restrict__ y, int ldy, int n,
        const float* __restrict__ r, int ldr, const float* __restrict__ nw, float eps) {{
    int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (j >= n) return;
    float acc[MAXM], ss[MAXM];
#pragma unroll
    for (int i = 0; i < MAXM; i++) {{ acc[i] = 0.0f; ss[i] = 0.0f; }}
#if QUANT && VEC
    // lane takes 32-column blocks: 16 bytes of codes, one 128-bit load; dequantized in
    // registers as s * (x.q - z * sum x)
    const uint4* wr = (const uint4*)((const u8*)w + (size_t)j * (K / 2));
    for (int b = lane; b < K / 32; b += 32) {{
        uint4 q4 = __ldg(wr + b);
        u32 words[4] = {{q4.x, q4.y, q4.z, q4.w}};
        int g = b * 32 / GL;
        float sg = h2f(s[(size_t)j * NG + g]), zg = h2f(z[(size_t)j * NG + g]);
#pragma unroll
        for (int i = 0; i < MAXM; i++) {{
            if (i >= m) break;
            float d = 0.0f, sx = 0.0f;
#pragma unroll
            for (int t = 0; t < 4; t++) {{
                u32 wd = words[t];
                float4 xa = ld4<PRO>(x, nw, i, b * 32 + 8 * t, &ss[i]);
                float4 xb = ld4<PRO>(x, nw, i, b * 32 + 8 * t + 4, &ss[i]);
                d = fmaf((float)(wd & 15), xa.x, d);
                d = fmaf((float)((wd >> 4) & 15), xa.y, d);
                d = fmaf((float)((wd >> 8) & 15), xa.z, d);
                d = fmaf((float)((wd >> 12) & 15), xa.w, d);
                d = fmaf((float)((wd >> 16) & 15), xb.x, d);
                d = fmaf((float)((wd >> 20) & 15), xb.y, d);
                d = fmaf((float)((wd >> 24) & 15), xb.z, d);
                d = fmaf((float)(wd >> 28), xb.w, d);
                sx += (xa.x + xa.y) + (xa.z + xa.w) + (xb.x + xb.y) + (xb.z + xb.w);
            }}
            acc[i] = fmaf(sg, d - zg * sx, acc[i]);
        }}
    }}
#elif !QUANT && (K % 4 == 0)
    const float4* wr = (const float4*)((const float*)w + (size_t)j * K);
    for (int c = lane; c < K / 4; c += 32) {{
        float4 wv = __ldg(wr + c);
#pragma unroll
        for (int i = 0; i < MAXM; i++) {{
            if (i >= m) break;
            float4 xv = ld4<PRO>(x, nw, i, 4 * c, &ss[i]);
            acc[i] = fmaf(wv.x, xv.x, fmaf(wv.y, xv.y, fmaf(wv.z, xv.z, fmaf(wv.w, xv.w, acc[i]))));
        }}
    }}
#else
    for (int c = lane; c < K; c += 32) {{
        float wv = wval(w, s, z, j, c);
#pragma unroll
        for (int i = 0; i < MAXM; i++) {{
            if (i >= m) break;
            acc[i] = fmaf(wv, ld1<PRO>(x, nw, i, c, &ss[i]), acc[i]);
        }}
    }}
#endif
#pragma unroll
    for (int i = 0; i < MAXM; i++) {{
        if (i >= m) break;
        float v = warp_sum(acc[i]);
        if (PRO == 1) {{
            // the RMSNorm's factor, as the rms_norm kernel computes it
            float t = warp_sum(ss[i]);
            v *= (float)(1.0 / sqrt((double)t / K + (double)eps));
        }}
        if (lane == 0) store(v, y, ldy, r, ldr, i, j);
    }}
}}

extern "C" __global__ void {name}_gemv(const float* __restrict__ x, int m, const void* __restrict__ w,
        const u16* __restrict__ s, const u16* __restrict__ z, float* __restrict__ y, int ldy, int n,
        const float* __restrict__ r, int ldr) {{
    gemv<0>(x, m, w, s, z, y, ldy, n, r, ldr, 0, 0.0f);
}}
// fused with the RMSNorm before it: x is the norm's input, nw its weight
extern "C" __global__ void {name}_gemv_rms(const float* __restrict__ x, int m,
        const void* __restrict__ w, const u16* __restrict__ s, const u16* __restrict__ z,
        float* __restrict__ y, int ldy, int n, const float* __restrict__ r, int ldr,
        const float* __restrict__ nw, float eps) {{
    gemv<1>(x, m, w, s, z, y, ldy, n, r, ldr, nw, eps);
}}
// fused with the SiLU-mul before it: x is its input [g | u]
extern "C" __global__ void {name}_gemv_silu(const float* __restrict__ x, int m,
        const void* __restrict__ w, const u16* __restrict__ s, const u16* __restrict__ z,
        float* __restrict__ y, int ldy, int n, const float* __restrict__ r, int ldr) {{
    gemv<2>(x, m, w, s, z, y, ldy, n, r, ldr, 0, 0.0f);
}}

// shared-memory tiles: TM activation rows x TN weight rows, TK columns per step; weights
// dequantized once per tile into shared memory; each thread computes 2 x 4 outputs
#define TM {tm}
#define TN {tn}
#define TK {tk}
extern "C" __global__ void __launch_bounds__(256) {name}_tiled(const float* __restrict__ x, int m,
        const void* __restrict__ w, const u16* __restrict__ s, const u16* __restrict__ z,
        float* __restrict__ y, int ldy, int n, const float* __restrict__ r, int ldr) {{
    __shared__ float xs[TK][TM + 1];
    __shared__ float ws[TK][TN + 1];
    int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    int i0 = blockIdx.y * TM, j0 = blockIdx.x * TN;
    float acc[2][4] = {{{{0.0f}}}};
    for (int k0 = 0; k0 < K; k0 += TK) {{
        for (int e = tid; e < TM * TK; e += 256) {{
            int ri = e / TK, c = e % TK;
            int i = i0 + ri, col = k0 + c;
            xs[c][ri] = (i < m && col < K) ? x[(size_t)i * K + col] : 0.0f;
        }}
        for (int e = tid; e < TN * TK; e += 256) {{
            int rj = e / TK, c = e % TK;
            int j = j0 + rj, col = k0 + c;
            ws[c][rj] = (j < n && col < K) ? wval(w, s, z, j, col) : 0.0f;
        }}
        __syncthreads();
#pragma unroll 8
        for (int c = 0; c < TK; c++) {{
            float a0 = xs[c][ty * 2], a1 = xs[c][ty * 2 + 1];
#pragma unroll
            for (int u = 0; u < 4; u++) {{
                float b = ws[c][tx * 4 + u];
                acc[0][u] = fmaf(a0, b, acc[0][u]);
                acc[1][u] = fmaf(a1, b, acc[1][u]);
            }}
        }}
        __syncthreads();
    }}
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int u = 0; u < 4; u++) {{
            int i = i0 + ty * 2 + a, j = j0 + tx * 4 + u;
            if (i < m && j < n) store(acc[a][u], y, ldy, r, ldr, i, j);
        }}
}}
"#,
        quant = quant as u8,
        vec = vec as u8,
        residual = residual as u8,
        maxm = GEMV_MAX_M,
        tm = TILE_M,
        tn = TILE_N,
        tk = TILE_K,
    );
    if quant && mma_ok(k, gl) {
        emit_qgemm_mma(s, name);
    }
}

/// Whether a quantized GEMM gets the tensor-core variant (`{name}_mma`): 16-column steps
/// that never straddle a group.
pub fn mma_ok(k: usize, gl: usize) -> bool {
    k.is_multiple_of(16) && gl.is_multiple_of(16)
}

/// The tensor-core variant of the quantized GEMM (sm_80 and later), same arguments as
/// `{name}_tiled`: `mma.sync.m16n8k16` with f16 operands and f32 accumulation; activations
/// rounded to f16 pairs, weights dequantized in registers (s * (q - z), then f16). A warp
/// computes 16 activation rows x 32 outputs; a block of 4 warps 64 x 32. Grid
/// (ceil(n / MMA_N), ceil(m / MMA_M)), block 128.
fn emit_qgemm_mma(s: &mut String, name: &str) {
    let _ = write!(
        s,
        r#"
#define MMA_M {mm}
#define MMA_N {mn}
// activations (row i, columns c and c + 1)
__device__ __forceinline__ u32 xpair(const float* x, int m, int i, int c) {{
    if (i >= m) return 0u;
    const float* p = x + (size_t)i * K + c;
    return pack_h2(p[0], p[1]);
}}
// weights (row j, columns c and c + 1: one byte of codes), dequantized
__device__ __forceinline__ u32 wpair(const void* w, const u16* s, const u16* z, int n, int j, int c) {{
    if (j >= n) return 0u;
    u8 b = ((const u8*)w)[(size_t)j * (K / 2) + c / 2];
    int g = c / GL;
    float sc = h2f(s[(size_t)j * NG + g]), zz = h2f(z[(size_t)j * NG + g]);
    return pack_h2(sc * ((float)(b & 15) - zz), sc * ((float)(b >> 4) - zz));
}}
extern "C" __global__ void __launch_bounds__(128) {name}_mma(const float* __restrict__ x, int m,
        const void* __restrict__ w, const u16* __restrict__ s, const u16* __restrict__ z,
        float* __restrict__ y, int ldy, int n, const float* __restrict__ r, int ldr) {{
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int g = lane >> 2, t = lane & 3;
    int i0 = blockIdx.y * MMA_M + warp * 16, j0 = blockIdx.x * MMA_N;
    float c[4][4] = {{{{0.0f}}}};
    for (int k0 = 0; k0 < K; k0 += 16) {{
        // fragment of A (16 x 16, row-major): rows g and g + 8, columns 2t, 2t + 8 (+1)
        u32 a0 = xpair(x, m, i0 + g, k0 + 2 * t);
        u32 a1 = xpair(x, m, i0 + g + 8, k0 + 2 * t);
        u32 a2 = xpair(x, m, i0 + g, k0 + 2 * t + 8);
        u32 a3 = xpair(x, m, i0 + g + 8, k0 + 2 * t + 8);
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {{
            // fragment of B (16 x 8, column-major = weight rows): column g, rows 2t, 2t + 8 (+1)
            int j = j0 + nt * 8 + g;
            u32 b0 = wpair(w, s, z, n, j, k0 + 2 * t);
            u32 b1 = wpair(w, s, z, n, j, k0 + 2 * t + 8);
            mma_16816(c[nt][0], c[nt][1], c[nt][2], c[nt][3], a0, a1, a2, a3, b0, b1);
        }}
    }}
    // C (16 x 8 per n tile): rows g and g + 8, columns 2t and 2t + 1
#pragma unroll
    for (int nt = 0; nt < 4; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {{
            int i = i0 + g + 8 * (e >> 1), j = j0 + nt * 8 + 2 * t + (e & 1);
            if (i < m && j < n) store(c[nt][e], y, ldy, r, ldr, i, j);
        }}
}}
"#,
        mm = MMA_M,
        mn = MMA_N,
    );
}

/// `(float* x, int m, const int* pos, const float* inv_freq, u8* kc, float* kp, u8* vc,
/// float* vp, const int* state, const float* ksh, const float* ksc, const float* vsh,
/// const float* vsc)` (state[0] = cached tokens: row i goes to cache row state[0] + i; kept in
/// device memory so that a captured decode graph replays unchanged):
/// RoPE (rotate-half, angle pos * inv_freq in f32, its cos/sin in f64) on the q and k heads of
/// each row in place, then K and V of row i appended at cache row row0 + i: smoothed
/// ((x - shift) / scale), per (token, kv head) min/max, scale rounded up to an f16, zero
/// round-half-even, codes clamped and packed two per byte (low nibble = even channel); a
/// 16-bit cache stores the f32 rows in kp/vp instead.
#[allow(clippy::too_many_arguments)]
fn emit_rope_kv(
    s: &mut String,
    name: &str,
    heads: usize,
    kvh: usize,
    hd: usize,
    rd: usize,
    bits: u32,
    smooth: bool,
) {
    let _ = write!(
        s,
        r#"
#define HEADS {heads}
#define KVH {kvh}
#define HD {hd}
#define HALF {half}
#define WIDTH {width}
#define BITS {bits}
#define SMOOTH {smooth}
#define PPL {ppl}
extern "C" __global__ void {name}(float* __restrict__ x, int m, const int* __restrict__ pos,
        const float* __restrict__ inv_freq, u8* __restrict__ kc, float* __restrict__ kp,
        u8* __restrict__ vc, float* __restrict__ vp, const int* __restrict__ state,
        const float* __restrict__ ksh,
        const float* __restrict__ ksc, const float* __restrict__ vsh, const float* __restrict__ vsc) {{
    int i = blockIdx.x;
    if (i >= m) return;
    float* xr = x + (size_t)i * WIDTH;
    for (int e = threadIdx.x; e < (HEADS + KVH) * HALF; e += blockDim.x) {{
        int h = e / HALF, j = e % HALF;
        float ang = (float)pos[i] * inv_freq[j];
        float c = (float)cos((double)ang), sn = (float)sin((double)ang);
        float a = xr[h * HD + j], b = xr[h * HD + j + HALF];
        xr[h * HD + j] = a * c - b * sn;
        xr[h * HD + j + HALF] = b * c + a * sn;
    }}
    __syncthreads();
    size_t row = (size_t)state[0] + i;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // one warp per (K or V, kv head)
    for (int item = warp; item < 2 * KVH; item += blockDim.x >> 5) {{
        int t = item / KVH, g = item % KVH;
        const float* src = xr + (HEADS + t * KVH) * HD + g * HD;
#if BITS == 16
        float* dst = (t ? vp : kp) + row * (KVH * HD) + g * HD;
        for (int c = lane; c < HD; c += 32) dst[c] = src[c];
#else
        const float* sh = t ? vsh : ksh;
        const float* sc = t ? vsc : ksc;
        // lane takes the channel pairs (2 p, 2 p + 1), p = lane + 32 u: one byte of codes each
        float v[2 * PPL];
        float mn = INFINITY, mx = -INFINITY;
#pragma unroll
        for (int u = 0; u < PPL; u++) {{
            int p = lane + 32 * u;
            v[2 * u] = 0.0f;
            v[2 * u + 1] = 0.0f;
            if (p < HD / 2) {{
#pragma unroll
                for (int e = 0; e < 2; e++) {{
                    int c = 2 * p + e;
                    float a = src[c];
#if SMOOTH
                    a = (a - sh[g * HD + c]) / sc[g * HD + c];
#endif
                    v[2 * u + e] = a;
                    mn = fminf(mn, a);
                    mx = fmaxf(mx, a);
                }}
            }}
        }}
        mn = warp_min(mn);
        mx = warp_max(mx);
        const float qmax = (float)((1 << BITS) - 1);
        float st = fmaxf((mx - mn) / qmax, 1e-8f);
        u16 h = f2h(st);
        float sf = h2f(h);
        if (sf < st) sf = h2f((u16)(h + 1));
        float zf = fminf(fmaxf(rintf(-mn / sf), -2048.0f), 2048.0f);
        u8* crow = (t ? vc : kc) + row * (KVH * HD / 2) + g * (HD / 2);
#pragma unroll
        for (int u = 0; u < PPL; u++) {{
            int p = lane + 32 * u;
            if (p < HD / 2) {{
                float q0 = fminf(fmaxf(rintf(v[2 * u] / sf) + zf, 0.0f), qmax);
                float q1 = fminf(fmaxf(rintf(v[2 * u + 1] / sf) + zf, 0.0f), qmax);
                crow[p] = (u8)((int)q0 | ((int)q1 << 4));
            }}
        }}
        if (lane == 0) {{
            float* prm = (t ? vp : kp) + (row * KVH + g) * 2;
            prm[0] = sf;
            prm[1] = zf;
        }}
#endif
    }}
}}
"#,
        half = rd / 2,
        width = (heads + 2 * kvh) * hd,
        ppl = (hd / 2).div_ceil(32),
        smooth = smooth as u8,
    );
}

/// Attention over the cache and the chunk's own rows, split over the context
/// (flash-decoding). `{name}_split(const float* x, int m, const u8* kc, const float* kp,
/// const u8* vc, const float* vp, const int* state, int decode, const float* ksh, const float* ksc,
/// const float* vsh, const float* vsc, float* part, int splits)`: block (split, kv head g,
/// row i) takes its share of the row's tokens: the packed past with the per-token scale/zero
/// algebra (q' = q * k_scale; score = s (q'.codes - z sum q') + q . k_shift), then the FP
/// rows, online softmax per query head, V accumulated on codes and un-smoothed at the end;
/// writes (max, sum, unnormalised out[head_dim]) per query head to `part`.
/// `{name}_merge(const float* part, int splits, float* out, int m)` combines the splits.
/// Which tokens row i sees (past = state[0], the cached tokens before the chunk; `decode` = the
/// decode-equivalent protocol): a 16-bit cache: cache rows 0..past+i+1 in FP; not past-only:
/// past+i+1 packed tokens; past-only: past (prefill protocol) or past+i (decode) packed
/// tokens, then the chunk's rows 0..i+1 (prefill) or i..i+1 (decode) in FP.
#[allow(clippy::too_many_arguments)]
fn emit_attention(
    s: &mut String,
    name: &str,
    heads: usize,
    kvh: usize,
    hd: usize,
    bits: u32,
    past_only: bool,
    smooth: bool,
) {
    let group = heads / kvh;
    let accs = (group * hd).div_ceil(ATTN_TILE as usize);
    let _ = write!(
        s,
        r#"
#define HEADS {heads}
#define KVH {kvh}
#define GROUP {group}
#define HD {hd}
#define WIDTH {width}
#define BITS {bits}
#define PAST_ONLY {past_only}
#define SMOOTH {smooth}
#define TILE {tile}
#define ACCS {accs}
#define SCALE {scale:e}f
#define PART (GROUP * (HD + 2))

extern "C" __global__ void __launch_bounds__(TILE) {name}_split(const float* __restrict__ x, int m,
        const u8* __restrict__ kc, const float* __restrict__ kp, const u8* __restrict__ vc,
        const float* __restrict__ vp, const int* __restrict__ state, int decode,
        const float* __restrict__ ksh,
        const float* __restrict__ ksc, const float* __restrict__ vsh, const float* __restrict__ vsc,
        float* __restrict__ part, int splits) {{
    __shared__ float qr[GROUP][HD];   // q (for FP rows)
    __shared__ float qs[GROUP][HD];   // q' = q * k_scale (for packed rows)
    __shared__ float q1[GROUP], q2[GROUP];
    __shared__ float sc[GROUP][TILE]; // scores, then p
    __shared__ float tvs[TILE], tvz[TILE];
    __shared__ float cf[GROUP];
    __shared__ float red[32];
    int sidx = blockIdx.x, g = blockIdx.y, i = blockIdx.z, tid = threadIdx.x;
    if (i >= m) return;
    int past = state[0];
    const float* xr = x + (size_t)i * WIDTH;
    // the row's tokens: nq packed, then FP rows f0..f1 (kf/vf with stride ldf)
    int nq, f0, f1, ldf;
    const float *kf, *vf;
#if BITS == 16
    nq = 0; f0 = 0; f1 = past + i + 1; kf = kp; vf = vp; ldf = KVH * HD;
#elif !PAST_ONLY
    nq = past + i + 1; f0 = 0; f1 = 0; kf = 0; vf = 0; ldf = 0;
#else
    nq = decode ? past + i : past;
    f0 = decode ? i : 0;
    f1 = i + 1;
    kf = x + HEADS * HD; vf = x + (HEADS + KVH) * HD; ldf = WIDTH;
#endif
    int total = nq + (f1 - f0);
    int per = (total + splits - 1) / splits;
    int t0 = sidx * per, t1 = min(total, t0 + per);
    for (int e = tid; e < GROUP * HD; e += TILE) {{
        int h = e / HD, c = e % HD;
        float q = xr[(g * GROUP + h) * HD + c];
        qr[h][c] = q;
#if SMOOTH
        qs[h][c] = q * ksc[g * HD + c];
#else
        qs[h][c] = q;
#endif
    }}
    __syncthreads();
    if (tid < GROUP) {{
        float a = 0.0f, b = 0.0f;
        for (int c = 0; c < HD; c++) {{
            a += qs[tid][c];
#if SMOOTH
            b = fmaf(qr[tid][c], ksh[g * HD + c], b);
#endif
        }}
        q1[tid] = a;
        q2[tid] = b;
    }}
    float mh[GROUP], lh[GROUP], ph[GROUP];
#pragma unroll
    for (int h = 0; h < GROUP; h++) {{ mh[h] = -INFINITY; lh[h] = 0.0f; ph[h] = 0.0f; }}
    float aq[ACCS], af[ACCS];
#pragma unroll
    for (int a = 0; a < ACCS; a++) {{ aq[a] = 0.0f; af[a] = 0.0f; }}
    __syncthreads();
    for (int j0 = t0; j0 < t1; j0 += TILE) {{
        int j = j0 + tid;
        bool live = j < t1;
        bool packed = live && j < nq;
        float score[GROUP];
#pragma unroll
        for (int h = 0; h < GROUP; h++) score[h] = -INFINITY;
        if (packed) {{
#if BITS != 16
            const uint4* kr = (const uint4*)(kc + (size_t)j * (KVH * HD / 2) + g * (HD / 2));
            float ks = kp[((size_t)j * KVH + g) * 2], kz = kp[((size_t)j * KVH + g) * 2 + 1];
            float d[GROUP];
#pragma unroll
            for (int h = 0; h < GROUP; h++) d[h] = 0.0f;
#pragma unroll
            for (int b = 0; b < HD / 32; b++) {{
                uint4 q4 = kr[b];
                u32 words[4] = {{q4.x, q4.y, q4.z, q4.w}};
#pragma unroll
                for (int t = 0; t < 4; t++)
#pragma unroll
                    for (int u = 0; u < 8; u++) {{
                        float cv = (float)((words[t] >> (4 * u)) & 15);
                        int c = 32 * b + 8 * t + u;
#pragma unroll
                        for (int h = 0; h < GROUP; h++) d[h] = fmaf(cv, qs[h][c], d[h]);
                    }}
            }}
#pragma unroll
            for (int h = 0; h < GROUP; h++) score[h] = (ks * (d[h] - kz * q1[h]) + q2[h]) * SCALE;
            tvs[tid] = vp[((size_t)j * KVH + g) * 2];
            tvz[tid] = vp[((size_t)j * KVH + g) * 2 + 1];
#endif
        }} else if (live) {{
            const float* kr = kf + (size_t)(f0 + j - nq) * ldf + g * HD;
#pragma unroll
            for (int h = 0; h < GROUP; h++) {{
                float d = 0.0f;
                for (int c = 0; c < HD; c++) d = fmaf(qr[h][c], kr[c], d);
                score[h] = d * SCALE;
            }}
        }}
        // online softmax over the tile, per query head
#pragma unroll
        for (int h = 0; h < GROUP; h++) {{
            float mx = block_max(score[h], red);
            float mnew = fmaxf(mh[h], mx);
            float p = live ? expf(score[h] - mnew) : 0.0f;
            float corr = mh[h] == -INFINITY ? 0.0f : expf(mh[h] - mnew);
            float sum = block_sum(p, red);
            float sumq = block_sum(packed ? p : 0.0f, red);
            lh[h] = lh[h] * corr + sum;
            ph[h] = ph[h] * corr + sumq;
            mh[h] = mnew;
            sc[h][tid] = p;
            if (tid == 0) cf[h] = corr;
        }}
        __syncthreads();
        // V: thread takes (head, channel) pairs
        int n = min(TILE, t1 - j0);
#pragma unroll
        for (int a = 0; a < ACCS; a++) {{
            int e = tid + a * TILE;
            if (e >= GROUP * HD) break;
            int h = e / HD, c = e % HD;
            float corr = cf[h];
            float accq = aq[a] * corr, accf = af[a] * corr;
            for (int t = 0; t < n; t++) {{
                int jj = j0 + t;
                float p = sc[h][t];
                if (jj < nq) {{
#if BITS != 16
                    u8 b = vc[(size_t)jj * (KVH * HD / 2) + g * (HD / 2) + c / 2];
                    float code = (float)((c & 1) ? (b >> 4) : (b & 15));
                    accq = fmaf(p * tvs[t], code - tvz[t], accq);
#endif
                }} else {{
                    accf = fmaf(p, vf[(size_t)(f0 + jj - nq) * ldf + g * HD + c], accf);
                }}
            }}
            aq[a] = accq;
            af[a] = accf;
        }}
        __syncthreads();
    }}
    // per-head values to shared memory (indexing the register arrays by a thread-dependent
    // head would put them in local memory)
    __shared__ float fm[GROUP], fl[GROUP], fp[GROUP];
    if (tid == 0) {{
#pragma unroll
        for (int h = 0; h < GROUP; h++) {{ fm[h] = mh[h]; fl[h] = lh[h]; fp[h] = ph[h]; }}
    }}
    __syncthreads();
    float* out = part + (((size_t)i * KVH + g) * splits + sidx) * PART;
    if (tid < GROUP) {{
        out[tid * (HD + 2)] = fm[tid];
        out[tid * (HD + 2) + 1] = fl[tid];
    }}
#pragma unroll
    for (int a = 0; a < ACCS; a++) {{
        int e = tid + a * TILE;
        if (e >= GROUP * HD) break;
        int h = e / HD, c = e % HD;
#if SMOOTH
        float v = vsc[g * HD + c] * aq[a] + vsh[g * HD + c] * fp[h] + af[a];
#else
        float v = aq[a] + af[a];
#endif
        out[h * (HD + 2) + 2 + c] = v;
    }}
}}

extern "C" __global__ void {name}_merge(const float* __restrict__ part, int splits,
        float* __restrict__ out, int m) {{
    int head = blockIdx.x, i = blockIdx.y, c = threadIdx.x;
    if (i >= m || c >= HD) return;
    int g = head / GROUP, h = head % GROUP;
    const float* p = part + ((size_t)i * KVH + g) * splits * PART + h * (HD + 2);
    float mx = -INFINITY;
    for (int s = 0; s < splits; s++) mx = fmaxf(mx, p[s * PART]);
    float l = 0.0f, v = 0.0f;
    for (int s = 0; s < splits; s++) {{
        float ms = p[s * PART];
        if (ms == -INFINITY) continue;
        float w = expf(ms - mx);
        l = fmaf(w, p[s * PART + 1], l);
        v = fmaf(w, p[s * PART + 2 + c], v);
    }}
    out[(size_t)i * HEADS * HD + head * HD + c] = v / l;
}}
"#,
        width = (heads + 2 * kvh) * hd,
        past_only = past_only as u8,
        smooth = smooth as u8,
        tile = ATTN_TILE,
        scale = 1.0 / (hd as f32).sqrt(),
    );
}
