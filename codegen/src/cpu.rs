//! Cranelift JIT for the host CPU.
//!
//! Facts this follows (TOOLCHAIN.md): x86-64 Cranelift has 128-bit vectors only (f32x4);
//! `fma` is emitted only when the host has FMA (otherwise it would become `fmaf` libcalls),
//! and fmul+fadd is used instead; loads from Rust slices are `notrap` but not `aligned`.

use crate::CodegenError;
use cranelift_codegen::Context;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{
    AbiParam, BlockArg, InstBuilder, MemFlagsData, Type, UserFuncName, Value, types,
};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module, default_libcall_names};

/// `extern "C" fn(a, b, n) -> sum(a[i] * b[i])`
pub type DotF32 = unsafe extern "C" fn(*const f32, *const f32, usize) -> f32;

/// A JIT module for the host, with the features codegen specialises on.
pub struct CpuJit {
    module: JITModule,
    has_fma: bool,
    fctx: FunctionBuilderContext,
    count: usize,
}

/// A compiled kernel: `fn(args)` with the kind's argument words (`kernels::*_ARGS`).
pub type KernelFn = unsafe extern "C" fn(*const u64);

fn cranelift_err<E: std::fmt::Display>(e: E) -> CodegenError {
    CodegenError::Cranelift(e.to_string())
}

impl CpuJit {
    /// Host ISA from cranelift-native at `opt_level = speed`.
    pub fn host() -> Result<Self, CodegenError> {
        let mut fb = settings::builder();
        for (k, v) in [
            ("opt_level", "speed"),
            ("is_pic", "false"),
            ("use_colocated_libcalls", "false"),
        ] {
            fb.set(k, v).map_err(cranelift_err)?;
        }
        let isa = cranelift_native::builder()
            .map_err(|e| CodegenError::Isa(e.to_string()))?
            .finish(settings::Flags::new(fb))
            .map_err(cranelift_err)?;
        let has_fma = isa
            .isa_flags()
            .iter()
            .any(|f| f.name == "has_fma" && f.as_bool() == Some(true));
        let mut jb = JITBuilder::with_isa(isa, default_libcall_names());
        jb.symbol(
            "wkvc_kv_params",
            crate::kernels::wkvc_kv_params as *const u8,
        );
        let module = JITModule::new(jb);
        Ok(CpuJit {
            module,
            has_fma,
            fctx: FunctionBuilderContext::new(),
            count: 0,
        })
    }

    pub fn has_fma(&self) -> bool {
        self.has_fma
    }

    /// The Cranelift IR text of a kernel (for snapshots and `wkvc emit`).
    pub fn kernel_ir(&mut self, spec: &wkvc_ir::KernelSpec) -> Result<String, CodegenError> {
        let fma = self.has_fma;
        self.kernel_ir_with(spec, fma)
    }

    /// The IR text as emitted for a host with or without FMA (snapshots fix the variant so
    /// they do not depend on the machine).
    pub fn kernel_ir_with(
        &mut self,
        spec: &wkvc_ir::KernelSpec,
        fma: bool,
    ) -> Result<String, CodegenError> {
        let f = crate::kernels::build(spec, &mut self.module, &mut self.fctx, fma)?;
        Ok(f.display().to_string())
    }

    /// The machine code of a kernel as Cranelift's disassembly (VCode after register
    /// allocation), for `wkvc emit --asm`.
    pub fn kernel_asm(&mut self, spec: &wkvc_ir::KernelSpec) -> Result<String, CodegenError> {
        let f = crate::kernels::build(spec, &mut self.module, &mut self.fctx, self.has_fma)?;
        let mut ctx = Context::for_function(f);
        ctx.set_disasm(true);
        let mut ctrl = cranelift_codegen::control::ControlPlane::default();
        let code = ctx
            .compile(self.module.isa(), &mut ctrl)
            .map_err(|e| CodegenError::Cranelift(format!("{:?}", e.inner)))?;
        Ok(code.vcode.clone().unwrap_or_default())
    }

    /// JIT-compile a kernel; the pointer lives as long as `self`. Returns the function and
    /// its machine-code size in bytes.
    pub fn compile_kernel(
        &mut self,
        spec: &wkvc_ir::KernelSpec,
    ) -> Result<(KernelFn, usize), CodegenError> {
        let f = crate::kernels::build(spec, &mut self.module, &mut self.fctx, self.has_fma)?;
        if let Err(errs) = cranelift_codegen::verify_function(&f, self.module.isa()) {
            return Err(CodegenError::Cranelift(format!(
                "{}: invalid IR: {errs}",
                spec.code_name()
            )));
        }
        let mut ctx = self.module.make_context();
        ctx.func = f;
        let name = format!("{}_{}", spec.code_name(), self.count);
        self.count += 1;
        let id = self
            .module
            .declare_function(&name, Linkage::Local, &ctx.func.signature)
            .map_err(cranelift_err)?;
        ctx.func.name = UserFuncName::user(0, id.as_u32());
        self.module
            .define_function(id, &mut ctx)
            .map_err(cranelift_err)?;
        let size = ctx
            .compiled_code()
            .map(|c| c.code_buffer().len())
            .unwrap_or(0);
        self.module.clear_context(&mut ctx);
        self.module.finalize_definitions().map_err(cranelift_err)?;
        let code = self.module.get_finalized_function(id);
        // SAFETY: every kernel is built with the signature fn(*const u64) in the host's
        // default calling convention.
        Ok((
            unsafe { std::mem::transmute::<*const u8, KernelFn>(code) },
            size,
        ))
    }

    /// Build the dot kernel's Cranelift IR into `ctx` (no compilation).
    pub fn build_dot_f32(&mut self, ctx: &mut Context) {
        let ptr = self.module.target_config().pointer_type();
        build_dot_f32(ctx, &mut self.fctx, ptr, self.has_fma, &self.module);
    }

    /// The dot kernel's Cranelift IR text (for snapshots and `wkvc emit`).
    pub fn dot_f32_ir(&mut self) -> String {
        let mut ctx = self.module.make_context();
        self.build_dot_f32(&mut ctx);
        ctx.func.display().to_string()
    }

    /// JIT-compile the dot kernel. The returned pointer lives as long as `self`.
    pub fn compile_dot_f32(&mut self, name: &str) -> Result<DotF32, CodegenError> {
        let mut ctx = self.module.make_context();
        self.build_dot_f32(&mut ctx);
        let id = self
            .module
            .declare_function(name, Linkage::Local, &ctx.func.signature)
            .map_err(cranelift_err)?;
        ctx.func.name = UserFuncName::user(0, id.as_u32());
        self.module
            .define_function(id, &mut ctx)
            .map_err(cranelift_err)?;
        self.module.clear_context(&mut ctx);
        self.module.finalize_definitions().map_err(cranelift_err)?;
        let code = self.module.get_finalized_function(id);
        // SAFETY: the function was built with exactly this signature (ptr, ptr, ptr-sized int)
        // -> f32 in the host's default C calling convention.
        Ok(unsafe { std::mem::transmute::<*const u8, DotF32>(code) })
    }
}

fn build_dot_f32(
    ctx: &mut Context,
    fctx: &mut FunctionBuilderContext,
    ptr: Type,
    fma: bool,
    module: &JITModule,
) {
    let mut sig = module.make_signature();
    sig.params
        .extend([AbiParam::new(ptr), AbiParam::new(ptr), AbiParam::new(ptr)]);
    sig.returns.push(AbiParam::new(types::F32));
    ctx.func.signature = sig;
    let mut b = FunctionBuilder::new(&mut ctx.func, fctx);
    let mem = MemFlagsData::new().with_notrap();
    let v4 = types::F32X4;
    let entry = b.create_block();
    let head = b.create_block();
    let body = b.create_block();
    let reduce = b.create_block();
    let tail = b.create_block();
    let tail_body = b.create_block();
    let exit = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.append_block_param(head, ptr);
    for _ in 0..4 {
        b.append_block_param(head, v4);
    }
    b.append_block_param(tail, ptr);
    b.append_block_param(tail, types::F32);
    b.append_block_param(exit, types::F32);

    let mul_add = |b: &mut FunctionBuilder, x: Value, y: Value, acc: Value| {
        if fma {
            b.ins().fma(x, y, acc)
        } else {
            let p = b.ins().fmul(x, y);
            b.ins().fadd(p, acc)
        }
    };

    // entry: four accumulators over blocks of 16 floats, then a scalar tail
    b.switch_to_block(entry);
    let (pa, pb, n) = {
        let p = b.block_params(entry);
        (p[0], p[1], p[2])
    };
    let zs = b.ins().f32const(0.0);
    let z = b.ins().splat(v4, zs);
    let i0 = b.ins().iconst(ptr, 0);
    let args: Vec<BlockArg> = [i0, z, z, z, z].into_iter().map(BlockArg::from).collect();
    b.ins().jump(head, &args);

    b.switch_to_block(head);
    let hp: Vec<Value> = b.block_params(head).to_vec();
    let n16 = b.ins().band_imm_s(n, -16);
    let more = b.ins().icmp(IntCC::UnsignedLessThan, hp[0], n16);
    b.ins().brif(more, body, &[], reduce, &[]);

    b.switch_to_block(body);
    let off = b.ins().ishl_imm_s(hp[0], 2);
    let a_at = b.ins().iadd(pa, off);
    let b_at = b.ins().iadd(pb, off);
    let mut accs = Vec::with_capacity(4);
    for k in 0..4 {
        let x = b.ins().load(v4, mem, a_at, 16 * k);
        let y = b.ins().load(v4, mem, b_at, 16 * k);
        accs.push(mul_add(&mut b, x, y, hp[1 + k as usize]));
    }
    let inext = b.ins().iadd_imm_s(hp[0], 16);
    let nargs: Vec<BlockArg> = std::iter::once(inext)
        .chain(accs)
        .map(BlockArg::from)
        .collect();
    b.ins().jump(head, &nargs);

    b.switch_to_block(reduce);
    let s01 = b.ins().fadd(hp[1], hp[2]);
    let s23 = b.ins().fadd(hp[3], hp[4]);
    let s = b.ins().fadd(s01, s23);
    let l0 = b.ins().extractlane(s, 0);
    let l1 = b.ins().extractlane(s, 1);
    let l2 = b.ins().extractlane(s, 2);
    let l3 = b.ins().extractlane(s, 3);
    let h01 = b.ins().fadd(l0, l1);
    let h23 = b.ins().fadd(l2, l3);
    let hs = b.ins().fadd(h01, h23);
    b.ins()
        .jump(tail, &[BlockArg::from(hp[0]), BlockArg::from(hs)]);

    b.switch_to_block(tail);
    let tp: Vec<Value> = b.block_params(tail).to_vec();
    let more = b.ins().icmp(IntCC::UnsignedLessThan, tp[0], n);
    b.ins()
        .brif(more, tail_body, &[], exit, &[BlockArg::from(tp[1])]);

    b.switch_to_block(tail_body);
    let off = b.ins().ishl_imm_s(tp[0], 2);
    let a_at = b.ins().iadd(pa, off);
    let b_at = b.ins().iadd(pb, off);
    let x = b.ins().load(types::F32, mem, a_at, 0);
    let y = b.ins().load(types::F32, mem, b_at, 0);
    let acc = mul_add(&mut b, x, y, tp[1]);
    let inext = b.ins().iadd_imm_s(tp[0], 1);
    b.ins()
        .jump(tail, &[BlockArg::from(inext), BlockArg::from(acc)]);

    b.switch_to_block(exit);
    let r = b.block_params(exit)[0];
    b.ins().return_(&[r]);
    b.seal_all_blocks();
    b.finalize(module.target_config());
}

#[cfg(test)]
mod cache_word_tests {
    use super::*;

    /// The generated kernels' and the native attention's reading of a KV cache word (two f16:
    /// scale, zero) equals `half`'s conversion for every finite f16 in either half: normals,
    /// subnormals (tiny scales), signed zeros, negative zero-points.
    #[test]
    fn cache_words_convert_as_f16_for_every_finite_value() {
        let mut jit = CpuJit::host().expect("host JIT");
        let f = crate::kernels::build_f16_pairs(&jit.module, &mut jit.fctx);
        let mut ctx = jit.module.make_context();
        ctx.func = f;
        let id = jit
            .module
            .declare_function("f16_pairs", Linkage::Local, &ctx.func.signature)
            .expect("declare");
        ctx.func.name = UserFuncName::user(0, id.as_u32());
        jit.module.define_function(id, &mut ctx).expect("define");
        jit.module.finalize_definitions().expect("finalize");
        // SAFETY: built with the kernels' signature fn(*const u64).
        let conv: KernelFn = unsafe { std::mem::transmute(jit.module.get_finalized_function(id)) };
        // finite: exponent field below 31
        let finite: Vec<u16> = (0..=u16::MAX).filter(|&h| h & 0x7c00 != 0x7c00).collect();
        // each finite value as the scale (low half) and, reversed, as the zero (high half)
        let words: Vec<u32> = finite
            .iter()
            .zip(finite.iter().rev())
            .map(|(&lo, &hi)| lo as u32 | (hi as u32) << 16)
            .collect();
        let mut out = vec![f32::NAN; 2 * words.len()];
        let args = [
            words.as_ptr() as u64,
            out.as_mut_ptr() as u64,
            words.len() as u64,
        ];
        // SAFETY: the argument words point to `words` and to `out` of twice its length.
        unsafe { conv(args.as_ptr()) };
        for (i, &w) in words.iter().enumerate() {
            let (s, z) = wkvc_ir::kvcache::unpack_params(w);
            assert_eq!(out[2 * i].to_bits(), s.to_bits(), "scale of {w:#010x}");
            assert_eq!(out[2 * i + 1].to_bits(), z.to_bits(), "zero of {w:#010x}");
            let (ns, nz) = crate::native::cache_word_params(w);
            assert_eq!(
                (ns.to_bits(), nz.to_bits()),
                (s.to_bits(), z.to_bits()),
                "{w:#010x}"
            );
        }
    }
}
