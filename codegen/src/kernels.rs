//! Cranelift emitters for the kernel kinds of the lowered graph (`wkvc_ir::KernelSpec`).
//!
//! Every kernel is `extern "C" fn(args: *const u64)`: one pointer to a block of 8-byte words
//! (pointers and counts) whose layout is given per kind by the `*_ARGS` constants below; the
//! runtime fills it. Every constant of the spec (widths, group, bits, head dim, GQA ratio,
//! smoothing) is folded into the code.
//!
//! Packed int4 rows keep the plan's layout (two codes per byte, low nibble = even column).
//! A 16-byte load gives the low nibbles (columns 0, 2, .., 30 of a 32-column block) and the
//! high nibbles (1, 3, .., 31); the activations are permuted the same way per block by the
//! GEMM's prep (`prep_f32`/`prep_int8`), so no shuffle is needed in the inner loop.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{AbiParam, Function, InstBuilder, MemFlagsData, Type, Value, types};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::JITModule;
use cranelift_module::{Linkage, Module};
use wkvc_ir::{Act, KernelSpec};

use crate::CodegenError;

/// `qgemm` words: permuted activations (f32, or int8 codes for `act = int8`), per-group sums
/// of the activations, per-block int8 scales, original activations, rows m, codes, f32
/// scales, f32 zeros, y, y row stride (floats), first and end output row, residual, its
/// stride.
pub const QGEMM_ARGS: [&str; 14] = [
    "xp", "gsum", "dx", "xo", "m", "w", "s", "z", "y", "ldy", "n0", "n1", "r", "ldr",
];
/// `gemm`/`logits` words: x, m, f32 weight rows, y, ldy, n0, n1, residual, ldr.
pub const GEMM_ARGS: [&str; 9] = ["x", "m", "w", "y", "ldy", "n0", "n1", "r", "ldr"];
/// `rms_norm` words.
pub const RMS_ARGS: [&str; 4] = ["x", "w", "y", "m"];
/// `silu_mul` words.
pub const SILU_ARGS: [&str; 3] = ["x", "y", "m"];
/// `embed` words: ids (i32), table rows (f32), y, m.
pub const EMBED_ARGS: [&str; 4] = ["ids", "table", "y", "m"];
/// `rope_kv` words: qkv rows (rotated in place), m, cos and sin tables ([m, rope_dim/2]),
/// K codes (or f32 rows for 16 bits), K (scale, zero) per (token, kv head), V codes, V
/// params, first cache row, k shift, k scale, v shift, v scale.
pub const ROPE_ARGS: [&str; 13] = [
    "x", "m", "cos", "sin", "kc", "kp", "vc", "vp", "row0", "ksh", "ksc", "vsh", "vsc",
];
/// `attention` words (one query row, one kv head and its query heads): q row, K codes, K
/// params, V codes, V params, quantized tokens, FP K rows, FP V rows, their stride (floats),
/// first and end FP row, kv head, out row, scratch (f32, 4 * head_dim * (group + 1)), k shift,
/// k scale, v shift, v scale.
pub const ATTN_ARGS: [&str; 18] = [
    "q", "kc", "kp", "vc", "vp", "nq", "kf", "vf", "ldf", "f0", "f1", "g", "out", "scratch", "ksh",
    "ksc", "vsh", "vsc",
];

/// Host helper the KV quantizer calls: the stored (f16-rounded) scale and zero of a group.
///
/// # Safety
/// `out` must point to two writable f32.
pub unsafe extern "C" fn wkvc_kv_params(min: f32, max: f32, bits: u32, out: *mut f32) {
    let (s, z) =
        wkvc_ir::quant::params_in(min, max, bits, 1.0, 1.0, wkvc_ir::quant::ParamDtype::F16);
    // SAFETY: the caller passes a pointer to two f32 (a stack slot of the kernel).
    unsafe {
        *out = s;
        *out.add(1) = z;
    }
}

const M_RNE: f32 = 12582912.0;

struct E<'a> {
    b: FunctionBuilder<'a>,
    fma: bool,
    args: Value,
}

fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Loads of inputs that no store of the kernel touches: free to move to their use.
fn mem_ro() -> MemFlagsData {
    MemFlagsData::new()
        .with_notrap()
        .with_readonly()
        .with_can_move()
}

const P: Type = types::I64;
const V4: Type = types::F32X4;

impl<'a> E<'a> {
    fn arg(&mut self, i: usize) -> Value {
        let a = self.args;
        self.b.ins().load(P, mem(), a, (8 * i) as i32)
    }
    fn ic(&mut self, v: i64) -> Value {
        self.b.ins().iconst(P, v)
    }
    fn fc(&mut self, v: f32) -> Value {
        self.b.ins().f32const(v)
    }
    fn vc(&mut self, v: f32) -> Value {
        let s = self.fc(v);
        self.b.ins().splat(V4, s)
    }
    fn var(&mut self, ty: Type, init: Value) -> Variable {
        let v = self.b.declare_var(ty);
        self.b.def_var(v, init);
        v
    }
    fn get(&mut self, v: Variable) -> Value {
        self.b.use_var(v)
    }
    fn set(&mut self, v: Variable, x: Value) {
        self.b.def_var(v, x)
    }
    /// `p + i * scale + off`
    fn addr(&mut self, p: Value, i: Value, scale: i64) -> Value {
        let o = self.b.ins().imul_imm_s(i, scale);
        self.b.ins().iadd(p, o)
    }
    fn ld(&mut self, ty: Type, p: Value, off: i64) -> Value {
        self.b.ins().load(ty, mem(), p, off as i32)
    }
    fn ld_ro(&mut self, ty: Type, p: Value, off: i64) -> Value {
        self.b.ins().load(ty, mem_ro(), p, off as i32)
    }
    fn st(&mut self, x: Value, p: Value, off: i64) {
        self.b.ins().store(mem(), x, p, off as i32);
    }
    fn mul_add(&mut self, x: Value, y: Value, acc: Value) -> Value {
        if self.fma {
            self.b.ins().fma(x, y, acc)
        } else {
            let p = self.b.ins().fmul(x, y);
            self.b.ins().fadd(p, acc)
        }
    }
    fn hsum(&mut self, v: Value) -> Value {
        let l: Vec<Value> = (0..4).map(|i| self.b.ins().extractlane(v, i)).collect();
        let a = self.b.ins().fadd(l[0], l[1]);
        let c = self.b.ins().fadd(l[2], l[3]);
        self.b.ins().fadd(a, c)
    }
    /// `for i in (start..end).step_by(step)` where the body runs while `i + step <= end`.
    fn for_range(
        &mut self,
        start: Value,
        end: Value,
        step: i64,
        body: &mut dyn FnMut(&mut Self, Value),
    ) -> Value {
        let head = self.b.create_block();
        let bb = self.b.create_block();
        let exit = self.b.create_block();
        let iv = self.var(P, start);
        self.b.ins().jump(head, &[]);
        self.b.switch_to_block(head);
        let i = self.get(iv);
        let nx = self.b.ins().iadd_imm_s(i, step);
        let c = self.b.ins().icmp(IntCC::UnsignedLessThanOrEqual, nx, end);
        self.b.ins().brif(c, bb, &[], exit, &[]);
        self.b.switch_to_block(bb);
        body(self, i);
        self.set(iv, nx);
        self.b.ins().jump(head, &[]);
        self.b.switch_to_block(exit);
        self.get(iv)
    }

    /// y[i * ldy + n] = v (+ r[i * ldr + n] when `res` is given).
    fn store_out(
        &mut self,
        v: Value,
        i: Value,
        n: Value,
        y: Value,
        ldy: Value,
        res: Option<(Value, Value)>,
    ) {
        let mut v = v;
        if let Some((r, ldr)) = res {
            let ro = self.b.ins().imul(i, ldr);
            let ro = self.b.ins().iadd(ro, n);
            let rp = self.addr(r, ro, 4);
            let rv = self.ld(types::F32, rp, 0);
            v = self.b.ins().fadd(rv, v);
        }
        let yo = self.b.ins().imul(i, ldy);
        let yo = self.b.ins().iadd(yo, n);
        let yp = self.addr(y, yo, 4);
        self.st(v, yp, 0);
    }

    /// `for b in (start..end).step_by(step)` with `be = min(b + step, end)`.
    fn for_blocks(
        &mut self,
        start: Value,
        end: Value,
        step: i64,
        body: &mut dyn FnMut(&mut Self, Value, Value),
    ) {
        let head = self.b.create_block();
        let bb = self.b.create_block();
        let exit = self.b.create_block();
        let iv = self.var(P, start);
        self.b.ins().jump(head, &[]);
        self.b.switch_to_block(head);
        let i = self.get(iv);
        let c = self.b.ins().icmp(IntCC::UnsignedLessThan, i, end);
        self.b.ins().brif(c, bb, &[], exit, &[]);
        self.b.switch_to_block(bb);
        let nx = self.b.ins().iadd_imm_s(i, step);
        let be = self.b.ins().umin(nx, end);
        body(self, i, be);
        self.set(iv, be);
        self.b.ins().jump(head, &[]);
        self.b.switch_to_block(exit);
    }

    /// e^x for f32 or f32x4 (Cody-Waite reduction, degree-6 polynomial; about 2 ulp), x
    /// clamped to [-87, 88].
    fn exp(&mut self, x: Value, vec: bool) -> Value {
        let c = |e: &mut Self, v: f32| if vec { e.vc(v) } else { e.fc(v) };
        let lo = c(self, -87.0);
        let hi = c(self, 88.0);
        let x = self.b.ins().fmax(x, lo);
        let x = self.b.ins().fmin(x, hi);
        let l2e = c(self, std::f32::consts::LOG2_E);
        let t = self.b.ins().fmul(x, l2e);
        let m = c(self, M_RNE);
        let t = self.b.ins().fadd(t, m);
        let n = self.b.ins().fsub(t, m);
        let ln2hi = c(self, -0.693_359_4);
        let ln2lo = c(self, 2.121_944_4e-4);
        let r = self.mul_add(n, ln2hi, x);
        let r = self.mul_add(n, ln2lo, r);
        let mut p = c(self, 1.0 / 720.0);
        for k in [120.0f32, 24.0, 6.0, 2.0, 1.0, 1.0] {
            let ck = c(self, 1.0 / k);
            p = self.mul_add(p, r, ck);
        }
        let it = if vec { types::I32X4 } else { types::I32 };
        let ni = self.b.ins().fcvt_to_sint_sat(it, n);
        let c127 = if vec {
            let s = self.b.ins().iconst(types::I32, 127);
            self.b.ins().splat(it, s)
        } else {
            self.b.ins().iconst(types::I32, 127)
        };
        let e = self.b.ins().iadd(ni, c127);
        let e = self.b.ins().ishl_imm_u(e, 23);
        let ft = if vec { V4 } else { types::F32 };
        let e = self.b.ins().bitcast(ft, MemFlagsData::new(), e);
        self.b.ins().fmul(p, e)
    }

    /// 16 packed bytes (read-only memory) -> (low nibbles, high nibbles) as i8x16.
    fn nibbles_ro(&mut self, p: Value, off: i64) -> (Value, Value) {
        let w = self.ld_ro(types::I8X16, p, off);
        self.split_nibbles(w)
    }

    fn split_nibbles(&mut self, w: Value) -> (Value, Value) {
        let m = self.b.ins().iconst(types::I8, 0x0F);
        let m = self.b.ins().splat(types::I8X16, m);
        let lo = self.b.ins().band(w, m);
        // shift 16-bit lanes: each byte's high nibble lands in its low nibble, the bits that
        // come in from the byte above are masked off
        let le = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
        let w16 = self.b.ins().bitcast(types::I16X8, le, w);
        let h = self.b.ins().ushr_imm_u(w16, 4);
        let h = self.b.ins().bitcast(types::I8X16, le, h);
        let hi = self.b.ins().band(h, m);
        (lo, hi)
    }

    /// i8x16 with values 0..15 -> four f32x4.
    fn widen_f32x4(&mut self, v: Value) -> [Value; 4] {
        let l = self.b.ins().swiden_low(v);
        let h = self.b.ins().swiden_high(v);
        let mut out = [l; 4];
        for (i, x) in [l, h].into_iter().enumerate() {
            let a = self.b.ins().swiden_low(x);
            let b = self.b.ins().swiden_high(x);
            out[2 * i] = self.b.ins().fcvt_from_sint(V4, a);
            out[2 * i + 1] = self.b.ins().fcvt_from_sint(V4, b);
        }
        out
    }

    /// 32 packed codes at `p + off` (read-only memory) as eight f32x4 in permuted order
    /// (evens, then odds).
    fn codes32_ro(&mut self, p: Value, off: i64) -> [Value; 8] {
        let (lo, hi) = self.nibbles_ro(p, off);
        self.codes_of(lo, hi)
    }

    fn codes_of(&mut self, lo: Value, hi: Value) -> [Value; 8] {
        let a = self.widen_f32x4(lo);
        let b = self.widen_f32x4(hi);
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
    }

    /// dot of `n` floats at `a` and `b` (vector body with 4 accumulators, scalar tail), from
    /// memory the kernel does not write.
    fn dot_static_ro(&mut self, a: Value, b: Value, n: usize) -> Value {
        let z = self.vc(0.0);
        let mut acc = [z; 4];
        for j in 0..n / 4 {
            let x = self.ld_ro(V4, a, 16 * j as i64);
            let y = self.ld_ro(V4, b, 16 * j as i64);
            acc[j % 4] = self.mul_add(x, y, acc[j % 4]);
        }
        let s01 = self.b.ins().fadd(acc[0], acc[1]);
        let s23 = self.b.ins().fadd(acc[2], acc[3]);
        let s = self.b.ins().fadd(s01, s23);
        let mut s = self.hsum(s);
        for j in (n / 4) * 4..n {
            let x = self.ld_ro(types::F32, a, 4 * j as i64);
            let y = self.ld_ro(types::F32, b, 4 * j as i64);
            s = self.mul_add(x, y, s);
        }
        s
    }
}

fn new_func(module: &JITModule) -> Function {
    let mut sig = module.make_signature();
    sig.params.push(AbiParam::new(P));
    Function::with_name_signature(Default::default(), sig)
}

/// Build the function of `spec` (Cranelift IR, not yet compiled).
pub fn build(
    spec: &KernelSpec,
    module: &mut JITModule,
    fctx: &mut FunctionBuilderContext,
    fma: bool,
) -> Result<Function, CodegenError> {
    let mut func = new_func(module);
    let helper = if matches!(spec, KernelSpec::RopeKv { kv_bits, .. } if *kv_bits <= 8) {
        let mut sig = module.make_signature();
        sig.params.extend([
            AbiParam::new(types::F32),
            AbiParam::new(types::F32),
            AbiParam::new(types::I32),
            AbiParam::new(P),
        ]);
        let id = module
            .declare_function("wkvc_kv_params", Linkage::Import, &sig)
            .map_err(|e| CodegenError::Cranelift(e.to_string()))?;
        Some(module.declare_func_in_func(id, &mut func))
    } else {
        None
    };
    {
        let mut b = FunctionBuilder::new(&mut func, fctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let args = b.block_params(entry)[0];
        let mut e = E { b, fma, args };
        match spec {
            KernelSpec::QGemm {
                k,
                bits,
                group,
                residual,
                act,
                ..
            } => {
                let gl = crate::qgemm_group(*k, *bits, *group)?;
                emit_qgemm(&mut e, *k, gl, *residual, *act);
            }
            KernelSpec::Gemm { k, residual, .. } => emit_gemm(&mut e, *k, *residual),
            KernelSpec::Logits { dim, act, .. } => match act {
                Act::F32 => emit_gemm(&mut e, *dim, false),
                Act::Int8 => emit_logits_int8(&mut e, *dim),
            },
            KernelSpec::RmsNorm { dim, eps } => emit_rms(&mut e, *dim, *eps),
            KernelSpec::SiluMul { n } => emit_silu_mul(&mut e, *n),
            KernelSpec::Embed { dim, .. } => emit_embed(&mut e, *dim),
            KernelSpec::RopeKv {
                heads,
                kv_heads,
                head_dim,
                rope_dim,
                kv_bits,
                smooth,
                ..
            } => {
                if !head_dim.is_multiple_of(32) {
                    return Err(CodegenError::Unsupported(format!(
                        "rope_kv needs a head dim that is a multiple of 32, got {head_dim}"
                    )));
                }
                emit_rope_kv(
                    &mut e, *heads, *kv_heads, *head_dim, *rope_dim, *kv_bits, *smooth, helper,
                )
            }
            KernelSpec::Attention {
                heads,
                kv_heads,
                head_dim,
                kv_bits,
                smooth,
                ..
            } => {
                if !head_dim.is_multiple_of(32) || !heads.is_multiple_of(*kv_heads) {
                    return Err(CodegenError::Unsupported(format!(
                        "attention needs a head dim that is a multiple of 32 and heads a \
                         multiple of kv heads (head dim {head_dim}, {heads}/{kv_heads} heads)"
                    )));
                }
                emit_attention(
                    &mut e,
                    heads / kv_heads,
                    *kv_heads,
                    *head_dim,
                    *kv_bits,
                    *smooth,
                );
            }
        }
        e.b.ins().return_(&[]);
        e.b.seal_all_blocks();
        e.b.finalize(module.target_config());
    }
    Ok(func)
}

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
fn emit_qgemm(e: &mut E, k: usize, gl: usize, residual: bool, act: Act) {
    let a: Vec<Value> = (0..14).map(|i| e.arg(i)).collect();
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
    let (nr4, nr1) = match act {
        Act::Int8 => (1, QTILE),
        Act::F32 => (1, 1),
    };
    e.for_blocks(n0, n1, nblk, &mut |e, nb, ne| {
        let rows = |e: &mut E, i: Value, rr: usize, nr: usize| {
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
        let i = e.for_range(zero, m, 4, &mut |e, i| rows(e, i, 4, nr4));
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
    /// the argument words (`QGEMM_ARGS`)
    a: Vec<Value>,
}

/// Output rows n..n+nr for activation rows i..i+rr. Groups and their 32-column blocks are
/// runtime loops: the loop-carried accumulators keep each block's loads next to their use
/// (Cranelift places pure values at their uses, so straight-line code would load everything
/// first and spill). Several weight rows share each activation load (decode), several
/// activation rows share each unpacked weight block (prefill).
fn qgemm_rows(e: &mut E, c: &QGemm, i: Value, n: Value, rr: usize, nr: usize) {
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
    // independent FMA chains per output: more when there are few outputs
    let accs = if rr * nr == 1 { 4 } else { 1 };
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
    let group = |e: &mut E, g: Value, len: usize| {
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

/// y[i, n] (+= r) = x[i] . w[n] for f32 weights.
fn emit_gemm(e: &mut E, k: usize, residual: bool) {
    let a: Vec<Value> = (0..9).map(|i| e.arg(i)).collect();
    let (x, m, w, y, ldy, n0, n1, r, ldr) = (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8]);
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

/// `logits` with `act = int8` words: int8 activations (permuted per 32 like the qgemm prep),
/// their block scales, m, int8 table rows (same permutation), table block scales, y, ldy, n0,
/// n1.
pub const LOGITS_INT8_ARGS: [&str; 9] = ["xq", "dx", "m", "wq", "ws", "y", "ldy", "n0", "n1"];

/// y[i, n] = sum over blocks of ws[n, b] * dx[i, b] * (wq[n, b] . xq[i, b]), int8 x int8 in
/// 32-bit lanes (`pmaddwd` on the sign-extended halves).
fn emit_logits_int8(e: &mut E, dim: usize) {
    let a: Vec<Value> = (0..9).map(|i| e.arg(i)).collect();
    let (xq, dx, m, wq, ws, y, ldy, n0, n1) =
        (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8]);
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

/// y = x / sqrt(mean(x^2) + eps) * w per row; the mean and root in f64 like the interpreter.
fn emit_rms(e: &mut E, dim: usize, eps: f64) {
    let a: Vec<Value> = (0..4).map(|i| e.arg(i)).collect();
    let (x, w, y, m) = (a[0], a[1], a[2], a[3]);
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
fn emit_silu_mul(e: &mut E, n: usize) {
    let a: Vec<Value> = (0..3).map(|i| e.arg(i)).collect();
    let (x, y, m) = (a[0], a[1], a[2]);
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
fn emit_embed(e: &mut E, dim: usize) {
    let a: Vec<Value> = (0..4).map(|i| e.arg(i)).collect();
    let (ids, table, y, m) = (a[0], a[1], a[2], a[3]);
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

#[allow(clippy::too_many_arguments)]
fn emit_rope_kv(
    e: &mut E,
    heads: usize,
    kvh: usize,
    hd: usize,
    rd: usize,
    bits: u32,
    smooth: bool,
    helper: Option<cranelift_codegen::ir::FuncRef>,
) {
    let a: Vec<Value> = (0..13).map(|i| e.arg(i)).collect();
    let (x, m, cos, sin, kc, kp, vc, vp, row0) =
        (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8]);
    let (ksh, ksc, vsh, vsc) = (a[9], a[10], a[11], a[12]);
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
            let crow = e.addr(cache, row, rb);
            let prow = e.addr(params, row, 8 * kvh as i64);
            let buf = e.b.ins().stack_addr(P, slot, 0);
            for g in 0..kvh {
                quantize_group_vec(
                    e, xr, src, g, hd, smooth, sh, sc, buf, slot, helper, bits, crow, prow,
                );
            }
        }
    });
}

/// `rope_kv`'s quantize-append of one kv head (head dim a multiple of 32) with f32x4: smooth
/// ((x - shift) / scale, the interpreter's division), min and max, the stored scale/zero (host
/// helper: f16 rounding), codes by round-half-even, clamped, narrowed to bytes and packed
/// two per byte (low nibble = even channel).
#[allow(clippy::too_many_arguments)]
fn quantize_group_vec(
    e: &mut E,
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
    let lanes = |e: &mut E, v: Value, max: bool| {
        let l: Vec<Value> = (0..4).map(|i| e.b.ins().extractlane(v, i)).collect();
        let f = |e: &mut E, a: Value, b: Value| {
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
    e.st(s, prow, 8 * g as i64);
    e.st(z, prow, 8 * g as i64 + 4);
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

/// One query row and one kv head: the `group` query heads sharing it, over `nq` packed past
/// tokens and the FP rows f0..f1, one pass with an online softmax.
fn emit_attention(e: &mut E, group: usize, kvh: usize, hd: usize, bits: u32, smooth: bool) {
    let a: Vec<Value> = (0..18).map(|i| e.arg(i)).collect();
    let (q, kc, kp, vc, vp, nq, kf, vf, ldf, f0, f1, g, out, scr) = (
        a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13],
    );
    let (ksh, ksc, vsh, vsc) = (a[14], a[15], a[16], a[17]);
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
            let (blk, w) = (c / 32, c % 32);
            let t = if w % 2 == 0 { w / 2 } else { 16 + w / 2 };
            e.st(qs, scr, hs(h) + 4 * (32 * blk + t) as i64);
        }
        for j in 0..2 * hd / 4 {
            e.st(zv, scr, hs(h) + hdb + 16 * j as i64);
        }
        e.st(q1[h], scr, hs(h) + 3 * hdb);
        e.st(q2[h], scr, hs(h) + 3 * hdb + 4);
    }
    let ninf = e.fc(f32::NEG_INFINITY);
    let mv: Vec<Variable> = (0..group).map(|_| e.var(types::F32, ninf)).collect();
    let lv: Vec<Variable> = (0..group).map(|_| e.var(types::F32, zf)).collect();
    let av: Vec<Variable> = (0..group).map(|_| e.var(types::F32, zf)).collect();
    let pv: Vec<Variable> = (0..group).map(|_| e.var(types::F32, zf)).collect();
    let scl = e.fc(scale);

    // online softmax step for head h with score sc; returns p
    let update = |e: &mut E, h: usize, sc: Value| -> Value {
        let m = e.get(mv[h]);
        let up = e.b.create_block();
        let cont = e.b.create_block();
        let gt = e.b.ins().fcmp(FloatCC::GreaterThan, sc, m);
        e.b.ins().brif(gt, up, &[], cont, &[]);
        e.b.switch_to_block(up);
        let d = e.b.ins().fsub(m, sc);
        let c = e.exp(d, false);
        for var in [lv[h], av[h], pv[h]] {
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
            let pidx = e.b.ins().imul_imm_s(j, kvh as i64);
            let pidx = e.b.ins().iadd(pidx, g);
            let kpp = e.addr(kp, pidx, 8);
            let vpp = e.addr(vp, pidx, 8);
            let ks = e.ld_ro(types::F32, kpp, 0);
            let kz = e.ld_ro(types::F32, kpp, 4);
            let vs = e.ld_ro(types::F32, vpp, 0);
            let vz = e.ld_ro(types::F32, vpp, 4);
            // scores: a loop over the 32-channel blocks (the loop-carried accumulators keep
            // each block's loads next to their FMAs; two chains per query head)
            let dv: Vec<Variable> = (0..2 * group).map(|_| e.var(V4, zv)).collect();
            let zero = e.ic(0);
            let nblk = e.ic((hd / 32) as i64);
            e.for_range(zero, nblk, 1, &mut |e, blk| {
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
            let dots: Vec<[Value; 2]> = (0..group)
                .map(|h| [e.get(dv[2 * h]), e.get(dv[2 * h + 1])])
                .collect();
            let vr = e.addr(vc, j, rb);
            let vr = {
                let o = e.b.ins().imul_imm_s(g, (hd / 2) as i64);
                e.b.ins().iadd(vr, o)
            };
            let mut ps = Vec::with_capacity(group);
            for (h, d) in dots.iter().enumerate() {
                let s = e.b.ins().fadd(d[0], d[1]);
                let s = e.hsum(s);
                let q1h = e.ld_ro(types::F32, scr, hs(h) + 3 * hdb);
                let q2h = e.ld_ro(types::F32, scr, hs(h) + 3 * hdb + 4);
                let zq = e.b.ins().fmul(kz, q1h);
                let s = e.b.ins().fsub(s, zq);
                let s = e.b.ins().fmul(ks, s);
                let s = e.b.ins().fadd(s, q2h);
                let sc = e.b.ins().fmul(s, scl);
                let p = update(e, h, sc);
                let psv = e.b.ins().fmul(p, vs);
                let a = e.get(av[h]);
                let a = e.mul_add(psv, vz, a);
                e.set(av[h], a);
                let pp = e.get(pv[h]);
                let pp = e.b.ins().fadd(pp, p);
                e.set(pv[h], pp);
                ps.push(psv);
            }
            for blk in 0..hd / 32 {
                let cv = e.codes32_ro(vr, 16 * blk as i64);
                for (h, &psv) in ps.iter().enumerate() {
                    let pvv = e.b.ins().splat(V4, psv);
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
        let aq = e.get(av[h]);
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
                let d = e.b.ins().fsub(accq, aq);
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
            let amax = x[blk..blk + 32].iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = 0i32;
            for t in 0..32 {
                let q = wkvc_ir::quant::rne(x[blk + t] * inv).clamp(-127.0, 127.0) as i8;
                let pos = if t % 2 == 0 { t / 2 } else { 16 + t / 2 };
                xq[blk + pos] = q;
                qs += q as i32;
            }
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
