//! `attention`: one query row and kv head over the packed past and the chunk's FP rows.

use super::{Emitter, V4};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{InstBuilder, Value, types};
use cranelift_frontend::Variable;
use std::mem::offset_of;
use wkvc_ir::kernel::args::*;

/// One query row and one kv head: the `group` query heads sharing it, over `nq` packed past
/// tokens and the FP rows f0..f1, one pass with an online softmax.
pub(super) fn emit_attention(
    e: &mut Emitter,
    group: usize,
    kvh: usize,
    hd: usize,
    (bits, gl): (u32, usize),
    smooth: bool,
) {
    // (scale, zero) groups a head: 1 (a group a kv head), or hd / gl groups of gl channels
    let ngh = hd / gl;
    use AttentionArgs as A;
    let [q, kc, kp, vc, vp, nq, kf, vf, ldf, f0, f1, g, out, scr] = e.fields([
        offset_of!(A, q),
        offset_of!(A, kc),
        offset_of!(A, kp),
        offset_of!(A, vc),
        offset_of!(A, vp),
        offset_of!(A, nq),
        offset_of!(A, kf),
        offset_of!(A, vf),
        offset_of!(A, ldf),
        offset_of!(A, f0),
        offset_of!(A, f1),
        offset_of!(A, g),
        offset_of!(A, out),
        offset_of!(A, scratch),
    ]);
    let [ksh, ksc, vsh, vsc] = e.fields([
        offset_of!(A, ksh),
        offset_of!(A, ksc),
        offset_of!(A, vsh),
        offset_of!(A, vsc),
    ]);
    let scale = 1.0 / (hd as f32).sqrt();
    let kvw = kvh * hd;
    let rb = kvw.div_ceil(2) as i64;
    let hdb = 4 * hd as i64;
    // per head in scratch: q' permuted (hd), acc_q (hd), acc_f (hd), spare (hd)
    let goff = e.b.ins().imul_imm_s(g, hdb);
    let qh0 = e.b.ins().imul_imm_s(g, group as i64 * hdb);
    let qbase = e.b.ins().iadd(q, qh0);
    let (kshg, kscg, vshg, vscg) = (
        e.b.ins().iadd(ksh, goff),
        e.b.ins().iadd(ksc, goff),
        e.b.ins().iadd(vsh, goff),
        e.b.ins().iadd(vsc, goff),
    );
    let hs = |h: usize| 4 * hd as i64 * 4 * h as i64;
    let zf = e.fc(0.0);
    let mut q1 = vec![zf; group];
    let mut q2 = vec![zf; group];
    let mut q1t = vec![vec![zf; ngh]; group];
    let zv = e.vc(0.0);
    for h in 0..group {
        // q' = q * k_scale, permuted per block of 32 (evens then odds), and Q1, Q2
        for c in 0..hd {
            let qv = e.ld(types::F32, qbase, 4 * (h * hd + c) as i64);
            let qs = if smooth {
                let s = e.ld(types::F32, kscg, 4 * c as i64);
                let sh = e.ld(types::F32, kshg, 4 * c as i64);
                let t = e.b.ins().fmul(qv, sh);
                q2[h] = e.b.ins().fadd(q2[h], t);
                e.b.ins().fmul(qv, s)
            } else {
                qv
            };
            q1[h] = e.b.ins().fadd(q1[h], qs);
            if ngh > 1 {
                q1t[h][c / gl] = e.b.ins().fadd(q1t[h][c / gl], qs);
            }
            let (blk, w) = (c / 32, c % 32);
            let t = if w % 2 == 0 { w / 2 } else { 16 + w / 2 };
            e.st(qs, scr, hs(h) + 4 * (32 * blk + t) as i64);
        }
        for j in 0..2 * hd / 4 {
            e.st(zv, scr, hs(h) + hdb + 16 * j as i64);
        }
        e.st(q1[h], scr, hs(h) + 3 * hdb);
        e.st(q2[h], scr, hs(h) + 3 * hdb + 4);
        for (t, &v) in q1t[h].iter().enumerate().filter(|_| ngh > 1) {
            e.st(v, scr, hs(h) + 3 * hdb + 8 + 4 * t as i64);
        }
    }
    let ninf = e.fc(f32::NEG_INFINITY);
    let mv: Vec<Variable> = (0..group).map(|_| e.var(types::F32, ninf)).collect();
    let lv: Vec<Variable> = (0..group).map(|_| e.var(types::F32, zf)).collect();
    // per head and group: sum of p * v_scale * v_zero
    let av: Vec<Vec<Variable>> = (0..group)
        .map(|_| (0..ngh).map(|_| e.var(types::F32, zf)).collect())
        .collect();
    let pv: Vec<Variable> = (0..group).map(|_| e.var(types::F32, zf)).collect();
    let scl = e.fc(scale);

    // online softmax step for head h with score sc; returns p
    let update = |e: &mut Emitter, h: usize, sc: Value| -> Value {
        let m = e.get(mv[h]);
        let up = e.b.create_block();
        let cont = e.b.create_block();
        let gt = e.b.ins().fcmp(FloatCC::GreaterThan, sc, m);
        e.b.ins().brif(gt, up, &[], cont, &[]);
        e.b.switch_to_block(up);
        let d = e.b.ins().fsub(m, sc);
        let c = e.exp(d, false);
        for &var in [lv[h]].iter().chain(&av[h]).chain(&[pv[h]]) {
            let x = e.get(var);
            let x = e.b.ins().fmul(x, c);
            e.set(var, x);
        }
        let cv = e.b.ins().splat(V4, c);
        for j in 0..2 * hd / 4 {
            let off = hs(h) + hdb + 16 * j as i64;
            let x = e.ld(V4, scr, off);
            let x = e.b.ins().fmul(x, cv);
            e.st(x, scr, off);
        }
        e.set(mv[h], sc);
        e.b.ins().jump(cont, &[]);
        e.b.switch_to_block(cont);
        let m = e.get(mv[h]);
        let d = e.b.ins().fsub(sc, m);
        let p = e.exp(d, false);
        let l = e.get(lv[h]);
        let l = e.b.ins().fadd(l, p);
        e.set(lv[h], l);
        p
    };

    if bits <= 4 {
        let zero = e.ic(0);
        e.for_range(zero, nq, 1, &mut |e, j| {
            let kr = e.addr(kc, j, rb);
            let kr = {
                let o = e.b.ins().imul_imm_s(g, (hd / 2) as i64);
                e.b.ins().iadd(kr, o)
            };
            let pidx = e.b.ins().imul_imm_s(j, (kvh * ngh) as i64);
            let gb = if ngh == 1 {
                g
            } else {
                e.b.ins().imul_imm_s(g, ngh as i64)
            };
            let pidx = e.b.ins().iadd(pidx, gb);
            let kpp = e.addr(kp, pidx, 4);
            let vpp = e.addr(vp, pidx, 4);
            // each group's K scale and zero, V scale and zero (a word of two f16 each)
            let prm: Vec<[Value; 4]> = (0..ngh)
                .map(|t| {
                    let o = 4 * t as i64;
                    let [ks, kz] = e.f16_pair_ro(kpp, o);
                    let [vs, vz] = e.f16_pair_ro(vpp, o);
                    [ks, kz, vs, vz]
                })
                .collect();
            // scores: per group, a loop over its 32-channel blocks (the loop-carried
            // accumulators keep each block's loads next to their FMAs; two chains per query
            // head)
            let bpg = gl / 32;
            let mut dots: Vec<Vec<[Value; 2]>> = Vec::with_capacity(ngh);
            for t in 0..ngh {
                let dv: Vec<Variable> = (0..2 * group).map(|_| e.var(V4, zv)).collect();
                let b0 = e.ic((t * bpg) as i64);
                let b1 = e.ic(((t + 1) * bpg) as i64);
                e.for_range(b0, b1, 1, &mut |e, blk| {
                    let kb = e.addr(kr, blk, 16);
                    let cq = e.codes32_ro(kb, 0);
                    let qb = e.addr(scr, blk, 128);
                    for h in 0..group {
                        for (t, &cv) in cq.iter().enumerate() {
                            let qv = e.ld_ro(V4, qb, hs(h) + 16 * t as i64);
                            let v = dv[2 * h + t % 2];
                            let a = e.get(v);
                            let a = e.mul_add(cv, qv, a);
                            e.set(v, a);
                        }
                    }
                });
                dots.push(
                    (0..group)
                        .map(|h| [e.get(dv[2 * h]), e.get(dv[2 * h + 1])])
                        .collect(),
                );
            }
            let vr = e.addr(vc, j, rb);
            let vr = {
                let o = e.b.ins().imul_imm_s(g, (hd / 2) as i64);
                e.b.ins().iadd(vr, o)
            };
            // per head, per group: p * v_scale
            let mut ps: Vec<Vec<Value>> = Vec::with_capacity(group);
            for h in 0..group {
                // sum over groups of k_scale * (dot - k_zero * Q1) (Q1: the group's sum of q')
                let mut tot = None;
                let mut q2h = None;
                for (t, d) in dots.iter().enumerate() {
                    let s = e.b.ins().fadd(d[h][0], d[h][1]);
                    let s = e.hsum(s);
                    let q1o = if ngh == 1 { 0 } else { 8 + 4 * t as i64 };
                    let q1h = e.ld_ro(types::F32, scr, hs(h) + 3 * hdb + q1o);
                    if t == 0 {
                        q2h = Some(e.ld_ro(types::F32, scr, hs(h) + 3 * hdb + 4));
                    }
                    let zq = e.b.ins().fmul(prm[t][1], q1h);
                    let s = e.b.ins().fsub(s, zq);
                    let s = e.b.ins().fmul(prm[t][0], s);
                    tot = Some(match tot {
                        None => s,
                        Some(a) => e.b.ins().fadd(a, s),
                    });
                }
                let s = e.b.ins().fadd(tot.unwrap_or(zf), q2h.unwrap_or(zf));
                let sc = e.b.ins().fmul(s, scl);
                let p = update(e, h, sc);
                let mut row = Vec::with_capacity(ngh);
                for (t, pr) in prm.iter().enumerate() {
                    let psv = e.b.ins().fmul(p, pr[2]);
                    let a = e.get(av[h][t]);
                    let a = e.mul_add(psv, pr[3], a);
                    e.set(av[h][t], a);
                    row.push(psv);
                }
                let pp = e.get(pv[h]);
                let pp = e.b.ins().fadd(pp, p);
                e.set(pv[h], pp);
                ps.push(row);
            }
            for blk in 0..hd / 32 {
                let cv = e.codes32_ro(vr, 16 * blk as i64);
                for (h, row) in ps.iter().enumerate() {
                    let pvv = e.b.ins().splat(V4, row[blk / bpg]);
                    for (t, &c) in cv.iter().enumerate() {
                        let off = hs(h) + hdb + 4 * (32 * blk + 4 * t) as i64;
                        let acc = e.ld(V4, scr, off);
                        let acc = e.mul_add(c, pvv, acc);
                        e.st(acc, scr, off);
                    }
                }
            }
        });
    }
    // FP rows
    e.for_range(f0, f1, 1, &mut |e, j| {
        let ro = e.b.ins().imul(j, ldf);
        let kr = e.addr(kf, ro, 4);
        let kr = e.b.ins().iadd(kr, goff);
        let vr = e.addr(vf, ro, 4);
        let vr = e.b.ins().iadd(vr, goff);
        for h in 0..group {
            let qh = e.b.ins().iadd_imm_s(qbase, 4 * (h * hd) as i64);
            let d = e.dot_static_ro(qh, kr, hd);
            let sc = e.b.ins().fmul(d, scl);
            let p = update(e, h, sc);
            let pvv = e.b.ins().splat(V4, p);
            for t in 0..hd / 4 {
                let off = hs(h) + 2 * hdb + 16 * t as i64;
                let acc = e.ld(V4, scr, off);
                let v = e.ld(V4, vr, 16 * t as i64);
                let acc = e.mul_add(v, pvv, acc);
                e.st(acc, scr, off);
            }
        }
    });
    // out = (v_scale * (acc_q - A) + v_shift * P + acc_f) / l
    for h in 0..group {
        let l = e.get(lv[h]);
        let one = e.fc(1.0);
        let inv = e.b.ins().fdiv(one, l);
        let aq: Vec<Value> = av[h].iter().map(|&v| e.get(v)).collect();
        let pp = e.get(pv[h]);
        let ob = e.b.ins().iadd_imm_s(out, 4 * (h * hd) as i64);
        let ob = {
            let o = e.b.ins().imul_imm_s(g, group as i64 * hdb);
            e.b.ins().iadd(ob, o)
        };
        for c in 0..hd {
            let (blk, w) = (c / 32, c % 32);
            let t = if w % 2 == 0 { w / 2 } else { 16 + w / 2 };
            let accq = e.ld(types::F32, scr, hs(h) + hdb + 4 * (32 * blk + t) as i64);
            let accf = e.ld(types::F32, scr, hs(h) + 2 * hdb + 4 * c as i64);
            let mut v = if bits <= 4 {
                let d = e.b.ins().fsub(accq, aq[c / gl]);
                if smooth {
                    let s = e.ld(types::F32, vscg, 4 * c as i64);
                    let sh = e.ld(types::F32, vshg, 4 * c as i64);
                    let t = e.b.ins().fmul(d, s);
                    e.mul_add(sh, pp, t)
                } else {
                    d
                }
            } else {
                zf
            };
            v = e.b.ins().fadd(v, accf);
            let v = e.b.ins().fmul(v, inv);
            e.st(v, ob, 4 * c as i64);
        }
    }
}
