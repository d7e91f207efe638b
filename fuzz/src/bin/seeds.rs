//! `wkvc-fuzz-seeds [DEMO_GGUF]`: writes the seed corpora under `fuzz/corpus/TARGET/` from
//! real files: the fixtures' tiny models (GGUF, Hugging Face folders single and sharded, a
//! compiled plan, its manifest and graph texts), GGUF tensors of every supported block type,
//! the demo model's metadata (tokenizer arrays cut to a few hundred entries, so a seed stays
//! small) and chat template when the demo GGUF is given, request bodies and chat templates.
//! Deterministic: the same files on every run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use wkvc_fuzz::{HF_FILES, HF_SEP};
use wkvc_ir::gguf::{self, MetaValue};
use wkvc_runtime::Model;
use wkvc_runtime::compile::{self, CompileOptions};
use wkvc_tests::{
    Meta, StDtype, TINY_CHAT_TEMPLATE, put_meta, put_str, tiny_config, tiny_weights, write_gguf,
    write_hf_dir,
};

fn put(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("create corpus folder");
    std::fs::write(dir.join(name), bytes).expect("write seed");
    println!("{} ({} bytes)", dir.join(name).display(), bytes.len());
}

/// A GGUF of one small tensor per supported block type (random bytes, finite scales).
fn every_block_type() -> Vec<u8> {
    let types: [(u32, &str, usize, usize); 8] = [
        (0, "t.f32", 1, 4),
        (1, "t.f16", 1, 2),
        (30, "t.bf16", 1, 2),
        (2, "t.q4_0", 32, 18),
        (3, "t.q4_1", 32, 20),
        (8, "t.q8_0", 32, 34),
        (12, "t.q4_k", 256, 144),
        (14, "t.q6_k", 256, 210),
    ];
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(types.len() as u64).to_le_bytes());
    head.extend_from_slice(&2u64.to_le_bytes());
    put_meta(
        &mut head,
        "general.architecture",
        &Meta::Str("llama".into()),
    );
    put_meta(&mut head, "general.alignment", &Meta::U32(32));
    let mut data: Vec<u8> = Vec::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for (id, name, be, bb) in types {
        while !data.len().is_multiple_of(32) {
            data.push(0);
        }
        put_str(&mut head, name);
        head.extend_from_slice(&2u32.to_le_bytes());
        head.extend_from_slice(&(be as u64 * 2).to_le_bytes());
        head.extend_from_slice(&2u64.to_le_bytes());
        head.extend_from_slice(&id.to_le_bytes());
        head.extend_from_slice(&(data.len() as u64).to_le_bytes());
        for _ in 0..4 * bb {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // small bytes: f16/bf16 scales stay finite
            data.push((state as u8) & 0x3b);
        }
    }
    while !head.len().is_multiple_of(32) {
        head.push(0);
    }
    head.extend_from_slice(&data);
    head
}

fn meta_of(v: &MetaValue, keep: usize) -> Option<Meta> {
    Some(match v {
        MetaValue::U8(x) => Meta::U32(*x as u32),
        MetaValue::U16(x) => Meta::U32(*x as u32),
        MetaValue::U32(x) => Meta::U32(*x),
        MetaValue::I32(x) => Meta::U32(*x as u32),
        MetaValue::U64(x) => Meta::U32(*x as u32),
        MetaValue::F32(x) => Meta::F32(*x),
        MetaValue::F64(x) => Meta::F32(*x as f32),
        MetaValue::Bool(x) => Meta::Bool(*x),
        MetaValue::Str(s) => Meta::Str(s.clone()),
        MetaValue::Array(a) => match a.first() {
            Some(MetaValue::Str(_)) => Meta::Strs(
                a.iter()
                    .take(keep)
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect(),
            ),
            Some(MetaValue::F32(_)) => Meta::F32s(
                a.iter()
                    .take(keep)
                    .filter_map(|v| v.as_f64().map(|x| x as f32))
                    .collect(),
            ),
            Some(MetaValue::I32(_)) => Meta::I32s(
                a.iter()
                    .take(keep)
                    .filter_map(|v| v.as_u64().map(|x| x as i32))
                    .collect(),
            ),
            _ => return None,
        },
        _ => return None,
    })
}

/// The demo GGUF's metadata (arrays cut to `keep` entries) and no tensors.
fn demo_header(path: &Path, keep: usize) -> (Vec<u8>, Option<String>) {
    let map = std::fs::read(path).expect("read the demo GGUF");
    let g = gguf::parse(&map).expect("the demo GGUF parses");
    let entries: Vec<(String, Meta)> = g
        .metadata
        .iter()
        .filter_map(|(k, v)| meta_of(v, keep).map(|m| (k.clone(), m)))
        .collect();
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&0u64.to_le_bytes());
    head.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (k, v) in &entries {
        put_meta(&mut head, k, v);
    }
    let tpl = g
        .metadata
        .get("tokenizer.chat_template")
        .and_then(MetaValue::as_str)
        .map(String::from);
    (head, tpl)
}

fn hf_input(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, name) in HF_FILES.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(HF_SEP);
        }
        if let Ok(b) = std::fs::read(dir.join(name)) {
            out.extend_from_slice(&b);
        }
    }
    out
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let demo = std::env::args().nth(1).map(PathBuf::from);
    let tmp = std::env::temp_dir().join(format!("wkvc-fuzz-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("temp folder");

    // ---- models of the fixtures' tiny shapes (the smallest the importer takes whole)
    let mut cfg = tiny_config("llama");
    cfg.vocab_size = 260;
    cfg.hidden_size = 32;
    cfg.intermediate_size = 32;
    cfg.num_layers = 1;
    let w = tiny_weights(&cfg, 7);
    let g = tmp.join("tiny.gguf");
    write_gguf(&g, &cfg, &w, true);
    put(
        &root.join("gguf"),
        "tiny-q8_0.gguf",
        &std::fs::read(&g).expect("read"),
    );
    put(
        &root.join("gguf"),
        "every-block-type.gguf",
        &every_block_type(),
    );
    let mut qcfg = tiny_config("qwen2");
    qcfg.vocab_size = 260;
    qcfg.num_layers = 1;
    let qg = tmp.join("qwen2.gguf");
    write_gguf(&qg, &qcfg, &tiny_weights(&qcfg, 8), false);
    put(
        &root.join("gguf"),
        "tiny-qwen2-f32.gguf",
        &std::fs::read(&qg).expect("read"),
    );
    let mut templates: Vec<(String, String)> = vec![
        ("chatml.jinja".into(), TINY_CHAT_TEMPLATE.into()),
        (
            "llama3.jinja".into(),
            "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + \
             message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + \
             '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- \
             '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
                .into(),
        ),
        (
            "mistral.jinja".into(),
            "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != \
             (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate \
             user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' \
             %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == \
             'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
                .into(),
        ),
        (
            "macro-loop.jinja".into(),
            "{% macro m(n) %}{% if n > 0 %}{{ m(n - 1) }}{{ n }}{% endif %}{% endmacro %}\
             {% for i in range(3) %}{{ m(i) }}{% set ns = namespace(x=i) %}{{ ns.x }}\
             {% endfor %}{{ messages | length }}{{ messages[0].content.upper() }}"
                .into(),
        ),
    ];
    if let Some(d) = &demo {
        let (head, tpl) = demo_header(d, 300);
        put(&root.join("gguf"), "demo-metadata.gguf", &head);
        if let Some(t) = tpl {
            templates.push(("smollm2.jinja".into(), t));
        }
    }
    for (name, t) in &templates {
        put(&root.join("chat_template"), name, t.as_bytes());
    }

    for (shards, name) in [(1, "single"), (2, "sharded")] {
        let d = tmp.join(name);
        let _ = std::fs::create_dir_all(&d);
        write_hf_dir(&d, &cfg, &w, StDtype::BF16, shards);
        put(&root.join("hf"), &format!("{name}-bf16.hf"), &hf_input(&d));
    }

    // ---- a compiled plan of the tiny GGUF (W4 group 32, KV4, smoothing, past-only)
    let m = Model::open(&g).expect("the tiny GGUF opens");
    let o = CompileOptions {
        wgroup: 32,
        kvbits: 4,
        calib_tokens: Some(32),
        calib_window: 16,
        threads: 1,
        ..Default::default()
    };
    let data = compile::calibration_data(&m, &o, &mut |_| {}).expect("calibration data");
    let c = compile::quantize(&m, &o, Some(&data), &mut |_| {}).expect("compile");
    let man = compile::manifest(&m, &c, serde_json::Value::Null, String::new());
    let p = tmp.join("tiny.wkv");
    wkvc_runtime::plan::write(&p, &c.module, man).expect("write plan");
    let plan_bytes = std::fs::read(&p).expect("read plan");
    put(&root.join("plan"), "tiny-w4kv4.wkv", &plan_bytes);
    let (_, manifest) = wkvc_runtime::plan::open(&p).expect("the plan opens");
    let text = serde_json::to_string(&manifest).expect("manifest json");
    put(&root.join("manifest"), "tiny-w4kv4.json", text.as_bytes());
    put(
        &root.join("ir_text"),
        "tiny-w4kv4.ir",
        manifest.graph.as_bytes(),
    );
    if let Some(l) = &manifest.lowered {
        put(
            &root.join("ir_text"),
            "tiny-w4kv4-lowered.ir",
            l.graph.as_bytes(),
        );
    }
    let fp = Model::open(&g).expect("opens");
    put(
        &root.join("ir_text"),
        "tiny-fp.ir",
        wkvc_ir::text::print(&fp.module.graph).as_bytes(),
    );

    // ---- request bodies: the first byte picks the endpoint (0 chat, 1 completions,
    // 2 tokenize, 3 detokenize)
    let bodies: BTreeMap<&str, (u8, serde_json::Value)> = [
        (
            "chat.json",
            (
                0,
                serde_json::json!({"model": "tiny", "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                    "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 3,
                    "stop": ["\n", "."], "stream": true,
                    "stream_options": {"include_usage": true}}),
            ),
        ),
        (
            "completion.json",
            (
                1,
                serde_json::json!({"prompt": "Once upon a time", "max_tokens": 16,
                    "temperature": 0, "stop": "end", "n": 1, "ignore_eos": true}),
            ),
        ),
        (
            "completion-list.json",
            (
                1,
                serde_json::json!({"prompt": ["x"], "max_completion_tokens": 4}),
            ),
        ),
        (
            "tokenize.json",
            (
                2,
                serde_json::json!({"content": "Hello 123 <|im_start|>", "add_special": true}),
            ),
        ),
        (
            "detokenize.json",
            (3, serde_json::json!({"tokens": [1, 2, 3, 257, 258]})),
        ),
    ]
    .into_iter()
    .collect();
    for (name, (which, body)) in bodies {
        let mut b = vec![which];
        b.extend_from_slice(body.to_string().as_bytes());
        put(&root.join("request"), name, &b);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
