//! The WKVQuant rewrites: weight fake quantization, KV smoothing, KV quantization,
//! past-only attention, and packing to real int4 storage.

use crate::{Pass, PassError, PassReport};
use half::f16;
use std::collections::BTreeMap;
use wkvc_ir::KvCache;
use wkvc_ir::graph::{Attr, OpKind, Operand, ValueId, attrs};
use wkvc_ir::interp::{Interpreter, Tensor};
use wkvc_ir::types::{DType, Dim, TensorType};
use wkvc_ir::{Module, Node, Weight};

fn fail(pass: &str, msg: impl Into<String>) -> PassError {
    PassError::Failed {
        pass: pass.into(),
        msg: msg.into(),
    }
}

/// Is this param a decoder linear weight (q, k, v, o, gate, up, down)? Embeddings, lm_head
/// and norms stay full precision.
pub fn is_decoder_linear(name: &str) -> bool {
    name.contains(".layers.")
        && name.ends_with(".weight")
        && [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .iter()
        .any(|p| name.contains(p))
}

fn fresh(m: &Module) -> u32 {
    m.graph.value_bound()
}

/// Asymmetric uniform fake quantization of every decoder linear: `linear(x, @W)` becomes
/// `linear(x, fake_quant(@W, @W.wq_gamma, @W.wq_beta))`, with per-(row, group) clipping
/// factors initialised to 1 (RTN). `bits >= 16` leaves the weights in full precision.
#[derive(Clone, Debug)]
pub struct WeightQuant {
    pub bits: u32,
    /// Input channels per group; -1 = one group per output channel.
    pub group: i64,
    /// Keep scale and zero in f32 (the reference definition) instead of f16; such weights
    /// are not packed.
    pub f32_params: bool,
}

impl Pass for WeightQuant {
    fn name(&self) -> &str {
        "weight_quant"
    }

    fn run(&self, m: &mut Module, report: &mut PassReport) -> Result<(), PassError> {
        if self.bits >= 16 {
            report.stats.insert("linears".into(), 0.0);
            return Ok(());
        }
        if !(2..=8).contains(&self.bits) {
            return Err(fail(
                self.name(),
                format!("bits must be 2..=8 or 16, got {}", self.bits),
            ));
        }
        if self.group == 0 || self.group < -1 {
            return Err(fail(
                self.name(),
                format!("group must be positive or -1, got {}", self.group),
            ));
        }
        let mut next = fresh(m);
        let mut nodes = Vec::with_capacity(m.graph.nodes.len() * 2);
        let mut count = 0usize;
        let old = std::mem::take(&mut m.graph.nodes);
        for mut n in old {
            if n.op == OpKind::Linear
                && let Some(Operand::Param(w)) = n.args.get(1).cloned()
                && is_decoder_linear(&w)
            {
                let decl = m
                    .graph
                    .param(&w)
                    .ok_or_else(|| fail("weight_quant", format!("@{w} is not declared")))?
                    .ty
                    .clone();
                let (rows, cols) = match (decl.shape[0].as_const(), decl.shape[1].as_const()) {
                    (Some(r), Some(c)) => (r, c),
                    _ => return Err(fail("weight_quant", format!("@{w} has symbolic dims"))),
                };
                let ng = if self.group < 0 {
                    1
                } else {
                    cols.div_ceil(self.group as usize)
                };
                let gty = TensorType::f32(vec![Dim::Const(rows), Dim::Const(ng)]);
                let mut clip = Vec::new();
                for suffix in ["wq_gamma", "wq_beta"] {
                    let name = format!("{w}.{suffix}");
                    if m.graph.param(&name).is_none() {
                        m.graph.params.push(wkvc_ir::graph::ParamDecl {
                            name: name.clone(),
                            ty: gty.clone(),
                        });
                    }
                    if !m.weights.contains(&name) {
                        m.weights.insert(
                            name.clone(),
                            Weight::from_f32(vec![rows, ng], vec![1.0; rows * ng]),
                        );
                    }
                    clip.push(Operand::Param(name));
                }
                let out = ValueId(next);
                next += 1;
                nodes.push(Node {
                    out,
                    op: OpKind::FakeQuant,
                    args: vec![Operand::Param(w.clone()), clip[0].clone(), clip[1].clone()],
                    attrs: {
                        let mut a = attrs([
                            ("bits", Attr::Int(self.bits as i64)),
                            ("group", Attr::Int(self.group)),
                        ]);
                        if self.f32_params {
                            a.insert("param_dtype".into(), Attr::Str("f32".into()));
                        }
                        a
                    },
                    ty: decl,
                });
                n.args[1] = Operand::Value(out);
                count += 1;
            }
            nodes.push(n);
        }
        m.graph.nodes = nodes;
        report.stats.insert("linears".into(), count as f64);
        Ok(())
    }
}

/// K/V rotation (beyond the paper: WKVQUANT.md section 6): each head's K and V are multiplied
/// by the orthonormal Hadamard matrix of `block` values (blocks along the head) before they
/// are smoothed and quantized, which spreads outlier channels over the quantization group.
/// Exact in real arithmetic:
///
/// - K after RoPE: both RoPE nodes feeding an attention (q and k) get `rotate = block`, so
///   q and k are rotated alike and the scores are unchanged (the matrix is orthonormal);
/// - V: folded into the weights, `v_proj`'s rows of each kv head (and its bias) times the
///   matrix, so the cache holds rotated V; the attention output, rotated per head, is undone
///   in `o_proj`'s columns of each head (times the matrix, its own inverse). No kernel work
///   at run time for V, and none for K beyond the transform in the RoPE kernel.
///
/// Runs before weight quantization (the W4 grid is fitted to the rotated `v_proj`/`o_proj`)
/// and before the K/V statistics (smoothing is initialised, and learned, in the rotated
/// basis).
#[derive(Clone, Debug)]
pub struct KvRotate {
    /// Hadamard block: a power of two >= 2 dividing the head dimension.
    pub block: usize,
}

impl Pass for KvRotate {
    fn name(&self) -> &str {
        "kv_rotate"
    }

    fn run(&self, m: &mut Module, report: &mut PassReport) -> Result<(), PassError> {
        let b = self.block;
        let attn: Vec<(i64, usize, usize, usize, Vec<Operand>)> = m
            .graph
            .nodes
            .iter()
            .filter(|n| n.op == OpKind::Attention)
            .map(|n| {
                (
                    n.int_attr("layer").unwrap_or(0),
                    n.int_attr("heads").unwrap_or(1) as usize,
                    n.int_attr("kv_heads").unwrap_or(1) as usize,
                    n.int_attr("head_dim").unwrap_or(1) as usize,
                    n.args.clone(),
                )
            })
            .collect();
        let mut layers = 0;
        for (layer, heads, kv_heads, hd, args) in attn {
            if b < 2 || !b.is_power_of_two() || !hd.is_multiple_of(b) {
                return Err(fail(
                    self.name(),
                    format!(
                        "the Hadamard block must be a power of two >= 2 dividing the head \
                         dimension {hd}, got {b}"
                    ),
                ));
            }
            // q and k: the RoPE nodes that make them
            for (i, what) in [(0usize, "q"), (1, "k")] {
                let Some(Operand::Value(v)) = args.get(i) else {
                    return Err(fail(
                        self.name(),
                        format!("layer {layer}: no {what} operand"),
                    ));
                };
                let node = m
                    .graph
                    .nodes
                    .iter_mut()
                    .find(|n| n.out == *v && n.op == OpKind::Rope)
                    .ok_or_else(|| {
                        fail(
                            self.name(),
                            format!("layer {layer}: {what} is not made by a rope node"),
                        )
                    })?;
                if node.int_attr("rotate").unwrap_or(0) != 0 {
                    return Err(fail(
                        self.name(),
                        format!("layer {layer}: K/V already rotated"),
                    ));
                }
                node.attrs.insert("rotate".into(), Attr::Int(b as i64));
            }
            let p = format!("model.layers.{layer}.self_attn");
            // v_proj rows [kv_heads * hd, in]: each column's head segments rotated
            let vw = format!("{p}.v_proj.weight");
            let rows_of = |m: &Module, name: &str| -> Result<(Vec<usize>, Vec<f32>), PassError> {
                let w = m.weights.get(name).ok_or_else(|| {
                    fail("kv_rotate", format!("layer {layer}: no weight `{name}`"))
                })?;
                Ok((
                    w.ty()
                        .shape
                        .iter()
                        .map(|d| d.as_const().unwrap_or(0))
                        .collect(),
                    w.f32().into_owned(),
                ))
            };
            let (shape, mut w) = rows_of(m, &vw)?;
            if shape.len() != 2 || shape[0] != kv_heads * hd {
                return Err(fail(
                    self.name(),
                    format!(
                        "layer {layer}: `{vw}` is {shape:?}, expected [{}, _]",
                        kv_heads * hd
                    ),
                ));
            }
            let cols = shape[1];
            // y = H W (per head block of rows): transform each column's rows
            let mut col = vec![0f32; kv_heads * hd];
            for c in 0..cols {
                for r in 0..kv_heads * hd {
                    col[r] = w[r * cols + c];
                }
                wkvc_ir::math::hadamard_in_place(&mut col, b);
                for r in 0..kv_heads * hd {
                    w[r * cols + c] = col[r];
                }
            }
            replace_f32(m, &vw, shape, w)?;
            let vb = format!("{p}.v_proj.bias");
            if m.weights.contains(&vb) {
                let (shape, mut bias) = rows_of(m, &vb)?;
                wkvc_ir::math::hadamard_in_place(&mut bias, b);
                replace_f32(m, &vb, shape, bias)?;
            }
            // o_proj [out, heads * hd]: each row's head segments times the matrix
            let ow = format!("{p}.o_proj.weight");
            let (shape, mut w) = rows_of(m, &ow)?;
            if shape.len() != 2 || shape[1] != heads * hd {
                return Err(fail(
                    self.name(),
                    format!(
                        "layer {layer}: `{ow}` is {shape:?}, expected [_, {}]",
                        heads * hd
                    ),
                ));
            }
            for row in w.chunks_exact_mut(heads * hd) {
                wkvc_ir::math::hadamard_in_place(row, b);
            }
            replace_f32(m, &ow, shape, w)?;
            layers += 1;
        }
        report.stats.insert("layers".into(), layers as f64);
        report.stats.insert("block".into(), b as f64);
        Ok(())
    }
}

/// Replace a weight by f32 values a pass made (spilled when the store spills), its declared
/// type f32 of the same shape.
fn replace_f32(
    m: &mut Module,
    name: &str,
    shape: Vec<usize>,
    data: Vec<f32>,
) -> Result<(), PassError> {
    if let Some(d) = m.graph.params.iter_mut().find(|d| d.name == name) {
        d.ty = TensorType::f32(shape.iter().map(|&x| Dim::Const(x)).collect());
    }
    m.weights
        .insert_made(name.to_string(), Weight::from_f32(shape, data))
        .map_err(|e| fail("kv_rotate", format!("cannot store `{name}`: {e}")))
}

/// Per-layer, per-channel min/max of post-RoPE K and of V, gathered by running the FP graph.
#[derive(Clone, Debug, Default)]
pub struct KvStats {
    /// layer -> (k_min, k_max, v_min, v_max), each kv_heads * head_dim long
    pub layers: BTreeMap<i64, [Vec<f32>; 4]>,
    pub tokens: usize,
}

/// One attention's K (after RoPE) and V, made outputs of a graph by [`add_kv_probes`].
#[derive(Clone, Debug)]
pub struct KvProbe {
    pub layer: i64,
    /// The attention's index in the graph's nodes.
    pub node: usize,
    pub k: ValueId,
    pub v: ValueId,
}

impl KvProbe {
    /// The name of the graph output that carries K.
    pub fn k_output(&self) -> String {
        format!("probe.k.{}", self.layer)
    }
    /// The name of the graph output that carries V.
    pub fn v_output(&self) -> String {
        format!("probe.v.{}", self.layer)
    }
}

/// Make the K and V operands of every attention of `g` whose layer `keep` accepts outputs of
/// the graph (named by [`KvProbe::k_output`] and [`KvProbe::v_output`]).
pub fn add_kv_probes(g: &mut wkvc_ir::graph::Graph, keep: impl Fn(i64) -> bool) -> Vec<KvProbe> {
    let mut probes = Vec::new();
    for (node, n) in g.nodes.iter().enumerate() {
        if n.op != OpKind::Attention {
            continue;
        }
        let layer = n.int_attr("layer").unwrap_or(0);
        if !keep(layer) {
            continue;
        }
        if let (Some(Operand::Value(k)), Some(Operand::Value(v))) = (n.args.get(1), n.args.get(2)) {
            probes.push(KvProbe {
                layer,
                node,
                k: *k,
                v: *v,
            });
        }
    }
    for p in &probes {
        g.outputs.push(wkvc_ir::graph::Output {
            name: p.k_output(),
            value: p.k,
        });
        g.outputs.push(wkvc_ir::graph::Output {
            name: p.v_output(),
            value: p.v,
        });
    }
    probes
}

/// Run the module's graph on token windows (each from an empty cache) and record the range of
/// every attention's K and V channels.
pub fn collect_kv_stats(
    m: &Module,
    windows: &[Vec<u32>],
    threads: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<KvStats, PassError> {
    let mut g = m.graph.clone();
    let probes = add_kv_probes(&mut g, |_| true);
    let probe = Module {
        graph: g,
        weights: m.weights.clone(),
    };
    let it = Interpreter::new(&probe, threads).map_err(|e| fail("kv_stats", e.to_string()))?;
    let mut stats = KvStats::default();
    for (wi, w) in windows.iter().enumerate() {
        let n = w.len();
        let toks = Tensor::i32(vec![n], w.iter().map(|&t| t as i32).collect());
        let pos = Tensor::i32(vec![n], (0..n as i32).collect());
        let mut cache = KvCache::new(n.max(1));
        let out = it
            .run(&[("tokens", toks), ("positions", pos)], &mut cache)
            .map_err(|e| fail("kv_stats", e.to_string()))?;
        for p in &probes {
            for (slot, key) in [(0usize, p.k_output()), (2, p.v_output())] {
                record_range(&mut stats, p.layer, slot, &out[&key]);
            }
        }
        stats.tokens += n;
        progress(wi + 1, windows.len());
    }
    Ok(stats)
}

/// Widen layer `layer`'s ranges (`slot` 0: K, 2: V) by the rows of `t`.
pub(crate) fn record_range(stats: &mut KvStats, layer: i64, slot: usize, t: &Tensor) {
    let width = *t.shape.last().unwrap_or(&1);
    let data = t.as_f32().unwrap_or(&[]);
    let e = stats.layers.entry(layer).or_insert_with(|| {
        [
            vec![f32::INFINITY; width],
            vec![f32::NEG_INFINITY; width],
            vec![f32::INFINITY; width],
            vec![f32::NEG_INFINITY; width],
        ]
    });
    for row in data.chunks(width) {
        for (c, &x) in row.iter().enumerate() {
            e[slot][c] = e[slot][c].min(x);
            e[slot + 1][c] = e[slot + 1][c].max(x);
        }
    }
}

/// Smoothing factors from channel ranges (WKVQUANT.md section 2): shift = (max+min)/2,
/// scale = ((max-min)/2)^0.5 normalised to geometric mean 1 within each head, >= 1e-2.
pub fn smoothing_from_range(min: &[f32], max: &[f32], head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let shift: Vec<f32> = min.iter().zip(max).map(|(a, b)| (a + b) / 2.0).collect();
    let mut scale: Vec<f32> = min
        .iter()
        .zip(max)
        .map(|(a, b)| (((b - a) / 2.0).max(0.0) as f64).sqrt().max(1e-12) as f32)
        .collect();
    for h in scale.chunks_mut(head_dim) {
        let gm = (h.iter().map(|&x| (x as f64).ln()).sum::<f64>() / h.len() as f64).exp();
        for x in h.iter_mut() {
            *x = ((*x as f64 / gm) as f32).max(1e-2);
        }
    }
    (shift, scale)
}

/// Static per-channel smoothing of K (after RoPE) and V: attention gains the operands
/// `@...k_shift, @...k_scale, @...v_shift, @...v_scale`. With `stats` the factors come from
/// the FP model's ranges; without, identity (shift 0, scale 1).
#[derive(Clone, Debug, Default)]
pub struct KvSmooth {
    pub stats: Option<KvStats>,
}

impl Pass for KvSmooth {
    fn name(&self) -> &str {
        "kv_smooth"
    }

    fn run(&self, m: &mut Module, report: &mut PassReport) -> Result<(), PassError> {
        let mut count = 0;
        let nodes = std::mem::take(&mut m.graph.nodes);
        let mut out = Vec::with_capacity(nodes.len());
        for mut n in nodes {
            if n.op == OpKind::Attention && n.args.len() == 3 {
                let layer = n.int_attr("layer").unwrap_or(0);
                let kvh = n.int_attr("kv_heads").unwrap_or(1) as usize;
                let hd = n.int_attr("head_dim").unwrap_or(1) as usize;
                let w = kvh * hd;
                let (ks, kc, vs, vc) = match self.stats.as_ref().and_then(|s| s.layers.get(&layer))
                {
                    Some([kmin, kmax, vmin, vmax]) => {
                        if kmin.len() != w {
                            return Err(fail(
                                self.name(),
                                format!(
                                    "statistics of layer {layer} have {} channels, expected {w}",
                                    kmin.len()
                                ),
                            ));
                        }
                        let (a, b) = smoothing_from_range(kmin, kmax, hd);
                        let (c, d) = smoothing_from_range(vmin, vmax, hd);
                        (a, b, c, d)
                    }
                    None if self.stats.is_some() => {
                        return Err(fail(
                            self.name(),
                            format!("no statistics for layer {layer}"),
                        ));
                    }
                    None => (vec![0.0; w], vec![1.0; w], vec![0.0; w], vec![1.0; w]),
                };
                let prefix = format!("model.layers.{layer}.self_attn.kv_smooth");
                for (suffix, data) in [
                    ("k_shift", ks),
                    ("k_scale", kc),
                    ("v_shift", vs),
                    ("v_scale", vc),
                ] {
                    let name = format!("{prefix}.{suffix}");
                    if m.graph.param(&name).is_none() {
                        m.graph.params.push(wkvc_ir::graph::ParamDecl {
                            name: name.clone(),
                            ty: TensorType::f32(vec![Dim::Const(w)]),
                        });
                    }
                    m.weights
                        .insert(name.clone(), Weight::from_f32(vec![w], data));
                    n.args.push(Operand::Param(name));
                }
                count += 1;
            }
            out.push(n);
        }
        m.graph.nodes = out;
        report.stats.insert("attentions".into(), count as f64);
        report.stats.insert(
            "calibration_tokens".into(),
            self.stats.as_ref().map_or(0, |s| s.tokens) as f64,
        );
        Ok(())
    }
}

/// Per-(token, kv head) dynamic asymmetric quantization of the (smoothed) K/V written to the
/// cache: sets `kv_bits` on every attention. `bits >= 16` keeps the cache in full precision.
/// With `per_layer`, layer `l`'s attention gets `per_layer[l]` bits instead (16: that layer's
/// cache stays in full precision), one entry per layer.
#[derive(Clone, Debug)]
pub struct KvQuant {
    pub bits: u32,
    /// Keep each token's scale and zero in f32 (the reference definition) instead of f16.
    pub f32_params: bool,
    /// Bits of each layer's cache (`--kv-bits-per-layer`), indexed by the attention's `layer`.
    pub per_layer: Option<Vec<u32>>,
    /// Channels per (scale, zero) group (`kv_group`): 0 for one group a kv head, else a
    /// multiple of 32 dividing the head dim.
    pub group: usize,
}

impl KvQuant {
    /// All layers at `bits`.
    pub fn uniform(bits: u32, f32_params: bool) -> KvQuant {
        KvQuant {
            bits,
            f32_params,
            per_layer: None,
            group: 0,
        }
    }
}

impl Pass for KvQuant {
    fn name(&self) -> &str {
        "kv_quant"
    }

    fn run(&self, m: &mut Module, report: &mut PassReport) -> Result<(), PassError> {
        let ok = |b: u32| (2..=8).contains(&b) || b == 16;
        if let Some(list) = &self.per_layer {
            if let Some(b) = list.iter().find(|&&b| !ok(b)) {
                return Err(fail(
                    self.name(),
                    format!("per-layer bits must be 2..=8 or 16, got {b}"),
                ));
            }
            let layers = m
                .graph
                .nodes
                .iter()
                .filter(|n| n.op == OpKind::Attention)
                .count();
            if list.len() != layers {
                return Err(fail(
                    self.name(),
                    format!(
                        "{} per-layer bits given for a model of {layers} layers",
                        list.len()
                    ),
                ));
            }
        } else if self.bits >= 16 {
            return Ok(());
        } else if !ok(self.bits) {
            return Err(fail(
                self.name(),
                format!("bits must be 2..=8 or 16, got {}", self.bits),
            ));
        }
        let mut count = 0;
        for n in m
            .graph
            .nodes
            .iter_mut()
            .filter(|n| n.op == OpKind::Attention)
        {
            let bits = match &self.per_layer {
                Some(list) => {
                    let layer = n.int_attr("layer").unwrap_or(0);
                    *usize::try_from(layer)
                        .ok()
                        .and_then(|l| list.get(l))
                        .ok_or_else(|| {
                            fail(
                                "kv_quant",
                                format!("attention of layer {layer}: no per-layer bits"),
                            )
                        })?
                }
                None => self.bits,
            };
            if bits >= 16 {
                continue;
            }
            n.attrs.insert("kv_bits".into(), Attr::Int(bits as i64));
            let hd = n.int_attr("head_dim").unwrap_or(1) as usize;
            if self.group != 0 && self.group != hd {
                if !self.group.is_multiple_of(32) || !hd.is_multiple_of(self.group) {
                    return Err(fail(
                        self.name(),
                        format!(
                            "a K/V group of {} channels: it must be a multiple of 32 dividing \
                             the head dim {hd}",
                            self.group
                        ),
                    ));
                }
                n.attrs
                    .insert("kv_group".into(), Attr::Int(self.group as i64));
            }
            if self.f32_params {
                n.attrs
                    .insert("kv_param_dtype".into(), Attr::Str("f32".into()));
            }
            count += 1;
        }
        report.stats.insert("attentions".into(), count as f64);
        Ok(())
    }
}

/// Past-only quantization: a position attends to its own (and, in prefill, its chunk's) K/V
/// in full precision and to the quantized cache for the past (attentions with `kv_bits` only).
#[derive(Clone, Debug, Default)]
pub struct PastOnly;

impl Pass for PastOnly {
    fn name(&self) -> &str {
        "past_only"
    }

    fn run(&self, m: &mut Module, report: &mut PassReport) -> Result<(), PassError> {
        let mut count = 0;
        for n in m
            .graph
            .nodes
            .iter_mut()
            .filter(|n| n.op == OpKind::Attention && n.int_attr("kv_bits").is_some())
        {
            n.attrs.insert("past_only".into(), Attr::Bool(true));
            count += 1;
        }
        report.stats.insert("attentions".into(), count as f64);
        Ok(())
    }
}

/// A recent window for past-only attentions (after `PastOnly`): a position reads the K/V of
/// the last `.0` positions (itself included) in full precision, older ones from the cache
/// (KIVI's full-precision residual; 1 is past-only as the paper has it). Sets `kv_window`.
#[derive(Clone, Debug)]
pub struct KvWindow(pub usize);

impl Pass for KvWindow {
    fn name(&self) -> &str {
        "kv_window"
    }

    fn run(&self, m: &mut Module, report: &mut PassReport) -> Result<(), PassError> {
        if self.0 == 0 {
            return Err(PassError::Failed {
                pass: self.name().into(),
                msg: "a recent window must be at least 1 position".into(),
            });
        }
        let mut count = 0;
        for n in m
            .graph
            .nodes
            .iter_mut()
            .filter(|n| n.op == OpKind::Attention && n.bool_attr("past_only") == Some(true))
        {
            n.attrs.insert("kv_window".into(), Attr::Int(self.0 as i64));
            count += 1;
        }
        report.stats.insert("attentions".into(), count as f64);
        Ok(())
    }
}

/// Real storage: `linear(x, fake_quant(@W, @g, @b))` becomes `qlinear(x, @W.codes, @W.scales,
/// @W.zeros)` with codes packed two per byte and f16 scales/zeros; the FP weight and the
/// clipping factors leave the store. Only 2..4-bit weights are packed.
#[derive(Clone, Debug, Default)]
pub struct Pack;

impl Pass for Pack {
    fn name(&self) -> &str {
        "pack"
    }

    fn run(&self, m: &mut Module, report: &mut PassReport) -> Result<(), PassError> {
        let fq: BTreeMap<ValueId, Node> = m
            .graph
            .nodes
            .iter()
            .filter(|n| n.op == OpKind::FakeQuant)
            .map(|n| (n.out, n.clone()))
            .collect();
        let uses = m.graph.use_counts();
        let mut packed = 0usize;
        let mut bytes_before = 0usize;
        let mut bytes_after = 0usize;
        let mut removed: Vec<ValueId> = Vec::new();
        for n in m.graph.nodes.iter_mut() {
            let Some(Operand::Value(v)) = n.args.get(1) else {
                continue;
            };
            let Some(q) = fq.get(v) else { continue };
            let bits = q.int_attr("bits").unwrap_or(4);
            let f32_params = matches!(q.attr("param_dtype"), Some(Attr::Str(s)) if s == "f32");
            if n.op != OpKind::Linear || bits > 4 || f32_params || uses[v.0 as usize] != 1 {
                continue;
            }
            let names: Vec<String> = q
                .args
                .iter()
                .map(|a| match a {
                    Operand::Param(p) => Ok(p.clone()),
                    Operand::Value(_) => Err(fail("pack", "fake_quant operands must be params")),
                })
                .collect::<Result<_, _>>()?;
            let get = |k: &str| {
                m.weights
                    .get(k)
                    .map(|w| w.f32().into_owned())
                    .ok_or_else(|| fail("pack", format!("@{k} missing")))
            };
            let (w, g, b) = (get(&names[0])?, get(&names[1])?, get(&names[2])?);
            // a weight read from its file: its pages are not needed once it is packed
            if let Some(src) = m.weights.get(&names[0]) {
                src.release_pages();
            }
            let shape = m
                .weights
                .get(&names[0])
                .map(|w| w.shape.clone())
                .unwrap_or_default();
            let (rows, cols) = (shape[0], shape[1]);
            let group = q.int_attr("group").unwrap_or(-1);
            let (codes, scales, zeros) =
                wkvc_ir::quant::quantize_rows(&w, cols, bits as u32, group, &g, &b);
            let ng = scales.len() / rows;
            bytes_before += 4 * w.len();
            let base = names[0].trim_end_matches(".weight");
            let (cn, sn, zn) = (
                format!("{base}.qweight"),
                format!("{base}.scales"),
                format!("{base}.zeros"),
            );
            let cw = Weight::from_bytes(
                vec![rows, cols],
                DType::U4,
                wkvc_ir::quant::pack_u4(&codes, cols),
            );
            let sw = Weight::from_f16(vec![rows, ng], &scales);
            let zw = Weight::from_f16(vec![rows, ng], &zeros);
            bytes_after += cw.storage_bytes() + sw.storage_bytes() + zw.storage_bytes();
            for (name, wt) in [(&cn, cw), (&sn, sw), (&zn, zw)] {
                m.graph.params.push(wkvc_ir::graph::ParamDecl {
                    name: name.clone(),
                    ty: wt.ty(),
                });
                m.weights
                    .insert_made(name.clone(), wt)
                    .map_err(|e| fail("pack", format!("cannot write @{name} to disk: {e}")))?;
            }
            let mut args = vec![
                n.args[0].clone(),
                Operand::Param(cn),
                Operand::Param(sn),
                Operand::Param(zn),
            ];
            if let Some(bias) = n.args.get(2) {
                args.push(bias.clone());
            }
            n.op = OpKind::QLinear;
            n.args = args;
            n.attrs = attrs([("bits", Attr::Int(bits)), ("group", Attr::Int(group))]);
            removed.push(q.out);
            packed += 1;
        }
        let gone: std::collections::HashSet<ValueId> = removed.into_iter().collect();
        m.graph.nodes.retain(|n| !gone.contains(&n.out));
        // Params nothing reads any more (FP weights, clipping factors) leave graph and store.
        let mut r = PassReport::default();
        crate::Dce {
            prune_weights: true,
        }
        .run(m, &mut r)?;
        let _ = f16::ZERO;
        report.stats.insert("linears".into(), packed as f64);
        report
            .stats
            .insert("bytes_before".into(), bytes_before as f64);
        report
            .stats
            .insert("bytes_after".into(), bytes_after as f64);
        Ok(())
    }
}
