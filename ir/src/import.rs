//! Model import: a Hugging Face directory (config.json + safetensors) or a GGUF file becomes
//! the same graph and weight store, plus the tokenizer (as tokenizer.json text) and chat
//! template.

use crate::config::{ModelConfig, RopeScaling};
use crate::gguf::{self, GgufFile, MetaValue};
use crate::graph::{Attr, Builder, Graph, OpKind, Operand, attrs, seq_f32};
use crate::types::{DType, Dim, TensorType};
use crate::verify::verify_with;
use crate::weights::{Weight, WeightStore};
use crate::{Error, Module};
use memmap2::Mmap;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The tokenizer of a model as a Hugging Face `tokenizer.json` text, plus what generation needs.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerSpec {
    pub json: String,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<u32>,
    /// End-of-generation ids (eos and, e.g., `<|im_end|>` for ChatML templates).
    pub eos_ids: Vec<u32>,
    pub add_bos: bool,
}

/// Where a module came from.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Source {
    pub path: PathBuf,
    /// "gguf" or "hf".
    pub format: String,
    pub file_bytes: u64,
    pub name: String,
}

/// An imported model: module (graph + weights), config, tokenizer, provenance.
pub struct Imported {
    pub module: Module,
    pub config: ModelConfig,
    pub tokenizer: Option<TokenizerSpec>,
    pub source: Source,
}

fn fmt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        cause: e,
    }
}

fn map_file(path: &Path) -> Result<Arc<Mmap>, Error> {
    crate::weights::map_file(path).map_err(|e| io_err(path, e))
}

/// Import a model from a GGUF file or a Hugging Face directory.
pub fn import(path: &Path) -> Result<Imported, Error> {
    if path.is_dir() {
        import_hf(path)
    } else if path.is_file() {
        import_gguf(path)
    } else {
        Err(io_err(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ))
    }
}

/// The FP graph of a LLaMA-family decoder, HF parameter names, layers unrolled.
pub fn build_graph(cfg: &ModelConfig, name: &str) -> Graph {
    let mut b = Builder::new(name);
    let d = cfg.hidden_size;
    let f32t = |s: &[usize]| TensorType::f32(s.iter().map(|&x| Dim::Const(x)).collect());
    let tokens = b.input("tokens", TensorType::new(DType::I32, vec![Dim::sym("seq")]));
    let pos = b.input(
        "positions",
        TensorType::new(DType::I32, vec![Dim::sym("seq")]),
    );
    let emb = b.param("model.embed_tokens.weight", f32t(&[cfg.vocab_size, d]));
    let mut x = b.push(
        OpKind::Embedding,
        vec![Operand::Value(tokens), emb.clone()],
        attrs([]),
        seq_f32(d),
    );
    let eps = Attr::Float(cfg.rms_norm_eps);
    let rope_attrs = |heads: usize| {
        let mut a = attrs([
            ("heads", Attr::Int(heads as i64)),
            ("head_dim", Attr::Int(cfg.head_dim as i64)),
            ("theta", Attr::Float(cfg.rope_theta)),
        ]);
        match &cfg.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                a.insert("scaling".into(), Attr::Str("linear".into()));
                a.insert("factor".into(), Attr::Float(*factor));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                a.insert("scaling".into(), Attr::Str("llama3".into()));
                a.insert("factor".into(), Attr::Float(*factor));
                a.insert("low_freq_factor".into(), Attr::Float(*low_freq_factor));
                a.insert("high_freq_factor".into(), Attr::Float(*high_freq_factor));
                a.insert(
                    "original_max_pos".into(),
                    Attr::Float(*original_max_position_embeddings),
                );
            }
        }
        a
    };
    let freq = cfg
        .rope_freq_factors
        .then(|| b.param("rope_freqs.weight", f32t(&[cfg.head_dim / 2])));
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let ln1 = b.param(&format!("{p}.input_layernorm.weight"), f32t(&[d]));
        let h = b.push(
            OpKind::RmsNorm,
            vec![Operand::Value(x), ln1],
            attrs([("eps", eps.clone())]),
            seq_f32(d),
        );
        let proj = |b: &mut Builder, n: &str, out: usize, bias: bool| {
            let w = b.param(&format!("{p}.{n}.weight"), f32t(&[out, d]));
            let mut args = vec![Operand::Value(h), w];
            if bias {
                args.push(b.param(&format!("{p}.{n}.bias"), f32t(&[out])));
            }
            b.push(OpKind::Linear, args, attrs([]), seq_f32(out))
        };
        let q = proj(&mut b, "self_attn.q_proj", cfg.q_dim(), cfg.qkv_bias);
        let k = proj(&mut b, "self_attn.k_proj", cfg.kv_dim(), cfg.qkv_bias);
        let v = proj(&mut b, "self_attn.v_proj", cfg.kv_dim(), cfg.qkv_bias);
        let rope = |b: &mut Builder, x, heads: usize, width: usize| {
            let mut args = vec![Operand::Value(x), Operand::Value(pos)];
            if let Some(f) = &freq {
                args.push(f.clone());
            }
            b.push(OpKind::Rope, args, rope_attrs(heads), seq_f32(width))
        };
        let q = rope(&mut b, q, cfg.num_heads, cfg.q_dim());
        let k = rope(&mut b, k, cfg.num_kv_heads, cfg.kv_dim());
        let att = b.push(
            OpKind::Attention,
            vec![Operand::Value(q), Operand::Value(k), Operand::Value(v)],
            attrs([
                ("heads", Attr::Int(cfg.num_heads as i64)),
                ("kv_heads", Attr::Int(cfg.num_kv_heads as i64)),
                ("head_dim", Attr::Int(cfg.head_dim as i64)),
                ("layer", Attr::Int(l as i64)),
                ("causal", Attr::Bool(true)),
            ]),
            seq_f32(cfg.q_dim()),
        );
        let wo = b.param(
            &format!("{p}.self_attn.o_proj.weight"),
            f32t(&[d, cfg.q_dim()]),
        );
        let o = b.push(
            OpKind::Linear,
            vec![Operand::Value(att), wo],
            attrs([]),
            seq_f32(d),
        );
        let x1 = b.push(
            OpKind::Add,
            vec![Operand::Value(x), Operand::Value(o)],
            attrs([]),
            seq_f32(d),
        );
        let ln2 = b.param(&format!("{p}.post_attention_layernorm.weight"), f32t(&[d]));
        let h2 = b.push(
            OpKind::RmsNorm,
            vec![Operand::Value(x1), ln2],
            attrs([("eps", eps.clone())]),
            seq_f32(d),
        );
        let fi = cfg.intermediate_size;
        let wg = b.param(&format!("{p}.mlp.gate_proj.weight"), f32t(&[fi, d]));
        let wu = b.param(&format!("{p}.mlp.up_proj.weight"), f32t(&[fi, d]));
        let wd = b.param(&format!("{p}.mlp.down_proj.weight"), f32t(&[d, fi]));
        let g = b.push(
            OpKind::Linear,
            vec![Operand::Value(h2), wg],
            attrs([]),
            seq_f32(fi),
        );
        let u = b.push(
            OpKind::Linear,
            vec![Operand::Value(h2), wu],
            attrs([]),
            seq_f32(fi),
        );
        let s = b.push(
            OpKind::Silu,
            vec![Operand::Value(g)],
            attrs([]),
            seq_f32(fi),
        );
        let m = b.push(
            OpKind::Mul,
            vec![Operand::Value(s), Operand::Value(u)],
            attrs([]),
            seq_f32(fi),
        );
        let dn = b.push(
            OpKind::Linear,
            vec![Operand::Value(m), wd],
            attrs([]),
            seq_f32(d),
        );
        x = b.push(
            OpKind::Add,
            vec![Operand::Value(x1), Operand::Value(dn)],
            attrs([]),
            seq_f32(d),
        );
    }
    let lnf = b.param("model.norm.weight", f32t(&[d]));
    let h = b.push(
        OpKind::RmsNorm,
        vec![Operand::Value(x), lnf],
        attrs([("eps", eps)]),
        seq_f32(d),
    );
    let head = if cfg.tie_word_embeddings {
        emb
    } else {
        b.param("lm_head.weight", f32t(&[cfg.vocab_size, d]))
    };
    let logits = b.push(
        OpKind::Linear,
        vec![Operand::Value(h), head],
        attrs([]),
        seq_f32(cfg.vocab_size),
    );
    b.output("logits", logits);
    b.finish()
}

fn finish(
    path: &Path,
    cfg: ModelConfig,
    weights: WeightStore,
    tokenizer: Option<TokenizerSpec>,
    format: &str,
    name: String,
) -> Result<Imported, Error> {
    cfg.validate()
        .map_err(|e| fmt_err(path, format!("bad model config: {e}")))?;
    let last = format!("model.layers.{}.input_layernorm.weight", cfg.num_layers - 1);
    if !weights.contains(&last) {
        return Err(fmt_err(
            path,
            format!(
                "the config says {} layers but tensor `{last}` is missing",
                cfg.num_layers
            ),
        ));
    }
    let graph = build_graph(&cfg, &name);
    let st = |n: &str| weights.type_of(n);
    verify_with(&graph, Some(&st)).map_err(|e| fmt_err(path, e.to_string()))?;
    let file_bytes = if path.is_dir() {
        std::fs::read_dir(path)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    };
    Ok(Imported {
        module: Module { graph, weights },
        config: cfg,
        tokenizer,
        source: Source {
            path: path.to_path_buf(),
            format: format.into(),
            file_bytes,
            name,
        },
    })
}

// ---------------------------------------------------------------- GGUF

fn meta<'a>(g: &'a GgufFile, key: &str) -> Option<&'a MetaValue> {
    g.metadata.get(key)
}

fn meta_usize(path: &Path, g: &GgufFile, key: &str) -> Result<usize, Error> {
    meta(g, key)
        .and_then(MetaValue::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| {
            fmt_err(
                path,
                format!("GGUF metadata `{key}` is missing or not an integer"),
            )
        })
}

/// Undo llama.cpp's converter permutation of attn_q / attn_k rows: GGUF row
/// `h*hd + 2*i + t` holds HF row `h*hd + t*hd/2 + i`.
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for t in 0..2 {
                let src = h * hd + 2 * i + t;
                let dst = h * hd + t * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn gguf_to_hf_name(n: &str) -> Option<String> {
    Some(match n {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        "rope_freqs.weight" => "rope_freqs.weight".into(),
        _ => {
            let rest = n.strip_prefix("blk.")?;
            let (l, t) = rest.split_once('.')?;
            let l: usize = l.parse().ok()?;
            let m = match t {
                "attn_norm.weight" => "input_layernorm.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_q.bias" => "self_attn.q_proj.bias",
                "attn_k.bias" => "self_attn.k_proj.bias",
                "attn_v.bias" => "self_attn.v_proj.bias",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                _ => return None,
            };
            format!("model.layers.{l}.{m}")
        }
    })
}

/// Import a GGUF file. Its tensors stay in the file, in their own dtype (memory-mapped):
/// each is read as f32 when a pass or an engine needs it (f32 tensors in place, f16/bf16
/// widened, quantized blocks dequantized), so importing costs no memory for weights.
pub fn import_gguf(path: &Path) -> Result<Imported, Error> {
    let map = map_file(path)?;
    import_gguf_from(path, &map, Some(&map))
}

/// Import a GGUF file held in memory (`path` names it in errors). The weights are
/// dequantized to f32 copies: nothing borrows `map` after the call.
pub fn import_gguf_bytes(path: &Path, map: &[u8]) -> Result<Imported, Error> {
    import_gguf_from(path, map, None)
}

/// The first non-finite element of a GGUF tensor's data, read in parallel slices; a mapped
/// tensor's pages are released afterwards (checking a 15 GiB file costs one tensor's pages).
fn first_non_finite(t: gguf::GgmlType, data: &[u8], map: Option<&Arc<Mmap>>) -> Option<usize> {
    use rayon::prelude::*;
    let (be, bb) = t.block();
    let per = (1 << 20) / bb.max(1); // blocks per slice
    let bad = data
        .par_chunks(per * bb)
        .enumerate()
        .find_map_first(|(i, chunk)| {
            let bad = match t {
                // IEEE half: exponent all ones is inf or NaN
                gguf::GgmlType::F16 => chunk
                    .chunks_exact(2)
                    .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7C00 == 0x7C00),
                gguf::GgmlType::BF16 => chunk
                    .chunks_exact(2)
                    .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7F80 == 0x7F80),
                _ => gguf::dequantize(t, chunk)
                    .iter()
                    .position(|x| !x.is_finite()),
            };
            bad.map(|p| i * per * be + p)
        });
    // the whole range at once: slices released one by one would be mapped again by their
    // neighbours' fault-around
    if let Some(m) = map {
        let start = data.as_ptr() as usize - m.as_ptr() as usize;
        crate::weights::release_mapped(m, start, data.len());
    }
    bad
}

fn import_gguf_from(
    path: &Path,
    map: &[u8],
    mapped: Option<&Arc<Mmap>>,
) -> Result<Imported, Error> {
    let g = gguf::parse(map).map_err(|e| fmt_err(path, e))?;
    let arch = meta(&g, "general.architecture")
        .and_then(MetaValue::as_str)
        .ok_or_else(|| fmt_err(path, "GGUF metadata `general.architecture` is missing"))?
        .to_string();
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
        return Err(fmt_err(
            path,
            format!(
                "unsupported architecture `{arch}`: wkvc imports LLaMA-family models \
                 (llama, mistral, qwen2)"
            ),
        ));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let d = meta_usize(path, &g, &k("embedding_length"))?;
    let heads = meta_usize(path, &g, &k("attention.head_count"))?;
    let kv_heads = match meta(&g, &k("attention.head_count_kv")) {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| fmt_err(path, "attention.head_count_kv is not an integer"))?
            as usize,
        None => heads,
    };
    if heads == 0 || kv_heads == 0 || d % heads != 0 {
        return Err(fmt_err(
            path,
            format!("bad head counts: embedding {d}, heads {heads}, kv heads {kv_heads}"),
        ));
    }
    let head_dim = match meta(&g, &k("attention.key_length")).and_then(MetaValue::as_u64) {
        Some(v) => v as usize,
        None => d / heads,
    };
    let tokens = meta(&g, "tokenizer.ggml.tokens").and_then(MetaValue::as_array);
    let find = |n: &str| g.tensors.iter().find(|t| t.name == n);
    let emb_info = find("token_embd.weight")
        .ok_or_else(|| fmt_err(path, "missing tensor `token_embd.weight`"))?;
    let vocab = match meta(&g, &k("vocab_size")).and_then(MetaValue::as_u64) {
        Some(v) => v as usize,
        None => tokens
            .map(|t| t.len())
            .unwrap_or(emb_info.dims.get(1).copied().unwrap_or(0) as usize),
    };
    let rope_scaling = match meta(&g, &k("rope.scaling.type")).and_then(MetaValue::as_str) {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: meta(&g, &k("rope.scaling.factor"))
                .and_then(MetaValue::as_f64)
                .ok_or_else(|| fmt_err(path, "rope.scaling.factor is missing"))?,
        },
        Some(other) => {
            return Err(fmt_err(
                path,
                format!("unsupported rope scaling type `{other}`"),
            ));
        }
    };
    let cfg = ModelConfig {
        arch: arch.clone(),
        vocab_size: vocab,
        hidden_size: d,
        intermediate_size: meta_usize(path, &g, &k("feed_forward_length"))?,
        num_layers: meta_usize(path, &g, &k("block_count"))?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: meta(&g, &k("attention.layer_norm_rms_epsilon"))
            .and_then(MetaValue::as_f64)
            .ok_or_else(|| fmt_err(path, "attention.layer_norm_rms_epsilon is missing"))?,
        rope_theta: meta(&g, &k("rope.freq_base"))
            .and_then(MetaValue::as_f64)
            .unwrap_or(10000.0),
        rope_scaling,
        rope_freq_factors: find("rope_freqs.weight").is_some(),
        max_position_embeddings: meta(&g, &k("context_length"))
            .and_then(MetaValue::as_u64)
            .unwrap_or(2048) as usize,
        tie_word_embeddings: find("output.weight").is_none(),
        qkv_bias: find("blk.0.attn_q.bias").is_some(),
    };
    let mut weights = WeightStore::new();
    for t in &g.tensors {
        let Some(name) = gguf_to_hf_name(&t.name) else {
            tracing::warn!(
                "ignoring GGUF tensor `{}` (not part of the model graph)",
                t.name
            );
            continue;
        };
        let data = &map[t.offset..t.offset + t.nbytes];
        let shape = t.shape();
        if let Some(bad) = first_non_finite(t.ggml_type, data, mapped) {
            return Err(fmt_err(
                path,
                format!(
                    "tensor `{}` holds a non-finite value at element {bad}",
                    t.name
                ),
            ));
        }
        let is_q = t.name.ends_with("attn_q.weight") || t.name.ends_with("attn_q.bias");
        let is_k = t.name.ends_with("attn_k.weight") || t.name.ends_with("attn_k.bias");
        let mut unpermute = None;
        if is_q || is_k {
            let h = if is_q { heads } else { kv_heads };
            let rows = shape[0];
            if rows % h != 0 || (rows / h) % 2 != 0 {
                return Err(fmt_err(
                    path,
                    format!(
                        "tensor `{}` has {rows} rows: not {h} heads of even size",
                        t.name
                    ),
                ));
            }
            unpermute = Some(h);
        }
        let w = match (mapped, t.ggml_type, unpermute) {
            (Some(m), gguf::GgmlType::F32, None) => {
                crate::weights::mapped_weight(shape, m.clone(), t.offset, DType::F32)
            }
            (Some(m), gguf::GgmlType::F16, None) => {
                Weight::mapped(shape, m.clone(), t.offset, DType::F16, DType::F32)
            }
            (Some(m), gguf::GgmlType::BF16, None) => {
                Weight::mapped(shape, m.clone(), t.offset, DType::BF16, DType::F32)
            }
            (Some(m), ty, _) => Weight::gguf(shape, m.clone(), t.offset, t.nbytes, ty, unpermute),
            (None, ty, _) => {
                let mut v = gguf::dequantize(ty, data);
                if let Some(h) = unpermute {
                    let cols = if shape.len() > 1 { shape[1] } else { 1 };
                    v = unpermute_rows(&v, shape[0], cols, h);
                }
                Weight::from_f32(shape, v)
            }
        };
        weights.insert(name, w);
    }
    let tokenizer = match tokens {
        Some(_) => Some(gguf_tokenizer(&g).map_err(|e| fmt_err(path, e))?),
        None => None,
    };
    let name = meta(&g, "general.name")
        .and_then(MetaValue::as_str)
        .unwrap_or(&arch)
        .to_string();
    finish(path, cfg, weights, tokenizer, "gguf", name)
}

const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_regex(re: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false})
}

/// Rebuild a Hugging Face tokenizer.json from GGUF `tokenizer.ggml.*` metadata.
pub fn gguf_tokenizer(g: &GgufFile) -> Result<TokenizerSpec, String> {
    let model = meta(g, "tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .ok_or("GGUF metadata `tokenizer.ggml.model` is missing")?;
    let tokens: Vec<&str> = meta(g, "tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .ok_or("tokenizer.ggml.tokens is missing")?
        .iter()
        .map(|v| v.as_str().ok_or("tokenizer.ggml.tokens holds a non-string"))
        .collect::<Result<_, _>>()?;
    let types: Vec<i64> = match meta(g, "tokenizer.ggml.token_type").and_then(MetaValue::as_array) {
        Some(a) => a
            .iter()
            .map(|v| match v {
                MetaValue::I32(x) => *x as i64,
                other => other.as_u64().map(|x| x as i64).unwrap_or(1),
            })
            .collect(),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        ));
    }
    let id_of = |key: &str| {
        meta(g, key)
            .and_then(MetaValue::as_u64)
            .map(|v| v as u32)
            .filter(|&v| (v as usize) < tokens.len())
    };
    let bos_id = id_of("tokenizer.ggml.bos_token_id");
    let eos_id = id_of("tokenizer.ggml.eos_token_id");
    let unk_id = id_of("tokenizer.ggml.unknown_token_id");
    // Control (3) and user-defined (4) tokens are matched whole in text, as HF does.
    let mut added = Vec::new();
    for (i, (&t, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty == 3 || ty == 4 {
            added.push(
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == 3}),
            );
        }
    }
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let add_space_prefix = meta(g, "tokenizer.ggml.add_space_prefix")
        .and_then(MetaValue::as_bool)
        .unwrap_or(model == "llama");
    let doc = match model {
        "gpt2" => {
            let merges: Vec<Value> = meta(g, "tokenizer.ggml.merges")
                .and_then(MetaValue::as_array)
                .ok_or("tokenizer.ggml.merges is missing for a gpt2 (BPE) tokenizer")?
                .iter()
                .map(|m| {
                    let s = m
                        .as_str()
                        .ok_or("tokenizer.ggml.merges holds a non-string")?;
                    let (a, b) = s
                        .split_once(' ')
                        .ok_or_else(|| format!("bad merge `{s}`"))?;
                    Ok(json!([a, b]))
                })
                .collect::<Result<_, String>>()?;
            let pre = meta(g, "tokenizer.ggml.pre")
                .and_then(MetaValue::as_str)
                .unwrap_or("default");
            let pre_tok = match pre {
                "smollm" => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                "llama-bpe" | "llama3" | "smaug-bpe" => {
                    json!({"type": "Sequence", "pretokenizers": [
                    split_regex(LLAMA3_REGEX), byte_level(false)]})
                }
                "qwen2" => json!({"type": "Sequence", "pretokenizers": [
                    split_regex(QWEN2_REGEX), byte_level(false)]}),
                "default" | "gpt-2" | "gpt2" => byte_level(true),
                other => {
                    tracing::warn!(
                        "GGUF pre-tokenizer `{other}` is not known to wkvc; using the GPT-2 regex"
                    );
                    json!({"type": "Sequence", "pretokenizers": [split_regex(GPT2_REGEX), byte_level(false)]})
                }
            };
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added, "normalizer": null, "pre_tokenizer": pre_tok,
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": vocab, "merges": merges}
            })
        }
        "llama" => {
            let scores: Vec<f64> = meta(g, "tokenizer.ggml.scores")
                .and_then(MetaValue::as_array)
                .ok_or("tokenizer.ggml.scores is missing for a llama (SentencePiece) tokenizer")?
                .iter()
                .map(|v| v.as_f64().unwrap_or(0.0))
                .collect();
            if scores.len() != tokens.len() {
                return Err("tokenizer.ggml.scores and tokens differ in length".into());
            }
            let merges = spm_merges(&tokens, &types, &scores);
            let mut normalizers = vec![];
            if add_space_prefix {
                normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            normalizers.push(
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
            );
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let unk = unk_id.map(|i| tokens[i as usize]);
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": normalizers},
                "pre_tokenizer": null, "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                    "vocab": vocab, "merges": merges}
            })
        }
        other => {
            return Err(format!(
                "tokenizer model `{other}` is not supported (gpt2, llama)"
            ));
        }
    };
    let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
    for extra in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
        if let Some(i) = tokens.iter().position(|t| *t == extra)
            && !eos_ids.contains(&(i as u32))
        {
            eos_ids.push(i as u32);
        }
    }
    if let Some(i) = id_of("tokenizer.ggml.eot_token_id")
        && !eos_ids.contains(&i)
    {
        eos_ids.push(i);
    }
    Ok(TokenizerSpec {
        json: doc.to_string(),
        chat_template: meta(g, "tokenizer.chat_template")
            .and_then(MetaValue::as_str)
            .map(String::from),
        bos_token: bos_id.map(|i| tokens[i as usize].to_string()),
        eos_token: eos_id.map(|i| tokens[i as usize].to_string()),
        bos_id,
        eos_ids,
        add_bos: meta(g, "tokenizer.ggml.add_bos_token")
            .and_then(MetaValue::as_bool)
            .unwrap_or(model == "llama"),
    })
}

/// BPE merges of a SentencePiece vocabulary, as Hugging Face's converter derives them: every
/// split of a normal piece into two pieces of the vocabulary, ranked by the piece's score.
pub fn spm_merges(tokens: &[&str], types: &[i64], scores: &[f64]) -> Vec<Value> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut cands: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for (i, &t) in tokens.iter().enumerate() {
        if types[i] != 1 {
            continue;
        }
        for (pos, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(pos);
            if let (Some(&ia), Some(&ib)) = (index.get(a), index.get(b))
                && types[ia] == 1
                && types[ib] == 1
            {
                cands.push((scores[i], ia, ib, a, b));
            }
        }
    }
    cands.sort_by(|x, y| {
        y.0.partial_cmp(&x.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(x.1.cmp(&y.1))
            .then(x.2.cmp(&y.2))
    });
    cands.into_iter().map(|c| json!([c.3, c.4])).collect()
}

// ---------------------------------------------------------------- Hugging Face

fn cfg_usize(path: &Path, c: &Value, key: &str) -> Result<usize, Error> {
    c.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| fmt_err(path, format!("`{key}` is missing or not an integer")))
}

/// Parse an HF config.json into a ModelConfig.
pub fn hf_config(path: &Path, c: &Value) -> Result<ModelConfig, Error> {
    let archs: Vec<&str> = c
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let arch = match archs.first().copied() {
        Some("LlamaForCausalLM") => "llama",
        Some("MistralForCausalLM") => "mistral",
        Some("Qwen2ForCausalLM") => "qwen2",
        Some(other) => {
            return Err(fmt_err(
                path,
                format!(
                    "unsupported architecture `{other}`: wkvc imports LlamaForCausalLM, \
                     MistralForCausalLM and Qwen2ForCausalLM"
                ),
            ));
        }
        None => return Err(fmt_err(path, "`architectures` is missing")),
    };
    let d = cfg_usize(path, c, "hidden_size")?;
    let heads = cfg_usize(path, c, "num_attention_heads")?;
    if heads == 0 {
        return Err(fmt_err(path, "num_attention_heads must be positive"));
    }
    let kv = match c.get("num_key_value_heads") {
        Some(Value::Null) | None => heads,
        Some(_) => cfg_usize(path, c, "num_key_value_heads")?,
    };
    let head_dim = match c.get("head_dim").and_then(Value::as_u64) {
        Some(h) => h as usize,
        None => d / heads,
    };
    let f = |k: &str| c.get(k).and_then(Value::as_f64);
    let rope_scaling = match c.get("rope_scaling") {
        None | Some(Value::Null) => RopeScaling::None,
        Some(rs) => {
            let ty = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            let g = |k: &str| {
                rs.get(k)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| fmt_err(path, format!("rope_scaling.{k} is missing")))
            };
            match ty {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear {
                    factor: g("factor")?,
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: g("factor")?,
                    low_freq_factor: g("low_freq_factor")?,
                    high_freq_factor: g("high_freq_factor")?,
                    original_max_position_embeddings: g("original_max_position_embeddings")?,
                },
                other => {
                    return Err(fmt_err(
                        path,
                        format!("unsupported rope_scaling type `{other}`"),
                    ));
                }
            }
        }
    };
    Ok(ModelConfig {
        arch: arch.into(),
        vocab_size: cfg_usize(path, c, "vocab_size")?,
        hidden_size: d,
        intermediate_size: cfg_usize(path, c, "intermediate_size")?,
        num_layers: cfg_usize(path, c, "num_hidden_layers")?,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        rms_norm_eps: f("rms_norm_eps").unwrap_or(1e-6),
        rope_theta: f("rope_theta").unwrap_or(10000.0),
        rope_scaling,
        rope_freq_factors: false,
        max_position_embeddings: c
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .unwrap_or(2048) as usize,
        tie_word_embeddings: c
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        qkv_bias: arch == "qwen2"
            || c.get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
    })
}

fn read_json(path: &Path) -> Result<Value, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| fmt_err(path, format!("invalid JSON: {e}")))
}

fn load_safetensors(path: &Path, store: &mut WeightStore) -> Result<(), Error> {
    let map = map_file(path)?;
    let st = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| fmt_err(path, format!("invalid safetensors file: {e}")))?;
    let base = map.as_ptr() as usize;
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(fmt_err(
                    path,
                    format!("tensor `{name}` has dtype {other:?}; wkvc reads F32, F16 and BF16"),
                ));
            }
        };
        let offset = view.data().as_ptr() as usize - base;
        let shape = view.shape().to_vec();
        store.insert(
            name,
            Weight::mapped(shape, map.clone(), offset, dtype, DType::F32),
        );
    }
    Ok(())
}

fn hf_tokenizer(dir: &Path) -> Result<Option<TokenizerSpec>, Error> {
    let tj = dir.join("tokenizer.json");
    if !tj.exists() {
        return Ok(None);
    }
    let json = std::fs::read_to_string(&tj).map_err(|e| io_err(&tj, e))?;
    let doc: Value =
        serde_json::from_str(&json).map_err(|e| fmt_err(&tj, format!("invalid JSON: {e}")))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.exists() {
        read_json(&tc_path)?
    } else {
        Value::Null
    };
    let tok_str = |v: Option<&Value>| -> Option<String> {
        match v? {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
            _ => None,
        }
    };
    let bos_token = tok_str(tc.get("bos_token"));
    let eos_token = tok_str(tc.get("eos_token"));
    let mut ids: BTreeMap<String, u32> = BTreeMap::new();
    if let Some(a) = doc.get("added_tokens").and_then(Value::as_array) {
        for t in a {
            if let (Some(c), Some(i)) = (
                t.get("content").and_then(Value::as_str),
                t.get("id").and_then(Value::as_u64),
            ) {
                ids.insert(c.to_string(), i as u32);
            }
        }
    }
    let lookup = |s: &str| -> Option<u32> {
        ids.get(s).copied().or_else(|| {
            doc.pointer("/model/vocab")
                .and_then(|v| v.get(s))
                .and_then(Value::as_u64)
                .map(|v| v as u32)
        })
    };
    let mut eos_ids: Vec<u32> = eos_token.as_deref().and_then(lookup).into_iter().collect();
    for extra in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
        if let Some(i) = lookup(extra)
            && !eos_ids.contains(&i)
        {
            eos_ids.push(i);
        }
    }
    let chat_template = match tc.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(a)) => a
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(String::from),
        _ => {
            let p = dir.join("chat_template.jinja");
            std::fs::read_to_string(p).ok()
        }
    };
    Ok(Some(TokenizerSpec {
        json,
        chat_template,
        bos_id: bos_token.as_deref().and_then(lookup),
        bos_token,
        eos_token,
        eos_ids,
        add_bos: tc
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    }))
}

pub fn import_hf(dir: &Path) -> Result<Imported, Error> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(fmt_err(
            dir,
            "a folder without config.json: not a Hugging Face model directory (give a .gguf \
             file, a .wkv plan or a model directory)",
        ));
    }
    let c = read_json(&cfg_path)?;
    let cfg = hf_config(&cfg_path, &c)?;
    let mut weights = WeightStore::new();
    let index = dir.join("model.safetensors.index.json");
    let single = dir.join("model.safetensors");
    if index.exists() {
        let idx = read_json(&index)?;
        let wm = idx
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| fmt_err(&index, "`weight_map` is missing"))?;
        let mut files: Vec<&str> = wm.values().filter_map(Value::as_str).collect();
        files.sort();
        files.dedup();
        for f in files {
            if f.contains('/') || f.contains("..") {
                return Err(fmt_err(
                    &index,
                    format!("shard name `{f}` is not a plain file name"),
                ));
            }
            load_safetensors(&dir.join(f), &mut weights)?;
        }
        for (name, f) in wm {
            if !weights.contains(name) {
                return Err(fmt_err(
                    &index,
                    format!("tensor `{name}` is listed in shard {f} but not found there"),
                ));
            }
        }
    } else if single.exists() {
        load_safetensors(&single, &mut weights)?;
    } else {
        return Err(fmt_err(
            dir,
            "no model.safetensors or model.safetensors.index.json in this directory",
        ));
    }
    // A checkpoint that ties embeddings may still ship lm_head; keep the graph's choice.
    if cfg.tie_word_embeddings {
        weights.remove("lm_head.weight");
    }
    let tokenizer = hf_tokenizer(dir)?;
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| cfg.arch.clone());
    finish(dir, cfg, weights, tokenizer, "hf", name)
}
