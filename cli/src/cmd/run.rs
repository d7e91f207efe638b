//! `wkvc run`: generate text from a prompt, streamed.

use crate::args::RunArgs;
use crate::common::{make_engine, open};
use anyhow::{Result, bail};
use std::io::Write;
use wkvc_runtime::{Message, Sampler, StreamDecoder, generate};

pub fn run(a: RunArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&a.top_p) || a.top_p == 0.0 {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    if a.temperature < 0.0 || !a.temperature.is_finite() {
        bail!("--temperature must be >= 0, got {}", a.temperature);
    }
    let m = open(&a.model)?;
    let tok = m.tokenizer()?;
    let text = if a.chat {
        tok.apply_chat_template(&[Message {
            role: "user".into(),
            content: a.prompt.clone(),
        }])?
    } else {
        a.prompt.clone()
    };
    let ids = tok.encode(&text, true)?;
    let engine = make_engine(&m, &a.eng)?;
    let mut session = engine.session(a.ctx);
    let mut sampler = Sampler::new(a.temperature, a.top_p, a.seed);
    let mut dec = StreamDecoder::new();
    let mut out = std::io::stdout().lock();
    if !a.chat {
        write!(out, "{}", a.prompt)?;
        out.flush()?;
    }
    let stats = generate(
        &mut session,
        &ids,
        a.max_tokens,
        &mut sampler,
        &|id| tok.is_eos(id),
        if a.ignore_eos { &tok.spec.eos_ids } else { &[] },
        &mut |id| {
            let piece = dec.push(tok, id)?;
            write!(out, "{piece}")
                .and_then(|_| out.flush())
                .map_err(|e| wkvc_runtime::RuntimeError::Invalid(format!("stdout: {e}")))
        },
    )?;
    writeln!(out)?;
    let jit = engine
        .cpu()
        .map(|c| {
            format!(
                "; {}, {} kernels JIT-compiled{} in {:.0} ms",
                engine.describe(),
                c.kernels,
                if c.native_kernels > 0 {
                    format!(" and {} native", c.native_kernels)
                } else {
                    String::new()
                },
                c.jit_ms
            )
        })
        .unwrap_or_else(|| format!("; {}", engine.describe()));
    eprintln!(
        "[{} prompt tokens in {:.2}s, {} new tokens at {:.1} tokens/s{jit}]",
        stats.prompt_tokens,
        stats.prefill_seconds,
        stats.new_tokens,
        stats.new_tokens as f64 / stats.decode_seconds.max(1e-9)
    );
    Ok(())
}
