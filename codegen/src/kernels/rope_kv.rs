//! `rope_kv`: RoPE on q and k in place (and the K/V rotation: Hadamard blocks on each q and k
//! head), then K/V smoothed, quantized per (token, group of channels) and appended to the cache.

use super::{Emitter, M_RNE, P, V4};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value, types};
use std::mem::offset_of;
use wkvc_ir::kernel::args::*;

/// Host helper the KV quantizer calls: the stored (f16-rounded) scale and zero of a group, as
/// two f32 (for the codes) and as the cache's word (f16 scale in the low half, f16 zero in the
/// high half: the same two values).
///
/// # Safety
/// `out` must point to three writable 4-byte words.
pub unsafe extern "C" fn wkvc_kv_params(min: f32, max: f32, bits: u32, out: *mut f32) {
    let (s, z) =
        wkvc_ir::quant::params_in(min, max, bits, 1.0, 1.0, wkvc_ir::quant::ParamDtype::F16);
    let word = wkvc_ir::kvcache::pack_params(s, z);
    // SAFETY: the caller passes a pointer to three 4-byte words (a stack slot of the kernel).
    unsafe {
        *out = s;
        *out.add(1) = z;
        *(out.add(2) as *mut u32) = word;
    }
}

pub(super) fn emit_rope_kv(
    e: &mut Emitter,
    (heads, kvh, hd, rd): (usize, usize, usize, usize),
    (bits, group): (u32, usize),
    smooth: bool,
    rotate: usize,
    helper: Option<cranelift_codegen::ir::FuncRef>,
) {
    use RopeKvArgs as A;
    let [x, m, cos, sin, kc, kp, vc, vp, row0] = e.fields([
        offset_of!(A, x),
        offset_of!(A, m),
        offset_of!(A, cos),
        offset_of!(A, sin),
        offset_of!(A, kc),
        offset_of!(A, kp),
        offset_of!(A, vc),
        offset_of!(A, vp),
        offset_of!(A, row0),
    ]);
    let [ksh, ksc, vsh, vsc] = e.fields([
        offset_of!(A, ksh),
        offset_of!(A, ksc),
        offset_of!(A, vsh),
        offset_of!(A, vsc),
    ]);
    let width = (heads + 2 * kvh) * hd;
    let half = rd / 2;
    let kvw = kvh * hd;
    let slot =
        e.b.create_sized_stack_slot(cranelift_codegen::ir::StackSlotData::new(
            cranelift_codegen::ir::StackSlotKind::ExplicitSlot,
            (4 * (hd + 4)) as u32,
            4,
        ));
    let zero = e.ic(0);
    e.for_range(zero, m, 1, &mut |e, i| {
        let xr = e.addr(x, i, 4 * width as i64);
        let cr = e.addr(cos, i, 4 * half as i64);
        let sr = e.addr(sin, i, 4 * half as i64);
        // rotate-half on every q and k head: (a, b) -> (a cos - b sin, b cos + a sin)
        for h in 0..heads + kvh {
            let base = (h * hd) as i64 * 4;
            let mut j = 0;
            while j < half {
                let (ty, step) = if half - j >= 4 {
                    (V4, 4)
                } else {
                    (types::F32, 1)
                };
                let av = e.ld(ty, xr, base + 4 * j as i64);
                let bv = e.ld(ty, xr, base + 4 * (j + half) as i64);
                let cv = e.ld(ty, cr, 4 * j as i64);
                let sv = e.ld(ty, sr, 4 * j as i64);
                let ac = e.b.ins().fmul(av, cv);
                let bs = e.b.ins().fmul(bv, sv);
                let na = e.b.ins().fsub(ac, bs);
                let bc = e.b.ins().fmul(bv, cv);
                let as_ = e.b.ins().fmul(av, sv);
                let nb = e.b.ins().fadd(bc, as_);
                e.st(na, xr, base + 4 * j as i64);
                e.st(nb, xr, base + 4 * (j + half) as i64);
                j += step;
            }
        }
        if rotate > 0 {
            emit_hadamard_heads(e, xr, heads + kvh, hd, rotate);
        }
        let row = e.b.ins().iadd(row0, i);
        for (t, (cache, params, sh, sc)) in [(kc, kp, ksh, ksc), (vc, vp, vsh, vsc)]
            .into_iter()
            .enumerate()
        {
            let src = ((heads + t * kvh) * hd) as i64 * 4;
            if bits == 16 {
                let dst = e.addr(cache, row, 4 * kvw as i64);
                for c in 0..kvw {
                    let v = e.ld(types::F32, xr, src + 4 * c as i64);
                    e.st(v, dst, 4 * c as i64);
                }
                continue;
            }
            let rb = kvw.div_ceil(2) as i64;
            let ng = kvw / group;
            let crow = e.addr(cache, row, rb);
            let prow = e.addr(params, row, 4 * ng as i64);
            let buf = e.b.ins().stack_addr(P, slot, 0);
            for g in 0..ng {
                quantize_group_vec(
                    e, xr, src, g, group, smooth, sh, sc, buf, slot, helper, bits, crow, prow,
                );
            }
        }
    });
}

/// The orthonormal Hadamard transform of `block`-blocks on the first `n` heads of a row (q and
/// k), in place, in `wkvc_ir::math::hadamard_in_place`'s order (butterflies by stride 1, 2,
/// 4, .., then the scale): the same bits. A loop over heads; within a head the butterflies
/// are unrolled, f32x4 from stride 4 on, scalar below.
fn emit_hadamard_heads(e: &mut Emitter, xr: Value, n: usize, hd: usize, block: usize) {
    let scale = (1.0 / (block as f64).sqrt()) as f32;
    let zero = e.ic(0);
    let nh = e.ic(n as i64);
    e.for_range(zero, nh, 1, &mut |e, h| {
        let hb = e.addr(xr, h, 4 * hd as i64);
        let mut s = 1;
        while s < block {
            for base in (0..hd).step_by(2 * s) {
                let (ty, step) = if s >= 4 { (V4, 4) } else { (types::F32, 1) };
                for j in (base..base + s).step_by(step) {
                    let u = e.ld(ty, hb, 4 * j as i64);
                    let v = e.ld(ty, hb, 4 * (j + s) as i64);
                    let a = e.b.ins().fadd(u, v);
                    let d = e.b.ins().fsub(u, v);
                    e.st(a, hb, 4 * j as i64);
                    e.st(d, hb, 4 * (j + s) as i64);
                }
            }
            s *= 2;
        }
        let sv = e.vc(scale);
        for j in (0..hd).step_by(4) {
            let v = e.ld(V4, hb, 4 * j as i64);
            let v = e.b.ins().fmul(v, sv);
            e.st(v, hb, 4 * j as i64);
        }
    });
}

/// `rope_kv`'s quantize-append of group `g` of `hd` channels (a kv head, or a smaller group;
/// a multiple of 32) with f32x4: smooth
/// ((x - shift) / scale, the interpreter's division), min and max, the stored scale/zero (host
/// helper: f16 rounding; stored as one word of two f16), codes by round-half-even, clamped, narrowed to bytes and packed
/// two per byte (low nibble = even channel).
#[allow(clippy::too_many_arguments)]
fn quantize_group_vec(
    e: &mut Emitter,
    xr: Value,
    src: i64,
    g: usize,
    hd: usize,
    smooth: bool,
    sh: Value,
    sc: Value,
    buf: Value,
    slot: cranelift_codegen::ir::StackSlot,
    helper: Option<cranelift_codegen::ir::FuncRef>,
    bits: u32,
    crow: Value,
    prow: Value,
) {
    let le = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
    let inf = e.vc(f32::INFINITY);
    let ninf = e.vc(f32::NEG_INFINITY);
    let (mut mn, mut mx) = (inf, ninf);
    for j in 0..hd / 4 {
        let off = 4 * (g * hd + 4 * j) as i64;
        let mut v = e.ld(V4, xr, src + off);
        if smooth {
            let a = e.ld(V4, sh, off);
            let b = e.ld(V4, sc, off);
            let d = e.b.ins().fsub(v, a);
            v = e.b.ins().fdiv(d, b);
        }
        e.st(v, buf, 16 * j as i64);
        mn = e.b.ins().fmin(mn, v);
        mx = e.b.ins().fmax(mx, v);
    }
    let lanes = |e: &mut Emitter, v: Value, max: bool| {
        let l: Vec<Value> = (0..4).map(|i| e.b.ins().extractlane(v, i)).collect();
        let f = |e: &mut Emitter, a: Value, b: Value| {
            if max {
                e.b.ins().fmax(a, b)
            } else {
                e.b.ins().fmin(a, b)
            }
        };
        let a = f(e, l[0], l[1]);
        let b = f(e, l[2], l[3]);
        f(e, a, b)
    };
    let mn = lanes(e, mn, false);
    let mx = lanes(e, mx, true);
    let bitsv = e.b.ins().iconst(types::I32, bits as i64);
    let outp = e.b.ins().stack_addr(P, slot, (4 * hd) as i32);
    if let Some(f) = helper {
        e.b.ins().call(f, &[mn, mx, bitsv, outp]);
    }
    let s = e.ld(types::F32, outp, 0);
    let z = e.ld(types::F32, outp, 4);
    let word = e.ld(types::I32, outp, 8);
    e.st(word, prow, 4 * g as i64);
    let sv = e.b.ins().splat(V4, s);
    let zv = e.b.ins().splat(V4, z);
    let mrne = e.vc(M_RNE);
    let zero = e.vc(0.0);
    let qm = e.vc(((1u32 << bits) - 1) as f32);
    let ff = e.b.ins().iconst(types::I16, 0xFF);
    let ff = e.b.ins().splat(types::I16X8, ff);
    for blk in 0..hd / 32 {
        // 32 codes -> 4 x i8x16 halves -> 16 packed bytes
        let mut bytes16 = Vec::with_capacity(2);
        for half in 0..2 {
            let q: Vec<Value> = (0..4)
                .map(|t| {
                    let v = e.ld(V4, buf, (16 * (8 * blk + 4 * half + t)) as i64);
                    let q = e.b.ins().fdiv(v, sv);
                    let q = e.b.ins().fadd(q, mrne);
                    let q = e.b.ins().fsub(q, mrne);
                    let q = e.b.ins().fadd(q, zv);
                    let q = e.b.ins().fmax(q, zero);
                    let q = e.b.ins().fmin(q, qm);
                    e.b.ins().fcvt_to_sint_sat(types::I32X4, q)
                })
                .collect();
            let a = e.b.ins().snarrow(q[0], q[1]);
            let b = e.b.ins().snarrow(q[2], q[3]);
            let c16 = e.b.ins().unarrow(a, b);
            // byte pairs (even, odd) as 16-bit lanes: even | odd << 4 in the low byte
            let w = e.b.ins().bitcast(types::I16X8, le, c16);
            let hi = e.b.ins().ushr_imm_u(w, 4);
            let w = e.b.ins().bor(w, hi);
            bytes16.push(e.b.ins().band(w, ff));
        }
        let packed = e.b.ins().unarrow(bytes16[0], bytes16[1]);
        e.st(packed, crow, ((g * hd + 32 * blk) / 2) as i64);
    }
}
