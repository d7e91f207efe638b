//! `KernelSpec::reference`: the unfused graph of ordinary ops a kernel must equal (the
//! interpreter runs it; every back end's kernel is tested against it).

use super::KernelSpec;
use crate::graph::{Attr, Builder, Graph, OpKind, Operand, attrs, seq_f32};
use crate::types::{DType, Dim, TensorType};

fn ty(dtype: DType, shape: &[usize]) -> TensorType {
    TensorType::new(dtype, shape.iter().map(|&d| Dim::Const(d)).collect())
}

fn value(v: crate::ValueId) -> Operand {
    Operand::Value(v)
}

/// The parts of a GEMM side by side (`concat` on the last axis), plus the residual input
/// `r` when asked.
fn join_parts(b: &mut Builder, parts: Vec<crate::ValueId>, n: usize, residual: bool) {
    let y = if parts.len() == 1 {
        parts[0]
    } else {
        b.push(
            OpKind::Concat,
            parts.into_iter().map(value).collect(),
            attrs([("axis", Attr::Int(1))]),
            seq_f32(n),
        )
    };
    let y = if residual {
        let r = b.input("r", seq_f32(n));
        b.push(
            OpKind::Add,
            vec![value(r), value(y)],
            Default::default(),
            seq_f32(n),
        )
    } else {
        y
    };
    b.output("y", y);
}

impl KernelSpec {
    /// The graph of ordinary ops this kernel equals, for the row-wise kinds and the GEMMs.
    /// Inputs and params are named after the kernel's operands: `x` (rows), `ids` (embed),
    /// `g` and `u` (the two halves of `silu_mul`'s input), `r` (a residual); weights `w`, or
    /// per GEMM part `j`: `w{j}` (f32) or `codes{j}`, `scales{j}`, `zeros{j}` (packed int4,
    /// f16). The output is `y`. The int8 activation mode has the same reference (its rounding
    /// is what its tests bound). `rope_kv` and `attention` change the KV cache: their
    /// reference is the `rope` and `attention` ops with a cache, and this returns an error.
    pub fn reference(&self) -> Result<Graph, String> {
        let mut b = Builder::new(&self.code_name());
        match self {
            KernelSpec::Embed { vocab, dim } => {
                let ids = b.input("ids", TensorType::new(DType::I32, vec![Dim::sym("seq")]));
                let t = b.param("w", ty(DType::F32, &[*vocab, *dim]));
                let y = b.push(
                    OpKind::Embedding,
                    vec![value(ids), t],
                    Default::default(),
                    seq_f32(*dim),
                );
                b.output("y", y);
            }
            KernelSpec::RmsNorm { dim, eps } => {
                let x = b.input("x", seq_f32(*dim));
                let w = b.param("w", ty(DType::F32, &[*dim]));
                let y = b.push(
                    OpKind::RmsNorm,
                    vec![value(x), w],
                    attrs([("eps", Attr::Float(*eps))]),
                    seq_f32(*dim),
                );
                b.output("y", y);
            }
            KernelSpec::SiluMul { n } => {
                let g = b.input("g", seq_f32(*n));
                let u = b.input("u", seq_f32(*n));
                let s = b.push(
                    OpKind::Silu,
                    vec![value(g)],
                    Default::default(),
                    seq_f32(*n),
                );
                let y = b.push(
                    OpKind::Mul,
                    vec![value(s), value(u)],
                    Default::default(),
                    seq_f32(*n),
                );
                b.output("y", y);
            }
            KernelSpec::QGemm {
                k,
                parts,
                bits,
                group,
                residual,
                ..
            } => {
                let x = b.input("x", seq_f32(*k));
                let ng = k.div_ceil(crate::quant::group_len(*k, *group));
                let outs = parts
                    .iter()
                    .enumerate()
                    .map(|(j, &n)| {
                        let c = b.param(&format!("codes{j}"), ty(DType::U4, &[n, *k]));
                        let s = b.param(&format!("scales{j}"), ty(DType::F16, &[n, ng]));
                        let z = b.param(&format!("zeros{j}"), ty(DType::F16, &[n, ng]));
                        b.push(
                            OpKind::QLinear,
                            vec![value(x), c, s, z],
                            attrs([
                                ("bits", Attr::Int(*bits as i64)),
                                ("group", Attr::Int(*group)),
                            ]),
                            seq_f32(n),
                        )
                    })
                    .collect();
                join_parts(&mut b, outs, parts.iter().sum(), *residual);
            }
            KernelSpec::Gemm { k, parts, residual } => {
                let x = b.input("x", seq_f32(*k));
                let outs = parts
                    .iter()
                    .enumerate()
                    .map(|(j, &n)| {
                        let w = b.param(&format!("w{j}"), ty(DType::F32, &[n, *k]));
                        b.push(
                            OpKind::Linear,
                            vec![value(x), w],
                            Default::default(),
                            seq_f32(n),
                        )
                    })
                    .collect();
                join_parts(&mut b, outs, parts.iter().sum(), *residual);
            }
            KernelSpec::Logits { vocab, dim, .. } => {
                let x = b.input("x", seq_f32(*dim));
                let w = b.param("w", ty(DType::F32, &[*vocab, *dim]));
                let y = b.push(
                    OpKind::Linear,
                    vec![value(x), w],
                    Default::default(),
                    seq_f32(*vocab),
                );
                b.output("y", y);
            }
            KernelSpec::RopeKv { .. } | KernelSpec::Attention { .. } => {
                return Err(format!(
                    "{}: its reference is `rope` and `attention` with a KV cache",
                    self.code_name()
                ));
            }
        }
        Ok(b.finish())
    }
}
