//! Fuzz targets: one per parser of untrusted input. Each takes arbitrary bytes and runs the
//! parser as wkvc runs it on a file or request from a stranger, and then what consumes the
//! parsed result (dequantization, tokenizer loading, chat-template rendering). A target
//! returns normally on every input: bad input is an `Err` that is dropped here; a panic,
//! an abort, a hang or a memory blow-up is a bug.
//!
//! `scripts/fuzz.sh` runs them under AFL++ (`src/main.rs`); `tests/replay.rs` replays every
//! input under `corpus/` and `regressions/` in the ordinary test run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicIsize, Ordering};
use wkvc_ir::import::TokenizerSpec;
use wkvc_runtime::{Message, StreamDecoder, Tokenizer};

/// A fuzz target: its name (a folder of `corpus/`) and its function.
pub type Target = (&'static str, fn(&[u8]));

/// The system allocator, counting the bytes it holds for the program ([`live_bytes`]). A
/// binary that wants the count installs it: `#[global_allocator] static A: Counting =
/// Counting;` (the harness, to trace a persistent process's growth to inputs; the test that
/// replays every target in one process).
pub struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

/// Bytes allocated through [`Counting`] and not yet freed (0 where it is not installed).
pub fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

/// Every target, by name.
pub const TARGETS: &[Target] = &[
    ("gguf", gguf),
    ("hf", hf),
    ("plan", plan),
    ("manifest", manifest),
    ("ir_text", ir_text),
    ("request", request),
    ("chat_template", chat_template),
];

/// The files of `dir` (a corpus or regressions folder), sorted by name; none where it is
/// absent.
pub fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

/// The target called `name`.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|t| t.0 == name).map(|t| t.1)
}

/// Separates the files of an `hf` input (the folder's files in [`HF_FILES`] order).
pub const HF_SEP: &[u8] = b"\n#wkvc-file#\n";

/// The files of a Hugging Face model folder an `hf` input holds, in order (an empty part:
/// the file is absent).
pub const HF_FILES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// A scratch folder of this process (in memory where /dev/shm exists).
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("wkvc-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    })
}

/// What a loaded tokenizer is used for: encoding, decoding (whole and streamed) and the chat
/// template.
fn use_tokenizer(spec: TokenizerSpec) {
    let Ok(tok) = Tokenizer::from_spec(spec) else {
        return;
    };
    let Ok(ids) = tok.encode("Hello, world! 123 \u{e9}t\u{e9} <|im_start|> \n\t x", true) else {
        return;
    };
    let _ = tok.decode(&ids, false);
    let mut sd = StreamDecoder::new();
    for &id in &ids {
        let _ = sd.push(&tok, id);
    }
    let _ = tok.apply_chat_template(&conversation());
}

/// A short conversation, with template syntax and a special token in a message.
fn conversation() -> Vec<Message> {
    [
        ("system", "Be brief."),
        ("user", "Hello {{ there }} <|im_end|>"),
        ("assistant", "Hi."),
        ("user", "Again"),
    ]
    .into_iter()
    .map(|(role, content)| Message {
        role: role.into(),
        content: content.into(),
    })
    .collect()
}

/// GGUF: header, metadata, tensor infos, every tensor's dequantization, the import (config,
/// graph, weights) and the tokenizer rebuilt from the metadata.
pub fn gguf(data: &[u8]) {
    if let Ok(g) = wkvc_ir::gguf::parse(data) {
        for t in &g.tensors {
            let _ = wkvc_ir::gguf::dequantize(t.ggml_type, &data[t.offset..t.offset + t.nbytes]);
        }
    }
    if let Ok(imp) = wkvc_ir::import::import_gguf_bytes(Path::new("fuzz.gguf"), data)
        && let Some(spec) = imp.tokenizer
    {
        use_tokenizer(spec);
    }
}

/// A Hugging Face model folder: config.json, the safetensors (one file, or shards with their
/// index), tokenizer.json and tokenizer_config.json, split out of the input at [`HF_SEP`].
pub fn hf(data: &[u8]) {
    let dir = scratch().join("hf");
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    for (name, part) in HF_FILES.iter().zip(split(data, HF_SEP)) {
        if !part.is_empty() && std::fs::write(dir.join(name), part).is_err() {
            return;
        }
    }
    if let Ok(imp) = wkvc_ir::import::import_hf(&dir)
        && let Some(spec) = imp.tokenizer
    {
        use_tokenizer(spec);
    }
}

fn split<'a>(data: &'a [u8], sep: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.windows(sep.len()).position(|w| w == sep) {
            Some(i) => {
                rest = Some(&r[i + sep.len()..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// A plan file: the container, the manifest, every tensor against it, the graph against the
/// tensors, the stored lowered plan against both, and the tokenizer it carries.
pub fn plan(data: &[u8]) {
    let path = scratch().join("fuzz.wkv");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(model) = wkvc_runtime::Model::open(&path) {
        let _ = model.lowered(model.plan_act());
        if let Some(spec) = model.tokenizer_spec.clone() {
            use_tokenizer(spec);
        }
    }
}

/// A plan's manifest on its own (the JSON of the container's header, whose hashes a fuzzer
/// cannot forge): config, graph text, lowered graph text, tokenizer and chat template.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((m, g)) = wkvc_runtime::plan::parse_manifest(text) {
        let _ = wkvc_ir::verify::verify(&g);
        if let Some(spec) = m.tokenizer {
            use_tokenizer(spec);
        }
    }
}

/// The IR text parser and verifier. A graph that parses prints back to text that parses to
/// the same graph.
pub fn ir_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(g) = wkvc_ir::text::parse(text) else {
        return;
    };
    let _ = wkvc_ir::verify::verify(&g);
    let printed = wkvc_ir::text::print(&g);
    match wkvc_ir::text::parse(&printed) {
        Ok(g2) => assert_eq!(
            wkvc_ir::text::print(&g2),
            printed,
            "printing a parsed graph does not round-trip"
        ),
        Err(e) => panic!("a printed graph does not parse: {e}\n{printed}"),
    }
}

/// The context length the `request` target checks against.
pub const REQUEST_CTX: usize = 64;

/// A tokenizer like a plan's: the fixtures' byte-level BPE with a ChatML template.
pub fn request_tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let vocab = 300;
        Tokenizer::from_spec(TokenizerSpec {
            json: wkvc_tests::tiny_tokenizer_json(vocab),
            chat_template: Some(wkvc_tests::TINY_CHAT_TEMPLATE.into()),
            bos_token: Some("<|im_start|>".into()),
            eos_token: Some("<|im_end|>".into()),
            bos_id: None,
            eos_ids: vec![vocab as u32 - 1],
            add_bos: false,
        })
        .unwrap_or_else(|e| panic!("the fixture tokenizer does not load: {e}"))
    })
}

/// `wkvc serve`'s request bodies: the first byte picks the endpoint (chat completions,
/// completions, tokenize, detokenize), the rest is the body, taken as far as the scheduler.
pub fn request(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    use wkvc_cli::serve::request as r;
    let tok = request_tokenizer();
    let vocab = tok.vocab_size();
    match which % 4 {
        0 => drop(r::chat(body, tok, REQUEST_CTX)),
        1 => drop(r::completion(body, tok, REQUEST_CTX)),
        2 => drop(r::tokenize(body, tok)),
        _ => drop(r::detokenize(body, tok, vocab)),
    }
}

/// Chat-template rendering with a hostile template (the input) for a short conversation.
pub fn chat_template(data: &[u8]) {
    let Ok(tpl) = std::str::from_utf8(data) else {
        return;
    };
    let msgs = conversation();
    let _ = wkvc_runtime::render_chat_template(tpl, &msgs, "<s>", "</s>");
}
