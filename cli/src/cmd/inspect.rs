//! `wkvc inspect`: architecture, sizes, the plan's record, the memory plan, the graph.

use crate::args::InspectArgs;
use crate::common::open;
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
    } = a;
    let m = open(&model)?;
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
                q.past_only,
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
