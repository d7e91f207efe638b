//! Lowering: the (packed) model graph becomes a graph of `kernel` nodes, one per fused kernel
//! (`wkvc_ir::KernelSpec`), and `memplan` assigns every kernel output a static buffer.
//!
//! Fusions (LLaMA blocks):
//! - the `qlinear`s (or `linear`s) of one input become one GEMM with the weights side by side
//!   (q|k|v, gate|up); an `add(r, qlinear(..))` becomes that GEMM's residual epilogue;
//! - `rope(q)`, `rope(k)` and the cache write of `attention` become `rope_kv`, the rest of
//!   `attention` (past read packed, chunk in FP) becomes `attention`;
//! - `mul(silu(gate), up)` becomes `silu_mul` over the fused gate|up output;
//! - the final `linear` to the vocabulary becomes `logits`.
//!
//! Anything else is reported as unsupported, naming the node, so an engine can fall back to
//! the interpreter.

mod memplan;
mod plan;

pub use memplan::{MemoryPlan, kv_bytes_per_token, memplan, scratch_bytes};
pub use plan::{Buffer, CHUNK, LoweredPlan, Step, StepOperand};

use std::collections::{HashMap, HashSet};
use wkvc_ir::graph::{Attr, Node, OpKind, Operand, ValueId};
use wkvc_ir::{Act, Dim, Graph, KernelSpec, TensorType};

#[derive(Debug, thiserror::Error)]
#[error("cannot lower for the compiled back ends: {0}")]
pub struct LowerError(pub String);

/// Options of the lowering.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LowerOptions {
    /// Activation mode of the quantized GEMMs.
    pub act: Act,
}

impl Default for LowerOptions {
    fn default() -> Self {
        LowerOptions { act: Act::F32 }
    }
}

fn cols(t: &TensorType) -> Option<usize> {
    t.shape.last().and_then(|d| d.as_const())
}

pub(crate) fn val(o: &Operand) -> Option<ValueId> {
    match o {
        Operand::Value(v) => Some(*v),
        Operand::Param(_) => None,
    }
}

struct Ctx<'g> {
    g: &'g Graph,
    users: HashMap<ValueId, Vec<usize>>,
    outputs: HashSet<ValueId>,
    done: HashSet<usize>,
    /// old value -> value in the lowered graph
    map: HashMap<ValueId, ValueId>,
    nodes: Vec<Node>,
    next: u32,
    act: Act,
}

impl<'g> Ctx<'g> {
    fn only_user(&self, v: ValueId) -> Option<&'g Node> {
        if self.outputs.contains(&v) {
            return None;
        }
        match self.users.get(&v).map(|u| &u[..]) {
            Some([i]) => Some(&self.g.nodes[*i]),
            _ => None,
        }
    }

    fn index_of(&self, n: &Node) -> usize {
        self.g
            .nodes
            .iter()
            .position(|m| m.out == n.out)
            .unwrap_or(usize::MAX)
    }

    fn operand(&self, o: &Operand) -> Result<Operand, LowerError> {
        match o {
            Operand::Param(p) => Ok(Operand::Param(p.clone())),
            Operand::Value(v) => self
                .map
                .get(v)
                .map(|n| Operand::Value(*n))
                .ok_or_else(|| LowerError(format!("{v} is used before it was lowered"))),
        }
    }

    fn emit(
        &mut self,
        spec: KernelSpec,
        args: Vec<Operand>,
        seq: Dim,
        extra: &[(&str, Attr)],
    ) -> ValueId {
        let out = ValueId(self.next);
        self.next += 1;
        let mut attrs = spec.attrs();
        for (k, v) in extra {
            attrs.insert((*k).to_string(), v.clone());
        }
        self.nodes.push(Node {
            out,
            op: OpKind::Kernel,
            args,
            attrs,
            ty: TensorType::new(wkvc_ir::DType::F32, vec![seq, Dim::Const(spec.out_cols())]),
        });
        out
    }
}

pub(crate) fn unsupported(n: &Node, why: &str) -> LowerError {
    LowerError(format!(
        "{} ({}): {why}",
        wkvc_ir::text::print_node(n),
        n.op.name()
    ))
}

/// Is `n` a GEMM (qlinear without bias, or linear without bias)?
fn gemm_key(n: &Node) -> Option<(OpKind, i64, i64)> {
    match n.op {
        OpKind::QLinear if n.args.len() == 4 => Some((
            OpKind::QLinear,
            n.int_attr("bits").unwrap_or(4),
            n.int_attr("group").unwrap_or(-1),
        )),
        OpKind::Linear if n.args.len() == 2 => Some((OpKind::Linear, 0, 0)),
        _ => None,
    }
}

/// Lower `g` into kernel nodes.
pub fn lower(g: &Graph, opts: LowerOptions) -> Result<Graph, LowerError> {
    let mut users: HashMap<ValueId, Vec<usize>> = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for v in n.value_args() {
            users.entry(v).or_default().push(i);
        }
    }
    let mut cx = Ctx {
        g,
        users,
        outputs: g.outputs.iter().map(|o| o.value).collect(),
        done: HashSet::new(),
        map: HashMap::new(),
        nodes: Vec::new(),
        next: g.value_bound(),
        act: opts.act,
    };
    for i in &g.inputs {
        cx.map.insert(i.value, i.value);
    }
    let types: HashMap<ValueId, &TensorType> = g
        .inputs
        .iter()
        .map(|i| (i.value, &i.ty))
        .chain(g.nodes.iter().map(|n| (n.out, &n.ty)))
        .collect();
    let param_ty = |o: &Operand| match o {
        Operand::Param(p) => g.param(p).map(|d| &d.ty),
        Operand::Value(v) => types.get(v).copied(),
    };

    for (i, n) in g.nodes.iter().enumerate() {
        if cx.done.contains(&i) {
            continue;
        }
        let seq = n.ty.shape.first().cloned().unwrap_or(Dim::Const(1));
        match n.op {
            OpKind::Embedding => {
                let t = param_ty(&n.args[1]).ok_or_else(|| unsupported(n, "no table type"))?;
                let (vocab, dim) = match t.shape.as_slice() {
                    [a, b] => (a.as_const(), b.as_const()),
                    _ => (None, None),
                };
                let (Some(vocab), Some(dim)) = (vocab, dim) else {
                    return Err(unsupported(n, "table must be f32[V,D]"));
                };
                let args = vec![cx.operand(&n.args[0])?, n.args[1].clone()];
                let v = cx.emit(KernelSpec::Embed { vocab, dim }, args, seq, &[]);
                cx.map.insert(n.out, v);
            }
            OpKind::RmsNorm => {
                let dim = cols(&n.ty).ok_or_else(|| unsupported(n, "dynamic width"))?;
                if !matches!(n.args[1], Operand::Param(_)) {
                    return Err(unsupported(n, "the weight must be a param"));
                }
                let eps = n.float_attr("eps").unwrap_or(1e-6);
                let args = vec![cx.operand(&n.args[0])?, n.args[1].clone()];
                let v = cx.emit(KernelSpec::RmsNorm { dim, eps }, args, seq, &[]);
                cx.map.insert(n.out, v);
            }
            OpKind::QLinear | OpKind::Linear => lower_gemm(&mut cx, i, n, seq, &param_ty)?,
            _ => return Err(unsupported(n, "no kernel implements this op here")),
        }
        cx.done.insert(i);
    }
    let mut out = Graph::new(&g.name);
    out.inputs = g.inputs.clone();
    let used: HashSet<&str> = cx
        .nodes
        .iter()
        .flat_map(|n| n.args.iter())
        .filter_map(|a| match a {
            Operand::Param(p) => Some(p.as_str()),
            Operand::Value(_) => None,
        })
        .collect();
    out.params = g
        .params
        .iter()
        .filter(|p| used.contains(p.name.as_str()))
        .cloned()
        .collect();
    out.nodes = cx.nodes;
    for o in &g.outputs {
        let v = *cx
            .map
            .get(&o.value)
            .ok_or_else(|| LowerError(format!("output \"{}\" was not lowered", o.name)))?;
        out.outputs.push(wkvc_ir::graph::Output {
            name: o.name.clone(),
            value: v,
        });
    }
    Ok(out)
}

fn lower_gemm<'g>(
    cx: &mut Ctx<'g>,
    i: usize,
    n: &'g Node,
    seq: Dim,
    param_ty: &dyn Fn(&Operand) -> Option<&'g TensorType>,
) -> Result<(), LowerError> {
    let g = cx.g;
    let key = gemm_key(n).ok_or_else(|| unsupported(n, "bias is not supported by the kernels"))?;
    let x = &n.args[0];
    let k = param_ty(x)
        .and_then(cols)
        .ok_or_else(|| unsupported(n, "input width unknown"))?;
    // the other GEMMs of the same input with the same weight format
    let siblings: Vec<usize> = match val(x) {
        Some(xv) => cx.users[&xv]
            .iter()
            .copied()
            .filter(|&j| j >= i && !cx.done.contains(&j) && gemm_key(&g.nodes[j]) == Some(key))
            .collect(),
        None => vec![i],
    };
    let ncols = |j: usize| cols(&g.nodes[j].ty).unwrap_or(0);
    let make = |cx: &Ctx,
                parts: &[usize],
                residual: Option<&Operand>|
     -> Result<(KernelSpec, Vec<Operand>), LowerError> {
        let mut args = vec![cx.operand(x)?];
        for &j in parts {
            let m = &g.nodes[j];
            args.extend(m.args[1..].iter().cloned());
        }
        if let Some(r) = residual {
            args.push(cx.operand(r)?);
        }
        let pv: Vec<usize> = parts.iter().map(|&j| ncols(j)).collect();
        let spec = match key.0 {
            OpKind::QLinear => KernelSpec::QGemm {
                k,
                parts: pv,
                bits: key.1 as u32,
                group: key.2,
                residual: residual.is_some(),
                act: cx.act,
            },
            _ => KernelSpec::Gemm {
                k,
                parts: pv,
                residual: residual.is_some(),
            },
        };
        Ok((spec, args))
    };

    // attention block: q, k, v -> rope(q), rope(k), attention(rq, rk, v, ..)
    if siblings.len() == 3
        && let Some(done) = try_attention(cx, &siblings, seq.clone(), &make)?
    {
        cx.done.extend(done);
        return Ok(());
    }
    if siblings.len() == 2
        && let Some(done) = try_mlp(cx, &siblings, seq.clone(), &make)?
    {
        cx.done.extend(done);
        return Ok(());
    }
    // a lone GEMM: logits, residual epilogue, or plain
    if key.0 == OpKind::Linear
        && cx.outputs.contains(&n.out)
        && let Operand::Param(p) = &n.args[1]
    {
        let vocab = ncols(i);
        let args = vec![cx.operand(x)?, Operand::Param(p.clone())];
        // the int8 head needs whole blocks of 32 columns
        let act = if k % 32 == 0 { cx.act } else { Act::F32 };
        let v = cx.emit(KernelSpec::Logits { vocab, dim: k, act }, args, seq, &[]);
        cx.map.insert(n.out, v);
        return Ok(());
    }
    if let Some(add) = cx.only_user(n.out).filter(|a| a.op == OpKind::Add) {
        let other = if add.args[0] == Operand::Value(n.out) {
            &add.args[1]
        } else {
            &add.args[0]
        };
        if add.ty == n.ty && param_ty(other) == Some(&n.ty) {
            let (spec, args) = make(cx, &[i], Some(other))?;
            let v = cx.emit(spec, args, seq, &[]);
            cx.map.insert(add.out, v);
            let ai = cx.index_of(add);
            cx.done.insert(ai);
            return Ok(());
        }
    }
    let (spec, args) = make(cx, &[i], None)?;
    let v = cx.emit(spec, args, seq, &[]);
    cx.map.insert(n.out, v);
    Ok(())
}

type Make<'a> =
    dyn Fn(&Ctx, &[usize], Option<&Operand>) -> Result<(KernelSpec, Vec<Operand>), LowerError> + 'a;

fn try_attention(
    cx: &mut Ctx,
    sib: &[usize],
    seq: Dim,
    make: &Make,
) -> Result<Option<Vec<usize>>, LowerError> {
    let g = cx.g;
    // find which sibling feeds which attention operand
    let mut att = None;
    for &j in sib {
        let u = cx.only_user(g.nodes[j].out);
        if let Some(a) = u.filter(|a| a.op == OpKind::Attention) {
            att = Some(a);
        }
    }
    let Some(att) = att else { return Ok(None) };
    let through_rope = |o: &Operand| -> Option<(&Node, usize)> {
        let v = val(o)?;
        let r = g
            .nodes
            .iter()
            .find(|m| m.out == v && m.op == OpKind::Rope)?;
        let src = val(&r.args[0])?;
        let j = sib.iter().copied().find(|&j| g.nodes[j].out == src)?;
        Some((r, j))
    };
    let (Some((rq, qi)), Some((rk, ki))) = (through_rope(&att.args[0]), through_rope(&att.args[1]))
    else {
        return Ok(None);
    };
    let Some(vi) =
        val(&att.args[2]).and_then(|v| sib.iter().copied().find(|&j| g.nodes[j].out == v))
    else {
        return Ok(None);
    };
    if cx.only_user(rq.out).map(|u| u.out) != Some(att.out)
        || cx.only_user(rk.out).map(|u| u.out) != Some(att.out)
        || cx.only_user(g.nodes[qi].out).map(|u| u.out) != Some(rq.out)
        || cx.only_user(g.nodes[ki].out).map(|u| u.out) != Some(rk.out)
        || rq.args[1] != rk.args[1]
        || att.bool_attr("causal") == Some(false)
    {
        return Ok(None);
    }
    let heads = att.int_attr("heads").unwrap_or(1) as usize;
    let kv_heads = att.int_attr("kv_heads").unwrap_or(1) as usize;
    let hd = att.int_attr("head_dim").unwrap_or(1) as usize;
    let rope_dim = rq.int_attr("rope_dim").map(|r| r as usize).unwrap_or(hd);
    let kv_bits = att.int_attr("kv_bits").unwrap_or(16) as u32;
    if !(kv_bits <= 4 || kv_bits == 16) {
        return Err(unsupported(
            att,
            "the kernels keep the KV cache in <= 4 bits or f32",
        ));
    }
    if matches!(att.attr("kv_param_dtype"), Some(Attr::Str(s)) if s == "f32") {
        return Err(unsupported(
            att,
            "KV scale/zero in f32 (a reference setting)",
        ));
    }
    // rope attributes must agree for q and k apart from the head count
    let strip = |n: &Node| {
        let mut a = n.attrs.clone();
        a.remove("heads");
        a
    };
    if strip(rq) != strip(rk) || rq.args.len() != rk.args.len() || rq.args.get(2) != rk.args.get(2)
    {
        return Ok(None);
    }
    let smooth = att.args.len() == 7;
    let factors = rq.args.len() > 2;
    let layer = att.int_attr("layer").unwrap_or(0);
    let kv_group = match att.int_attr("kv_group") {
        Some(g) if g > 0 && kv_bits < 16 => g as usize,
        _ => 0,
    };
    let (gemm, gargs) = make(cx, &[qi, ki, vi], None)?;
    let qkv = cx.emit(gemm, gargs, seq.clone(), &[]);
    let mut rargs = vec![Operand::Value(qkv), cx.operand(&rq.args[1])?];
    if factors {
        rargs.push(rq.args[2].clone());
    }
    if smooth {
        rargs.extend(att.args[3..7].iter().cloned());
    }
    let rope_extra: Vec<(&str, Attr)> = rq
        .attrs
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "heads" | "head_dim" | "rope_dim" | "rotate"))
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let rk_spec = KernelSpec::RopeKv {
        heads,
        kv_heads,
        head_dim: hd,
        rope_dim,
        kv_bits,
        smooth,
        factors,
        layer,
        rotate: rq.int_attr("rotate").unwrap_or(0).max(0) as usize,
        kv_group,
    };
    let r = cx.emit(rk_spec, rargs, seq.clone(), &rope_extra);
    let mut aargs = vec![Operand::Value(r)];
    if smooth {
        aargs.extend(att.args[3..7].iter().cloned());
    }
    let a_spec = KernelSpec::Attention {
        heads,
        kv_heads,
        head_dim: hd,
        kv_bits,
        past_only: att.bool_attr("past_only").unwrap_or(false),
        smooth,
        layer,
        kv_group,
    };
    // the recent window is the engine's (which rows it hands the kernel), not the kernel's
    let window = wkvc_ir::kvcache::node_window(att);
    let extra: Vec<(&str, Attr)> = if window > 1 {
        vec![("kv_window", Attr::Int(window as i64))]
    } else {
        Vec::new()
    };
    let a = cx.emit(a_spec, aargs, seq, &extra);
    cx.map.insert(att.out, a);
    Ok(Some(vec![
        qi,
        ki,
        vi,
        cx.index_of(rq),
        cx.index_of(rk),
        cx.index_of(att),
    ]))
}

fn try_mlp(
    cx: &mut Ctx,
    sib: &[usize],
    seq: Dim,
    make: &Make,
) -> Result<Option<Vec<usize>>, LowerError> {
    let g = cx.g;
    for (gi, ui) in [(sib[0], sib[1]), (sib[1], sib[0])] {
        let (gn, un) = (&g.nodes[gi], &g.nodes[ui]);
        let Some(s) = cx.only_user(gn.out).filter(|s| s.op == OpKind::Silu) else {
            continue;
        };
        let Some(m) = cx.only_user(s.out).filter(|m| m.op == OpKind::Mul) else {
            continue;
        };
        if cx.only_user(un.out).map(|u| u.out) != Some(m.out)
            || m.args[0] != Operand::Value(s.out)
            || m.args[1] != Operand::Value(un.out)
            || gn.ty != un.ty
        {
            continue;
        }
        let n = cols(&gn.ty).unwrap_or(0);
        let (gemm, gargs) = make(cx, &[gi, ui], None)?;
        let gu = cx.emit(gemm, gargs, seq.clone(), &[]);
        let v = cx.emit(
            KernelSpec::SiluMul { n },
            vec![Operand::Value(gu)],
            seq,
            &[],
        );
        cx.map.insert(m.out, v);
        return Ok(Some(vec![gi, ui, cx.index_of(s), cx.index_of(m)]));
    }
    Ok(None)
}
