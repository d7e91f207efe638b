//! `qgemm`: the quantized GEMM (packed int4 weights in the engine's tile order, f32 or int8
//! activations), its weight layout and the activation prep.

use super::{Emitter, P, V4, mem_ro};
use cranelift_codegen::ir::{InstBuilder, Value, types};
use cranelift_frontend::Variable;
use std::mem::offset_of;
use wkvc_ir::Act;
use wkvc_ir::kernel::args::*;

/// Rows per weight tile of `qgemm` (see `tile_codes`).
pub const QTILE: usize = wkvc_ir::kernel::QGEMM_TILE;

/// The `qgemm` weight layout, from packed int4 rows (`k / 2` bytes each, low nibble first):
/// rows in tiles of `QTILE` (the last tile padded with zero rows); within a tile, each
/// 32-column block of a group (16 bytes per row) and each group's tail of `len % 32` columns
/// is stored for the tile's rows side by side, in column order. A decode step then reads
/// one sequential stream of weights. `gl` is the group length (even).
pub fn tile_codes(codes: &[u8], n: usize, k: usize, gl: usize) -> Vec<u8> {
    let kb = k / 2;
    let mut out = vec![0u8; n.div_ceil(QTILE) * QTILE * kb];
    // (byte offset, bytes) of each segment of a row
    let mut segs = Vec::new();
    for c0 in (0..k).step_by(gl.max(2)) {
        let len = gl.min(k - c0);
        for b in 0..len / 32 {
            segs.push(((c0 + 32 * b) / 2, 16));
        }
        if !len.is_multiple_of(32) {
            segs.push(((c0 + len / 32 * 32) / 2, (len % 32) / 2));
        }
    }
    for (r, src) in codes.chunks_exact(kb).take(n).enumerate() {
        let tile = &mut out[(r / QTILE) * QTILE * kb..][..QTILE * kb];
        let j = r % QTILE;
        for &(o, w) in &segs {
            tile[QTILE * o + j * w..][..w].copy_from_slice(&src[o..o + w]);
        }
    }
    out
}

/// Per-group scales (or zeros) of `n` rows x `ng` groups in the `qgemm` tile order: for
/// each tile of `QTILE` rows and each group, the tile's rows side by side (zero padded).
pub fn tile_params(p: &[f32], n: usize, ng: usize) -> Vec<f32> {
    let mut out = vec![0f32; n.div_ceil(QTILE) * QTILE * ng];
    for (r, row) in p.chunks_exact(ng).take(n).enumerate() {
        let (t, j) = (r / QTILE, r % QTILE);
        for (g, &v) in row.iter().enumerate() {
            out[(t * ng + g) * QTILE + j] = v;
        }
    }
    out
}

/// y[i, n] (+= r) = sum over groups of s*(x.q - z*sum(x)).
pub(super) fn emit_qgemm(e: &mut Emitter, k: usize, gl: usize, residual: bool, act: Act) {
    use QGemmArgs as A;
    let a = e
        .fields([
            offset_of!(A, xp),
            offset_of!(A, gsum),
            offset_of!(A, dx),
            offset_of!(A, x),
            offset_of!(A, m),
            offset_of!(A, w),
            offset_of!(A, s),
            offset_of!(A, z),
            offset_of!(A, y),
            offset_of!(A, ldy),
            offset_of!(A, n0),
            offset_of!(A, n1),
            offset_of!(A, r),
            offset_of!(A, ldr),
        ])
        .to_vec();
    let c = QGemm {
        k,
        gl,
        ng: k.div_ceil(gl),
        nb: (k / gl) * (gl / 32) + (k % gl) / 32,
        act,
        residual,
        a,
    };
    let (m, n0, n1) = (c.a[4], c.a[10], c.a[11]);
    // Weight rows in blocks of about 16 KiB (they stay in L1) x activation rows in blocks of
    // 4 (the unpacked codes serve 4 rows): the activations stream through once per block.
    // (whole tiles of QTILE rows)
    let nblk = (16384 / (k / 2).max(1))
        .clamp(QTILE, 64)
        .next_multiple_of(QTILE) as i64;
    let zero = e.ic(0);
    // (activation rows, weight rows) per step: the int8 path shares an activation block
    // among 4 weight rows in decode and 2 in prefill; the f32 path's unpacked codes take too
    // many registers for that.
    // Every output is summed the same way whatever the rows of the call (so a batch of
    // sessions gives each row what it gets alone): the f32 path keeps 4 FMA chains per output
    // (latency, in decode) and takes activation rows in blocks of 2 (which keeps its
    // registers in bounds); the int8 path sums in integers, one chain.
    let (rblock, nr4, nr1) = match act {
        Act::Int8 => (4, 1, QTILE),
        Act::F32 => (2, 1, 1),
    };
    e.for_blocks(n0, n1, nblk, &mut |e, nb, ne| {
        let rows = |e: &mut Emitter, i: Value, rr: usize, nr: usize| {
            let mut nb = nb;
            if nr == QTILE {
                // single rows up to the first tile boundary (a range that starts mid-tile)
                let up = e.b.ins().iadd_imm_s(nb, QTILE as i64 - 1);
                let up = e.b.ins().band_imm_s(up, !(QTILE as i64 - 1));
                let up = e.b.ins().umin(up, ne);
                e.for_range(nb, up, 1, &mut |e, n| qgemm_rows(e, &c, i, n, rr, 1));
                nb = up;
            }
            let n = e.for_range(nb, ne, nr as i64, &mut |e, n| {
                qgemm_rows(e, &c, i, n, rr, nr)
            });
            if nr > 1 {
                e.for_range(n, ne, 1, &mut |e, n| qgemm_rows(e, &c, i, n, rr, 1));
            }
        };
        let i = e.for_range(zero, m, rblock as i64, &mut |e, i| rows(e, i, rblock, nr4));
        e.for_range(i, m, 1, &mut |e, i| rows(e, i, 1, nr1));
    });
}

struct QGemm {
    k: usize,
    gl: usize,
    ng: usize,
    /// int8 blocks per activation row
    nb: usize,
    act: Act,
    residual: bool,
    /// the argument words: xp, gsum, dx, x, m, w, s, z, y, ldy, n0, n1, r, ldr
    a: Vec<Value>,
}

/// Output rows n..n+nr for activation rows i..i+rr. Groups and their 32-column blocks are
/// runtime loops: the loop-carried accumulators keep each block's loads next to their use
/// (Cranelift places pure values at their uses, so straight-line code would load everything
/// first and spill). Several weight rows share each activation load (decode), several
/// activation rows share each unpacked weight block (prefill).
fn qgemm_rows(e: &mut Emitter, c: &QGemm, i: Value, n: Value, rr: usize, nr: usize) {
    let (k, gl, ng, nb) = (c.k, c.gl, c.ng, c.nb);
    let a = &c.a;
    let xw = if c.act == Act::Int8 { 1 } else { 4 };
    let kb = (k / 2) as i64;
    let qt = QTILE as i64;
    // the weights in tiles of QTILE rows (`tile_codes`, `tile_params`): row n is row j of
    // the tile at n & !7; with nr = QTILE, n starts a tile and j = 0..QTILE are constants
    let nt = e.b.ins().band_imm_s(n, !(qt - 1));
    let jr = if nr == QTILE {
        e.ic(0)
    } else {
        e.b.ins().band_imm_s(n, qt - 1)
    };
    let tbase = e.addr(a[5], nt, kb);
    let wrow = e.addr(tbase, jr, 16);
    let sbase = e.addr(a[6], nt, 4 * ng as i64);
    let srow = e.addr(sbase, jr, 4);
    let zbase = e.addr(a[7], nt, 4 * ng as i64);
    let zrow = e.addr(zbase, jr, 4);
    let x0 = e.addr(a[0], i, (k * xw) as i64);
    let gs0 = e.addr(a[1], i, 4 * ng as i64);
    let dx0 = e.addr(a[2], i, 4 * nb as i64);
    let xo0 = e.addr(a[3], i, 4 * k as i64);
    // independent FMA chains per output (the same for every block shape: see emit_qgemm)
    let accs = match c.act {
        Act::F32 => 4,
        Act::Int8 => 1,
    };
    let zv = e.vc(0.0);
    let zs = e.fc(0.0);
    let outs = rr * nr; // output (ri, j) at ri * nr + j
    let tot: Vec<Variable> = (0..outs).map(|_| e.var(V4, zv)).collect();
    let corr: Vec<Variable> = (0..outs).map(|_| e.var(types::F32, zs)).collect();
    // zero-point terms in vectors of 4 rows when the rows come in fours
    let vcorr = nr.is_multiple_of(4);
    let corrv: Vec<Variable> = if vcorr {
        (0..outs / 4).map(|_| e.var(V4, zv)).collect()
    } else {
        Vec::new()
    };
    let dxp = e.var(P, dx0);
    // one group of `len` columns at runtime group index `g`
    let group = |e: &mut Emitter, g: Value, len: usize| {
        let c0 = e.b.ins().imul_imm_s(g, gl as i64);
        let zv = e.vc(0.0);
        let acc: Vec<Variable> = (0..outs * accs).map(|_| e.var(V4, zv)).collect();
        let cend = e.b.ins().iadd_imm_s(c0, (len / 32 * 32) as i64);
        // pointers are loop-carried (Cranelift would otherwise recompute them per block)
        // a tile holds each block of its rows side by side: block at column c0 of row j
        // starts at byte 8 * c0 / 2 + 16 * j
        let w_off = e.b.ins().imul_imm_s(c0, qt / 2);
        let w_start = e.b.ins().iadd(wrow, w_off);
        let x_start = e.addr(x0, c0, xw as i64);
        let wpv = e.var(P, w_start);
        let xpv = e.var(P, x_start);
        e.for_range(c0, cend, 32, &mut |e, _col| {
            let wp = e.get(wpv);
            let xp = e.get(xpv);
            let wn = e.b.ins().iadd_imm_s(wp, 16 * qt);
            e.set(wpv, wn);
            let xn = e.b.ins().iadd_imm_s(xp, 32 * xw as i64);
            e.set(xpv, xn);
            match c.act {
                Act::F32 => {
                    for j in 0..nr {
                        let q = e.codes32_ro(wp, 16 * j as i64);
                        for ri in 0..rr {
                            for (t, &qt) in q.iter().enumerate() {
                                let xv = e.ld_ro(V4, xp, ((ri * k + 4 * t) * 4) as i64);
                                let v = acc[(ri * nr + j) * accs + t % accs];
                                let s = e.get(v);
                                let s = e.mul_add(qt, xv, s);
                                e.set(v, s);
                            }
                        }
                    }
                }
                Act::Int8 => {
                    let dp = e.get(dxp);
                    let xs: Vec<(Value, Value, Value)> = (0..rr)
                        .map(|ri| {
                            let a0 = e.ld_ro(types::I8X16, xp, (ri * k) as i64);
                            let a1 = e.ld_ro(types::I8X16, xp, (ri * k + 16) as i64);
                            let sx = e.ld_ro(types::F32, dp, (4 * ri * nb) as i64);
                            let sv = e.b.ins().splat(V4, sx);
                            (a0, a1, sv)
                        })
                        .collect();
                    for j in 0..nr {
                        let (lo, hi) = e.nibbles_ro(wp, 16 * j as i64);
                        for (ri, &(a0, a1, sv)) in xs.iter().enumerate() {
                            let p0 = e.b.ins().x86_pmaddubsw(a0, lo);
                            let p1 = e.b.ins().x86_pmaddubsw(a1, hi);
                            let p = e.b.ins().iadd(p0, p1);
                            let pl = e.b.ins().swiden_low(p);
                            let ph = e.b.ins().swiden_high(p);
                            let d = e.b.ins().iadd_pairwise(pl, ph);
                            let f = e.b.ins().fcvt_from_sint(V4, d);
                            let v = acc[(ri * nr + j) * accs];
                            let s = e.get(v);
                            let s = e.mul_add(f, sv, s);
                            e.set(v, s);
                        }
                    }
                    let dn = e.b.ins().iadd_imm_s(dp, 4);
                    e.set(dxp, dn);
                }
            }
        });
        // columns past the last full block: scalar, from the original activations
        let tb = e.b.ins().iadd_imm_s(c0, (len / 32 * 32) as i64);
        // the tail's bytes of the tile's rows side by side too (tail bytes tl per row)
        let tl = ((len % 32) / 2) as i64;
        let t_off = e.b.ins().imul_imm_s(tb, qt / 2);
        let wt = e.b.ins().iadd(tbase, t_off);
        let jt = e.b.ins().imul_imm_s(jr, tl);
        let wt = e.b.ins().iadd(wt, jt);
        let xt = e.addr(xo0, tb, 4);
        let mut tacc = vec![zs; outs];
        for t in (0..len % 32).step_by(2) {
            for j in 0..nr {
                let off = j as i64 * tl + (t / 2) as i64;
                let byte = e.b.ins().uload8(types::I32, mem_ro(), wt, off as i32);
                let q0 = e.b.ins().band_imm_s(byte, 15);
                let q1 = e.b.ins().ushr_imm_u(byte, 4);
                let f0 = e.b.ins().fcvt_from_sint(types::F32, q0);
                let f1 = e.b.ins().fcvt_from_sint(types::F32, q1);
                for ri in 0..rr {
                    let x0v = e.ld_ro(types::F32, xt, (4 * (ri * k + t)) as i64);
                    let x1v = e.ld_ro(types::F32, xt, (4 * (ri * k + t + 1)) as i64);
                    let ta = &mut tacc[ri * nr + j];
                    *ta = e.mul_add(f0, x0v, *ta);
                    *ta = e.mul_add(f1, x1v, *ta);
                }
            }
        }
        let sp = e.addr(srow, g, 4 * qt);
        let zp = e.addr(zrow, g, 4 * qt);
        let gp = e.addr(gs0, g, 4);
        if vcorr {
            // the zero-point terms of 4 rows at a time: their scales and zeros lie side by
            // side in the tile (same arithmetic per lane as the scalar form)
            for ri in 0..rr {
                let gs = e.ld_ro(types::F32, gp, (4 * ri * ng) as i64);
                let gsv = e.b.ins().splat(V4, gs);
                for q in 0..nr / 4 {
                    let s4 = e.ld_ro(V4, sp, 16 * q as i64);
                    let z4 = e.ld_ro(V4, zp, 16 * q as i64);
                    let zx = e.b.ins().fmul(z4, gsv);
                    let d = if !len.is_multiple_of(32) {
                        let o = ri * nr + 4 * q;
                        let mut t4 = e.b.ins().splat(V4, tacc[o]);
                        for l in 1..4u8 {
                            t4 = e.b.ins().insertlane(t4, tacc[o + l as usize], l);
                        }
                        e.b.ins().fsub(zx, t4)
                    } else {
                        zx
                    };
                    let cv = corrv[ri * (nr / 4) + q];
                    let cr = e.get(cv);
                    let cr = e.mul_add(s4, d, cr);
                    e.set(cv, cr);
                }
            }
        }
        for j in 0..nr {
            let sg = e.ld_ro(types::F32, sp, (4 * j) as i64);
            let sv = e.b.ins().splat(V4, sg);
            for ri in 0..rr {
                let o = ri * nr + j;
                let mut v = e.get(acc[o * accs]);
                for t in 1..accs {
                    let x = e.get(acc[o * accs + t]);
                    v = e.b.ins().fadd(v, x);
                }
                let t = e.get(tot[o]);
                let t = e.mul_add(v, sv, t);
                e.set(tot[o], t);
                if vcorr {
                    continue;
                }
                let zg = e.ld_ro(types::F32, zp, (4 * j) as i64);
                let gs = e.ld_ro(types::F32, gp, (4 * ri * ng) as i64);
                let zx = e.b.ins().fmul(zg, gs);
                let d = e.b.ins().fsub(zx, tacc[o]);
                let cr = e.get(corr[o]);
                let cr = e.mul_add(sg, d, cr);
                e.set(corr[o], cr);
            }
        }
    };
    let zero = e.ic(0);
    let nfull = e.ic((k / gl) as i64);
    e.for_range(zero, nfull, 1, &mut |e, g| group(e, g, gl));
    if k % gl > 0 {
        let g = e.ic((k / gl) as i64);
        group(e, g, k % gl);
    }
    for ri in 0..rr {
        for j in 0..nr {
            let o = ri * nr + j;
            let t = e.get(tot[o]);
            let t = e.hsum(t);
            let cr = if vcorr {
                let cv = e.get(corrv[o / 4]);
                e.b.ins().extractlane(cv, (o % 4) as u8)
            } else {
                e.get(corr[o])
            };
            let v = e.b.ins().fsub(t, cr);
            let iq = e.b.ins().iadd_imm_s(i, ri as i64);
            let nj = e.b.ins().iadd_imm_s(n, j as i64);
            let res = c.residual.then(|| (a[12], a[13]));
            e.store_out(v, iq, nj, a[8], a[9], res);
        }
    }
}

/// Permute one row for the quantized GEMM (f32 activations): per group, each full block of
/// 32 columns becomes evens then odds; the tail keeps its order. `gsum` gets the group sums.
pub fn prep_f32(x: &[f32], k: usize, gl: usize, xp: &mut [f32], gsum: &mut [f32]) {
    for (g, gs) in gsum.iter_mut().enumerate().take(k.div_ceil(gl)) {
        let a = g * gl;
        let b = (a + gl).min(k);
        let full = (b - a) / 32 * 32;
        let mut s = 0f32;
        for blk in (a..a + full).step_by(32) {
            for t in 0..16 {
                xp[blk + t] = x[blk + 2 * t];
                xp[blk + 16 + t] = x[blk + 2 * t + 1];
            }
        }
        xp[a + full..b].copy_from_slice(&x[a + full..b]);
        for &v in &x[a..b] {
            s += v;
        }
        *gs = s;
    }
}

/// One 32-column block of `prep_int8`: its codes (evens, then odds), scale and code sum.
pub(crate) fn prep_int8_block_scalar(x: &[f32], xq: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = 0i32;
    for (t, &v) in x.iter().enumerate().take(32) {
        let q = wkvc_ir::quant::rne(v * inv).clamp(-127.0, 127.0) as i8;
        let pos = if t % 2 == 0 { t / 2 } else { 16 + t / 2 };
        xq[pos] = q;
        qs += q as i32;
    }
    (d, qs)
}

/// Quantize one row to int8 per block of 32 (scale max|x|/127, round half to even), permuted
/// like `prep_f32`; `dx` gets the block scales, `gsum` per group the sum of the dequantized
/// blocks plus the exact tail.
pub fn prep_int8(x: &[f32], k: usize, gl: usize, xq: &mut [i8], dx: &mut [f32], gsum: &mut [f32]) {
    let mut nb = 0;
    for (g, gs) in gsum.iter_mut().enumerate().take(k.div_ceil(gl)) {
        let a = g * gl;
        let b = (a + gl).min(k);
        let full = (b - a) / 32 * 32;
        let mut s = 0f32;
        for blk in (a..a + full).step_by(32) {
            let (xb, qb) = (&x[blk..blk + 32], &mut xq[blk..blk + 32]);
            let (d, qs) = match crate::native::prep_int8_block(xb, qb) {
                Some(r) => r,
                None => prep_int8_block_scalar(xb, qb),
            };
            dx[nb] = d;
            nb += 1;
            s += d * qs as f32;
        }
        for &v in &x[a + full..b] {
            s += v;
        }
        *gs = s;
    }
}

#[cfg(test)]
mod tests {
    use super::prep_int8_block_scalar;

    /// The vector block quantizer (where the host has one) writes the scalar loop's codes
    /// and returns its scale and code sum, bit for bit, on ordinary rows, ties at .5, zero and
    /// tiny blocks, and non-finite values (which it leaves to the scalar loop).
    #[test]
    fn vector_block_prep_equals_the_scalar_one() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let mut cases: Vec<Vec<f32>> = Vec::new();
        for scale in [1e-30f32, 1e-3, 1.0, 37.0, 1e6] {
            for _ in 0..200 {
                cases.push((0..32).map(|_| rnd() * scale).collect());
            }
        }
        // ties: amax 127 makes every x / d an integer or a half
        cases.push(
            (0..32)
                .map(|t| if t == 0 { 127.0 } else { t as f32 + 0.5 })
                .collect(),
        );
        cases.push((0..32).map(|t| -(t as f32) - 0.5).collect());
        cases.push(vec![0.0; 32]);
        cases.push((0..32).map(|t| f32::from_bits(t + 1)).collect());
        let mut special = vec![1.0f32; 32];
        special[5] = f32::NAN;
        cases.push(special.clone());
        special[5] = f32::INFINITY;
        cases.push(special.clone());
        special[5] = f32::NEG_INFINITY;
        cases.push(special);
        let mut vector = 0;
        for x in &cases {
            let mut q0 = [0i8; 32];
            let r0 = prep_int8_block_scalar(x, &mut q0);
            let mut q1 = [0i8; 32];
            if let Some(r1) = crate::native::prep_int8_block(x, &mut q1) {
                vector += 1;
                assert_eq!(r0.0.to_bits(), r1.0.to_bits(), "scale of {x:?}");
                assert_eq!(r0.1, r1.1, "code sum of {x:?}");
                assert_eq!(q0, q1, "codes of {x:?}");
            }
        }
        if crate::native::CpuIsa::Avx2.supported() {
            assert!(
                vector >= 1000,
                "the vector path took {vector} of {} blocks",
                cases.len()
            );
        }
    }
}
