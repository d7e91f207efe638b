//! A fuzz target runs in one process for millions of executions (AFL++'s persistent mode), as
//! a server runs for weeks: whatever an execution leaves allocated accumulates until the
//! process hits its memory limit and aborts. This test replays every target's seeds and
//! regression inputs over and over in this process, with an allocator that counts live bytes,
//! and requires the count to come back to where it was: the passes after the first two (which
//! may fill lazily built tables once) allocate nothing that outlives them.
//!
//! Found this way: the `tokenizers` crate's thread-local BPE word cache, which kept every
//! dropped tokenizer's words (about 2 KB a tokenizer: the `gguf` and `hf` campaigns' aborts
//! after ~1.8 million executions, `runtime/src/tokenizer.rs::without_bpe_cache`).
//!
//! One test in its own binary: the count is process-wide, so no other test may run beside it.

use std::path::PathBuf;

#[global_allocator]
static ALLOC: wkvc_fuzz::Counting = wkvc_fuzz::Counting;

#[test]
fn targets_leave_nothing_allocated_across_executions() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // Passes that must allocate nothing lasting, after the warm-up passes.
    const WARM: usize = 2;
    const CHECKED: usize = 4;
    let mut failures = Vec::new();
    for (name, target) in wkvc_fuzz::TARGETS {
        let data: Vec<(PathBuf, Vec<u8>)> = ["corpus", "regressions"]
            .iter()
            .flat_map(|kind| wkvc_fuzz::inputs(&root.join(kind).join(name)))
            .map(|p| {
                let d = std::fs::read(&p).expect("read input");
                (p, d)
            })
            .collect();
        for _ in 0..WARM {
            for (_, d) in &data {
                target(d);
            }
        }
        // Each input on its own, so that a failure names the input that leaks.
        for (p, d) in &data {
            let before = wkvc_fuzz::live_bytes();
            for _ in 0..CHECKED {
                target(d);
            }
            let grown = wkvc_fuzz::live_bytes() - before;
            if grown != 0 {
                failures.push(format!(
                    "{name}: {} left {grown} bytes allocated over {CHECKED} executions",
                    p.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
