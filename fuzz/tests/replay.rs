//! Every fuzz target on every input of its seed corpus (`corpus/TARGET/`) and of its
//! regressions (`regressions/TARGET/`: inputs that once crashed or hung a target, each named
//! after what it found). A target returns normally on all of them; a panic fails the test.

use std::path::PathBuf;
use std::time::Instant;

fn replay(kind: &str) -> usize {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(kind);
    let mut n = 0;
    for (name, target) in wkvc_fuzz::TARGETS {
        for p in wkvc_fuzz::inputs(&root.join(name)) {
            let data = std::fs::read(&p).expect("read input");
            let t = Instant::now();
            target(&data);
            println!(
                "{name}: {} ({} bytes) {:.1} ms",
                p.display(),
                data.len(),
                t.elapsed().as_secs_f64() * 1e3
            );
            n += 1;
        }
    }
    n
}

#[test]
fn every_target_has_seeds_and_survives_them() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, _) in wkvc_fuzz::TARGETS {
        assert!(
            !wkvc_fuzz::inputs(&root.join(name)).is_empty(),
            "target {name} has no seed corpus in {}",
            root.join(name).display()
        );
    }
    replay("corpus");
}

#[test]
fn regressions_replay() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let dirs = std::fs::read_dir(&root).expect("fuzz/regressions exists");
    for d in dirs.filter_map(|e| e.ok()).map(|e| e.path()) {
        let name = d.file_name().and_then(|s| s.to_str()).unwrap_or_default();
        assert!(
            d.is_dir() && wkvc_fuzz::target(name).is_some(),
            "regressions/{name} is not the folder of a fuzz target"
        );
    }
    assert!(replay("regressions") > 0, "no regression inputs found");
}

/// The seeds are what they claim to be: each model, plan and request seed is accepted by
/// its parser (a seed that fails at its first check would leave the fuzzer outside).
#[test]
fn seeds_are_valid_inputs() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for p in wkvc_fuzz::inputs(&root.join("plan")) {
        let tmp = std::env::temp_dir().join(format!("wkvc-fuzz-seed-{}.wkv", std::process::id()));
        std::fs::copy(&p, &tmp).expect("copy");
        let m = wkvc_runtime::Model::open(&tmp);
        let _ = std::fs::remove_file(&tmp);
        let m = m.unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        m.tokenizer().expect("the plan's tokenizer loads");
    }
    for p in wkvc_fuzz::inputs(&root.join("manifest")) {
        let text = std::fs::read_to_string(&p).expect("read");
        wkvc_runtime::plan::parse_manifest(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    for p in wkvc_fuzz::inputs(&root.join("ir_text")) {
        let text = std::fs::read_to_string(&p).expect("read");
        wkvc_ir::text::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    for p in wkvc_fuzz::inputs(&root.join("gguf")) {
        let data = std::fs::read(&p).expect("read");
        wkvc_ir::gguf::parse(&data).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    let tok = wkvc_fuzz::request_tokenizer();
    for p in wkvc_fuzz::inputs(&root.join("request")) {
        let data = std::fs::read(&p).expect("read");
        let body = &data[1..];
        use wkvc_cli::serve::request as r;
        let ok = match data[0] % 4 {
            0 => r::chat(body, tok, wkvc_fuzz::REQUEST_CTX).is_ok(),
            1 => r::completion(body, tok, wkvc_fuzz::REQUEST_CTX).is_ok(),
            2 => r::tokenize(body, tok).is_ok(),
            _ => r::detokenize(body, tok, tok.vocab_size()).is_ok(),
        };
        assert!(ok, "{}: rejected", p.display());
    }
    for p in wkvc_fuzz::inputs(&root.join("chat_template")) {
        let tpl = std::fs::read_to_string(&p).expect("read");
        let msgs = [wkvc_runtime::Message {
            role: "user".into(),
            content: "Hi".into(),
        }];
        wkvc_runtime::render_chat_template(&tpl, &msgs, "<s>", "</s>")
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
}
