//! wkvc-codegen owns code generation: an emitter per kernel, specialised on its constants.
//! `cpu` holds the JIT (host ISA detection, FMA-aware emission, compilation of kernels);
//! `kernels` has the Cranelift emitter of every kernel kind of the lowered graph and the
//! activation prep of the quantized GEMMs; `cuda` emits CUDA C per kernel spec and `nvrtc`
//! compiles it (CUBIN per architecture with ptxas's report, portable PTX) without a GPU;
//! `cuda_host` runs that CUDA C on the CPU (an emulator that checks kernels without a GPU).

pub mod cpu;
pub mod cuda;
pub mod cuda_host;
pub mod kernels;
pub mod native;
pub mod nvrtc;

#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error("host ISA: {0}")]
    Isa(String),
    #[error("cranelift: {0}")]
    Cranelift(String),
    #[error("the back end does not support this kernel: {0}")]
    Unsupported(String),
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("CUDA host emulator: {0}")]
    HostEmulator(String),
}

/// The group length of a quantized GEMM both back ends can build: codes of at most 4 bits
/// packed two per byte, an even width and an even group (a group starts on a byte).
pub fn qgemm_group(k: usize, bits: u32, group: i64) -> Result<usize, CodegenError> {
    let gl = wkvc_ir::quant::group_len(k, group);
    if bits > 4 || !k.is_multiple_of(2) || !gl.is_multiple_of(2) {
        return Err(CodegenError::Unsupported(format!(
            "qgemm needs <= 4 bits, an even width and an even group, got {bits} bits, k = {k}, \
             group {gl}"
        )));
    }
    Ok(gl)
}
