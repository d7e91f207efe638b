//! Cranelift emitters for the kernel kinds of the lowered graph (`wkvc_ir::KernelSpec`).
//!
//! Every kernel is `extern "C" fn(args: *const A)` with `A` its kind's argument struct
//! (`wkvc_ir::kernel::args`, the contract with the engines): the code reads each field at its
//! `offset_of!`. Every constant of the spec (widths, group, bits, head dim, GQA ratio,
//! smoothing) is folded into the code.
//!
//! Packed int4 rows keep the plan's layout (two codes per byte, low nibble = even column).
//! A 16-byte load gives the low nibbles (columns 0, 2, .., 30 of a 32-column block) and the
//! high nibbles (1, 3, .., 31); the activations are permuted the same way per block by the
//! GEMM's prep (`prep_f32`/`prep_int8`), so no shuffle is needed in the inner loop.
//!
//! One module per kernel kind (`qgemm`, `gemm` with the logits, `rows` for the row-wise
//! kernels, `rope_kv`, `attention`); `Emitter` (here) holds the helpers they share.

mod attention;
mod gemm;
mod qgemm;
mod rope_kv;
mod rows;

pub use qgemm::{QTILE, prep_f32, prep_int8, tile_codes, tile_params};
pub use rope_kv::wkvc_kv_params;

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{AbiParam, Function, InstBuilder, MemFlagsData, Type, Value, types};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::JITModule;
use cranelift_module::{Linkage, Module};
use std::mem::offset_of;
use wkvc_ir::kernel::args::{GemmArgs, LogitsArgs};
use wkvc_ir::{Act, KernelSpec};

use crate::CodegenError;

const M_RNE: f32 = 12582912.0;

struct Emitter<'a> {
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

impl<'a> Emitter<'a> {
    /// The argument word at byte `offset` of the argument struct.
    fn field(&mut self, offset: usize) -> Value {
        let a = self.args;
        self.b.ins().load(P, mem(), a, offset as i32)
    }
    /// The argument words at `offsets`.
    fn fields<const N: usize>(&mut self, offsets: [usize; N]) -> [Value; N] {
        offsets.map(|o| self.field(o))
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
    /// The two f16 of the 4-byte word at `p + off` (low half first) as f32, exactly: the
    /// magnitude's bits shifted into an f32 and scaled by 2^112 (subnormals included), then the
    /// sign. Exact for every finite f16; an infinite scale (a group spanning more than 65504
    /// quantization steps: activations far outside any working range) would read as 65536.
    fn f16_pair_ro(&mut self, p: Value, off: i64) -> [Value; 2] {
        let w = self.ld_ro(types::I32, p, off);
        let hi = self.b.ins().ushr_imm_u(w, 16);
        [w, hi].map(|h| {
            let mag = self.b.ins().band_imm_u(h, 0x7fff);
            let mag = self.b.ins().ishl_imm_u(mag, 13);
            let f = self.b.ins().bitcast(types::F32, MemFlagsData::new(), mag);
            let k = self.fc(f32::from_bits(0x7780_0000));
            let f = self.b.ins().fmul(f, k);
            let fi = self.b.ins().bitcast(types::I32, MemFlagsData::new(), f);
            let sign = self.b.ins().band_imm_u(h, 0x8000);
            let sign = self.b.ins().ishl_imm_u(sign, 16);
            let r = self.b.ins().bor(fi, sign);
            self.b.ins().bitcast(types::F32, MemFlagsData::new(), r)
        })
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

/// The K/V rotation's block: 0 (none) or a power of two >= 2 dividing the head dim.
pub(crate) fn check_rotate(rotate: usize, head_dim: usize) -> Result<(), CodegenError> {
    if rotate != 0 && (rotate < 2 || !rotate.is_power_of_two() || !head_dim.is_multiple_of(rotate))
    {
        return Err(CodegenError::Unsupported(format!(
            "rope_kv's rotation block must be a power of two >= 2 dividing the head dim \
             {head_dim}, got {rotate}"
        )));
    }
    Ok(())
}

/// The cache's (scale, zero) group length of a kernel: `kv_group`, or the head dim for 0; a
/// multiple of 32 dividing the head dim.
pub(crate) fn check_group(kv_group: usize, head_dim: usize) -> Result<usize, CodegenError> {
    let g = wkvc_ir::kvcache::group_len(kv_group, head_dim);
    if g == 0 || !g.is_multiple_of(32) || !head_dim.is_multiple_of(g) {
        return Err(CodegenError::Unsupported(format!(
            "the K/V cache's group must be a multiple of 32 dividing the head dim {head_dim}, \
             got {g}"
        )));
    }
    Ok(g)
}

/// Test aid: a function of the kernels' signature whose argument words are (`*const u32`
/// cache words, `*mut f32` out, n) writing each word's (scale, zero) as `f16_pair_ro` converts
/// it.
#[cfg(test)]
pub(crate) fn build_f16_pairs(module: &JITModule, fctx: &mut FunctionBuilderContext) -> Function {
    let mut func = new_func(module);
    {
        let mut b = FunctionBuilder::new(&mut func, fctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let args = b.block_params(entry)[0];
        let mut e = Emitter {
            b,
            fma: false,
            args,
        };
        let [inp, out, n] = e.fields([0, 8, 16]);
        let zero = e.ic(0);
        e.for_range(zero, n, 1, &mut |e, i| {
            let w = e.addr(inp, i, 4);
            let [s, z] = e.f16_pair_ro(w, 0);
            let o = e.addr(out, i, 8);
            e.st(s, o, 0);
            e.st(z, o, 4);
        });
        e.b.ins().return_(&[]);
        e.b.seal_all_blocks();
        e.b.finalize(module.target_config());
    }
    func
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
        let mut e = Emitter { b, fma, args };
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
                qgemm::emit_qgemm(&mut e, *k, gl, *residual, *act);
            }
            KernelSpec::Gemm { k, residual, .. } => {
                use GemmArgs as A;
                let offsets = [
                    offset_of!(A, x),
                    offset_of!(A, m),
                    offset_of!(A, w),
                    offset_of!(A, y),
                    offset_of!(A, ldy),
                    offset_of!(A, n0),
                    offset_of!(A, n1),
                    offset_of!(A, r),
                    offset_of!(A, ldr),
                ];
                gemm::emit_gemm(&mut e, *k, *residual, offsets)
            }
            KernelSpec::Logits { dim, act, .. } => match act {
                Act::F32 => {
                    use LogitsArgs as A;
                    // no residual: the offset of r is never read
                    let offsets = [
                        offset_of!(A, x),
                        offset_of!(A, m),
                        offset_of!(A, w),
                        offset_of!(A, y),
                        offset_of!(A, ldy),
                        offset_of!(A, n0),
                        offset_of!(A, n1),
                        offset_of!(A, x),
                        offset_of!(A, x),
                    ];
                    gemm::emit_gemm(&mut e, *dim, false, offsets)
                }
                Act::Int8 => gemm::emit_logits_int8(&mut e, *dim),
            },
            KernelSpec::RmsNorm { dim, eps } => rows::emit_rms(&mut e, *dim, *eps),
            KernelSpec::SiluMul { n } => rows::emit_silu_mul(&mut e, *n),
            KernelSpec::Embed { dim, .. } => rows::emit_embed(&mut e, *dim),
            KernelSpec::RopeKv {
                heads,
                kv_heads,
                head_dim,
                rope_dim,
                kv_bits,
                smooth,
                rotate,
                kv_group,
                ..
            } => {
                if !head_dim.is_multiple_of(32) {
                    return Err(CodegenError::Unsupported(format!(
                        "rope_kv needs a head dim that is a multiple of 32, got {head_dim}"
                    )));
                }
                check_rotate(*rotate, *head_dim)?;
                let group = check_group(*kv_group, *head_dim)?;
                rope_kv::emit_rope_kv(
                    &mut e,
                    (*heads, *kv_heads, *head_dim, *rope_dim),
                    (*kv_bits, group),
                    *smooth,
                    *rotate,
                    helper,
                )
            }
            KernelSpec::Attention {
                heads,
                kv_heads,
                head_dim,
                kv_bits,
                smooth,
                kv_group,
                ..
            } => {
                let group = check_group(*kv_group, *head_dim)?;
                if !head_dim.is_multiple_of(32) || !heads.is_multiple_of(*kv_heads) {
                    return Err(CodegenError::Unsupported(format!(
                        "attention needs a head dim that is a multiple of 32 and heads a \
                         multiple of kv heads (head dim {head_dim}, {heads}/{kv_heads} heads)"
                    )));
                }
                attention::emit_attention(
                    &mut e,
                    heads / kv_heads,
                    *kv_heads,
                    *head_dim,
                    (*kv_bits, group),
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
