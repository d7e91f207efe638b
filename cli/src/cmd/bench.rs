//! `wkvc bench`: prefill and decode speed (medians of timed runs), decode at a long context,
//! aggregate decode speed of batched sequences, peak memory.

use crate::args::BenchArgs;
use crate::common::{make_engine, median, open, threads};

fn median_or_zero(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}
use anyhow::{Result, bail};
use std::time::Instant;
use wkvc_runtime::{BatchItem, Engine, peak_rss_bytes};

/// Aggregate decode tokens/s of `n` sequences advanced together: each prefilled with a
/// prompt of its own (one batched step), then `gen` batched steps of one token each.
fn batch_decode(engine: &Engine, n: usize, gen_tokens: usize) -> Result<f64> {
    let vocab = engine.vocab_size();
    let prompt = 32;
    let mut sessions: Vec<_> = (0..n)
        .map(|_| engine.session(prompt + gen_tokens + 1))
        .collect();
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|s| {
            (0..prompt)
                .map(|i| ((1000 + s * 131 + i * 7919) % 20000 % vocab) as u32)
                .collect()
        })
        .collect();
    let mut items: Vec<BatchItem> = sessions
        .iter_mut()
        .zip(&prompts)
        .map(|(s, p)| BatchItem::new(s, p))
        .collect();
    engine.step(&mut items)?;
    drop(items);
    let mut next: Vec<[u32; 1]> = sessions
        .iter()
        .map(|s| [wkvc_runtime::sample::argmax(s.logits()) as u32])
        .collect();
    let t = Instant::now();
    for _ in 0..gen_tokens {
        let mut items: Vec<BatchItem> = sessions
            .iter_mut()
            .zip(&next)
            .map(|(s, t)| BatchItem::new(s, t))
            .collect();
        engine.step(&mut items)?;
        drop(items);
        for (s, t) in sessions.iter().zip(next.iter_mut()) {
            t[0] = wkvc_runtime::sample::argmax(s.logits()) as u32;
        }
    }
    Ok((n * gen_tokens) as f64 / t.elapsed().as_secs_f64())
}

/// This machine's copy bandwidth on `threads` threads: bytes read plus bytes written per
/// second while copying 256 MiB (far past the caches), the best of 3.
fn copy_bandwidth(threads: usize) -> f64 {
    const BYTES: usize = 256 << 20;
    let src = vec![1u8; BYTES];
    let mut dst = vec![0u8; BYTES];
    let part = BYTES.div_ceil(threads.max(1));
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        std::thread::scope(|sc| {
            for (d, s) in dst.chunks_mut(part).zip(src.chunks(part)) {
                sc.spawn(move || d.copy_from_slice(std::hint::black_box(s)));
            }
        });
        best = best.max(2.0 * BYTES as f64 / t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    best
}

pub fn run(a: BenchArgs) -> Result<()> {
    let BenchArgs {
        model,
        prompt,
        gen_tokens: ngen,
        runs,
        long_ctx,
        batch,
        eng,
        json,
    } = a;
    if prompt == 0 {
        bail!("--prompt must be at least 1");
    }
    let m = open(&model)?;
    let th = threads(eng.threads);
    let engine = make_engine(&m, &eng)?;
    let vocab = engine.vocab_size();
    // A fixed, deterministic prompt of ordinary token ids.
    let ids: Vec<u32> = (0..prompt)
        .map(|i| (1000 + (i * 7919) % 20000) as u32 % vocab as u32)
        .collect();
    let mut pre = Vec::new();
    let mut dec = Vec::new();
    let mut dec0 = Vec::new();
    let load_peak = peak_rss_bytes();
    let mut run_peak = None;
    for r in 0..runs.max(1) + 1 {
        if r == 1 && wkvc_runtime::reset_peak_rss() {
            run_peak = Some(());
        }
        let mut s = engine.session(prompt + ngen);
        if s.max_ctx() < prompt + ngen {
            bail!(
                "--prompt + --gen exceed the model's context of {}",
                s.max_ctx()
            );
        }
        let t0 = Instant::now();
        let mut id = wkvc_runtime::sample::argmax(s.step(&ids)?) as u32;
        let tp = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 0..ngen {
            id = wkvc_runtime::sample::argmax(s.step(&[id])?) as u32;
        }
        let td = t1.elapsed().as_secs_f64();
        drop(s);
        // decode from an empty cache, one token per step (what llama-bench's tg
        // measures)
        let mut s = engine.session(ngen.max(1));
        let mut id = ids[0];
        let t2 = Instant::now();
        for _ in 0..ngen {
            id = wkvc_runtime::sample::argmax(s.step(&[id])?) as u32;
        }
        let te = t2.elapsed().as_secs_f64();
        if r > 0 {
            pre.push(prompt as f64 / tp);
            if ngen > 0 {
                dec.push(ngen as f64 / td);
                dec0.push(ngen as f64 / te);
            }
        }
        tracing::info!(
            "run {r}: prefill {:.1} tok/s, decode {:.1} tok/s",
            prompt as f64 / tp,
            ngen as f64 / td
        );
    }
    // decode at a long context: fill the cache, then time --gen steps
    let mut long = serde_json::Value::Null;
    if long_ctx > 0 && ngen > 0 {
        let mut s = engine.session(long_ctx + ngen);
        if s.max_ctx() >= long_ctx + ngen {
            let fill: Vec<u32> = (0..long_ctx)
                .map(|i| (1000 + (i * 7919) % 20000) as u32 % vocab as u32)
                .collect();
            let mut id = 0;
            for c in fill.chunks(512) {
                id = wkvc_runtime::sample::argmax(s.step(c)?) as u32;
            }
            let t1 = Instant::now();
            for _ in 0..ngen {
                id = wkvc_runtime::sample::argmax(s.step(&[id])?) as u32;
            }
            long = serde_json::json!(ngen as f64 / t1.elapsed().as_secs_f64());
        }
    }
    let weight_bytes: usize = m
        .module
        .weights
        .iter()
        .map(|(_, w)| w.storage_bytes())
        .sum();
    let out = serde_json::json!({
        "model": model.display().to_string(),
        "engine": engine.describe(),
        "jit_ms": engine.cpu().map(|c| c.jit_ms),
        "cuda_launches_per_decode_step": engine.cuda().map(|c| c.launches(1)),
        "memory_plan_bytes": engine
            .cpu()
            .map(|c| c.memory_plan().total_at((long_ctx + ngen).max(prompt + ngen), th)),
        "long_ctx": (long_ctx > 0).then_some(long_ctx),
        "decode_at_long_ctx_tokens_per_s": long,
        "threads": th,
        "prompt_tokens": prompt,
        "gen_tokens": ngen,
        "runs": runs.max(1),
        "prefill_tokens_per_s": median(pre),
        "decode_tokens_per_s": median(dec),
        "decode_from_empty_tokens_per_s": median(dec0),
        "peak_rss_bytes": load_peak.max(peak_rss_bytes()),
        "peak_rss_running_bytes": run_peak.and_then(|_| peak_rss_bytes()),
        "model_file_bytes": m.source.file_bytes,
        "weight_bytes": weight_bytes,
    });
    let mut out = out;
    // decode against memory bandwidth: the bytes a step reads (memory plan) x steps/s, next to
    // this machine's copy bandwidth
    if let Some(plan) = engine.cpu().map(|c| c.memory_plan().clone())
        && ngen > 0
    {
        let copy = copy_bandwidth(th);
        let mut rows = Vec::new();
        for (name, tps, ctx) in [
            (
                "decode",
                out["decode_tokens_per_s"].as_f64(),
                prompt + ngen / 2,
            ),
            (
                "decode_from_empty",
                out["decode_from_empty_tokens_per_s"].as_f64(),
                ngen / 2,
            ),
            (
                "decode_at_long_ctx",
                out["decode_at_long_ctx_tokens_per_s"].as_f64(),
                long_ctx + ngen / 2,
            ),
        ] {
            let Some(tps) = tps else { continue };
            let bytes = plan.decode_bytes(ctx);
            let gbs = bytes as f64 * tps / 1e9;
            rows.push(serde_json::json!({
                "test": name,
                "mean_context": ctx,
                "bytes_per_token": bytes,
                "achieved_gb_per_s": gbs,
                "roofline_fraction": gbs / (copy / 1e9),
            }));
        }
        out["copy_bandwidth_gb_per_s"] = serde_json::json!(copy / 1e9);
        out["bandwidth"] = serde_json::json!(rows);
    }
    // batched decode: aggregate tokens/s of N sequences advanced together
    let mut batched = Vec::new();
    for &n in &batch {
        if n == 0 {
            bail!("--batch takes sequence counts of at least 1");
        }
        let agg = median(
            (0..runs.max(1))
                .map(|_| batch_decode(&engine, n, ngen.max(1)))
                .collect::<Result<Vec<_>>>()?,
        );
        batched.push(serde_json::json!({
            "batch": n,
            "aggregate_decode_tokens_per_s": agg,
            "per_sequence_tokens_per_s": agg.map(|a| a / n as f64),
        }));
    }
    if !batched.is_empty() {
        out["batched"] = serde_json::json!(batched);
    }
    if json {
        println!("{out}");
    } else {
        // only what was measured
        let mib = |k: &str| out[k].as_f64().map(|b| b / 1048576.0);
        let mut parts = vec![format!(
            "prefill {:.1} tokens/s ({prompt} tokens)",
            median_or_zero(&out["prefill_tokens_per_s"])
        )];
        if ngen > 0 {
            parts.push(format!(
                "decode {:.2} tokens/s ({ngen} tokens after the prompt; {:.2} from an \
                 empty cache)",
                median_or_zero(&out["decode_tokens_per_s"]),
                median_or_zero(&out["decode_from_empty_tokens_per_s"])
            ));
        }
        if let Some(l) = out["decode_at_long_ctx_tokens_per_s"].as_f64() {
            parts.push(format!("decode at {long_ctx} context {l:.2} tokens/s"));
        }
        parts.push(format!("{th} threads"));
        let mut mem = Vec::new();
        if let Some(r) = mib("peak_rss_running_bytes") {
            mem.push(format!("while running {r:.0} MiB"));
        }
        if let Some(p) = mib("memory_plan_bytes") {
            mem.push(format!("memory plan {p:.0} MiB"));
        }
        if let Some(p) = mib("peak_rss_bytes") {
            parts.push(if mem.is_empty() {
                format!("peak RSS {p:.0} MiB")
            } else {
                format!("peak RSS {p:.0} MiB ({})", mem.join(", "))
            });
        }
        parts.push(format!(
            "weights {:.0} MiB in memory",
            weight_bytes as f64 / 1048576.0
        ));
        println!("{}: {}", engine.describe(), parts.join(", "));
        if let Some(rows) = out["bandwidth"].as_array() {
            let copy = median_or_zero(&out["copy_bandwidth_gb_per_s"]);
            let txt: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "{} {:.1} MB/token {:.2} GB/s ({:.0}%)",
                        r["test"].as_str().unwrap_or("?").replace('_', " "),
                        median_or_zero(&r["bytes_per_token"]) / 1e6,
                        median_or_zero(&r["achieved_gb_per_s"]),
                        100.0 * median_or_zero(&r["roofline_fraction"])
                    )
                })
                .collect();
            println!(
                "  memory: {}; of the copy bandwidth {copy:.1} GB/s on {th} threads",
                txt.join(", ")
            );
        }
        for b in &batched {
            println!(
                "  batch of {:>2} sequences: aggregate decode {:.1} tokens/s ({:.1} per sequence)",
                b["batch"],
                median_or_zero(&b["aggregate_decode_tokens_per_s"]),
                median_or_zero(&b["per_sequence_tokens_per_s"])
            );
        }
    }
    Ok(())
}
