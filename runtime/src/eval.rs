//! Perplexity and KL divergence: consecutive non-overlapping windows of `ctx` tokens, each an
//! independent sequence; tokens 1..ctx-1 of each window are scored ([`Scoring::Windows`]), or
//! the second half of each, as llama.cpp's `llama-perplexity` does ([`Scoring::Llama`]). By
//! default the model runs
//! the decode-equivalent protocol (DESIGN.md): every position attends to quantized K/V of all
//! earlier positions and (with past-only) FP K/V of itself, exactly as token-by-token decoding.

use crate::{Engine, RuntimeError};
use wkvc_ir::RunMode;

#[derive(Clone, Debug, serde::Serialize)]
pub struct PplReport {
    pub perplexity: f64,
    pub mean_nll: f64,
    /// Mean KL(P_ref || P_model) over the scored positions, when a reference model was given.
    pub kld: Option<f64>,
    /// Fraction of the scored positions whose most likely next token is the reference's,
    /// when a reference model was given.
    pub top1: Option<f64>,
    /// Predictions scored.
    pub tokens: usize,
    pub windows: usize,
    pub ctx: usize,
    pub seconds: f64,
    /// Tokens run through the model per second.
    pub tokens_per_s: f64,
    pub protocol: String,
    /// `wkvc` (every prediction of a window) or `llama` (llama-perplexity's second halves).
    pub scoring: String,
    /// Whether each window began with the model's BOS token (llama scoring).
    pub bos: bool,
}

/// Which predictions of a window are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// Every prediction of the window (tokens 1..ctx-1), the text as tokenized (the protocol
    /// of the reference figures in `../shared/reference`).
    Windows,
    /// llama.cpp's `llama-perplexity`: the text tokenized with the model's special-token
    /// policy (a BOS in front when the model adds one), cut into chunks of `ctx`; a chunk's
    /// first token is replaced by `bos` (when the model adds one) and only the predictions
    /// of its second half are scored (positions ctx/2 .. ctx-2, `ctx - 1 - ctx/2` a chunk),
    /// so that every scored token has at least ctx/2 tokens of context.
    Llama { bos: Option<u32> },
}

impl Scoring {
    /// The first scored position of a window.
    pub fn first(self, ctx: usize) -> usize {
        match self {
            Scoring::Windows => 0,
            Scoring::Llama { .. } => ctx / 2,
        }
    }

    /// Window `w` of `ids` as the model sees it.
    pub fn window(self, ids: &[u32], w: usize, ctx: usize) -> Vec<u32> {
        let mut win = ids[w * ctx..(w + 1) * ctx].to_vec();
        if let Scoring::Llama { bos: Some(b) } = self {
            win[0] = b;
        }
        win
    }

    pub fn name(self) -> &'static str {
        match self {
            Scoring::Windows => "wkvc",
            Scoring::Llama { .. } => "llama",
        }
    }
}

/// -log softmax(logits)[target], in f64.
pub fn nll(logits: &[f32], target: usize) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let s: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
    m + s.ln() - logits[target] as f64
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + x.iter().map(|&l| (l as f64 - m).exp()).sum::<f64>().ln();
    x.iter().map(|&l| l as f64 - lse).collect()
}

/// KL(P || Q) of two next-token distributions given as logits.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let lp = log_softmax(p_logits);
    let lq = log_softmax(q_logits);
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

/// Where KL divergence takes its reference distributions from.
pub enum Reference<'a> {
    /// Run this (FP) engine on each window.
    Engine(&'a Engine),
    /// Logits already computed, one `[ctx, vocab]` vector per window.
    Logits(&'a [Vec<f32>]),
}

/// Logits of the first `windows` windows (for `Reference::Logits`).
pub fn window_logits(
    engine: &Engine,
    ids: &[u32],
    ctx: usize,
    windows: usize,
    scoring: Scoring,
) -> Result<Vec<Vec<f32>>, RuntimeError> {
    let mut s = engine.session(ctx);
    (0..windows.min(ids.len() / ctx))
        .map(|w| {
            s.reset();
            s.forward_mode(&scoring.window(ids, w, ctx), RunMode::DecodeEquivalent)
        })
        .collect()
}

/// Score tokens 1..ctx-1 of each window of `ctx` tokens of `ids` (at most `max_windows`
/// windows); with `reference`, also the mean KL divergence from its distributions.
pub fn evaluate(
    engine: &Engine,
    reference: Option<&Engine>,
    ids: &[u32],
    ctx: usize,
    max_windows: Option<usize>,
    mode: RunMode,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PplReport, RuntimeError> {
    evaluate_with(
        engine,
        reference.map(Reference::Engine),
        ids,
        ctx,
        max_windows,
        mode,
        progress,
    )
}

/// `evaluate` with any kind of reference.
pub fn evaluate_with(
    engine: &Engine,
    reference: Option<Reference<'_>>,
    ids: &[u32],
    ctx: usize,
    max_windows: Option<usize>,
    mode: RunMode,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PplReport, RuntimeError> {
    evaluate_scored(
        engine,
        reference,
        ids,
        ctx,
        max_windows,
        mode,
        Scoring::Windows,
        progress,
    )
}

/// `evaluate_with` under any [`Scoring`].
#[allow(clippy::too_many_arguments)]
pub fn evaluate_scored(
    engine: &Engine,
    reference: Option<Reference<'_>>,
    ids: &[u32],
    ctx: usize,
    max_windows: Option<usize>,
    mode: RunMode,
    scoring: Scoring,
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
    if let Some(Reference::Engine(r)) = &reference
        && r.vocab_size() != vocab
    {
        return Err(RuntimeError::Invalid(format!(
            "the reference model has {} tokens, this model {vocab}: not the same vocabulary",
            r.vocab_size()
        )));
    }
    let t0 = std::time::Instant::now();
    let (mut sum, mut kl, mut count, mut same) = (0f64, 0f64, 0usize, 0usize);
    let mut session = engine.session(ctx);
    if session.max_ctx() < ctx {
        return Err(RuntimeError::Invalid(format!(
            "--ctx {ctx} exceeds the model's maximum context of {}",
            session.max_ctx()
        )));
    }
    let mut rsession = match &reference {
        Some(Reference::Engine(r)) => Some(r.session(ctx)),
        _ => None,
    };
    let first = scoring.first(ctx);
    for w in 0..windows {
        let win = &scoring.window(ids, w, ctx)[..];
        session.reset();
        let logits = session.forward_mode(win, mode)?;
        let rlogits = match (rsession.as_mut(), &reference) {
            (Some(rs), _) => {
                rs.reset();
                Some(rs.forward_mode(win, RunMode::DecodeEquivalent)?)
            }
            (None, Some(Reference::Logits(l))) => Some(
                l.get(w)
                    .filter(|v| v.len() == ctx * vocab)
                    .cloned()
                    .ok_or_else(|| {
                        RuntimeError::Invalid(format!("no reference logits for window {w}"))
                    })?,
            ),
            _ => None,
        };
        for t in first..ctx - 1 {
            let row = &logits[t * vocab..(t + 1) * vocab];
            sum += nll(row, win[t + 1] as usize);
            if let Some(r) = &rlogits {
                let rrow = &r[t * vocab..(t + 1) * vocab];
                kl += kl_divergence(rrow, row);
                if crate::sample::argmax(rrow) == crate::sample::argmax(row) {
                    same += 1;
                }
            }
            count += 1;
        }
        progress(w + 1, windows);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mean = sum / count as f64;
    Ok(PplReport {
        perplexity: mean.exp(),
        mean_nll: mean,
        kld: reference.as_ref().map(|_| kl / count as f64),
        top1: reference.as_ref().map(|_| same as f64 / count as f64),
        tokens: count,
        windows,
        ctx,
        seconds,
        tokens_per_s: (windows * ctx) as f64 / seconds.max(1e-9),
        protocol: match mode {
            RunMode::DecodeEquivalent => "decode-equivalent".into(),
            RunMode::Prefill => "prefill".into(),
        },
        scoring: scoring.name().into(),
        bos: matches!(scoring, Scoring::Llama { bos: Some(_) }),
    })
}

/// Perplexity with the decode-equivalent protocol and no reference.
pub fn perplexity(
    engine: &Engine,
    ids: &[u32],
    ctx: usize,
    max_windows: Option<usize>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PplReport, RuntimeError> {
    evaluate(
        engine,
        None,
        ids,
        ctx,
        max_windows,
        RunMode::DecodeEquivalent,
        progress,
    )
}
