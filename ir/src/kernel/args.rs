//! The argument block of each kernel kind: the one contract between the emitters and the
//! engines. Every field is a 64-bit word (a pointer, a count, or an f32's bits); a kind's
//! struct holds what its CPU and CUDA kernels read, and a back end leaves the words it does
//! not use at 0.
//!
//! - The Cranelift kernels are `extern "C" fn(args: *const Args)` and read each field at its
//!   `offset_of!`.
//! - The CUDA kernels take the struct by value (`const QGemmArgs a`): `declare_cuda` gives
//!   its C declaration from the same field list, so both sides agree on the layout.
//! - The engines fill one struct per launch.

/// The field names of an argument struct, in declaration order (the CUDA declaration and
/// diagnostics use them).
pub trait KernelArgs: Copy + Default + Send + Sync + 'static {
    const NAME: &'static str;
    const FIELDS: &'static [&'static str];

    /// The words of the struct, in field order.
    fn words(&self) -> &[u64] {
        // SAFETY: every argument struct is `#[repr(C)]` with only u64 fields (checked by
        // the `kernel_args!` macro, which is the only way they are declared).
        unsafe { std::slice::from_raw_parts(self as *const Self as *const u64, Self::FIELDS.len()) }
    }
}

macro_rules! kernel_args {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $f:ident),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fm])* pub $f: u64,)*
        }
        impl KernelArgs for $name {
            const NAME: &'static str = stringify!($name);
            const FIELDS: &'static [&'static str] = &[$(stringify!($f)),*];
        }
        const _: () = assert!(
            std::mem::size_of::<$name>() == 8 * <$name as KernelArgs>::FIELDS.len()
        );
    };
}

kernel_args! {
    /// `embed`: rows `ids[0..m]` of the table to `y`.
    EmbedArgs {
        /// token ids (i32)
        ids,
        /// the table's rows (f32)
        table,
        y,
        m,
    }
}

kernel_args! {
    /// `rms_norm` of `m` rows.
    RmsNormArgs { x, w, y, m }
}

kernel_args! {
    /// `silu_mul`: `m` rows of `[g | u]` to `silu(g) * u`.
    SiluMulArgs { x, y, m }
}

kernel_args! {
    /// `qgemm`: `y[i, n0..n1] (+)= x[i] . W[n]` for `m` rows.
    QGemmArgs {
        /// the activation rows (f32, `k` each)
        x,
        /// CPU: the rows permuted per 32 columns (f32), or their int8 codes (int8 path)
        xp,
        /// CPU: per-group sums of the activations
        gsum,
        /// CPU int8 path: per-block scales of the int8 codes
        dx,
        m,
        /// packed codes, scales, zeros (CPU: the engine's tile-ordered f32 copies; CUDA: as
        /// stored, f16 scale/zero)
        w,
        s,
        z,
        y,
        /// row stride of y (floats)
        ldy,
        /// output columns n0..n1 (CUDA: 0..n1)
        n0,
        n1,
        /// residual rows (0: none) and their stride
        r,
        ldr,
        /// CUDA `_gemv_rms`: the fused norm's weight and eps (f32 bits)
        nw,
        eps,
    }
}

kernel_args! {
    /// `gemm`: f32 weights (FP models), otherwise as `QGemmArgs`.
    GemmArgs { x, m, w, y, ldy, n0, n1, r, ldr, nw, eps }
}

kernel_args! {
    /// `logits`: `y[i, n0..n1] = x[i] . W[n]` for `m` rows; the int8 path reads the rows'
    /// int8 codes and block scales and the int8 table.
    LogitsArgs {
        x,
        /// int8 path: the rows' codes and per-block scales
        xq,
        dx,
        m,
        /// the f32 table
        w,
        /// int8 path: the table's codes and per-block scales
        wq,
        ws,
        y,
        ldy,
        n0,
        n1,
        /// CUDA `_gemv_rms`: the final norm's weight and eps (f32 bits)
        nw,
        eps,
    }
}

kernel_args! {
    /// `rope_kv`: RoPE on `m` rows of qkv in place, K/V smoothed, quantized and appended to
    /// the cache from row `row0` on.
    RopeKvArgs {
        x,
        m,
        /// CPU: cos and sin tables `[m, rope_dim / 2]`
        cos,
        sin,
        /// CUDA: positions (i32) and inverse frequencies
        pos,
        inv_freq,
        /// K codes (or f32 rows for a 16-bit cache), K (scale, zero) per (token, kv head), V
        /// codes, V params
        kc,
        kp,
        vc,
        vp,
        /// CPU: the first cache row written
        row0,
        /// CUDA: the cache length (i32) in device memory (graph replay)
        state,
        /// smoothing: K shift and scale, V shift and scale (0 without)
        ksh,
        ksc,
        vsh,
        vsc,
    }
}

kernel_args! {
    /// `attention`. CPU: one query row `q`, kv head `g`, over `nq` packed past tokens and the
    /// FP rows `f0..f1`. CUDA: `_split` over all `m` rows (the cache length in `state`), then
    /// `_merge` of the `splits` partial results in `part`.
    AttentionArgs {
        q,
        m,
        kc,
        kp,
        vc,
        vp,
        nq,
        /// FP K and V rows and their stride (floats)
        kf,
        vf,
        ldf,
        f0,
        f1,
        g,
        out,
        /// CPU: per-thread accumulators (f32, 4 * head_dim * (group + 1))
        scratch,
        /// CUDA: cache length, decode-equivalent flag, partial results, splits
        state,
        decode,
        part,
        splits,
        ksh,
        ksc,
        vsh,
        vsc,
        /// CUDA, a recent window (`--kv-window`): its length R (0 or 1: none), the segment's
        /// full-precision source (the tail's rows, then the chunk's; K then V a row) and the
        /// tail the source is built from or the next tail is written to
        win,
        wsrc,
        wbuf,
    }
}

/// The C declaration of an argument struct for the CUDA kernels (the Rust layout: one
/// 8-byte word per field, in order).
pub fn declare_cuda<A: KernelArgs>() -> String {
    format!(
        "struct {} {{ unsigned long long {}; }};\n",
        A::NAME,
        A::FIELDS.join(", ")
    )
}

/// An f32 as an argument word.
pub fn f32_word(x: f32) -> u64 {
    x.to_bits() as u64
}
