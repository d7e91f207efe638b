//! Write a LLaMA-architecture GGUF with random F16 weights of given shapes, for speed and
//! memory measurements of models bigger than the demo (its text is noise).
//!
//!   make-random-model -o OUT.gguf [--hidden 2048] [--layers 16] [--heads 32] [--kv-heads 8]
//!                     [--ffn 8192] [--vocab 49152] [--ctx 4096] [--seed 1] [--untied]
//!
//! The defaults are Llama-3.2-1B's shapes with SmolLM2's vocabulary size. Weights are
//! uniform with the standard deviation of a trained model's (0.02), norms 1; the tokenizer is
//! a byte-level BPE vocabulary of the asked size (bytes, a few merges, placeholders, and
//! `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`). The file is written through a temporary
//! file and renamed, tensor by tensor (memory stays small whatever the size).

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use wkvc_tests::{gguf_meta, put_meta, put_str};

struct Opts {
    out: PathBuf,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    vocab: usize,
    ctx: usize,
    seed: u64,
    tied: bool,
}

fn usage(msg: &str) -> ! {
    eprintln!("error: {msg}");
    eprintln!(
        "usage: make-random-model -o OUT.gguf [--hidden N] [--layers N] [--heads N] \
         [--kv-heads N] [--ffn N] [--vocab N] [--ctx N] [--seed N] [--untied]"
    );
    std::process::exit(2)
}

fn parse() -> Opts {
    let mut o = Opts {
        out: PathBuf::new(),
        hidden: 2048,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        ffn: 8192,
        vocab: 49152,
        ctx: 4096,
        seed: 1,
        tied: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--untied" {
            o.tied = false;
            continue;
        }
        let v = args
            .next()
            .unwrap_or_else(|| usage(&format!("{a} needs a value")));
        let num = || -> usize {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{a}: not a number: {v}")))
        };
        match a.as_str() {
            "-o" | "--out" => o.out = PathBuf::from(&v),
            "--hidden" => o.hidden = num(),
            "--layers" => o.layers = num(),
            "--heads" => o.heads = num(),
            "--kv-heads" => o.kv_heads = num(),
            "--ffn" => o.ffn = num(),
            "--vocab" => o.vocab = num(),
            "--ctx" => o.ctx = num(),
            "--seed" => o.seed = num() as u64,
            _ => usage(&format!("unknown option {a}")),
        }
    }
    if o.out.as_os_str().is_empty() {
        usage("-o OUT.gguf is required");
    }
    if o.heads == 0
        || o.kv_heads == 0
        || !o.hidden.is_multiple_of(o.heads)
        || !o.heads.is_multiple_of(o.kv_heads)
    {
        usage("--hidden must be a multiple of --heads, and --heads of --kv-heads");
    }
    if o.vocab < 300
        || o.layers == 0
        || o.ffn == 0
        || !o.hidden.is_multiple_of(32)
        || !o.ffn.is_multiple_of(32)
    {
        usage("--vocab at least 300; --layers, --ffn at least 1; --hidden, --ffn multiples of 32");
    }
    o
}

/// F16 (type 1) for matrices, F32 (type 0) for norms: (name, shape as [rows, cols], type).
fn tensors(o: &Opts) -> Vec<(String, Vec<usize>, u32)> {
    let hd = o.hidden / o.heads;
    let kvw = o.kv_heads * hd;
    let mut t = vec![("token_embd.weight".to_string(), vec![o.vocab, o.hidden], 1)];
    for l in 0..o.layers {
        let b = |n: &str| format!("blk.{l}.{n}");
        t.push((b("attn_norm.weight"), vec![o.hidden], 0));
        t.push((b("attn_q.weight"), vec![o.hidden, o.hidden], 1));
        t.push((b("attn_k.weight"), vec![kvw, o.hidden], 1));
        t.push((b("attn_v.weight"), vec![kvw, o.hidden], 1));
        t.push((b("attn_output.weight"), vec![o.hidden, o.hidden], 1));
        t.push((b("ffn_norm.weight"), vec![o.hidden], 0));
        t.push((b("ffn_gate.weight"), vec![o.ffn, o.hidden], 1));
        t.push((b("ffn_up.weight"), vec![o.ffn, o.hidden], 1));
        t.push((b("ffn_down.weight"), vec![o.hidden, o.ffn], 1));
    }
    t.push(("output_norm.weight".to_string(), vec![o.hidden], 0));
    if !o.tied {
        t.push(("output.weight".to_string(), vec![o.vocab, o.hidden], 1));
    }
    t
}

fn main() {
    let o = parse();
    let cfg = wkvc_ir::ModelConfig {
        arch: "llama".into(),
        vocab_size: o.vocab,
        hidden_size: o.hidden,
        intermediate_size: o.ffn,
        num_layers: o.layers,
        num_heads: o.heads,
        num_kv_heads: o.kv_heads,
        head_dim: o.hidden / o.heads,
        rms_norm_eps: 1e-5,
        rope_theta: 500000.0,
        rope_scaling: wkvc_ir::RopeScaling::None,
        rope_freq_factors: false,
        max_position_embeddings: o.ctx,
        tie_word_embeddings: o.tied,
        qkv_bias: false,
    };
    let meta = gguf_meta(&cfg, &format!("random-h{}-l{}", o.hidden, o.layers));
    let ts = tensors(&o);
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(ts.len() as u64).to_le_bytes());
    head.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (key, v) in &meta {
        put_meta(&mut head, key, v);
    }
    let bytes =
        |shape: &[usize], ty: u32| shape.iter().product::<usize>() * if ty == 1 { 2 } else { 4 };
    let mut off = 0usize;
    let mut offsets = Vec::new();
    for (name, shape, ty) in &ts {
        off = off.next_multiple_of(32);
        put_str(&mut head, name);
        head.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&ty.to_le_bytes());
        head.extend_from_slice(&(off as u64).to_le_bytes());
        offsets.push(off);
        off += bytes(shape, *ty);
    }
    while !head.len().is_multiple_of(32) {
        head.push(0);
    }
    let tmp = o.out.with_extension("gguf.tmp");
    let write = || -> std::io::Result<()> {
        let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        w.write_all(&head)?;
        let mut s = o.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut pos = 0usize;
        let mut buf = Vec::with_capacity(1 << 20);
        for ((name, shape, ty), at) in ts.iter().zip(&offsets) {
            w.write_all(&vec![0u8; at - pos])?;
            pos = *at;
            let n: usize = shape.iter().product();
            if *ty == 0 {
                for _ in 0..n {
                    w.write_all(&1f32.to_le_bytes())?;
                }
            } else {
                // uniform on [-a, a] with a = 0.02 sqrt(3): standard deviation 0.02
                let a = 0.02f32 * 3f32.sqrt();
                let mut left = n;
                while left > 0 {
                    let c = left.min(1 << 18);
                    buf.clear();
                    for _ in 0..c {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                        buf.extend_from_slice(
                            &half::f16::from_f32((2.0 * u - 1.0) * a).to_le_bytes(),
                        );
                    }
                    w.write_all(&buf)?;
                    left -= c;
                }
            }
            pos += bytes(shape, *ty);
            eprint!("\r{name:<28} {:>6.0} MiB", pos as f64 / 1048576.0);
        }
        w.flush()?;
        w.get_ref().sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        eprintln!("\nerror: writing {}: {e}", tmp.display());
        std::process::exit(1);
    }
    if let Err(e) = std::fs::rename(&tmp, &o.out) {
        let _ = std::fs::remove_file(&tmp);
        eprintln!("\nerror: renaming to {}: {e}", o.out.display());
        std::process::exit(1);
    }
    let params: usize = ts.iter().map(|(_, s, _)| s.iter().product::<usize>()).sum();
    eprintln!(
        "\nwrote {} ({:.1} M parameters, {:.0} MiB)",
        o.out.display(),
        params as f64 / 1e6,
        (head.len() + off) as f64 / 1048576.0
    );
}
