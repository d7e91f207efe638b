//! The FP model run one block at a time (WKVQUANT.md's block-wise view of the network): the
//! hidden states of every window go through block 0, then block 1, ...; a block's weights are
//! read as f32 only while it runs (an interpreter of that block alone) and their file pages
//! are released afterwards. Memory holds one block's weights in f32 plus the windows' hidden
//! states, whatever the model's size: this is how `wkvc compile` gathers statistics and the
//! FP reference of its quality check on models too large to hold in f32.

use crate::calibrate::{BlockSpan, block_graph, block_spans};
use crate::{PassError, quant::KvStats};
use std::collections::BTreeMap;
use wkvc_ir::KvCache;
use wkvc_ir::graph::{Graph, Input, Operand};
use wkvc_ir::interp::{Interpreter, RunMode, Tensor};
use wkvc_ir::{DType, Module};

fn fail(msg: impl Into<String>) -> PassError {
    PassError::Failed {
        pass: "stream".into(),
        msg: msg.into(),
    }
}

/// The hidden states entering block 0: each window's embedding rows.
pub fn embed(m: &Module, windows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, PassError> {
    let table = m
        .weights
        .get("model.embed_tokens.weight")
        .ok_or_else(|| fail("no `model.embed_tokens.weight`"))?;
    let (vocab, d) = (table.shape[0], table.shape.get(1).copied().unwrap_or(1));
    let tab = table.f32();
    let mut out = Vec::with_capacity(windows.len());
    for w in windows {
        let mut x = Vec::with_capacity(w.len() * d);
        for &t in w {
            let t = t as usize;
            if t >= vocab {
                return Err(fail(format!(
                    "token {t} is outside the vocabulary ({vocab})"
                )));
            }
            x.extend_from_slice(&tab[t * d..(t + 1) * d]);
        }
        out.push(x);
    }
    drop(tab);
    table.release_pages();
    Ok(out)
}

/// The graph after the last block (final norm, head): input `hidden` (and `positions`),
/// the model's outputs.
fn head_graph(g: &Graph, last: &BlockSpan) -> Result<Graph, PassError> {
    let types = g.value_types();
    let hty = types[last.output.0 as usize]
        .cloned()
        .ok_or_else(|| fail("the last block's output has no type"))?;
    let nodes = g.nodes[last.nodes.end..].to_vec();
    let mut params = Vec::new();
    for n in &nodes {
        for a in &n.args {
            if let Operand::Param(p) = a
                && !params
                    .iter()
                    .any(|d: &wkvc_ir::graph::ParamDecl| &d.name == p)
            {
                params.push(
                    g.param(p)
                        .ok_or_else(|| fail(format!("param @{p} is not declared")))?
                        .clone(),
                );
            }
        }
    }
    let mut inputs = vec![Input {
        value: last.output,
        name: "hidden".into(),
        ty: hty,
    }];
    if let Some(p) = g.inputs.iter().find(|i| i.name == "positions") {
        inputs.push(p.clone());
    }
    Ok(Graph {
        name: format!("{}.head", g.name),
        params,
        inputs,
        nodes,
        outputs: g.outputs.clone(),
    })
}

fn positions(n: usize) -> Tensor {
    Tensor::i32(vec![n], (0..n as i32).collect())
}

/// Run `graph` (with `m`'s weights) on each window's hidden states; returns every output of
/// each run. Its params are read as f32 for the run only; mapped pages are released after.
fn run_part(
    m: &Module,
    graph: Graph,
    xs: &[Vec<f32>],
    tokens: &[usize],
    threads: usize,
    mode: RunMode,
) -> Result<Vec<BTreeMap<String, Tensor>>, PassError> {
    let part = Module {
        graph,
        weights: m.weights.clone(),
    };
    let out = {
        let it = Interpreter::new(&part, threads).map_err(|e| fail(e.to_string()))?;
        xs.iter()
            .zip(tokens)
            .map(|(x, &n)| {
                let d = x.len() / n.max(1);
                let mut cache = KvCache::new(n.max(1));
                it.run_mode(
                    &[
                        ("hidden", Tensor::f32(vec![n, d], x.clone())),
                        ("positions", positions(n)),
                    ],
                    &mut cache,
                    mode,
                )
                .map_err(|e| fail(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    for p in &part.graph.params {
        if let Some(w) = part.weights.get(&p.name) {
            w.release_pages();
        }
    }
    wkvc_ir::weights::release_free_memory();
    Ok(out)
}

/// What a streamed run gives back.
pub struct StreamOut {
    /// Each window's logits, `tokens x vocab` row-major (empty unless asked for).
    pub logits: Vec<Vec<f32>>,
    /// K/V channel ranges of every attention (when asked for).
    pub kv_stats: Option<KvStats>,
}

/// Run the FP module over token windows block by block (prefill semantics, each window from
/// an empty cache): the logits of every position when `logits`, the ranges of every
/// attention's K and V channels when `kv_stats` (what `quant::collect_kv_stats` records from
/// a whole-graph run, computed the same way). `progress(done, total)` counts blocks.
pub fn run(
    m: &Module,
    windows: &[Vec<u32>],
    threads: usize,
    logits: bool,
    kv_stats: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<StreamOut, PassError> {
    let spans = block_spans(&m.graph)?;
    let tokens: Vec<usize> = windows.iter().map(Vec::len).collect();
    let mut xs = embed(m, windows)?;
    let mut stats = KvStats::default();
    let total = spans.len() + usize::from(logits);
    for (l, span) in spans.iter().enumerate() {
        let mut g = block_graph(&m.graph, span, &format!("{}.block{l}", m.graph.name))?;
        let probes = if kv_stats {
            crate::quant::add_kv_probes(&mut g, |_| true)
        } else {
            Vec::new()
        };
        let outs = run_part(m, g, &xs, &tokens, threads, RunMode::Prefill)?;
        let mut next = Vec::with_capacity(outs.len());
        for mut o in outs {
            for p in &probes {
                for (slot, key) in [(0usize, p.k_output()), (2, p.v_output())] {
                    let t = o
                        .remove(&key)
                        .ok_or_else(|| fail(format!("block {l} gave no `{key}`")))?;
                    crate::quant::record_range(&mut stats, p.layer, slot, &t);
                }
            }
            let h = o
                .remove("hidden")
                .and_then(|t| t.as_f32().map(<[f32]>::to_vec))
                .ok_or_else(|| fail(format!("block {l} produced no hidden state")))?;
            next.push(h);
        }
        xs = next;
        progress(l + 1, total);
    }
    stats.tokens = tokens.iter().sum();
    let mut out = StreamOut {
        logits: Vec::new(),
        kv_stats: kv_stats.then_some(stats),
    };
    if logits {
        let last = spans.last().ok_or_else(|| fail("no blocks"))?;
        let g = head_graph(&m.graph, last)?;
        let name = g
            .outputs
            .iter()
            .find(|o| o.name == "logits")
            .map(|o| o.name.clone())
            .ok_or_else(|| fail("the graph has no `logits` output"))?;
        let outs = run_part(m, g, &xs, &tokens, threads, RunMode::Prefill)?;
        for mut o in outs {
            let t = o
                .remove(&name)
                .ok_or_else(|| fail("the head produced no logits"))?;
            if t.dtype() != DType::F32 {
                return Err(fail("logits are not f32"));
            }
            out.logits
                .push(t.as_f32().map(<[f32]>::to_vec).unwrap_or_default());
        }
        progress(total, total);
    }
    Ok(out)
}
