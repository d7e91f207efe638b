//! The demo model (SmolLM2-135M-Instruct GGUF) against the independent reference figures in
//! ../shared/reference (Hugging Face transformers, float32). Each test says when the model or
//! the reference is absent; scripts/test.sh makes both required.

use std::sync::OnceLock;
use wkvc_runtime::{Model, eval, sample::argmax};
use wkvc_tests::{data_dir, demo_model, max_abs_diff, reference_dir};

fn model() -> Option<&'static Model> {
    static M: OnceLock<Option<Model>> = OnceLock::new();
    M.get_or_init(|| demo_model().map(|p| Model::open(&p).expect("demo model opens")))
        .as_ref()
}

fn reference() -> Option<serde_json::Value> {
    let d = reference_dir()?;
    let text = std::fs::read_to_string(d.join("smollm2.json")).expect("read smollm2.json");
    Some(serde_json::from_str(&text).expect("parse smollm2.json"))
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn demo_model_is_the_reference_file() {
    let (Some(_), Some(r)) = (model(), reference()) else {
        return;
    };
    let p = demo_model().expect("model path");
    let bytes = std::fs::read(&p).expect("read model");
    use sha2::Digest;
    let got = format!("{:x}", sha2::Sha256::digest(&bytes));
    assert_eq!(got, r["model"]["sha256"].as_str().expect("sha256"));
}

#[test]
fn tokenizer_matches_reference_ids() {
    let (Some(m), Some(r)) = (model(), reference()) else {
        return;
    };
    let tok = m.tokenizer().expect("tokenizer");
    let text = r["tokenizer"]["text"].as_str().expect("text");
    let want = ids(&r["tokenizer"]["ids"]);
    let got = tok.encode(text, false).expect("encode");
    assert_eq!(got.len(), want.len(), "token count");
    assert_eq!(got, want);
    // and decoding gives the text back
    assert_eq!(tok.decode(&got, false).expect("decode"), text);
}

#[test]
fn greedy_continuation_matches_reference() {
    let (Some(m), Some(r)) = (model(), reference()) else {
        return;
    };
    let tok = m.tokenizer().expect("tokenizer");
    let prompt = r["greedy"]["prompt"].as_str().expect("prompt");
    let prompt_ids = ids(&r["greedy"]["prompt_ids"]);
    assert_eq!(tok.encode(prompt, false).expect("encode"), prompt_ids);
    let want = ids(&r["greedy"]["new_ids"]);
    let engine = m.engine(2).expect("engine");
    // The reference ran all 32 steps with end-of-sequence suppressed (min_new_tokens), so
    // greedy here masks the eos ids likewise (what `wkvc run --ignore-eos` does).
    let mut s = engine.session(256);
    let mut logits = s.prefill(&prompt_ids).expect("prefill");
    let mut got = Vec::new();
    let mut first_eos = None;
    for step in 0..want.len() {
        if first_eos.is_none() && tok.is_eos(argmax(&logits) as u32) {
            first_eos = Some(step);
        }
        for &e in &tok.spec.eos_ids {
            logits[e as usize] = f32::NEG_INFINITY;
        }
        let id = argmax(&logits) as u32;
        got.push(id);
        logits = s.prefill(&[id]).expect("decode step");
    }
    assert_eq!(got, want);
    // Unmasked, the model ends its answer with <|im_end|> after "...53." (step 29).
    assert_eq!(first_eos, Some(29));
    assert_eq!(
        tok.decode(&got, false).expect("decode"),
        r["greedy"]["new_text"].as_str().expect("new_text")
    );
}

#[test]
fn logits_match_reference() {
    let (Some(m), Some(dir)) = (model(), reference_dir()) else {
        return;
    };
    let bytes = std::fs::read(dir.join("smollm2-logits.safetensors")).expect("read logits");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let idv = st.tensor("ids").expect("ids");
    let want_ids: Vec<u32> = idv
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32)
        .collect();
    let lv = st.tensor("logits").expect("logits");
    let want: Vec<f32> = lv
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let r = reference().expect("reference json");
    let text = r["logits"]["text"].as_str().expect("text");
    assert_eq!(
        m.tokenizer()
            .expect("tok")
            .encode(text, false)
            .expect("encode"),
        want_ids
    );
    let engine = m.engine(2).expect("engine");
    let mut s = engine.session(64);
    let got = s.forward(&want_ids).expect("forward");
    let v = m.config.vocab_size;
    assert_eq!(got.len(), want.len());
    // float32 on both sides: differences come from summation order only. 1e-3 x max|logit|
    // is the acceptance bound; the argmax must agree at every position.
    let (d, scale) = max_abs_diff(&got, &want);
    eprintln!("max |logit diff| = {d:.3e}, max |logit| = {scale:.3}");
    assert!(d <= 1e-3 * scale, "max diff {d} > 1e-3 x {scale}");
    for t in 0..want_ids.len() {
        assert_eq!(
            argmax(&got[t * v..(t + 1) * v]),
            argmax(&want[t * v..(t + 1) * v]),
            "argmax differs at position {t}"
        );
    }
    // Incremental decoding gives the same logits as the batched forward.
    let mut s2 = engine.session(64);
    for (t, &id) in want_ids.iter().enumerate() {
        let l = s2.prefill(&[id]).expect("step");
        let (d, scale) = max_abs_diff(&l, &got[t * v..(t + 1) * v]);
        assert!(
            d <= 1e-4 * scale.max(1.0),
            "step {t}: incremental differs by {d}"
        );
    }
}

#[test]
fn perplexity_matches_reference() {
    let (Some(m), Some(r), Some(data)) = (model(), reference(), data_dir()) else {
        return;
    };
    let text = std::fs::read_to_string(data.join("wikitext2-eval.txt")).expect("read eval text");
    let ids = m
        .tokenizer()
        .expect("tok")
        .encode(&text, false)
        .expect("encode");
    let engine = m.engine(2).expect("engine");
    let rep = eval::perplexity(&engine, &ids, 512, Some(8), &mut |_, _| {}).expect("eval");
    let want = r["perplexity"]["fp32"].as_f64().expect("fp32 ppl");
    eprintln!("perplexity {} (reference {want})", rep.perplexity);
    assert_eq!(rep.tokens, 8 * 511);
    assert_eq!(rep.windows, 8);
    assert!(
        (rep.perplexity / want - 1.0).abs() <= 0.003,
        "perplexity {} is not within 0.3% of {want}",
        rep.perplexity
    );
}

#[test]
fn chat_template_renders_chatml() {
    let Some(m) = model() else { return };
    let tok = m.tokenizer().expect("tok");
    let s = tok
        .apply_chat_template(&[wkvc_runtime::Message {
            role: "user".into(),
            content: "Hi".into(),
        }])
        .expect("template");
    assert_eq!(
        s,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&s, true).expect("encode");
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
    assert!(tok.is_eos(2), "<|im_end|> ends generation");
}

#[test]
fn demo_graph_round_trips_through_text() {
    let Some(m) = model() else { return };
    let text = wkvc_ir::text::print(&m.module.graph);
    let back = wkvc_ir::text::parse(&text).expect("parse");
    assert_eq!(back, m.module.graph);
    assert_eq!(wkvc_ir::text::print(&back), text);
    m.module.verify().expect("verifies against the store");
    assert_eq!(m.module.weights.total_params(), 134_515_008);
}

#[test]
fn out_of_range_token_and_context_overflow_are_clean_errors() {
    let Some(m) = model() else { return };
    let engine = m.engine(2).expect("engine");
    let mut s = engine.session(8);
    let e = s.forward(&[49152]).expect_err("out of range");
    assert!(e.to_string().contains("out of range"), "{e}");
    s.forward(&[1, 2, 3, 4, 5, 6]).expect("fits");
    let e = s.forward(&[7, 8, 9]).expect_err("overflow");
    assert!(e.to_string().contains("context overflow"), "{e}");
    assert_eq!(s.len(), 6, "a failed step leaves the cache as it was");
    s.forward(&[7, 8]).expect("still fits exactly");
    assert_eq!(s.len(), 8);
}
