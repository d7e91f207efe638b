//! Import of both formats into the same graph: tiny synthetic models written as HF
//! directories (f32/f16/bf16, sharded) and as GGUF files (F32/Q8_0, llama.cpp's q/k
//! permutation), compared logit for logit; tokenizers rebuilt from GGUF metadata; clear
//! errors and no panics on broken inputs.

use half::{bf16, f16};
use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use wkvc_ir::gguf::{GgufFile, MetaValue};
use wkvc_ir::import::{gguf_tokenizer, import};
use wkvc_runtime::Model;
use wkvc_tests::*;

type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

const IDS: [u32; 12] = [5, 17, 290, 3, 3, 100, 42, 7, 255, 1, 0, 64];

fn logits(path: &Path) -> Vec<f32> {
    let m = Model::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let e = m.engine(2).expect("engine");
    let mut s = e.session(64);
    s.forward(&IDS).expect("forward")
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    let (d, scale) = max_abs_diff(a, b);
    assert!(
        d <= tol * scale.max(1.0),
        "{what}: max diff {d} (scale {scale})"
    );
}

fn round(w: &Weights, f: impl Fn(f32) -> f32) -> Weights {
    w.iter()
        .map(|(k, (s, v))| (k.clone(), (s.clone(), v.iter().map(|&x| f(x)).collect())))
        .collect()
}

#[test]
fn hf_and_gguf_give_the_same_logits() {
    for arch in ["llama", "mistral", "qwen2"] {
        let cfg = tiny_config(arch);
        let w = tiny_weights(&cfg, 11);
        let dir = temp_dir(&format!("hf-{arch}"));
        write_hf_dir(&dir.join("hf"), &cfg, &w, StDtype::F32, 1);
        write_gguf(&dir.join("m.gguf"), &cfg, &w, false);
        let a = logits(&dir.join("hf"));
        assert_eq!(a.len(), IDS.len() * cfg.vocab_size);
        let b = logits(&dir.join("m.gguf"));
        // Same weights after undoing the q/k permutation, same graph: identical arithmetic.
        assert_eq!(a, b, "{arch}: GGUF F32 vs HF f32");
        // Sharded checkpoints load the same tensors.
        write_hf_dir(&dir.join("sharded"), &cfg, &w, StDtype::F32, 3);
        assert!(dir.join("sharded/model.safetensors.index.json").exists());
        assert_eq!(logits(&dir.join("sharded")), a, "{arch}: sharded");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn half_precision_checkpoints_widen_exactly() {
    let cfg = tiny_config("llama");
    let w = tiny_weights(&cfg, 5);
    let dir = temp_dir("half");
    for (dt, f) in [
        (
            StDtype::F16,
            (|x| f16::from_f32(x).to_f32()) as fn(f32) -> f32,
        ),
        (StDtype::BF16, |x| bf16::from_f32(x).to_f32()),
    ] {
        write_hf_dir(&dir.join("h"), &cfg, &w, dt, 1);
        write_hf_dir(&dir.join("f"), &cfg, &round(&w, f), StDtype::F32, 1);
        assert_eq!(logits(&dir.join("h")), logits(&dir.join("f")), "{dt:?}");
        let _ = std::fs::remove_dir_all(dir.join("h"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn q8_0_gguf_equals_its_dequantized_weights() {
    let cfg = tiny_config("llama");
    let w = tiny_weights(&cfg, 3);
    let dir = temp_dir("q8");
    write_gguf(&dir.join("q.gguf"), &cfg, &w, true);
    let deq: Weights = w
        .iter()
        .map(|(k, (s, v))| {
            let v = if s.len() == 2 && s[1] % 32 == 0 {
                v.chunks(s[1])
                    .flat_map(|r| dequantize_q8_0(&quantize_q8_0(r)))
                    .collect()
            } else {
                v.clone()
            };
            (k.clone(), (s.clone(), v))
        })
        .collect();
    write_hf_dir(&dir.join("hf"), &cfg, &deq, StDtype::F32, 1);
    assert_eq!(logits(&dir.join("q.gguf")), logits(&dir.join("hf")));
    // and Q8_0 is close to the f32 model (relative error of 8-bit weights)
    write_hf_dir(&dir.join("fp"), &cfg, &w, StDtype::F32, 1);
    assert_close(
        &logits(&dir.join("q.gguf")),
        &logits(&dir.join("fp")),
        0.05,
        "q8 vs fp",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gguf_tokenizer_equals_hf_tokenizer_json() {
    let cfg = tiny_config("llama");
    let w = tiny_weights(&cfg, 1);
    let dir = temp_dir("tok");
    write_hf_dir(&dir.join("hf"), &cfg, &w, StDtype::F32, 1);
    write_gguf(&dir.join("m.gguf"), &cfg, &w, false);
    let a = Model::open(&dir.join("hf")).expect("hf");
    let b = Model::open(&dir.join("m.gguf")).expect("gguf");
    let (ta, tb) = (a.tokenizer().expect("tok"), b.tokenizer().expect("tok"));
    for text in [
        "the theater in 2024 <|im_start|>an answer<|im_end|>",
        "  leading spaces, tabs\tand\nnewlines 12345",
        "ünïcode ✓ emoji 🙂 and 'quotes' we're",
        "",
    ] {
        let ia = ta.encode(text, false).expect("encode");
        assert_eq!(ia, tb.encode(text, false).expect("encode"), "{text:?}");
        assert_eq!(ta.decode(&ia, false).expect("decode"), text);
    }
    // by hand: "t" is byte token 116, "he" the second merge (257); the digits splitter isolates
    // " ", "4", "2" (bytes 32, 52, 50) as SmolLM's does; <|im_end|> is the special 299
    let ids = tb.encode("the 42<|im_end|>", false).expect("encode");
    assert_eq!(ids, vec![116, 257, 32, 52, 50, 299]);
    // " the" merges all the way: "Ġt" (256) + "he" (257) -> "Ġthe" (258)
    assert_eq!(tb.encode(" the", false).expect("encode"), vec![258]);
    assert!(tb.is_eos(299));
    let msg = [wkvc_runtime::Message {
        role: "user".into(),
        content: "hi".into(),
    }];
    assert_eq!(
        ta.apply_chat_template(&msg).expect("tpl"),
        tb.apply_chat_template(&msg).expect("tpl")
    );
    assert_eq!(
        tb.apply_chat_template(&msg).expect("tpl"),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sentencepiece_vocab_becomes_bpe_with_byte_fallback() {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i32, 3, 3];
    let mut scores = vec![0f32, 0., 0.];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.);
    }
    for (t, s) in [
        ("▁", -1.0),
        ("a", -2.0),
        ("b", -3.0),
        ("▁a", -4.0),
        ("ab", -5.0),
        ("▁ab", -6.0),
    ] {
        tokens.push(t.into());
        types.push(1);
        scores.push(s);
    }
    let id = |t: &str| tokens.iter().position(|x| x == t).expect("token") as u32;
    let mut md = BTreeMap::new();
    md.insert(
        "tokenizer.ggml.model".to_string(),
        MetaValue::Str("llama".into()),
    );
    md.insert(
        "tokenizer.ggml.tokens".into(),
        MetaValue::Array(tokens.iter().map(|t| MetaValue::Str(t.clone())).collect()),
    );
    md.insert(
        "tokenizer.ggml.token_type".into(),
        MetaValue::Array(types.iter().map(|&t| MetaValue::I32(t)).collect()),
    );
    md.insert(
        "tokenizer.ggml.scores".into(),
        MetaValue::Array(scores.iter().map(|&s| MetaValue::F32(s)).collect()),
    );
    md.insert("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(1));
    md.insert("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(2));
    md.insert("tokenizer.ggml.unknown_token_id".into(), MetaValue::U32(0));
    let g = GgufFile {
        version: 3,
        metadata: md,
        tensors: vec![],
        alignment: 32,
        data_offset: 0,
    };
    let spec = gguf_tokenizer(&g).expect("spec");
    assert!(spec.add_bos, "llama tokenizers add BOS by default");
    let tok = wkvc_runtime::Tokenizer::from_spec(spec).expect("load");
    assert_eq!(
        tok.encode("ab ab", false).expect("e"),
        vec![id("▁ab"), id("▁ab")]
    );
    assert_eq!(tok.encode("ab", true).expect("e"), vec![1, id("▁ab")]);
    // 'c' is not in the vocabulary: byte fallback to <0x63>
    let ids = tok.encode("abc", false).expect("e");
    assert_eq!(ids, vec![id("▁ab"), id("<0x63>")]);
    assert_eq!(tok.decode(&ids, false).expect("d"), "abc");
    assert_eq!(
        tok.decode(&tok.encode("ba ab", false).expect("e"), false)
            .expect("d"),
        "ba ab"
    );
}

fn import_err(path: &Path) -> String {
    match import(path) {
        Ok(_) => panic!("{} imported but should fail", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_models_give_clear_errors() {
    let cfg = tiny_config("llama");
    let w = tiny_weights(&cfg, 2);
    let dir = temp_dir("bad");
    // unknown architecture (HF)
    let hf = dir.join("hf");
    write_hf_dir(&hf, &cfg, &w, StDtype::F32, 1);
    let c = std::fs::read_to_string(hf.join("config.json")).expect("read");
    std::fs::write(
        hf.join("config.json"),
        c.replace("LlamaForCausalLM", "GPTNeoXForCausalLM"),
    )
    .expect("write");
    let e = import_err(&hf);
    assert!(
        e.contains("unsupported architecture `GPTNeoXForCausalLM`"),
        "{e}"
    );
    // missing tensor
    let mut w2 = w.clone();
    w2.remove("model.layers.1.mlp.up_proj.weight");
    write_hf_dir(&dir.join("missing"), &cfg, &w2, StDtype::F32, 1);
    let e = import_err(&dir.join("missing"));
    assert!(
        e.contains("param @model.layers.1.mlp.up_proj.weight is not in the weight store"),
        "{e}"
    );
    // wrong shape
    let mut w3 = w.clone();
    w3.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        (vec![8, 32], vec![0.5; 256]),
    );
    write_hf_dir(&dir.join("shape"), &cfg, &w3, StDtype::F32, 1);
    let e = import_err(&dir.join("shape"));
    assert!(
        e.contains("k_proj.weight is declared f32[16,32] but the weight store holds f32[8,32]"),
        "{e}"
    );
    // no weights at all
    std::fs::create_dir_all(dir.join("empty")).expect("mkdir");
    std::fs::write(
        dir.join("empty/config.json"),
        "{\"architectures\": [\"LlamaForCausalLM\"]}",
    )
    .expect("w");
    let e = import_err(&dir.join("empty"));
    assert!(e.contains("hidden_size"), "{e}");
    // truncated safetensors
    let st = hf.join("model.safetensors");
    let bytes = std::fs::read(&st).expect("read");
    std::fs::write(&st, &bytes[..bytes.len() / 2]).expect("write");
    std::fs::write(hf.join("config.json"), c).expect("restore config");
    let e = import_err(&hf);
    assert!(e.contains("invalid safetensors file"), "{e}");
    // GGUF: bad magic, unknown architecture, truncated
    let g = dir.join("m.gguf");
    write_gguf(&g, &cfg, &w, true);
    let good = std::fs::read(&g).expect("read");
    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"GGML");
    std::fs::write(&g, &bad).expect("w");
    assert!(import_err(&g).contains("bad magic"));
    let arch_at = good
        .windows(5)
        .position(|x| x == b"llama")
        .expect("arch string");
    let mut bad = good.clone();
    bad[arch_at..arch_at + 5].copy_from_slice(b"gpt_j");
    std::fs::write(&g, &bad).expect("w");
    let e = import_err(&g);
    assert!(e.contains("unsupported architecture `gpt_j`"), "{e}");
    std::fs::write(&g, &good[..good.len() - 100]).expect("w");
    let e = import_err(&g);
    assert!(
        e.contains("runs past the end of the file") && e.contains("truncated"),
        "{e}"
    );
    assert!(import_err(&dir.join("nope.gguf")).contains("no such file"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupted_gguf_never_panics() {
    let cfg = tiny_config("llama");
    let w = tiny_weights(&cfg, 4);
    let dir = temp_dir("fuzz");
    let g = dir.join("m.gguf");
    write_gguf(&g, &cfg, &w, true);
    let good = std::fs::read(&g).expect("read");
    let f = dir.join("c.gguf");
    let mut errors = 0;
    let mut check = |bytes: &[u8]| {
        std::fs::write(&f, bytes).expect("write");
        // Ok (a flipped weight byte) or Err; a panic fails the test.
        if import(&f).is_err() {
            errors += 1;
        }
    };
    // every truncation point of the header and a stride through the data
    let header_end = good.len() - w.values().map(|(_, v)| v.len()).sum::<usize>();
    for cut in (0..header_end.min(good.len()))
        .step_by(7)
        .chain((header_end..good.len()).step_by(997))
    {
        check(&good[..cut]);
    }
    // single-byte corruptions across the header, with values that break lengths and types
    let mut r = Rng(99);
    for i in (0..header_end.min(good.len())).step_by(3) {
        let mut b = good.clone();
        b[i] = [0xFF, 0x00, 0x7F, 0x80, (r.next_u64() & 0xFF) as u8][i % 5];
        check(&b);
    }
    // random multi-byte corruption anywhere
    for _ in 0..300 {
        let mut b = good.clone();
        for _ in 0..4 {
            let i = r.below(b.len());
            b[i] = r.next_u64() as u8;
        }
        check(&b);
    }
    assert!(errors > 100, "most corruptions must be detected ({errors})");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `scripts/make-random-model.sh` (the bench tool for 1B-class shapes): the file it writes
/// opens with the asked shapes, tied or not, and runs; a bad option is a clear error and
/// leaves no file.
#[test]
fn random_model_generator_writes_the_asked_shapes() {
    let dir = std::env::temp_dir().join(format!("wkvc-rnd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bin = env!("CARGO_BIN_EXE_make-random-model");
    for (tied, layers) in [(true, 2usize), (false, 3)] {
        let out = dir.join(format!("r{layers}.gguf"));
        let mut cmd = std::process::Command::new(bin);
        cmd.args(["-o", out.to_str().expect("utf-8 path")]);
        for (k, v) in [
            ("--hidden", 128usize),
            ("--layers", layers),
            ("--heads", 4),
            ("--kv-heads", 2),
            ("--ffn", 320),
            ("--vocab", 700),
            ("--ctx", 256),
        ] {
            cmd.args([k, &v.to_string()]);
        }
        if !tied {
            cmd.arg("--untied");
        }
        let st = cmd.output().expect("runs");
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let m = Model::open(&out).expect("opens");
        let c = &m.config;
        assert_eq!(
            (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads),
            (128, layers, 4, 2)
        );
        assert_eq!(
            (c.intermediate_size, c.vocab_size, c.head_dim),
            (320, 700, 32)
        );
        assert_eq!(c.max_position_embeddings, 256);
        assert_eq!(c.tie_word_embeddings, tied);
        let e = m.engine(1).expect("engine");
        let mut s = e.session(8);
        let l = s.step(&[5, 6, 7]).expect("runs");
        assert_eq!(l.len(), 700);
        assert!(l.iter().all(|v| v.is_finite()));
    }
    let bad = dir.join("bad.gguf");
    let st = std::process::Command::new(bin)
        .args(["-o", bad.to_str().expect("utf-8"), "--heads", "5"])
        .output()
        .expect("runs");
    assert!(!st.status.success());
    assert!(String::from_utf8_lossy(&st.stderr).contains("multiple of --heads"));
    assert!(!bad.exists() && !bad.with_extension("gguf.tmp").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A GGUF file's tensors stay in the file (mapped, in their dtype) and are read as f32 on
/// demand; that must give exactly what reading the whole file into memory gives (Q8_0 and
/// F32 blocks, q/k rows un-permuted, unaligned f32 read by copy).
#[test]
fn mapped_gguf_weights_equal_the_in_memory_import() {
    let cfg = tiny_config("llama");
    let w = tiny_weights(&cfg, 5);
    let dir = temp_dir("gguf-mapped");
    for q8 in [false, true] {
        let path = dir.join(format!("m{q8}.gguf"));
        write_gguf(&path, &cfg, &w, q8);
        let mapped = import(&path).expect("mapped import");
        let bytes = std::fs::read(&path).expect("read");
        let owned = wkvc_ir::import::import_gguf_bytes(&path, &bytes).expect("in-memory import");
        assert_eq!(mapped.module.weights.len(), owned.module.weights.len());
        for (name, a) in owned.module.weights.iter() {
            let b = mapped.module.weights.get(name).expect("same names");
            assert!(b.is_mapped(), "{name} is read from the file");
            assert_eq!(a.shape, b.shape, "{name}");
            assert_eq!(a.dtype(), b.dtype(), "{name}");
            assert!(
                a.f32()[..] == b.f32()[..],
                "{name}: values differ (q8 {q8})"
            );
            assert!(
                a.bytes()[..] == b.bytes()[..],
                "{name}: bytes differ (q8 {q8})"
            );
            let mut streamed = Vec::new();
            b.visit_bytes(&mut |c| {
                streamed.extend_from_slice(c);
                Ok::<(), ()>(())
            })
            .expect("visit");
            assert!(
                streamed[..] == a.bytes()[..],
                "{name}: visited bytes differ"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The cache-less model gives the crate loader's ids on real text (the demo model's 49k BPE
/// vocabulary, WikiText-2 when `../shared/data` is present, else a built-in sample).
#[test]
fn demo_tokenizer_without_cache_encodes_as_the_crate_loader() {
    let Some(path) = wkvc_tests::demo_model() else {
        return;
    };
    let m = Model::open(&path).expect("demo model opens");
    let ts = m
        .tokenizer_spec
        .clone()
        .expect("the demo model carries a tokenizer");
    let raw = tokenizers::Tokenizer::from_str(&ts.json).expect("crate loader");
    let ours = wkvc_runtime::Tokenizer::from_spec(ts).expect("wkvc loader");
    let eval = wkvc_tests::repo_root().join("../shared/data/wikitext2-eval.txt");
    let text = match std::fs::read_to_string(&eval) {
        Ok(t) => t.chars().take(200_000).collect::<String>(),
        Err(_) => {
            eprintln!(
                "note: {} absent: a built-in sample text instead",
                eval.display()
            );
            "The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey \
             building. Its base is square, measuring 125 metres (410 ft) on each side. \
             Naïve café owners — and their 日本語 signs — don't mind.\n\n = Section = \n"
                .repeat(50)
        }
    };
    let t0 = std::time::Instant::now();
    let a = raw.encode(text.as_str(), false).expect("crate encode");
    let t1 = std::time::Instant::now();
    let b = ours.encode(&text, false).expect("wkvc encode");
    let t2 = std::time::Instant::now();
    eprintln!(
        "encode {} bytes: crate loader (word cache) {:.0} ms, wkvc (no cache) {:.0} ms",
        text.len(),
        (t1 - t0).as_secs_f64() * 1e3,
        (t2 - t1).as_secs_f64() * 1e3
    );
    assert_eq!(a.get_ids(), &b[..], "ids differ from the crate loader's");
    assert!(b.len() > 1000, "{} tokens", b.len());
    // and twice (a cache, if any, is warm the second time)
    assert_eq!(ours.encode(&text, false).expect("wkvc encode"), b);
    let back = ours.decode(&b, false).expect("decode");
    assert_eq!(back, text, "decode(encode(text)) != text");
}
