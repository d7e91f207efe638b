//! CUDA C emitter: one translation unit per kernel spec of the lowered graph, every constant
//! of the spec folded in (widths, group, bits, head dim, GQA ratio, smoothing). Activations
//! are f32 and every sum accumulates in f32; weights and the KV cache keep the plan's formats
//! (packed int4 rows, f16 scale/zero; the cache as packed codes with an f16 scale and zero per
//! token and group in one word, like the CPU engine's). No header is included, so NVRTC needs no include path:
//! f16 conversions and the tensor-core product are PTX helpers (`h2f`, `f2h`, `pack_h2`,
//! `mma_16816`), left out under `WKVC_HOST_EMULATION`, where `crate::cuda_host` brings host
//! versions to run the same source on a CPU.
//!
//! Each kernel's launch is described by [`Launch`]; every entry point takes its kind's
//! argument struct by value (`wkvc_ir::kernel::args`, declared in the source from the same
//! field list), and `unpack` gives the body its arguments as named locals. One module per
//! kernel kind: `gemm` (qgemm, gemm, logits, and the tensor-core variant), `rows`
//! (rms_norm, silu_mul, embed), `rope_kv`, `attention`.

mod attention;
mod gemm;
mod rope_kv;
mod rows;

pub use gemm::mma_ok;

use crate::CodegenError;
use std::fmt::Write;
use wkvc_ir::KernelSpec;

/// Threads per block of the row kernels.
pub const BLOCK: u32 = 256;
/// Output rows per block of the GEMV kernels (one warp each).
pub const GEMV_ROWS: u32 = 8;
/// Activation rows a GEMV launch handles (more: the tiled kernel).
pub const GEMV_MAX_M: u32 = 8;
/// Tile of the shared-memory GEMM: activation rows x output columns x depth.
pub const TILE_M: u32 = 32;
pub const TILE_N: u32 = 64;
pub const TILE_K: u32 = 32;
/// Tile of the tensor-core GEMM variant: activation rows x outputs per block.
pub const MMA_M: u32 = 64;
pub const MMA_N: u32 = 32;
/// Context tokens per block step of the attention split kernel (one per thread).
pub const ATTN_TILE: u32 = 128;

/// How a kernel's entry points are launched (`m` = activation rows of the call, `n` = output
/// columns of the part).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Launch {
    /// grid (m), block `block`
    PerRow { block: u32 },
    /// grid (ceil(m * n / 256)), block 256
    Elementwise,
    /// `{name}_gemv` for m <= GEMV_MAX_M: grid (ceil(n / GEMV_ROWS)), block 32 * GEMV_ROWS
    /// (also `{name}_gemv_rms`, fused with the RMSNorm before it, two more arguments: the
    /// norm's weight and eps as a float; and `{name}_gemv_silu`, fused with the SiLU-mul before
    /// it, x = [g | u] of width 2k);
    /// `{name}_tiled` otherwise: grid (ceil(n / TILE_N), ceil(m / TILE_M)), block 256; a
    /// quantized GEMM whose width and group are multiples of 16 also has `{name}_mma`
    /// (tensor cores): grid (ceil(n / MMA_N), ceil(m / MMA_M)), block 128
    Gemm,
    /// `{name}_split`: grid (splits, kv_heads, m), block ATTN_TILE, writing partial results
    /// to scratch; `{name}_merge`: grid (heads, m), block head_dim
    Attention { splits_max: u32 },
}

/// A kernel's CUDA C.
#[derive(Clone, Debug)]
pub struct CudaKernel {
    /// entry points (`extern "C"`)
    pub entries: Vec<String>,
    pub source: String,
    pub launch: Launch,
}

const PRELUDE: &str = r#"typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// the only PTX: f16 conversions and the tensor-core product (the host emulator, which runs
// this source on a CPU to check it, defines WKVC_HOST_EMULATION and brings its own)
#ifndef WKVC_HOST_EMULATION
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// two f32 as an f16x2 register, `lo` in the low half
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// d += a b for one warp: A 16 x 16 (row-major f16, a0..a3), B 16 x 8 (column-major f16,
// b0, b1), D 16 x 8 f32 (d0..d3), fragments as PTX's mma.m16n8k16
__device__ __forceinline__ void mma_16816(float& d0, float& d1, float& d2, float& d3, u32 a0,
        u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_min(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// sum (or max) over the block; `red` holds one float per warp; every thread gets the result
__device__ __forceinline__ float block_sum(float v, float* red) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    v = l < nw ? red[l] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* red) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    v = l < nw ? red[l] : -INFINITY;
    return warp_max(v);
}
"#;

/// The CUDA C of one kernel spec.
pub fn emit(spec: &KernelSpec) -> Result<CudaKernel, CodegenError> {
    let name = entry_base(spec);
    let mut s = String::new();
    // only what the code depends on (not the layer or the part widths): kernels with the same
    // source share one module, keyed by its hash
    let _ = writeln!(s, "// wkvc kernel {name}");
    s.push_str(PRELUDE);
    let (entries, launch) = match spec {
        KernelSpec::Embed { vocab, dim } => {
            rows::emit_embed(&mut s, &name, *vocab, *dim);
            (vec![name.clone()], Launch::PerRow { block: 128 })
        }
        KernelSpec::RmsNorm { dim, eps } => {
            rows::emit_rms(&mut s, &name, *dim, *eps);
            (vec![name.clone()], Launch::PerRow { block: BLOCK })
        }
        KernelSpec::SiluMul { n } => {
            rows::emit_silu_mul(&mut s, &name, *n);
            (vec![name.clone()], Launch::Elementwise)
        }
        KernelSpec::QGemm {
            k,
            bits,
            group,
            residual,
            ..
        } => {
            let gl = crate::qgemm_group(*k, *bits, *group)?;
            gemm::emit_gemm(
                &mut s,
                &name,
                *k,
                Some(gl),
                *residual,
                gemm::GemmArgsKind::Quantized,
            );
            let mut e = gemm::gemm_entries(&name);
            if mma_ok(*k, gl) {
                e.push(format!("{name}_mma"));
            }
            (e, Launch::Gemm)
        }
        KernelSpec::Gemm { k, residual, .. } => {
            gemm::emit_gemm(&mut s, &name, *k, None, *residual, gemm::GemmArgsKind::F32);
            (gemm::gemm_entries(&name), Launch::Gemm)
        }
        KernelSpec::Logits { dim, .. } => {
            // the tied f32 table (the CPU's int8 activation mode has no CUDA counterpart: the
            // GPU reads the table at f32)
            gemm::emit_gemm(&mut s, &name, *dim, None, false, gemm::GemmArgsKind::Logits);
            (gemm::gemm_entries(&name), Launch::Gemm)
        }
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
            check_head_dim(*head_dim)?;
            crate::kernels::check_rotate(*rotate, *head_dim)?;
            let gl = crate::kernels::check_group(*kv_group, *head_dim)?;
            rope_kv::emit_rope_kv(
                &mut s,
                &name,
                (*heads, *kv_heads, *head_dim, *rope_dim),
                (*kv_bits, gl),
                *smooth,
                *rotate,
            );
            (vec![name.clone()], Launch::PerRow { block: 128 })
        }
        KernelSpec::Attention {
            heads,
            kv_heads,
            head_dim,
            kv_bits,
            past_only,
            smooth,
            kv_group,
            ..
        } => {
            check_head_dim(*head_dim)?;
            let gl = crate::kernels::check_group(*kv_group, *head_dim)?;
            if !heads.is_multiple_of(*kv_heads) {
                return Err(CodegenError::Unsupported(format!(
                    "attention: {heads} heads are not a multiple of {kv_heads} kv heads"
                )));
            }
            attention::emit_attention(
                &mut s,
                &name,
                (*heads, *kv_heads, *head_dim, gl),
                *kv_bits,
                *past_only,
                *smooth,
            );
            let mut entries = vec![format!("{name}_split"), format!("{name}_merge")];
            if *past_only && *kv_bits != 16 {
                // the recent window's source and tail (`attention::emit_window`)
                entries.extend([format!("{name}_wput"), format!("{name}_wkeep")]);
            }
            (entries, Launch::Attention { splits_max: 64 })
        }
    };
    Ok(CudaKernel {
        entries,
        source: s,
        launch,
    })
}

/// The locals a kernel body uses, read from its argument struct `a`: `(C type, name, field)`;
/// an empty field gives 0 (the kind has no such argument). Floats travel as their bits.
pub(crate) fn unpack(fields: &[(&str, &str, &str)]) -> String {
    let mut out = String::new();
    for (ty, name, field) in fields {
        let line = if field.is_empty() {
            format!("    {ty} {name} = 0;\n")
        } else if *ty == "float" {
            format!("    float {name} = __int_as_float((int)a.{field});\n")
        } else if ty.ends_with('*') {
            format!("    {ty} __restrict__ {name} = ({ty})a.{field};\n")
        } else {
            format!("    {ty} {name} = ({ty})a.{field};\n")
        };
        out.push_str(&line);
    }
    // the body's template starts a new line after it
    out.truncate(out.trim_end().len());
    out
}

/// `unpack` of `fields` and then `more`.
pub(crate) fn unpack_with(fields: &[(&str, &str, &str)], more: &[(&str, &str, &str)]) -> String {
    unpack(fields) + "\n" + &unpack(more)
}

/// The spec's code name as a C identifier (a per-channel group is `g-1` in code names).
pub fn entry_base(spec: &KernelSpec) -> String {
    spec.code_name().replace('-', "m")
}

fn check_head_dim(hd: usize) -> Result<(), CodegenError> {
    if !hd.is_multiple_of(32) || hd > 256 {
        return Err(CodegenError::Unsupported(format!(
            "the CUDA attention kernels need a head dim that is a multiple of 32 (at most 256), \
             got {hd}"
        )));
    }
    Ok(())
}
