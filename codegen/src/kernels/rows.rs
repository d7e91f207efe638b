//! The row-wise kernels: `rms_norm`, `silu_mul`, `embed`.

use super::{Emitter, V4, mem};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, types};
use std::mem::offset_of;
use wkvc_ir::kernel::args::*;

/// y = x / sqrt(mean(x^2) + eps) * w per row; the mean and root in f64 like the interpreter.
pub(super) fn emit_rms(e: &mut Emitter, dim: usize, eps: f64) {
    use RmsNormArgs as A;
    let [x, w, y, m] = e.fields([
        offset_of!(A, x),
        offset_of!(A, w),
        offset_of!(A, y),
        offset_of!(A, m),
    ]);
    let zero = e.ic(0);
    e.for_range(zero, m, 1, &mut |e, i| {
        let xr = e.addr(x, i, 4 * dim as i64);
        let yr = e.addr(y, i, 4 * dim as i64);
        // sum of squares in f64 (two f64x2 per f32x4)
        let z2 = e.b.ins().f64const(0.0);
        let z2 = e.b.ins().splat(types::F64X2, z2);
        let mut acc = [z2; 4];
        for j in 0..dim / 4 {
            let v = e.ld(V4, xr, 16 * j as i64);
            let lo = e.b.ins().fvpromote_low(v);
            let le = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
            let sh = e.b.ins().bitcast(types::I8X16, le, v);
            let hiv = {
                let m =
                    e.b.func
                        .dfg
                        .immediates
                        .push(cranelift_codegen::ir::ConstantData::from(
                            [8u8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7].as_slice(),
                        ));
                let t = e.b.ins().shuffle(sh, sh, m);
                e.b.ins().bitcast(V4, le, t)
            };
            let hi = e.b.ins().fvpromote_low(hiv);
            let a0 = acc[(2 * j) % 4];
            acc[(2 * j) % 4] = e.mul_add(lo, lo, a0);
            let a1 = acc[(2 * j + 1) % 4];
            acc[(2 * j + 1) % 4] = e.mul_add(hi, hi, a1);
        }
        let s01 = e.b.ins().fadd(acc[0], acc[1]);
        let s23 = e.b.ins().fadd(acc[2], acc[3]);
        let s = e.b.ins().fadd(s01, s23);
        let l0 = e.b.ins().extractlane(s, 0);
        let l1 = e.b.ins().extractlane(s, 1);
        let mut ss = e.b.ins().fadd(l0, l1);
        for c in dim / 4 * 4..dim {
            let v = e.ld(types::F32, xr, 4 * c as i64);
            let d = e.b.ins().fpromote(types::F64, v);
            ss = e.mul_add(d, d, ss);
        }
        let nd = e.b.ins().f64const(dim as f64);
        let mean = e.b.ins().fdiv(ss, nd);
        let epsc = e.b.ins().f64const(eps);
        let t = e.b.ins().fadd(mean, epsc);
        let t = e.b.ins().sqrt(t);
        let one = e.b.ins().f64const(1.0);
        let inv = e.b.ins().fdiv(one, t);
        let inv = e.b.ins().fdemote(types::F32, inv);
        let iv = e.b.ins().splat(V4, inv);
        for j in 0..dim / 4 {
            let v = e.ld(V4, xr, 16 * j as i64);
            let wv = e.ld(V4, w, 16 * j as i64);
            let t = e.b.ins().fmul(v, iv);
            let t = e.b.ins().fmul(t, wv);
            e.st(t, yr, 16 * j as i64);
        }
        for c in dim / 4 * 4..dim {
            let v = e.ld(types::F32, xr, 4 * c as i64);
            let wv = e.ld(types::F32, w, 4 * c as i64);
            let t = e.b.ins().fmul(v, inv);
            let t = e.b.ins().fmul(t, wv);
            e.st(t, yr, 4 * c as i64);
        }
    });
}

/// y = g / (1 + e^-g) * u with gu = [g | u] per row.
pub(super) fn emit_silu_mul(e: &mut Emitter, n: usize) {
    use SiluMulArgs as A;
    let [x, y, m] = e.fields([offset_of!(A, x), offset_of!(A, y), offset_of!(A, m)]);
    let zero = e.ic(0);
    e.for_range(zero, m, 1, &mut |e, i| {
        let xr = e.addr(x, i, 8 * n as i64);
        let yr = e.addr(y, i, 4 * n as i64);
        let z0 = e.ic(0);
        let nv = e.ic((n / 4 * 4) as i64);
        e.for_range(z0, nv, 4, &mut |e, c| {
            let gp = e.addr(xr, c, 4);
            let g = e.ld(V4, gp, 0);
            let u = e.ld(V4, gp, 4 * n as i64);
            let ng = e.b.ins().fneg(g);
            let ex = e.exp(ng, true);
            let one = e.vc(1.0);
            let d = e.b.ins().fadd(one, ex);
            let sg = e.b.ins().fdiv(g, d);
            let v = e.b.ins().fmul(sg, u);
            let yp = e.addr(yr, c, 4);
            e.st(v, yp, 0);
        });
        for c in n / 4 * 4..n {
            let g = e.ld(types::F32, xr, 4 * c as i64);
            let u = e.ld(types::F32, xr, 4 * (n + c) as i64);
            let ng = e.b.ins().fneg(g);
            let ex = e.exp(ng, false);
            let one = e.fc(1.0);
            let d = e.b.ins().fadd(one, ex);
            let sg = e.b.ins().fdiv(g, d);
            let v = e.b.ins().fmul(sg, u);
            e.st(v, yr, 4 * c as i64);
        }
    });
}

/// y[i] = table[ids[i]] (ids checked by the caller).
pub(super) fn emit_embed(e: &mut Emitter, dim: usize) {
    use EmbedArgs as A;
    let [ids, table, y, m] = e.fields([
        offset_of!(A, ids),
        offset_of!(A, table),
        offset_of!(A, y),
        offset_of!(A, m),
    ]);
    let zero = e.ic(0);
    e.for_range(zero, m, 1, &mut |e, i| {
        let ip = e.addr(ids, i, 4);
        let id = e.b.ins().sload32(mem(), ip, 0);
        let src = e.addr(table, id, 4 * dim as i64);
        let dst = e.addr(y, i, 4 * dim as i64);
        for j in 0..dim / 4 {
            let v = e.ld(V4, src, 16 * j as i64);
            e.st(v, dst, 16 * j as i64);
        }
        for c in dim / 4 * 4..dim {
            let v = e.ld(types::F32, src, 4 * c as i64);
            e.st(v, dst, 4 * c as i64);
        }
    });
}
