//! `attention`: flash-decoding over the packed cache and the chunk's FP rows, split over the
//! context, and the merge of the splits.

use super::*;
use std::fmt::Write;
use wkvc_ir::kernel::args::*;

/// Attention over the cache and the chunk's own rows, split over the context
/// (flash-decoding). `{name}_split(const float* x, int m, const u8* kc, const float* kp,
/// const u8* vc, const float* vp, const int* state, int decode, const float* ksh, const float* ksc,
/// const float* vsh, const float* vsc, float* part, int splits)`: block (split, kv head g,
/// row i) takes its share of the row's tokens: the packed past with the per-token scale/zero
/// algebra per (scale, zero) group of GL channels (q' = q * k_scale; score = sum over the
/// groups of s (q'.codes - z sum q') + q . k_shift), then the FP
/// rows, online softmax per query head, V accumulated on codes and un-smoothed at the end;
/// writes (max, sum, unnormalised out[head_dim]) per query head to `part`.
/// `{name}_merge(const float* part, int splits, float* out, int m)` combines the splits.
/// Which tokens row i sees (past = state[0], the cached tokens before the chunk; `decode` = the
/// decode-equivalent protocol): a 16-bit cache: cache rows 0..past+i+1 in FP; not past-only:
/// past+i+1 packed tokens; past-only: past (prefill protocol) or past+i (decode) packed
/// tokens, then the chunk's rows 0..i+1 (prefill) or i..i+1 (decode) in FP; with a recent
/// window of `win` > 1 positions (`--kv-window`): the packed tokens below
/// `ir::kvcache::window_start`, then FP rows of `wsrc`, which `{name}_wput` fills before (the
/// tail's rows, then the chunk's) and from which `{name}_wkeep` takes the next tail after
/// (both emitted for past-only quantized caches only).
pub(super) fn emit_attention(
    s: &mut String,
    name: &str,
    (heads, kvh, hd, gl): (usize, usize, usize, usize),
    bits: u32,
    past_only: bool,
    smooth: bool,
) {
    s.push_str(&declare_cuda::<AttentionArgs>());
    let unpack_split = unpack(&[
        ("const float*", "x", "q"),
        ("int", "m", "m"),
        ("const u8*", "kc", "kc"),
        ("const float*", "kp", "kp"),
        ("const u8*", "vc", "vc"),
        ("const float*", "vp", "vp"),
        ("const int*", "state", "state"),
        ("int", "decode", "decode"),
        ("const float*", "ksh", "ksh"),
        ("const float*", "ksc", "ksc"),
        ("const float*", "vsh", "vsh"),
        ("const float*", "vsc", "vsc"),
        ("float*", "part", "part"),
        ("int", "splits", "splits"),
        ("const float*", "wsrc", "wsrc"),
        ("int", "win", "win"),
    ]);
    let unpack_merge = unpack(&[
        ("const float*", "part", "part"),
        ("int", "splits", "splits"),
        ("float*", "out", "out"),
        ("int", "m", "m"),
    ]);
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
#define GL {gl}
#define NGH {ngh}
#define TILE {tile}
#define ACCS {accs}
#define SCALE {scale:e}f
#define PART (GROUP * (HD + 2))

extern "C" __global__ void __launch_bounds__(TILE) {name}_split(const AttentionArgs a) {{
{unpack_split}
    __shared__ float qr[GROUP][HD];   // q (for FP rows)
    __shared__ float qs[GROUP][HD];   // q' = q * k_scale (for packed rows)
    __shared__ float q1[GROUP][NGH], q2[GROUP]; // per group: sum of q'
    __shared__ float sc[GROUP][TILE]; // scores, then p
    __shared__ float tvs[NGH][TILE], tvz[NGH][TILE];
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
    if (win > 1) {{
        // full precision from position a0 (ir::kvcache::window_start) to the row's own, p;
        // the source's first row is position past - t
        int p = past + i, t = min(win - 1, past);
        int a0 = max(p + 1 - win, 0);
        if (!decode) a0 = min(a0, past);
        nq = a0; f0 = a0 + t - past; f1 = p + t - past + 1;
        kf = wsrc; vf = wsrc + KVH * HD; ldf = 2 * KVH * HD;
    }} else {{
        nq = decode ? past + i : past;
        f0 = decode ? i : 0;
        f1 = i + 1;
        kf = x + HEADS * HD; vf = x + (HEADS + KVH) * HD; ldf = WIDTH;
    }}
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
        float b = 0.0f;
        for (int tg = 0; tg < NGH; tg++) {{
            float a = 0.0f;
            for (int c = tg * GL; c < (tg + 1) * GL; c++) {{
                a += qs[tid][c];
#if SMOOTH
                b = fmaf(qr[tid][c], ksh[g * HD + c], b);
#endif
            }}
            q1[tid][tg] = a;
        }}
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
            float sg[GROUP];
#pragma unroll
            for (int h = 0; h < GROUP; h++) sg[h] = 0.0f;
#pragma unroll
            for (int tg = 0; tg < NGH; tg++) {{
                // the group's words: f16 scale (low half) and f16 zero (high half)
                size_t pi = (size_t)j * (KVH * NGH) + g * NGH + tg;
                u32 kw = ((const u32*)kp)[pi], vw = ((const u32*)vp)[pi];
                float ks = h2f((u16)(kw & 0xffffu)), kz = h2f((u16)(kw >> 16));
                float d[GROUP];
#pragma unroll
                for (int h = 0; h < GROUP; h++) d[h] = 0.0f;
#pragma unroll
                for (int b = tg * (GL / 32); b < (tg + 1) * (GL / 32); b++) {{
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
                for (int h = 0; h < GROUP; h++) sg[h] += ks * (d[h] - kz * q1[h][tg]);
                tvs[tg][tid] = h2f((u16)(vw & 0xffffu));
                tvz[tg][tid] = h2f((u16)(vw >> 16));
            }}
#pragma unroll
            for (int h = 0; h < GROUP; h++) score[h] = (sg[h] + q2[h]) * SCALE;
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
                    accq = fmaf(p * tvs[c / GL][t], code - tvz[c / GL][t], accq);
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

extern "C" __global__ void {name}_merge(const AttentionArgs a) {{
{unpack_merge}
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
        ngh = hd / gl,
        scale = 1.0 / (hd as f32).sqrt(),
    );
    if past_only && bits != 16 {
        emit_window(s, name);
    }
}

/// The recent window's two kernels (the `#define`s of `emit_attention` before them), one
/// block a row of `2 * KVH * HD` floats (K then V). `{name}_wput` (grid: win - 1 + m): the
/// segment's full-precision source `wsrc`: rows r < t = min(win - 1, past) from the tail
/// `wbuf`, then the segment's m rows' K and V from the rope'd qkv rows `x`. `{name}_wkeep`
/// (grid: win - 1): the last min(win - 1, t + m) rows of the source to `wbuf`, the next tail.
fn emit_window(s: &mut String, name: &str) {
    let unpack_put = unpack(&[
        ("const float*", "x", "q"),
        ("int", "m", "m"),
        ("const int*", "state", "state"),
        ("int", "win", "win"),
        ("float*", "wsrc", "wsrc"),
        ("const float*", "wbuf", "wbuf"),
    ]);
    let unpack_keep = unpack(&[
        ("int", "m", "m"),
        ("const int*", "state", "state"),
        ("int", "win", "win"),
        ("const float*", "wsrc", "wsrc"),
        ("float*", "wbuf", "wbuf"),
    ]);
    let _ = write!(
        s,
        r#"
extern "C" __global__ void {name}_wput(const AttentionArgs a) {{
{unpack_put}
    int past = state[0], t = min(win - 1, past), r = blockIdx.x;
    if (r >= t + m) return;
    const float* src = r < t ? wbuf + (size_t)r * (2 * KVH * HD)
                             : x + (size_t)(r - t) * WIDTH + HEADS * HD;
    float* dst = wsrc + (size_t)r * (2 * KVH * HD);
    for (int c = threadIdx.x; c < 2 * KVH * HD; c += blockDim.x) dst[c] = src[c];
}}

extern "C" __global__ void {name}_wkeep(const AttentionArgs a) {{
{unpack_keep}
    int past = state[0], t = min(win - 1, past), keep = min(win - 1, t + m), r = blockIdx.x;
    if (r >= keep) return;
    const float* src = wsrc + (size_t)(t + m - keep + r) * (2 * KVH * HD);
    float* dst = wbuf + (size_t)r * (2 * KVH * HD);
    for (int c = threadIdx.x; c < 2 * KVH * HD; c += blockDim.x) dst[c] = src[c];
}}
"#
    );
}
