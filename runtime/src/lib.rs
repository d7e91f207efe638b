//! wkvc-runtime runs compiled plans: opening a model (`Model`), engines that run it (the
//! reference interpreter, the compiled CPU engine, the CUDA engine) and sessions with their KV
//! caches (`engine`), batched steps over many sessions, sampling and generation, the
//! tokenizer and chat template, the compile pipeline and plan files, and perplexity/KL
//! evaluation.
//!
//! Open a model, compile it to a W4KV4 plan in memory, and generate from it on the compiled
//! CPU engine: one session alone, then two sessions in one batched step.
//!
//! ```
//! use wkvc_runtime::compile::{self, CompileOptions};
//! use wkvc_runtime::{BatchItem, EngineKind, Model, RuntimeError, Sampler, StreamDecoder};
//! # fn main() -> Result<(), RuntimeError> {
//! # let dir = wkvc_tests::temp_dir("doc-runtime");
//! # let path = wkvc_tests::tiny_gguf(&dir);
//! let fp = Model::open(&path)?; // a GGUF file, a Hugging Face directory or a plan
//! // 4-bit weights and KV cache (text sampled from the model calibrates the smoothing)
//! let opts = CompileOptions { wgroup: 32, calib_tokens: Some(64), calib_window: 32, ..Default::default() };
//! let data = compile::calibration_data(&fp, &opts, &mut |_| {})?;
//! let c = compile::quantize(&fp, &opts, Some(&data), &mut |_| {})?;
//! let model = fp.with_module(c.module, None);
//!
//! // Send + Sync and cheap to clone: share it between threads
//! let engine = model.engine_kind(2, EngineKind::Cpu { act: c.cpu_act })?;
//! let tok = model.tokenizer()?;
//!
//! // one sequence: its own KV cache; greedy, streamed as text
//! let mut session = engine.session(64);
//! let (mut sampler, mut dec) = (Sampler::greedy(), StreamDecoder::new());
//! let mut next = sampler.sample(session.step(&tok.encode("hello", true)?)?);
//! for _ in 0..8 {
//!     print!("{}", dec.push(tok, next)?);
//!     next = sampler.sample(session.step(&[next])?);
//! }
//!
//! // two sequences advanced by one call: a prompt for one, a decode token for the other
//! let mut other = engine.session(64);
//! let prompt = tok.encode("world", true)?;
//! engine.step(&mut [BatchItem::new(&mut other, &prompt), BatchItem::new(&mut session, &[next])])?;
//! assert_eq!(other.logits().len(), model.config.vocab_size);
//! # Ok(())
//! # }
//! ```

pub mod compile;
pub mod cpu;
pub mod cuda;
pub mod engine;
mod error;
pub mod eval;
mod interp;
pub mod kvprobe;
mod model;
pub mod plan;
pub mod sample;
pub mod scheduler;
pub mod tokenizer;

pub use engine::{BatchItem, Engine, EngineKind, EngineOptions, Session};
pub use error::RuntimeError;
pub use model::{Model, ModelData};
pub use sample::Sampler;
pub use tokenizer::{Message, StreamDecoder, Tokenizer, render_chat_template};
pub use wkvc_codegen::native::CpuIsa;
pub use wkvc_ir::{Act, KvCache, RunMode};

/// A token that asks a long call to stop: clones share it; `cancel` from any thread (a Ctrl-C
/// handler, a server whose client went away), the call checks it between steps.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl CancelToken {
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The flag itself (for code below the runtime that takes an `AtomicBool`).
    pub fn flag(&self) -> &std::sync::atomic::AtomicBool {
        &self.0
    }
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
    session: &mut Session,
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
