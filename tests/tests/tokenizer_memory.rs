//! Tokenizers leave nothing behind when dropped.
//!
//! The crate (0.23) caches BPE words in a thread-local map keyed by a per-model id and never
//! removes a dropped model's entries: each tokenizer loaded, used and dropped leaves its cache
//! behind in every thread that encoded with it (fuzzing found it: the persistent fuzz loop
//! grew to its memory limit). wkvc loads tokenizers with that cache off. One test in this file: the
//! resident-set figures must not see other tests' allocations (the demo tokenizer's encoding
//! without the cache is checked in `import.rs`).

use std::str::FromStr;
use wkvc_ir::import::TokenizerSpec;
use wkvc_runtime::Tokenizer;

fn spec(json: String) -> TokenizerSpec {
    TokenizerSpec {
        json,
        chat_template: None,
        bos_token: None,
        eos_token: None,
        bos_id: None,
        eos_ids: Vec::new(),
        add_bos: false,
    }
}

fn rss_bytes() -> usize {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: usize = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// `n` distinct words of letters (the pre-tokenizer splits digits off): each is one cache
/// entry of the model that encodes them.
fn words(n: usize) -> String {
    (0..n)
        .map(|i| {
            let mut v = i * 7919 + 104_729;
            let mut w = String::new();
            while v > 0 {
                w.push((b'a' + (v % 26) as u8) as char);
                v /= 26;
            }
            w
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Resident-set growth over `rounds` of: load a tokenizer, encode `text`, drop it, after a
/// warm-up of the same loop (allocator pools, one-time statics).
fn growth(rounds: usize, text: &str, mut round: impl FnMut(&str)) -> usize {
    for _ in 0..50 {
        round(text);
    }
    let before = rss_bytes();
    for _ in 0..rounds {
        round(text);
    }
    rss_bytes().saturating_sub(before)
}

#[test]
fn dropped_tokenizers_leave_no_memory_behind() {
    let json = wkvc_tests::tiny_tokenizer_json(300);
    let text = words(400);
    let rounds = 400;
    // The crate's loader: the leak this guards against (else the test would guard nothing).
    let raw = growth(rounds, &text, |t| {
        let tok = tokenizers::Tokenizer::from_str(&json).expect("tiny tokenizer");
        std::hint::black_box(tok.encode(t, false).expect("encode"));
    });
    // wkvc's loader, on the same loop.
    let ours = growth(rounds, &text, |t| {
        let tok = Tokenizer::from_spec(spec(json.clone())).expect("tiny tokenizer");
        std::hint::black_box(tok.encode(t, false).expect("encode"));
    });
    // 400 words a round, each a cached `Word` and its key: far above 100 bytes per word.
    let leak_floor = rounds * 400 * 100;
    eprintln!(
        "RSS growth over {rounds} load-encode-drop rounds: tokenizers crate {:.1} MiB, wkvc {:.2} MiB",
        raw as f64 / (1 << 20) as f64,
        ours as f64 / (1 << 20) as f64
    );
    assert!(
        raw >= leak_floor,
        "the tokenizers crate's loader no longer leaks its BPE cache ({raw} bytes over {rounds} rounds): \
         the workaround in runtime/src/tokenizer.rs (without_bpe_cache) may be dropped"
    );
    // A round's own allocations are freed; what may remain is allocator slack, which does not
    // grow with the rounds: a tenth of the leak's floor is far above it and far below a leak.
    assert!(
        ours < leak_floor / 10,
        "wkvc's tokenizers keep {ours} bytes after {rounds} load-encode-drop rounds"
    );
}
