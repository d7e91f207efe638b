//! Many sequences in one engine: batched steps by hand (`Engine::step`: every session advances
//! together, the weights read once per step), then the same through the continuous-batching
//! `Scheduler` that `wkvc serve` uses (requests admitted at step boundaries, events to a
//! closure).
//!
//!     cargo run --release -p wkvc-runtime --example batch -- PLAN.wkv

use std::sync::mpsc;
use wkvc_runtime::scheduler::{Event, GenRequest, Scheduler, SchedulerOptions};
use wkvc_runtime::{BatchItem, CancelToken, Model, sample};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: batch PLAN.wkv")?;
    let model = Model::open(std::path::Path::new(&path))?;
    let engine = model.engine_auto(2)?;
    let tok = model.tokenizer()?;
    let prompts = ["The capital of France is", "Water boils at", "The sky is"];

    // by hand: prompts in one step, then greedy decode steps of all sessions together
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode(p, true))
        .collect::<Result<_, _>>()?;
    let mut sessions: Vec<_> = prompts.iter().map(|_| engine.session(128)).collect();
    let mut items: Vec<BatchItem> = sessions
        .iter_mut()
        .zip(&ids)
        .map(|(s, p)| BatchItem::new(s, p))
        .collect();
    engine.step(&mut items)?;
    drop(items);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for _ in 0..12 {
        let next: Vec<[u32; 1]> = sessions
            .iter()
            .map(|s| [sample::argmax(s.logits()) as u32])
            .collect();
        for (o, n) in out.iter_mut().zip(&next) {
            o.push(n[0]);
        }
        let mut items: Vec<BatchItem> = sessions
            .iter_mut()
            .zip(&next)
            .map(|(s, t)| BatchItem::new(s, t))
            .collect();
        engine.step(&mut items)?;
    }
    for (p, o) in prompts.iter().zip(&out) {
        println!("{p}{}", tok.decode(o, true)?);
    }

    // the scheduler: submit from anywhere, events arrive on the request's sink
    let sched = Scheduler::start(
        engine.clone(),
        SchedulerOptions {
            parallel: 4,
            ctx: 256,
            queue: 16,
        },
    )?;
    let (tx, rx) = mpsc::channel();
    for (i, p) in prompts.iter().enumerate() {
        let tx = tx.clone();
        sched.submit(
            GenRequest {
                prompt: tok.encode(p, true)?,
                max_tokens: 16,
                temperature: 0.0,
                top_p: 1.0,
                seed: 0,
                stop: vec!["\n".into()],
                ignore_eos: false,
                cancel: CancelToken::new(),
            },
            Box::new(move |e| tx.send((i, e)).is_ok()),
        )?;
    }
    drop(tx);
    let mut texts = vec![String::new(); prompts.len()];
    for (i, e) in rx {
        match e {
            Event::Token { text, .. } => texts[i].push_str(&text),
            Event::Done { reason, text, .. } => {
                texts[i].push_str(&text);
                println!("{}{} [{}]", prompts[i], texts[i], reason.name());
            }
        }
    }
    sched.shutdown(std::time::Duration::from_secs(1));
    Ok(())
}
