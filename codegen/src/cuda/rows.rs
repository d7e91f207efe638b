//! The row-wise kernels: `rms_norm`, `silu_mul`, `embed`.

use super::*;
use std::fmt::Write;
use wkvc_ir::kernel::args::*;

/// `(const int* ids, const float* table, float* y, int m)`: y[i] = table[ids[i]] (the ids are
/// checked by the host).
pub(super) fn emit_embed(s: &mut String, name: &str, vocab: usize, dim: usize) {
    s.push_str(&declare_cuda::<EmbedArgs>());
    let unpack = unpack(&[
        ("const int*", "ids", "ids"),
        ("const float*", "table", "table"),
        ("float*", "y", "y"),
        ("int", "m", "m"),
    ]);
    let _ = write!(
        s,
        r#"
#define VOCAB {vocab}
#define DIM {dim}
extern "C" __global__ void {name}(const EmbedArgs a) {{
{unpack}
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
pub(super) fn emit_rms(s: &mut String, name: &str, dim: usize, eps: f64) {
    s.push_str(&declare_cuda::<RmsNormArgs>());
    let unpack = unpack(&[
        ("const float*", "x", "x"),
        ("const float*", "w", "w"),
        ("float*", "y", "y"),
        ("int", "m", "m"),
    ]);
    let _ = write!(
        s,
        r#"
#define DIM {dim}
extern "C" __global__ void {name}(const RmsNormArgs a) {{
{unpack}
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
pub(super) fn emit_silu_mul(s: &mut String, name: &str, n: usize) {
    s.push_str(&declare_cuda::<SiluMulArgs>());
    let unpack = unpack(&[
        ("const float*", "gu", "x"),
        ("float*", "y", "y"),
        ("int", "m", "m"),
    ]);
    let _ = write!(
        s,
        r#"
#define N {n}
extern "C" __global__ void {name}(const SiluMulArgs a) {{
{unpack}
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)m * N) return;
    size_t i = t / N, c = t % N;
    float g = gu[i * 2 * N + c], u = gu[i * 2 * N + N + c];
    y[t] = g / (1.0f + expf(-g)) * u;
}}
"#
    );
}
