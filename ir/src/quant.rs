//! The quantizer shared by weights and the KV cache (WKVQUANT.md sections 1-2; the reference
//! README's definition): per group, asymmetric, min/max based,
//!   scale = (gamma*max - beta*min) / (2^bits - 1)   (floored at 1e-8),
//!   zero  = round(-beta*min / scale),
//!   q     = clamp(round(x / scale) + zero, 0, 2^bits - 1),   x^ = (q - zero) * scale,
//! rounding half to even. Scale and zero are stored as f16 (the scale rounded up, so the range
//! still fits the grid) and the codes are computed with the stored values, so fake
//! quantization and packed storage give identical numbers.

use half::f16;

/// Largest integer that f16 holds exactly; zero-points are clamped to it.
const F16_EXACT_INT: f32 = 2048.0;

/// Precision in which scale and zero-point are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamDtype {
    /// Stored as f16 (plans, the packed KV cache); the scale is rounded up to an f16.
    F16,
    /// Kept in f32: the reference definition, for comparisons (not packable).
    F32,
}

impl ParamDtype {
    pub fn from_attr(s: Option<&str>) -> ParamDtype {
        match s {
            Some("f32") => ParamDtype::F32,
            _ => ParamDtype::F16,
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            ParamDtype::F16 => 2,
            ParamDtype::F32 => 4,
        }
    }
}

/// Scale and zero-point of a group with the given (clipped) range, as stored.
pub fn params_in(
    min: f32,
    max: f32,
    bits: u32,
    gamma: f32,
    beta: f32,
    pd: ParamDtype,
) -> (f32, f32) {
    let qmax = ((1u32 << bits) - 1) as f32;
    let (hi, lo) = (gamma * max, beta * min);
    let s = ((hi - lo) / qmax).max(1e-8);
    match pd {
        ParamDtype::F32 => (s, (-lo / s).round_ties_even()),
        ParamDtype::F16 => {
            // Round the scale up to an f16: the group's range then still fits the grid and the
            // extremes (the outliers that matter most) are not clipped by a scale rounded down.
            let mut s16 = f16::from_f32(s);
            if s16.to_f32() < s {
                s16 = f16::from_bits(s16.to_bits() + 1);
            }
            let sf = s16.to_f32();
            let z = (-lo / sf)
                .round_ties_even()
                .clamp(-F16_EXACT_INT, F16_EXACT_INT);
            (sf, z)
        }
    }
}

/// f16 scale and zero-point (the storage form of plans).
pub fn params(min: f32, max: f32, bits: u32, gamma: f32, beta: f32) -> (f16, f16) {
    let (s, z) = params_in(min, max, bits, gamma, beta, ParamDtype::F16);
    (f16::from_f32(s), f16::from_f32(z))
}

/// Round half to even, branch-light (vectorisable): adding and subtracting 1.5 * 2^23 rounds
/// to an integer in the default rounding mode for |x| < 2^22; equals `f32::round_ties_even`.
#[inline]
pub fn rne(x: f32) -> f32 {
    const M: f32 = 12582912.0;
    if x.abs() < 4194304.0 {
        (x + M) - M
    } else {
        x.round_ties_even()
    }
}

#[inline]
pub fn code(x: f32, s: f32, z: f32, qmax: f32) -> u8 {
    (rne(x / s) + z).clamp(0.0, qmax) as u8
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
    let (c, s, z) = quantize_rows_in(w, cols, bits, group, gamma, beta, ParamDtype::F16);
    (
        c,
        s.iter().map(|&v| f16::from_f32(v)).collect(),
        z.iter().map(|&v| f16::from_f32(v)).collect(),
    )
}

/// `quantize_rows` with scales and zeros in the given precision (as f32 numbers).
pub fn quantize_rows_in(
    w: &[f32],
    cols: usize,
    bits: u32,
    group: i64,
    gamma: &[f32],
    beta: &[f32],
    pd: ParamDtype,
) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
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
            let (s, z) = params_in(mn, mx, bits, gamma[r * ng + g], beta[r * ng + g], pd);
            for i in a..b {
                codes[i] = code(w[i], s, z, qmax);
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
    pd: ParamDtype,
) -> Vec<f32> {
    let (codes, s, z) = quantize_rows_in(w, cols, bits, group, gamma, beta, pd);
    let codes: Vec<f32> = codes.iter().map(|&c| c as f32).collect();
    dequantize_rows(&codes, cols, group, &s, &z)
}

/// One KV group (a token's head): codes written into `out`, returns (scale, zero).
pub fn quantize_group(x: &[f32], bits: u32, pd: ParamDtype, out: &mut [u8]) -> (f32, f32) {
    let (mn, mx) = min_max(x);
    let (s, z) = params_in(mn, mx, bits, 1.0, 1.0, pd);
    let qmax = ((1u32 << bits) - 1) as f32;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = code(v, s, z, qmax);
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

#[cfg(test)]
mod tests {
    #[test]
    fn rne_is_round_ties_even() {
        let mut x = -5.0e6f32;
        while x < 5.0e6 {
            for d in [
                0.0f32, 0.5, 0.25, 0.75, 1.5, 2.5, -0.5, 0.49999997, 0.50000006,
            ] {
                let v = x + d;
                assert_eq!(super::rne(v), v.round_ties_even(), "{v}");
            }
            x += 9973.25;
        }
        for v in [
            0.5f32,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            4194303.5,
            -4194303.5,
            1e30,
            f32::MAX,
        ] {
            assert_eq!(super::rne(v), v.round_ties_even(), "{v}");
        }
        assert!(super::rne(f32::NAN).is_nan());
    }
}
