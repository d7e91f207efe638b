//! `wkvc compile`: calibration text, the WKVQuant pipeline, the lowered plan, the quality
//! check on held-out text, the plan file (written atomically).

use crate::args::{
    CompileArgs, KvRotateArg, Loss, Method, QualityCheckArg, QuantArgs, Schedule, Target,
};
use crate::common::{note, open, spinner, threads};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::time::Instant;
use wkvc_runtime::CancelToken;
use wkvc_runtime::compile::{self, CalibConfig, CalibLoss, CalibSchedule, CompileOptions};

/// The runtime's options from the command line's.
pub fn compile_options(
    q: &QuantArgs,
    calib: Option<PathBuf>,
    calib_tokens: Option<usize>,
    seed: u64,
    threads: usize,
) -> Result<CompileOptions> {
    let wkv = q.method == Method::Wkvquant;
    let window = q.calib_len.unwrap_or(if wkv { 256 } else { 512 });
    let calib_tokens = if wkv {
        if calib_tokens.is_some() {
            bail!("--method wkvquant takes --calib-samples and --calib-len, not --calib-tokens");
        }
        Some(q.calib_samples.max(1) * window)
    } else {
        calib_tokens
    };
    Ok(CompileOptions {
        wbits: q.wbits,
        wgroup: q.wgroup,
        kvbits: q.kvbits,
        past_only: !q.no_poq,
        smooth: !q.no_smooth,
        // set by `kv_rotate_block` once the model (its head dim) is known
        kv_rotate: 0,
        kv_group: q.kv_group.unwrap_or(0),
        kv_window: q.kv_window,
        kv_layer_bits: match &q.kv_bits_per_layer {
            Some(s) => compile::KvLayerBits::parse(s)?,
            None => compile::KvLayerBits::Uniform,
        },
        kv_scan_tokens: q.kv_scan_tokens,
        method: match q.method {
            Method::Rtn => compile::Method::Rtn,
            Method::Wkvquant => compile::Method::WkvQuant,
        },
        calib_cfg: CalibConfig {
            epochs: q.epochs,
            crr_k: q.crr_k,
            loss: match q.loss {
                Loss::Mae => CalibLoss::Mae,
                Loss::Mse => CalibLoss::Mse,
                Loss::LocalMseCrr => CalibLoss::LocalMseCrr,
            },
            lr_lwc: q.lr_lwc,
            lr_smooth: q.lr_smooth,
            learn_lwc: !q.no_learn_lwc,
            learn_smooth: !q.no_learn_smooth,
            schedule: match q.calib_schedule {
                Schedule::Joint => CalibSchedule::Joint,
                Schedule::WeightsFirst => CalibSchedule::WeightsFirst,
            },
            ..CalibConfig::default()
        },
        calib,
        calib_tokens,
        calib_window: window,
        threads,
        seed,
        cpu_act: q.cpu_act.into(),
        quality_check: compile::QualityCheck::Full,
        spill_dir: None,
        interp_limit: compile::INTERP_F32_BUDGET,
        f32_params: q.f32_params,
        cancel: CancelToken::new(),
    })
}

pub fn run(a: CompileArgs) -> Result<()> {
    let t0 = Instant::now();
    let cuda = a.target.contains(&Target::Cuda);
    if cuda {
        // before any long work: NVRTC must be there
        wkvc_codegen::nvrtc::locate()?;
    }
    wkvc_runtime::plan::check_destination(&a.output)?;
    let fp = open(&a.model)?;
    let mut opts = compile_options(&a.q, a.calib, a.calib_tokens, a.seed, threads(a.threads))?;
    opts.kv_rotate = kv_rotate_block(&a.q, fp.config.head_dim)?;
    opts.quality_check = match a.quality_check {
        QualityCheckArg::None => compile::QualityCheck::None,
        QualityCheckArg::Quick => compile::QualityCheck::Quick,
        QualityCheckArg::Full => compile::QualityCheck::Full,
    };
    opts.interp_limit = a.interp_limit_mib.saturating_mul(1 << 20);
    let gate = Gate::new(a.max_kld, a.max_ppl_ratio, opts.quality_check)?;
    // tensors the passes make go to a temp file beside the plan (removed however the
    // compile ends), not memory
    opts.spill_dir = Some(
        a.output
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."))
            .to_path_buf(),
    );
    opts.validate()?;
    if opts.wkvquant() {
        // First Ctrl-C: stop calibration cleanly (no plan is written); second: exit.
        let cancel = opts.cancel.clone();
        let _ = ctrlc::set_handler(move || {
            if cancel.is_cancelled() {
                std::process::exit(130);
            }
            cancel.cancel();
        });
    }
    let sp = spinner();
    let mut say = |s: &str| match s.strip_prefix("note: ") {
        Some(n) => note(&sp, n.to_string()),
        None => sp.set_message(s.to_string()),
    };
    let data = compile::calibration_data(&fp, &opts, &mut say)?;
    // a sampler engine made for data-free text is gone: its memory goes back to the OS
    wkvc_ir::weights::release_free_memory();
    if opts.calib.is_none() && !data.windows.is_empty() {
        note(
            &sp,
            format!("calibration: no --calib given, using text {}", data.source),
        );
    }
    let c = compile::quantize(&fp, &opts, Some(&data), &mut say)?;
    let qm = fp.with_module(c.module.clone(), None);
    let mut quality = serde_json::json!({ "check": "none" });
    if opts.quality_check != compile::QualityCheck::None {
        say("measuring quality on held-out text");
        // the compiled CPU engine, as the plan will run; the interpreter where the kernels
        // do not cover the graph
        let mut kind = wkvc_runtime::EngineKind::Cpu { act: opts.cpu_act };
        if let Err(e) = qm.lowered(opts.cpu_act) {
            note(&sp, format!("quality check on the interpreter: {e}"));
            kind = wkvc_runtime::EngineKind::Interp;
        }
        quality =
            compile::measure_quality_for(&fp, &qm, &data, opts.seed, opts.threads, kind, &mut say)?;
        quality["check"] = serde_json::json!(opts.quality_check.name());
        quality["held_out_text"] = serde_json::json!(if data.held_out_sampled {
            format!("sampled from {}", data.sampled_from)
        } else {
            "from the calibration file, after the calibration windows".to_string()
        });
        if let Some(g) = &gate {
            quality["gate"] = g.check(&quality)?;
        }
    }
    say("hashing the source model");
    let sha = if a.model.is_file() {
        wkvc_runtime::plan::file_sha256(&a.model)
            .with_context(|| format!("cannot read {}", a.model.display()))?
    } else {
        String::new()
    };
    let mut manifest = compile::manifest(&fp, &c, quality.clone(), sha);
    if cuda {
        say("CUDA kernels: CUDA C and PTX (NVRTC)");
        manifest.cuda = Some(compile::cuda_plan(&qm, 80)?);
    }
    let kv = manifest.lowered.as_ref().map(|l| l.memory.clone());
    if opts.cancel.is_cancelled() {
        bail!("interrupted (Ctrl-C): nothing was written");
    }
    say("writing the plan");
    let size = wkvc_runtime::plan::write(&a.output, &c.module, manifest)?;
    sp.finish_and_clear();
    println!(
        "wrote {} ({:.1} MiB) in {:.1}s",
        a.output.display(),
        size as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    );
    println!(
        "  quantization  W{} (group {}) {} past-only {} smoothing {} rotation {} method {}",
        opts.wbits,
        opts.wgroup,
        c.quant.kv_label(),
        c.quant.past_only_label(),
        c.quant.smooth,
        c.quant.rotation_label(),
        opts.method.name()
    );
    println!("  calibration   {}", c.quant.calibration);
    if let Some(info) = &c.quant.calibrate {
        let s = &info["settings"];
        let blocks = info["blocks"].as_array().cloned().unwrap_or_default();
        let first = blocks
            .first()
            .map(|b| b["first_loss"].as_f64().unwrap_or(f64::NAN));
        let last = blocks
            .last()
            .map(|b| b["last_loss"].as_f64().unwrap_or(f64::NAN));
        println!(
            "  wkvquant      {} samples x {} tokens, {} epochs, k {}, loss {}, lr {}/{}, {}: {} \
             steps in {:.0}s, peak RSS {:.0} MiB",
            s["samples"],
            s["tokens_per_sample"],
            s["epochs"],
            s["crr_k"],
            s["loss"].as_str().unwrap_or("?"),
            s["lr_lwc"],
            s["lr_smooth"],
            s["schedule"].as_str().unwrap_or("joint"),
            info["steps"],
            info["seconds"].as_f64().unwrap_or(0.0),
            info["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
        );
        if let (Some(a), Some(b)) = (first, last) {
            println!(
                "                block 1 first-epoch loss {a:.5}, last block final loss {b:.5}"
            );
        }
    }
    let mib = |b: usize| b as f64 / 1048576.0;
    println!(
        "  weights       {:.1} MiB -> {:.1} MiB (as stored)",
        mib(fp.module.weights.total_storage_bytes()),
        mib(c.module.weights.total_storage_bytes())
    );
    if let Some(mem) = kv {
        println!(
            "  KV cache      {} bytes/token on the compiled engines ({:.1} MiB at {} tokens)",
            mem.kv_bytes_per_token,
            mib(mem.kv_bytes),
            mem.max_ctx
        );
        if mem.kv_tail_bytes > 0 {
            println!(
                "                + {} bytes a session: the recent window's rows in f32",
                mem.kv_tail_bytes
            );
        }
    }
    let q = |k: &str| quality[k].as_f64().unwrap_or(f64::NAN);
    if opts.quality_check == compile::QualityCheck::None {
        println!("  quality       not checked (--quality-check none)");
    } else {
        println!(
            "  quality       KLD vs FP {:.4}, top-1 agreement {:.1}%, perplexity {:.3} (FP {:.3}){} \
             ({} held-out tokens {}, decode-equivalent, {}; {:.1}s)",
            q("kld_vs_fp"),
            100.0 * q("top1_agreement"),
            q("perplexity"),
            q("perplexity_fp"),
            if data.held_out_sampled {
                " on sampled text"
            } else {
                ""
            },
            quality["held_out_tokens"],
            quality["held_out_text"].as_str().unwrap_or(""),
            quality["engine"].as_str().unwrap_or(""),
            q("seconds")
        );
    }
    if let Some(g) = &gate {
        let bound = |v: Option<f64>| v.map_or("-".to_string(), |v| v.to_string());
        println!(
            "  quality gate  passed: KLD {:.5} <= {}, perplexity ratio {:.4} <= {}",
            q("kld_vs_fp"),
            bound(g.max_kld),
            q("perplexity") / q("perplexity_fp"),
            bound(g.max_ppl_ratio)
        );
    }
    println!(
        "  peak RSS      {:.0} MiB",
        wkvc_runtime::peak_rss_bytes().unwrap_or(0) as f64 / 1048576.0
    );
    Ok(())
}

/// `--kv-rotate` / `--kv-rotate-block` for a model of head dim `hd`: the Hadamard block, or 0.
pub fn kv_rotate_block(q: &QuantArgs, hd: usize) -> Result<usize> {
    match (q.kv_rotate, q.kv_rotate_block) {
        (KvRotateArg::None, None) => Ok(0),
        (KvRotateArg::None, Some(_)) => bail!("--kv-rotate-block needs --kv-rotate hadamard"),
        (KvRotateArg::Hadamard, b) => {
            let b = b.unwrap_or(hd);
            if b < 2 || !b.is_power_of_two() || !hd.is_multiple_of(b) {
                bail!(
                    "--kv-rotate-block {b}: the Hadamard block must be a power of two >= 2 \
                     dividing the model's head dim {hd}"
                );
            }
            Ok(b)
        }
    }
}

/// `--max-kld` / `--max-ppl-ratio`: bounds on the held-out check, checked before the plan is
/// written.
struct Gate {
    max_kld: Option<f64>,
    max_ppl_ratio: Option<f64>,
}

impl Gate {
    fn new(
        max_kld: Option<f64>,
        max_ppl_ratio: Option<f64>,
        check: compile::QualityCheck,
    ) -> Result<Option<Gate>> {
        if max_kld.is_none() && max_ppl_ratio.is_none() {
            return Ok(None);
        }
        if let Some(k) = max_kld
            && !(k.is_finite() && k >= 0.0)
        {
            bail!("--max-kld {k}: the bound must be a finite number >= 0 (nats a token)");
        }
        if let Some(r) = max_ppl_ratio
            && !(r.is_finite() && r > 0.0)
        {
            bail!("--max-ppl-ratio {r}: the bound must be a finite number > 0 (1.05: 5% worse)");
        }
        if check == compile::QualityCheck::None {
            bail!(
                "--max-kld and --max-ppl-ratio bound the held-out check: they need \
                 --quality-check quick or full, not none"
            );
        }
        Ok(Some(Gate {
            max_kld,
            max_ppl_ratio,
        }))
    }

    /// The gate's record for the plan when the figures are within bounds, else the error
    /// that stops the compile.
    fn check(&self, quality: &serde_json::Value) -> Result<serde_json::Value> {
        let f = |k: &str| quality[k].as_f64().unwrap_or(f64::NAN);
        let (kld, ppl, ppl_fp) = (f("kld_vs_fp"), f("perplexity"), f("perplexity_fp"));
        let ratio = ppl / ppl_fp;
        let tokens = &quality["held_out_tokens"];
        let mut failed = Vec::new();
        if let Some(m) = self.max_kld
            && (kld.is_nan() || kld > m)
        {
            failed.push(format!(
                "KL divergence from the FP model {kld:.5} > --max-kld {m}"
            ));
        }
        if let Some(m) = self.max_ppl_ratio
            && (ratio.is_nan() || ratio > m)
        {
            failed.push(format!(
                "perplexity {ppl:.4} / FP {ppl_fp:.4} = {ratio:.4} > --max-ppl-ratio {m}"
            ));
        }
        if !failed.is_empty() {
            bail!(
                "quality gate failed on {tokens} held-out tokens: {}; no plan was written",
                failed.join("; ")
            );
        }
        Ok(serde_json::json!({
            "max_kld": self.max_kld,
            "max_ppl_ratio": self.max_ppl_ratio,
            "kld_vs_fp": kld,
            "ppl_ratio": ratio,
            "passed": true,
        }))
    }
}
