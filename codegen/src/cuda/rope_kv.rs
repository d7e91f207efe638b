//! `rope_kv`: RoPE on q and k in place, then K/V smoothed, quantized per (token, group) by
//! one warp each and appended to the cache (a group: a kv head, or `GL` channels of one).

use super::*;
use std::fmt::Write;
use wkvc_ir::kernel::args::*;

/// `(float* x, int m, const int* pos, const float* inv_freq, u8* kc, float* kp, u8* vc,
/// float* vp, const int* state, const float* ksh, const float* ksc, const float* vsh,
/// const float* vsc)` (state[0] = cached tokens: row i goes to cache row state[0] + i; kept in
/// device memory so that a captured decode graph replays unchanged):
/// RoPE (rotate-half, angle pos * inv_freq in f32, its cos/sin in f64) on the q and k heads of
/// each row in place, then K and V of row i appended at cache row row0 + i: smoothed
/// ((x - shift) / scale), per (token, group of GL channels) min/max, scale rounded up to an f16, zero
/// round-half-even, codes clamped and packed two per byte (low nibble = even channel), the
/// group's scale and zero stored as one word of two f16 (scale in the low half) in kp/vp; a
/// 16-bit cache stores the f32 rows in kp/vp instead. With `rotate` > 0, between the two:
/// each q and k head times the orthonormal Hadamard matrix of `rotate`-blocks (butterflies by
/// stride 1, 2, 4, .., then the scale, as `wkvc_ir::math::hadamard_in_place`).
pub(super) fn emit_rope_kv(
    s: &mut String,
    name: &str,
    (heads, kvh, hd, rd): (usize, usize, usize, usize),
    (bits, gl): (u32, usize),
    smooth: bool,
    rotate: usize,
) {
    s.push_str(&declare_cuda::<RopeKvArgs>());
    let unpack = unpack(&[
        ("float*", "x", "x"),
        ("int", "m", "m"),
        ("const int*", "pos", "pos"),
        ("const float*", "inv_freq", "inv_freq"),
        ("u8*", "kc", "kc"),
        ("float*", "kp", "kp"),
        ("u8*", "vc", "vc"),
        ("float*", "vp", "vp"),
        ("const int*", "state", "state"),
        ("const float*", "ksh", "ksh"),
        ("const float*", "ksc", "ksc"),
        ("const float*", "vsh", "vsh"),
        ("const float*", "vsc", "vsc"),
    ]);
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
#define GL {gl}
#define NG {ng}
#define PPL {ppl}
extern "C" __global__ void {name}(const RopeKvArgs a) {{
{unpack}
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
{rotation}    size_t row = (size_t)state[0] + i;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // one warp per (K or V, group of GL channels: NG a row)
    for (int item = warp; item < 2 * NG; item += blockDim.x >> 5) {{
        int t = item / NG, g = item % NG;
        const float* src = xr + (HEADS + t * KVH) * HD + g * GL;
#if BITS == 16
        float* dst = (t ? vp : kp) + row * (KVH * HD) + g * GL;
        for (int c = lane; c < GL; c += 32) dst[c] = src[c];
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
            if (p < GL / 2) {{
#pragma unroll
                for (int e = 0; e < 2; e++) {{
                    int c = 2 * p + e;
                    float a = src[c];
#if SMOOTH
                    a = (a - sh[g * GL + c]) / sc[g * GL + c];
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
        u16 hs = f2h(st);
        float sf = h2f(hs);
        if (sf < st) {{
            hs = (u16)(hs + 1);
            sf = h2f(hs);
        }}
        float zf = fminf(fmaxf(rintf(-mn / sf), -2048.0f), 2048.0f);
        u8* crow = (t ? vc : kc) + row * (KVH * HD / 2) + g * (GL / 2);
#pragma unroll
        for (int u = 0; u < PPL; u++) {{
            int p = lane + 32 * u;
            if (p < GL / 2) {{
                float q0 = fminf(fmaxf(rintf(v[2 * u] / sf) + zf, 0.0f), qmax);
                float q1 = fminf(fmaxf(rintf(v[2 * u + 1] / sf) + zf, 0.0f), qmax);
                crow[p] = (u8)((int)q0 | ((int)q1 << 4));
            }}
        }}
        // the group's word: f16 scale (low half) and f16 zero (an integer of at most 2048)
        if (lane == 0) ((u32*)(t ? vp : kp))[row * NG + g] = (u32)hs | ((u32)f2h(zf) << 16);
#endif
    }}
}}
"#,
        half = rd / 2,
        width = (heads + 2 * kvh) * hd,
        ppl = (gl / 2).div_ceil(32),
        ng = kvh * hd / gl,
        smooth = smooth as u8,
        rotation = rotation(rotate),
    );
}

/// The K/V rotation's code (none when `rotate` is 0: the kernel is then as before it existed).
fn rotation(rotate: usize) -> String {
    if rotate == 0 {
        return String::new();
    }
    format!(
        r#"    // K/V rotation: Hadamard blocks of {rotate}, one butterfly (j, j + st) a thread per
    // step, st = 1, 2, 4, .., then the scale 1/sqrt({rotate})
    for (int st = 1; st < {rotate}; st <<= 1) {{
        for (int e = threadIdx.x; e < (HEADS + KVH) * (HD / 2); e += blockDim.x) {{
            int h = e / (HD / 2), p = e % (HD / 2);
            int j = h * HD + (p / st) * (2 * st) + p % st;
            float u = xr[j], w = xr[j + st];
            xr[j] = u + w;
            xr[j + st] = u - w;
        }}
        __syncthreads();
    }}
    for (int e = threadIdx.x; e < (HEADS + KVH) * HD; e += blockDim.x)
        xr[e] *= __int_as_float({scale_bits});
    __syncthreads();
"#,
        scale_bits = ((1.0 / (rotate as f64).sqrt()) as f32).to_bits()
    )
}
