//! Kernel specs: the fused kernel kinds that `passes::lower` creates (as `kernel` nodes) and
//! that every back end implements. A spec holds every constant its emitter specialises on;
//! its attributes are the node's attributes, so the text form prints and parses it.
//!
//! Reference semantics: each kind equals a subgraph of ordinary ops (documented per kind);
//! kernel tests run that subgraph in the interpreter against the generated code.

pub mod args;
mod reference;

use crate::graph::{Attr, Attrs, Node};
use serde::{Deserialize, Serialize};

/// Rows per weight tile of the CPU `qgemm` kernel's layout (the engine copies each
/// quantized GEMM's codes and scale/zero in tiles of this many rows, the last one padded).
pub const QGEMM_TILE: usize = 8;

/// How a quantized GEMM treats its activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Act {
    /// Exact: int4 codes dequantized in registers, f32 multiply-add.
    F32,
    /// Fast: activations quantized to int8 per block of 32 on the fly, int8 x int4 products
    /// summed in integers, per-block and per-group scales applied in f32.
    Int8,
}

impl Act {
    pub fn name(self) -> &'static str {
        match self {
            Act::F32 => "f32",
            Act::Int8 => "int8",
        }
    }

    pub fn parse(s: &str) -> Option<Act> {
        match s {
            "f32" => Some(Act::F32),
            "int8" => Some(Act::Int8),
            _ => None,
        }
    }
}

/// One fused kernel with its constants. Shapes are `[seq, ..]` with `seq` the rows of the
/// chunk being run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KernelSpec {
    /// `(ids: i32[s], @table: f32[V,dim]) -> f32[s,dim]` = `embedding`.
    Embed { vocab: usize, dim: usize },
    /// `(x, @w) -> f32[s,dim]` = `rms_norm`.
    RmsNorm { dim: usize, eps: f64 },
    /// `(x: f32[s,k], (@codes, @scales, @zeros) per part [, r: f32[s,N]]) -> f32[s,N]`,
    /// N = sum(parts): the `qlinear`s of one input side by side, plus `add(r, .)` when
    /// `residual`. Weights are packed int4 codes with f16 scale/zero per `group` columns.
    QGemm {
        k: usize,
        parts: Vec<usize>,
        bits: u32,
        group: i64,
        residual: bool,
        act: Act,
    },
    /// `(x: f32[s,k], @w per part [, r]) -> f32[s,N]`: `linear`s with f32 weights (FP models).
    Gemm {
        k: usize,
        parts: Vec<usize>,
        residual: bool,
    },
    /// `(gu: f32[s,2n]) -> f32[s,n]` = `mul(silu(gu[:, :n]), gu[:, n:])`.
    SiluMul { n: usize },
    /// `(qkv: f32[s,(H+2KV)*hd], pos: i32[s] [, @factors] [, @k_shift, @k_scale, @v_shift,
    /// @v_scale]) -> f32[s,(H+2KV)*hd]`: RoPE on the q and k columns (v unchanged) and, as a
    /// side effect, K/V of the chunk smoothed, quantized per (token, kv head) and appended to
    /// layer `layer`'s cache (`kv_bits` 16: kept in f32). The rope attributes (theta,
    /// scaling, ..) are those of the `rope` ops it replaces. `rotate` > 0: after RoPE, each q
    /// and k head times the orthonormal Hadamard matrix of `rotate`-blocks (the K/V rotation,
    /// `math::hadamard_in_place`'s order), before K is smoothed and quantized.
    RopeKv {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        rope_dim: usize,
        kv_bits: u32,
        smooth: bool,
        factors: bool,
        layer: i64,
        rotate: usize,
        /// channels per (scale, zero) group of the cache; 0: one group a kv head
        kv_group: usize,
    },
    /// `(qkv: f32[s,(H+2KV)*hd] [, smoothing x4]) -> f32[s,H*hd]` = causal `attention` of the
    /// chunk's q over the cached past (read packed, smoothing undone in registers) and the
    /// chunk's own FP k/v (past-only: quantized past, FP current token/chunk).
    Attention {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        kv_bits: u32,
        past_only: bool,
        smooth: bool,
        layer: i64,
        /// channels per (scale, zero) group of the cache; 0: one group a kv head
        kv_group: usize,
    },
    /// `(x: f32[s,dim], @w: f32[V,dim]) -> f32[s,V]` = the final `linear` (the engine may run
    /// only the rows it needs).
    /// With `act = int8` the engine keeps the table as int8 per 32 columns (symmetric, f32
    /// scale per block) and multiplies int8 activations (the fast path).
    Logits { vocab: usize, dim: usize, act: Act },
}

fn int(n: &Node, k: &str) -> Result<i64, String> {
    n.int_attr(k)
        .ok_or_else(|| format!("kernel attribute `{k}` (int) is missing"))
}

fn uint(n: &Node, k: &str) -> Result<usize, String> {
    let v = int(n, k)?;
    usize::try_from(v).map_err(|_| format!("kernel attribute `{k}` must be >= 0, found {v}"))
}

fn boolean(n: &Node, k: &str) -> Result<bool, String> {
    n.bool_attr(k)
        .ok_or_else(|| format!("kernel attribute `{k}` (bool) is missing"))
}

fn act(n: &Node) -> Result<Act, String> {
    match n.attr("act") {
        Some(Attr::Str(s)) => Act::parse(s).ok_or(format!("unknown activation mode `{s}`")),
        _ => Err("kernel attribute `act` is missing".into()),
    }
}

fn parts(n: &Node) -> Result<Vec<usize>, String> {
    match n.attr("parts") {
        Some(Attr::Ints(v)) if !v.is_empty() && v.iter().all(|&x| x > 0) => {
            Ok(v.iter().map(|&x| x as usize).collect())
        }
        _ => Err("kernel attribute `parts` must be a non-empty list of positive ints".into()),
    }
}

impl KernelSpec {
    /// The kind's name (`kind` attribute).
    pub fn kind(&self) -> &'static str {
        match self {
            KernelSpec::Embed { .. } => "embed",
            KernelSpec::RmsNorm { .. } => "rms_norm",
            KernelSpec::QGemm { .. } => "qgemm",
            KernelSpec::Gemm { .. } => "gemm",
            KernelSpec::SiluMul { .. } => "silu_mul",
            KernelSpec::RopeKv { .. } => "rope_kv",
            KernelSpec::Attention { .. } => "attention",
            KernelSpec::Logits { .. } => "logits",
        }
    }

    /// Read the spec of a `kernel` node.
    pub fn from_node(n: &Node) -> Result<KernelSpec, String> {
        let kind = match n.attr("kind") {
            Some(Attr::Str(s)) => s.as_str(),
            _ => return Err("kernel node without a string attribute `kind`".into()),
        };
        Ok(match kind {
            "embed" => KernelSpec::Embed {
                vocab: uint(n, "vocab")?,
                dim: uint(n, "dim")?,
            },
            "rms_norm" => KernelSpec::RmsNorm {
                dim: uint(n, "dim")?,
                eps: n
                    .float_attr("eps")
                    .ok_or("kernel attribute `eps` is missing")?,
            },
            "qgemm" => KernelSpec::QGemm {
                k: uint(n, "k")?,
                parts: parts(n)?,
                bits: uint(n, "bits")? as u32,
                group: int(n, "group")?,
                residual: boolean(n, "residual")?,
                act: act(n)?,
            },
            "gemm" => KernelSpec::Gemm {
                k: uint(n, "k")?,
                parts: parts(n)?,
                residual: boolean(n, "residual")?,
            },
            "silu_mul" => KernelSpec::SiluMul { n: uint(n, "n")? },
            "rope_kv" => KernelSpec::RopeKv {
                heads: uint(n, "heads")?,
                kv_heads: uint(n, "kv_heads")?,
                head_dim: uint(n, "head_dim")?,
                rope_dim: uint(n, "rope_dim")?,
                kv_bits: uint(n, "kv_bits")? as u32,
                smooth: boolean(n, "smooth")?,
                factors: boolean(n, "factors")?,
                layer: int(n, "layer")?,
                // absent in plans from before the K/V rotation
                rotate: match n.int_attr("rotate") {
                    None => 0,
                    Some(r) if r >= 0 => r as usize,
                    Some(r) => return Err(format!("attribute `rotate` must be >= 0, found {r}")),
                },
                kv_group: kv_group(n)?,
            },
            "attention" => KernelSpec::Attention {
                heads: uint(n, "heads")?,
                kv_heads: uint(n, "kv_heads")?,
                head_dim: uint(n, "head_dim")?,
                kv_bits: uint(n, "kv_bits")? as u32,
                past_only: boolean(n, "past_only")?,
                smooth: boolean(n, "smooth")?,
                layer: int(n, "layer")?,
                kv_group: kv_group(n)?,
            },
            "logits" => KernelSpec::Logits {
                vocab: uint(n, "vocab")?,
                dim: uint(n, "dim")?,
                act: act(n)?,
            },
            k => return Err(format!("unknown kernel kind `{k}`")),
        })
    }

    /// The spec as node attributes (what `from_node` reads back).
    pub fn attrs(&self) -> Attrs {
        let mut a = Attrs::new();
        let mut put = |k: &str, v: Attr| {
            a.insert(k.to_string(), v);
        };
        put("kind", Attr::Str(self.kind().into()));
        let ints = |v: &[usize]| Attr::Ints(v.iter().map(|&x| x as i64).collect());
        match self {
            KernelSpec::Embed { vocab, dim } => {
                put("vocab", Attr::Int(*vocab as i64));
                put("dim", Attr::Int(*dim as i64));
            }
            KernelSpec::Logits { vocab, dim, act } => {
                put("vocab", Attr::Int(*vocab as i64));
                put("dim", Attr::Int(*dim as i64));
                put("act", Attr::Str(act.name().into()));
            }
            KernelSpec::RmsNorm { dim, eps } => {
                put("dim", Attr::Int(*dim as i64));
                put("eps", Attr::Float(*eps));
            }
            KernelSpec::QGemm {
                k,
                parts,
                bits,
                group,
                residual,
                act,
            } => {
                put("k", Attr::Int(*k as i64));
                put("parts", ints(parts));
                put("bits", Attr::Int(*bits as i64));
                put("group", Attr::Int(*group));
                put("residual", Attr::Bool(*residual));
                put("act", Attr::Str(act.name().into()));
            }
            KernelSpec::Gemm { k, parts, residual } => {
                put("k", Attr::Int(*k as i64));
                put("parts", ints(parts));
                put("residual", Attr::Bool(*residual));
            }
            KernelSpec::SiluMul { n } => put("n", Attr::Int(*n as i64)),
            KernelSpec::RopeKv {
                heads,
                kv_heads,
                head_dim,
                rope_dim,
                kv_bits,
                smooth,
                factors,
                layer,
                rotate,
                kv_group,
            } => {
                put("heads", Attr::Int(*heads as i64));
                put("kv_heads", Attr::Int(*kv_heads as i64));
                put("head_dim", Attr::Int(*head_dim as i64));
                put("rope_dim", Attr::Int(*rope_dim as i64));
                put("kv_bits", Attr::Int(*kv_bits as i64));
                put("smooth", Attr::Bool(*smooth));
                put("factors", Attr::Bool(*factors));
                put("layer", Attr::Int(*layer));
                if *rotate > 0 {
                    put("rotate", Attr::Int(*rotate as i64));
                }
                if *kv_group > 0 {
                    put("kv_group", Attr::Int(*kv_group as i64));
                }
            }
            KernelSpec::Attention {
                heads,
                kv_heads,
                head_dim,
                kv_bits,
                past_only,
                smooth,
                layer,
                kv_group,
            } => {
                put("heads", Attr::Int(*heads as i64));
                put("kv_heads", Attr::Int(*kv_heads as i64));
                put("head_dim", Attr::Int(*head_dim as i64));
                put("kv_bits", Attr::Int(*kv_bits as i64));
                put("past_only", Attr::Bool(*past_only));
                put("smooth", Attr::Bool(*smooth));
                put("layer", Attr::Int(*layer));
                if *kv_group > 0 {
                    put("kv_group", Attr::Int(*kv_group as i64));
                }
            }
        }
        a
    }

    /// Operand count the kind expects.
    pub fn arity(&self) -> usize {
        match self {
            KernelSpec::Embed { .. } | KernelSpec::RmsNorm { .. } | KernelSpec::Logits { .. } => 2,
            KernelSpec::QGemm {
                parts, residual, ..
            } => 1 + 3 * parts.len() + *residual as usize,
            KernelSpec::Gemm {
                parts, residual, ..
            } => 1 + parts.len() + *residual as usize,
            KernelSpec::SiluMul { .. } => 1,
            KernelSpec::RopeKv {
                smooth, factors, ..
            } => 2 + *factors as usize + 4 * *smooth as usize,
            KernelSpec::Attention { smooth, .. } => 1 + 4 * *smooth as usize,
        }
    }

    /// Output columns.
    pub fn out_cols(&self) -> usize {
        match self {
            KernelSpec::Embed { dim, .. } | KernelSpec::RmsNorm { dim, .. } => *dim,
            KernelSpec::QGemm { parts, .. } | KernelSpec::Gemm { parts, .. } => parts.iter().sum(),
            KernelSpec::SiluMul { n } => *n,
            KernelSpec::RopeKv {
                heads,
                kv_heads,
                head_dim,
                ..
            } => (heads + 2 * kv_heads) * head_dim,
            KernelSpec::Attention {
                heads, head_dim, ..
            } => heads * head_dim,
            KernelSpec::Logits { vocab, .. } => *vocab,
        }
    }

    /// Input columns of the first operand (None for ids).
    pub fn in_cols(&self) -> Option<usize> {
        match self {
            KernelSpec::Embed { .. } => None,
            KernelSpec::RmsNorm { dim, .. } | KernelSpec::Logits { dim, .. } => Some(*dim),
            KernelSpec::QGemm { k, .. } | KernelSpec::Gemm { k, .. } => Some(*k),
            KernelSpec::SiluMul { n } => Some(2 * n),
            KernelSpec::RopeKv { .. } => Some(self.out_cols()),
            KernelSpec::Attention {
                heads,
                kv_heads,
                head_dim,
                ..
            } => Some((heads + 2 * kv_heads) * head_dim),
        }
    }

    /// A readable name that identifies the generated function: the spec's constants that the
    /// code depends on (not the layer, not the split into parts).
    pub fn code_name(&self) -> String {
        match self {
            KernelSpec::Embed { dim, .. } => format!("embed_d{dim}"),
            KernelSpec::RmsNorm { dim, .. } => format!("rms_norm_d{dim}"),
            KernelSpec::QGemm {
                k,
                bits,
                group,
                residual,
                act,
                ..
            } => format!(
                "qgemm_k{k}_b{bits}_g{group}{}_{}",
                if *residual { "_res" } else { "" },
                act.name()
            ),
            KernelSpec::Gemm { k, residual, .. } => {
                format!("gemm_k{k}{}", if *residual { "_res" } else { "" })
            }
            KernelSpec::SiluMul { n } => format!("silu_mul_n{n}"),
            KernelSpec::RopeKv {
                heads,
                kv_heads,
                head_dim,
                rope_dim,
                kv_bits,
                smooth,
                rotate,
                kv_group,
                ..
            } => format!(
                "rope_kv_h{heads}_kv{kv_heads}_d{head_dim}_r{rope_dim}_b{kv_bits}{}{}{}",
                if *smooth { "_smooth" } else { "" },
                if *rotate > 0 {
                    format!("_rot{rotate}")
                } else {
                    String::new()
                },
                group_suffix(*kv_group)
            ),
            KernelSpec::Attention {
                heads,
                kv_heads,
                head_dim,
                kv_bits,
                past_only,
                smooth,
                kv_group,
                ..
            } => format!(
                "attention_h{heads}_kv{kv_heads}_d{head_dim}_b{kv_bits}{}{}{}",
                if *past_only { "_po" } else { "" },
                if *smooth { "_smooth" } else { "" },
                group_suffix(*kv_group)
            ),
            KernelSpec::Logits { dim, act, .. } => format!("logits_d{dim}_{}", act.name()),
        }
    }
}

fn group_suffix(g: usize) -> String {
    if g > 0 {
        format!("_g{g}")
    } else {
        String::new()
    }
}

/// `kv_group`: absent (one group a kv head, and in plans from before it existed) or a
/// multiple of 32 dividing `head_dim`.
fn kv_group(n: &crate::graph::Node) -> Result<usize, String> {
    let hd = n.int_attr("head_dim").unwrap_or(0);
    match n.int_attr("kv_group") {
        None => Ok(0),
        Some(g) if g > 0 && g % 32 == 0 && hd > 0 && hd % g == 0 => Ok(g as usize),
        Some(g) => Err(format!(
            "attribute `kv_group` must be a multiple of 32 dividing head_dim {hd}, found {g}"
        )),
    }
}
