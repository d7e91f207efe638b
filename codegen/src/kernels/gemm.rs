//! `gemm` (f32 weights) and `logits` (the f32 table, or its int8 copy with int8 activations).

use super::{Emitter, P, V4};
use cranelift_codegen::ir::{InstBuilder, Value, types};
use cranelift_frontend::Variable;
use std::mem::offset_of;
use wkvc_ir::kernel::args::*;

/// y[i, n] (+= r) = x[i] . w[n] for f32 weights.
/// `offsets`: of x, m, w, y, ldy, n0, n1, r, ldr in the kind's argument struct (`gemm` or
/// the f32 `logits`).
pub(super) fn emit_gemm(e: &mut Emitter, k: usize, residual: bool, offsets: [usize; 9]) {
    let [x, m, w, y, ldy, n0, n1, r, ldr] = e.fields(offsets);
    let zero = e.ic(0);
    e.for_range(n0, n1, 1, &mut |e, n| {
        let wrow = e.addr(w, n, 4 * k as i64);
        e.for_range(zero, m, 1, &mut |e, i| {
            let xr = e.addr(x, i, 4 * k as i64);
            let zv = e.vc(0.0);
            let accs: Vec<Variable> = (0..4).map(|_| e.var(V4, zv)).collect();
            let z0 = e.ic(0);
            let nvec = e.ic((k / 16 * 16) as i64);
            e.for_range(z0, nvec, 16, &mut |e, c| {
                let xa = e.addr(xr, c, 4);
                let wa = e.addr(wrow, c, 4);
                for (j, v) in accs.iter().enumerate() {
                    let xv = e.ld(V4, xa, 16 * j as i64);
                    let wv = e.ld(V4, wa, 16 * j as i64);
                    let acc = e.get(*v);
                    let acc = e.mul_add(xv, wv, acc);
                    e.set(*v, acc);
                }
            });
            let vs: Vec<Value> = accs.iter().map(|v| e.get(*v)).collect();
            let s01 = e.b.ins().fadd(vs[0], vs[1]);
            let s23 = e.b.ins().fadd(vs[2], vs[3]);
            let s = e.b.ins().fadd(s01, s23);
            let mut s = e.hsum(s);
            for c in k / 16 * 16..k {
                let xv = e.ld(types::F32, xr, 4 * c as i64);
                let wv = e.ld(types::F32, wrow, 4 * c as i64);
                s = e.mul_add(xv, wv, s);
            }
            e.store_out(s, i, n, y, ldy, residual.then_some((r, ldr)));
        });
    });
}

/// y[i, n] = sum over blocks of ws[n, b] * dx[i, b] * (wq[n, b] . xq[i, b]), int8 x int8 in
/// 32-bit lanes (`pmaddwd` on the sign-extended halves).
pub(super) fn emit_logits_int8(e: &mut Emitter, dim: usize) {
    use LogitsArgs as A;
    let [xq, dx, m, wq, ws, y, ldy, n0, n1] = e.fields([
        offset_of!(A, xq),
        offset_of!(A, dx),
        offset_of!(A, m),
        offset_of!(A, wq),
        offset_of!(A, ws),
        offset_of!(A, y),
        offset_of!(A, ldy),
        offset_of!(A, n0),
        offset_of!(A, n1),
    ]);
    let nb = dim / 32;
    let zero = e.ic(0);
    e.for_range(n0, n1, 1, &mut |e, n| {
        let wrow = e.addr(wq, n, dim as i64);
        let srow = e.addr(ws, n, 4 * nb as i64);
        e.for_range(zero, m, 1, &mut |e, i| {
            let xr = e.addr(xq, i, dim as i64);
            let dr = e.addr(dx, i, 4 * nb as i64);
            let zv = e.vc(0.0);
            let acc = e.var(V4, zv);
            let wpv = e.var(P, wrow);
            let xpv = e.var(P, xr);
            let spv = e.var(P, srow);
            let dpv = e.var(P, dr);
            let end = e.ic(nb as i64);
            e.for_range(zero, end, 1, &mut |e, _b| {
                let (wp, xp, sp, dp) = (e.get(wpv), e.get(xpv), e.get(spv), e.get(dpv));
                let mut d = None;
                for h in 0..2 {
                    let w8 = e.ld_ro(types::I8X16, wp, 16 * h);
                    let x8 = e.ld_ro(types::I8X16, xp, 16 * h);
                    for lowhalf in [true, false] {
                        let (w16, x16) = if lowhalf {
                            (e.b.ins().swiden_low(w8), e.b.ins().swiden_low(x8))
                        } else {
                            (e.b.ins().swiden_high(w8), e.b.ins().swiden_high(x8))
                        };
                        let wl = e.b.ins().swiden_low(w16);
                        let xl = e.b.ins().swiden_low(x16);
                        let wh = e.b.ins().swiden_high(w16);
                        let xh = e.b.ins().swiden_high(x16);
                        let pl = e.b.ins().imul(wl, xl);
                        let ph = e.b.ins().imul(wh, xh);
                        let p = e.b.ins().iadd_pairwise(pl, ph);
                        d = Some(match d {
                            None => p,
                            Some(q) => e.b.ins().iadd(q, p),
                        });
                    }
                }
                let d = d.unwrap_or(zv);
                let f = e.b.ins().fcvt_from_sint(V4, d);
                let s = e.ld_ro(types::F32, sp, 0);
                let t = e.ld_ro(types::F32, dp, 0);
                let st = e.b.ins().fmul(s, t);
                let sv = e.b.ins().splat(V4, st);
                let ac = e.get(acc);
                let ac = e.mul_add(f, sv, ac);
                e.set(acc, ac);
                for (v, step) in [(wpv, 32), (xpv, 32), (spv, 4), (dpv, 4)] {
                    let p = e.get(v);
                    let p = e.b.ins().iadd_imm_s(p, step);
                    e.set(v, p);
                }
            });
            let ac = e.get(acc);
            let s = e.hsum(ac);
            e.store_out(s, i, n, y, ldy, None);
        });
    });
}
