//! `wkvc eval`: perplexity and KL divergence on a text, or the quality table of the standard
//! configurations.

use crate::args::{EvalArgs, Protocol, ScoreArg, TextOrigin};
use crate::common::{make_engine, note, open, spinner, threads};
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use wkvc_runtime::compile::{self, CompileOptions};
use wkvc_runtime::{Model, eval};

/// The standard configurations, compiled in memory and evaluated on the same windows.
fn quality_table(
    fp: &Model,
    ids: &[u32],
    ctx: usize,
    windows: Option<usize>,
    calib: Option<PathBuf>,
    threads: usize,
    (origin, json, scoring): (TextOrigin, bool, eval::Scoring),
) -> Result<()> {
    // (name, wbits, wgroup, kvbits, poq, smooth)
    let configs: [(&str, u32, i64, u32, bool, bool); 12] = [
        ("FP32", 16, 128, 16, false, false),
        ("W4 RTN g128", 4, 128, 16, false, false),
        ("W4 RTN per-channel", 4, -1, 16, false, false),
        ("KV4 without POQ", 16, 128, 4, false, false),
        ("KV4 with POQ", 16, 128, 4, true, false),
        ("KV4 POQ + smoothing init", 16, 128, 4, true, true),
        ("W4KV4 RTN without POQ", 4, 128, 4, false, false),
        ("W4KV4 RTN with POQ", 4, 128, 4, true, false),
        ("W4KV4 RTN POQ + smoothing init", 4, 128, 4, true, true),
        ("KV8 with POQ", 16, 128, 8, true, false),
        ("KV3 with POQ", 16, 128, 3, true, false),
        ("KV2 with POQ", 16, 128, 2, true, false),
    ];
    let base = CompileOptions {
        calib: calib.clone(),
        threads,
        ..Default::default()
    };
    let sp = spinner();
    let mut say = |s: &str| sp.set_message(s.to_string());
    let data = compile::calibration_data(fp, &base, &mut say)?;
    let fpe = fp.engine(threads)?;
    say("FP logits for the KL divergence");
    let nwin = windows.map_or(ids.len() / ctx.max(1), |w| w.min(ids.len() / ctx.max(1)));
    let fp_logits = eval::window_logits(&fpe, ids, ctx, nwin, scoring)?;
    let mut rows = Vec::new();
    for (name, wbits, wgroup, kvbits, poq, smooth) in configs {
        let opts = CompileOptions {
            wbits,
            wgroup,
            kvbits,
            past_only: poq,
            smooth,
            ..base.clone()
        };
        let c = compile::quantize(fp, &opts, Some(&data), &mut say)?;
        let m = fp.with_module(c.module, None);
        // the standard W4KV4 row also through the compiled CPU engine, both activation modes
        let mut kinds = vec![(name.to_string(), wkvc_runtime::EngineKind::Interp)];
        if name == "W4KV4 RTN POQ + smoothing init" {
            for (suffix, act) in [
                ("CPU engine, exact", wkvc_runtime::Act::F32),
                ("CPU engine, int8 activations", wkvc_runtime::Act::Int8),
            ] {
                kinds.push((
                    format!("{name} ({suffix})"),
                    wkvc_runtime::EngineKind::Cpu { act },
                ));
            }
        }
        for (name, kind) in kinds {
            let e = m.engine_kind(threads, kind)?;
            say(&format!("evaluating {name}"));
            let r = eval::evaluate_scored(
                &e,
                Some(eval::Reference::Logits(&fp_logits)),
                ids,
                ctx,
                windows,
                wkvc_runtime::RunMode::DecodeEquivalent,
                scoring,
                &mut |d, t| sp.set_message(format!("evaluating {name}: window {d}/{t}")),
            )?;
            note(
                &sp,
                format!(
                    "{name}: ppl {:.4}, KLD {:.5}, top-1 {:.2}%",
                    r.perplexity,
                    r.kld.unwrap_or(0.0),
                    100.0 * r.top1.unwrap_or(0.0)
                ),
            );
            rows.push(serde_json::json!({"config": name, "perplexity": r.perplexity, "kld": r.kld, "top1": r.top1, "weight_bytes": m.module.weights.total_storage_bytes(), "kv_bytes_per_token": e.kv_bytes_per_token(), "tokens": r.tokens, "windows": r.windows}));
        }
    }
    sp.finish_and_clear();
    let sampled = origin == TextOrigin::Sampled;
    if json {
        println!(
            "{}",
            serde_json::json!({"ctx": ctx, "scoring": scoring.name(), "calibration": data.source, "text_origin": if sampled { "sampled" } else { "corpus" }, "rows": rows})
        );
        return Ok(());
    }
    println!(
        "Calibration for the smoothing rows: {}. Protocol: decode-equivalent, ctx {ctx}, {}.",
        data.source,
        scoring_words(scoring)
    );
    let num = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    if sampled {
        println!(
            "The text was sampled from the FP model: KL divergence and top-1 agreement with the \
             FP model measure quality; perplexities are on the model's own samples (the FP \
             model's is the floor by construction: another model's log-perplexity exceeds it by \
             their KL divergence, in expectation) and are not comparable with figures on written \
             text.\n"
        );
        println!(
            "| config | KLD vs FP | top-1 agreement | perplexity on sampled text | weight bytes | \
             KV bytes/token |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {:.5} | {:.2}% | {:.3} | {} | {} |",
                r["config"].as_str().unwrap_or(""),
                num(r, "kld"),
                100.0 * num(r, "top1"),
                num(r, "perplexity"),
                r["weight_bytes"],
                r["kv_bytes_per_token"]
            );
        }
    } else {
        println!();
        println!(
            "| config | perplexity | KLD vs FP | top-1 agreement | weight bytes | KV bytes/token |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {:.4} | {:.5} | {:.2}% | {} | {} |",
                r["config"].as_str().unwrap_or(""),
                num(r, "perplexity"),
                num(r, "kld"),
                100.0 * num(r, "top1"),
                r["weight_bytes"],
                r["kv_bytes_per_token"]
            );
        }
    }
    Ok(())
}

pub fn run(a: EvalArgs) -> Result<()> {
    let EvalArgs {
        model,
        ppl,
        kld_vs,
        table,
        calib,
        text_origin,
        protocol,
        score,
        ctx,
        windows,
        json,
        eng,
    } = a;
    let mode = match protocol {
        Protocol::Decode => wkvc_runtime::RunMode::DecodeEquivalent,
        Protocol::Prefill => wkvc_runtime::RunMode::Prefill,
    };
    let text =
        std::fs::read_to_string(&ppl).with_context(|| format!("cannot read {}", ppl.display()))?;
    let m = open(&model)?;
    let tok = m.tokenizer()?;
    let (ids, scoring) = match score {
        ScoreArg::Wkvc => (tok.encode(&text, false)?, eval::Scoring::Windows),
        ScoreArg::Llama => {
            // llama-perplexity: the model's special-token policy for the whole text (a BOS
            // in front when it adds one), and that BOS at the start of every chunk
            let bos = if tok.spec.add_bos {
                tok.spec.bos_id
            } else {
                None
            };
            let ids = tok.encode(&text, true)?;
            if ids.len() < 2 * ctx {
                anyhow::bail!(
                    "{} is {} tokens: llama.cpp scoring needs at least 2 x --ctx = {} (as \
                     llama-perplexity does)",
                    ppl.display(),
                    ids.len(),
                    2 * ctx
                );
            }
            (ids, eval::Scoring::Llama { bos })
        }
    };
    let th = threads(eng.threads);
    if table {
        return quality_table(
            &m,
            &ids,
            ctx,
            windows,
            calib,
            th,
            (text_origin, json, scoring),
        );
    }
    let engine = make_engine(&m, &eng)?;
    let refm = kld_vs.as_ref().map(|p| open(p)).transpose()?;
    let refe = refm.as_ref().map(|r| r.engine(th)).transpose()?;
    let total = windows.map_or(ids.len() / ctx.max(1), |w| w.min(ids.len() / ctx.max(1)));
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} windows, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message("perplexity");
    let r = eval::evaluate_scored(
        &engine,
        refe.as_ref().map(eval::Reference::Engine),
        &ids,
        ctx,
        windows,
        mode,
        scoring,
        &mut |d, _| pb.set_position(d as u64),
    )?;
    pb.finish_and_clear();
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = serde_json::json!(model.display().to_string());
        v["text"] = serde_json::json!(ppl.display().to_string());
        println!("{v}");
    } else {
        let vs = kld_vs
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let ppl_line = format!(
            "perplexity {:.4}{} over {} tokens ({} windows of {}, {}, {}), {:.1}s, {:.1} \
             tokens/s",
            r.perplexity,
            if text_origin == TextOrigin::Sampled {
                " on text sampled from the model"
            } else {
                ""
            },
            r.tokens,
            r.windows,
            r.ctx,
            r.protocol,
            scoring_words(scoring),
            r.seconds,
            r.tokens_per_s
        );
        let kld_line = match (r.kld, r.top1) {
            (Some(k), Some(t)) => Some(format!(
                "KL divergence from {vs}: {k:.5}; top-1 agreement {:.2}%",
                100.0 * t
            )),
            _ => None,
        };
        let lines = if text_origin == TextOrigin::Sampled {
            [kld_line, Some(ppl_line)]
        } else {
            [Some(ppl_line), kld_line]
        };
        for l in lines.into_iter().flatten() {
            println!("{l}");
        }
    }
    Ok(())
}

/// How a report says which predictions it scored.
fn scoring_words(s: eval::Scoring) -> &'static str {
    match s {
        eval::Scoring::Windows => "every prediction scored",
        eval::Scoring::Llama { bos: Some(_) } => {
            "llama.cpp scoring: BOS first, second half of each window"
        }
        eval::Scoring::Llama { bos: None } => {
            "llama.cpp scoring: no BOS (the model adds none), second half of each window"
        }
    }
}
