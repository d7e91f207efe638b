//! `wkvc compile`: calibration text (a file, or text sampled from the FP model when none is
//! given), the WKVQuant pass pipeline, the memory plan and the quality check on held-out
//! text, ready to be written as a plan.

use crate::plan::{self, Manifest, QuantConfig};
use crate::{CancelToken, Model, RuntimeError, Sampler, eval};
use std::path::PathBuf;
use wkvc_ir::Module;
use wkvc_passes::calibrate::calibrate;
pub use wkvc_passes::calibrate::{CalibConfig, CalibLoss, CalibSchedule};
use wkvc_passes::quant::{
    KvQuant, KvRotate, KvSmooth, KvStats, KvWindow, Pack, PastOnly, WeightQuant,
};
use wkvc_passes::{Dce, PassManager, PassReport};

/// How weights are quantized.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Method {
    /// round to nearest (smoothing, where on, from calibration statistics)
    #[default]
    Rtn,
    /// learn weight clipping and K/V smoothing block by block with the cross-block
    /// reconstruction loss
    WkvQuant,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::WkvQuant => "wkvquant",
        }
    }
}

/// How much of the held-out quality check runs after compiling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QualityCheck {
    /// no check (and no held-out text)
    None,
    /// 128 held-out tokens (at most one calibration window)
    Quick,
    /// one calibration window of held-out tokens
    #[default]
    Full,
}

impl QualityCheck {
    pub fn name(self) -> &'static str {
        match self {
            QualityCheck::None => "none",
            QualityCheck::Quick => "quick",
            QualityCheck::Full => "full",
        }
    }

    /// Held-out tokens for a calibration window of `window` tokens.
    pub fn tokens(self, window: usize) -> usize {
        match self {
            QualityCheck::None => 0,
            QualityCheck::Quick => window.min(128),
            QualityCheck::Full => window,
        }
    }
}

/// Bits of each layer's K/V cache (`wkvc compile --kv-bits-per-layer`).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum KvLayerBits {
    /// every layer at `CompileOptions::kvbits`
    #[default]
    Uniform,
    /// one entry a layer: 2..8, or 16 for a full-precision cache
    List(Vec<u32>),
    /// an average of this many bits a cache element, spent by the sensitivity scan
    /// ([`kv_sensitivity`]): each layer gets `kvbits` or one bit less, the layers whose KL
    /// divergence grows least at the lower width getting it
    Budget(f64),
}

impl KvLayerBits {
    /// Parse `--kv-bits-per-layer`: `auto:B` (a budget of B bits on average) or a
    /// comma-separated list of bits, one a layer.
    pub fn parse(s: &str) -> Result<KvLayerBits, RuntimeError> {
        let s = s.trim();
        if let Some(b) = s.strip_prefix("auto:") {
            return b
                .trim()
                .parse::<f64>()
                .map(KvLayerBits::Budget)
                .map_err(|_| {
                    RuntimeError::Invalid(format!(
                        "--kv-bits-per-layer auto:B needs a number of bits, got `{b}`"
                    ))
                });
        }
        s.split(',')
            .map(|x| {
                x.trim().parse::<u32>().map_err(|_| {
                    RuntimeError::Invalid(format!(
                        "--kv-bits-per-layer takes auto:B or bits a layer separated by commas \
                         (4,4,3,...), got `{x}`"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(KvLayerBits::List)
    }
}

/// What the KV sensitivity scan measured: per layer, the mean KL divergence from the FP model
/// with only that layer's cache quantized, at the lower and at the higher width.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KvScan {
    /// [lower, higher] bits compared
    pub bits: [u32; 2],
    /// predictions the divergence is averaged over
    pub tokens: usize,
    /// per layer: [KLD at the lower width, KLD at the higher width]
    pub kld: Vec<[f64; 2]>,
    pub seconds: f64,
}

impl KvScan {
    /// How much layer `l`'s KL divergence grows from the higher to the lower width.
    pub fn cost(&self, l: usize) -> f64 {
        self.kld[l][0] - self.kld[l][1]
    }

    /// Spend an average of at most `budget` bits: the `ceil((hi - budget) * layers)` layers
    /// whose divergence grows least go down to the lower width (ties: the earlier layer), the
    /// others keep the higher one.
    pub fn allocate(&self, budget: f64) -> Vec<u32> {
        let [lo, hi] = self.bits;
        let n = self.kld.len();
        let down = ((hi as f64 - budget) * n as f64 - 1e-9)
            .ceil()
            .clamp(0.0, n as f64) as usize;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| self.cost(a).total_cmp(&self.cost(b)).then(a.cmp(&b)));
        let mut bits = vec![hi; n];
        for &l in &order[..down] {
            bits[l] = lo;
        }
        bits
    }
}

/// The KV sensitivity scan of `--kv-bits-per-layer auto:B`: for each layer and each width of
/// `bits`, the mean KL divergence from `fp` over every prediction of `ids` (decode-equivalent
/// protocol) when only that layer's cache is quantized in `base` (the FP weights with the K/V
/// rotation and smoothing the plan will have; `past_only` as the plan: its recent window, or
/// None without past-only attention). On the interpreter:
/// `2 x layers + 1` forward passes over `ids`.
pub fn kv_sensitivity(
    fp: &Model,
    base: &Module,
    ids: &[u32],
    (bits, group): ([u32; 2], usize),
    past_only: Option<usize>,
    threads: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<KvScan, RuntimeError> {
    let t0 = std::time::Instant::now();
    let run = |m: &Model| -> Result<Vec<f32>, RuntimeError> {
        let e = m.engine_kind(threads, crate::EngineKind::Interp)?;
        let mut s = e.session(ids.len());
        s.forward_mode(ids, wkvc_ir::RunMode::DecodeEquivalent)
    };
    let reference = run(fp)?;
    let vocab = fp.config.vocab_size;
    let layers = base
        .graph
        .nodes
        .iter()
        .filter(|n| n.op == wkvc_ir::OpKind::Attention)
        .count();
    let mut kld = vec![[0.0; 2]; layers];
    for l in 0..layers {
        for (i, &b) in bits.iter().enumerate() {
            progress(&format!(
                "KV sensitivity scan: layer {}/{layers} at {b} bits",
                l + 1
            ));
            let mut m = base.clone();
            let mut per = vec![16; layers];
            per[l] = b;
            let mut pm = PassManager::new().with(KvQuant {
                bits: b,
                f32_params: false,
                per_layer: Some(per),
                group,
            });
            if let Some(window) = past_only {
                pm = pm.with(PastOnly);
                if window > 1 {
                    pm = pm.with(KvWindow(window));
                }
            }
            pm.run(&mut m)?;
            let logits = run(&fp.with_module(m, None))?;
            let n = ids.len();
            kld[l][i] = (0..n)
                .map(|t| {
                    let r = t * vocab..(t + 1) * vocab;
                    eval::kl_divergence(&reference[r.clone()], &logits[r])
                })
                .sum::<f64>()
                / n as f64;
        }
    }
    Ok(KvScan {
        bits,
        tokens: ids.len(),
        kld,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The default of `CompileOptions::interp_limit`: models whose weights take more than this
/// in f32 are not run whole on the f32 interpreter during a compile.
pub const INTERP_F32_BUDGET: usize = 2 << 30;

#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// 2..8, or 16 for full-precision weights
    pub wbits: u32,
    /// input channels per group; -1 per output channel
    pub wgroup: i64,
    /// 2..8, or 16 for a full-precision KV cache
    pub kvbits: u32,
    pub past_only: bool,
    pub smooth: bool,
    /// K/V rotation (`wkvc_passes::quant::KvRotate`): the Hadamard block, a power of two
    /// dividing the head dim; 0 for none.
    pub kv_rotate: usize,
    /// Channels per (scale, zero) group of the cache: 0 for a kv head, else a multiple of 32
    /// dividing the head dim (`--kv-group`).
    pub kv_group: usize,
    /// Past-only attention's recent window (`--kv-window`): positions read in full precision,
    /// the reader's own included; 1 is past-only as the paper has it.
    pub kv_window: usize,
    /// Bits of each layer's cache: all `kvbits`, a list, or a budget spent by a sensitivity
    /// scan.
    pub kv_layer_bits: KvLayerBits,
    /// Tokens of calibration text the sensitivity scan measures KL divergence on.
    pub kv_scan_tokens: usize,
    /// RTN, or WKVQuant (learned clipping and smoothing, `calib_cfg`)
    pub method: Method,
    /// Settings of `--method wkvquant` (samples = calib_tokens / calib_window).
    pub calib_cfg: CalibConfig,
    pub calib: Option<PathBuf>,
    /// calibration tokens; None: 8192 from a file, 512 when sampling
    pub calib_tokens: Option<usize>,
    pub calib_window: usize,
    pub threads: usize,
    pub seed: u64,
    /// Activation mode of the CPU back end's quantized GEMMs the plan selects.
    pub cpu_act: wkvc_ir::Act,
    /// The held-out check after compiling (and so how much held-out text is needed).
    pub quality_check: QualityCheck,
    /// Bytes of f32 weights up to which the FP model is run whole on the interpreter to
    /// sample data-free text; a larger model samples from an RTN W4 copy on the compiled
    /// CPU engine, or (held-out text only) from the compiled model. (Statistics and the FP
    /// reference of the quality check always run block by block.)
    pub interp_limit: usize,
    /// Where tensors the passes make (packed codes, scales) are written as they are made,
    /// instead of memory (`WeightStore::spill_to`): the plan's folder in `wkvc compile`.
    pub spill_dir: Option<PathBuf>,
    /// Scales and zeros in f32 (the reference definition; weights stay unpacked).
    pub f32_params: bool,
    /// Stops calibration when cancelled (`quantize` then fails with
    /// `RuntimeError::Cancelled` and nothing is written).
    pub cancel: CancelToken,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            wbits: 4,
            wgroup: 128,
            kvbits: 4,
            past_only: true,
            smooth: true,
            kv_rotate: 0,
            kv_group: 0,
            kv_window: 1,
            kv_layer_bits: KvLayerBits::Uniform,
            kv_scan_tokens: 256,
            method: Method::Rtn,
            calib_cfg: CalibConfig::default(),
            calib: None,
            calib_tokens: None,
            calib_window: 512,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            seed: 0,
            // the int8 fast path: on the demo model its quality is within the noise of the
            // exact path (README, CPU back end)
            cpu_act: wkvc_ir::Act::Int8,
            quality_check: QualityCheck::Full,
            spill_dir: None,
            interp_limit: INTERP_F32_BUDGET,
            f32_params: false,
            cancel: CancelToken::default(),
        }
    }
}

impl CompileOptions {
    pub fn needs_calibration(&self) -> bool {
        self.smooth && self.kv_quantized()
            || self.wkvquant()
            || matches!(self.kv_layer_bits, KvLayerBits::Budget(_))
    }

    /// Is any layer's K/V cache quantized?
    pub fn kv_quantized(&self) -> bool {
        match &self.kv_layer_bits {
            KvLayerBits::List(l) => l.iter().any(|&b| b < 16),
            _ => self.kvbits < 16,
        }
    }

    pub fn wkvquant(&self) -> bool {
        self.method == Method::WkvQuant
    }

    /// K/V smoothing applies: a quantized cache with smoothing enabled.
    pub fn smoothing(&self) -> bool {
        self.smooth && self.kv_quantized()
    }

    pub fn validate(&self) -> Result<(), RuntimeError> {
        let ok_bits = |b: u32| (2..=8).contains(&b) || b == 16;
        if !ok_bits(self.wbits) {
            return Err(RuntimeError::Invalid(format!(
                "--wbits must be 2..8 or 16, got {}",
                self.wbits
            )));
        }
        if !ok_bits(self.kvbits) {
            return Err(RuntimeError::Invalid(format!(
                "--kvbits must be 2..8 or 16, got {}",
                self.kvbits
            )));
        }
        if self.kv_group != 0 && !self.kv_group.is_multiple_of(32) {
            return Err(RuntimeError::Invalid(format!(
                "--kv-group must be a multiple of 32 dividing the head dim, got {}",
                self.kv_group
            )));
        }
        if self.kv_window == 0 {
            return Err(RuntimeError::Invalid(
                "--kv-window must be at least 1 (the position's own K/V)".into(),
            ));
        }
        if self.kv_window > 1 && !(self.past_only && self.kv_quantized()) {
            return Err(RuntimeError::Invalid(format!(
                "--kv-window {} needs past-only attention on a quantized cache (drop --no-poq, \
                 or --kvbits below 16)",
                self.kv_window
            )));
        }
        if self.wgroup == 0 || self.wgroup < -1 {
            return Err(RuntimeError::Invalid(format!(
                "--wgroup must be positive or -1, got {}",
                self.wgroup
            )));
        }
        if self.wkvquant() {
            if self.wbits >= 16 && (!self.kv_quantized() || !self.smooth) {
                return Err(RuntimeError::Invalid(
                    "--method wkvquant learns weight clipping (needs --wbits < 16) or K/V \
                     smoothing (needs --kvbits < 16 and smoothing): nothing to learn"
                        .into(),
                ));
            }
            let c = &self.calib_cfg;
            if c.schedule == CalibSchedule::WeightsFirst
                && !(self.wbits < 16 && self.smoothing() && c.learn_lwc && c.learn_smooth)
            {
                return Err(RuntimeError::Invalid(
                    "--calib-schedule weights-first orders learning the clipping and the \
                     smoothing: it needs both (--wbits < 16, a quantized cache with smoothing, \
                     neither --no-learn-lwc nor --no-learn-smooth)"
                        .into(),
                ));
            }
            if c.epochs == 0 {
                return Err(RuntimeError::Invalid("--epochs must be at least 1".into()));
            }
            for (n, v) in [("--lr-lwc", c.lr_lwc), ("--lr-smooth", c.lr_smooth)] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(RuntimeError::Invalid(format!(
                        "{n} must be a positive number, got {v}"
                    )));
                }
            }
        }
        match &self.kv_layer_bits {
            KvLayerBits::Uniform => {}
            KvLayerBits::List(l) => {
                if let Some(b) = l.iter().find(|&&b| !ok_bits(b)) {
                    return Err(RuntimeError::Invalid(format!(
                        "--kv-bits-per-layer: each layer's bits must be 2..8 or 16, got {b}"
                    )));
                }
            }
            &KvLayerBits::Budget(b) => {
                if !(3..=8).contains(&self.kvbits) {
                    return Err(RuntimeError::Invalid(format!(
                        "--kv-bits-per-layer auto:B chooses between --kvbits and one bit less: \
                         --kvbits must be 3..8, got {}",
                        self.kvbits
                    )));
                }
                let (lo, hi) = (self.kvbits as f64 - 1.0, self.kvbits as f64);
                if !(b.is_finite() && (lo..=hi).contains(&b)) {
                    return Err(RuntimeError::Invalid(format!(
                        "--kv-bits-per-layer auto:B: the average B must be between {lo} and \
                         {hi} (--kvbits {} and one bit less), got {b}",
                        self.kvbits
                    )));
                }
                if self.kv_scan_tokens < 2 {
                    return Err(RuntimeError::Invalid(
                        "the KV sensitivity scan needs at least 2 tokens".into(),
                    ));
                }
            }
        }
        if self.kv_rotate != 0 && (self.kv_rotate < 2 || !self.kv_rotate.is_power_of_two()) {
            return Err(RuntimeError::Invalid(format!(
                "--kv-rotate-block must be a power of two >= 2 dividing the head dim, got {}",
                self.kv_rotate
            )));
        }
        if self.calib_window < 2 {
            return Err(RuntimeError::Invalid(
                "the calibration window must hold at least 2 tokens".into(),
            ));
        }
        Ok(())
    }
}

/// Token windows for calibration and for the held-out quality check, and a description of
/// where they came from.
pub struct CalibData {
    pub windows: Vec<Vec<u32>>,
    pub held_out: Vec<u32>,
    /// Was the held-out text sampled from the FP model (rather than taken from the file)?
    pub held_out_sampled: bool,
    /// What sampled text comes from: "the FP model", or a quantized copy of a model too
    /// large for the interpreter.
    pub sampled_from: &'static str,
    pub source: String,
    /// Held-out tokens still to sample, from the compiled model (`held_out` is empty): a
    /// model too large for the interpreter with no sampler made for calibration text.
    pub held_out_from_compiled: usize,
}

/// Sample `n` tokens from the FP model, starting from its BOS (or first) token (temperature 1,
/// `Sampler::sample_by_rank`: the same text for a seed as in earlier versions).
pub fn sample_text(
    model: &Model,
    n: usize,
    seed: u64,
    threads: usize,
) -> Result<Vec<u32>, RuntimeError> {
    let engine = model.engine(threads)?;
    sample_with(model, &engine, n, seed)
}

/// `sample_text` on a given engine (of `model` or of a quantized copy of it).
fn sample_with(
    model: &Model,
    engine: &crate::Engine,
    n: usize,
    seed: u64,
) -> Result<Vec<u32>, RuntimeError> {
    let tok = model.tokenizer()?;
    let start = tok.spec.bos_id.unwrap_or(0);
    let mut s = engine.session(n + 1);
    let mut sampler = Sampler::new(1.0, 1.0, seed);
    let mut out = vec![start];
    let mut logits = s.prefill(&[start])?;
    while out.len() < n {
        for &e in &tok.spec.eos_ids {
            if let Some(l) = logits.get_mut(e as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let id = sampler.sample_by_rank(&logits);
        out.push(id);
        if out.len() < n {
            logits = s.prefill(&[id])?;
        }
    }
    Ok(out)
}

/// Send the tensors passes make in `m` to a spill file in `dir` (when given).
fn spill_in(m: &mut Module, dir: Option<&std::path::Path>) -> Result<(), RuntimeError> {
    if let Some(dir) = dir {
        let spill = wkvc_ir::weights::Spill::create(dir).map_err(|e| {
            RuntimeError::Invalid(format!(
                "cannot create a temp file in {}: {e}",
                dir.display()
            ))
        })?;
        m.weights.spill_to(spill);
    }
    Ok(())
}

/// Do the model's weights in f32 fit in `limit` bytes (`CompileOptions::interp_limit`)?
pub fn fits_interpreter(model: &Model, limit: usize) -> bool {
    model.module.weights.total_params().saturating_mul(4) <= limit
}

/// The engine data-free text is sampled from, made on first use: the FP model on the
/// interpreter, or for a model too large for it, an RTN W4 (group 128) copy on the compiled
/// CPU engine (int8 activations).
struct TextSource<'a> {
    model: &'a Model,
    threads: usize,
    spill_dir: Option<&'a std::path::Path>,
    limit: usize,
    engine: Option<crate::Engine>,
}

impl TextSource<'_> {
    fn is_fp(&self) -> bool {
        fits_interpreter(self.model, self.limit)
    }

    fn what(&self) -> &'static str {
        if self.is_fp() {
            "the FP model"
        } else {
            "an RTN W4 copy of the model (too large for the f32 interpreter)"
        }
    }

    fn sample(
        &mut self,
        n: usize,
        seed: u64,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Vec<u32>, RuntimeError> {
        if self.engine.is_none() {
            self.engine = Some(if self.is_fp() {
                self.model.engine(self.threads)?
            } else {
                progress("quantizing a W4 copy of the model to sample text from");
                let mut m = self.model.module.clone();
                spill_in(&mut m, self.spill_dir)?;
                PassManager::new()
                    .with(WeightQuant {
                        bits: 4,
                        group: 128,
                        f32_params: false,
                    })
                    .with(Pack)
                    .with(Dce {
                        prune_weights: true,
                    })
                    .run(&mut m)?;
                m.weights
                    .spill_converted()
                    .map_err(|e| RuntimeError::Invalid(format!("cannot write a temp file: {e}")))?;
                self.model.with_module(m, None).engine_kind(
                    self.threads,
                    crate::EngineKind::Cpu {
                        act: wkvc_ir::Act::Int8,
                    },
                )?
            });
        }
        let e = self.engine.as_ref().ok_or(RuntimeError::Cancelled)?;
        sample_with(self.model, e, n, seed)
    }
}

/// Calibration windows from `opts.calib`, or sampled from the FP model (data-free; none when
/// the options need no calibration), and held-out text for `opts.quality_check`.
pub fn calibration_data(
    model: &Model,
    opts: &CompileOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<CalibData, RuntimeError> {
    let w = opts.calib_window;
    let mut src = TextSource {
        model,
        threads: opts.threads,
        spill_dir: opts.spill_dir.as_deref(),
        limit: opts.interp_limit,
        engine: None,
    };
    match &opts.calib {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                RuntimeError::Invalid(format!(
                    "cannot read calibration text {}: {e}",
                    path.display()
                ))
            })?;
            let ids = model.tokenizer()?.encode(&text, false)?;
            let want = opts.calib_tokens.unwrap_or(8192).max(w);
            let n = (want / w).min(ids.len() / w);
            if n == 0 {
                return Err(RuntimeError::Invalid(format!(
                    "calibration text {} has {} tokens: fewer than one window of {w}",
                    path.display(),
                    ids.len()
                )));
            }
            let windows = (0..n).map(|i| ids[i * w..(i + 1) * w].to_vec()).collect();
            let rest = &ids[n * w..];
            let held = opts.quality_check.tokens(w);
            let held_out_sampled = held > 0 && rest.len() < held;
            let held_out = if held_out_sampled {
                progress(&format!("sampling held-out text from {}", src.what()));
                src.sample(held, opts.seed ^ 0x5eed, progress)?
            } else {
                rest[..held].to_vec()
            };
            Ok(CalibData {
                windows,
                held_out,
                held_out_sampled,
                sampled_from: src.what(),
                source: format!("file {} ({} tokens)", path.display(), n * w),
                held_out_from_compiled: 0,
            })
        }
        None => {
            let want = opts.calib_tokens.unwrap_or(512);
            let win = w.min(want.max(2));
            let n = if opts.needs_calibration() {
                want.div_ceil(win).max(1)
            } else {
                0
            };
            let mut windows = Vec::new();
            for i in 0..n {
                progress(&format!(
                    "sampling calibration text from {} ({}/{n})",
                    src.what(),
                    i + 1
                ));
                windows.push(src.sample(win, opts.seed + i as u64, progress)?);
            }
            let held = opts.quality_check.tokens(win);
            let mut held_out_from_compiled = 0;
            let held_out = if held == 0 {
                Vec::new()
            } else if src.is_fp() || src.engine.is_some() {
                progress(&format!("sampling held-out text from {}", src.what()));
                src.sample(held, opts.seed ^ 0x5eed, progress)?
            } else {
                // no model to sample from yet: the compiled one will do (one engine, not two)
                held_out_from_compiled = held;
                Vec::new()
            };
            let sampled_from = if held_out_from_compiled > 0 {
                "the compiled model (the FP model is too large for the f32 interpreter)"
            } else {
                src.what()
            };
            Ok(CalibData {
                windows,
                held_out,
                held_out_sampled: true,
                sampled_from,
                held_out_from_compiled,
                source: if n == 0 {
                    "none".into()
                } else if src.is_fp() {
                    format!(
                        "sampled from the FP model (data-free, {} tokens, temperature 1, seed {})",
                        n * win,
                        opts.seed
                    )
                } else {
                    format!(
                        "sampled from {} (data-free, {} tokens, temperature 1, seed {})",
                        src.what(),
                        n * win,
                        opts.seed
                    )
                },
            })
        }
    }
}

/// An f32 setting as the shortest decimal that reads back to it (0.1, not 0.10000000149).
fn short(x: f32) -> f64 {
    format!("{x}").parse().unwrap_or(x as f64)
}

/// Parse `--loss`.
pub fn parse_loss(s: &str) -> Result<CalibLoss, RuntimeError> {
    CalibLoss::parse(s).ok_or_else(|| {
        RuntimeError::Invalid(format!(
            "--loss must be mae, mse or local-mse+crr, got `{s}`"
        ))
    })
}

/// The quantized module and what the passes did.
pub struct Compiled {
    pub module: Module,
    /// The CPU back end's activation mode recorded in the plan.
    pub cpu_act: wkvc_ir::Act,
    pub quant: QuantConfig,
    pub reports: Vec<PassReport>,
}

/// Run the pass pipeline on a copy of the model's module: weight_quant, kv_smooth (with
/// statistics from `calib`), kv_quant, past_only, pack, dce. `progress` gets status lines;
/// those starting with `note: ` are results worth keeping on screen (each calibrated block).
pub fn quantize(
    model: &Model,
    opts: &CompileOptions,
    calib: Option<&CalibData>,
    progress: &mut dyn FnMut(&str),
) -> Result<Compiled, RuntimeError> {
    opts.validate()?;
    let mut module = model.module.clone();
    spill_in(&mut module, opts.spill_dir.as_deref())?;
    let mut rotate_report = None;
    if opts.kv_rotate > 0 {
        // first: the statistics, smoothing and weight grids all see the rotated K/V
        progress("rotating K/V");
        rotate_report = Some(
            PassManager::new()
                .with(KvRotate {
                    block: opts.kv_rotate,
                })
                .run(&mut module)?,
        );
    }
    let stats: Option<KvStats> = if opts.smoothing() {
        let c = calib
            .ok_or_else(|| RuntimeError::Invalid("KV smoothing needs calibration text".into()))?;
        let mut p = |d: usize, t: usize| progress(&format!("smoothing statistics: block {d}/{t}"));
        let out = wkvc_passes::stream::run(&module, &c.windows, opts.threads, false, true, &mut p)?;
        out.kv_stats
    } else {
        None
    };
    let mut scan = None;
    let per_layer = match &opts.kv_layer_bits {
        KvLayerBits::Uniform => None,
        KvLayerBits::List(l) => Some(l.clone()),
        &KvLayerBits::Budget(budget) => {
            let c = calib.ok_or_else(|| {
                RuntimeError::Invalid("the KV sensitivity scan needs calibration text".into())
            })?;
            if !fits_interpreter(model, opts.interp_limit) {
                return Err(RuntimeError::Invalid(format!(
                    "--kv-bits-per-layer auto: the sensitivity scan runs the FP model on the \
                     f32 interpreter, and this model's weights take more than \
                     --interp-limit-mib {} in f32; give the bits a layer as a list instead",
                    opts.interp_limit >> 20
                )));
            }
            let ids: Vec<u32> = c.windows.iter().flatten().copied().collect();
            let ids = &ids[..ids.len().min(opts.kv_scan_tokens)];
            if ids.len() < 2 {
                return Err(RuntimeError::Invalid(
                    "the KV sensitivity scan needs at least 2 tokens of calibration text".into(),
                ));
            }
            // the cache as the plan will have it: rotated, smoothed from the statistics
            let mut base = module.clone();
            if opts.smoothing() {
                PassManager::new()
                    .with(KvSmooth {
                        stats: stats.clone(),
                    })
                    .run(&mut base)?;
            }
            let s = kv_sensitivity(
                model,
                &base,
                ids,
                ([opts.kvbits - 1, opts.kvbits], opts.kv_group),
                opts.past_only.then_some(opts.kv_window),
                opts.threads,
                progress,
            )?;
            let bits = s.allocate(budget);
            progress(&format!(
                "note: KV bits a layer (sensitivity scan on {} tokens, {:.0} s, average {:.3}): {}",
                s.tokens,
                s.seconds,
                bits.iter().sum::<u32>() as f64 / bits.len().max(1) as f64,
                bits.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ));
            scan = Some(s);
            Some(bits)
        }
    };
    let mut pm = PassManager::new().with(WeightQuant {
        bits: opts.wbits,
        group: opts.wgroup,
        f32_params: opts.f32_params,
    });
    if opts.smoothing() {
        pm = pm.with(KvSmooth { stats });
    }
    pm = pm.with(KvQuant {
        bits: opts.kvbits,
        f32_params: opts.f32_params,
        per_layer: per_layer.clone(),
        group: opts.kv_group,
    });
    if opts.past_only && opts.kv_quantized() {
        pm = pm.with(PastOnly);
        if opts.kv_window > 1 {
            pm = pm.with(KvWindow(opts.kv_window));
        }
    }
    progress("running passes");
    let mut reports = rotate_report.unwrap_or_default();
    reports.extend(pm.run(&mut module)?);
    let mut calib_info = None;
    if opts.wkvquant() {
        let c = calib.ok_or_else(|| {
            RuntimeError::Invalid("--method wkvquant needs calibration text".into())
        })?;
        let t0 = std::time::Instant::now();
        let mut cfg = opts.calib_cfg.clone();
        cfg.threads = opts.threads;
        cfg.seed = opts.seed;
        let mut last = std::time::Instant::now();
        let mut steps_done = 0usize;
        let mut show = |p: &wkvc_passes::calibrate::CalibProgress| {
            if let Some(b) = &p.done {
                let steps = p.epochs * p.steps.max(steps_done);
                let clip = b.weight_phase.map_or(String::new(), |[a, z]| {
                    format!(" (clipping, cache in full precision: {a:.5} -> {z:.5})")
                });
                progress(&format!(
                    "note: block {}/{}: {:.1}s ({:.2}s a step), loss {:.5} -> {:.5}{clip}, peak \
                     RSS {:.0} MiB",
                    p.layer + 1,
                    p.layers,
                    b.seconds,
                    b.seconds / steps.max(1) as f64,
                    b.first_loss,
                    b.last_loss,
                    crate::peak_rss_bytes().unwrap_or(0) as f64 / 1048576.0
                ));
                return;
            }
            steps_done = p.steps;
            if last.elapsed().as_millis() >= 200 || p.step == p.steps {
                last = std::time::Instant::now();
                progress(&format!(
                    "calibrating block {}/{} epoch {}/{} sample {}/{} loss {:.5}",
                    p.layer + 1,
                    p.layers,
                    p.epoch + 1,
                    p.epochs,
                    p.step,
                    p.steps,
                    p.loss
                ));
            }
        };
        let rep = calibrate(
            &model.module,
            &mut module,
            &c.windows,
            &cfg,
            &mut show,
            opts.cancel.flag(),
        )
        .map_err(|e| {
            if opts.cancel.is_cancelled() {
                RuntimeError::Cancelled
            } else {
                RuntimeError::Pass(e)
            }
        })?;
        reports.push(PassReport {
            pass: "calibrate".into(),
            seconds: t0.elapsed().as_secs_f64(),
            nodes_before: module.graph.nodes.len(),
            nodes_after: module.graph.nodes.len(),
            stats: [
                ("blocks".to_string(), rep.blocks.len() as f64),
                ("steps".to_string(), rep.steps as f64),
            ]
            .into_iter()
            .collect(),
        });
        calib_info = Some(serde_json::json!({
            "settings": {
                "samples": rep.samples,
                "tokens_per_sample": rep.tokens_per_sample,
                "epochs": cfg.epochs,
                "crr_k": cfg.crr_k,
                "loss": cfg.loss.name(),
                "lr_lwc": short(cfg.lr_lwc),
                "lr_smooth": short(cfg.lr_smooth),
                "weight_decay": short(cfg.weight_decay),
                "learn_lwc": cfg.learn_lwc,
                "learn_smooth": cfg.learn_smooth,
                "schedule": cfg.schedule.name(),
                "lwc_init": short(cfg.lwc_init),
                "seed": cfg.seed,
                "optimizer": "AdamW(0.9, 0.999, eps 1e-8)",
            },
            "seconds": rep.seconds,
            "steps": rep.steps,
            "peak_rss_bytes": crate::peak_rss_bytes(),
            "blocks": rep.blocks,
        }));
    }
    let mut pm = PassManager::new();
    if opts.wbits <= 4 {
        pm = pm.with(Pack);
    }
    pm = pm.with(Dce {
        prune_weights: true,
    });
    reports.extend(pm.run(&mut module)?);
    // FP tensors the plan keeps (embeddings, norms) as the f32 it stores, in the spill file:
    // read in place by the quality check's engine and the plan writer, not copied
    module.weights.spill_converted().map_err(|e| {
        RuntimeError::Invalid(format!("cannot write the FP tensors to a temp file: {e}"))
    })?;
    let calib_tokens = calib.map_or(0, |c| c.windows.iter().map(Vec::len).sum());
    Ok(Compiled {
        module,
        cpu_act: opts.cpu_act,
        quant: QuantConfig {
            wbits: opts.wbits,
            wgroup: opts.wgroup,
            kvbits: opts.kvbits,
            past_only: opts.past_only && opts.kv_quantized(),
            kv_window: if opts.past_only && opts.kv_quantized() {
                opts.kv_window
            } else {
                1
            },
            smooth: opts.smoothing(),
            method: opts.method.name().into(),
            calibration: if opts.needs_calibration() {
                calib.map_or("none".into(), |c| c.source.clone())
            } else {
                "none".into()
            },
            calib_tokens: if opts.needs_calibration() {
                calib_tokens
            } else {
                0
            },
            calibrate: calib_info,
            kv_rotate: opts.kv_rotate,
            kv_group: opts.kv_group,
            kv_bits_per_layer: per_layer,
            kv_sensitivity: scan,
        },
        reports,
    })
}

/// The lowered plan of a compiled model for the plan file (its activation mode's); None when
/// the graph has something the compiled back ends do not implement (the interpreter runs it).
pub fn lowered_record(q: &Model, act: wkvc_ir::Act) -> Option<plan::LoweredRecord> {
    match q.lowered(act) {
        Ok(l) => Some(plan::LoweredRecord {
            act,
            graph: wkvc_ir::text::print(&l.graph),
            memory: l.memory.clone(),
        }),
        Err(e) => {
            tracing::warn!("the plan will run on the interpreter: {e}");
            None
        }
    }
}

/// The CUDA back end's code of a compiled module: every distinct kernel of its lowered graph
/// as CUDA C and PTX for `compute_{ptx_arch}` (NVRTC, no GPU needed).
pub fn cuda_plan(q: &Model, ptx_arch: u32) -> Result<plan::CudaPlan, RuntimeError> {
    // the plan the CUDA engine runs (f32 activations)
    let l = q.lowered(wkvc_ir::Act::F32)?;
    let (maj, min) = wkvc_codegen::nvrtc::version()?;
    let mut kernels: Vec<plan::CudaModule> = Vec::new();
    for spec in l.kernels() {
        let name = spec.code_name();
        let k = wkvc_codegen::cuda::emit(spec)?;
        let sha256 = plan::sha256_hex(&k.source);
        if kernels.iter().any(|x| x.sha256 == sha256) {
            continue;
        }
        let ptx = wkvc_codegen::nvrtc::ptx(&k.source, &name, ptx_arch)?;
        kernels.push(plan::CudaModule {
            name,
            sha256,
            entries: k.entries,
            source: k.source,
            ptx,
        });
    }
    Ok(plan::CudaPlan {
        nvrtc: format!("{maj}.{min}"),
        ptx_arch,
        kernels,
    })
}

/// Perplexity and KLD of the compiled model (on the interpreter) against the FP model on
/// held-out tokens.
pub fn measure_quality(
    fp: &Model,
    q: &Model,
    held_out: &[u32],
    threads: usize,
) -> Result<serde_json::Value, RuntimeError> {
    measure_quality_on(
        fp,
        q,
        held_out,
        threads,
        crate::EngineKind::Interp,
        &mut |_| {},
    )
}

/// `measure_quality` with the compiled model on engine `kind`. The FP reference runs block by
/// block (`wkvc_passes::stream`: one block's weights in f32 at a time), so the check costs
/// little memory whatever the model's size; its cost is reported (`seconds`). With no
/// held-out tokens and `sample > 0`, that many are first sampled from the compiled model
/// (temperature 1, `seed`).
pub fn measure_quality_on(
    fp: &Model,
    q: &Model,
    held_out: &[u32],
    threads: usize,
    kind: crate::EngineKind,
    progress: &mut dyn FnMut(&str),
) -> Result<serde_json::Value, RuntimeError> {
    quality_sampling(fp, q, held_out, (0, 0), threads, kind, progress)
}

/// `measure_quality_on` for `calibration_data`'s output (`held_out_from_compiled` honoured).
pub fn measure_quality_for(
    fp: &Model,
    q: &Model,
    data: &CalibData,
    seed: u64,
    threads: usize,
    kind: crate::EngineKind,
    progress: &mut dyn FnMut(&str),
) -> Result<serde_json::Value, RuntimeError> {
    quality_sampling(
        fp,
        q,
        &data.held_out,
        (data.held_out_from_compiled, seed ^ 0x5eed),
        threads,
        kind,
        progress,
    )
}

fn quality_sampling(
    fp: &Model,
    q: &Model,
    held_out: &[u32],
    (sample, seed): (usize, u64),
    threads: usize,
    kind: crate::EngineKind,
    progress: &mut dyn FnMut(&str),
) -> Result<serde_json::Value, RuntimeError> {
    let t0 = std::time::Instant::now();
    // The compiled model first, its engine dropped before the FP reference runs: the two
    // never hold memory at once.
    let (held_out, q_logits) = {
        let qe = q.engine_kind(threads, kind)?;
        let held: Vec<u32> = if held_out.is_empty() && sample > 0 {
            progress("sampling held-out text from the compiled model");
            sample_with(q, &qe, sample, seed)?
        } else {
            held_out.to_vec()
        };
        if held.len() < 2 {
            return Err(RuntimeError::Invalid(format!(
                "the quality check needs at least 2 held-out tokens, got {}",
                held.len()
            )));
        }
        progress("quality check: the compiled model");
        let l = eval::window_logits(&qe, &held, held.len(), 1, eval::Scoring::Windows)?;
        (held, l)
    };
    wkvc_ir::weights::release_free_memory();
    let ctx = held_out.len();
    let mut p =
        |d: usize, t: usize| progress(&format!("quality check: FP reference, block {d}/{t}"));
    let fp_logits = wkvc_passes::stream::run(
        &fp.module,
        std::slice::from_ref(&held_out),
        threads,
        true,
        false,
        &mut p,
    )?
    .logits;
    let v = fp.config.vocab_size;
    let (fl, ql) = match (fp_logits.first(), q_logits.first()) {
        (Some(a), Some(b)) if a.len() == ctx * v && b.len() == ctx * v => (a, b),
        _ => return Err(RuntimeError::Invalid("quality check: no logits".into())),
    };
    let (mut fp_nll, mut q_nll, mut kl, mut same) = (0f64, 0f64, 0f64, 0usize);
    for t in 0..ctx - 1 {
        let (fr, qr) = (&fl[t * v..(t + 1) * v], &ql[t * v..(t + 1) * v]);
        let next = held_out[t + 1] as usize;
        fp_nll += eval::nll(fr, next);
        q_nll += eval::nll(qr, next);
        kl += eval::kl_divergence(fr, qr);
        if crate::sample::argmax(fr) == crate::sample::argmax(qr) {
            same += 1;
        }
    }
    let n = (ctx - 1) as f64;
    let engine = match kind {
        crate::EngineKind::Interp => "interpreter".to_string(),
        crate::EngineKind::Cpu { act } => format!("cpu ({} activations)", act.name()),
        other => format!("{other:?}"),
    };
    Ok(serde_json::json!({
        "held_out_tokens": ctx,
        "protocol": "decode-equivalent",
        "engine": engine,
        "perplexity_fp": (fp_nll / n).exp(),
        "perplexity": (q_nll / n).exp(),
        "kld_vs_fp": kl / n,
        "top1_agreement": same as f64 / n,
        "seconds": t0.elapsed().as_secs_f64(),
    }))
}

/// Drops what describes the compile run rather than its result (`seconds`, `peak_rss_bytes`,
/// at any depth): they are printed and kept in `Compiled`, not written to the plan, so that
/// the same command (model, options, seed, thread count) writes the same plan file, byte for
/// byte, run after run.
fn without_run_measurements(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("seconds");
            m.remove("peak_rss_bytes");
            m.values_mut().for_each(without_run_measurements);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(without_run_measurements),
        _ => {}
    }
}

/// The manifest of a compiled model (tensors and graph are filled in by `plan::write`). It
/// records no timings or memory figures of the compile (see `without_run_measurements`).
pub fn manifest(
    fp: &Model,
    c: &Compiled,
    quality: serde_json::Value,
    source_sha256: String,
) -> Manifest {
    let mut quality = quality;
    without_run_measurements(&mut quality);
    let mut quant = c.quant.clone();
    if let Some(info) = quant.calibrate.as_mut() {
        without_run_measurements(info);
    }
    let mut passes = serde_json::to_value(&c.reports).unwrap_or_default();
    without_run_measurements(&mut passes);
    Manifest {
        format: plan::FORMAT.into(),
        version: plan::VERSION,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        config: fp.config.clone(),
        quant,
        graph: String::new(),
        tokenizer: fp.tokenizer_spec.clone(),
        source: fp.source.clone(),
        source_sha256,
        quality,
        lowered: lowered_record(&fp.with_module(c.module.clone(), None), c.cpu_act),
        cuda: None,
        passes,
        tensors: Default::default(),
    }
}
