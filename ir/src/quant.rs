//! The quantizer shared by weights and the KV cache (WKVQUANT.md sections 1-2; the reference
//! README's definition): per group, asymmetric, min/max based,
//!   scale = (gamma*max - beta*min) / (2^bits - 1)   (floored at 1e-8),
//!   zero  = round(-beta*min / scale),
//!   q     = clamp(round(x / scale) + zero, 0, 2^bits - 1),   x^ = (q - zero) * scale,
//! rounding half to even. Scale and zero are stored as f16 and the codes are computed with the
//! stored values, so fake quantization and packed storage give identical numbers.

use half::f16;

/// Largest integer that f16 holds exactly; zero-points are clamped to it.
const F16_EXACT_INT: f32 = 2048.0;

/// Scale and zero-point of a group with the given (clipped) range, as stored in f16.
pub fn params(min: f32, max: f32, bits: u32, gamma: f32, beta: f32) -> (f16, f16) {
    let qmax = ((1u32 << bits) - 1) as f32;
    let (hi, lo) = (gamma * max, beta * min);
    let s = ((hi - lo) / qmax).max(1e-8);
    let mut s16 = f16::from_f32(s);
    if s16.to_f32() == 0.0 {
        s16 = f16::from_bits(1); // smallest positive f16
    }
    let z = (-lo / s16.to_f32())
        .round_ties_even()
        .clamp(-F16_EXACT_INT, F16_EXACT_INT);
    (s16, f16::from_f32(z))
}

#[inline]
pub fn code(x: f32, s: f32, z: f32, qmax: f32) -> u8 {
    ((x / s).round_ties_even() + z).clamp(0.0, qmax) as u8
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        })
}

/// Groups of a row of `cols`: `group` columns each (-1: one group), the last one shorter.
pub fn group_len(cols: usize, group: i64) -> usize {
    if group <= 0 {
        cols.max(1)
    } else {
        group as usize
    }
}

/// Quantize rows of `w` ([rows, cols]) per group: codes (one per element), scales and zeros
/// ([rows, groups]). `gamma`/`beta` are per (row, group) clipping factors.
pub fn quantize_rows(
    w: &[f32],
    cols: usize,
    bits: u32,
    group: i64,
    gamma: &[f32],
    beta: &[f32],
) -> (Vec<u8>, Vec<f16>, Vec<f16>) {
    let gl = group_len(cols, group);
    let ng = cols.div_ceil(gl);
    let qmax = ((1u32 << bits) - 1) as f32;
    let rows = w.len() / cols.max(1);
    let mut codes = vec![0u8; w.len()];
    let mut scales = Vec::with_capacity(rows * ng);
    let mut zeros = Vec::with_capacity(rows * ng);
    for r in 0..rows {
        for g in 0..ng {
            let a = r * cols + g * gl;
            let b = r * cols + ((g + 1) * gl).min(cols);
            let (mn, mx) = min_max(&w[a..b]);
            let (s, z) = params(mn, mx, bits, gamma[r * ng + g], beta[r * ng + g]);
            let (sf, zf) = (s.to_f32(), z.to_f32());
            for i in a..b {
                codes[i] = code(w[i], sf, zf, qmax);
            }
            scales.push(s);
            zeros.push(z);
        }
    }
    (codes, scales, zeros)
}

/// (code - zero) * scale for rows of codes with per-group scales/zeros.
pub fn dequantize_rows(
    codes: &[f32],
    cols: usize,
    group: i64,
    scales: &[f32],
    zeros: &[f32],
) -> Vec<f32> {
    let gl = group_len(cols, group);
    let ng = cols.div_ceil(gl);
    codes
        .iter()
        .enumerate()
        .map(|(i, &q)| {
            let (r, c) = (i / cols, i % cols);
            let g = r * ng + c / gl;
            (q - zeros[g]) * scales[g]
        })
        .collect()
}

/// Quantize-dequantize rows of `w` (what `fake_quant` computes).
pub fn fake_quant_rows(
    w: &[f32],
    cols: usize,
    bits: u32,
    group: i64,
    gamma: &[f32],
    beta: &[f32],
) -> Vec<f32> {
    let (codes, s, z) = quantize_rows(w, cols, bits, group, gamma, beta);
    let codes: Vec<f32> = codes.iter().map(|&c| c as f32).collect();
    let s: Vec<f32> = s.iter().map(|v| v.to_f32()).collect();
    let z: Vec<f32> = z.iter().map(|v| v.to_f32()).collect();
    dequantize_rows(&codes, cols, group, &s, &z)
}

/// One KV group (a token's head): codes written into `out`, returns (scale, zero).
pub fn quantize_group(x: &[f32], bits: u32, out: &mut [u8]) -> (f16, f16) {
    let (mn, mx) = min_max(x);
    let (s, z) = params(mn, mx, bits, 1.0, 1.0);
    let qmax = ((1u32 << bits) - 1) as f32;
    let (sf, zf) = (s.to_f32(), z.to_f32());
    for (o, &v) in out.iter_mut().zip(x) {
        *o = code(v, sf, zf, qmax);
    }
    (s, z)
}

/// Pack codes (< 16) two per byte, low nibble first; `cols` per row, rows padded to bytes.
pub fn pack_u4(codes: &[u8], cols: usize) -> Vec<u8> {
    let rb = cols.div_ceil(2);
    let rows = codes.len() / cols.max(1);
    let mut out = vec![0u8; rows * rb];
    for r in 0..rows {
        for c in 0..cols {
            let q = codes[r * cols + c] & 0x0F;
            out[r * rb + c / 2] |= if c % 2 == 0 { q } else { q << 4 };
        }
    }
    out
}
