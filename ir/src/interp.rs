//! The reference interpreter: executes any graph in f32 and so defines what every op means.
//! Matmuls go through the `gemm` crate (multi-threaded); attention keeps a KV cache per layer
//! for incremental decoding.

use crate::graph::{Attr, Graph, Node, OpKind, Operand};
use crate::kvcache::{KvCache, KvLayer};
use crate::math::{dot, softmax_in_place};
use crate::types::DType;
use crate::{Error, Module};
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

/// Tensor data held by the interpreter.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        Tensor {
            shape,
            data: TensorData::F32(data),
        }
    }

    pub fn i32(shape: Vec<usize>, data: Vec<i32>) -> Tensor {
        Tensor {
            shape,
            data: TensorData::I32(data),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            TensorData::I32(_) => None,
        }
    }

    pub fn into_f32(self) -> Option<Vec<f32>> {
        match self.data {
            TensorData::F32(v) => Some(v),
            TensorData::I32(_) => None,
        }
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::I32(_) => DType::I32,
        }
    }
}

/// How a run treats the KV of the chunk it processes (DESIGN.md, runtime semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// Prefill/decode: with past-only attention the chunk's own K/V are used in full precision
    /// by the whole chunk; past tokens come from the (quantized) cache.
    Prefill,
    /// Parallel simulation of token-by-token decoding: position i reads quantized K/V of every
    /// earlier position (also inside the chunk) and, with past-only, FP K/V of itself only.
    DecodeEquivalent,
}

fn ierr(node: &Node, msg: impl std::fmt::Display) -> Error {
    Error::Interp(format!("{}: {msg}", crate::text::print_node(node)))
}

/// Executes a module's graph.
pub struct Interpreter<'a> {
    graph: &'a Graph,
    params: HashMap<&'a str, Cow<'a, [f32]>>,
    /// Index of the last node that reads each value (usize::MAX: a graph output).
    last_use: Vec<usize>,
    pool: rayon::ThreadPool,
    threads: usize,
    /// Values of param-only nodes (fake-quantized weights), computed once.
    consts: HashMap<u32, Vec<f32>>,
    /// Dequantized weights of `qlinear` nodes, by node index.
    qweights: HashMap<usize, Vec<f32>>,
    /// All gradients of the last attention / fake_quant differentiated in this run, by the
    /// forward op and operands (+dy): its `vjp` nodes come one after another and share them.
    vjp_cache: std::sync::Mutex<Option<VjpCache>>,
}

type VjpCache = (OpKind, Vec<Operand>, Vec<Vec<f32>>);

impl<'a> Interpreter<'a> {
    /// Resolve every param (f32 views of the store) and build a pool of `threads` workers.
    pub fn new(module: &'a Module, threads: usize) -> Result<Self, Error> {
        let graph = &module.graph;
        let mut params = HashMap::new();
        for p in &graph.params {
            let w = module.weights.get(&p.name).ok_or_else(|| {
                Error::Interp(format!("param @{} is not in the weight store", p.name))
            })?;
            if w.ty() != p.ty {
                return Err(Error::Interp(format!(
                    "param @{} is declared {} but the store holds {}",
                    p.name,
                    p.ty,
                    w.ty()
                )));
            }
            params.insert(p.name.as_str(), w.f32());
        }
        let mut last_use = vec![0usize; graph.value_bound() as usize];
        for (i, n) in graph.nodes.iter().enumerate() {
            for v in n.value_args() {
                last_use[v.0 as usize] = i;
            }
        }
        for o in &graph.outputs {
            last_use[o.value.0 as usize] = usize::MAX;
        }
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Interp(format!("cannot start {threads} threads: {e}")))?;
        let mut consts = HashMap::new();
        let mut qweights = HashMap::new();
        let p = |name: &Operand| -> Option<&[f32]> {
            match name {
                Operand::Param(n) => params.get(n.as_str()).map(|c| &c[..]),
                Operand::Value(_) => None,
            }
        };
        for (i, n) in graph.nodes.iter().enumerate() {
            match n.op {
                OpKind::FakeQuant => {
                    if let (Some(w), Some(g), Some(b)) =
                        (p(&n.args[0]), p(&n.args[1]), p(&n.args[2]))
                    {
                        let cols = n.ty.shape.last().and_then(|d| d.as_const()).unwrap_or(1);
                        consts.insert(n.out.0, fake_quant_node(n, w, cols, g, b));
                    }
                }
                OpKind::QLinear | OpKind::Vjp
                    if n.op == OpKind::QLinear
                        || matches!(n.attr("vjp_of"), Some(Attr::Str(s)) if s == "qlinear") =>
                {
                    let (Some(c), Some(s), Some(z)) = (p(&n.args[1]), p(&n.args[2]), p(&n.args[3]))
                    else {
                        return Err(ierr(n, "qlinear operands 1..3 must be params"));
                    };
                    let cols = match &n.args[1] {
                        Operand::Param(name) => graph
                            .param(name)
                            .and_then(|d| d.ty.shape.last().and_then(|x| x.as_const()))
                            .unwrap_or(1),
                        Operand::Value(_) => 1,
                    };
                    let group = n.int_attr("group").unwrap_or(-1);
                    qweights.insert(i, crate::quant::dequantize_rows(c, cols, group, s, z));
                }
                _ => {}
            }
        }
        Ok(Interpreter {
            graph,
            params,
            last_use,
            pool,
            threads,
            consts,
            qweights,
            vjp_cache: std::sync::Mutex::new(None),
        })
    }

    pub fn graph(&self) -> &Graph {
        self.graph
    }

    /// The current values of an f32 param.
    pub fn param(&self, name: &str) -> Option<&[f32]> {
        self.params.get(name).map(|c| &c[..])
    }

    /// Replace an f32 param's values (calibration updates learned params between steps);
    /// `fake_quant` results that read it are recomputed.
    pub fn set_param(&mut self, name: &str, data: Vec<f32>) -> Result<(), Error> {
        self.set_params(vec![(name.to_string(), data)])
    }

    /// `set_param` for several params, recomputing each dependent `fake_quant` once.
    pub fn set_params(&mut self, items: Vec<(String, Vec<f32>)>) -> Result<(), Error> {
        let graph: &'a Graph = self.graph;
        let mut names = std::collections::HashSet::new();
        for (name, data) in items {
            let decl = graph
                .param(&name)
                .ok_or_else(|| Error::Interp(format!("set_param: no param @{name}")))?;
            let numel = decl
                .ty
                .concrete(&|_| None)
                .map(|s| s.iter().product::<usize>())
                .unwrap_or(0);
            if decl.ty.dtype != DType::F32 || numel != data.len() {
                return Err(Error::Interp(format!(
                    "set_param: @{name} is {}, given {} f32 values",
                    decl.ty,
                    data.len()
                )));
            }
            self.params.insert(decl.name.as_str(), Cow::Owned(data));
            names.insert(name);
        }
        self.clear_vjp_cache();
        let touched: Vec<&Node> = graph
            .nodes
            .iter()
            .filter(|n| {
                n.op == OpKind::FakeQuant
                    && self.consts.contains_key(&n.out.0)
                    && n.args
                        .iter()
                        .any(|a| matches!(a, Operand::Param(p) if names.contains(p)))
            })
            .collect();
        let params = &self.params;
        let results: Vec<(u32, Vec<f32>)> = touched
            .par_iter()
            .map(|n| {
                let get = |i: usize| match &n.args[i] {
                    Operand::Param(p) => Ok(&params[p.as_str()][..]),
                    Operand::Value(_) => Err(ierr(n, "operand is not a param")),
                };
                let cols = n.ty.shape.last().and_then(|d| d.as_const()).unwrap_or(1);
                Ok((n.out.0, fake_quant_node(n, get(0)?, cols, get(1)?, get(2)?)))
            })
            .collect::<Result<_, Error>>()?;
        for (k, v) in results {
            self.consts.insert(k, v);
        }
        Ok(())
    }

    /// Run the graph on named inputs. The cache grows by the input's `seq` tokens; on any
    /// error it is left exactly as it was.
    pub fn run(
        &self,
        inputs: &[(&str, Tensor)],
        cache: &mut KvCache,
    ) -> Result<BTreeMap<String, Tensor>, Error> {
        self.run_mode(inputs, cache, RunMode::Prefill)
    }

    /// `run` with an explicit treatment of the chunk's own K/V.
    pub fn run_mode(
        &self,
        inputs: &[(&str, Tensor)],
        cache: &mut KvCache,
        mode: RunMode,
    ) -> Result<BTreeMap<String, Tensor>, Error> {
        let before = cache.checkpoint();
        let r = self.pool.install(|| self.run_inner(inputs, cache, mode));
        match r {
            Ok((out, seq)) => {
                cache.len += seq;
                Ok(out)
            }
            Err(e) => {
                // Layers already run appended this chunk (and replaced their windows' tails)
                cache.rollback(before);
                Err(e)
            }
        }
    }

    fn clear_vjp_cache(&self) {
        if let Ok(mut c) = self.vjp_cache.lock() {
            *c = None;
        }
    }

    /// Gradient `wrt` from the cached bundle of this forward op, computing the bundle first
    /// when the cache holds another one.
    fn cached_grads(
        &self,
        op: OpKind,
        node: &Node,
        wrt: usize,
        compute: impl FnOnce() -> Result<Vec<Vec<f32>>, Error>,
    ) -> Result<Vec<f32>, Error> {
        let mut c = self
            .vjp_cache
            .lock()
            .map_err(|_| ierr(node, "gradient cache poisoned"))?;
        let hit = matches!(&*c, Some((o, a, _)) if *o == op && *a == node.args);
        if !hit {
            *c = Some((op, node.args.clone(), compute()?));
        }
        let grads = &c
            .as_ref()
            .ok_or_else(|| ierr(node, "gradient cache empty"))?
            .2;
        grads
            .get(wrt)
            .cloned()
            .ok_or_else(|| ierr(node, format!("no gradient wrt operand {wrt}")))
    }

    fn run_inner(
        &self,
        inputs: &[(&str, Tensor)],
        cache: &mut KvCache,
        mode: RunMode,
    ) -> Result<(BTreeMap<String, Tensor>, usize), Error> {
        self.clear_vjp_cache();
        let g = self.graph;
        let mut binds: HashMap<String, usize> = HashMap::new();
        binds.insert("past".into(), cache.len);
        let mut vals: Vec<Option<Tensor>> = vec![None; g.value_bound() as usize];
        for inp in &g.inputs {
            let t = inputs
                .iter()
                .find(|(n, _)| *n == inp.name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::Interp(format!("input \"{}\" was not given", inp.name)))?;
            if t.dtype() != inp.ty.dtype || t.shape.len() != inp.ty.rank() {
                return Err(Error::Interp(format!(
                    "input \"{}\" must be {}, given {}{:?}",
                    inp.name,
                    inp.ty,
                    t.dtype(),
                    t.shape
                )));
            }
            if t.numel() != t.data_len() {
                return Err(Error::Interp(format!(
                    "input \"{}\": shape {:?} does not match its {} elements",
                    inp.name,
                    t.shape,
                    t.data_len()
                )));
            }
            for (d, &n) in inp.ty.shape.iter().zip(&t.shape) {
                match d {
                    crate::Dim::Const(c) if *c != n => {
                        return Err(Error::Interp(format!(
                            "input \"{}\" must be {}, given shape {:?}",
                            inp.name, inp.ty, t.shape
                        )));
                    }
                    crate::Dim::Sym(s) => {
                        if let Some(&b) = binds.get(s)
                            && b != n
                        {
                            return Err(Error::Interp(format!(
                                "input \"{}\": symbol {s} is {b} elsewhere but {n} here",
                                inp.name
                            )));
                        }
                        binds.insert(s.clone(), n);
                    }
                    _ => {}
                }
            }
            vals[inp.value.0 as usize] = Some(t.clone());
        }
        let seq = binds.get("seq").copied().unwrap_or(0);
        if cache.len + seq > cache.max_len {
            return Err(Error::ContextOverflow {
                have: cache.len,
                adding: seq,
                max: cache.max_len,
            });
        }
        for (i, node) in g.nodes.iter().enumerate() {
            if self.consts.contains_key(&node.out.0) {
                continue;
            }
            let shape = node
                .ty
                .concrete(&|s| binds.get(s).copied())
                .ok_or_else(|| ierr(node, "a symbol of the result type is unbound"))?;
            let out = self.eval(i, node, &vals, shape, cache, mode)?;
            for v in node.value_args() {
                if self.last_use[v.0 as usize] == i {
                    vals[v.0 as usize] = None;
                }
            }
            vals[node.out.0 as usize] = Some(out);
        }
        let mut outs = BTreeMap::new();
        for o in &g.outputs {
            let t = vals[o.value.0 as usize]
                .clone()
                .ok_or_else(|| Error::Interp(format!("output \"{}\" was not computed", o.name)))?;
            outs.insert(o.name.clone(), t);
        }
        Ok((outs, seq))
    }

    fn arg_f32<'b>(
        &'b self,
        node: &Node,
        vals: &'b [Option<Tensor>],
        i: usize,
    ) -> Result<&'b [f32], Error> {
        match node.args.get(i) {
            Some(Operand::Value(v)) if self.consts.contains_key(&v.0) => Ok(&self.consts[&v.0][..]),
            Some(Operand::Value(v)) => vals[v.0 as usize]
                .as_ref()
                .and_then(Tensor::as_f32)
                .ok_or_else(|| ierr(node, format!("operand {i} is not an f32 value"))),
            Some(Operand::Param(p)) => self
                .params
                .get(p.as_str())
                .map(|c| &c[..])
                .ok_or_else(|| ierr(node, format!("param @{p} is not resolved"))),
            None => Err(ierr(node, format!("missing operand {i}"))),
        }
    }

    fn arg_shape<'b>(&'b self, node: &Node, vals: &'b [Option<Tensor>], i: usize) -> Vec<usize> {
        match node.args.get(i) {
            Some(Operand::Value(v)) => match vals[v.0 as usize].as_ref() {
                Some(t) => t.shape.clone(),
                None => self
                    .graph
                    .nodes
                    .iter()
                    .find(|n| n.out == *v)
                    .and_then(|n| n.ty.concrete(&|_| None))
                    .unwrap_or_default(),
            },
            Some(Operand::Param(p)) => self
                .graph
                .param(p)
                .and_then(|d| d.ty.concrete(&|_| None))
                .unwrap_or_default(),
            None => vec![],
        }
    }

    fn arg_i32<'b>(
        &self,
        node: &Node,
        vals: &'b [Option<Tensor>],
        i: usize,
    ) -> Result<&'b [i32], Error> {
        match node.args.get(i) {
            Some(Operand::Value(v)) => match vals[v.0 as usize].as_ref().map(|t| &t.data) {
                Some(TensorData::I32(d)) => Ok(d),
                _ => Err(ierr(node, format!("operand {i} is not an i32 value"))),
            },
            _ => Err(ierr(node, format!("operand {i} must be an i32 value"))),
        }
    }

    fn eval(
        &self,
        index: usize,
        node: &Node,
        vals: &[Option<Tensor>],
        shape: Vec<usize>,
        cache: &mut KvCache,
        mode: RunMode,
    ) -> Result<Tensor, Error> {
        let numel: usize = shape.iter().product();
        let last = shape.last().copied().unwrap_or(1).max(1);
        let out = match node.op {
            OpKind::Embedding => {
                let ids = self.arg_i32(node, vals, 0)?;
                let table = self.arg_f32(node, vals, 1)?;
                let d = last;
                let vocab = table.len() / d;
                let mut y = vec![0f32; numel];
                for (r, &id) in ids.iter().enumerate() {
                    if id < 0 || id as usize >= vocab {
                        return Err(Error::TokenOutOfRange {
                            id: id as i64,
                            vocab,
                        });
                    }
                    let id = id as usize;
                    y[r * d..(r + 1) * d].copy_from_slice(&table[id * d..(id + 1) * d]);
                }
                y
            }
            OpKind::RmsNorm => {
                let x = self.arg_f32(node, vals, 0)?;
                let w = self.arg_f32(node, vals, 1)?;
                let eps = node.float_attr("eps").unwrap_or(1e-6);
                let mut y = vec![0f32; numel];
                y.par_chunks_mut(last)
                    .zip(x.par_chunks(last))
                    .for_each(|(yr, xr)| rms_norm_row(xr, w, eps, yr));
                y
            }
            OpKind::Linear => {
                let x = self.arg_f32(node, vals, 0)?;
                let w = self.arg_f32(node, vals, 1)?;
                let k = *self.arg_shape(node, vals, 0).last().unwrap_or(&1);
                let n = last;
                let m = numel / n.max(1);
                let mut y = vec![0f32; numel];
                linear(x, w, &mut y, m, n, k, self.threads);
                if node.args.len() > 2 {
                    let b = self.arg_f32(node, vals, 2)?;
                    for row in y.chunks_mut(n) {
                        for (o, bb) in row.iter_mut().zip(b) {
                            *o += bb;
                        }
                    }
                }
                y
            }
            OpKind::Rope => self.rope(node, vals, 0, false)?,
            OpKind::Attention => self.attention(node, vals, cache, mode)?,
            OpKind::FakeQuant => {
                // Param-only: evaluated once at construction (consts); here only if some
                // operand is a value.
                let w = self.arg_f32(node, vals, 0)?;
                let (g, b) = (self.arg_f32(node, vals, 1)?, self.arg_f32(node, vals, 2)?);
                fake_quant_node(node, w, last, g, b)
            }
            OpKind::QLinear => {
                let x = self.arg_f32(node, vals, 0)?;
                let w = self
                    .qweights
                    .get(&index)
                    .ok_or_else(|| ierr(node, "packed weights were not prepared"))?;
                let k = *self.arg_shape(node, vals, 0).last().unwrap_or(&1);
                let n = last;
                let m = numel / n.max(1);
                let mut y = vec![0f32; numel];
                linear(x, w, &mut y, m, n, k, self.threads);
                if node.args.len() > 4 {
                    let b = self.arg_f32(node, vals, 4)?;
                    for row in y.chunks_mut(n) {
                        for (o, bb) in row.iter_mut().zip(b) {
                            *o += bb;
                        }
                    }
                }
                y
            }
            OpKind::Silu => {
                let x = self.arg_f32(node, vals, 0)?;
                x.iter().map(|&v| v / (1.0 + (-v).exp())).collect()
            }
            OpKind::Mul | OpKind::Add => {
                let a = self.arg_f32(node, vals, 0)?;
                let b = self.arg_f32(node, vals, 1)?;
                if node.op == OpKind::Mul {
                    a.iter().zip(b).map(|(x, y)| x * y).collect()
                } else {
                    a.iter().zip(b).map(|(x, y)| x + y).collect()
                }
            }
            OpKind::Softmax => {
                let x = self.arg_f32(node, vals, 0)?;
                let mut y = x.to_vec();
                for row in y.chunks_mut(last) {
                    softmax_in_place(row);
                }
                y
            }
            OpKind::Reshape => {
                return match node.args.first() {
                    Some(Operand::Value(v)) => {
                        let t = vals[v.0 as usize]
                            .as_ref()
                            .ok_or_else(|| ierr(node, "operand not computed"))?;
                        if t.numel() != numel {
                            return Err(ierr(
                                node,
                                format!("cannot reshape {:?} to {shape:?}", t.shape),
                            ));
                        }
                        Ok(Tensor {
                            shape,
                            data: t.data.clone(),
                        })
                    }
                    _ => Ok(Tensor::f32(shape, self.arg_f32(node, vals, 0)?.to_vec())),
                };
            }
            OpKind::Transpose => {
                let x = self.arg_f32(node, vals, 0)?;
                let xs = self.arg_shape(node, vals, 0);
                let Some(Attr::Ints(perm)) = node.attr("perm") else {
                    return Err(ierr(node, "missing perm"));
                };
                let perm: Vec<usize> = perm.iter().map(|&p| p as usize).collect();
                transpose(x, &xs, &perm)
            }
            OpKind::Loss => {
                let p = self.arg_f32(node, vals, 0)?;
                let t = self.arg_f32(node, vals, 1)?;
                vec![crate::math::loss_value(loss_kind(node), p, t)]
            }
            OpKind::Vjp => self.vjp(index, node, vals)?,
            OpKind::Kernel => {
                return Err(ierr(
                    node,
                    "kernel nodes (a lowered graph) run on a compiled engine; \
                     the interpreter runs the graph before lowering",
                ));
            }
            OpKind::Concat => {
                let axis = node.int_attr("axis").unwrap_or(0) as usize;
                let outer: usize = shape[..axis].iter().product();
                let inner: usize = shape[axis + 1..].iter().product();
                let mut y = Vec::with_capacity(numel);
                let parts: Vec<(&[f32], usize)> = (0..node.args.len())
                    .map(|i| {
                        Ok((
                            self.arg_f32(node, vals, i)?,
                            self.arg_shape(node, vals, i)[axis],
                        ))
                    })
                    .collect::<Result<_, Error>>()?;
                for o in 0..outer {
                    for (p, d) in &parts {
                        y.extend_from_slice(&p[o * d * inner..(o + 1) * d * inner]);
                    }
                }
                y
            }
        };
        if out.len() != numel {
            return Err(ierr(
                node,
                format!("produced {} elements for shape {shape:?}", out.len()),
            ));
        }
        Ok(Tensor::f32(shape, out))
    }

    /// RoPE of operand `xi` (positions and factors follow it); `inverse` rotates back (the
    /// transpose of the rotation, i.e. its vector-Jacobian product).
    fn rope(
        &self,
        node: &Node,
        vals: &[Option<Tensor>],
        xi: usize,
        inverse: bool,
    ) -> Result<Vec<f32>, Error> {
        let x = self.arg_f32(node, vals, xi)?;
        let pos = self.arg_i32(node, vals, 1)?;
        let factors = if node.args.len() > 2 && xi != 2 {
            Some(self.arg_f32(node, vals, 2)?)
        } else {
            None
        };
        let heads = node.int_attr("heads").unwrap_or(1) as usize;
        let hd = node.int_attr("head_dim").unwrap_or(2) as usize;
        let rd = node.int_attr("rope_dim").map(|r| r as usize).unwrap_or(hd);
        let inv = rope_inv_freq(node, rd, factors);
        // K/V rotation: each head's rotated q/k times the orthonormal Hadamard matrix of
        // `rotate` (symmetric, its own inverse: the gradient applies it before undoing RoPE)
        let rot = node.int_attr("rotate").unwrap_or(0).max(0) as usize;
        let mut y = x.to_vec();
        for (r, row) in y.chunks_mut(heads * hd).enumerate() {
            let p = pos[r];
            if p < 0 {
                return Err(ierr(node, format!("negative position {p}")));
            }
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv
                .iter()
                .map(|&f| {
                    let a = (p as f32 * f) as f64;
                    let sn = a.sin() as f32;
                    (a.cos() as f32, if inverse { -sn } else { sn })
                })
                .unzip();
            for h in row.chunks_mut(hd) {
                if inverse && rot > 0 {
                    crate::math::hadamard_in_place(h, rot);
                }
                rope_rotate(&mut h[..rd], &cos, &sin);
                if !inverse && rot > 0 {
                    crate::math::hadamard_in_place(h, rot);
                }
            }
        }
        Ok(y)
    }

    /// A `vjp` node: the gradient wrt one operand of the forward op, recomputing what the rule
    /// needs from the forward operands.
    fn vjp(&self, index: usize, node: &Node, vals: &[Option<Tensor>]) -> Result<Vec<f32>, Error> {
        use crate::grad as gr;
        let fwd = crate::verify::vjp_forward(node).map_err(|e| ierr(node, e))?;
        let wrt = node.int_attr("wrt").unwrap_or(0).max(0) as usize;
        let nargs = node.args.len();
        let dyi = nargs.saturating_sub(1);
        let bad = || {
            ierr(
                node,
                format!("{} has no gradient wrt operand {wrt}", fwd.op.name()),
            )
        };
        let f = |i: usize| self.arg_f32(node, vals, i);
        let shape = |i: usize| self.arg_shape(node, vals, i);
        let last = |v: &[usize]| v.last().copied().unwrap_or(1).max(1);
        Ok(match fwd.op {
            OpKind::Loss => gr::loss_vjp(loss_kind(node), f(0)?, f(1)?, wrt),
            OpKind::Linear | OpKind::QLinear => {
                let dy = f(dyi)?;
                let k = last(&shape(0));
                let n = shape(1).first().copied().unwrap_or(1).max(1);
                let m = dy.len() / n;
                match (fwd.op, wrt) {
                    (OpKind::Linear, 0) => gr::linear_dx(dy, f(1)?, m, n, k, self.threads),
                    (OpKind::Linear, 1) => gr::linear_dw(dy, f(0)?, m, n, k, self.threads),
                    (OpKind::QLinear, 0) => {
                        let w = self
                            .qweights
                            .get(&index)
                            .ok_or_else(|| ierr(node, "packed weights were not prepared"))?;
                        gr::linear_dx(dy, w, m, n, k, self.threads)
                    }
                    (OpKind::Linear, 2) | (OpKind::QLinear, 4) => gr::col_sums(dy, n),
                    _ => return Err(bad()),
                }
            }
            OpKind::RmsNorm => {
                let eps = node.float_attr("eps").unwrap_or(1e-6);
                if wrt > 1 {
                    return Err(bad());
                }
                gr::rms_norm_vjp(f(0)?, f(1)?, eps, f(dyi)?, wrt == 1)
            }
            OpKind::Rope => {
                if wrt != 0 {
                    return Err(bad());
                }
                self.rope(node, vals, dyi, true)?
            }
            OpKind::Attention => {
                let head_dim = node.int_attr("head_dim").unwrap_or(1) as usize;
                let spec = gr::AttnSpec {
                    heads: node.int_attr("heads").unwrap_or(1) as usize,
                    kv_heads: node.int_attr("kv_heads").unwrap_or(1) as usize,
                    head_dim,
                    causal: node.bool_attr("causal").unwrap_or(true),
                    kv_bits: node.int_attr("kv_bits").map(|b| b as u32),
                    kv_group: crate::kvcache::node_group_len(node, head_dim),
                    past_only: node.bool_attr("past_only").unwrap_or(false),
                    window: crate::kvcache::node_window(node),
                    pd: param_dtype(node, "kv_param_dtype"),
                };
                let smooth = if dyi == 7 {
                    Some([f(3)?, f(4)?, f(5)?, f(6)?])
                } else {
                    None
                };
                if wrt >= dyi {
                    return Err(bad());
                }
                self.cached_grads(OpKind::Attention, node, wrt, || {
                    Ok(gr::attention_grads(
                        spec,
                        f(0)?,
                        f(1)?,
                        f(2)?,
                        smooth,
                        f(dyi)?,
                    ))
                })?
            }
            OpKind::Silu => gr::silu_vjp(f(0)?, f(dyi)?),
            OpKind::Mul => {
                let other = f(1 - wrt.min(1))?;
                other.iter().zip(f(dyi)?).map(|(a, b)| a * b).collect()
            }
            OpKind::Add | OpKind::Reshape => f(dyi)?.to_vec(),
            OpKind::Softmax => gr::softmax_vjp(f(0)?, f(dyi)?, last(&shape(0))),
            OpKind::Transpose => {
                let Some(Attr::Ints(perm)) = node.attr("perm") else {
                    return Err(ierr(node, "missing perm"));
                };
                let mut inv = vec![0usize; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inv[p as usize] = i;
                }
                transpose(f(dyi)?, &shape(dyi), &inv)
            }
            OpKind::Concat => {
                let axis = node.int_attr("axis").unwrap_or(0) as usize;
                let ys = shape(dyi);
                let outer: usize = ys[..axis].iter().product();
                let inner: usize = ys[axis + 1..].iter().product();
                let start: usize = (0..wrt).map(|i| shape(i)[axis]).sum();
                let d = shape(wrt)[axis];
                let dy = f(dyi)?;
                let mut out = Vec::with_capacity(outer * d * inner);
                for o in 0..outer {
                    let base = (o * ys[axis] + start) * inner;
                    out.extend_from_slice(&dy[base..base + d * inner]);
                }
                out
            }
            OpKind::FakeQuant => {
                let bits = node.int_attr("bits").unwrap_or(4) as u32;
                let group = node.int_attr("group").unwrap_or(-1);
                let cols = last(&shape(0));
                self.cached_grads(OpKind::FakeQuant, node, wrt, || {
                    Ok(gr::fake_quant_grads(
                        f(0)?,
                        cols,
                        bits,
                        group,
                        f(1)?,
                        f(2)?,
                        param_dtype(node, "param_dtype"),
                        node.bool_attr("lwc") == Some(true),
                        f(dyi)?,
                    ))
                })?
            }
            OpKind::Embedding => {
                if wrt != 1 {
                    return Err(bad());
                }
                let ids = self.arg_i32(node, vals, 0)?;
                let ts = shape(1);
                let d = last(&ts);
                let mut out = vec![0f32; ts.iter().product()];
                for (r, (&id, g)) in ids.iter().zip(f(dyi)?.chunks(d)).enumerate() {
                    let id = id as usize;
                    if id * d >= out.len() {
                        return Err(ierr(node, format!("row {r}: token {id} out of range")));
                    }
                    for (a, &b) in out[id * d..(id + 1) * d].iter_mut().zip(g) {
                        *a += b;
                    }
                }
                out
            }
            OpKind::Vjp | OpKind::Kernel => return Err(bad()),
        })
    }

    fn attention(
        &self,
        node: &Node,
        vals: &[Option<Tensor>],
        cache: &mut KvCache,
        mode: RunMode,
    ) -> Result<Vec<f32>, Error> {
        let q = self.arg_f32(node, vals, 0)?;
        let k = self.arg_f32(node, vals, 1)?;
        let v = self.arg_f32(node, vals, 2)?;
        let h = node.int_attr("heads").unwrap_or(1) as usize;
        let kvh = node.int_attr("kv_heads").unwrap_or(1) as usize;
        let hd = node.int_attr("head_dim").unwrap_or(1) as usize;
        let causal = node.bool_attr("causal").unwrap_or(true);
        let layer = node.int_attr("layer").unwrap_or(0);
        let bits = node.int_attr("kv_bits").map(|b| b as u32);
        let pd = crate::quant::ParamDtype::from_attr(match node.attr("kv_param_dtype") {
            Some(Attr::Str(s)) => Some(s.as_str()),
            _ => None,
        });
        let past_only = node.bool_attr("past_only").unwrap_or(false);
        // with past-only: the last `window` positions (the reader included) in full precision
        let window = crate::kvcache::node_window(node);
        let smooth = if node.args.len() == 7 {
            Some([
                self.arg_f32(node, vals, 3)?,
                self.arg_f32(node, vals, 4)?,
                self.arg_f32(node, vals, 5)?,
                self.arg_f32(node, vals, 6)?,
            ])
        } else {
            None
        };
        let kvw = kvh * hd;
        let s = q.len() / (h * hd);
        // (scale, zero) groups a row: a kv head each, or `kv_group` channels
        let gs = crate::kvcache::node_group_len(node, hd);
        let ng = kvw / gs;
        let past = cache.len;
        let row_bytes = bits.map_or(0, |b| crate::kvcache::row_bytes(kvw, b));
        let slot = cache.layers.entry(layer).or_default();
        if slot.rows() == 0 && slot.width == 0 {
            slot.width = kvw;
            slot.row_bytes = row_bytes;
            slot.groups = ng;
            slot.param_bytes = pd.bytes();
        }
        let held = slot.rows();
        if slot.width != kvw
            || slot.groups != ng
            || slot.row_bytes != row_bytes
            || (held != past && held < past + s)
        {
            return Err(ierr(
                node,
                format!(
                    "KV cache slot holds {held} rows of {} values ({} bytes each), expected \
                     {past} (or at least {} to replay) of {kvw} ({row_bytes} bytes)",
                    slot.width,
                    slot.row_bytes,
                    past + s
                ),
            ));
        }
        // Held rows past the cache's length are replayed (crate::kvcache): the chunk reads
        // them where it would read its own quantized K/V, and what it computes itself is kept
        // in `computed` instead of being appended.
        let replay = held > past;
        let mut own = KvLayer {
            width: kvw,
            groups: ng,
            row_bytes,
            param_bytes: slot.param_bytes,
            ..Default::default()
        };
        // Keys/values as attention reads them: past rows from the cache, then the chunk's rows
        // in full precision (fp) and as they come back from the cache (deq).
        // the recent window's full-precision tail: the last min(window - 1, past) positions
        // before this chunk (a quantized past-only layer with a window only)
        let tail_rows = if bits.is_some() && past_only {
            (window - 1).min(past)
        } else {
            0
        };
        if slot.window_rows() != tail_rows {
            return Err(ierr(
                node,
                format!(
                    "KV cache slot holds {} full-precision rows of the recent window, expected \
                     {tail_rows} (a window of {window} after {past} tokens)",
                    slot.window_rows()
                ),
            ));
        }
        let (tk, tv) = (std::mem::take(&mut slot.wk), std::mem::take(&mut slot.wv));
        let (kall, vall, kdeq, vdeq) = match bits {
            None if replay => {
                own.k = k.to_vec();
                own.v = v.to_vec();
                let mut kall = slot.k[..past * kvw].to_vec();
                let mut vall = slot.v[..past * kvw].to_vec();
                kall.extend_from_slice(k);
                vall.extend_from_slice(v);
                (Cow::Owned(kall), Cow::Owned(vall), None, None)
            }
            None => {
                slot.k.extend_from_slice(k);
                slot.v.extend_from_slice(v);
                (
                    Cow::Borrowed(&slot.k[..]),
                    Cow::Borrowed(&slot.v[..]),
                    None,
                    None,
                )
            }
            Some(b) => {
                let (ks, kd) = (smooth.map(|x| (x[0], x[1])), smooth.map(|x| (x[2], x[3])));
                let (kc, kp, mut kq) = quantize_kv(k, ng, gs, b, pd, ks);
                let (vc, vp, mut vq) = quantize_kv(v, ng, gs, b, pd, kd);
                let (cp, pp) = (past * row_bytes, past * ng);
                let mut kall = dequantize_kv(&slot.kc[..cp], &slot.kp[..pp], ng, gs, b, ks);
                let mut vall = dequantize_kv(&slot.vc[..cp], &slot.vp[..pp], ng, gs, b, kd);
                if replay {
                    // the held rows of this chunk's positions (a call in chunks replays its
                    // held rows chunk by chunk)
                    let (ce, pe) = (cp + s * row_bytes, pp + s * ng);
                    kq = dequantize_kv(&slot.kc[cp..ce], &slot.kp[pp..pe], ng, gs, b, ks);
                    vq = dequantize_kv(&slot.vc[cp..ce], &slot.vp[pp..pe], ng, gs, b, kd);
                    (own.kc, own.vc, own.kp, own.vp) = (kc, vc, kp, vp);
                } else {
                    slot.kc.extend_from_slice(&kc);
                    slot.vc.extend_from_slice(&vc);
                    slot.kp.extend_from_slice(&kp);
                    slot.vp.extend_from_slice(&vp);
                }
                kall.extend_from_slice(k);
                vall.extend_from_slice(v);
                if past_only && window > 1 {
                    // the next tail: the last window - 1 positions of the old one and the chunk
                    let keep = (window - 1).min(past + s);
                    let next = |old: &[f32], new: &[f32]| {
                        // the last `keep` rows of old ++ new
                        let from_new = keep.min(s) * kvw;
                        let from_old = keep * kvw - from_new;
                        let mut t = Vec::with_capacity(keep * kvw);
                        t.extend_from_slice(&old[old.len() - from_old..]);
                        t.extend_from_slice(&new[new.len() - from_new..]);
                        t
                    };
                    (slot.wk, slot.wv) = (next(&tk, k), next(&tv, v));
                }
                (Cow::Owned(kall), Cow::Owned(vall), Some(kq), Some(vq))
            }
        };
        if replay {
            cache.computed.entry(layer).or_default().append(own);
        }
        // Does chunk query i (position past + i) read position j in full precision? All of
        // them without KV quantization; with past-only, the last `window` positions up to its
        // own and, in prefill, the whole chunk; the rest as the cache gives them back.
        let prefill = mode == RunMode::Prefill;
        let fp = |i: usize, j: usize| -> bool {
            let p = past + i;
            bits.is_none()
                || past_only
                    && (j <= p || prefill)
                    && j >= crate::kvcache::window_start(p, window, past, prefill)
        };
        let total = past + s;
        let group = h / kvh;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; s * h * hd];
        let krows = Rows {
            all: &kall,
            deq: kdeq.as_deref(),
            tail: &tk,
            past,
            kvw,
            hd,
        };
        let vrows = Rows {
            all: &vall,
            deq: vdeq.as_deref(),
            tail: &tv,
            past,
            kvw,
            hd,
        };
        out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
            let (i, head) = (idx / h, idx % h);
            let kh = head / group;
            let qr = &q[i * h * hd + head * hd..][..hd];
            let n = if causal { past + i + 1 } else { total };
            let off = kh * hd;
            let mut sc: Vec<f32> = (0..n)
                .map(|j| dot(qr, krows.get(j, fp(i, j), off)) * scale)
                .collect();
            softmax_in_place(&mut sc);
            for (j, &p) in sc.iter().enumerate() {
                let vr = vrows.get(j, fp(i, j), off);
                for (a, &b) in o.iter_mut().zip(vr) {
                    *a += p * b;
                }
            }
        });
        Ok(out)
    }
}

/// K or V rows as attention reads them: past rows (dequantized cache) and the chunk's FP rows
/// in `all`, the chunk's dequantized rows in `deq`, the last `tail.len() / kvw` past rows in
/// full precision in `tail` (the recent window's).
struct Rows<'a> {
    all: &'a [f32],
    deq: Option<&'a [f32]>,
    tail: &'a [f32],
    past: usize,
    kvw: usize,
    hd: usize,
}

impl<'a> Rows<'a> {
    /// Row `j`, head offset `off`, in full precision (`fp`: the chunk's own row, or a past
    /// row of the window's tail) or as the cache gives it back.
    fn get(&self, j: usize, fp: bool, off: usize) -> &'a [f32] {
        let t0 = self.past - self.tail.len() / self.kvw;
        match self.deq {
            Some(d) if !fp && j >= self.past => &d[(j - self.past) * self.kvw + off..][..self.hd],
            _ if fp && j < self.past && j >= t0 => {
                &self.tail[(j - t0) * self.kvw + off..][..self.hd]
            }
            _ => &self.all[j * self.kvw + off..][..self.hd],
        }
    }
}

/// Smooth ((x - shift) / scale per channel), quantize per (token, head); returns packed codes,
/// per-group (scale, zero) and the dequantized, unsmoothed values.
fn quantize_kv(
    x: &[f32],
    heads: usize,
    hd: usize,
    bits: u32,
    pd: crate::quant::ParamDtype,
    smooth: Option<(&[f32], &[f32])>,
) -> (Vec<u8>, Vec<(f32, f32)>, Vec<f32>) {
    let w = heads * hd;
    let rows = x.len() / w;
    let mut codes = vec![0u8; x.len()];
    let mut params = Vec::with_capacity(rows * heads);
    let mut xs = x.to_vec();
    if let Some((sh, sc)) = smooth {
        for r in xs.chunks_mut(w) {
            for ((v, a), b) in r.iter_mut().zip(sh).zip(sc) {
                *v = (*v - a) / b;
            }
        }
    }
    for (xg, cg) in xs.chunks(hd).zip(codes.chunks_mut(hd)) {
        params.push(crate::quant::quantize_group(xg, bits, pd, cg));
    }
    let packed = if bits <= 4 {
        crate::quant::pack_u4(&codes, w)
    } else {
        codes.clone()
    };
    let deq = dequantize_codes(&codes, &params, heads, hd, smooth);
    (packed, params, deq)
}

fn dequantize_codes(
    codes: &[u8],
    params: &[(f32, f32)],
    heads: usize,
    hd: usize,
    smooth: Option<(&[f32], &[f32])>,
) -> Vec<f32> {
    let w = heads * hd;
    let mut out: Vec<f32> = codes
        .chunks(hd)
        .zip(params)
        .flat_map(|(c, &(s, z))| c.iter().map(move |&q| (q as f32 - z) * s))
        .collect();
    if let Some((sh, sc)) = smooth {
        for r in out.chunks_mut(w) {
            for ((v, a), b) in r.iter_mut().zip(sh).zip(sc) {
                *v = *v * b + a;
            }
        }
    }
    out
}

/// The cache's packed rows back to f32 (unsmoothed).
fn dequantize_kv(
    packed: &[u8],
    params: &[(f32, f32)],
    heads: usize,
    hd: usize,
    bits: u32,
    smooth: Option<(&[f32], &[f32])>,
) -> Vec<f32> {
    let w = heads * hd;
    let codes: Vec<u8> = if bits <= 4 {
        let rb = w.div_ceil(2);
        packed
            .chunks(rb)
            .flat_map(|r| {
                (0..w).map(move |c| {
                    if c % 2 == 0 {
                        r[c / 2] & 0x0F
                    } else {
                        r[c / 2] >> 4
                    }
                })
            })
            .collect()
    } else {
        packed.to_vec()
    };
    dequantize_codes(&codes, params, heads, hd, smooth)
}

fn fake_quant_node(node: &Node, w: &[f32], cols: usize, gamma: &[f32], beta: &[f32]) -> Vec<f32> {
    let bits = node.int_attr("bits").unwrap_or(4) as u32;
    let group = node.int_attr("group").unwrap_or(-1);
    let pd = param_dtype(node, "param_dtype");
    if node.bool_attr("lwc") == Some(true) {
        let g: Vec<f32> = gamma.iter().map(|&u| crate::math::sigmoid(u)).collect();
        let b: Vec<f32> = beta.iter().map(|&u| crate::math::sigmoid(u)).collect();
        return crate::quant::fake_quant_rows(w, cols, bits, group, &g, &b, pd);
    }
    crate::quant::fake_quant_rows(w, cols, bits, group, gamma, beta, pd)
}

fn loss_kind(node: &Node) -> &str {
    match node.attr("kind") {
        Some(Attr::Str(k)) => k.as_str(),
        _ => "mae",
    }
}

fn param_dtype(node: &Node, key: &str) -> crate::quant::ParamDtype {
    crate::quant::ParamDtype::from_attr(match node.attr(key) {
        Some(Attr::Str(s)) => Some(s.as_str()),
        _ => None,
    })
}

impl Tensor {
    fn data_len(&self) -> usize {
        match &self.data {
            TensorData::F32(v) => v.len(),
            TensorData::I32(v) => v.len(),
        }
    }
}

/// x / sqrt(mean(x^2) + eps) * w, accumulating in f64.
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f64, y: &mut [f32]) {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let r = (1.0 / (ss / x.len() as f64 + eps).sqrt()) as f32;
    for ((o, &a), &b) in y.iter_mut().zip(x).zip(w) {
        *o = a * r * b;
    }
}

/// y[m,n] = x[m,k] * w[n,k]^T through the gemm crate. Rows are padded to a multiple of 8:
/// gemm's kernels then treat every row alike (checked bitwise for the demo model's shapes),
/// so a row's result does not depend on the batch it is in and decoding one token gives
/// exactly the numbers of the same position in a batched forward.
pub fn linear(x: &[f32], w: &[f32], y: &mut [f32], m: usize, n: usize, k: usize, threads: usize) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y.fill(0.0);
        return;
    }
    if !m.is_multiple_of(8) {
        let mp = m.div_ceil(8) * 8;
        let mut xp = vec![0f32; mp * k];
        xp[..m * k].copy_from_slice(&x[..m * k]);
        let mut yp = vec![0f32; mp * n];
        linear(&xp, w, &mut yp, mp, n, k, threads);
        y[..m * n].copy_from_slice(&yp[..m * n]);
        return;
    }
    crate::math::matmul(m, n, k, x, (k, 1), w, (1, k), y, threads);
}

/// Inverse frequencies of the rotated pairs, with the node's scaling applied.
pub fn rope_inv_freq(node: &Node, rd: usize, factors: Option<&[f32]>) -> Vec<f32> {
    let theta = node.float_attr("theta").unwrap_or(10000.0);
    let mut inv: Vec<f32> = (0..rd / 2)
        .map(|i| (1.0 / theta.powf((2 * i) as f64 / rd as f64)) as f32)
        .collect();
    match node.attr("scaling") {
        Some(Attr::Str(s)) if s == "linear" => {
            let f = node.float_attr("factor").unwrap_or(1.0) as f32;
            for v in inv.iter_mut() {
                *v /= f;
            }
        }
        Some(Attr::Str(s)) if s == "llama3" => {
            let factor = node.float_attr("factor").unwrap_or(1.0);
            let lo = node.float_attr("low_freq_factor").unwrap_or(1.0);
            let hi = node.float_attr("high_freq_factor").unwrap_or(4.0);
            let old = node.float_attr("original_max_pos").unwrap_or(8192.0);
            let lo_wl = old / lo;
            let hi_wl = old / hi;
            for v in inv.iter_mut() {
                let f = *v as f64;
                let wl = 2.0 * std::f64::consts::PI / f;
                let nf = if wl < hi_wl {
                    f
                } else if wl > lo_wl {
                    f / factor
                } else {
                    let smooth = (old / wl - lo) / (hi - lo);
                    (1.0 - smooth) * f / factor + smooth * f
                };
                *v = nf as f32;
            }
        }
        _ => {}
    }
    if let Some(fs) = factors {
        for (v, f) in inv.iter_mut().zip(fs) {
            *v /= f;
        }
    }
    inv
}

/// Rotate-half RoPE on one head: pairs (i, i + d/2).
pub fn rope_rotate(h: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = h.len() / 2;
    for i in 0..half {
        let (a, b) = (h[i], h[i + half]);
        h[i] = a * cos[i] - b * sin[i];
        h[i + half] = b * cos[i] + a * sin[i];
    }
}

fn transpose(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    let r = shape.len();
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let mut in_strides = vec![1usize; r];
    for i in (0..r.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * shape[i + 1];
    }
    let n: usize = shape.iter().product();
    let mut y = vec![0f32; n];
    let mut idx = vec![0usize; r];
    for o in y.iter_mut() {
        let src: usize = (0..r).map(|d| idx[d] * in_strides[perm[d]]).sum();
        *o = x[src];
        for d in (0..r).rev() {
            idx[d] += 1;
            if idx[d] < out_shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    y
}
