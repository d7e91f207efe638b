//! The verifier: SSA form, operand types, shape rules of every op, parameter existence.

use crate::graph::{Attr, Graph, Node, OpKind, Operand};
use crate::text::print_node;
use crate::types::{DType, Dim, TensorType};
use std::collections::{BTreeMap, HashSet};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("graph `{graph}`: {msg}")]
    Graph { graph: String, msg: String },
    #[error("graph `{graph}`, node `{node}`: {msg}")]
    Node {
        graph: String,
        node: String,
        msg: String,
    },
}

/// Looks up the type of a param in a weight store.
pub type StoreTypes<'a> = &'a dyn Fn(&str) -> Option<TensorType>;

/// Verify the graph on its own (declared params stand in for the weight store).
pub fn verify(g: &Graph) -> Result<(), VerifyError> {
    verify_with(g, None)
}

/// Verify, and check every declared param against the store's types.
pub fn verify_with(g: &Graph, store_type: Option<StoreTypes<'_>>) -> Result<(), VerifyError> {
    let gerr = |msg: String| VerifyError::Graph {
        graph: g.name.clone(),
        msg,
    };
    let mut params: BTreeMap<&str, &TensorType> = BTreeMap::new();
    for p in &g.params {
        if params.insert(&p.name, &p.ty).is_some() {
            return Err(gerr(format!("param @{} declared twice", p.name)));
        }
        if let Some(st) = store_type {
            match st(&p.name) {
                None => {
                    return Err(gerr(format!(
                        "param @{} is not in the weight store",
                        p.name
                    )));
                }
                Some(t) if t != p.ty => {
                    return Err(gerr(format!(
                        "param @{} is declared {} but the weight store holds {}",
                        p.name, p.ty, t
                    )));
                }
                _ => {}
            }
        }
    }
    let mut defined: Vec<Option<TensorType>> = vec![None; g.value_bound() as usize];
    let mut input_names = HashSet::new();
    for i in &g.inputs {
        if defined[i.value.0 as usize].is_some() {
            return Err(gerr(format!("{} defined twice", i.value)));
        }
        if !input_names.insert(&i.name) {
            return Err(gerr(format!("input \"{}\" declared twice", i.name)));
        }
        defined[i.value.0 as usize] = Some(i.ty.clone());
    }
    for n in &g.nodes {
        let nerr = |msg: String| VerifyError::Node {
            graph: g.name.clone(),
            node: print_node(n),
            msg,
        };
        let mut arg_types = Vec::with_capacity(n.args.len());
        for a in &n.args {
            match a {
                Operand::Value(v) => match defined.get(v.0 as usize).and_then(|t| t.as_ref()) {
                    Some(t) => arg_types.push(t.clone()),
                    None => return Err(nerr(format!("{v} is used before it is defined"))),
                },
                Operand::Param(p) => match params.get(p.as_str()) {
                    Some(t) => arg_types.push((*t).clone()),
                    None => return Err(nerr(format!("param @{p} is not declared"))),
                },
            }
        }
        let inferred = infer(n, &arg_types).map_err(nerr)?;
        if inferred != n.ty {
            return Err(nerr(format!(
                "declared type {} but the op gives {}",
                n.ty, inferred
            )));
        }
        if defined[n.out.0 as usize].is_some() {
            return Err(nerr(format!("{} defined twice", n.out)));
        }
        defined[n.out.0 as usize] = Some(n.ty.clone());
    }
    let mut out_names = HashSet::new();
    for o in &g.outputs {
        if defined
            .get(o.value.0 as usize)
            .and_then(|t| t.as_ref())
            .is_none()
        {
            return Err(gerr(format!(
                "output \"{}\" names undefined {}",
                o.name, o.value
            )));
        }
        if !out_names.insert(&o.name) {
            return Err(gerr(format!("output \"{}\" declared twice", o.name)));
        }
    }
    Ok(())
}

fn need_int(n: &Node, key: &str) -> Result<i64, String> {
    match n.attrs.get(key) {
        Some(Attr::Int(v)) => Ok(*v),
        Some(a) => Err(format!("attribute `{key}` must be an integer, found {a}")),
        None => Err(format!("missing integer attribute `{key}`")),
    }
}

fn need_pos(n: &Node, key: &str) -> Result<usize, String> {
    let v = need_int(n, key)?;
    if v <= 0 {
        return Err(format!("attribute `{key}` must be positive, found {v}"));
    }
    Ok(v as usize)
}

fn need_float(n: &Node, key: &str) -> Result<f64, String> {
    match n.attrs.get(key) {
        Some(Attr::Float(v)) => Ok(*v),
        Some(a) => Err(format!("attribute `{key}` must be a float, found {a}")),
        None => Err(format!("missing float attribute `{key}`")),
    }
}

fn arity(args: &[TensorType], lo: usize, hi: usize) -> Result<(), String> {
    if args.len() < lo || args.len() > hi {
        if lo == hi {
            return Err(format!("takes {lo} operands, found {}", args.len()));
        }
        return Err(format!("takes {lo} to {hi} operands, found {}", args.len()));
    }
    Ok(())
}

fn f32_arg(t: &TensorType, what: &str) -> Result<(), String> {
    if t.dtype != DType::F32 {
        return Err(format!("{what} must be f32, found {t}"));
    }
    Ok(())
}

fn rank(t: &TensorType, r: usize, what: &str) -> Result<(), String> {
    if t.rank() != r {
        return Err(format!("{what} must have rank {r}, found {t}"));
    }
    Ok(())
}

fn dim_eq(a: &Dim, b: &Dim, what: &str) -> Result<(), String> {
    if a != b {
        return Err(format!("{what}: dimension {a} does not match {b}"));
    }
    Ok(())
}

/// Product of constant dims and the sorted list of symbols: two shapes hold the same number of
/// elements for every binding when both agree.
fn numel_key(shape: &[Dim]) -> (usize, Vec<String>) {
    let mut c = 1usize;
    let mut syms = Vec::new();
    for d in shape {
        match d {
            Dim::Const(n) => c = c.saturating_mul(*n),
            Dim::Sym(s) => syms.push(s.clone()),
        }
    }
    syms.sort();
    (c, syms)
}

fn check_param_dtype(n: &Node, key: &str) -> Result<(), String> {
    match n.attr(key) {
        None => Ok(()),
        Some(Attr::Str(s)) if s == "f16" || s == "f32" => Ok(()),
        Some(a) => Err(format!(
            "attribute `{key}` must be \"f16\" or \"f32\", found {a}"
        )),
    }
}

/// Number of quantization groups per row of `cols` input channels (`bits`, `group` attrs).
fn quant_groups(n: &Node, cols: &Dim) -> Result<usize, String> {
    let bits = need_int(n, "bits")?;
    if !(2..=8).contains(&bits) {
        return Err(format!("bits must be in 2..=8, found {bits}"));
    }
    let group = need_int(n, "group")?;
    let cols = cols
        .as_const()
        .ok_or("quantized weights need constant columns")?;
    match group {
        -1 => Ok(1),
        g if g > 0 => Ok(cols.div_ceil(g as usize)),
        g => Err(format!("group must be positive or -1, found {g}")),
    }
}

/// The forward node a `vjp` node differentiates: its `vjp_of` op with the remaining attrs.
pub fn vjp_forward(n: &Node) -> Result<Node, String> {
    let op = match n.attr("vjp_of") {
        Some(Attr::Str(s)) => OpKind::from_name(s).ok_or(format!("unknown op `{s}` in vjp_of"))?,
        _ => return Err("missing string attribute `vjp_of`".into()),
    };
    if op == OpKind::Vjp {
        return Err("vjp of vjp is not supported".into());
    }
    let mut f = n.clone();
    f.op = op;
    f.attrs.remove("vjp_of");
    f.attrs.remove("wrt");
    Ok(f)
}

/// The result type of a node from its operand types and attributes.
pub fn infer(n: &Node, a: &[TensorType]) -> Result<TensorType, String> {
    match n.op {
        OpKind::Kernel => {
            let spec = crate::kernel::KernelSpec::from_node(n)?;
            if a.len() != spec.arity() {
                return Err(format!(
                    "kernel {} takes {} operands, found {}",
                    spec.kind(),
                    spec.arity(),
                    a.len()
                ));
            }
            if n.ty.shape.last().and_then(|d| d.as_const()) != Some(spec.out_cols()) {
                return Err(format!(
                    "kernel {} gives {} columns but is declared {}",
                    spec.kind(),
                    spec.out_cols(),
                    n.ty
                ));
            }
            if let (Some(c), Some(t)) = (spec.in_cols(), a.first())
                && t.shape.last().and_then(|d| d.as_const()) != Some(c)
            {
                return Err(format!(
                    "kernel {} reads {c} columns, operand 0 is {t}",
                    spec.kind()
                ));
            }
            Ok(n.ty.clone())
        }
        OpKind::Embedding => {
            arity(a, 2, 2)?;
            if a[0].dtype != DType::I32 {
                return Err(format!("ids must be i32, found {}", a[0]));
            }
            rank(&a[0], 1, "ids")?;
            f32_arg(&a[1], "table")?;
            rank(&a[1], 2, "table")?;
            Ok(TensorType::f32(vec![
                a[0].shape[0].clone(),
                a[1].shape[1].clone(),
            ]))
        }
        OpKind::RmsNorm => {
            arity(a, 2, 2)?;
            f32_arg(&a[0], "x")?;
            f32_arg(&a[1], "weight")?;
            rank(&a[1], 1, "weight")?;
            let last = a[0].last_dim().ok_or("x must have rank >= 1")?;
            dim_eq(last, &a[1].shape[0], "x last dim vs weight")?;
            let eps = need_float(n, "eps")?;
            if eps.is_nan() || eps < 0.0 {
                return Err(format!("eps must be >= 0, found {eps}"));
            }
            Ok(a[0].clone())
        }
        OpKind::Linear => {
            arity(a, 2, 3)?;
            f32_arg(&a[0], "x")?;
            f32_arg(&a[1], "weight")?;
            rank(&a[1], 2, "weight")?;
            let k = a[0].last_dim().ok_or("x must have rank >= 1")?;
            dim_eq(k, &a[1].shape[1], "x last dim vs weight columns")?;
            if a.len() == 3 {
                f32_arg(&a[2], "bias")?;
                rank(&a[2], 1, "bias")?;
                dim_eq(&a[2].shape[0], &a[1].shape[0], "bias vs weight rows")?;
            }
            let mut shape = a[0].shape.clone();
            let last = shape.len() - 1;
            shape[last] = a[1].shape[0].clone();
            Ok(TensorType::f32(shape))
        }
        OpKind::Rope => {
            arity(a, 2, 3)?;
            f32_arg(&a[0], "x")?;
            rank(&a[0], 2, "x")?;
            if a[1].dtype != DType::I32 {
                return Err(format!("positions must be i32, found {}", a[1]));
            }
            rank(&a[1], 1, "positions")?;
            dim_eq(&a[0].shape[0], &a[1].shape[0], "x rows vs positions")?;
            let heads = need_pos(n, "heads")?;
            let hd = need_pos(n, "head_dim")?;
            if hd % 2 != 0 {
                return Err(format!("head_dim must be even, found {hd}"));
            }
            if let Some(rd) = n.int_attr("rope_dim")
                && (rd <= 0 || rd as usize > hd || rd % 2 != 0)
            {
                return Err(format!(
                    "rope_dim must be even and in 1..=head_dim, found {rd}"
                ));
            }
            if let Some(r) = n.int_attr("rotate")
                && r != 0
                && (r < 2 || !(r as u64).is_power_of_two() || hd % r as usize != 0)
            {
                return Err(format!(
                    "rotate (a Hadamard block) must be 0 or a power of two >= 2 dividing \
                     head_dim {hd}, found {r}"
                ));
            }
            let theta = need_float(n, "theta")?;
            if theta.is_nan() || theta <= 0.0 {
                return Err(format!("theta must be > 0, found {theta}"));
            }
            dim_eq(
                &a[0].shape[1],
                &Dim::Const(heads * hd),
                "x columns vs heads*head_dim",
            )?;
            if a.len() == 3 {
                // per-frequency divisors (GGUF rope_freqs), one per rotated pair
                f32_arg(&a[2], "freq_factors")?;
                let rd = n.int_attr("rope_dim").map(|r| r as usize).unwrap_or(hd);
                dim_eq(
                    &a[2].shape.first().cloned().unwrap_or(Dim::Const(0)),
                    &Dim::Const(rd / 2),
                    "freq_factors length vs rope_dim/2",
                )?;
                rank(&a[2], 1, "freq_factors")?;
            }
            if let Some(Attr::Str(kind)) = n.attr("scaling")
                && !matches!(kind.as_str(), "none" | "linear" | "llama3")
            {
                return Err(format!("unknown rope scaling `{kind}`"));
            }
            Ok(a[0].clone())
        }
        OpKind::Attention => {
            if a.len() != 3 && a.len() != 7 {
                return Err(format!(
                    "takes 3 operands (q, k, v) or 7 (with K/V smoothing shift and scale), found {}",
                    a.len()
                ));
            }
            for (t, w) in a.iter().zip(["q", "k", "v"]) {
                f32_arg(t, w)?;
                rank(t, 2, w)?;
            }
            if let Some(b) = n.int_attr("kv_bits")
                && !(2..=8).contains(&b)
            {
                return Err(format!("kv_bits must be in 2..=8, found {b}"));
            }
            check_param_dtype(n, "kv_param_dtype")?;
            if let Some(g) = n.int_attr("kv_group") {
                let hd = n.int_attr("head_dim").unwrap_or(0);
                if g <= 0 || hd <= 0 || hd % g != 0 {
                    return Err(format!("kv_group must divide head_dim {hd}, found {g}"));
                }
            }
            if n.attr("past_only").is_some() && n.bool_attr("past_only").is_none() {
                return Err("attribute `past_only` must be a bool".into());
            }
            if n.attr("kv_window").is_some() {
                match n.int_attr("kv_window") {
                    Some(w) if w >= 1 => {}
                    _ => return Err("attribute `kv_window` must be an integer >= 1".into()),
                }
                if n.bool_attr("past_only") != Some(true) {
                    return Err("attribute `kv_window` needs past-only attention".into());
                }
            }
            let h = need_pos(n, "heads")?;
            let kvh = need_pos(n, "kv_heads")?;
            let hd = need_pos(n, "head_dim")?;
            need_int(n, "layer").and_then(|l| {
                if l < 0 {
                    Err(format!("layer must be >= 0, found {l}"))
                } else {
                    Ok(())
                }
            })?;
            if h % kvh != 0 {
                return Err(format!("heads {h} is not a multiple of kv_heads {kvh}"));
            }
            dim_eq(&a[0].shape[0], &a[1].shape[0], "q rows vs k rows")?;
            dim_eq(&a[0].shape[0], &a[2].shape[0], "q rows vs v rows")?;
            dim_eq(
                &a[0].shape[1],
                &Dim::Const(h * hd),
                "q columns vs heads*head_dim",
            )?;
            dim_eq(&a[1].shape[1], &Dim::Const(kvh * hd), "k columns")?;
            dim_eq(&a[2].shape[1], &Dim::Const(kvh * hd), "v columns")?;
            for (t, w) in a
                .iter()
                .skip(3)
                .zip(["k_shift", "k_scale", "v_shift", "v_scale"])
            {
                f32_arg(t, w)?;
                rank(t, 1, w)?;
                dim_eq(&t.shape[0], &Dim::Const(kvh * hd), w)?;
            }
            if n.bool_attr("causal").is_none() {
                return Err("missing bool attribute `causal`".into());
            }
            Ok(a[0].clone())
        }
        OpKind::Silu | OpKind::Softmax => {
            arity(a, 1, 1)?;
            f32_arg(&a[0], "x")?;
            if a[0].rank() == 0 {
                return Err("x must have rank >= 1".into());
            }
            Ok(a[0].clone())
        }
        OpKind::Mul | OpKind::Add => {
            arity(a, 2, 2)?;
            f32_arg(&a[0], "lhs")?;
            if a[0] != a[1] {
                return Err(format!("operand types differ: {} vs {}", a[0], a[1]));
            }
            Ok(a[0].clone())
        }
        OpKind::Reshape => {
            arity(a, 1, 1)?;
            if numel_key(&a[0].shape) != numel_key(&n.ty.shape) || a[0].dtype != n.ty.dtype {
                return Err(format!("cannot reshape {} to {}", a[0], n.ty));
            }
            Ok(n.ty.clone())
        }
        OpKind::Transpose => {
            arity(a, 1, 1)?;
            let Some(Attr::Ints(perm)) = n.attr("perm") else {
                return Err("missing integer list attribute `perm`".into());
            };
            let r = a[0].rank();
            let mut seen = vec![false; r];
            if perm.len() != r {
                return Err(format!("perm has {} entries for rank {r}", perm.len()));
            }
            for &p in perm {
                if p < 0 || p as usize >= r || seen[p as usize] {
                    return Err(format!("perm {perm:?} is not a permutation of 0..{r}"));
                }
                seen[p as usize] = true;
            }
            let shape = perm
                .iter()
                .map(|&p| a[0].shape[p as usize].clone())
                .collect();
            Ok(TensorType::new(a[0].dtype, shape))
        }
        OpKind::FakeQuant => {
            arity(a, 3, 3)?;
            for (t, w) in a.iter().zip(["weight", "gamma", "beta"]) {
                f32_arg(t, w)?;
                rank(t, 2, w)?;
            }
            let (rows, cols) = (&a[0].shape[0], &a[0].shape[1]);
            let g = quant_groups(n, cols)?;
            check_param_dtype(n, "param_dtype")?;
            if n.attr("lwc").is_some() && n.bool_attr("lwc").is_none() {
                return Err("attribute `lwc` must be a bool".into());
            }
            for t in &a[1..] {
                dim_eq(&t.shape[0], rows, "clipping rows vs weight rows")?;
                dim_eq(&t.shape[1], &Dim::Const(g), "clipping groups")?;
            }
            Ok(a[0].clone())
        }
        OpKind::QLinear => {
            arity(a, 4, 5)?;
            f32_arg(&a[0], "x")?;
            if a[1].dtype != DType::U4 {
                return Err(format!("codes must be u4, found {}", a[1]));
            }
            rank(&a[1], 2, "codes")?;
            let k = a[0].last_dim().ok_or("x must have rank >= 1")?;
            dim_eq(k, &a[1].shape[1], "x last dim vs codes columns")?;
            let g = quant_groups(n, &a[1].shape[1])?;
            for (t, w) in a[2..4].iter().zip(["scales", "zeros"]) {
                if t.dtype != DType::F16 {
                    return Err(format!("{w} must be f16, found {t}"));
                }
                rank(t, 2, w)?;
                dim_eq(&t.shape[0], &a[1].shape[0], w)?;
                dim_eq(&t.shape[1], &Dim::Const(g), w)?;
            }
            if need_int(n, "bits")? > 4 {
                return Err("packed u4 codes hold at most 4 bits".into());
            }
            if a.len() == 5 {
                f32_arg(&a[4], "bias")?;
                rank(&a[4], 1, "bias")?;
                dim_eq(&a[4].shape[0], &a[1].shape[0], "bias vs rows")?;
            }
            let mut shape = a[0].shape.clone();
            let last = shape.len() - 1;
            shape[last] = a[1].shape[0].clone();
            Ok(TensorType::f32(shape))
        }
        OpKind::Loss => {
            arity(a, 2, 2)?;
            f32_arg(&a[0], "prediction")?;
            if a[0] != a[1] {
                return Err(format!(
                    "prediction {} and target {} differ in type",
                    a[0], a[1]
                ));
            }
            match n.attr("kind") {
                Some(Attr::Str(k)) if k == "mae" || k == "mse" => {}
                Some(k) => return Err(format!("loss kind must be \"mae\" or \"mse\", found {k}")),
                None => return Err("missing string attribute `kind`".into()),
            }
            Ok(TensorType::f32(vec![Dim::Const(1)]))
        }
        OpKind::Vjp => {
            let fwd = vjp_forward(n)?;
            let wrt = need_int(n, "wrt")?;
            let nf = if fwd.op == OpKind::Loss {
                a.len()
            } else {
                a.len()
                    .checked_sub(1)
                    .ok_or("takes the forward operands and dy")?
            };
            if wrt < 0 || wrt as usize >= nf {
                return Err(format!("wrt {wrt} is not one of the {nf} forward operands"));
            }
            let y = if fwd.op == OpKind::Reshape {
                // A reshape's result type is declared, not inferred: dy carries it.
                arity(a, 2, 2)?;
                if numel_key(&a[0].shape) != numel_key(&a[1].shape) || a[0].dtype != a[1].dtype {
                    return Err(format!("dy {} is not a reshape of {}", a[1], a[0]));
                }
                a[1].clone()
            } else {
                infer(&fwd, &a[..nf]).map_err(|e| format!("forward {}: {e}", fwd.op.name()))?
            };
            if nf < a.len() && a[nf] != y {
                return Err(format!("dy is {} but the forward op gives {y}", a[nf]));
            }
            let t = &a[wrt as usize];
            if t.dtype != DType::F32 {
                return Err(format!("operand {wrt} ({t}) is not differentiable"));
            }
            Ok(t.clone())
        }
        OpKind::Concat => {
            if a.is_empty() {
                return Err("takes at least one operand".into());
            }
            let axis = need_int(n, "axis")?;
            let r = a[0].rank();
            if axis < 0 || axis as usize >= r {
                return Err(format!("axis {axis} out of range for rank {r}"));
            }
            let axis = axis as usize;
            let mut total = 0usize;
            for t in a {
                if t.dtype != a[0].dtype || t.rank() != r {
                    return Err(format!("operand {t} does not match {}", a[0]));
                }
                for (i, (x, y)) in t.shape.iter().zip(&a[0].shape).enumerate() {
                    if i != axis {
                        dim_eq(x, y, "concat operand")?;
                    }
                }
                match t.shape[axis] {
                    Dim::Const(c) => total += c,
                    Dim::Sym(_) => return Err("the concat axis must be constant".into()),
                }
            }
            let mut shape = a[0].shape.clone();
            shape[axis] = Dim::Const(total);
            Ok(TensorType::new(a[0].dtype, shape))
        }
    }
}
