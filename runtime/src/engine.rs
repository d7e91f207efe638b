//! Engines and sessions, the runtime's core.
//!
//! - `Engine` (`Send + Sync`, cheap to clone: an `Arc` inside) owns what runs a model on one
//!   device: compiled kernels, the weights in the layout its kernels read, one workspace
//!   (activation arena, scratch). Threads share it; its calls take turns on the workspace.
//! - `Session` (`Send`) owns one sequence: its KV cache, position and last logits.
//! - `Engine::step` advances a batch of sessions at once, each by a prefill chunk or a decode
//!   token: the GEMMs run on the rows of all of them together, attention per session over its
//!   own cache. `Session::forward`/`step` are the same call with one session.
//!
//! Every engine keeps the KV cache in one layout (`wkvc_ir::kvcache`), so a cache exported
//! from one (`Session::kv_cache`) loads into another (`Session::load_kv`).

use crate::{Model, RuntimeError, cpu, cuda, interp};
use std::sync::Arc;
use wkvc_codegen::native::CpuIsa;
use wkvc_ir::{Act, KvCache, RunMode};

/// Which engine runs a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// The reference interpreter (f32, any graph).
    Interp,
    /// Lowered kernels JIT-compiled by Cranelift; `act` selects the exact (f32) or the
    /// int8-activation fast path of the quantized GEMMs.
    Cpu { act: Act },
    /// The CUDA kernels on GPU `device` (an error without a driver or device); `mma`: the
    /// quantized GEMMs of prefill on tensor cores (f16 operands, f32 sums).
    Cuda { device: usize, mma: bool },
    /// The CUDA engine with its kernels on the CUDA host emulator (`wkvc_codegen::cuda_host`,
    /// needs a C++ compiler): checks the CUDA kernels and engine without a GPU; slow.
    CudaEmulated { mma: bool },
}

/// Options of an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    /// CPU workers (the calling thread is one of them).
    pub threads: usize,
    /// Time every kernel and call and log the figures through `tracing` (target
    /// `wkvc::profile`, level info).
    pub profile: bool,
    /// The CPU engine's native kernels: the widest the host runs when `None`
    /// (`CpuIsa::detect`); `Some(CpuIsa::Base)` keeps Cranelift's kernels only.
    pub cpu_isa: Option<CpuIsa>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            profile: false,
            cpu_isa: None,
        }
    }
}

pub(crate) enum Backend {
    Interp(interp::InterpEngine),
    Cpu(Box<cpu::CpuEngine>),
    Cuda(Box<cuda::CudaEngine>),
}

struct EngineData {
    model: Model,
    kind: EngineKind,
    backend: Backend,
}

/// Executes a model (module docs). `Clone` shares it.
#[derive(Clone)]
pub struct Engine(Arc<EngineData>);

/// A session's KV cache, in its engine's memory.
pub(crate) enum Kv {
    Interp(KvCache),
    Cpu(cpu::CpuKv),
    Cuda(cuda::CudaKv),
}

/// One sequence being generated: its KV cache, position and last logits.
pub struct Session {
    engine: Engine,
    kv: Kv,
    len: usize,
    max_ctx: usize,
    logits: Vec<f32>,
}

/// One session's part of a batched step.
pub struct BatchItem<'a> {
    pub session: &'a mut Session,
    /// the tokens to run after the session's cache (a prefill chunk, or one decode token)
    pub tokens: &'a [u32],
    pub mode: RunMode,
    /// logits of every token appended here (None: the last token's only, in
    /// `Session::logits`)
    pub all_logits: Option<&'a mut Vec<f32>>,
}

impl<'a> BatchItem<'a> {
    /// `tokens` after `session`'s cache, the last token's logits wanted.
    pub fn new(session: &'a mut Session, tokens: &'a [u32]) -> BatchItem<'a> {
        BatchItem {
            session,
            tokens,
            mode: RunMode::Prefill,
            all_logits: None,
        }
    }
}

/// A batch item as the back ends see it: checked, with its cache and position.
pub(crate) struct Work<'a, K> {
    pub kv: &'a mut K,
    /// tokens in the cache before the call
    pub past: usize,
    pub tokens: &'a [u32],
    pub mode: RunMode,
    pub all_logits: Option<&'a mut Vec<f32>>,
    /// the last token's logits
    pub logits: &'a mut [f32],
}

/// One item's rows in a round of a batched call (the engines run a call in rounds of up to
/// `CHUNK` rows).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg {
    /// the work item
    pub item: usize,
    /// first row in the round
    pub at: usize,
    pub rows: usize,
    /// tokens in the item's cache before these rows
    pub past: usize,
    pub mode: RunMode,
    /// do these rows end the item's tokens?
    pub last: bool,
    /// are all of the item's logits wanted?
    pub all: bool,
}

/// The next round of a batched call: each item with tokens left contributes its next piece
/// of up to `CHUNK` tokens, whole, while the round has room (an item that does not fit waits
/// for the next round). A piece always starts a multiple of `CHUNK` tokens into the item's
/// tokens, as when the item runs alone: with past-only attention a chunk's own K/V are read in
/// full precision, so the pieces' boundaries decide what is quantized, and a batch must not
/// move them. Returns false when no tokens are left.
pub(crate) fn next_round<K>(work: &[Work<'_, K>], done: &[usize], segs: &mut Vec<Seg>) -> bool {
    use wkvc_passes::lower::CHUNK;
    segs.clear();
    let mut used = 0;
    for (i, w) in work.iter().enumerate() {
        let rest = w.tokens.len() - done[i];
        let take = rest.min(CHUNK);
        if take == 0 || used + take > CHUNK {
            continue;
        }
        segs.push(Seg {
            item: i,
            at: used,
            rows: take,
            past: w.past + done[i],
            mode: w.mode,
            last: take == rest,
            all: w.all_logits.is_some(),
        });
        used += take;
    }
    !segs.is_empty()
}

impl Engine {
    pub(crate) fn new(
        model: &Model,
        kind: EngineKind,
        opts: EngineOptions,
    ) -> Result<Engine, RuntimeError> {
        let opts = EngineOptions {
            threads: opts.threads.max(1),
            ..opts
        };
        let backend = match kind {
            EngineKind::Interp => Backend::Interp(interp::InterpEngine::new(model, opts)?),
            EngineKind::Cpu { act } => {
                let lowered = model.lowered(act)?;
                Backend::Cpu(Box::new(cpu::CpuEngine::new(model, &lowered, opts)?))
            }
            EngineKind::Cuda { device, mma } => {
                Backend::Cuda(Box::new(cuda::CudaEngine::new(model, device, mma, opts)?))
            }
            EngineKind::CudaEmulated { mma } => {
                Backend::Cuda(Box::new(cuda::CudaEngine::emulated(model, mma, opts)?))
            }
        };
        Ok(Engine(Arc::new(EngineData {
            model: model.clone(),
            kind,
            backend,
        })))
    }

    pub fn model(&self) -> &Model {
        &self.0.model
    }

    pub fn kind(&self) -> EngineKind {
        self.0.kind
    }

    pub fn vocab_size(&self) -> usize {
        self.0.model.config.vocab_size
    }

    /// The compiled CPU engine, when this is one.
    pub fn cpu(&self) -> Option<&cpu::CpuEngine> {
        match &self.0.backend {
            Backend::Cpu(c) => Some(c),
            _ => None,
        }
    }

    /// The CUDA engine, when this is one.
    pub fn cuda(&self) -> Option<&cuda::CudaEngine> {
        match &self.0.backend {
            Backend::Cuda(c) => Some(c),
            _ => None,
        }
    }

    /// "interp", "cpu (f32 activations, avx2)", "cuda (DEVICE, CODE)".
    pub fn describe(&self) -> String {
        match &self.0.backend {
            Backend::Interp(_) => "interp".into(),
            Backend::Cpu(c) => format!("cpu ({} activations, {})", c.act.name(), c.isa.name()),
            Backend::Cuda(c) => format!("cuda ({}, {})", c.device_name, c.code),
        }
    }

    /// KV cache bytes per token of context (all layers, K and V).
    pub fn kv_bytes_per_token(&self) -> usize {
        match &self.0.backend {
            Backend::Interp(i) => i.kv_bytes_per_token(),
            Backend::Cpu(c) => c.memory_plan().kv_bytes_per_token,
            Backend::Cuda(c) => c.memory_plan().kv_bytes_per_token,
        }
    }

    /// Bytes of the recent windows' full-precision tails (`--kv-window`) beside the per-token
    /// cache once a session holds `ctx` tokens: constant from R - 1 tokens on; 0 without a
    /// window.
    pub fn kv_tail_bytes(&self, ctx: usize) -> usize {
        match &self.0.backend {
            Backend::Interp(i) => i.kv_tail_bytes(ctx),
            Backend::Cpu(c) => c.kv_tail_bytes(ctx),
            Backend::Cuda(c) => c.kv_tail_bytes(ctx),
        }
    }

    /// A session whose cache holds at most `max_ctx` tokens (the model's maximum if larger).
    /// The CPU engine allocates its cache here, the CUDA engine at its first run (so that a
    /// failure to allocate device memory is that run's error).
    pub fn session(&self, max_ctx: usize) -> Session {
        let max = max_ctx
            .min(self.0.model.config.max_position_embeddings)
            .max(1);
        let kv = match &self.0.backend {
            Backend::Interp(_) => Kv::Interp(KvCache::new(max)),
            Backend::Cpu(c) => Kv::Cpu(c.new_kv(max)),
            Backend::Cuda(c) => Kv::Cuda(c.new_kv(max)),
        };
        Session {
            engine: self.clone(),
            kv,
            len: 0,
            max_ctx: max,
            logits: vec![0.0; self.vocab_size()],
        }
    }

    /// Advance every item's session by its tokens in one call (module docs). Everything is
    /// checked first: a session of another engine, no tokens, an id outside the vocabulary or
    /// a context overflow is an error that changes no session.
    pub fn step(&self, batch: &mut [BatchItem<'_>]) -> Result<(), RuntimeError> {
        let vocab = self.vocab_size();
        for it in batch.iter() {
            if !Arc::ptr_eq(&it.session.engine.0, &self.0) {
                return Err(RuntimeError::Invalid(
                    "a session of another engine in the batch".into(),
                ));
            }
            check_run(it.tokens, vocab, it.session.len, it.session.max_ctx)?;
        }
        macro_rules! run {
            ($variant:ident, $engine:expr) => {{
                let mut work = Vec::with_capacity(batch.len());
                for it in batch.iter_mut() {
                    let s = &mut *it.session;
                    let Kv::$variant(kv) = &mut s.kv else {
                        return Err(RuntimeError::Invalid(
                            "a session whose cache is not this engine's".into(),
                        ));
                    };
                    work.push(Work {
                        kv,
                        past: s.len,
                        tokens: it.tokens,
                        mode: it.mode,
                        all_logits: it.all_logits.as_deref_mut(),
                        logits: &mut s.logits,
                    });
                }
                $engine.run(&mut work)
            }};
        }
        match &self.0.backend {
            Backend::Interp(e) => run!(Interp, e),
            Backend::Cpu(e) => run!(Cpu, e),
            Backend::Cuda(e) => run!(Cuda, e),
        }?;
        for it in batch.iter_mut() {
            it.session.len += it.tokens.len();
        }
        Ok(())
    }
}

impl Session {
    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_ctx(&self) -> usize {
        self.max_ctx
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Forget the sequence (the cache's memory stays allocated).
    pub fn reset(&mut self) {
        self.len = 0;
        match &mut self.kv {
            Kv::Interp(c) => c.clear(),
            Kv::Cpu(k) => k.reset(),
            Kv::Cuda(_) => {}
        }
    }

    /// Bytes the KV cache holds now (with the recent windows' full-precision tails).
    pub fn kv_bytes(&self) -> usize {
        match &self.kv {
            Kv::Interp(c) => c.bytes(),
            Kv::Cpu(k) => self.len * self.engine.kv_bytes_per_token() + k.tail_bytes(),
            Kv::Cuda(k) => self.len * self.engine.kv_bytes_per_token() + k.tail_bytes(self.len),
        }
    }

    /// Bytes allocated for the cache (at its maximum context, with the windows' tails).
    pub fn kv_capacity_bytes(&self) -> usize {
        self.max_ctx * self.engine.kv_bytes_per_token() + self.engine.kv_tail_bytes(self.max_ctx)
    }

    /// The logits of the last token run.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// The KV cache's contents in the interpreter's form: every engine uses the same layout
    /// (`wkvc_ir::kvcache`), so a cache exported from one engine loads into another.
    pub fn kv_cache(&self) -> Result<KvCache, RuntimeError> {
        match &self.kv {
            Kv::Interp(c) => Ok(c.clone()),
            Kv::Cpu(k) => k.export(self.len, self.max_ctx),
            Kv::Cuda(k) => k.export(self.len, self.max_ctx),
        }
    }

    /// Replace the KV cache's contents by `cache`'s (from `kv_cache` of a session of the
    /// same plan, on any engine). The interpreter also takes a cache holding the next chunk's
    /// rows, which it then replays (`wkvc_ir::kvcache`); the compiled engines need a cache of
    /// exactly `cache.len()` rows.
    pub fn load_kv(&mut self, cache: &KvCache) -> Result<(), RuntimeError> {
        let n = cache.len();
        if n > self.max_ctx {
            return Err(RuntimeError::Invalid(format!(
                "a cache of {n} tokens does not fit this session's context of {}",
                self.max_ctx
            )));
        }
        match &mut self.kv {
            Kv::Interp(c) => {
                *c = KvCache::from_layers(self.max_ctx, n, cache.layers().clone())?;
            }
            Kv::Cpu(k) => k.load(cache)?,
            Kv::Cuda(k) => k.load(cache)?,
        }
        self.len = n;
        Ok(())
    }

    /// Run `ids` after what the cache holds; returns logits `[ids.len(), vocab]` row-major.
    /// Out-of-range ids or a context overflow are errors that leave the session unchanged.
    pub fn forward(&mut self, ids: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        self.forward_mode(ids, RunMode::Prefill)
    }

    /// `forward` with an explicit KV protocol (decode-equivalent for evaluation).
    pub fn forward_mode(&mut self, ids: &[u32], mode: RunMode) -> Result<Vec<f32>, RuntimeError> {
        let mut all = Vec::with_capacity(ids.len() * self.logits.len());
        let engine = self.engine.clone();
        engine.step(&mut [BatchItem {
            session: self,
            tokens: ids,
            mode,
            all_logits: Some(&mut all),
        }])?;
        Ok(all)
    }

    /// Run `ids` and return the logits of the last one (no allocation on the compiled
    /// engines: the slice is the session's buffer).
    pub fn step(&mut self, ids: &[u32]) -> Result<&[f32], RuntimeError> {
        let engine = self.engine.clone();
        engine.step(&mut [BatchItem::new(self, ids)])?;
        Ok(&self.logits)
    }

    /// Run `ids` and return the logits of the last one.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        Ok(self.step(ids)?.to_vec())
    }
}

/// What every engine checks before running `ids` after `len` cached tokens: some tokens, ids
/// in the vocabulary, room in the context (so a refused call changes nothing).
pub(crate) fn check_run(
    ids: &[u32],
    vocab: usize,
    len: usize,
    max_ctx: usize,
) -> Result<(), RuntimeError> {
    if ids.is_empty() {
        return Err(RuntimeError::Invalid("no tokens to run".into()));
    }
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(wkvc_ir::Error::TokenOutOfRange {
            id: bad as i64,
            vocab,
        }
        .into());
    }
    if len + ids.len() > max_ctx {
        return Err(wkvc_ir::Error::ContextOverflow {
            have: len,
            adding: ids.len(),
            max: max_ctx,
        }
        .into());
    }
    Ok(())
}
