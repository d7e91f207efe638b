//! Write a LLaMA-architecture model with random weights of given shapes, for speed and
//! memory measurements of models bigger than the demo (`wkvc_tests::random_model`):
//!
//!   make-random-model -o OUT.gguf [--hidden 2048] [--layers 16] [--heads 32] [--kv-heads 8]
//!                     [--ffn 8192] [--vocab 49152] [--ctx 4096] [--seed 1] [--untied]
//!                     [--hf-shards N]
//!
//! A GGUF file with F16 matrices, or with `--hf-shards N` a Hugging Face folder (config.json,
//! N bf16 safetensors shards with their index, tokenizer.json, tokenizer_config.json). The
//! defaults are Llama-3.2-1B's shapes with SmolLM2's vocabulary size.

use std::path::PathBuf;
use wkvc_tests::random_model::RandomModel;

fn usage(msg: &str) -> ! {
    eprintln!("error: {msg}");
    eprintln!(
        "usage: make-random-model -o OUT.gguf [--hidden N] [--layers N] [--heads N] \
         [--kv-heads N] [--ffn N] [--vocab N] [--ctx N] [--seed N] [--untied] [--hf-shards N]"
    );
    std::process::exit(2)
}

fn main() {
    let mut m = RandomModel::default();
    let mut out = PathBuf::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--untied" {
            m.tied = false;
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
            "-o" | "--out" => out = PathBuf::from(&v),
            "--hidden" => m.hidden = num(),
            "--layers" => m.layers = num(),
            "--heads" => m.heads = num(),
            "--kv-heads" => m.kv_heads = num(),
            "--ffn" => m.ffn = num(),
            "--vocab" => m.vocab = num(),
            "--ctx" => m.ctx = num(),
            "--seed" => m.seed = num() as u64,
            "--hf-shards" => m.hf_shards = num().max(1),
            _ => usage(&format!("unknown option {a}")),
        }
    }
    if out.as_os_str().is_empty() {
        usage("-o OUT.gguf is required");
    }
    if let Err(e) = m.check() {
        usage(&e);
    }
    let r = m.write(&out, &mut |name, bytes| {
        eprint!("\r{name:<44} {:>6.0} MiB", bytes as f64 / 1048576.0)
    });
    match r {
        Ok(bytes) => eprintln!(
            "\nwrote {} ({:.1} M parameters, {:.0} MiB{})",
            out.display(),
            m.params() as f64 / 1e6,
            bytes as f64 / 1048576.0,
            if m.hf_shards > 0 {
                format!(", {} bf16 shard(s)", m.hf_shards)
            } else {
                String::new()
            }
        ),
        Err(e) => {
            eprintln!("\nerror: {e}");
            std::process::exit(1)
        }
    }
}
