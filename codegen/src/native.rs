//! Kernels at the machine's full SIMD width, written with `std::arch` and chosen at load by
//! CPU features (`CpuIsa`).
//!
//! Cranelift 0.135 emits 128-bit vectors on x86-64 (TOOLCHAIN.md). The fused, specialised
//! kernels stay generated; the int8-activation quantized GEMM, where prefill and batched
//! decode spend their time, also has a 256-bit AVX2 micro-kernel here. It takes the same
//! argument struct (`QGemmArgs`), the same weight tiles (`kernels::tile_codes`) and the same
//! activation prep (`kernels::prep_int8`) as the generated kernel, and computes the same
//! algebra:
//!
//! `y[i, n] = sum_g s[n, g] (sum_{b in g} dx[i, b] (xq[i, b] . q[n, b])) - sum_g s[n, g] (z[n, g] gsum[i, g] - tail[i, n, g])`
//!
//! with the int8 x int4 block dot products exact in integers (`vpmaddubsw`: codes 0..15
//! times activations -127..127, pairs summed in i16 without saturation, then `vpmaddwd` to
//! i32). Only the order of the f32 sums differs from the Cranelift kernel. Every output is
//! summed the same way whatever the rows and columns of the call (batch invariance: a
//! session's row gets the same bits alone or in a batch).

use crate::cpu::KernelFn;
use wkvc_ir::Act;
use wkvc_ir::KernelSpec;
use wkvc_ir::kernel::args::QGemmArgs;

/// The instruction set the CPU engine's native kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuIsa {
    /// Cranelift's kernels only (128-bit vectors): portable to every x86-64 with SSE4.1 and
    /// to other hosts Cranelift supports.
    Base,
    /// 256-bit AVX2 + FMA micro-kernels for the int8-activation quantized GEMM.
    Avx2,
    /// The AVX2 kernels with the int8 dot products by `vpdpbusd` (AVX-VNNI, or AVX512-VNNI
    /// with VL): one instruction for what takes three, the same integers, the same bits.
    Avx2Vnni,
    /// `Avx2Vnni` with the int8 GEMM at 512 bits (AVX512-F/BW/VL + VNNI): a register holds 4
    /// weight rows, a micro-tile 4 activation rows x 8 weight rows; the same bits.
    Avx512,
}

impl CpuIsa {
    pub fn name(self) -> &'static str {
        match self {
            CpuIsa::Base => "base",
            CpuIsa::Avx2 => "avx2",
            CpuIsa::Avx2Vnni => "avx2-vnni",
            CpuIsa::Avx512 => "avx512",
        }
    }

    /// The widest variant this host runs.
    pub fn detect() -> CpuIsa {
        CpuIsa::available().pop().unwrap_or(CpuIsa::Base)
    }

    /// Whether this host can run the variant.
    pub fn supported(self) -> bool {
        match self {
            CpuIsa::Base => true,
            CpuIsa::Avx2 => avx2_fma(),
            CpuIsa::Avx2Vnni => avx2_fma() && vnni().is_some(),
            CpuIsa::Avx512 => avx2_fma() && avx512_vnni(),
        }
    }

    /// An error naming what this host runs when it cannot run the variant.
    pub fn check(self) -> Result<(), String> {
        if self.supported() {
            return Ok(());
        }
        let runs: Vec<&str> = CpuIsa::available().iter().map(|i| i.name()).collect();
        Err(format!(
            "--cpu-isa {}: this CPU lacks the instructions (it runs: {})",
            self.name(),
            runs.join(", ")
        ))
    }

    /// The variants this host runs, narrowest first.
    pub fn available() -> Vec<CpuIsa> {
        [CpuIsa::Base, CpuIsa::Avx2, CpuIsa::Avx2Vnni, CpuIsa::Avx512]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }
}

impl std::str::FromStr for CpuIsa {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "base" => Ok(CpuIsa::Base),
            "avx2" => Ok(CpuIsa::Avx2),
            "avx2-vnni" => Ok(CpuIsa::Avx2Vnni),
            "avx512" => Ok(CpuIsa::Avx512),
            _ => Err(format!(
                "unknown CPU ISA {s:?} (base, avx2, avx2-vnni, avx512)"
            )),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_fma() -> bool {
    false
}

/// Which encoding of 256-bit `vpdpbusd` this host has: AVX-VNNI (VEX) first, else
/// AVX512-VNNI with AVX512-VL (EVEX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vnni {
    Vex,
    Evex,
}

#[cfg(target_arch = "x86_64")]
fn vnni() -> Option<Vnni> {
    use std::arch::is_x86_feature_detected as has;
    if has!("avxvnni") {
        Some(Vnni::Vex)
    } else if has!("avx512vnni") && has!("avx512vl") {
        Some(Vnni::Evex)
    } else {
        None
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn vnni() -> Option<Vnni> {
    None
}

/// AVX512-F, BW, VL and VNNI (the 512-bit GEMM's instructions).
#[cfg(target_arch = "x86_64")]
fn avx512_vnni() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_vnni() -> bool {
    false
}

/// A native kernel: `f(shape, args)`.
pub type NativeFn = unsafe fn(&NativeShape, *const u64);

/// The spec constants a native kernel reads (the generated kernels have them built in).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NativeShape {
    /// GEMMs: columns of the dot products
    pub k: usize,
    /// GEMMs: group length of the weights' scales; attention: channels a (scale, zero) group
    /// of the packed cache (the head dim, or `kv_group`)
    pub gl: usize,
    /// attention: query heads per kv head, kv heads, head dim, packed (<= 4-bit) past,
    /// smoothing
    pub group: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub packed: bool,
    pub smooth: bool,
}

/// A kernel of the CPU engine: generated by Cranelift, or native for the host's ISA.
#[derive(Clone, Copy, Debug)]
pub enum CpuKernel {
    Jit(KernelFn),
    Native {
        f: NativeFn,
        shape: NativeShape,
        /// the function's name (for `wkvc emit` and logs)
        name: &'static str,
    },
}

impl CpuKernel {
    /// Call the kernel with its kind's argument words.
    ///
    /// # Safety
    /// `args` points at the argument struct of the kernel's kind, whose pointers address
    /// memory of the sizes its rows and columns describe.
    pub unsafe fn call(&self, args: *const u64) {
        // SAFETY: the caller's contract.
        unsafe {
            match self {
                CpuKernel::Jit(f) => f(args),
                CpuKernel::Native { f, shape, .. } => f(shape, args),
            }
        }
    }

    pub fn native_name(&self) -> Option<&'static str> {
        match self {
            CpuKernel::Jit(_) => None,
            CpuKernel::Native { name, .. } => Some(name),
        }
    }
}

/// The native kernel for `spec` on `isa`, if there is one (otherwise the generated kernel
/// serves). Only asked for variants the host supports (`CpuIsa::supported`).
pub fn kernel(spec: &KernelSpec, isa: CpuIsa) -> Option<CpuKernel> {
    if isa == CpuIsa::Base || !isa.supported() {
        return None;
    }
    native_kernel(spec, isa)
}

#[cfg(not(target_arch = "x86_64"))]
fn native_kernel(_spec: &KernelSpec, _isa: CpuIsa) -> Option<CpuKernel> {
    None
}

/// The 512-bit head for batches, the 256-bit VNNI head (VEX) for one row and the last rows.
///
/// # Safety
/// As `avx512::logits_int8`.
#[cfg(target_arch = "x86_64")]
unsafe fn logits_avx512_vex(shape: &NativeShape, args: *const u64) {
    // SAFETY: the caller's contract; the host has AVX-VNNI (`vnni()`)
    unsafe { avx512::logits_int8(shape, args, avx2::vex::logits_int8) }
}

/// As `logits_avx512_vex` with the EVEX-encoded 256-bit head.
///
/// # Safety
/// As `avx512::logits_int8`.
#[cfg(target_arch = "x86_64")]
unsafe fn logits_avx512_evex(shape: &NativeShape, args: *const u64) {
    // SAFETY: the caller's contract; AVX512-VNNI and VL are part of `CpuIsa::Avx512`
    unsafe { avx512::logits_int8(shape, args, avx2::evex::logits_int8) }
}

#[cfg(target_arch = "x86_64")]
fn native_kernel(spec: &KernelSpec, isa: CpuIsa) -> Option<CpuKernel> {
    // the int8 GEMM and head of the ISA (and, for VNNI, of the encoding the host has)
    let (mut qgemm, mut logits): (NativeFn, NativeFn) = match (isa, vnni()) {
        (CpuIsa::Avx2Vnni | CpuIsa::Avx512, Some(Vnni::Vex)) => {
            (avx2::vex::qgemm_int8, avx2::vex::logits_int8)
        }
        (CpuIsa::Avx2Vnni | CpuIsa::Avx512, Some(Vnni::Evex)) => {
            (avx2::evex::qgemm_int8, avx2::evex::logits_int8)
        }
        _ => (avx2::madd::qgemm_int8, avx2::madd::logits_int8),
    };
    if isa == CpuIsa::Avx512 {
        qgemm = avx512::qgemm_int8;
        logits = if vnni() == Some(Vnni::Vex) {
            logits_avx512_vex
        } else {
            logits_avx512_evex
        };
    }
    match spec {
        KernelSpec::QGemm {
            k,
            group,
            bits: 4,
            act: Act::Int8,
            ..
        } => Some(CpuKernel::Native {
            f: qgemm,
            shape: NativeShape {
                k: *k,
                gl: wkvc_ir::quant::group_len(*k, *group),
                ..Default::default()
            },
            name: match isa {
                CpuIsa::Avx512 => "qgemm_int8_avx512",
                CpuIsa::Avx2Vnni => "qgemm_int8_avx2_vnni",
                _ => "qgemm_int8_avx2",
            },
        }),
        KernelSpec::Logits {
            dim,
            act: Act::Int8,
            ..
        } if dim.is_multiple_of(32) => Some(CpuKernel::Native {
            f: logits,
            shape: NativeShape {
                k: *dim,
                gl: *dim,
                ..Default::default()
            },
            name: match isa {
                CpuIsa::Avx512 => "logits_int8_avx512",
                CpuIsa::Avx2Vnni => "logits_int8_avx2_vnni",
                _ => "logits_int8_avx2",
            },
        }),
        // a (scale, zero) group a kv head, or groups of a multiple of 32 channels dividing it
        KernelSpec::Attention {
            heads,
            kv_heads,
            head_dim,
            kv_bits,
            smooth,
            kv_group,
            ..
        } if head_dim.is_multiple_of(32)
            && (*kv_group == 0
                || (kv_group.is_multiple_of(32)
                    && head_dim.is_multiple_of(*kv_group)
                    && head_dim / kv_group <= MAX_KV_GROUPS))
            && *kv_heads > 0
            && heads.is_multiple_of(*kv_heads)
            && (*kv_bits <= 4 || *kv_bits == 16) =>
        {
            Some(CpuKernel::Native {
                f: avx2::attention,
                shape: NativeShape {
                    group: heads / kv_heads,
                    kv_heads: *kv_heads,
                    head_dim: *head_dim,
                    packed: *kv_bits <= 4,
                    smooth: *smooth,
                    // an f32 cache (16 bits) has no groups: the head dim
                    gl: if *kv_bits <= 4 {
                        wkvc_ir::kvcache::group_len(*kv_group, *head_dim)
                    } else {
                        *head_dim
                    },
                    ..Default::default()
                },
                name: "attention_avx2",
            })
        }
        _ => None,
    }
}

/// What `wkvc emit` shows for a native kernel: its source is Rust, compiled with wkvc.
pub fn describe(spec: &KernelSpec, isa: CpuIsa) -> Option<String> {
    let k = kernel(spec, isa)?;
    let name = k.native_name()?;
    let CpuKernel::Native { shape, .. } = k else {
        return None;
    };
    let how = match spec {
        KernelSpec::Attention { .. } => format!(
            "{} query heads per kv head, head dim {}: two passes instead of an online \
             softmax: every score of the packed past (4-bit codes unpacked to f32, the \
             smoothed query dotted with them, scale and zero applied after the sum) and of the \
             FP rows, then max, exp (a degree-6 polynomial, 8 lanes) and their sum, then V \
             summed per 32 channels for all heads at once; scores in a per-thread buffer",
            shape.group, shape.head_dim
        ),
        KernelSpec::Logits { .. } if isa == CpuIsa::Avx512 => format!(
            "dim {}: several rows: per 32-column block, 4 table rows (2 to a 512-bit register) \
             x up to 4 activation rows; int8 x int8 by a masked negation (w's sign) + vpdpbusd \
             on |w|, cvt, FMA by the product of the row's and the table row's block scales; \
             one row (and the last table rows) by the 256-bit VNNI head",
            shape.k
        ),
        KernelSpec::Logits { .. } => format!(
            "dim {}: per 32-column block, 2 table rows x up to {} activation rows; int8 x int8 \
             by vpsignb + {} on |w|, cvt, FMA by the product of the row's and the table row's \
             block scales",
            shape.k,
            avx2_rows(),
            if isa != CpuIsa::Avx2 {
                "vpdpbusd (sums of 4 products in i32)"
            } else {
                "vpmaddubsw (pairs in i16, at most 2 x 128 x 127), vpmaddwd to i32"
            }
        ),
        _ if isa == CpuIsa::Avx512 => format!(
            "k {}, group length {}: 512-bit: per 32-column block, a whole {}-row weight tile \
             (4 rows to a register) x up to 4 activation rows; weights as 16-byte nibble \
             blocks, codes 0..15 x int8 activations by two vpdpbusd, cvt, FMA by the block's \
             activation scale; per group x the weights' scale; zero points and the group's \
             tail columns in f32",
            shape.k,
            shape.gl,
            crate::kernels::QTILE
        ),
        _ => format!(
            "k {}, group length {}: per 32-column block, a whole tile of 8 weight rows for one \
             activation row, 4 weight rows x up to {} activation rows for more; weights as \
             16-byte nibble blocks of a {}-row tile, codes 0..15 x int8 activations by {}, \
             cvt, FMA by the block's activation scale; per group x the weights' scale; zero \
             points and the group's tail columns in f32",
            shape.k,
            shape.gl,
            avx2_rows(),
            crate::kernels::QTILE,
            if isa != CpuIsa::Avx2 {
                "two vpdpbusd (sums of 4 products in i32)"
            } else {
                "vpmaddubsw (pairs in i16), vpmaddwd to i32"
            }
        ),
    };
    Some(format!(
        "; {} on {}: native kernel wkvc_codegen::native::{} (Rust std::arch, compiled with \
         wkvc; not generated)\n; {how}\n",
        spec.code_name(),
        isa.name(),
        name,
    ))
}

/// One 32-column block of `kernels::prep_int8` with 256-bit vectors when the host has AVX2:
/// writes the block's codes (evens, then odds) and returns its scale and the sum of its
/// codes, the same bits as the scalar loop. `None` (nothing written) when the host lacks AVX2
/// or a scaled value is not finite or beyond +-127.5 (non-finite inputs, a subnormal
/// scale), where the scalar loop's rounding and clamping decide.
#[inline]
pub fn prep_int8_block(x: &[f32], xq: &mut [i8]) -> Option<(f32, i32)> {
    #[cfg(target_arch = "x86_64")]
    {
        if x.len() == 32 && xq.len() == 32 && avx2_fma() {
            // SAFETY: 32 floats and 32 codes; the host has AVX2 and FMA
            return unsafe { avx2::prep_block(x, xq) };
        }
    }
    let _ = (x, xq);
    None
}

/// Activation rows per AVX2 micro-tile.
const fn avx2_rows() -> usize {
    4
}

// The micro-kernels index several register arrays and pointers by the same row and column
// numbers; index loops say that more plainly than zipped iterators.
/// Geometry and pointers of one int8 GEMM call, shared by the native GEMM variants.
#[cfg(target_arch = "x86_64")]
struct Call {
    k: usize,
    gl: usize,
    ng: usize,
    nb: usize,
    xq: *const i8,
    dx: *const f32,
    gs: *const f32,
    x: *const f32,
    w: *const u8,
    s: *const f32,
    z: *const f32,
    y: *mut f32,
    ldy: usize,
    r: *const f32,
    ldr: usize,
    n0: usize,
    n1: usize,
}

/// A micro-tile routine of a GEMM variant: `f(call, i, nb0, nb1)` for R activation rows from
/// i over the weight rows nb0..nb1.
#[cfg(target_arch = "x86_64")]
type Tiles = unsafe fn(&Call, usize, usize, usize);

#[cfg(target_arch = "x86_64")]
impl Call {
    fn new(k: usize, gl: usize, a: &QGemmArgs) -> Call {
        Call {
            k,
            gl,
            ng: k.div_ceil(gl),
            nb: (k / gl) * (gl / 32) + (k % gl) / 32,
            xq: a.xp as *const i8,
            dx: a.dx as *const f32,
            gs: a.gsum as *const f32,
            x: a.x as *const f32,
            w: a.w as *const u8,
            s: a.s as *const f32,
            z: a.z as *const f32,
            y: a.y as *mut f32,
            ldy: a.ldy as usize,
            r: a.r as *const f32,
            ldr: a.ldr as usize,
            n0: a.n0 as usize,
            n1: a.n1 as usize,
        }
    }

    /// The call's weight rows in blocks of about 16 KiB (they stay in L1 while the activation
    /// rows stream past), each block's `m` activation rows in micro-tiles of 4, then the rest:
    /// `tiles[R - 1]` for R rows.
    ///
    /// # Safety
    /// The routines' contracts: the host has their instructions, the call's pointers address
    /// its buffers.
    unsafe fn sweep(&self, m: usize, tiles: [Tiles; 4]) {
        if self.n0 >= self.n1 || m == 0 {
            return;
        }
        let qt = crate::kernels::QTILE;
        let blk = (16384 / (self.k / 2).max(1))
            .clamp(qt, 64)
            .next_multiple_of(qt);
        let mut nb0 = self.n0 & !(qt - 1);
        while nb0 < self.n1 {
            let nb1 = (nb0 + blk).min(self.n1);
            let mut i = 0;
            while i + 4 <= m {
                // SAFETY: rows i..i+4 < m (the caller's contract for the rest)
                unsafe { tiles[3](self, i, nb0, nb1) };
                i += 4;
            }
            if m > i {
                // SAFETY: as above, rows i..m
                unsafe { tiles[m - i - 1](self, i, nb0, nb1) };
            }
            nb0 = nb1.next_multiple_of(qt);
        }
    }

    /// Zero points and the tail columns past group g's last full 32-column block, in f32:
    /// `corr[jj] = fma(s, z gsum - t, corr[jj])` for the weight rows j0 + jj of the tile whose
    /// first row is `tile`, activation row `ir` (t: the tail's dot product).
    ///
    /// # Safety
    /// The call's buffers hold the tile, the row and group g.
    #[inline]
    unsafe fn tail_corr(&self, tile: usize, ir: usize, g: usize, j0: usize, corr: &mut [f32]) {
        let (k, gl, ng, qt) = (self.k, self.gl, self.ng, crate::kernels::QTILE);
        let c0 = g * gl;
        let len = gl.min(k - c0);
        let tb = c0 + len / 32 * 32;
        let tl = (len % 32) / 2;
        // SAFETY: the caller's contract
        unsafe {
            let wt = self.w.add(tile * k / 2 + tb * qt / 2);
            let (sbase, zbase) = (self.s.add(tile * ng), self.z.add(tile * ng));
            let gsum = *self.gs.add(ir * ng + g);
            let xt = self.x.add(ir * k + tb);
            for (jj, cj) in corr.iter_mut().enumerate() {
                let j = j0 + jj;
                let mut t = 0f32;
                for u in 0..tl {
                    let byte = *wt.add(j * tl + u);
                    t = f32::mul_add((byte & 15) as f32, *xt.add(2 * u), t);
                    t = f32::mul_add((byte >> 4) as f32, *xt.add(2 * u + 1), t);
                }
                let sg = *sbase.add(g * qt + j);
                let zg = *zbase.add(g * qt + j);
                *cj = f32::mul_add(sg, zg * gsum - t, *cj);
            }
        }
    }

    /// Outputs n.. of activation row `ir` that fall in n0..n1: `sums - corr` plus the
    /// residual.
    ///
    /// # Safety
    /// The call's output (and residual) rows hold row `ir`.
    #[inline]
    unsafe fn store_part(&self, ir: usize, n: usize, sums: &[f32], corr: &[f32]) {
        for (jj, (&sm, &cr)) in sums.iter().zip(corr).enumerate() {
            let nn = n + jj;
            if nn < self.n0 || nn >= self.n1 {
                continue;
            }
            let mut v = sm - cr;
            // SAFETY: the caller's contract
            unsafe {
                if !self.r.is_null() {
                    v += *self.r.add(ir * self.ldr + nn);
                }
                *self.y.add(ir * self.ldy + nn) = v;
            }
        }
    }
}

/// The int8 GEMM and head micro-kernels, one module per instruction set: they differ only in
/// how 32 columns of int8 products are summed into eight i32 lanes (`dot8`, `dot4`), and those
/// sums are exact integers either way, so every variant gives the same bits.
#[cfg(target_arch = "x86_64")]
macro_rules! int8_kernels {
    ($m:ident, $feat:literal, $dot8:ident, $dot4:ident) => {
        // the micro-kernels index several register arrays and pointers by the same row and
        // column numbers; index loops say that more plainly than zipped iterators
        #[allow(clippy::needless_range_loop)]
        pub(super) mod $m {
            use crate::kernels::QTILE;
            use crate::native::{Call, NativeShape, QGemmArgs};
            use std::arch::x86_64::*;
            use wkvc_ir::kernel::args::LogitsArgs;

            /// The int8-activation quantized GEMM (module docs).
            ///
            /// # Safety
            /// `args` is a `QGemmArgs` filled as for the generated `qgemm` kernel (int8 path) of
            /// `shape`; the host has this module's instructions (its `CpuIsa`).
            pub(in crate::native) unsafe fn qgemm_int8(shape: &NativeShape, args: *const u64) {
                // SAFETY: the caller's contract.
                unsafe {
                    let a = &*(args as *const QGemmArgs);
                    run(shape.k, shape.gl, a)
                }
            }

            #[target_feature(enable = $feat)]
            unsafe fn run(k: usize, gl: usize, a: &QGemmArgs) {
                let c = Call::new(k, gl, a);
                // SAFETY: this module's routines on a host with its instructions (the
                // caller's contract) over the call's buffers
                unsafe {
                    c.sweep(
                        a.m as usize,
                        [quads::<1>, quads::<2>, quads::<3>, quads::<4>],
                    )
                }
            }

            /// Micro-tiles of R activation rows over the weight rows nb0..nb1: one row takes whole
            /// tiles (8 weight rows: one sequential read of the tile), several take 4 at a time
            /// (registers). Either way each output is summed the same way (batch invariance).
            #[target_feature(enable = $feat)]
            unsafe fn quads<const R: usize>(c: &Call, i: usize, nb0: usize, nb1: usize) {
                if R == 1 {
                    let mut n = nb0 & !(QTILE - 1);
                    while n < nb1 {
                        // SAFETY: the caller's bounds
                        unsafe { micro::<R, 4, STREAM_AHEAD>(c, i, n) };
                        n += QTILE;
                    }
                } else if i == 0 {
                    // the first rows read the block's weights from memory: they bring in the next
                    // block's as they go
                    let mut n = nb0 & !3;
                    while n < nb1 {
                        // SAFETY: the caller's bounds
                        unsafe { micro::<R, 2, BLOCK_AHEAD>(c, i, n) };
                        n += 4;
                    }
                } else {
                    let mut n = nb0 & !3;
                    while n < nb1 {
                        // SAFETY: the caller's bounds
                        unsafe { micro::<R, 2, 0>(c, i, n) };
                        n += 4;
                    }
                }
            }

            /// How far ahead (bytes) a single activation row prefetches the weight tiles it streams
            /// through: it reads them once, sequentially, and with the hardware prefetcher alone one
            /// core read them at about 7 GB/s, with this at 12-13 (weights larger than the caches,
            /// the demo's and a 1B model's GEMM shapes, Zen 3).
            const STREAM_AHEAD: usize = 12 << 10;

            /// How far ahead (bytes) the first activation rows of a weight block prefetch the tiles:
            /// about a block (`run`), so the next block is in L1 when its rows start.
            const BLOCK_AHEAD: usize = 16 << 10;

            /// Outputs (i..i+R) x (n..n+2P), n a multiple of 2P within a tile; stores those in
            /// n0..n1. With `AHEAD` > 0 each block first prefetches the tile bytes `AHEAD` past it
            /// (the tiles are contiguous, so this runs on into the next tiles).
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn micro<const R: usize, const P: usize, const AHEAD: usize>(
                c: &Call,
                i: usize,
                n: usize,
            ) {
                let (k, gl, ng, nb) = (c.k, c.gl, c.ng, c.nb);
                let kb = k / 2;
                let qt = QTILE;
                let (tile, j0) = (n / qt * qt, n % qt);
                // SAFETY (whole body): the pointers address the call's buffers: tiles of `qt` rows of
                // `kb` bytes (padded), `ng` params per row in tile order, `k` codes / floats and `nb`
                // block scales and `ng` group sums per activation row.
                unsafe {
                    let tbase = c.w.add(tile * kb);
                    let sbase = c.s.add(tile * ng);
                    let zbase = c.z.add(tile * ng);
                    let low4 = _mm256_set1_epi8(0x0f);
                    // lanes 0..4 from element 0, lanes 4..8 from element 1
                    let pairs = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
                    // tot[r][p]: rows j0 + 2p (lanes 0..4) and j0 + 2p + 1 (lanes 4..8)
                    let mut tot = [[_mm256_setzero_ps(); P]; R];
                    let mut corr = [[0f32; 8]; R];
                    let mut blk = 0usize;
                    for g in 0..ng {
                        let c0 = g * gl;
                        let len = gl.min(k - c0);
                        let full = len / 32;
                        let mut acc = [[_mm256_setzero_ps(); P]; R];
                        for b in 0..full {
                            let col = c0 + 32 * b;
                            // the block of 2P rows: 16 bytes each, side by side in the tile
                            let wp = tbase.add(col * qt / 2 + 16 * j0);
                            if AHEAD > 0 {
                                // a prefetch reads nothing and never faults
                                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(AHEAD) as *const i8);
                                if P == 4 {
                                    _mm_prefetch::<_MM_HINT_T0>(
                                        wp.wrapping_add(AHEAD + 64) as *const i8
                                    );
                                }
                            }
                            // even columns (low nibbles) and odd columns (high nibbles) of 2 rows
                            let mut lo = [_mm256_setzero_si256(); P];
                            let mut hi = [_mm256_setzero_si256(); P];
                            for p in 0..P {
                                let w = _mm256_loadu_si256(wp.add(32 * p) as *const __m256i);
                                lo[p] = _mm256_and_si256(w, low4);
                                hi[p] = _mm256_and_si256(_mm256_srli_epi16::<4>(w), low4);
                            }
                            for r in 0..R {
                                let xr = c.xq.add((i + r) * k + col);
                                // the activation block: evens then odds (prep_int8), each half in
                                // both lanes (one per weight row)
                                let xe = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                                    xr as *const __m128i,
                                ));
                                let xo = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                                    xr.add(16) as *const __m128i
                                ));
                                let sx = _mm256_set1_ps(*c.dx.add((i + r) * nb + blk));
                                for p in 0..P {
                                    let d = _mm256_cvtepi32_ps(super::$dot8(lo[p], xe, hi[p], xo));
                                    acc[r][p] = _mm256_fmadd_ps(d, sx, acc[r][p]);
                                }
                            }
                            blk += 1;
                        }
                        // the group's scales of the 2P rows, each over its row's 4 lanes
                        for p in 0..P {
                            let pair = _mm_castpd_ps(_mm_load_sd(
                                sbase.add(g * qt + j0 + 2 * p) as *const f64
                            ));
                            let sp = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(pair), pairs);
                            for r in 0..R {
                                tot[r][p] = _mm256_fmadd_ps(acc[r][p], sp, tot[r][p]);
                            }
                        }
                        // zero points and the tail columns past the last full block, in f32:
                        // corr = fma(s, z gsum - t, corr) per output; without a tail (t = 0) the same
                        // operations over the 2P rows at once (their params are side by side)
                        let tl = (len % 32) / 2;
                        if tl == 0 && 2 * P == 8 {
                            let sv = _mm256_loadu_ps(sbase.add(g * qt + j0));
                            let zv = _mm256_loadu_ps(zbase.add(g * qt + j0));
                            for r in 0..R {
                                let gsum = _mm256_set1_ps(*c.gs.add((i + r) * ng + g));
                                let cv = _mm256_loadu_ps(corr[r].as_ptr());
                                let cv = _mm256_fmadd_ps(sv, _mm256_mul_ps(zv, gsum), cv);
                                _mm256_storeu_ps(corr[r].as_mut_ptr(), cv);
                            }
                        } else if tl == 0 && 2 * P == 4 {
                            let sv = _mm_loadu_ps(sbase.add(g * qt + j0));
                            let zv = _mm_loadu_ps(zbase.add(g * qt + j0));
                            for r in 0..R {
                                let gsum = _mm_set1_ps(*c.gs.add((i + r) * ng + g));
                                let cv = _mm_loadu_ps(corr[r].as_ptr());
                                let cv = _mm_fmadd_ps(sv, _mm_mul_ps(zv, gsum), cv);
                                _mm_storeu_ps(corr[r].as_mut_ptr(), cv);
                            }
                        } else {
                            for r in 0..R {
                                c.tail_corr(tile, i + r, g, j0, &mut corr[r][..2 * P]);
                            }
                        }
                    }
                    // each output: (l0 + l1) + (l2 + l3) of its 4 lanes, minus its corr, plus the
                    // residual; two horizontal adds per pair of rows give those sums in the order
                    // (2p, 2p + 2 | 2p + 1, 2p + 3)
                    let whole = n >= c.n0 && n + 2 * P <= c.n1;
                    for r in 0..R {
                        let ir = i + r;
                        let mut sums = [0f32; 8];
                        // P is 2 or 4 (`quads`): pairs of tot vectors
                        for q in 0..P / 2 {
                            let h = _mm256_hadd_ps(tot[r][2 * q], tot[r][2 * q + 1]);
                            let h = _mm256_hadd_ps(h, h);
                            // elements 0, 1 hold outputs 4q, 4q + 2 and elements 4, 5 hold 4q + 1, 4q + 3
                            let o = _mm256_permutevar8x32_ps(
                                h,
                                _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5),
                            );
                            _mm_storeu_ps(sums.as_mut_ptr().add(4 * q), _mm256_castps256_ps128(o));
                        }
                        if whole {
                            for q in 0..P / 2 {
                                let mut v = _mm_sub_ps(
                                    _mm_loadu_ps(sums.as_ptr().add(4 * q)),
                                    _mm_loadu_ps(corr[r].as_ptr().add(4 * q)),
                                );
                                if !c.r.is_null() {
                                    v = _mm_add_ps(
                                        v,
                                        _mm_loadu_ps(c.r.add(ir * c.ldr + n + 4 * q)),
                                    );
                                }
                                _mm_storeu_ps(c.y.add(ir * c.ldy + n + 4 * q), v);
                            }
                        } else {
                            c.store_part(ir, n, &sums[..2 * P], &corr[r][..2 * P]);
                        }
                    }
                }
            }

            /// The int8 head: `y[i, n] = sum_b ws[n, b] dx[i, b] (wq[n, b] . xq[i, b])` for rows
            /// `0..m` and table rows `n0..n1` (the generated `logits` kernel's int8 algebra).
            ///
            /// # Safety
            /// `args` is a `LogitsArgs` filled as for the generated kernel (int8 path) with
            /// `shape.k` columns (a multiple of 32); the host has this module's instructions.
            pub(in crate::native) unsafe fn logits_int8(shape: &NativeShape, args: *const u64) {
                // SAFETY: the caller's contract.
                unsafe {
                    let a = &*(args as *const LogitsArgs);
                    logits(shape.k, a)
                }
            }

            #[target_feature(enable = $feat)]
            unsafe fn logits(dim: usize, a: &LogitsArgs) {
                let (m, n0, n1) = (a.m as usize, a.n0 as usize, a.n1 as usize);
                let mut n = n0;
                // SAFETY: rows 0..m of the codes and scales, table rows n0..n1 (the caller's bounds)
                unsafe {
                    while n + 2 <= n1 && m > 1 {
                        // the first rows read the table rows from memory and prefetch the next ones
                        let mut i = 4;
                        if m >= 4 {
                            head::<4, 2, STREAM_AHEAD>(dim, a, 0, n);
                        } else {
                            i = 0;
                        }
                        while i + 4 <= m {
                            head::<4, 2, 0>(dim, a, i, n);
                            i += 4;
                        }
                        match m - i {
                            3 => head::<3, 2, 0>(dim, a, i, n),
                            2 => head::<2, 2, 0>(dim, a, i, n),
                            1 => head::<1, 2, 0>(dim, a, i, n),
                            _ => {}
                        }
                        n += 2;
                    }
                    while n < n1 {
                        for i in 0..m {
                            head::<1, 1, STREAM_AHEAD>(dim, a, i, n);
                        }
                        n += 1;
                    }
                }
            }

            /// Outputs (i..i+R) x (n..n+N). With `AHEAD` > 0 the table rows (contiguous) and their
            /// scales are prefetched that many bytes ahead of the codes read.
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn head<const R: usize, const N: usize, const AHEAD: usize>(
                dim: usize,
                a: &LogitsArgs,
                i: usize,
                n: usize,
            ) {
                let nb = dim / 32;
                let (xq, dx) = (a.xq as *const i8, a.dx as *const f32);
                let (wq, ws) = (a.wq as *const i8, a.ws as *const f32);
                // SAFETY (whole body): `dim` codes and `nb` scales per row of the rows and the table.
                unsafe {
                    let mut acc = [[_mm256_setzero_ps(); N]; R];
                    for b in 0..nb {
                        if AHEAD > 0 {
                            // a prefetch reads nothing and never faults; the scales are an eighth of
                            // the codes' bytes
                            for j in 0..N {
                                if b % 2 == 0 {
                                    let p = wq.add((n + j) * dim + 32 * b);
                                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD));
                                }
                                if b % 16 == 0 {
                                    let p = ws.add((n + j) * nb + b) as *const u8;
                                    _mm_prefetch::<_MM_HINT_T0>(
                                        p.wrapping_add(AHEAD / 8) as *const i8
                                    );
                                }
                            }
                        }
                        let mut w = [_mm256_setzero_si256(); N];
                        let mut wa = [_mm256_setzero_si256(); N];
                        let mut sw = [_mm256_setzero_ps(); N];
                        for j in 0..N {
                            w[j] = _mm256_loadu_si256(
                                wq.add((n + j) * dim + 32 * b) as *const __m256i
                            );
                            wa[j] = _mm256_abs_epi8(w[j]);
                            sw[j] = _mm256_set1_ps(*ws.add((n + j) * nb + b));
                        }
                        for r in 0..R {
                            let x = _mm256_loadu_si256(
                                xq.add((i + r) * dim + 32 * b) as *const __m256i
                            );
                            let sx = _mm256_set1_ps(*dx.add((i + r) * nb + b));
                            for j in 0..N {
                                // |w| x (x with w's sign): the int8 x int8 products, exact in i16 pairs
                                let d = _mm256_cvtepi32_ps(super::$dot4(
                                    wa[j],
                                    _mm256_sign_epi8(x, w[j]),
                                ));
                                let sc = _mm256_mul_ps(sw[j], sx);
                                acc[r][j] = _mm256_fmadd_ps(d, sc, acc[r][j]);
                            }
                        }
                    }
                    for r in 0..R {
                        for j in 0..N {
                            let mut l = [0f32; 8];
                            _mm256_storeu_ps(l.as_mut_ptr(), acc[r][j]);
                            let v =
                                ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
                            *(a.y as *mut f32).add((i + r) * a.ldy as usize + n + j) = v;
                        }
                    }
                }
            }
        }
    };
}

/// Most (scale, zero) groups a head the native attention takes (a head of 512 channels in
/// groups of 32).
const MAX_KV_GROUPS: usize = 16;

/// A KV group's (scale, zero) from its cache word (`wkvc_ir::kvcache::pack_params`: two f16,
/// the scale in the low half), as the generated kernels convert it: the magnitude's bits
/// shifted into an f32 and scaled by 2^112 (subnormals included), then the sign. Exact for
/// every finite f16 (an infinite scale would read as 65536, as in the generated kernels).
#[inline]
pub(crate) fn cache_word_params(w: u32) -> (f32, f32) {
    let f = |h: u32| {
        let m = f32::from_bits((h & 0x7fff) << 13) * f32::from_bits(0x7780_0000);
        f32::from_bits(m.to_bits() | ((h & 0x8000) << 16))
    };
    (f(w & 0xffff), f(w >> 16))
}

// The micro-kernels index several register arrays and pointers by the same row and column
// numbers; index loops say that more plainly than zipped iterators.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::NativeShape;
    use std::arch::x86_64::*;
    use wkvc_ir::kernel::args::AttentionArgs;

    /// Eight i32 lanes, lane j the sum of the products of bytes 4j..4j+4 of `lo` (codes 0..15)
    /// and `xe` plus those of `hi` and `xo` (int8): `vpmaddubsw` (pairs in i16, at most
    /// 2 x 15 x 127), their sum (at most 4 x 15 x 127), `vpmaddwd` by ones.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn dot8_madd(lo: __m256i, xe: __m256i, hi: __m256i, xo: __m256i) -> __m256i {
        let pq = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
        _mm256_madd_epi16(pq, _mm256_set1_epi16(1))
    }

    /// Eight i32 lanes, lane j the sum of the products of bytes 4j..4j+4 of `a` (unsigned:
    /// |w| of int8 table codes, at most 128) and `b` (int8 activation codes within +-127 with
    /// w's sign): `vpmaddubsw` (pairs in i16, at most 2 x 128 x 127), `vpmaddwd` by ones.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn dot4_madd(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }

    /// `dot8_madd` by two `vpdpbusd` (AVX-VNNI, VEX): the same integers.
    #[target_feature(enable = "avx2,avxvnni")]
    #[inline]
    unsafe fn dot8_vex(lo: __m256i, xe: __m256i, hi: __m256i, xo: __m256i) -> __m256i {
        let d = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, xe);
        _mm256_dpbusd_avx_epi32(d, hi, xo)
    }

    /// `dot4_madd` by one `vpdpbusd` (AVX-VNNI, VEX): the same integers.
    #[target_feature(enable = "avx2,avxvnni")]
    #[inline]
    unsafe fn dot4_vex(a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b)
    }

    /// `dot8_madd` by two 256-bit `vpdpbusd` (AVX512-VNNI + VL, EVEX): the same integers.
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    #[inline]
    unsafe fn dot8_evex(lo: __m256i, xe: __m256i, hi: __m256i, xo: __m256i) -> __m256i {
        let d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xe);
        _mm256_dpbusd_epi32(d, hi, xo)
    }

    /// `dot4_madd` by one 256-bit `vpdpbusd` (AVX512-VNNI + VL, EVEX): the same integers.
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    #[inline]
    unsafe fn dot4_evex(a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
    }

    int8_kernels!(madd, "avx2,fma", dot8_madd, dot4_madd);
    int8_kernels!(vex, "avx2,fma,avxvnni", dot8_vex, dot4_vex);
    int8_kernels!(evex, "avx2,fma,avx512vnni,avx512vl", dot8_evex, dot4_evex);

    /// `prep_int8_block` on AVX2: amax (exact in any order), d = amax / 127, the codes
    /// rne(x / d) by the default rounding (nearest even) of `vcvtps2dq`, clamped to +-127.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn prep_block(x: &[f32], xq: &mut [i8]) -> Option<(f32, i32)> {
        // SAFETY: x and xq hold 32 elements (the caller checks)
        unsafe {
            let p = x.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let sign = _mm256_set1_ps(-0.0);
            let mut m = _mm256_setzero_ps();
            for vv in v {
                // max(m, |x|): a NaN lane keeps m, as f32::max does
                m = _mm256_max_ps(_mm256_andnot_ps(sign, vv), m);
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2));
            let amax = _mm_cvtss_f32(m1);
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let iv = _mm256_set1_ps(inv);
            let lim = _mm256_set1_ps(127.5);
            let mut bad = _mm256_setzero_ps();
            let mut q = [_mm256_setzero_si256(); 4];
            for t in 0..4 {
                let s = _mm256_mul_ps(v[t], iv);
                bad = _mm256_or_ps(
                    bad,
                    _mm256_cmp_ps::<_CMP_NLE_UQ>(_mm256_andnot_ps(sign, s), lim),
                );
                let c = _mm256_cvtps_epi32(s);
                q[t] = _mm256_max_epi32(
                    _mm256_min_epi32(c, _mm256_set1_epi32(127)),
                    _mm256_set1_epi32(-127),
                );
            }
            if _mm256_movemask_ps(bad) != 0 {
                return None;
            }
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s4 = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256::<1>(sum),
            );
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let qs = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2)));
            // i32 -> i16 -> i8 (values within +-127: no saturation), back in column order,
            // then each 16-column half's evens before its odds, then evens of both halves
            // before odds of both
            let w = _mm256_packs_epi32(q[0], q[1]);
            let z = _mm256_packs_epi32(q[2], q[3]);
            let b = _mm256_packs_epi16(w, z);
            let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            let eo = _mm256_setr_epi8(
                0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1,
                3, 5, 7, 9, 11, 13, 15,
            );
            let b = _mm256_shuffle_epi8(b, eo);
            let b = _mm256_permute4x64_epi64::<0b11_01_10_00>(b);
            _mm256_storeu_si256(xq.as_mut_ptr() as *mut __m256i, b);
            Some((d, qs))
        }
    }
    /// exp of 8 lanes, x <= 0 (scores minus their maximum): Cephes' expf polynomial after
    /// reducing by ln 2 (within 2 ulp); below -87.3 the result is 2^-126 x exp(r), which is
    /// below the scale of any softmax term that matters.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }

    /// The lane sums of 8 vectors, in one vector (lane t: vector t's 8 lanes summed as
    /// ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7))).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn sum8x8(a: &[__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        // lanes 0..4: vectors 0..4's lanes 0..4 summed; lanes 4..8: their lanes 4..8
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u0, u1),
            _mm256_permute2f128_ps::<0x31>(u0, u1),
        )
    }

    /// 8 lanes summed in a fixed order.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 16 bytes of 4-bit codes (low nibble first) as 4 x 8 f32: the 16 low nibbles (even
    /// channels), then the 16 high ones (odd channels).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn codes32(p: *const u8) -> [__m256; 4] {
        // SAFETY: 16 readable bytes at p (the caller's)
        let b = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let m = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(b, m);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), m);
        let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
        [
            f(lo),
            f(_mm_srli_si128::<8>(lo)),
            f(hi),
            f(_mm_srli_si128::<8>(hi)),
        ]
    }

    thread_local! {
        /// Per-thread scores and accumulators of the attention kernel (grown as contexts do).
        static ATTN: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// Attention: one query row and kv head `g` over `nq` packed past tokens and the FP rows
    /// `f0..f1` (the generated `attention` kernel's algebra, in two passes).
    ///
    /// # Safety
    /// `args` is an `AttentionArgs` filled as for the generated kernel of `shape`; the host
    /// has AVX2 and FMA.
    pub(super) unsafe fn attention(shape: &NativeShape, args: *const u64) {
        // SAFETY: the caller's contract.
        unsafe {
            let a = &*(args as *const AttentionArgs);
            ATTN.with(|buf| attn(shape, a, &mut buf.borrow_mut()))
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn attn(sh: &NativeShape, a: &AttentionArgs, buf: &mut Vec<f32>) {
        let (group, kvh, hd) = (sh.group, sh.kv_heads, sh.head_dim);
        let g = a.g as usize;
        let rb = (kvh * hd).div_ceil(2);
        let scale = 1.0 / (hd as f32).sqrt();
        let nq = if sh.packed { a.nq as usize } else { 0 };
        let (f0, f1) = (a.f0 as usize, (a.f1 as usize).max(a.f0 as usize));
        let n = nq + (f1 - f0);
        let np = n.next_multiple_of(8);
        // (scale, zero) groups a head: one, or hd / gl groups of gl channels
        let gl = if sh.gl == 0 { hd } else { sh.gl };
        let ngh = hd / gl;
        let bpg = gl / 32;
        // scores [group][np], q' [group][hd] (per 32 channels: evens then odds), packed V
        // sums [group][hd] (the same order), FP V sums [group][hd]
        // and per head: Q1 and A per (scale, zero) group, Q2, the softmax sum, P (A and P:
        // the packed V's zero-point terms), a score's partial dot products; then the packed
        // past's V scales [np][ngh] (converted from their words once)
        let need = group * (np + 3 * hd + 2 * ngh + 4) + np * ngh;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let (sc, rest) = buf.split_at_mut(group * np);
        let (qp, rest) = rest.split_at_mut(group * hd);
        let (accq, rest) = rest.split_at_mut(group * hd);
        let (accf, rest) = rest.split_at_mut(group * hd);
        let (q1s, rest) = rest.split_at_mut(group * ngh);
        let (q2s, rest) = rest.split_at_mut(group);
        let (ls, rest) = rest.split_at_mut(group);
        let (av, rest) = rest.split_at_mut(group * ngh);
        let (pv, rest) = rest.split_at_mut(group);
        let (dots, rest) = rest.split_at_mut(group);
        let vss = &mut rest[..np * ngh];
        for v in [
            &mut *accq, &mut *accf, &mut *q1s, &mut *q2s, &mut *av, &mut *pv, &mut *dots,
        ] {
            v.fill(0.0);
        }
        let out = a.out as *mut f32;
        if n == 0 {
            for h in 0..group {
                for c in 0..hd {
                    // SAFETY: the row's output of this kv head's query heads
                    unsafe { *out.add((g * group + h) * hd + c) = 0.0 };
                }
            }
            return;
        }
        // SAFETY (whole body): the pointers address the call's query row (heads x hd), the
        // caches' rows 0..nq of this layer, the FP rows f0..f1 with stride ldf, the smoothing
        // vectors (kv heads x hd) and the output row, as the generated kernel reads them.
        unsafe {
            let q = (a.q as *const f32).add(g * group * hd);
            let goff = g * hd;
            // the smoothed, permuted query and its sums serve the packed past's scores only
            for h in 0..group * usize::from(nq > 0) {
                let qh = q.add(h * hd);
                for c in 0..hd {
                    let qv = *qh.add(c);
                    let qs = if sh.smooth {
                        q2s[h] += qv * *(a.ksh as *const f32).add(goff + c);
                        qv * *(a.ksc as *const f32).add(goff + c)
                    } else {
                        qv
                    };
                    q1s[h * ngh + c / gl] += qs;
                    let (blk, w) = (c / 32, c % 32);
                    let t = if w % 2 == 0 { w / 2 } else { 16 + w / 2 };
                    qp[h * hd + 32 * blk + t] = qs;
                }
            }
            let nblk = hd / 32;
            // the (scale, zero) word of token j's group t of this kv head
            let word = |p: u64, j: usize, t: usize| {
                super::cache_word_params(*(p as *const u32).add((j * kvh + g) * ngh + t))
            };
            // scores of the packed past: k_scale (q'.codes - k_zero Q1) + Q2 with one (scale,
            // zero) a head; with groups, each block's codes scaled by its group's k_scale so
            // that one reduction a head covers every group, minus the sum over the groups of
            // k_scale k_zero Q1
            let mut ksz = [(0f32, 0f32); super::MAX_KV_GROUPS];
            for j in 0..nq {
                let kr = (a.kc as *const u8).add(j * rb + g * hd / 2);
                for (t, p) in ksz.iter_mut().enumerate().take(ngh) {
                    *p = word(a.kp, j, t);
                }
                // the token's codes, unpacked once for every head (up to 128 channels in
                // registers; wider heads in chunks of 128)
                for b0 in (0..nblk).step_by(4) {
                    let bn = (nblk - b0).min(4);
                    let mut cqs = [[_mm256_setzero_ps(); 4]; 4];
                    for (bb, cq) in cqs.iter_mut().enumerate().take(bn) {
                        *cq = codes32(kr.add(16 * (b0 + bb)));
                        if ngh > 1 {
                            let ks = _mm256_set1_ps(ksz[(b0 + bb) / bpg].0);
                            for c in cq.iter_mut() {
                                *c = _mm256_mul_ps(*c, ks);
                            }
                        }
                    }
                    for h in 0..group {
                        let mut d0 = _mm256_setzero_ps();
                        let mut d1 = _mm256_setzero_ps();
                        for (bb, cq) in cqs.iter().enumerate().take(bn) {
                            let qb = qp.as_ptr().add(h * hd + 32 * (b0 + bb));
                            d0 = _mm256_fmadd_ps(cq[0], _mm256_loadu_ps(qb), d0);
                            d1 = _mm256_fmadd_ps(cq[1], _mm256_loadu_ps(qb.add(8)), d1);
                            d0 = _mm256_fmadd_ps(cq[2], _mm256_loadu_ps(qb.add(16)), d0);
                            d1 = _mm256_fmadd_ps(cq[3], _mm256_loadu_ps(qb.add(24)), d1);
                        }
                        dots[h] += hsum8(_mm256_add_ps(d0, d1));
                    }
                }
                for h in 0..group {
                    sc[h * np + j] = if ngh == 1 {
                        let (ks, kz) = ksz[0];
                        (ks * (dots[h] - kz * q1s[h]) + q2s[h]) * scale
                    } else {
                        let mut zt = 0f32;
                        for (t, &(ks, kz)) in ksz.iter().enumerate().take(ngh) {
                            zt = f32::mul_add(ks * kz, q1s[h * ngh + t], zt);
                        }
                        (dots[h] - zt + q2s[h]) * scale
                    };
                    dots[h] = 0.0;
                }
            }
            // scores of the FP rows, 8 tokens at a time: one accumulator per token over the
            // head's channels (the query's 8 channels loaded once for the 8 tokens), then one
            // reduction tree for the 8 (a missing token's accumulator is zero, so a token's
            // score is summed the same way wherever it falls in a group)
            let ldf = a.ldf as usize;
            let kf = a.kf as *const f32;
            let sc8 = _mm256_set1_ps(scale);
            for h in 0..group {
                let qh = q.add(h * hd);
                let mut j0 = f0;
                while j0 < f1 {
                    let jn = (f1 - j0).min(8);
                    let mut acc = [_mm256_setzero_ps(); 8];
                    let kb = kf.add(j0 * ldf + goff);
                    if jn == 8 {
                        // all 8 tokens: no per-token test in the loop
                        for c in (0..hd).step_by(8) {
                            let qv = _mm256_loadu_ps(qh.add(c));
                            for (t, at) in acc.iter_mut().enumerate() {
                                let kr = kb.add(t * ldf + c);
                                *at = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr), *at);
                            }
                        }
                    } else {
                        for c in (0..hd).step_by(8) {
                            let qv = _mm256_loadu_ps(qh.add(c));
                            for (t, at) in acc.iter_mut().enumerate().take(jn) {
                                let kr = kb.add(t * ldf + c);
                                *at = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr), *at);
                            }
                        }
                    }
                    let v = _mm256_mul_ps(sum8x8(&acc), sc8);
                    let dst = sc.as_mut_ptr().add(h * np + nq + j0 - f0);
                    if jn == 8 {
                        _mm256_storeu_ps(dst, v);
                    } else {
                        let mut l = [0f32; 8];
                        _mm256_storeu_ps(l.as_mut_ptr(), v);
                        std::ptr::copy_nonoverlapping(l.as_ptr(), dst, jn);
                    }
                    j0 += 8;
                }
            }
            // softmax numerators and their sums
            for h in 0..group {
                let s = &mut sc[h * np..][..np];
                s[n..].fill(f32::NEG_INFINITY);
                let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
                for c in s.chunks_exact(8) {
                    mv = _mm256_max_ps(mv, _mm256_loadu_ps(c.as_ptr()));
                }
                let mut l8 = [0f32; 8];
                _mm256_storeu_ps(l8.as_mut_ptr(), mv);
                let m = l8.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mm = _mm256_set1_ps(m);
                let mut lsum = _mm256_setzero_ps();
                for c in s.chunks_exact_mut(8) {
                    let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mm));
                    // the padding lanes: exp(-inf) is not defined by the polynomial
                    _mm256_storeu_ps(c.as_mut_ptr(), e);
                }
                for x in &mut s[n..] {
                    *x = 0.0;
                }
                for c in s.chunks_exact(8) {
                    lsum = _mm256_add_ps(lsum, _mm256_loadu_ps(c.as_ptr()));
                }
                ls[h] = hsum8(lsum);
            }
            // V of the packed past: per 32 channels, every head at once
            if nq > 0 {
                for j in 0..nq {
                    for t in 0..ngh {
                        let (vs, vz) = word(a.vp, j, t);
                        vss[j * ngh + t] = vs;
                        for h in 0..group {
                            let psv = sc[h * np + j] * vs;
                            av[h * ngh + t] = f32::mul_add(psv, vz, av[h * ngh + t]);
                        }
                    }
                    for h in 0..group {
                        pv[h] += sc[h * np + j];
                    }
                }
                for blk in 0..nblk {
                    for h0 in (0..group).step_by(3) {
                        let hn = (group - h0).min(3);
                        let mut acc = [[_mm256_setzero_ps(); 4]; 3];
                        for j in 0..nq {
                            let vr = (a.vc as *const u8).add(j * rb + g * hd / 2 + 16 * blk);
                            let cv = codes32(vr);
                            let vs = vss[j * ngh + blk / bpg];
                            for hh in 0..hn {
                                let psv = _mm256_set1_ps(sc[(h0 + hh) * np + j] * vs);
                                for t in 0..4 {
                                    acc[hh][t] = _mm256_fmadd_ps(cv[t], psv, acc[hh][t]);
                                }
                            }
                        }
                        for hh in 0..hn {
                            for t in 0..4 {
                                _mm256_storeu_ps(
                                    accq.as_mut_ptr().add((h0 + hh) * hd + 32 * blk + 8 * t),
                                    acc[hh][t],
                                );
                            }
                        }
                    }
                }
            }
            // V of the FP rows
            let vf = a.vf as *const f32;
            for c0 in (0..hd).step_by(32) {
                for h0 in (0..group).step_by(3) {
                    let hn = (group - h0).min(3);
                    let mut acc = [[_mm256_setzero_ps(); 4]; 3];
                    for j in f0..f1 {
                        let vr = vf.add(j * ldf + goff + c0);
                        for hh in 0..hn {
                            let p = _mm256_set1_ps(sc[(h0 + hh) * np + nq + j - f0]);
                            // V read as the multiply-adds' memory operand (L1) by each head:
                            // 12 accumulators and the weight stay in registers
                            for t in 0..4 {
                                let v = _mm256_loadu_ps(vr.add(8 * t));
                                acc[hh][t] = _mm256_fmadd_ps(v, p, acc[hh][t]);
                            }
                        }
                    }
                    for hh in 0..hn {
                        for t in 0..4 {
                            _mm256_storeu_ps(
                                accf.as_mut_ptr().add((h0 + hh) * hd + c0 + 8 * t),
                                acc[hh][t],
                            );
                        }
                    }
                }
            }
            // out = (v_scale (acc_q - A) + v_shift P + acc_f) / l
            if nq == 0 {
                // no packed past: acc_q, A and P are zero; the same operations on 8 channels
                let zero = _mm256_setzero_ps();
                for h in 0..group {
                    let inv = _mm256_set1_ps(1.0 / ls[h]);
                    let ob = out.add((g * group + h) * hd);
                    for c in (0..hd).step_by(8) {
                        let mut v = zero;
                        if sh.packed {
                            let d = _mm256_sub_ps(zero, zero);
                            v = if sh.smooth {
                                _mm256_fmadd_ps(
                                    _mm256_loadu_ps((a.vsh as *const f32).add(goff + c)),
                                    zero,
                                    _mm256_mul_ps(
                                        d,
                                        _mm256_loadu_ps((a.vsc as *const f32).add(goff + c)),
                                    ),
                                )
                            } else {
                                d
                            };
                        }
                        let f = _mm256_loadu_ps(accf.as_ptr().add(h * hd + c));
                        _mm256_storeu_ps(ob.add(c), _mm256_mul_ps(_mm256_add_ps(v, f), inv));
                    }
                }
                return;
            }
            for h in 0..group {
                let inv = 1.0 / ls[h];
                let ob = out.add((g * group + h) * hd);
                for c in 0..hd {
                    let (blk, w) = (c / 32, c % 32);
                    let t = if w % 2 == 0 { w / 2 } else { 16 + w / 2 };
                    let mut v = 0f32;
                    if sh.packed {
                        let d = accq[h * hd + 32 * blk + t] - av[h * ngh + c / gl];
                        v = if sh.smooth {
                            f32::mul_add(
                                *(a.vsh as *const f32).add(goff + c),
                                pv[h],
                                d * *(a.vsc as *const f32).add(goff + c),
                            )
                        } else {
                            d
                        };
                    }
                    *ob.add(c) = (v + accf[h * hd + c]) * inv;
                }
            }
        }
    }
}

/// The int8-activation quantized GEMM with 512-bit vectors (AVX512-F/BW/VL + VNNI): one
/// micro-tile is up to 4 activation rows x a whole 8-row weight tile, 4 weight rows to a
/// register, the int8 products summed by `vpdpbusd`. Each output's lanes get the operations
/// of the 256-bit kernels in the same order (a register holds what two of theirs hold), so
/// the results are the same bits as `avx2` and `avx2-vnni`.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::kernels::QTILE;
    use crate::native::{Call, NativeFn, NativeShape, QGemmArgs};
    use std::arch::x86_64::*;
    use wkvc_ir::kernel::args::LogitsArgs;

    const _: () = assert!(
        QTILE == 8,
        "the 512-bit micro-tile is one 8-row weight tile"
    );

    /// As `avx2::madd::qgemm_int8`.
    ///
    /// # Safety
    /// `args` is a `QGemmArgs` filled as for the generated `qgemm` kernel (int8 path) of
    /// `shape`; the host has the instructions of `CpuIsa::Avx512`.
    pub(super) unsafe fn qgemm_int8(shape: &NativeShape, args: *const u64) {
        // SAFETY: the caller's contract.
        unsafe {
            let a = &*(args as *const QGemmArgs);
            run(shape.k, shape.gl, a)
        }
    }

    /// How far ahead (bytes) the tiles are prefetched: by one activation row streaming
    /// through them, and by the first rows of a weight block (about a block).
    const STREAM_AHEAD: usize = 12 << 10;
    const BLOCK_AHEAD: usize = 16 << 10;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    unsafe fn run(k: usize, gl: usize, a: &QGemmArgs) {
        let c = Call::new(k, gl, a);
        // SAFETY: this module's routines on a host with its instructions (the caller's
        // contract) over the call's buffers
        unsafe {
            c.sweep(
                a.m as usize,
                [tiles::<1>, tiles::<2>, tiles::<3>, tiles::<4>],
            )
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    unsafe fn tiles<const R: usize>(c: &Call, i: usize, nb0: usize, nb1: usize) {
        let mut n = nb0 & !(QTILE - 1);
        while n < nb1 {
            // SAFETY: the caller's bounds
            unsafe {
                if R == 1 {
                    micro::<R, STREAM_AHEAD>(c, i, n)
                } else if i == 0 {
                    micro::<R, BLOCK_AHEAD>(c, i, n)
                } else {
                    micro::<R, 0>(c, i, n)
                }
            }
            n += QTILE;
        }
    }

    /// Outputs (i..i+R) x (n..n+8), n a tile's first row; stores those in n0..n1.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    #[inline]
    unsafe fn micro<const R: usize, const AHEAD: usize>(c: &Call, i: usize, n: usize) {
        let (k, gl, ng, nb) = (c.k, c.gl, c.ng, c.nb);
        let qt = QTILE;
        // SAFETY (whole body): as `avx2::madd::micro`: tiles of `qt` rows of `k / 2` bytes
        // (padded), `ng` params per row in tile order, `k` codes / floats, `nb` block scales
        // and `ng` group sums per activation row.
        unsafe {
            let tbase = c.w.add(n * k / 2);
            let sbase = c.s.add(n * ng);
            let zbase = c.z.add(n * ng);
            let low4 = _mm512_set1_epi8(0x0f);
            let zero = _mm512_setzero_si512();
            // lanes 4t..4t+4 from element t (a row's scale over its 4 lanes)
            let quads = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
            // tot[r][q]: rows 4q..4q+4 of the tile, 4 lanes each
            let mut tot = [[_mm512_setzero_ps(); 2]; R];
            let mut corr = [[0f32; 8]; R];
            let mut blk = 0usize;
            for g in 0..ng {
                let c0 = g * gl;
                let len = gl.min(k - c0);
                let full = len / 32;
                let mut acc = [[_mm512_setzero_ps(); 2]; R];
                for b in 0..full {
                    let col = c0 + 32 * b;
                    // the block of the 8 rows: 16 bytes each, side by side
                    let wp = tbase.add(col * qt / 2);
                    if AHEAD > 0 {
                        // a prefetch reads nothing and never faults
                        _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(AHEAD) as *const i8);
                        _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(AHEAD + 64) as *const i8);
                    }
                    let mut lo = [zero; 2];
                    let mut hi = [zero; 2];
                    for q in 0..2 {
                        let w = _mm512_loadu_si512(wp.add(64 * q) as *const __m512i);
                        lo[q] = _mm512_and_si512(w, low4);
                        hi[q] = _mm512_and_si512(_mm512_srli_epi16::<4>(w), low4);
                    }
                    for r in 0..R {
                        let xr = c.xq.add((i + r) * k + col);
                        // evens then odds (prep_int8), each in all four 128-bit lanes
                        let xe = _mm512_broadcast_i32x4(_mm_loadu_si128(xr as *const __m128i));
                        let xo =
                            _mm512_broadcast_i32x4(_mm_loadu_si128(xr.add(16) as *const __m128i));
                        let sx = _mm512_set1_ps(*c.dx.add((i + r) * nb + blk));
                        for q in 0..2 {
                            let d = _mm512_dpbusd_epi32(zero, lo[q], xe);
                            let d = _mm512_dpbusd_epi32(d, hi[q], xo);
                            acc[r][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sx, acc[r][q]);
                        }
                    }
                    blk += 1;
                }
                // the group's scales of the 8 rows, each over its row's 4 lanes
                for q in 0..2 {
                    let s4 = _mm_loadu_ps(sbase.add(g * qt + 4 * q));
                    let sp = _mm512_permutexvar_ps(quads, _mm512_castps128_ps512(s4));
                    for r in 0..R {
                        tot[r][q] = _mm512_fmadd_ps(acc[r][q], sp, tot[r][q]);
                    }
                }
                // zero points and the tail columns past the last full block, in f32 (as
                // the 256-bit kernels: corr = fma(s, z gsum - t, corr) per output)
                let tl = (len % 32) / 2;
                if tl == 0 {
                    let sv = _mm256_loadu_ps(sbase.add(g * qt));
                    let zv = _mm256_loadu_ps(zbase.add(g * qt));
                    for r in 0..R {
                        let gsum = _mm256_set1_ps(*c.gs.add((i + r) * ng + g));
                        let cv = _mm256_loadu_ps(corr[r].as_ptr());
                        let cv = _mm256_fmadd_ps(sv, _mm256_mul_ps(zv, gsum), cv);
                        _mm256_storeu_ps(corr[r].as_mut_ptr(), cv);
                    }
                } else {
                    for r in 0..R {
                        c.tail_corr(n, i + r, g, 0, &mut corr[r]);
                    }
                }
            }
            // each output: (l0 + l1) + (l2 + l3) of its 4 lanes, minus its corr, plus the
            // residual
            let whole = n >= c.n0 && n + qt <= c.n1;
            for r in 0..R {
                let ir = i + r;
                let mut sums = [0f32; 8];
                for q in 0..2 {
                    let mut l = [0f32; 16];
                    _mm512_storeu_ps(l.as_mut_ptr(), tot[r][q]);
                    for t in 0..4 {
                        sums[4 * q + t] = (l[4 * t] + l[4 * t + 1]) + (l[4 * t + 2] + l[4 * t + 3]);
                    }
                }
                if whole {
                    let mut v = _mm256_sub_ps(
                        _mm256_loadu_ps(sums.as_ptr()),
                        _mm256_loadu_ps(corr[r].as_ptr()),
                    );
                    if !c.r.is_null() {
                        v = _mm256_add_ps(v, _mm256_loadu_ps(c.r.add(ir * c.ldr + n)));
                    }
                    _mm256_storeu_ps(c.y.add(ir * c.ldy + n), v);
                } else {
                    c.store_part(ir, n, &sums, &corr[r]);
                }
            }
        }
    }

    /// The int8 head with 512-bit vectors for batches (several rows): 4 table rows at a time,
    /// two to a register, x up to 4 activation rows; each lane gets the operations of the
    /// 256-bit kernel in the same order (`vpsignb`, which has no 512-bit form, becomes a
    /// masked negation: the same codes), so the same bits. One row, and the table rows past
    /// the last 4, go to `rest` (the 256-bit VNNI head).
    ///
    /// # Safety
    /// As `avx2::vex::logits_int8`; the host has the instructions of `CpuIsa::Avx512` and
    /// those `rest` needs.
    pub(super) unsafe fn logits_int8(shape: &NativeShape, args: *const u64, rest: NativeFn) {
        // SAFETY: the caller's contract.
        unsafe {
            let a = &*(args as *const LogitsArgs);
            let n = logits(shape.k, a);
            if n < a.n1 as usize {
                let tail = LogitsArgs { n0: n as u64, ..*a };
                rest(shape, &tail as *const LogitsArgs as *const u64);
            }
        }
    }

    /// The table rows from `n0` in fours for rows 0..m (m > 1); returns where it stopped.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    unsafe fn logits(dim: usize, a: &LogitsArgs) -> usize {
        let (m, n0, n1) = (a.m as usize, a.n0 as usize, a.n1 as usize);
        let mut n = n0;
        if m < 2 {
            return n;
        }
        // SAFETY: rows 0..m of the codes and scales, table rows n..n+4 < n1
        unsafe {
            while n + 4 <= n1 {
                // the first rows read the table rows from memory and prefetch the next ones
                let mut i = 4;
                if m >= 4 {
                    head::<4, HEAD_AHEAD>(dim, a, 0, n);
                } else {
                    i = 0;
                }
                while i + 4 <= m {
                    head::<4, 0>(dim, a, i, n);
                    i += 4;
                }
                match m - i {
                    3 => head::<3, 0>(dim, a, i, n),
                    2 => head::<2, 0>(dim, a, i, n),
                    1 => head::<1, 0>(dim, a, i, n),
                    _ => {}
                }
                n += 4;
            }
        }
        n
    }

    /// How far ahead (bytes) the first rows prefetch the table rows (as the 256-bit head).
    const HEAD_AHEAD: usize = 12 << 10;

    /// Outputs (i..i+R) x (n..n+4).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    #[inline]
    unsafe fn head<const R: usize, const AHEAD: usize>(
        dim: usize,
        a: &LogitsArgs,
        i: usize,
        n: usize,
    ) {
        let nb = dim / 32;
        let (xq, dx) = (a.xq as *const i8, a.dx as *const f32);
        let (wq, ws) = (a.wq as *const i8, a.ws as *const f32);
        // SAFETY (whole body): `dim` codes and `nb` scales per row of the rows and the table.
        unsafe {
            let zero = _mm512_setzero_si512();
            // acc[r][q]: table rows n + 2q (lanes 0..8) and n + 2q + 1 (lanes 8..16)
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for b in 0..nb {
                if AHEAD > 0 {
                    // a prefetch reads nothing and never faults; the scales are an eighth of
                    // the codes' bytes
                    for j in 0..4 {
                        if b % 2 == 0 {
                            let p = wq.add((n + j) * dim + 32 * b);
                            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD));
                        }
                        if b % 16 == 0 {
                            let p = ws.add((n + j) * nb + b) as *const u8;
                            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD / 8) as *const i8);
                        }
                    }
                }
                let mut wa = [zero; 2];
                let mut neg = [0 as __mmask64; 2];
                let mut sw = [_mm512_setzero_ps(); 2];
                for q in 0..2 {
                    let (r0, r1) = (n + 2 * q, n + 2 * q + 1);
                    let w0 = _mm256_loadu_si256(wq.add(r0 * dim + 32 * b) as *const __m256i);
                    let w1 = _mm256_loadu_si256(wq.add(r1 * dim + 32 * b) as *const __m256i);
                    let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(w0), w1);
                    wa[q] = _mm512_abs_epi8(w);
                    neg[q] = _mm512_movepi8_mask(w);
                    sw[q] = _mm512_mask_mov_ps(
                        _mm512_set1_ps(*ws.add(r0 * nb + b)),
                        0xff00,
                        _mm512_set1_ps(*ws.add(r1 * nb + b)),
                    );
                }
                for r in 0..R {
                    let x = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                        xq.add((i + r) * dim + 32 * b) as *const __m256i,
                    ));
                    let sx = _mm512_set1_ps(*dx.add((i + r) * nb + b));
                    for q in 0..2 {
                        // x with w's sign (where w = 0, |w| = 0 makes the product 0 as
                        // vpsignb's zero does)
                        let xs = _mm512_mask_sub_epi8(x, neg[q], zero, x);
                        let d = _mm512_dpbusd_epi32(zero, wa[q], xs);
                        let sc = _mm512_mul_ps(sw[q], sx);
                        acc[r][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc[r][q]);
                    }
                }
            }
            for r in 0..R {
                for q in 0..2 {
                    let mut l = [0f32; 16];
                    _mm512_storeu_ps(l.as_mut_ptr(), acc[r][q]);
                    for h in 0..2 {
                        let l = &l[8 * h..];
                        let v = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
                        *(a.y as *mut f32).add((i + r) * a.ldy as usize + n + 2 * q + h) = v;
                    }
                }
            }
        }
    }
}
