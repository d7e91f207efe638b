//! The graph: SSA values, tensor-level ops, named parameters, and a builder.

use crate::types::{DType, Dim, TensorType};
use std::collections::BTreeMap;
use std::fmt;

/// An SSA value, printed `%N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// The tensor-level op set. Attention is one op with attributes so passes rewrite it whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// `embedding(ids: i32[s], @table: f32[V,D]) -> f32[s,D]`
    Embedding,
    /// `rms_norm(x: f32[..,D], @w: f32[D]) {eps}`: x / sqrt(mean(x^2) + eps) * w
    RmsNorm,
    /// `linear(x: f32[s,K], @w: f32[N,K] [, @b: f32[N]]) -> f32[s,N]`: x W^T + b
    Linear,
    /// `rope(x: f32[s,H*hd], pos: i32[s]) {heads, head_dim, theta, ...}`, rotate-half layout
    Rope,
    /// `attention(q, k, v) {heads, kv_heads, head_dim, layer, causal}` with a KV cache slot
    Attention,
    Silu,
    Mul,
    Add,
    /// softmax over the last axis
    Softmax,
    /// same elements, new (declared) shape
    Reshape,
    /// `transpose(x) {perm=[..]}`
    Transpose,
    /// `concat(a, b, ..) {axis}`
    Concat,
    /// `fake_quant(@w: f32[N,K], @gamma: f32[N,G], @beta: f32[N,G]) {bits, group}`: asymmetric
    /// uniform quantize-dequantize per group of `group` input channels (-1: the whole row),
    /// clipping range [beta*min, gamma*max], scale and zero rounded to f16 as stored. With
    /// `lwc = true` the two clipping operands are logits: gamma = sigmoid(u), beta =
    /// sigmoid(l) (learnable weight clipping during calibration).
    FakeQuant,
    /// `qlinear(x: f32[s,K], @codes: u4[N,K], @scales: f16[N,G], @zeros: f16[N,G] [, @b])
    /// {bits, group}`: linear with packed weights, dequantized as (code - zero) * scale.
    QLinear,
    /// `loss(pred: f32[..], target: f32[..]) {kind = "mae" | "mse"} -> f32[1]`: mean absolute
    /// or squared error over all elements.
    Loss,
    /// `vjp(<operands of the forward op>, dy) {vjp_of = "<op>", wrt = i, <forward attrs>}`:
    /// the vector-Jacobian product dy^T d(op)/d(operand i), typed like operand i. A `loss`
    /// takes no dy (its seed is 1). Built by `passes::autodiff`; the interpreter recomputes
    /// what it needs of the forward op from the operands.
    Vjp,
    /// `kernel(..) {kind, <spec>}`: one fused kernel of the lowered graph (`kernel::KernelSpec`);
    /// its type is declared. Run by the back ends, not by the interpreter.
    Kernel,
}

impl OpKind {
    pub const ALL: [OpKind; 17] = [
        OpKind::Embedding,
        OpKind::RmsNorm,
        OpKind::Linear,
        OpKind::Rope,
        OpKind::Attention,
        OpKind::Silu,
        OpKind::Mul,
        OpKind::Add,
        OpKind::Softmax,
        OpKind::Reshape,
        OpKind::Transpose,
        OpKind::Concat,
        OpKind::FakeQuant,
        OpKind::QLinear,
        OpKind::Loss,
        OpKind::Vjp,
        OpKind::Kernel,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Embedding => "embedding",
            OpKind::RmsNorm => "rms_norm",
            OpKind::Linear => "linear",
            OpKind::Rope => "rope",
            OpKind::Attention => "attention",
            OpKind::Silu => "silu",
            OpKind::Mul => "mul",
            OpKind::Add => "add",
            OpKind::Softmax => "softmax",
            OpKind::Reshape => "reshape",
            OpKind::Transpose => "transpose",
            OpKind::Concat => "concat",
            OpKind::FakeQuant => "fake_quant",
            OpKind::QLinear => "qlinear",
            OpKind::Loss => "loss",
            OpKind::Vjp => "vjp",
            OpKind::Kernel => "kernel",
        }
    }

    pub fn from_name(s: &str) -> Option<OpKind> {
        OpKind::ALL.iter().copied().find(|o| o.name() == s)
    }
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Ints(Vec<i64>),
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attr::Int(v) => write!(f, "{v}"),
            // `{:?}` of f64 is the shortest text that parses back to the same bits and always
            // has a '.', an 'e', "inf" or "NaN", so it never reads back as an integer.
            Attr::Float(v) => write!(f, "{v:?}"),
            Attr::Bool(v) => write!(f, "{v}"),
            Attr::Str(s) => write!(f, "{}", serde_json::to_string(s).map_err(|_| fmt::Error)?),
            Attr::Ints(v) => {
                f.write_str("[")?;
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{x}")?;
                }
                f.write_str("]")
            }
        }
    }
}

pub type Attrs = BTreeMap<String, Attr>;

/// An operand: an SSA value or a named parameter (`@name`) resolved by the weight store.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Operand {
    Value(ValueId),
    Param(String),
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Value(v) => write!(f, "{v}"),
            Operand::Param(p) => write!(f, "@{p}"),
        }
    }
}

/// A declared parameter: its name and type. The weight store must hold it with this type.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamDecl {
    pub name: String,
    pub ty: TensorType,
}

/// A graph input, bound by name at execution.
#[derive(Clone, Debug, PartialEq)]
pub struct Input {
    pub value: ValueId,
    pub name: String,
    pub ty: TensorType,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub out: ValueId,
    pub op: OpKind,
    pub args: Vec<Operand>,
    pub attrs: Attrs,
    pub ty: TensorType,
}

impl Node {
    pub fn attr(&self, key: &str) -> Option<&Attr> {
        self.attrs.get(key)
    }

    pub fn int_attr(&self, key: &str) -> Option<i64> {
        match self.attrs.get(key) {
            Some(Attr::Int(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn float_attr(&self, key: &str) -> Option<f64> {
        match self.attrs.get(key) {
            Some(Attr::Float(v)) => Some(*v),
            Some(Attr::Int(v)) => Some(*v as f64),
            _ => None,
        }
    }

    pub fn bool_attr(&self, key: &str) -> Option<bool> {
        match self.attrs.get(key) {
            Some(Attr::Bool(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn value_args(&self) -> impl Iterator<Item = ValueId> + '_ {
        self.args.iter().filter_map(|a| match a {
            Operand::Value(v) => Some(*v),
            Operand::Param(_) => None,
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub name: String,
    pub value: ValueId,
}

/// A whole model as one graph, layers unrolled.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Graph {
    pub name: String,
    pub params: Vec<ParamDecl>,
    pub inputs: Vec<Input>,
    pub nodes: Vec<Node>,
    pub outputs: Vec<Output>,
}

impl Graph {
    pub fn new(name: &str) -> Self {
        Graph {
            name: name.to_string(),
            ..Default::default()
        }
    }

    /// One past the largest value id in use.
    pub fn value_bound(&self) -> u32 {
        let a = self.inputs.iter().map(|i| i.value.0 + 1).max().unwrap_or(0);
        let b = self.nodes.iter().map(|n| n.out.0 + 1).max().unwrap_or(0);
        a.max(b)
    }

    /// Types of all defined values, indexed by id.
    pub fn value_types(&self) -> Vec<Option<&TensorType>> {
        let mut v = vec![None; self.value_bound() as usize];
        for i in &self.inputs {
            v[i.value.0 as usize] = Some(&i.ty);
        }
        for n in &self.nodes {
            v[n.out.0 as usize] = Some(&n.ty);
        }
        v
    }

    pub fn param(&self, name: &str) -> Option<&ParamDecl> {
        self.params.iter().find(|p| p.name == name)
    }

    pub fn output(&self, name: &str) -> Option<ValueId> {
        self.outputs
            .iter()
            .find(|o| o.name == name)
            .map(|o| o.value)
    }

    /// Number of uses of each value (node operands and graph outputs).
    pub fn use_counts(&self) -> Vec<u32> {
        let mut c = vec![0u32; self.value_bound() as usize];
        for n in &self.nodes {
            for v in n.value_args() {
                if let Some(x) = c.get_mut(v.0 as usize) {
                    *x += 1;
                }
            }
        }
        for o in &self.outputs {
            if let Some(x) = c.get_mut(o.value.0 as usize) {
                *x += 1;
            }
        }
        c
    }

    /// Count of nodes per op kind, for reports.
    pub fn op_histogram(&self) -> BTreeMap<&'static str, usize> {
        let mut h = BTreeMap::new();
        for n in &self.nodes {
            *h.entry(n.op.name()).or_insert(0) += 1;
        }
        h
    }
}

/// Builds a graph in order; every `push` returns the new value.
pub struct Builder {
    g: Graph,
    next: u32,
}

impl Builder {
    pub fn new(name: &str) -> Self {
        Builder {
            g: Graph::new(name),
            next: 0,
        }
    }

    fn fresh(&mut self) -> ValueId {
        let v = ValueId(self.next);
        self.next += 1;
        v
    }

    /// Declare a parameter (once per name) and return its operand.
    pub fn param(&mut self, name: &str, ty: TensorType) -> Operand {
        if self.g.param(name).is_none() {
            self.g.params.push(ParamDecl {
                name: name.to_string(),
                ty,
            });
        }
        Operand::Param(name.to_string())
    }

    pub fn input(&mut self, name: &str, ty: TensorType) -> ValueId {
        let v = self.fresh();
        self.g.inputs.push(Input {
            value: v,
            name: name.to_string(),
            ty,
        });
        v
    }

    pub fn push(
        &mut self,
        op: OpKind,
        args: Vec<Operand>,
        attrs: Attrs,
        ty: TensorType,
    ) -> ValueId {
        let out = self.fresh();
        self.g.nodes.push(Node {
            out,
            op,
            args,
            attrs,
            ty,
        });
        out
    }

    pub fn output(&mut self, name: &str, value: ValueId) {
        self.g.outputs.push(Output {
            name: name.to_string(),
            value,
        });
    }

    pub fn finish(self) -> Graph {
        self.g
    }
}

/// Short-hand to build attribute maps: `attrs![("eps", Attr::Float(1e-5))]`.
pub fn attrs<const N: usize>(items: [(&str, Attr); N]) -> Attrs {
    items.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// `f32[seq, n]`
pub fn seq_f32(n: usize) -> TensorType {
    TensorType::new(DType::F32, vec![Dim::sym("seq"), Dim::Const(n)])
}
