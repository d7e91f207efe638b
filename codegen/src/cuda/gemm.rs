//! The GEMMs: `qgemm` (packed int4, f16 scale/zero), `gemm` and `logits` (f32 rows), as a
//! GEMV for a few rows (optionally fused with the norm or SiLU-mul before it), a shared-memory
//! tiled GEMM, and a tensor-core variant of the quantized one.

use super::*;
use std::fmt::Write;
use wkvc_ir::kernel::args::*;

/// Which argument struct a GEMM kernel takes.
#[derive(Clone, Copy)]
pub(super) enum GemmArgsKind {
    /// `qgemm`: packed codes, f16 scales and zeros
    Quantized,
    /// `gemm`: f32 weight rows
    F32,
    /// `logits`: the f32 table, no residual
    Logits,
}

/// The entry points every GEMM kernel has (the tensor-core one is added where it applies).
pub(super) fn gemm_entries(name: &str) -> Vec<String> {
    ["gemv", "tiled", "gemv_rms", "gemv_silu"]
        .iter()
        .map(|e| format!("{name}_{e}"))
        .collect()
}

/// GEMM against quantized rows (`gl` = Some(group length): packed int4 codes `k / 2` bytes per
/// row, low nibble first, f16 scale and zero per (row, group)) or f32 rows (`gl` = None):
/// `(const float* x, int m, const void* w, const u16* s, const u16* z, float* y, int ldy,
/// int n, const float* r, int ldr)` computes y[i, j] (+= r[i, j]) = x[i] . w[j] for the part's
/// n rows (s, z unused for f32 rows, r unused without residual).
pub(super) fn emit_gemm(
    s: &mut String,
    name: &str,
    k: usize,
    gl: Option<usize>,
    residual: bool,
    kind: GemmArgsKind,
) {
    // the kind's argument struct: quantized weights have scales and zeros, logits no
    // residual
    let (args, sz, r) = match kind {
        GemmArgsKind::Quantized => {
            s.push_str(&declare_cuda::<QGemmArgs>());
            (QGemmArgs::NAME, true, true)
        }
        GemmArgsKind::F32 => {
            s.push_str(&declare_cuda::<GemmArgs>());
            (GemmArgs::NAME, false, true)
        }
        GemmArgsKind::Logits => {
            s.push_str(&declare_cuda::<LogitsArgs>());
            (LogitsArgs::NAME, false, false)
        }
    };
    let or0 = |b: bool, f: &'static str| if b { f } else { "" };
    let fields = [
        ("const float*", "x", "x"),
        ("int", "m", "m"),
        ("const void*", "w", "w"),
        ("const u16*", "s", or0(sz, "s")),
        ("const u16*", "z", or0(sz, "z")),
        ("float*", "y", "y"),
        ("int", "ldy", "ldy"),
        ("int", "n", "n1"),
        ("const float*", "r", or0(r, "r")),
        ("int", "ldr", or0(r, "ldr")),
    ];
    let unpack = unpack(&fields);
    let unpack_rms = unpack_with(
        &fields,
        &[("const float*", "nw", "nw"), ("float", "eps", "eps")],
    );
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

extern "C" __global__ void {name}_gemv(const {args} a) {{
{unpack}
    gemv<0>(x, m, w, s, z, y, ldy, n, r, ldr, 0, 0.0f);
}}
// fused with the RMSNorm before it: x is the norm's input, nw its weight
extern "C" __global__ void {name}_gemv_rms(const {args} a) {{
{unpack_rms}
    gemv<1>(x, m, w, s, z, y, ldy, n, r, ldr, nw, eps);
}}
// fused with the SiLU-mul before it: x is its input [g | u]
extern "C" __global__ void {name}_gemv_silu(const {args} a) {{
{unpack}
    gemv<2>(x, m, w, s, z, y, ldy, n, r, ldr, 0, 0.0f);
}}

// shared-memory tiles: TM activation rows x TN weight rows, TK columns per step; weights
// dequantized once per tile into shared memory; each thread computes 2 x 4 outputs
#define TM {tm}
#define TN {tn}
#define TK {tk}
extern "C" __global__ void __launch_bounds__(256) {name}_tiled(const {args} a) {{
{unpack}
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
        emit_qgemm_mma(s, name, args, &unpack);
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
fn emit_qgemm_mma(s: &mut String, name: &str, args: &str, unpack: &str) {
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
extern "C" __global__ void __launch_bounds__(128) {name}_mma(const {args} a) {{
{unpack}
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
