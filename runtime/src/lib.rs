//! wkvc-runtime owns execution: opening a model, engines (the reference interpreter and the
//! compiled CPU engine),
//! sessions with a KV cache (prefill, decode), sampling, the tokenizer and chat template, and
//! perplexity evaluation and benchmarking.

pub mod compile;
pub mod cpu;
pub mod cuda;
pub mod eval;
pub mod plan;
pub mod pool;
pub mod sample;
pub mod tokenizer;

use std::path::Path;
use wkvc_ir::import::{self, Source};
pub use wkvc_ir::{Act, RunMode};
use wkvc_ir::{Interpreter, KvCache, ModelConfig, Module, Tensor};

pub use sample::Sampler;
pub use tokenizer::{Message, StreamDecoder, Tokenizer};

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
    #[error("{0}")]
    Invalid(String),
    #[error("interrupted (Ctrl-C): nothing was written")]
    Interrupted,
}

/// A model ready to run: module, config, tokenizer, provenance.
pub struct Model {
    pub module: Module,
    pub config: ModelConfig,
    /// How to build the tokenizer (`tokenizer()` builds it on first use: running by token
    /// ids never holds its tables).
    pub tokenizer_spec: Option<wkvc_ir::import::TokenizerSpec>,
    tokenizer: std::sync::OnceLock<Tokenizer>,
    pub source: Source,
    /// The manifest when the model is a compiled plan.
    pub plan: Option<plan::Manifest>,
}

impl Model {
    /// Open a compiled plan, a GGUF file or a Hugging Face directory.
    pub fn open(path: &Path) -> Result<Model, RuntimeError> {
        if path.is_file() && plan::is_plan(path) {
            let (module, mut manifest) = plan::open(path)?;
            // one copy of the spec: the model's
            let tokenizer_spec = manifest.tokenizer.take();
            let mut source = manifest.source.clone();
            source.path = path.to_path_buf();
            source.format = "plan".into();
            source.file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            return Ok(Model {
                module,
                config: manifest.config.clone(),
                tokenizer_spec,
                tokenizer: Default::default(),
                source,
                plan: Some(manifest),
            });
        }
        let imp = import::import(path)?;

        Ok(Model {
            module: imp.module,
            config: imp.config,
            tokenizer_spec: imp.tokenizer,
            tokenizer: Default::default(),
            source: imp.source,
            plan: None,
        })
    }

    /// The same model with another module (a compiled variant of this one).
    pub fn with_module(&self, module: Module, plan: Option<plan::Manifest>) -> Model {
        Model {
            module,
            config: self.config.clone(),
            tokenizer_spec: self.tokenizer_spec.clone(),
            tokenizer: self.tokenizer.clone(),
            source: self.source.clone(),
            plan,
        }
    }

    /// The tokenizer, built from its spec on first use.
    pub fn tokenizer(&self) -> Result<&Tokenizer, RuntimeError> {
        if let Some(t) = self.tokenizer.get() {
            return Ok(t);
        }
        let spec = self.tokenizer_spec.as_ref().ok_or_else(|| {
            RuntimeError::Invalid(format!(
                "{} has no tokenizer (no tokenizer.json / tokenizer metadata)",
                self.source.path.display()
            ))
        })?;
        let t = Tokenizer::from_spec(spec.clone())?;
        Ok(self.tokenizer.get_or_init(|| t))
    }

    /// The reference interpreter on `threads` workers (`engine_auto` picks the compiled CPU
    /// engine for plans, `engine_kind` chooses explicitly).
    pub fn engine(&self, threads: usize) -> Result<Engine<'_>, RuntimeError> {
        self.engine_kind(threads, EngineKind::Interp)
    }

    /// The compiled CPU engine (exact path) for plans, falling back to the interpreter with a
    /// warning when the plan has something the kernels do not implement; the interpreter for
    /// unquantized models.
    pub fn engine_auto(&self, threads: usize) -> Result<Engine<'_>, RuntimeError> {
        if let Some(p) = &self.plan {
            let act = p.cpu.as_ref().map_or(wkvc_ir::Act::F32, |c| c.act);
            match self.engine_kind(threads, EngineKind::Cpu { act }) {
                Ok(e) => return Ok(e),
                Err(e) => {
                    tracing::warn!("compiled CPU engine unavailable, using the interpreter: {e}")
                }
            }
        }
        self.engine_kind(threads, EngineKind::Interp)
    }

    /// An engine of the given kind.
    pub fn engine_kind(
        &self,
        threads: usize,
        kind: EngineKind,
    ) -> Result<Engine<'_>, RuntimeError> {
        let imp = match kind {
            EngineKind::Interp => Imp::Interp(Box::new(Interpreter::new(&self.module, threads)?)),
            EngineKind::Cpu { act } => Imp::Cpu(Box::new(cpu::CpuEngine::new(
                &self.module,
                threads,
                act,
                self.config.max_position_embeddings,
            )?)),
            EngineKind::Cuda { device, mma } => Imp::Cuda(Box::new(cuda::CudaEngine::new(
                &self.module,
                device,
                mma,
                self.plan.as_ref().and_then(|p| p.cuda.as_ref()),
            )?)),
            EngineKind::CudaEmulated { mma } => {
                Imp::Cuda(Box::new(cuda::CudaEngine::emulated(&self.module, mma)?))
            }
        };
        Ok(Engine { model: self, imp })
    }
}

/// Which engine runs a model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EngineKind {
    /// The reference interpreter (f32, any graph).
    Interp,
    /// Lowered kernels JIT-compiled by Cranelift; `act` selects the exact (f32) or the
    /// int8-activation fast path of the quantized GEMMs.
    Cpu { act: wkvc_ir::Act },
    /// The CUDA kernels on GPU `device` (an error without a driver or device); `mma`: the
    /// quantized GEMMs of prefill on tensor cores (f16 operands, f32 sums).
    Cuda { device: usize, mma: bool },
    /// The CUDA engine with its kernels on the CUDA host emulator (`wkvc_codegen::cuda_host`,
    /// needs a C++ compiler): checks the CUDA kernels and engine without a GPU; slow.
    CudaEmulated { mma: bool },
}

enum Imp<'m> {
    Interp(Box<Interpreter<'m>>),
    Cpu(Box<cpu::CpuEngine>),
    Cuda(Box<cuda::CudaEngine>),
}

/// Executes a model.
pub struct Engine<'m> {
    model: &'m Model,
    imp: Imp<'m>,
}

impl<'m> Engine<'m> {
    pub fn model(&self) -> &'m Model {
        self.model
    }

    pub fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    /// The compiled engine, when this is one.
    pub fn cpu(&self) -> Option<&cpu::CpuEngine> {
        match &self.imp {
            Imp::Cpu(c) => Some(c),
            _ => None,
        }
    }

    /// The CUDA engine, when this is one.
    pub fn cuda(&self) -> Option<&cuda::CudaEngine> {
        match &self.imp {
            Imp::Cuda(c) => Some(c),
            _ => None,
        }
    }

    /// "interp" or "cpu (f32)" / "cpu (int8)".
    pub fn describe(&self) -> String {
        match &self.imp {
            Imp::Interp(_) => "interp".into(),
            Imp::Cpu(c) => format!("cpu ({} activations)", c.act.name()),
            Imp::Cuda(c) => format!("cuda ({}, {})", c.device_name, c.code),
        }
    }

    /// A session whose cache holds at most `max_ctx` tokens (the model's maximum if larger).
    /// (The CUDA engine allocates its device memory at the first run.)
    pub fn session(&self, max_ctx: usize) -> Session<'_, 'm> {
        let max = max_ctx
            .min(self.model.config.max_position_embeddings)
            .max(1);
        let imp = match &self.imp {
            Imp::Interp(_) => SessImp::Interp(KvCache::new(max)),
            Imp::Cpu(c) => SessImp::Cpu(Box::new(c.session(max))),
            Imp::Cuda(c) => SessImp::Cuda(Box::new(c.session(max))),
        };
        Session {
            engine: self,
            imp,
            last: Vec::new(),
        }
    }
}

enum SessImp<'e> {
    Interp(KvCache),
    Cpu(Box<cpu::CpuSession<'e>>),
    Cuda(Box<cuda::CudaSession<'e>>),
}

/// One sequence being generated: its KV cache and position.
pub struct Session<'e, 'm> {
    engine: &'e Engine<'m>,
    imp: SessImp<'e>,
    last: Vec<f32>,
}

impl Session<'_, '_> {
    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        match &self.imp {
            SessImp::Interp(c) => c.len(),
            SessImp::Cpu(s) => s.len(),
            SessImp::Cuda(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn max_ctx(&self) -> usize {
        match &self.imp {
            SessImp::Interp(c) => c.max_len(),
            SessImp::Cpu(s) => s.max_ctx(),
            SessImp::Cuda(s) => s.max_ctx(),
        }
    }

    pub fn reset(&mut self) {
        match &mut self.imp {
            SessImp::Interp(c) => c.clear(),
            SessImp::Cpu(s) => s.reset(),
            SessImp::Cuda(s) => s.reset(),
        }
    }

    /// Bytes the KV cache holds now.
    pub fn kv_bytes(&self) -> usize {
        match &self.imp {
            SessImp::Interp(c) => c.bytes(),
            SessImp::Cpu(s) => s.kv_bytes(),
            SessImp::Cuda(s) => s.kv_bytes(),
        }
    }

    /// The KV cache's contents in the interpreter's form: every engine uses the same layout
    /// (`wkvc_ir::kvcache`), so a cache exported from one engine loads into another.
    pub fn kv_cache(&self) -> Result<KvCache, RuntimeError> {
        match &self.imp {
            SessImp::Interp(c) => Ok(c.clone()),
            SessImp::Cpu(s) => s.kv_cache(),
            SessImp::Cuda(s) => s.kv_cache(),
        }
    }

    /// Replace the KV cache's contents by `cache`'s (from `kv_cache` of a session of the
    /// same plan, on any engine). The interpreter also takes a cache holding the next chunk's
    /// rows, which it then replays (`wkvc_ir::kvcache`); the compiled engines need a cache of
    /// exactly `cache.len()` rows.
    pub fn load_kv(&mut self, cache: &KvCache) -> Result<(), RuntimeError> {
        match &mut self.imp {
            SessImp::Interp(c) => {
                if cache.len() > c.max_len() {
                    return Err(RuntimeError::Invalid(format!(
                        "a cache of {} tokens does not fit this session's context of {}",
                        cache.len(),
                        c.max_len()
                    )));
                }
                *c = KvCache::from_layers(c.max_len(), cache.len(), cache.layers().clone())?;
                Ok(())
            }
            SessImp::Cpu(s) => s.load_kv(cache),
            SessImp::Cuda(s) => s.load_kv(cache),
        }
    }

    /// Run `ids` after what the cache holds; returns logits `[ids.len(), vocab]` row-major.
    /// Out-of-range ids or a context overflow are errors that leave the session unchanged.
    pub fn forward(&mut self, ids: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        self.forward_mode(ids, RunMode::Prefill)
    }

    /// `forward` with an explicit KV protocol (decode-equivalent for evaluation).
    pub fn forward_mode(&mut self, ids: &[u32], mode: RunMode) -> Result<Vec<f32>, RuntimeError> {
        if ids.is_empty() {
            return Err(RuntimeError::Invalid("no tokens to run".into()));
        }
        let vocab = self.engine.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(wkvc_ir::Error::TokenOutOfRange {
                id: bad as i64,
                vocab,
            }
            .into());
        }
        let cache = match &mut self.imp {
            SessImp::Cpu(s) => {
                let mut all = Vec::with_capacity(ids.len() * vocab);
                s.run(ids, mode, Some(&mut all))?;
                return Ok(all);
            }
            SessImp::Cuda(s) => {
                let mut all = Vec::with_capacity(ids.len() * vocab);
                s.run(ids, mode, Some(&mut all))?;
                return Ok(all);
            }
            SessImp::Interp(c) => c,
        };
        let Imp::Interp(interp) = &self.engine.imp else {
            return Err(RuntimeError::Invalid("session and engine disagree".into()));
        };
        let past = cache.len();
        let toks: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let pos: Vec<i32> = (0..ids.len()).map(|i| (past + i) as i32).collect();
        let n = ids.len();
        let mut out = interp.run_mode(
            &[
                ("tokens", Tensor::i32(vec![n], toks)),
                ("positions", Tensor::i32(vec![n], pos)),
            ],
            cache,
            mode,
        )?;
        out.remove("logits")
            .and_then(Tensor::into_f32)
            .ok_or_else(|| RuntimeError::Invalid("the graph has no f32 output \"logits\"".into()))
    }

    /// Run `ids` and return the logits of the last one (no allocation on the compiled
    /// engine: the slice is the session's buffer).
    pub fn step(&mut self, ids: &[u32]) -> Result<&[f32], RuntimeError> {
        if matches!(self.imp, SessImp::Cpu(_)) {
            let SessImp::Cpu(s) = &mut self.imp else {
                unreachable!("checked above")
            };
            return s.run(ids, RunMode::Prefill, None);
        }
        if matches!(self.imp, SessImp::Cuda(_)) {
            let SessImp::Cuda(s) = &mut self.imp else {
                unreachable!("checked above")
            };
            return s.run(ids, RunMode::Prefill, None);
        }
        let v = self.engine.vocab_size();
        let all = self.forward(ids)?;
        self.last.clear();
        self.last.extend_from_slice(&all[all.len() - v..]);
        Ok(&self.last)
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

/// Timings of one generation.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Prefill `prompt`, then sample up to `max_new` tokens, calling `on_token` for each; stops
/// early at an end-of-generation id (which is not passed on). Ids in `suppress` are never
/// sampled (e.g. eos, to run the full length).
pub fn generate(
    session: &mut Session<'_, '_>,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    is_stop: &dyn Fn(u32) -> bool,
    suppress: &[u32],
    on_token: &mut dyn FnMut(u32) -> Result<(), RuntimeError>,
) -> Result<GenStats, RuntimeError> {
    let need = session.len() + prompt.len() + max_new;
    if need > session.max_ctx() {
        return Err(RuntimeError::Invalid(format!(
            "the prompt ({} tokens) plus {max_new} new tokens exceed the context of {} tokens; \
             generate fewer tokens or raise the context",
            prompt.len(),
            session.max_ctx()
        )));
    }
    let t0 = std::time::Instant::now();
    let mut logits = session.prefill(prompt)?;
    let vocab = logits.len();
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        prefill_seconds: t0.elapsed().as_secs_f64(),
        ..Default::default()
    };
    let t1 = std::time::Instant::now();
    for i in 0..max_new {
        for &s in suppress {
            if let Some(l) = logits.get_mut(s as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let id = sampler.sample(&logits);
        if is_stop(id) {
            break;
        }
        on_token(id)?;
        stats.new_tokens += 1;
        if i + 1 < max_new {
            let l = session.step(&[id])?;
            logits[..vocab].copy_from_slice(l);
        }
    }
    stats.decode_seconds = t1.elapsed().as_secs_f64();
    Ok(stats)
}

/// Reset the peak resident set size (Linux: `5` to /proc/self/clear_refs), so that a later
/// `peak_rss_bytes` covers what ran since. Returns false where that is not supported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size of this process (VmHWM), when the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
