//! LLaMA-architecture models with random weights of given shapes, for speed and memory
//! measurements of models bigger than the demo (their text is noise): a GGUF file (F16
//! matrices, F32 norms) or a Hugging Face folder (bf16 safetensors, sharded). Written tensor
//! by tensor through a temporary name and renamed: memory stays small whatever the size.
//! `make-random-model` is the command line of this module; tests call it directly.
//!
//! Weights are uniform with the standard deviation of a trained model's (0.02), norms 1; the
//! tokenizer is a byte-level BPE vocabulary of the asked size (bytes, a few merges,
//! placeholders, and `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`).

use crate::{StDtype, gguf_head, gguf_meta, put_str, write_hf_dir};
use std::io::{BufWriter, Write};
use std::path::Path;
use wkvc_ir::ModelConfig;

/// The shapes (defaults: Llama-3.2-1B's, with SmolLM2's vocabulary size).
#[derive(Clone, Debug)]
pub struct RandomModel {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub ctx: usize,
    pub seed: u64,
    pub tied: bool,
    /// An HF folder of this many bf16 shards (0: a GGUF file).
    pub hf_shards: usize,
}

impl Default for RandomModel {
    fn default() -> Self {
        RandomModel {
            hidden: 2048,
            layers: 16,
            heads: 32,
            kv_heads: 8,
            ffn: 8192,
            vocab: 49152,
            ctx: 4096,
            seed: 1,
            tied: true,
            hf_shards: 0,
        }
    }
}

/// F16 (type 1) for matrices, F32 (type 0) for norms: (GGUF name, shape [rows, cols], type).
type Tensors = Vec<(String, Vec<usize>, u32)>;

impl RandomModel {
    /// Shapes the generator (and wkvc's kernels) accept, or what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.heads == 0
            || self.kv_heads == 0
            || !self.hidden.is_multiple_of(self.heads)
            || !self.heads.is_multiple_of(self.kv_heads)
        {
            return Err("--hidden must be a multiple of --heads, and --heads of --kv-heads".into());
        }
        if self.vocab < 300
            || self.layers == 0
            || self.ffn == 0
            || !self.hidden.is_multiple_of(32)
            || !self.ffn.is_multiple_of(32)
        {
            return Err(
                "--vocab at least 300; --layers, --ffn at least 1; --hidden, --ffn multiples of 32"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            arch: "llama".into(),
            vocab_size: self.vocab,
            hidden_size: self.hidden,
            intermediate_size: self.ffn,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.hidden / self.heads,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: wkvc_ir::RopeScaling::None,
            rope_freq_factors: false,
            max_position_embeddings: self.ctx,
            tie_word_embeddings: self.tied,
            qkv_bias: false,
        }
    }

    /// Parameters of one decoder block.
    pub fn block_params(&self) -> usize {
        let kvw = self.kv_heads * (self.hidden / self.heads);
        2 * self.hidden * self.hidden
            + 2 * kvw * self.hidden
            + 3 * self.ffn * self.hidden
            + 2 * self.hidden
    }

    /// All parameters.
    pub fn params(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum()
    }

    fn tensors(&self) -> Tensors {
        let hd = self.hidden / self.heads;
        let kvw = self.kv_heads * hd;
        let h = self.hidden;
        let mut t = vec![("token_embd.weight".to_string(), vec![self.vocab, h], 1)];
        for l in 0..self.layers {
            let b = |n: &str| format!("blk.{l}.{n}");
            t.push((b("attn_norm.weight"), vec![h], 0));
            t.push((b("attn_q.weight"), vec![h, h], 1));
            t.push((b("attn_k.weight"), vec![kvw, h], 1));
            t.push((b("attn_v.weight"), vec![kvw, h], 1));
            t.push((b("attn_output.weight"), vec![h, h], 1));
            t.push((b("ffn_norm.weight"), vec![h], 0));
            t.push((b("ffn_gate.weight"), vec![self.ffn, h], 1));
            t.push((b("ffn_up.weight"), vec![self.ffn, h], 1));
            t.push((b("ffn_down.weight"), vec![h, self.ffn], 1));
        }
        t.push(("output_norm.weight".to_string(), vec![h], 0));
        if !self.tied {
            t.push(("output.weight".to_string(), vec![self.vocab, h], 1));
        }
        t
    }

    /// Write the model to `out` (a GGUF file, or with `hf_shards` an HF folder that must not
    /// exist); `progress(tensor, bytes so far)`. Returns the bytes of weights written.
    pub fn write(
        &self,
        out: &Path,
        progress: &mut dyn FnMut(&str, usize),
    ) -> Result<usize, String> {
        self.check()?;
        if self.hf_shards > 0 {
            self.write_hf(out, progress)
        } else {
            self.write_gguf(out, progress)
        }
    }

    fn write_gguf(
        &self,
        out: &Path,
        progress: &mut dyn FnMut(&str, usize),
    ) -> Result<usize, String> {
        let cfg = self.config();
        let ts = self.tensors();
        let meta = gguf_meta(&cfg, &format!("random-h{}-l{}", self.hidden, self.layers));
        let mut head = gguf_head(&meta, ts.len());
        let bytes = |shape: &[usize], ty: u32| {
            shape.iter().product::<usize>() * if ty == 1 { 2 } else { 4 }
        };
        let mut off = 0usize;
        let mut offsets = Vec::new();
        for (name, shape, ty) in &ts {
            off = off.next_multiple_of(32);
            put_str(&mut head, name);
            head.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                head.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            head.extend_from_slice(&ty.to_le_bytes());
            head.extend_from_slice(&(off as u64).to_le_bytes());
            offsets.push(off);
            off += bytes(shape, *ty);
        }
        while !head.len().is_multiple_of(32) {
            head.push(0);
        }
        let tmp = out.with_extension("gguf.tmp");
        let write = |progress: &mut dyn FnMut(&str, usize)| -> std::io::Result<()> {
            let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
            w.write_all(&head)?;
            let mut s = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut pos = 0usize;
            let mut buf = Vec::with_capacity(1 << 20);
            for ((name, shape, ty), at) in ts.iter().zip(&offsets) {
                w.write_all(&vec![0u8; at - pos])?;
                pos = *at;
                let n: usize = shape.iter().product();
                if *ty == 0 {
                    for _ in 0..n {
                        w.write_all(&1f32.to_le_bytes())?;
                    }
                } else {
                    let mut left = n;
                    while left > 0 {
                        let c = left.min(1 << 18);
                        buf.clear();
                        for _ in 0..c {
                            buf.extend_from_slice(
                                &half::f16::from_f32(uniform(&mut s)).to_le_bytes(),
                            );
                        }
                        w.write_all(&buf)?;
                        left -= c;
                    }
                }
                pos += bytes(shape, *ty);
                progress(name, pos);
            }
            w.flush()?;
            w.get_ref().sync_all()?;
            Ok(())
        };
        if let Err(e) = write(progress) {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("writing {}: {e}", tmp.display()));
        }
        if let Err(e) = std::fs::rename(&tmp, out) {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("renaming to {}: {e}", out.display()));
        }
        Ok(off)
    }

    fn write_hf(&self, out: &Path, progress: &mut dyn FnMut(&str, usize)) -> Result<usize, String> {
        if out.exists() {
            return Err(format!("{} exists: give a new folder", out.display()));
        }
        let ts = self.tensors();
        let tmp = out.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        let r = self.hf_into(&tmp, &ts, progress).and_then(|total| {
            std::fs::rename(&tmp, out)
                .map(|_| total)
                .map_err(|e| format!("renaming to {}: {e}", out.display()))
        });
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        r
    }

    fn hf_into(
        &self,
        dir: &Path,
        ts: &Tensors,
        progress: &mut dyn FnMut(&str, usize),
    ) -> Result<usize, String> {
        // config.json, tokenizer.json, tokenizer_config.json (its empty model.safetensors goes)
        write_hf_dir(dir, &self.config(), &Default::default(), StDtype::BF16, 1);
        let _ = std::fs::remove_file(dir.join("model.safetensors"));
        let shards = self.hf_shards.max(1);
        let total: usize = ts
            .iter()
            .map(|(_, s, _)| 2 * s.iter().product::<usize>())
            .sum();
        let per = total.div_ceil(shards).max(1);
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); shards];
        let mut acc = 0usize;
        for (i, (_, s, _)) in ts.iter().enumerate() {
            groups[(acc / per).min(shards - 1)].push(i);
            acc += 2 * s.iter().product::<usize>();
        }
        let mut state = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut weight_map = serde_json::Map::new();
        let mut done = 0usize;
        for (si, g) in groups.iter().enumerate() {
            let fname = if shards == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{shards:05}.safetensors", si + 1)
            };
            let mut infos = Vec::new();
            let mut off = 0usize;
            for &i in g {
                let (name, shape, _) = &ts[i];
                let n = 2 * shape.iter().product::<usize>();
                infos.push((
                    hf_name(name),
                    safetensors::tensor::TensorInfo {
                        dtype: safetensors::Dtype::BF16,
                        shape: shape.clone(),
                        data_offsets: (off, off + n),
                    },
                ));
                weight_map.insert(hf_name(name), serde_json::json!(fname));
                off += n;
            }
            let meta: std::collections::HashMap<String, String> =
                [("format".to_string(), "pt".to_string())]
                    .into_iter()
                    .collect();
            let header = safetensors::tensor::Metadata::new(Some(meta), infos)
                .map_err(|e| format!("shard header: {e}"))?;
            let mut header = serde_json::to_string(&header)
                .map_err(|e| format!("shard header: {e}"))?
                .into_bytes();
            header.resize(header.len().next_multiple_of(8), b' ');
            let path = dir.join(&fname);
            let mut write = || -> std::io::Result<()> {
                let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
                w.write_all(&(header.len() as u64).to_le_bytes())?;
                w.write_all(&header)?;
                let mut buf = Vec::with_capacity(1 << 20);
                for &i in g {
                    let (name, shape, ty) = &ts[i];
                    let n: usize = shape.iter().product();
                    let mut left = n;
                    while left > 0 {
                        let c = left.min(1 << 18);
                        buf.clear();
                        for _ in 0..c {
                            let v = if *ty == 0 { 1.0 } else { uniform(&mut state) };
                            buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                        }
                        w.write_all(&buf)?;
                        left -= c;
                    }
                    done += 2 * n;
                    progress(&hf_name(name), done);
                }
                w.flush()?;
                w.get_ref().sync_all()
            };
            write().map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        if shards > 1 {
            let index =
                serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())
                .map_err(|e| format!("writing the shard index: {e}"))?;
        }
        Ok(total)
    }
}

/// Uniform on [-a, a] with a = 0.02 sqrt(3) (standard deviation 0.02), from a xorshift state.
fn uniform(s: &mut u64) -> f32 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    let u = (*s >> 40) as f32 / (1u64 << 24) as f32;
    let a = 0.02f32 * 3f32.sqrt();
    (2.0 * u - 1.0) * a
}

/// The HF name of a GGUF tensor name of `tensors`.
fn hf_name(g: &str) -> String {
    let rest = match g {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => g.strip_prefix("blk.").unwrap_or(g),
    };
    let (l, t) = rest.split_once('.').unwrap_or(("0", rest));
    let t = match t {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        other => other,
    };
    format!("model.layers.{l}.{t}")
}
