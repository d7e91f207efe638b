//! wkvc-tests holds the cross-crate integration tests and their fixtures: locating the demo
//! model and the shared reference figures, and writing tiny synthetic models as Hugging Face
//! directories and GGUF files (with llama.cpp's q/k row permutation) for import tests.

pub mod agree;
pub mod random_model;

use half::{bf16, f16};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use wkvc_ir::ModelConfig;

/// The repository root (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub use wkvc_testkit::{Group, skip};

/// `../shared/reference` beside the repository, if present (a skip of the reference checks,
/// said once, otherwise).
pub fn reference_dir() -> Option<PathBuf> {
    let d = repo_root().join("../shared/reference");
    if d.join("smollm2.json").exists() {
        return Some(d);
    }
    skip(Group::Reference, &format!("{} is absent", d.display()));
    None
}

/// `../shared/data` beside the repository (WikiText-2), if present (a skip of the reference
/// checks otherwise).
pub fn data_dir() -> Option<PathBuf> {
    let d = repo_root().join("../shared/data");
    if d.join("wikitext2-eval.txt").exists() {
        return Some(d);
    }
    skip(Group::Reference, &format!("{} is absent", d.display()));
    None
}

/// Calibration text for tests that compile the demo model: `$WKVC_TEST_CALIB` when set, none
/// (text sampled from the model) when `WKVC_TEST_SAMPLED` is set, else the WikiText-2
/// calibration split where `../shared/data` is present (sampled text without it). Checks that
/// use it must hold for any text.
pub fn calib_text() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WKVC_TEST_CALIB") {
        return Some(PathBuf::from(p));
    }
    if std::env::var_os("WKVC_TEST_SAMPLED").is_some() {
        return None;
    }
    let d = repo_root().join("../shared/data/wikitext2-calib.txt");
    d.exists().then_some(d)
}

/// The calibration seed of tests that compile (`$WKVC_TEST_SEED`, default 0).
pub fn test_seed() -> u64 {
    std::env::var("WKVC_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The demo GGUF (SmolLM2-135M-Instruct), fetched by scripts/fetch-demo-model.sh (a skip of
/// the demo-model checks, said once, when it is absent).
pub fn demo_model() -> Option<PathBuf> {
    let p = match std::env::var_os("WKVC_DEMO_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("WKVC_CACHE")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/wkvc")))
                .unwrap_or_else(|| PathBuf::from(".cache/wkvc"));
            cache.join("SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    if p.exists() {
        return Some(p);
    }
    skip(
        Group::DemoModel,
        &format!(
            "the demo model {} is absent (scripts/fetch-demo-model.sh fetches it)",
            p.display()
        ),
    );
    None
}

/// libnvrtc, when it can be found (a skip of the NVRTC checks otherwise).
pub fn nvrtc_present() -> bool {
    match wkvc_codegen::nvrtc::locate() {
        Ok(_) => true,
        Err(e) => {
            skip(Group::Nvrtc, &e.to_string());
            false
        }
    }
}

/// A deterministic pseudo-random generator (SplitMix64) for fixtures.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A tiny LLaMA config: 2 layers, GQA 4/2, head dim 8, vocab 300 (byte-level BPE below).
pub fn tiny_config(arch: &str) -> ModelConfig {
    ModelConfig {
        arch: arch.into(),
        vocab_size: 300,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: wkvc_ir::RopeScaling::None,
        rope_freq_factors: false,
        max_position_embeddings: 256,
        tie_word_embeddings: arch != "mistral",
        qkv_bias: arch == "qwen2",
    }
}

/// Random weights for `cfg`, HF names and layout.
pub fn tiny_weights(cfg: &ModelConfig, seed: u64) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut r = Rng(seed);
    let mut w = BTreeMap::new();
    let d = cfg.hidden_size;
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32, r: &mut Rng| {
        let n = shape.iter().product();
        let v = r.vec(n, scale).into_iter().map(|x| x + offset).collect();
        w.insert(name, (shape, v));
    };
    put(
        "model.embed_tokens.weight".into(),
        vec![cfg.vocab_size, d],
        1.0,
        0.0,
        &mut r,
    );
    put("model.norm.weight".into(), vec![d], 0.2, 1.0, &mut r);
    if !cfg.tie_word_embeddings {
        put(
            "lm_head.weight".into(),
            vec![cfg.vocab_size, d],
            0.3,
            0.0,
            &mut r,
        );
    }
    let s = 1.0 / (d as f32).sqrt();
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        put(
            format!("{p}.input_layernorm.weight"),
            vec![d],
            0.2,
            1.0,
            &mut r,
        );
        put(
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            0.2,
            1.0,
            &mut r,
        );
        put(
            format!("{p}.self_attn.q_proj.weight"),
            vec![cfg.q_dim(), d],
            2.0 * s,
            0.0,
            &mut r,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            vec![cfg.kv_dim(), d],
            2.0 * s,
            0.0,
            &mut r,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            vec![cfg.kv_dim(), d],
            s,
            0.0,
            &mut r,
        );
        if cfg.qkv_bias {
            put(
                format!("{p}.self_attn.q_proj.bias"),
                vec![cfg.q_dim()],
                0.5,
                0.0,
                &mut r,
            );
            put(
                format!("{p}.self_attn.k_proj.bias"),
                vec![cfg.kv_dim()],
                0.5,
                0.0,
                &mut r,
            );
            put(
                format!("{p}.self_attn.v_proj.bias"),
                vec![cfg.kv_dim()],
                0.5,
                0.0,
                &mut r,
            );
        }
        put(
            format!("{p}.self_attn.o_proj.weight"),
            vec![d, cfg.q_dim()],
            s,
            0.0,
            &mut r,
        );
        let fi = cfg.intermediate_size;
        put(
            format!("{p}.mlp.gate_proj.weight"),
            vec![fi, d],
            s,
            0.0,
            &mut r,
        );
        put(
            format!("{p}.mlp.up_proj.weight"),
            vec![fi, d],
            s,
            0.0,
            &mut r,
        );
        put(
            format!("{p}.mlp.down_proj.weight"),
            vec![d, fi],
            1.0 / (fi as f32).sqrt(),
            0.0,
            &mut r,
        );
    }
    w
}

/// A byte-level BPE vocabulary: 256 byte tokens (GPT-2 spelling), a few merges, 3 specials
/// at the end; returns (tokens, merges).
pub fn tiny_vocab(vocab: usize) -> (Vec<String>, Vec<(String, String)>) {
    let mut table = Vec::with_capacity(256);
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table.push(if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        });
    }
    let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    let merges_src = [
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("i", "n"),
        ("Ġ", "a"),
        ("e", "r"),
        ("o", "n"),
        ("Ġa", "n"),
    ];
    let mut merges = Vec::new();
    for (a, b) in merges_src {
        merges.push((a.to_string(), b.to_string()));
        tokens.push(format!("{a}{b}"));
    }
    while tokens.len() < vocab - 3 {
        tokens.push(format!("<unused{}>", tokens.len()));
    }
    tokens.push("<|endoftext|>".into());
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    (tokens, merges)
}

pub const TINY_CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// tokenizer.json text for `tiny_vocab`.
pub fn tiny_tokenizer_json(vocab: usize) -> String {
    let (tokens, merges) = tiny_vocab(vocab);
    let v: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<_> = (vocab - 3..vocab)
        .map(|i| json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": v, "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()}
    })
    .to_string()
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StDtype {
    F32,
    F16,
    BF16,
}

/// Write an HF directory: config.json, safetensors (one file, or `shards` files with an
/// index), tokenizer.json and tokenizer_config.json.
pub fn write_hf_dir(
    dir: &Path,
    cfg: &ModelConfig,
    weights: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    dtype: StDtype,
    shards: usize,
) {
    std::fs::create_dir_all(dir).expect("create dir");
    let arch = match cfg.arch.as_str() {
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        _ => "LlamaForCausalLM",
    };
    let config = json!({
        "architectures": [arch], "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config");
    let bytes: BTreeMap<&String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(n, (s, v))| {
            let (dt, b) = match dtype {
                StDtype::F32 => (
                    safetensors::Dtype::F32,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
                StDtype::F16 => (
                    safetensors::Dtype::F16,
                    v.iter()
                        .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                        .collect(),
                ),
                StDtype::BF16 => (
                    safetensors::Dtype::BF16,
                    v.iter()
                        .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                        .collect(),
                ),
            };
            (n, (dt, s.clone(), b))
        })
        .collect();
    let names: Vec<&&String> = bytes.keys().collect();
    let shards = shards.max(1);
    let mut weight_map = serde_json::Map::new();
    for si in 0..shards {
        let part: Vec<(String, safetensors::tensor::TensorView<'_>)> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == si)
            .map(|(_, n)| {
                let (dt, s, b) = &bytes[**n];
                (
                    (**n).clone(),
                    safetensors::tensor::TensorView::new(*dt, s.clone(), b).expect("view"),
                )
            })
            .collect();
        let fname = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, shards)
        };
        for (n, _) in &part {
            weight_map.insert(n.clone(), json!(fname));
        }
        safetensors::serialize_to_file(part, None, &dir.join(&fname)).expect("write safetensors");
    }
    if shards > 1 {
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            json!({"metadata": {}, "weight_map": weight_map}).to_string(),
        )
        .expect("write index");
    }
    std::fs::write(
        dir.join("tokenizer.json"),
        tiny_tokenizer_json(cfg.vocab_size),
    )
    .expect("write tokenizer");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false,
               "chat_template": TINY_CHAT_TEMPLATE})
        .to_string(),
    )
    .expect("write tokenizer_config");
}

// ------------------------------------------------------------------ GGUF writer

/// A GGUF string: u64 length, bytes.
pub fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

/// A GGUF metadata entry: key, type, value.
pub fn put_meta(b: &mut Vec<u8>, key: &str, v: &Meta) {
    put_str(b, key);
    match v {
        Meta::U32(x) => {
            b.extend_from_slice(&4u32.to_le_bytes());
            b.extend_from_slice(&x.to_le_bytes());
        }
        Meta::F32(x) => {
            b.extend_from_slice(&6u32.to_le_bytes());
            b.extend_from_slice(&x.to_le_bytes());
        }
        Meta::Bool(x) => {
            b.extend_from_slice(&7u32.to_le_bytes());
            b.push(*x as u8);
        }
        Meta::Str(s) => {
            b.extend_from_slice(&8u32.to_le_bytes());
            put_str(b, s);
        }
        Meta::Strs(v) => {
            b.extend_from_slice(&9u32.to_le_bytes());
            b.extend_from_slice(&8u32.to_le_bytes());
            b.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for s in v {
                put_str(b, s);
            }
        }
        Meta::I32s(v) => {
            b.extend_from_slice(&9u32.to_le_bytes());
            b.extend_from_slice(&5u32.to_le_bytes());
            b.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for x in v {
                b.extend_from_slice(&x.to_le_bytes());
            }
        }
        Meta::F32s(v) => {
            b.extend_from_slice(&9u32.to_le_bytes());
            b.extend_from_slice(&6u32.to_le_bytes());
            b.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for x in v {
                b.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// Quantize one row to Q8_0 blocks (llama.cpp's reference quantizer).
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in x.chunks(32) {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        for v in blk {
            out.push(((v * id).round() as i32).clamp(-128, 127) as i8 as u8);
        }
    }
    out
}

/// Permute q/k rows as llama.cpp's converter does (inverse of wkvc's unpermute).
pub fn permute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for t in 0..2 {
                let dst = h * hd + 2 * i + t;
                let src = h * hd + t * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn hf_to_gguf_name(n: &str) -> String {
    match n {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = n.strip_prefix("model.layers.").expect("layer tensor");
            let (l, t) = rest.split_once('.').expect("layer index");
            let m = match t {
                "input_layernorm.weight" => "attn_norm.weight",
                "post_attention_layernorm.weight" => "ffn_norm.weight",
                "self_attn.q_proj.weight" => "attn_q.weight",
                "self_attn.k_proj.weight" => "attn_k.weight",
                "self_attn.v_proj.weight" => "attn_v.weight",
                "self_attn.q_proj.bias" => "attn_q.bias",
                "self_attn.k_proj.bias" => "attn_k.bias",
                "self_attn.v_proj.bias" => "attn_v.bias",
                "self_attn.o_proj.weight" => "attn_output.weight",
                "mlp.gate_proj.weight" => "ffn_gate.weight",
                "mlp.up_proj.weight" => "ffn_up.weight",
                "mlp.down_proj.weight" => "ffn_down.weight",
                other => panic!("unknown tensor {other}"),
            };
            format!("blk.{l}.{m}")
        }
    }
}

/// GGUF metadata of a model: the architecture's shapes and a byte-level BPE tokenizer of its
/// vocabulary size (`tiny_vocab`), as `write_gguf` and `make-random-model` write them.
pub fn gguf_meta(cfg: &ModelConfig, name: &str) -> Vec<(String, Meta)> {
    let arch = cfg.arch.as_str();
    let (tokens, merges) = tiny_vocab(cfg.vocab_size);
    let mut types = vec![1i32; tokens.len()];
    for t in types.iter_mut().skip(cfg.vocab_size - 3) {
        *t = 3;
    }
    let k = |s: &str| format!("{arch}.{s}");
    vec![
        ("general.architecture".into(), Meta::Str(arch.into())),
        ("general.name".into(), Meta::Str(name.into())),
        (k("block_count"), Meta::U32(cfg.num_layers as u32)),
        (
            k("context_length"),
            Meta::U32(cfg.max_position_embeddings as u32),
        ),
        (k("embedding_length"), Meta::U32(cfg.hidden_size as u32)),
        (
            k("feed_forward_length"),
            Meta::U32(cfg.intermediate_size as u32),
        ),
        (k("attention.head_count"), Meta::U32(cfg.num_heads as u32)),
        (
            k("attention.head_count_kv"),
            Meta::U32(cfg.num_kv_heads as u32),
        ),
        (k("rope.dimension_count"), Meta::U32(cfg.head_dim as u32)),
        (k("rope.freq_base"), Meta::F32(cfg.rope_theta as f32)),
        (k("vocab_size"), Meta::U32(cfg.vocab_size as u32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Meta::F32(cfg.rms_norm_eps as f32),
        ),
        ("general.alignment".into(), Meta::U32(32)),
        ("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Meta::Str("smollm".into())),
        ("tokenizer.ggml.tokens".into(), Meta::Strs(tokens.clone())),
        ("tokenizer.ggml.token_type".into(), Meta::I32s(types)),
        (
            "tokenizer.ggml.merges".into(),
            Meta::Strs(merges.iter().map(|(a, b)| format!("{a} {b}")).collect()),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Meta::U32(cfg.vocab_size as u32 - 2),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Meta::U32(cfg.vocab_size as u32 - 1),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Meta::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Meta::Str(TINY_CHAT_TEMPLATE.into()),
        ),
    ]
}

/// A GGUF v3 header up to the tensor infos: magic, version, counts, metadata.
pub fn gguf_head(meta: &[(String, Meta)], tensors: usize) -> Vec<u8> {
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors as u64).to_le_bytes());
    head.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (key, v) in meta {
        put_meta(&mut head, key, v);
    }
    head
}

/// Write a GGUF v3 file of the tiny model: 2-D weights as Q8_0 when `q8` (else F32), norms
/// F32, q/k permuted as llama.cpp does, byte-level BPE tokenizer metadata.
pub fn write_gguf(
    path: &Path,
    cfg: &ModelConfig,
    weights: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    q8: bool,
) {
    let mut head = gguf_head(&gguf_meta(cfg, "tiny"), weights.len());
    let mut data: Vec<u8> = Vec::new();
    for (name, (shape, v)) in weights {
        let gname = hf_to_gguf_name(name);
        let mut vals = v.clone();
        let rows = shape[0];
        let cols = if shape.len() > 1 { shape[1] } else { 1 };
        if name.contains("q_proj") {
            vals = permute_rows(&vals, rows, cols, cfg.num_heads);
        } else if name.contains("k_proj") {
            vals = permute_rows(&vals, rows, cols, cfg.num_kv_heads);
        }
        let (ty, bytes): (u32, Vec<u8>) = if q8 && shape.len() == 2 && cols % 32 == 0 {
            (8, vals.chunks(cols).flat_map(quantize_q8_0).collect())
        } else {
            (0, vals.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        while !data.len().is_multiple_of(32) {
            data.push(0);
        }
        put_str(&mut head, &gname);
        head.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&ty.to_le_bytes());
        head.extend_from_slice(&(data.len() as u64).to_le_bytes());
        data.extend_from_slice(&bytes);
    }
    while !head.len().is_multiple_of(32) {
        head.push(0);
    }
    head.extend_from_slice(&data);
    std::fs::write(path, head).expect("write gguf");
}

/// Dequantize Q8_0 bytes as llama.cpp does (what a Q8_0 GGUF means in f32).
pub fn dequantize_q8_0(b: &[u8]) -> Vec<f32> {
    b.chunks(34)
        .flat_map(|c| {
            let d = f16::from_le_bytes([c[0], c[1]]).to_f32();
            c[2..].iter().map(move |&q| d * (q as i8) as f32)
        })
        .collect()
}

/// Max |a-b| and max |b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let s = b.iter().fold(0f32, |m, y| m.max(y.abs()));
    (d, s)
}

/// A new empty temporary directory under the target dir.
/// A tiny LLaMA GGUF with random weights in `dir` (head dim 32: the compiled kernels cover
/// it), for examples and doc-tests.
pub fn tiny_gguf(dir: &Path) -> PathBuf {
    let mut cfg = tiny_config("llama");
    cfg.head_dim = 32;
    cfg.hidden_size = 128;
    cfg.intermediate_size = 160;
    let path = dir.join("tiny.gguf");
    write_gguf(&path, &cfg, &tiny_weights(&cfg, 9), false);
    path
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("wkvc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}
