//! wkvc-codegen owns code generation: an emitter per kernel, specialised on its constants.
//! `cpu` holds the JIT (host ISA detection, FMA-aware emission, compilation of kernels);
//! `kernels` has the Cranelift emitter of every kernel kind of the lowered graph and the
//! activation prep of the quantized GEMMs. The CUDA emitter comes later.

pub mod cpu;
pub mod kernels;

#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error("host ISA: {0}")]
    Isa(String),
    #[error("cranelift: {0}")]
    Cranelift(String),
    #[error("the CPU back end does not support this kernel: {0}")]
    Unsupported(String),
}
