//! wkvc-codegen owns code generation: an emitter per kernel, specialised on its constants.
//! `cpu` builds Cranelift IR for the host ISA and JIT-compiles it. For now it holds the JIT
//! setup (host ISA detection, FMA-aware emission) and the f32x4 dot-product kernel that the
//! GEMV/attention kernels of the CPU back end are built from; the CUDA emitter comes later.

pub mod cpu;

#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error("host ISA: {0}")]
    Isa(String),
    #[error("cranelift: {0}")]
    Cranelift(String),
}
