//! Perplexity evaluation: consecutive non-overlapping windows, each an independent sequence.

use crate::{Engine, RuntimeError};

#[derive(Clone, Debug, serde::Serialize)]
pub struct PplReport {
    pub perplexity: f64,
    pub mean_nll: f64,
    /// Predictions scored.
    pub tokens: usize,
    pub windows: usize,
    pub ctx: usize,
    pub seconds: f64,
    /// Tokens run through the model per second.
    pub tokens_per_s: f64,
}

/// -log softmax(logits)[target], in f64.
pub fn nll(logits: &[f32], target: usize) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let s: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
    m + s.ln() - logits[target] as f64
}

/// Score tokens 1..ctx-1 of each window of `ctx` tokens of `ids` (at most `max_windows`
/// windows); `progress(done, total)` is called after each window.
pub fn perplexity(
    engine: &Engine<'_>,
    ids: &[u32],
    ctx: usize,
    max_windows: Option<usize>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PplReport, RuntimeError> {
    if ctx < 2 {
        return Err(RuntimeError::Invalid(format!(
            "--ctx must be at least 2, got {ctx}"
        )));
    }
    let avail = ids.len() / ctx;
    let windows = max_windows.map_or(avail, |w| w.min(avail));
    if windows == 0 {
        return Err(RuntimeError::Invalid(format!(
            "the text has {} tokens: fewer than one window of {ctx}",
            ids.len()
        )));
    }
    let vocab = engine.vocab_size();
    let t0 = std::time::Instant::now();
    let mut sum = 0f64;
    let mut count = 0usize;
    let mut session = engine.session(ctx);
    if session.max_ctx() < ctx {
        return Err(RuntimeError::Invalid(format!(
            "--ctx {ctx} exceeds the model's maximum context of {}",
            session.max_ctx()
        )));
    }
    for w in 0..windows {
        let win = &ids[w * ctx..(w + 1) * ctx];
        session.reset();
        let logits = session.forward(win)?;
        for t in 0..ctx - 1 {
            sum += nll(&logits[t * vocab..(t + 1) * vocab], win[t + 1] as usize);
            count += 1;
        }
        progress(w + 1, windows);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mean = sum / count as f64;
    Ok(PplReport {
        perplexity: mean.exp(),
        mean_nll: mean,
        tokens: count,
        windows,
        ctx,
        seconds,
        tokens_per_s: (windows * ctx) as f64 / seconds.max(1e-9),
    })
}
