//! Embedding wkvc in a service: one `Engine` shared by threads, each thread its own
//! `Session`, tokens streamed through a callback, and a request cancelled from another thread.
//!
//!     cargo run --release -p wkvc-runtime --example embed -- PLAN.wkv
//!
//! (`scripts/demo.sh` writes a plan of the demo model to target/demo/smollm2-w4kv4.wkv.)

use std::sync::Arc;
use wkvc_runtime::{CancelToken, Model, RuntimeError, Sampler, StreamDecoder, generate};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: embed PLAN.wkv (a plan, a GGUF file or a model directory)")?;
    let model = Model::open(std::path::Path::new(&path))?;
    // Send + Sync, cheap to clone: every thread gets a handle to the same compiled engine
    let engine = model.engine_auto(2)?;
    let prompts = [
        "The capital of France is",
        "Once upon a time",
        "A recipe for bread:",
    ];
    // the third request is cancelled by the main thread after its first tokens
    let cancel = Arc::new(CancelToken::new());
    std::thread::scope(|scope| -> Result<(), RuntimeError> {
        let mut handles = Vec::new();
        for (i, prompt) in prompts.iter().enumerate() {
            let engine = engine.clone();
            let cancel = cancel.clone();
            handles.push(scope.spawn(move || -> Result<String, RuntimeError> {
                let tok = engine.model().tokenizer()?;
                let ids = tok.encode(prompt, true)?;
                // a session owns its KV cache; it is Send and lives in this thread
                let mut session = engine.session(256);
                let mut sampler = Sampler::new(0.7, 0.9, i as u64);
                let mut dec = StreamDecoder::new();
                let mut text = prompt.to_string();
                let r = generate(
                    &mut session,
                    &ids,
                    32,
                    &mut sampler,
                    &|id| tok.is_eos(id),
                    &[],
                    &mut |id| {
                        if i == 2 && cancel.is_cancelled() {
                            return Err(RuntimeError::Cancelled);
                        }
                        let piece = dec.push(tok, id)?;
                        text.push_str(&piece);
                        println!("[{i}] {piece:?}");
                        Ok(())
                    },
                );
                match r {
                    Ok(stats) => Ok(format!("{text} ({} tokens)", stats.new_tokens)),
                    Err(RuntimeError::Cancelled) => Ok(format!("{text} (cancelled)")),
                    Err(e) => Err(e),
                }
            }));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        cancel.cancel();
        for h in handles {
            match h.join() {
                Ok(r) => println!("==> {}", r?),
                Err(_) => eprintln!("a thread panicked"),
            }
        }
        Ok(())
    })?;
    Ok(())
}
