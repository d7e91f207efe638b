//! Vector-Jacobian products: what the interpreter computes for `vjp` nodes.
//!
//! Rounding uses OmniQuant's straight-through estimator: `round_ste(t) = t + stop(round(t) - t)`,
//! so d round_ste / dt = 1 while the forward value stays rounded. Zero-points are rounded
//! without the estimator (no gradient), as in OmniQuant. Products with a rounded factor keep
//! the rounded value (d/dh [round_ste(x/h) h] = round(x/h) - x/h), which is what gives the
//! clipping factors and the KV smoothing vectors a gradient at all: with round treated as the
//! identity everywhere, quantize-dequantize would be the identity and every such gradient 0.
//! f16 rounding of a scale (plans store f16) is passed straight through as well.

use crate::math::{dot, matmul, sigmoid, softmax_in_place};
use crate::quant::{ParamDtype, group_len, params_in};
use rayon::prelude::*;

/// `linear` wrt x: dx[m,k] = dy[m,n] w[n,k].
pub fn linear_dx(dy: &[f32], w: &[f32], m: usize, n: usize, k: usize, threads: usize) -> Vec<f32> {
    let mut dx = vec![0f32; m * k];
    matmul(m, k, n, dy, (n, 1), w, (k, 1), &mut dx, threads);
    dx
}

/// `linear` wrt w: dw[n,k] = dy[m,n]^T x[m,k].
pub fn linear_dw(dy: &[f32], x: &[f32], m: usize, n: usize, k: usize, threads: usize) -> Vec<f32> {
    let mut dw = vec![0f32; n * k];
    matmul(n, k, m, dy, (1, n), x, (k, 1), &mut dw, threads);
    dw
}

/// Column sums of dy[m,n] (bias gradient), accumulated in f64.
pub fn col_sums(dy: &[f32], n: usize) -> Vec<f32> {
    let mut s = vec![0f64; n];
    for row in dy.chunks(n) {
        for (a, &b) in s.iter_mut().zip(row) {
            *a += b as f64;
        }
    }
    s.into_iter().map(|v| v as f32).collect()
}

/// `rms_norm` wrt x and w for rows of `d`.
pub fn rms_norm_vjp(x: &[f32], w: &[f32], eps: f64, dy: &[f32], wrt_w: bool) -> Vec<f32> {
    let d = w.len().max(1);
    if wrt_w {
        let mut dw = vec![0f64; d];
        for (xr, gr) in x.chunks(d).zip(dy.chunks(d)) {
            let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let r = 1.0 / (ss / d as f64 + eps).sqrt();
            for ((a, &xv), &g) in dw.iter_mut().zip(xr).zip(gr) {
                *a += g as f64 * xv as f64 * r;
            }
        }
        return dw.into_iter().map(|v| v as f32).collect();
    }
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
        .for_each(|(o, (xr, gr))| {
            let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let r = 1.0 / (ss / d as f64 + eps).sqrt();
            let dot: f64 = xr
                .iter()
                .zip(gr)
                .zip(w)
                .map(|((&a, &g), &b)| a as f64 * g as f64 * b as f64)
                .sum();
            let c = r * r * r * dot / d as f64;
            for (((o, &a), &g), &b) in o.iter_mut().zip(xr).zip(gr).zip(w) {
                *o = (r * g as f64 * b as f64 - a as f64 * c) as f32;
            }
        });
    dx
}

/// `silu` wrt x.
pub fn silu_vjp(x: &[f32], dy: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(dy)
        .map(|(&v, &g)| {
            let s = sigmoid(v);
            g * s * (1.0 + v * (1.0 - s))
        })
        .collect()
}

/// `softmax` (last axis of `n`) wrt x, recomputing y.
pub fn softmax_vjp(x: &[f32], dy: &[f32], n: usize) -> Vec<f32> {
    let mut y = x.to_vec();
    for (row, gr) in y.chunks_mut(n).zip(dy.chunks(n)) {
        softmax_in_place(row);
        let s: f64 = row.iter().zip(gr).map(|(&a, &b)| a as f64 * b as f64).sum();
        for (v, &g) in row.iter_mut().zip(gr) {
            *v *= g - s as f32;
        }
    }
    y
}

/// `loss` wrt prediction (`wrt = 0`) or target (1), seed 1.
pub fn loss_vjp(kind: &str, p: &[f32], t: &[f32], wrt: usize) -> Vec<f32> {
    let n = p.len().max(1) as f32;
    let sign = if wrt == 0 { 1.0 } else { -1.0 };
    p.iter()
        .zip(t)
        .map(|(&a, &b)| {
            let d = a - b;
            let g = if kind == "mse" {
                2.0 * d / n
            } else if d > 0.0 {
                1.0 / n
            } else if d < 0.0 {
                -1.0 / n
            } else {
                0.0
            };
            sign * g
        })
        .collect()
}

/// Gradient of one group's quantize-dequantize with clipping factors `gamma`, `beta`.
/// Adds dL/dx into `dx`, writes the forward values into `y` when given, returns
/// (dL/dgamma, dL/dbeta).
#[allow(clippy::too_many_arguments)]
pub fn fake_quant_group_vjp(
    x: &[f32],
    dy: &[f32],
    bits: u32,
    gamma: f32,
    beta: f32,
    pd: ParamDtype,
    dx: &mut [f32],
    y: Option<&mut [f32]>,
) -> (f32, f32) {
    let qmax = ((1u32 << bits) - 1) as f32;
    let (mut mn, mut mx, mut imn, mut imx) = (f32::INFINITY, f32::NEG_INFINITY, 0, 0);
    for (i, &v) in x.iter().enumerate() {
        if v < mn {
            mn = v;
            imn = i;
        }
        if v > mx {
            mx = v;
            imx = i;
        }
    }
    let (s, z) = params_in(mn, mx, bits, gamma, beta, pd);
    let raw = (gamma * mx - beta * mn) / qmax;
    let mut dh = 0f64;
    let mut yv = y;
    for i in 0..x.len() {
        let t = x[i] / s;
        let r = crate::quant::rne(t);
        let c = r + z;
        let g = dy[i] as f64;
        if (0.0..=qmax).contains(&c) {
            dx[i] += dy[i];
            dh += g * (r - t) as f64;
        } else {
            dh += g * (c.clamp(0.0, qmax) - z) as f64;
        }
        if let Some(y) = yv.as_deref_mut() {
            y[i] = (c.clamp(0.0, qmax) - z) * s;
        }
    }
    if raw < 1e-8 || x.is_empty() {
        return (0.0, 0.0);
    }
    let dh = dh as f32;
    dx[imx] += dh * gamma / qmax;
    dx[imn] -= dh * beta / qmax;
    (dh * mx / qmax, -dh * mn / qmax)
}

/// `fake_quant` wrt the weight (`wrt = 0`), gamma (1) or beta (2). With `lwc` the clipping
/// operands are logits and their gradients include the sigmoid's.
#[allow(clippy::too_many_arguments)]
pub fn fake_quant_vjp(
    w: &[f32],
    cols: usize,
    bits: u32,
    group: i64,
    gamma: &[f32],
    beta: &[f32],
    pd: ParamDtype,
    lwc: bool,
    dy: &[f32],
    wrt: usize,
) -> Vec<f32> {
    let mut all = fake_quant_grads(w, cols, bits, group, gamma, beta, pd, lwc, dy);
    std::mem::take(&mut all[wrt.min(2)])
}

/// All three gradients of `fake_quant` (weight, gamma, beta) in one pass.
#[allow(clippy::too_many_arguments)]
pub fn fake_quant_grads(
    w: &[f32],
    cols: usize,
    bits: u32,
    group: i64,
    gamma: &[f32],
    beta: &[f32],
    pd: ParamDtype,
    lwc: bool,
    dy: &[f32],
) -> Vec<Vec<f32>> {
    let gl = group_len(cols, group);
    let ng = cols.div_ceil(gl);
    let rows = w.len() / cols.max(1);
    let act = |v: f32| if lwc { sigmoid(v) } else { v };
    let mut dw = vec![0f32; rows * cols];
    let mut dg = vec![0f32; rows * ng];
    let mut db = vec![0f32; rows * ng];
    dw.par_chunks_mut(cols.max(1))
        .zip(dg.par_chunks_mut(ng).zip(db.par_chunks_mut(ng)))
        .enumerate()
        .for_each(|(r, (dx, (dgr, dbr)))| {
            for g in 0..ng {
                let (a, b) = (g * gl, ((g + 1) * gl).min(cols));
                let (gu, bu) = (gamma[r * ng + g], beta[r * ng + g]);
                let (ga, ba) = (act(gu), act(bu));
                let (x, d) = (
                    &w[r * cols + a..r * cols + b],
                    &dy[r * cols + a..r * cols + b],
                );
                let (a1, b1) = fake_quant_group_vjp(x, d, bits, ga, ba, pd, &mut dx[a..b], None);
                let (sg, sb) = if lwc {
                    (ga * (1.0 - ga), ba * (1.0 - ba))
                } else {
                    (1.0, 1.0)
                };
                dgr[g] = a1 * sg;
                dbr[g] = b1 * sb;
            }
        });
    vec![dw, dg, db]
}

/// Gradients of the KV cache round trip X^ = s * deq(Q((X - shift) / s)) + shift, per
/// (token, head) group of `hd`: (dX, dshift, dscale) from dL/dX^.
pub struct KvGrads {
    pub dx: Vec<f32>,
    pub dshift: Vec<f32>,
    pub dscale: Vec<f32>,
}

pub fn kv_fake_quant_vjp(
    x: &[f32],
    hd: usize,
    bits: u32,
    pd: ParamDtype,
    smooth: Option<(&[f32], &[f32])>,
    g: &[f32],
    width: usize,
) -> KvGrads {
    let mut xs = x.to_vec();
    if let Some((sh, sc)) = smooth {
        for r in xs.chunks_mut(width) {
            for ((v, a), b) in r.iter_mut().zip(sh).zip(sc) {
                *v = (*v - a) / b;
            }
        }
    }
    // dL/dD where D = deq(Q(X')) and X^ = D * s + shift.
    let mut gd = g.to_vec();
    if let Some((_, sc)) = smooth {
        for r in gd.chunks_mut(width) {
            for (v, b) in r.iter_mut().zip(sc) {
                *v *= b;
            }
        }
    }
    let mut dxs = vec![0f32; x.len()];
    let mut dq = vec![0f32; x.len()];
    dxs.par_chunks_mut(hd)
        .zip(dq.par_chunks_mut(hd))
        .zip(xs.par_chunks(hd).zip(gd.par_chunks(hd)))
        .for_each(|((o, yq), (xg, gg))| {
            fake_quant_group_vjp(xg, gg, bits, 1.0, 1.0, pd, o, Some(yq));
        });
    let mut dshift = vec![0f64; width];
    let mut dscale = vec![0f64; width];
    let mut dx = dxs;
    if let Some((_, sc)) = smooth {
        for (r, row) in dx.chunks_mut(width).enumerate() {
            for c in 0..width {
                let i = r * width + c;
                let gi = g[i] as f64;
                let dxp = row[c] as f64;
                let s = sc[c] as f64;
                dshift[c] += gi - dxp / s;
                dscale[c] += gi * dq[i] as f64 - dxp * xs[i] as f64 / s;
                row[c] = (dxp / s) as f32;
            }
        }
    }
    KvGrads {
        dx,
        dshift: dshift.into_iter().map(|v| v as f32).collect(),
        dscale: dscale.into_iter().map(|v| v as f32).collect(),
    }
}

/// Attention shapes and quantization settings, from the node's attrs.
#[derive(Clone, Copy, Debug)]
pub struct AttnSpec {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub kv_bits: Option<u32>,
    /// channels per (scale, zero) group of the cache (0: the head dim)
    pub kv_group: usize,
    pub past_only: bool,
    /// with past-only: the last `window` positions (the reader included) read in full
    /// precision (1: the reader only)
    pub window: usize,
    pub pd: ParamDtype,
}

impl AttnSpec {
    /// Channels per (scale, zero) group of the cache.
    pub fn group(&self) -> usize {
        crate::kvcache::group_len(self.kv_group, self.head_dim)
    }
}

/// `attention` of a fresh sequence under the decode-equivalent protocol (query i reads the
/// KV cache's round trip of every j < i, and its own K/V in full precision when past-only),
/// differentiated wrt operand `wrt`: q (0), k (1), v (2), k_shift (3), k_scale (4),
/// v_shift (5), v_scale (6).
#[allow(clippy::too_many_arguments)]
pub fn attention_vjp(
    spec: AttnSpec,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    smooth: Option<[&[f32]; 4]>,
    dout: &[f32],
    wrt: usize,
) -> Vec<f32> {
    let mut all = attention_grads(spec, q, k, v, smooth, dout);
    if wrt < all.len() {
        std::mem::take(&mut all[wrt])
    } else {
        Vec::new()
    }
}

/// All gradients of `attention` in one pass: [dq, dk, dv] and, with smoothing operands,
/// [dk_shift, dk_scale, dv_shift, dv_scale] (zeros when the cache is not quantized).
pub fn attention_grads(
    spec: AttnSpec,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    smooth: Option<[&[f32]; 4]>,
    dout: &[f32],
) -> Vec<Vec<f32>> {
    let (h, kvh, hd) = (spec.heads, spec.kv_heads, spec.head_dim);
    let kvw = kvh * hd;
    let s = q.len() / (h * hd).max(1);
    let group = (h / kvh.max(1)).max(1);
    let scale = 1.0 / (hd as f32).sqrt();
    let ks = smooth.map(|x| (x[0], x[1]));
    let vs = smooth.map(|x| (x[2], x[3]));
    let (khat, vhat) = match spec.kv_bits {
        Some(b) => (
            kv_roundtrip(k, spec.group(), b, spec.pd, ks, kvw),
            kv_roundtrip(v, spec.group(), b, spec.pd, vs, kvw),
        ),
        None => (k.to_vec(), v.to_vec()),
    };
    let quantized = |i: usize, j: usize| {
        spec.kv_bits.is_some()
            && !(spec.past_only
                && j <= i
                && j >= crate::kvcache::window_start(i, spec.window, 0, false))
    };
    // Per query head: dq, and dK/dV split by whether the row was read full-precision or as
    // its round trip.
    struct HeadGrads {
        dq: Vec<f32>,
        dk_fp: Vec<f32>,
        dk_q: Vec<f32>,
        dv_fp: Vec<f32>,
        dv_q: Vec<f32>,
    }
    let per_head: Vec<HeadGrads> = (0..h)
        .into_par_iter()
        .map(|head| {
            let kh = head / group;
            let off = kh * hd;
            let mut r = HeadGrads {
                dq: vec![0f32; s * hd],
                dk_fp: vec![0f32; s * hd],
                dk_q: vec![0f32; s * hd],
                dv_fp: vec![0f32; s * hd],
                dv_q: vec![0f32; s * hd],
            };
            let mut p = Vec::with_capacity(s);
            let mut dp = Vec::with_capacity(s);
            for i in 0..s {
                let qi = &q[i * h * hd + head * hd..][..hd];
                let doi = &dout[i * h * hd + head * hd..][..hd];
                let n = if spec.causal { i + 1 } else { s };
                let row = |j: usize| (quantized(i, j), j * kvw + off);
                p.clear();
                dp.clear();
                for j in 0..n {
                    let (qz, o) = row(j);
                    let kj = if qz { &khat[o..o + hd] } else { &k[o..o + hd] };
                    p.push(dot(qi, kj) * scale);
                }
                softmax_in_place(&mut p);
                let mut sum = 0f64;
                for (j, &pj) in p.iter().enumerate() {
                    let (qz, o) = row(j);
                    let vj = if qz { &vhat[o..o + hd] } else { &v[o..o + hd] };
                    let d = dot(doi, vj);
                    dp.push(d);
                    sum += (pj * d) as f64;
                }
                let sum = sum as f32;
                for j in 0..n {
                    let (qz, o) = row(j);
                    let ds = p[j] * (dp[j] - sum) * scale;
                    let kj = if qz { &khat[o..o + hd] } else { &k[o..o + hd] };
                    let dqi = &mut r.dq[i * hd..(i + 1) * hd];
                    for (a, &b) in dqi.iter_mut().zip(kj) {
                        *a += ds * b;
                    }
                    let dk = if qz { &mut r.dk_q } else { &mut r.dk_fp };
                    for (a, &b) in dk[j * hd..(j + 1) * hd].iter_mut().zip(qi) {
                        *a += ds * b;
                    }
                    let dv = if qz { &mut r.dv_q } else { &mut r.dv_fp };
                    for (a, &b) in dv[j * hd..(j + 1) * hd].iter_mut().zip(doi) {
                        *a += p[j] * b;
                    }
                }
            }
            r
        })
        .collect();
    let mut dq = vec![0f32; s * h * hd];
    for (head, r) in per_head.iter().enumerate() {
        for i in 0..s {
            dq[i * h * hd + head * hd..][..hd].copy_from_slice(&r.dq[i * hd..(i + 1) * hd]);
        }
    }
    let gather = |fp: bool, kv: bool| -> Vec<f32> {
        let mut out = vec![0f32; s * kvw];
        for (head, r) in per_head.iter().enumerate() {
            let off = (head / group) * hd;
            let src = match (kv, fp) {
                (false, true) => &r.dk_fp,
                (false, false) => &r.dk_q,
                (true, true) => &r.dv_fp,
                (true, false) => &r.dv_q,
            };
            for i in 0..s {
                for (a, &b) in out[i * kvw + off..][..hd]
                    .iter_mut()
                    .zip(&src[i * hd..(i + 1) * hd])
                {
                    *a += b;
                }
            }
        }
        out
    };
    let mut dk = gather(true, false);
    let mut dv = gather(true, true);
    let mut out = Vec::with_capacity(7);
    let mut sm_grads = vec![vec![0f32; kvw]; 4];
    if let Some(bits) = spec.kv_bits {
        let (gk, gv) = (gather(false, false), gather(false, true));
        let kg = kv_fake_quant_vjp(k, spec.group(), bits, spec.pd, ks, &gk, kvw);
        let vg = kv_fake_quant_vjp(v, spec.group(), bits, spec.pd, vs, &gv, kvw);
        for (a, b) in dk.iter_mut().zip(&kg.dx) {
            *a += b;
        }
        for (a, b) in dv.iter_mut().zip(&vg.dx) {
            *a += b;
        }
        sm_grads = vec![kg.dshift, kg.dscale, vg.dshift, vg.dscale];
    }
    out.push(dq);
    out.push(dk);
    out.push(dv);
    if smooth.is_some() {
        out.extend(sm_grads);
    }
    out
}

/// The KV cache round trip (smooth, quantize per group of `hd`, dequantize, unsmooth).
pub fn kv_roundtrip(
    x: &[f32],
    hd: usize,
    bits: u32,
    pd: ParamDtype,
    smooth: Option<(&[f32], &[f32])>,
    width: usize,
) -> Vec<f32> {
    let mut xs = x.to_vec();
    if let Some((sh, sc)) = smooth {
        for r in xs.chunks_mut(width) {
            for ((v, a), b) in r.iter_mut().zip(sh).zip(sc) {
                *v = (*v - a) / b;
            }
        }
    }
    let mut codes = vec![0u8; hd];
    for g in xs.chunks_mut(hd) {
        let (sc, z) = crate::quant::quantize_group(g, bits, pd, &mut codes[..g.len()]);
        for (v, &c) in g.iter_mut().zip(&codes) {
            *v = (c as f32 - z) * sc;
        }
    }
    if let Some((sh, sc)) = smooth {
        for r in xs.chunks_mut(width) {
            for ((v, a), b) in r.iter_mut().zip(sh).zip(sc) {
                *v = *v * b + a;
            }
        }
    }
    xs
}
