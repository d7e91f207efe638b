//! `wkvc inspect`: architecture, sizes, the plan's record, the memory plan, the graph.

use crate::args::InspectArgs;
use crate::common::{open, threads as workers};
use anyhow::Result;
use wkvc_passes::lower::CHUNK;
use wkvc_runtime::Act;

pub fn run(a: InspectArgs) -> Result<()> {
    let InspectArgs {
        model,
        graph,
        json,
        memory,
        ctx,
        cpu_act,
        plots,
        plot_layers,
        plot_text,
        plot_tokens,
        threads,
    } = a;
    let m = open(&model)?;
    if let Some(dir) = plots {
        return write_plots(
            &m,
            &dir,
            &plot_layers,
            plot_text.as_deref(),
            plot_tokens,
            threads,
        );
    }
    if memory {
        // the plan's record unless another context or activation mode is asked for
        let act = cpu_act.map_or_else(|| m.plan_act(), Act::from);
        let stored = m
            .plan
            .as_ref()
            .and_then(|p| p.lowered.as_ref())
            .filter(|l| ctx.is_none() && l.act == act);
        let (mp, kernels, whence) = match stored {
            Some(l) => {
                let lp = m.lowered(act)?;
                (l.memory.clone(), lp.steps.len(), "stored in the plan")
            }
            None => {
                let lp = m.lowered(act)?;
                let ctx = ctx.unwrap_or(m.config.max_position_embeddings);
                let size = |p: &str| m.module.weights.get(p).map(|w| w.size()).unwrap_or((0, 0));
                let mp = wkvc_passes::lower::memplan(&lp.graph, CHUNK, ctx, &size)?;
                (mp, lp.steps.len(), "computed now")
            }
        };
        let ctx = mp.max_ctx;
        if json {
            println!("{}", serde_json::to_string(&mp)?);
        } else {
            let mib = |b: usize| b as f64 / 1048576.0;
            println!(
                "CPU memory plan ({whence}, {} activations): {kernels} kernels",
                act.name()
            );
            println!(
                "weights        {:>12} bytes ({:.1} MiB)",
                mp.weights_bytes,
                mib(mp.weights_bytes)
            );
            println!(
                "engine copies  {:>12} bytes ({:.1} MiB: f32 scale/zero, int8 head)",
                mp.derived_bytes,
                mib(mp.derived_bytes)
            );
            println!(
                "KV cache       {:>12} bytes per token",
                mp.kv_bytes_per_token
            );
            println!(
                "KV cache       {:>12} bytes at {} tokens ({:.1} MiB)",
                mp.kv_bytes,
                ctx,
                mib(mp.kv_bytes)
            );
            if mp.kv_tail_bytes > 0 {
                println!(
                    "KV cache       {:>12} bytes a session (the recent window's rows in f32)",
                    mp.kv_tail_bytes
                );
            }
            println!(
                "arena          {:>12} bytes ({} buffers, chunk {} rows)",
                mp.arena_bytes,
                mp.buffers.len(),
                mp.chunk
            );
            println!(
                "scratch        {:>12} bytes (one worker; {} more per worker)",
                mp.scratch_bytes, mp.thread_scratch_bytes
            );
            println!(
                "total          {:>12} bytes ({:.1} MiB, one worker)",
                mp.total_bytes,
                mib(mp.total_bytes)
            );
        }
        return Ok(());
    }
    let c = &m.config;
    let mut groups: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for (name, w) in m.module.weights.iter() {
        let g = if name.contains("embed_tokens") {
            "embedding"
        } else if name.starts_with("lm_head") {
            "lm_head"
        } else if name.contains("norm") {
            "norms"
        } else if name.contains("self_attn") {
            "attention"
        } else if name.contains("mlp") {
            "mlp"
        } else {
            "other"
        };
        let e = groups.entry(g).or_default();
        e.0 += w.numel();
        e.1 += w.storage_bytes();
    }
    let params = m.module.weights.total_params();
    if json {
        let v = serde_json::json!({
            "source": m.source, "config": c, "parameters": params,
            "plan": m.plan.as_ref().map(|p| serde_json::json!({"quant": p.quant, "memory": p.lowered.as_ref().map(|l| &l.memory), "quality": p.quality, "passes": p.passes})),
            "groups": groups.iter().map(|(k, (n, b))| (k.to_string(), serde_json::json!({"parameters": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
            "ops": m.module.graph.op_histogram(),
        });
        println!("{v}");
    } else {
        println!(
            "model        {} ({} from {})",
            m.source.name,
            m.source.format,
            m.source.path.display()
        );
        println!(
            "architecture {} : {} layers, hidden {}, ffn {}, vocab {}",
            c.arch, c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
        );
        println!(
            "attention    {} heads, {} kv heads, head dim {}, rope theta {}, scaling {:?}",
            c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta, c.rope_scaling
        );
        println!(
            "norm eps     {}, tied lm_head {}, qkv bias {}, max context {}",
            c.rms_norm_eps, c.tie_word_embeddings, c.qkv_bias, c.max_position_embeddings
        );
        println!("parameters   {params} ({:.1} M)", params as f64 / 1e6);
        println!("file bytes   {}", m.source.file_bytes);
        println!("by group     (parameters, bytes in memory)");
        for (g, (n, b)) in &groups {
            println!("  {g:<10} {n:>12} {b:>14}");
        }
        let h = m.module.graph.op_histogram();
        println!(
            "graph        {} nodes: {}",
            m.module.graph.nodes.len(),
            h.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(p) = &m.plan {
            let q = &p.quant;
            println!(
                "plan         format {} v{}, wkvc {}",
                p.format, p.version, p.tool_version
            );
            println!(
                "quantization W{} (group {}) {} past-only {} smoothing {} rotation {} method {}",
                q.wbits,
                q.wgroup,
                q.kv_label(),
                q.past_only_label(),
                q.smooth,
                q.rotation_label(),
                q.method
            );
            if let Some(s) = &q.kv_sensitivity {
                println!(
                    "kv scan      KL divergence from FP with one layer's cache at {}/{} bits \
                     ({} tokens):",
                    s.bits[0], s.bits[1], s.tokens
                );
                for (l, k) in s.kld.iter().enumerate() {
                    println!("  layer {l:>3}  {:.3e}  {:.3e}", k[0], k[1]);
                }
            }
            println!("calibration  {}", q.calibration);
            if let Some(l) = &p.lowered {
                println!(
                    "memory       weights {} bytes stored, KV {} bytes/token on the compiled \
                     engines, {} bytes at {} tokens",
                    m.module.weights.total_storage_bytes(),
                    l.memory.kv_bytes_per_token,
                    l.memory.kv_bytes,
                    l.memory.max_ctx
                );
                let lp = m.lowered(l.act)?;
                if lp.memory.kv_tail_bytes > 0 {
                    println!(
                        "             + {} bytes a session: the recent window's rows in f32",
                        lp.memory.kv_tail_bytes
                    );
                }
                println!(
                    "lowered      {} kernel launches ({} distinct kernels), {} activations",
                    lp.steps.len(),
                    lp.kernels().len(),
                    l.act.name()
                );
            }
            println!("quality      {}", p.quality);
            println!(
                "source       {} (sha256 {})",
                p.source.path.display(),
                p.source_sha256
            );
        }
        match m.tokenizer() {
            Ok(t) => {
                println!(
                    "tokenizer    {} tokens, bos {:?}, eos {:?}, chat template {}",
                    t.vocab_size(),
                    t.spec.bos_token,
                    t.spec.eos_ids,
                    if t.spec.chat_template.is_some() {
                        "yes"
                    } else {
                        "no"
                    }
                );
            }
            Err(e) if m.tokenizer_spec.is_some() => println!("tokenizer    {e}"),
            Err(_) => {}
        }
    }
    if graph {
        print!("{}", wkvc_ir::text::print(&m.module.graph));
    }
    Ok(())
}

/// `--plots DIR`: the K/V channel charts of the chosen layers and the sensitivity scan's.
fn write_plots(
    m: &wkvc_runtime::Model,
    dir: &std::path::Path,
    layers: &[i64],
    text: Option<&std::path::Path>,
    tokens: usize,
    threads: Option<usize>,
) -> Result<()> {
    if tokens < 2 {
        anyhow::bail!("--plot-tokens must be at least 2, got {tokens}");
    }
    let threads = workers(threads);
    let n = m.config.num_layers as i64;
    let layers: Vec<i64> = if layers.is_empty() {
        let mut l = vec![0, n / 2, n - 1];
        l.dedup();
        l
    } else {
        layers.to_vec()
    };
    if let Some(l) = layers.iter().find(|&&l| l < 0 || l >= n) {
        anyhow::bail!("--plot-layers: layer {l} is not in 0..{n}");
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let (ids, from) = match text {
        Some(p) => {
            let t = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
            let mut ids = m.tokenizer()?.encode(&t, false)?;
            ids.truncate(tokens);
            if ids.len() < 2 {
                anyhow::bail!("{} has fewer than 2 tokens", p.display());
            }
            let name = p.file_name().map_or(p.display().to_string(), |f| {
                f.to_string_lossy().into_owned()
            });
            (ids, format!("text of {name}"))
        }
        None => {
            eprintln!("sampling {tokens} tokens from the model (no --plot-text) ...");
            let ids = wkvc_runtime::compile::sample_text(m, tokens, 0, threads)?;
            (ids, "sampled from the model, seed 0".to_string())
        }
    };
    let chans = wkvc_runtime::kvprobe::kv_channels(m, &ids, &layers, threads)?;
    for ch in &chans {
        let p = crate::cmd::plots::layer_chart(dir, ch, &from)?;
        println!("wrote {}", p.display());
    }
    let quant = m.plan.as_ref().map(|p| &p.quant);
    match quant.and_then(|q| q.kv_sensitivity.as_ref()) {
        Some(scan) => {
            let bits = quant.and_then(|q| q.kv_bits_per_layer.as_deref());
            let p = crate::cmd::plots::sensitivity_chart(dir, scan, bits)?;
            println!("wrote {}", p.display());
        }
        None => println!(
            "no KV sensitivity scan in {} (compile with --kv-bits-per-layer auto:B for its chart)",
            if m.plan.is_some() {
                "this plan"
            } else {
                "a model that is not a plan"
            }
        ),
    }
    Ok(())
}
