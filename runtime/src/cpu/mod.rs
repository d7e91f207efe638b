//! The compiled CPU engine: the lowered plan's kernels JIT-compiled by Cranelift
//! (`wkvc_codegen::kernels`), each distinct kernel once; the weights bound per step
//! (`weights`); a private thread pool and one workspace (activation arena and scratch) that
//! calls take turns on; sessions own their KV caches (`CpuKv`). `launch` runs a batch.

mod launch;
mod pool;
mod weights;

use crate::RuntimeError;
use crate::engine::EngineOptions;
use pool::Pool;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;
use weights::{Ptr, Weights};
use wkvc_codegen::cpu::CpuJit;
use wkvc_codegen::native::{self, CpuIsa, CpuKernel};
use wkvc_ir::{Act, KernelSpec, KvCache, KvLayer};
use wkvc_passes::lower::{CHUNK, LoweredPlan, MemoryPlan, StepOperand};

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Invalid(msg.into())
}

/// An operand bound to memory.
#[derive(Clone, Copy, Debug)]
enum Bound {
    /// an arena buffer (byte offset)
    Buf(usize),
    /// the round's token ids / positions
    Tokens,
    Positions,
    Param(Ptr),
}

/// A step of the plan with its kernel and bound operands.
struct CpuStep {
    spec: KernelSpec,
    f: CpuKernel,
    operands: Vec<Bound>,
    /// arena byte offset of the output
    out: usize,
    /// `rope_kv`: its set of cos/sin tables
    rope: usize,
    /// int8 head: the quantized table and its block scales
    head: Option<(Ptr, Ptr)>,
    /// embedding from a table nothing else reads: its rows' pages are released after use
    release: Option<wkvc_ir::Weight>,
    /// `attention`: its recent window (1: the row's own K/V only in full precision)
    window: usize,
}

/// The JIT module that holds the kernels' code.
struct Code(#[allow(dead_code)] CpuJit);
// SAFETY: after `CpuEngine::new` the module is never touched again: its code is only
// executed (through the `CpuKernel`s, which hold plain function pointers) and the module is
// dropped with the engine. Executing immutable code from several threads is safe.
unsafe impl Send for Code {}
unsafe impl Sync for Code {}

/// What one call at a time works in.
pub(crate) struct Workspace {
    pool: Pool,
    arena: Vec<f32>,
    /// qgemm prep: permuted f32 rows, group sums and block scales; int8 codes
    xp: Vec<f32>,
    xq: Vec<i8>,
    /// attention accumulators, per worker
    attn: Vec<f32>,
    /// rope tables per set: [CHUNK, rope_dim / 2]
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// int8 head: quantized input rows and their block scales
    hq: Vec<i8>,
    hdx: Vec<f32>,
    /// the round's tokens and positions
    tok: Vec<i32>,
    pos: Vec<i32>,
    /// logits of rows gathered from several sessions: their inputs, their outputs
    lx: Vec<f32>,
    lout: Vec<f32>,
    /// per-round bindings of the sessions' caches (reused, no allocation per step)
    segkv: Vec<[u64; 4]>,
    /// a recent window's full-precision source per segment: its tail, then its rows' K and V
    fpsrc: Vec<Vec<f32>>,
}

/// A compiled plan, ready to make sessions. `Send + Sync`: threads share it, and its calls
/// take turns on the workspace.
pub struct CpuEngine {
    steps: Vec<CpuStep>,
    plan: MemoryPlan,
    work: Mutex<Workspace>,
    _code: Code,
    _weights: Weights,
    rope_sets: Vec<Vec<f32>>,
    vocab: usize,
    threads: usize,
    profile: bool,
    /// bytes of the engine's own copies of weights (quantized GEMM codes in tile order and
    /// scale/zero in f32, the int8 head, f32 copies of small vectors)
    pub derived_bytes: usize,
    /// milliseconds spent binding weights and JIT-compiling
    pub jit_ms: f64,
    /// distinct kernels compiled, machine-code bytes
    pub kernels: usize,
    /// distinct kernels served by native code for `isa` (`wkvc_codegen::native`)
    pub native_kernels: usize,
    pub isa: CpuIsa,
    pub code_bytes: usize,
    pub act: Act,
}

impl CpuEngine {
    /// JIT-compile `lowered` (a plan of `model`) for `opts.threads` workers.
    pub(crate) fn new(
        model: &crate::Model,
        lowered: &LoweredPlan,
        opts: EngineOptions,
    ) -> Result<CpuEngine, RuntimeError> {
        let t0 = Instant::now();
        let module = &model.module;
        let threads = opts.threads.max(1);
        let mut jit = CpuJit::host()?;
        let isa = opts.cpu_isa.unwrap_or_else(CpuIsa::detect);
        isa.check().map_err(err)?;
        let mut compiled: HashMap<String, CpuKernel> = HashMap::new();
        let mut natives = 0;
        let mut w = Weights::default();
        let mut steps = Vec::with_capacity(lowered.steps.len());
        let mut rope_sets: Vec<Vec<f32>> = Vec::new();
        let mut code_bytes = 0;
        for st in &lowered.steps {
            let spec = st.spec.clone();
            let key = spec.code_name();
            let f = match compiled.get(&key) {
                Some(f) => *f,
                None => {
                    let f = match native::kernel(&spec, isa) {
                        Some(f) => {
                            natives += 1;
                            f
                        }
                        None => {
                            let (f, size) = jit.compile_kernel(&spec)?;
                            code_bytes += size;
                            CpuKernel::Jit(f)
                        }
                    };
                    compiled.insert(key, f);
                    f
                }
            };
            let mut operands = Vec::with_capacity(st.operands.len());
            for (i, o) in st.operands.iter().enumerate() {
                operands.push(match o {
                    StepOperand::Buffer(b) => Bound::Buf(b.offset),
                    StepOperand::Tokens => Bound::Tokens,
                    StepOperand::Positions => Bound::Positions,
                    StepOperand::Param(p) => Bound::Param(match &spec {
                        // codes, scales and zeros of a quantized GEMM part: engine copies in
                        // the kernel's tile order
                        KernelSpec::QGemm {
                            k, group, parts, ..
                        } if (1..1 + 3 * parts.len()).contains(&i) => {
                            let rows = parts[(i - 1) / 3];
                            let gl = wkvc_ir::quant::group_len(*k, *group);
                            w.qgemm(module, p, (i - 1) % 3 == 0, (rows, *k, gl))?
                        }
                        // small vectors read every step: f32 copies (see `memplan`)
                        KernelSpec::RmsNorm { .. }
                        | KernelSpec::RopeKv { .. }
                        | KernelSpec::Attention { .. } => w.small(module, p)?,
                        _ => w.param(module, p)?,
                    }),
                });
            }
            let mut rope = 0;
            if let KernelSpec::RopeKv { .. } = &spec {
                rope = match rope_sets.iter().position(|s| *s == st.inv_freq) {
                    Some(i) => i,
                    None => {
                        rope_sets.push(st.inv_freq.clone());
                        rope_sets.len() - 1
                    }
                };
            }
            let mut head = None;
            if let (
                KernelSpec::Logits {
                    vocab,
                    dim,
                    act: Act::Int8,
                },
                Some(name),
            ) = (&spec, st.param(1))
            {
                head = Some(w.int8_head(module, name, *vocab, *dim)?);
            }
            steps.push(CpuStep {
                spec,
                f,
                operands,
                out: st.out.offset,
                rope,
                head,
                release: None,
                window: st.window,
            });
        }
        // an embedding table that only the embedding reads (the int8 head has its own copy)
        for (i, step) in steps.iter_mut().enumerate() {
            if let (KernelSpec::Embed { .. }, Some(name)) = (&step.spec, lowered.steps[i].param(1))
            {
                let shared = lowered.steps.iter().enumerate().any(|(j, s)| {
                    j != i
                        && !matches!(s.spec, KernelSpec::Logits { act: Act::Int8, .. })
                        && s.operands
                            .iter()
                            .any(|o| matches!(o, StepOperand::Param(p) if p == name))
                });
                if !shared {
                    step.release = module.weights.get(name).cloned();
                }
            }
        }
        // Fault-around mapped neighbouring pages back while the copies were built: release
        // everything the engine holds its own copy of once more.
        for st in &lowered.steps {
            let copied = matches!(
                st.spec,
                KernelSpec::QGemm { .. }
                    | KernelSpec::RmsNorm { .. }
                    | KernelSpec::RopeKv { .. }
                    | KernelSpec::Attention { .. }
                    | KernelSpec::Logits { act: Act::Int8, .. }
            );
            for o in &st.operands {
                if let (true, StepOperand::Param(p)) = (copied, o)
                    && let Some(w) = module.weights.get(p)
                {
                    w.release_pages();
                }
            }
        }
        let plan = lowered.memory.clone();
        let work = Workspace::new(&steps, &plan, rope_sets.len(), threads)?;
        Ok(CpuEngine {
            derived_bytes: w.derived_bytes(),
            kernels: compiled.len() - natives,
            native_kernels: natives,
            isa,
            code_bytes,
            steps,
            plan,
            work: Mutex::new(work),
            _code: Code(jit),
            _weights: w,
            rope_sets,
            vocab: lowered.vocab,
            threads,
            profile: opts.profile,
            jit_ms: t0.elapsed().as_secs_f64() * 1e3,
            act: lowered.act,
        })
    }

    pub fn memory_plan(&self) -> &MemoryPlan {
        &self.plan
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Bytes of a session's recent-window tails (f32 K and V of the last R - 1 positions per
    /// past-only layer) once it holds `ctx` tokens.
    pub(crate) fn kv_tail_bytes(&self, ctx: usize) -> usize {
        self.steps
            .iter()
            .map(|s| match &s.spec {
                KernelSpec::Attention {
                    kv_heads,
                    head_dim,
                    kv_bits,
                    past_only: true,
                    ..
                } if *kv_bits < 16 => (s.window - 1).min(ctx) * 2 * kv_heads * head_dim * 4,
                _ => 0,
            })
            .sum()
    }

    /// An empty KV cache of `max_ctx` tokens for a session.
    pub(crate) fn new_kv(&self, max_ctx: usize) -> CpuKv {
        let mut layers = BTreeMap::new();
        for s in &self.steps {
            if let KernelSpec::Attention {
                layer,
                kv_heads,
                head_dim,
                kv_bits,
                kv_group,
                past_only,
                ..
            } = &s.spec
            {
                let w = kv_heads * head_dim;
                let window = if *past_only && *kv_bits < 16 {
                    s.window
                } else {
                    1
                };
                // (scale, zero) pairs a row: a kv head each, or groups of `kv_group` channels
                let groups = w / wkvc_ir::kvcache::group_len(*kv_group, *head_dim);
                let (codes, params) = if *kv_bits == 16 {
                    ([Vec::new(), Vec::new()], max_ctx * w)
                } else {
                    let c = max_ctx * w.div_ceil(2);
                    ([vec![0u8; c], vec![0u8; c]], max_ctx * groups)
                };
                layers.insert(
                    *layer,
                    LayerCache {
                        width: w,
                        groups: if *kv_bits == 16 { *kv_heads } else { groups },
                        codes,
                        params: [vec![0u32; params], vec![0u32; params]],
                        window,
                        // at most the context's rows (a window may exceed it)
                        tail: Vec::with_capacity((window - 1).min(max_ctx) * 2 * w),
                        next: Vec::with_capacity((window - 1).min(max_ctx) * 2 * w),
                        staged: false,
                    },
                );
            }
        }
        CpuKv { layers }
    }
}

impl Workspace {
    fn new(
        steps: &[CpuStep],
        plan: &MemoryPlan,
        rope_sets: usize,
        threads: usize,
    ) -> Result<Workspace, RuntimeError> {
        let (mut xp, mut xq, mut attn, mut rope, mut head, mut dim) = (0, 0, 0, 0, 0, 0);
        for s in steps {
            match &s.spec {
                KernelSpec::QGemm { k, group, .. } => {
                    let gl = wkvc_ir::quant::group_len(*k, *group);
                    xp = xp.max(CHUNK * (k + k.div_ceil(gl) + k.div_ceil(32)));
                    xq = xq.max(CHUNK * k);
                }
                KernelSpec::Attention {
                    heads,
                    kv_heads,
                    head_dim,
                    ..
                } => attn = attn.max(4 * head_dim * (heads / kv_heads + 1)),
                KernelSpec::RopeKv { rope_dim, .. } => rope = rope.max(CHUNK * rope_dim / 2),
                KernelSpec::Logits { dim: d, act, .. } => {
                    dim = *d;
                    if *act == Act::Int8 {
                        head = *d;
                    }
                }
                _ => {}
            }
        }
        Ok(Workspace {
            pool: Pool::new(threads)
                .map_err(|e| err(format!("cannot start {threads} threads: {e}")))?,
            arena: vec![0f32; plan.arena_bytes.div_ceil(4)],
            xp: vec![0f32; xp],
            xq: vec![0i8; xq],
            attn: vec![0f32; attn * threads],
            cos: vec![0f32; rope * rope_sets.max(1)],
            sin: vec![0f32; rope * rope_sets.max(1)],
            hq: vec![0i8; CHUNK * head],
            hdx: vec![0f32; CHUNK * head / 32],
            tok: vec![0; CHUNK],
            pos: vec![0; CHUNK],
            lx: vec![0f32; dim],
            lout: Vec::new(),
            segkv: Vec::new(),
            fpsrc: Vec::new(),
        })
    }
}

/// One layer's cache: K and V codes (none for an f32 cache) and their (scale, zero) pairs per
/// (token, group), or the f32 rows of a 16-bit cache.
struct LayerCache {
    width: usize,
    /// (scale, zero) groups a row (kv heads for an f32 cache)
    groups: usize,
    codes: [Vec<u8>; 2],
    /// K and V: a word per (token, group) for a quantized cache (f16 scale and zero,
    /// `wkvc_ir::kvcache::pack_params`), or the f32 rows' bits
    params: [Vec<u32>; 2],
    /// the attention's recent window (1: none)
    window: usize,
    /// with a window: the full-precision K and V (`width` each, K first) of the last
    /// min(window - 1, length) positions before the cache's length
    tail: Vec<f32>,
    /// the tail as the running call has advanced it (`staged`): it becomes `tail` when the
    /// call succeeds and is dropped when it fails, so a failed call leaves the cache as it was
    next: Vec<f32>,
    staged: bool,
}

impl LayerCache {
    fn quantized(&self) -> bool {
        !self.codes[0].is_empty()
    }

    /// Rows of the recent window's tail a cache of `len` tokens has.
    fn tail_len(&self, len: usize) -> usize {
        (self.window - 1).min(len)
    }

    /// The tail the running call reads: as advanced by its earlier rounds, or the cache's.
    fn current_tail(&self) -> &[f32] {
        if self.staged { &self.next } else { &self.tail }
    }

    /// Advance the running call's tail to the last `rows` rows of `src`.
    fn stage_tail(&mut self, src: &[f32], rows: usize) {
        self.next.clear();
        self.next
            .extend_from_slice(&src[src.len() - rows * 2 * self.width..]);
        self.staged = true;
    }

    /// Rows the tail holds now.
    fn tail_rows(&self) -> usize {
        self.tail.len() / (2 * self.width)
    }

    /// The tail as K rows and V rows.
    fn split_tail(&self) -> (Vec<f32>, Vec<f32>) {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for r in self.tail.chunks(2 * self.width) {
            k.extend_from_slice(&r[..self.width]);
            v.extend_from_slice(&r[self.width..]);
        }
        (k, v)
    }

    /// Pointers the kernels take: K codes (or rows), K params, V codes (or rows), V params.
    fn words(&mut self) -> [u64; 4] {
        let (kp, vp) = (
            self.params[0].as_mut_ptr() as u64,
            self.params[1].as_mut_ptr() as u64,
        );
        if self.quantized() {
            [
                self.codes[0].as_mut_ptr() as u64,
                kp,
                self.codes[1].as_mut_ptr() as u64,
                vp,
            ]
        } else {
            [kp, kp, vp, vp]
        }
    }
}

/// A session's KV cache on the CPU engine, per layer.
pub struct CpuKv {
    layers: BTreeMap<i64, LayerCache>,
}

impl CpuKv {
    /// Back to an empty cache (the rows need no clearing: the length says what is held).
    pub(crate) fn reset(&mut self) {
        for lc in self.layers.values_mut() {
            lc.tail.clear();
            lc.staged = false;
        }
    }

    /// The call succeeded: the recent-window tails it advanced become the cache's.
    pub(crate) fn commit_tails(&mut self) {
        for lc in self.layers.values_mut().filter(|lc| lc.staged) {
            std::mem::swap(&mut lc.tail, &mut lc.next);
            lc.staged = false;
        }
    }

    /// The call failed: the tails it advanced are dropped, the cache's stay.
    pub(crate) fn drop_staged_tails(&mut self) {
        for lc in self.layers.values_mut() {
            lc.staged = false;
        }
    }

    /// Bytes the recent windows' tails hold now.
    pub(crate) fn tail_bytes(&self) -> usize {
        self.layers.values().map(|lc| 4 * lc.tail.len()).sum()
    }

    /// The first `n` tokens in the interpreter's form (the layout is the same).
    pub(crate) fn export(&self, n: usize, max_ctx: usize) -> Result<KvCache, RuntimeError> {
        let layers = self
            .layers
            .iter()
            .map(|(&id, lc)| {
                let l = if lc.quantized() {
                    let rb = lc.width.div_ceil(2);
                    let pairs = |p: &[u32]| {
                        p[..n * lc.groups]
                            .iter()
                            .map(|&w| wkvc_ir::kvcache::unpack_params(w))
                            .collect()
                    };
                    if lc.tail_rows() != lc.tail_len(n) {
                        return Err(err(format!(
                            "layer {id}: the recent window's tail holds {} rows, not the {} \
                             before token {n}",
                            lc.tail_rows(),
                            lc.tail_len(n)
                        )));
                    }
                    let (wk, wv) = lc.split_tail();
                    KvLayer {
                        width: lc.width,
                        groups: lc.groups,
                        row_bytes: rb,
                        kc: lc.codes[0][..n * rb].to_vec(),
                        vc: lc.codes[1][..n * rb].to_vec(),
                        kp: pairs(&lc.params[0]),
                        vp: pairs(&lc.params[1]),
                        param_bytes: 2,
                        wk,
                        wv,
                        ..Default::default()
                    }
                } else {
                    KvLayer {
                        width: lc.width,
                        groups: lc.groups,
                        k: lc.params[0][..n * lc.width]
                            .iter()
                            .map(|&b| f32::from_bits(b))
                            .collect(),
                        v: lc.params[1][..n * lc.width]
                            .iter()
                            .map(|&b| f32::from_bits(b))
                            .collect(),
                        ..Default::default()
                    }
                };
                Ok((id, l))
            })
            .collect::<Result<_, RuntimeError>>()?;
        Ok(KvCache::from_layers(max_ctx, n, layers)?)
    }

    /// Replace the contents by `cache`'s (exactly `cache.len()` rows in every layer).
    pub(crate) fn load(&mut self, cache: &KvCache) -> Result<(), RuntimeError> {
        let n = cache.len();
        let fits = |lc: &LayerCache, l: &KvLayer| {
            l.width == lc.width
                && l.groups == lc.groups
                && l.rows() == n
                && l.window_rows() == lc.tail_len(n)
                && l.is_quantized() == lc.quantized()
                && (!l.is_quantized()
                    || (l.row_bytes == lc.width.div_ceil(2) && l.param_bytes == 2))
        };
        if let Some(id) = self
            .layers
            .iter()
            .find(|(id, lc)| !cache.layer(**id).is_some_and(|l| fits(lc, l)))
            .map(|(id, _)| *id)
        {
            return Err(err(format!(
                "the cache has no layer {id} of this plan's shape with {n} rows (and, for a \
                 plan with a recent window, the full-precision rows of the window before them)"
            )));
        }
        for (id, lc) in self.layers.iter_mut() {
            let Some(l) = cache.layer(*id) else { continue };
            lc.staged = false;
            if l.is_quantized() {
                lc.tail.clear();
                for (k, v) in l.wk.chunks(lc.width).zip(l.wv.chunks(lc.width)) {
                    lc.tail.extend_from_slice(k);
                    lc.tail.extend_from_slice(v);
                }
                for (dst, src) in lc.codes.iter_mut().zip([&l.kc, &l.vc]) {
                    dst[..src.len()].copy_from_slice(src);
                }
                for (dst, src) in lc.params.iter_mut().zip([&l.kp, &l.vp]) {
                    for (d, &(s, z)) in dst.iter_mut().zip(src.iter()) {
                        *d = wkvc_ir::kvcache::pack_params(s, z);
                    }
                }
            } else {
                for (dst, src) in lc.params.iter_mut().zip([&l.k, &l.v]) {
                    for (d, s) in dst.iter_mut().zip(src.iter()) {
                        *d = s.to_bits();
                    }
                }
            }
        }
        Ok(())
    }
}
