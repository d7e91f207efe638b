//! Reverse-mode automatic differentiation over the IR.
//!
//! `differentiate` appends to a graph the backward graph of the sum of its `loss` outputs with
//! respect to chosen params: one `vjp` node per (node, differentiable operand) on a path from a
//! chosen param to a loss, in reverse order, with `add` nodes where a value's cotangent has
//! several contributions. Each gradient becomes an output `grad.<param>`. The forward values a
//! rule needs stay alive until its `vjp` node runs (the interpreter frees values after their
//! last use), so the activations kept are exactly those of the backward graph.

use crate::PassError;
use std::collections::{BTreeMap, HashMap, HashSet};
use wkvc_ir::graph::{Attr, Graph, Node, OpKind, Operand, ValueId};
use wkvc_ir::types::{DType, TensorType};

fn fail(msg: impl Into<String>) -> PassError {
    PassError::Failed {
        pass: "autodiff".into(),
        msg: msg.into(),
    }
}

/// Name of the output that holds the gradient of `param`.
pub fn grad_output(param: &str) -> String {
    format!("grad.{param}")
}

/// The graph extended with the gradients of sum(`losses`) wrt `wrt` (f32 params). Every loss
/// must be an output produced by a `loss` node; every param must influence some loss.
pub fn differentiate(g: &Graph, losses: &[&str], wrt: &[String]) -> Result<Graph, PassError> {
    let mut out = g.clone();
    let types: Vec<Option<TensorType>> = g.value_types().into_iter().map(|t| t.cloned()).collect();
    let wrt_set: HashSet<&str> = wrt.iter().map(|s| s.as_str()).collect();
    for p in wrt {
        let d = g
            .param(p)
            .ok_or_else(|| fail(format!("param @{p} is not declared")))?;
        if d.ty.dtype != DType::F32 {
            return Err(fail(format!("param @{p} is {}, not f32", d.ty)));
        }
    }
    let producer: HashMap<ValueId, usize> = g
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.out, i))
        .collect();
    // Values that depend on a chosen param.
    let mut depends = vec![false; g.value_bound() as usize];
    for n in &g.nodes {
        let d = n.args.iter().any(|a| match a {
            Operand::Value(v) => depends[v.0 as usize],
            Operand::Param(p) => wrt_set.contains(p.as_str()),
        });
        depends[n.out.0 as usize] = d;
    }
    let mut next = g.value_bound();
    let mut cot: HashMap<ValueId, ValueId> = HashMap::new();
    let mut pcot: BTreeMap<String, ValueId> = BTreeMap::new();
    let mut seeds = HashSet::new();
    for l in losses {
        let v = g
            .output(l)
            .ok_or_else(|| fail(format!("no output named \"{l}\"")))?;
        let i = producer
            .get(&v)
            .ok_or_else(|| fail(format!("output \"{l}\" is not computed by a node")))?;
        if g.nodes[*i].op != OpKind::Loss {
            return Err(fail(format!("output \"{l}\" is not a `loss` node")));
        }
        seeds.insert(v);
    }
    let mut backward: Vec<Node> = Vec::new();
    for n in g.nodes.iter().rev() {
        if !depends[n.out.0 as usize] {
            continue;
        }
        let seed = seeds.contains(&n.out);
        let dy = cot.get(&n.out).copied();
        if !seed && dy.is_none() {
            continue;
        }
        if seed && dy.is_some() {
            return Err(fail(format!("loss {} is also used downstream", n.out)));
        }
        for (i, a) in n.args.iter().enumerate() {
            let (needed, ty) = match a {
                Operand::Value(v) => (depends[v.0 as usize], types[v.0 as usize].clone()),
                Operand::Param(p) => (
                    wrt_set.contains(p.as_str()),
                    g.param(p).map(|d| d.ty.clone()),
                ),
            };
            if !needed {
                continue;
            }
            let ty = ty.ok_or_else(|| fail(format!("operand {a} has no type")))?;
            let mut args = n.args.clone();
            if let Some(d) = dy {
                args.push(Operand::Value(d));
            }
            let mut attrs = n.attrs.clone();
            attrs.insert("vjp_of".into(), Attr::Str(n.op.name().into()));
            attrs.insert("wrt".into(), Attr::Int(i as i64));
            let gv = ValueId(next);
            next += 1;
            backward.push(Node {
                out: gv,
                op: OpKind::Vjp,
                args,
                attrs,
                ty: ty.clone(),
            });
            let slot = match a {
                Operand::Value(v) => cot.get(v).copied(),
                Operand::Param(p) => pcot.get(p).copied(),
            };
            let total = match slot {
                None => gv,
                Some(prev) => {
                    let s = ValueId(next);
                    next += 1;
                    backward.push(Node {
                        out: s,
                        op: OpKind::Add,
                        args: vec![Operand::Value(prev), Operand::Value(gv)],
                        attrs: Default::default(),
                        ty,
                    });
                    s
                }
            };
            match a {
                Operand::Value(v) => {
                    cot.insert(*v, total);
                }
                Operand::Param(p) => {
                    pcot.insert(p.clone(), total);
                }
            }
        }
    }
    out.nodes.extend(backward);
    for p in wrt {
        let v = pcot
            .get(p)
            .ok_or_else(|| fail(format!("param @{p} does not influence the loss")))?;
        let name = grad_output(p);
        if out.output(&name).is_some() {
            return Err(fail(format!("the graph already has an output \"{name}\"")));
        }
        out.outputs.push(wkvc_ir::graph::Output { name, value: *v });
    }
    wkvc_ir::verify::verify(&out).map_err(|e| fail(format!("backward graph: {e}")))?;
    Ok(out)
}
