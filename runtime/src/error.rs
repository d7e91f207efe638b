//! The runtime's errors.

/// What can go wrong opening, compiling or running a model.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Ir(#[from] wkvc_ir::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("plan {0}")]
    Plan(String),
    #[error(transparent)]
    Pass(#[from] wkvc_passes::PassError),
    /// The graph has something the compiled back ends do not implement.
    #[error(transparent)]
    Lower(#[from] wkvc_passes::lower::LowerError),
    /// Generating or compiling a kernel failed.
    #[error("code generation: {0}")]
    Codegen(#[from] wkvc_codegen::CodegenError),
    /// The CUDA driver, a device or NVRTC failed or is missing.
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("{0}")]
    Invalid(String),
    /// A call stopped by its cancellation token: nothing was written.
    #[error("cancelled: nothing was written")]
    Cancelled,
}
