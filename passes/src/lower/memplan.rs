//! Memory planning of a lowered graph: every kernel output gets a static place in one arena.

use super::{LowerError, unsupported, val};
use std::collections::{BTreeMap, HashMap, HashSet};
use wkvc_ir::graph::Operand;
use wkvc_ir::{Act, Graph, KernelSpec, ValueId};

/// Static memory plan of a lowered graph (DESIGN.md "memory planning"): every kernel output
/// gets an offset in one workspace arena, reused once its value is dead; exact byte counts of
/// weights, KV cache and workspace.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemoryPlan {
    /// Rows of the largest chunk the workspace holds (prefill runs in chunks of this size).
    pub chunk: usize,
    /// Context the KV numbers are for.
    pub max_ctx: usize,
    /// Bytes of the params the kernels read, as stored (the plan's pages in memory). A table
    /// read only by the embedding (an int8 head keeps its own copy) counts the rows a context
    /// can touch: min(vocab, max_ctx) rows, each with a page of slack.
    pub weights_bytes: usize,
    /// Bytes of the engine's own copies (the plan's pages are released): the quantized GEMMs'
    /// codes in tiles of `QGEMM_TILE` rows with f32 scale/zero, the int8 head, f32 copies of
    /// the small vectors of norms, RoPE and smoothing.
    #[serde(default)]
    pub derived_bytes: usize,
    /// For a table read only by the embedding: rows and bytes per row (with a page of slack)
    /// that `weights_bytes` counts per token of context.
    #[serde(default)]
    pub embed_rows: usize,
    #[serde(default)]
    pub embed_row_bytes: usize,
    /// KV cache bytes per token (all layers, K and V, codes plus f16 scale/zero per group).
    pub kv_bytes_per_token: usize,
    /// KV cache at `max_ctx`.
    pub kv_bytes: usize,
    /// The recent windows' full-precision tails (`--kv-window R`: the K and V of the last
    /// R - 1 positions of each past-only layer in f32), at their full length: what a session
    /// holds beside the per-token cache; 0 without a window. Not counted: the copy a call
    /// stages beside it (the same size) and, on the CUDA engine, a session's source buffer
    /// of R - 1 + `chunk` rows of one layer.
    #[serde(default)]
    pub kv_tail_bytes: usize,
    /// The activation arena (kernel outputs).
    pub arena_bytes: usize,
    /// Per-call scratch with one worker: activation prep of the GEMMs (int8 codes, sums), rope
    /// tables, attention accumulators, the logits row.
    pub scratch_bytes: usize,
    /// Scratch each further worker adds (its attention accumulators).
    #[serde(default)]
    pub thread_scratch_bytes: usize,
    /// weights + KV + arena + scratch, at `max_ctx` with one worker
    pub total_bytes: usize,
    /// value id -> (offset, bytes) in the arena
    pub buffers: BTreeMap<u32, (usize, usize)>,
}

impl MemoryPlan {
    /// The total for one session of `ctx` tokens (instead of `max_ctx`) on `threads` workers.
    pub fn total_at(&self, ctx: usize, threads: usize) -> usize {
        let embed = |c: usize| self.embed_rows.min(c) * self.embed_row_bytes;
        self.weights_bytes - embed(self.max_ctx)
            + embed(ctx)
            + self.derived_bytes
            + self.kv_bytes_per_token * ctx
            + self.kv_tail_bytes
            + self.arena_bytes
            + self.scratch(threads)
    }

    /// Bytes one decode step reads from memory at `ctx` tokens of context: every weight the
    /// kernels read (the engine's copies and the params read as stored), one row of an
    /// embedding-only table, and the KV cache of `ctx` tokens (with the recent windows'
    /// tails). Activations stay in cache and are not counted: this is the floor a decode step
    /// at memory bandwidth needs.
    pub fn decode_bytes(&self, ctx: usize) -> usize {
        let embed_all = self.embed_rows.min(self.max_ctx) * self.embed_row_bytes;
        let embed_one = self.embed_row_bytes.min(embed_all);
        self.weights_bytes - embed_all
            + embed_one
            + self.derived_bytes
            + self.kv_bytes_per_token * ctx
            + self.kv_tail_bytes
    }

    /// Per-call scratch on `threads` workers.
    pub fn scratch(&self, threads: usize) -> usize {
        self.scratch_bytes + threads.saturating_sub(1) * self.thread_scratch_bytes
    }
}

/// KV bytes per token of one layer for an attention kernel, as the compiled engines keep it:
/// codes as `wkvc_ir::kvcache` lays them out, an f16 scale and zero per (token, group: a kv
/// head, or `kv_group` channels).
pub fn kv_bytes_per_token(spec: &KernelSpec) -> usize {
    match spec {
        KernelSpec::Attention {
            kv_heads,
            head_dim,
            kv_bits,
            kv_group,
            ..
        } => {
            let w = kv_heads * head_dim;
            let gl = wkvc_ir::kvcache::group_len(*kv_group, *head_dim);
            wkvc_ir::kvcache::bytes_per_token(w, w / gl.max(1), *kv_bits, 2)
        }
        _ => 0,
    }
}

/// Bytes of a past-only attention's recent-window tail at its full length: the f32 K and V of
/// the last R - 1 positions (at most `max_ctx`), as the CPU engine reserves it.
pub fn kv_tail_bytes(spec: &KernelSpec, node: &wkvc_ir::graph::Node, max_ctx: usize) -> usize {
    match spec {
        KernelSpec::Attention {
            kv_heads,
            head_dim,
            kv_bits,
            past_only: true,
            ..
        } if *kv_bits < 16 => {
            let rows = (wkvc_ir::kvcache::node_window(node) - 1).min(max_ctx);
            rows * 2 * kv_heads * head_dim * 4
        }
        _ => 0,
    }
}

/// May a kernel write its output over operand `i` (element-wise in place)?
fn in_place(spec: &KernelSpec, i: usize) -> bool {
    match spec {
        KernelSpec::QGemm {
            parts, residual, ..
        } => *residual && i == 1 + 3 * parts.len(),
        KernelSpec::Gemm {
            parts, residual, ..
        } => *residual && i == 1 + parts.len(),
        KernelSpec::RopeKv { .. } | KernelSpec::RmsNorm { .. } => i == 0,
        _ => false,
    }
}

/// Plan the lowered graph for chunks of up to `chunk` rows and a context of `max_ctx` tokens.
/// `param_size` gives the stored bytes and the element count of a param.
pub fn memplan(
    g: &Graph,
    chunk: usize,
    max_ctx: usize,
    param_size: &dyn Fn(&str) -> (usize, usize),
) -> Result<MemoryPlan, LowerError> {
    let param_bytes = |p: &str| param_size(p).0;
    let param_elems = |p: &str| param_size(p).1;
    let mut last = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for v in n.value_args() {
            last.insert(v, i);
        }
    }
    for o in &g.outputs {
        last.insert(o.value, usize::MAX);
    }
    let mut plan = MemoryPlan {
        chunk,
        max_ctx,
        ..Default::default()
    };
    let mut free: Vec<(usize, usize)> = Vec::new(); // (offset, bytes)
    let mut top = 0usize;
    let mut live: HashMap<ValueId, (usize, usize)> = HashMap::new();
    // the scratch buffers of different kinds exist side by side, those of one kind are reused
    let mut scratch: HashMap<&'static str, usize> = HashMap::new();
    let mut thread_scratch = 0usize;
    let mut params = HashSet::new();
    let mut embed_only: HashSet<String> = HashSet::new();
    let mut copied: HashSet<String> = HashSet::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let spec = KernelSpec::from_node(n).map_err(|e| unsupported(n, &e))?;
        for a in &n.args {
            if let Operand::Param(p) = a {
                match &spec {
                    KernelSpec::Embed { .. } => {
                        embed_only.insert(p.clone());
                    }
                    // the engine holds the codes, scales and zeros as its own copies
                    KernelSpec::Logits { act: Act::Int8, .. } | KernelSpec::QGemm { .. } => {}
                    // small vectors read every step: f32 copies (a mapped page would bring
                    // its neighbours in with it)
                    KernelSpec::RmsNorm { .. }
                    | KernelSpec::RopeKv { .. }
                    | KernelSpec::Attention { .. } => {
                        if copied.insert(p.clone()) {
                            plan.derived_bytes += 4 * param_elems(p);
                        }
                    }
                    _ => {
                        params.insert(p.clone());
                    }
                }
            }
        }
        match &spec {
            KernelSpec::QGemm {
                k, parts, group, ..
            } => {
                // codes in tiles of rows (the last one padded), f32 scale and zero
                let ng = k.div_ceil(wkvc_ir::quant::group_len(*k, *group));
                plan.derived_bytes += parts
                    .iter()
                    .map(|n| n.next_multiple_of(wkvc_ir::kernel::QGEMM_TILE) * (k / 2 + ng * 8))
                    .sum::<usize>();
            }
            KernelSpec::Logits {
                vocab,
                dim,
                act: Act::Int8,
            } => plan.derived_bytes += vocab * dim + vocab * (dim / 32) * 4,
            _ => {}
        }
        plan.kv_bytes_per_token += kv_bytes_per_token(&spec);
        plan.kv_tail_bytes += kv_tail_bytes(&spec, n, max_ctx);
        // a value that dies here and may be overwritten in place
        let mut slot = None;
        for (ai, a) in n.args.iter().enumerate() {
            if let Some(v) = val(a)
                && last.get(&v) == Some(&i)
                && in_place(&spec, ai)
                && slot.is_none()
            {
                slot = live.remove(&v);
            }
        }
        // logits go to the session's own row (scratch), not the arena
        let bytes = if matches!(spec, KernelSpec::Logits { .. }) {
            0
        } else {
            chunk * spec.out_cols() * 4
        };
        let place = match slot {
            Some(s) if s.1 >= bytes => s,
            other => {
                if let Some(s) = other {
                    free.push(s);
                }
                let best = free
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f.1 >= bytes)
                    .min_by_key(|(_, f)| f.1)
                    .map(|(j, _)| j);
                match best {
                    Some(j) => free.swap_remove(j),
                    None => {
                        top += bytes;
                        (top - bytes, bytes)
                    }
                }
            }
        };
        plan.buffers.insert(n.out.0, (place.0, bytes));
        // operands that die here go back to the free list
        for a in &n.args {
            if let Some(v) = val(a)
                && last.get(&v) == Some(&i)
                && let Some(s) = live.remove(&v)
            {
                free.push(s);
            }
        }
        live.insert(n.out, place);
        let (fixed, per_thread) = scratch_bytes(&spec, chunk);
        let s = scratch.entry(spec.kind()).or_default();
        *s = (*s).max(fixed);
        thread_scratch = thread_scratch.max(per_thread);
    }
    plan.arena_bytes = top;
    plan.scratch_bytes = scratch.values().sum::<usize>() + thread_scratch;
    plan.thread_scratch_bytes = thread_scratch;
    plan.weights_bytes = params.iter().map(|p| param_bytes(p)).sum();
    for p in embed_only.difference(&params) {
        let (rows, row_bytes) = g
            .nodes
            .iter()
            .find_map(|n| match KernelSpec::from_node(n) {
                Ok(KernelSpec::Embed { vocab, dim }) => Some((vocab, dim * 4)),
                _ => None,
            })
            .unwrap_or((0, 0));
        plan.embed_rows = rows;
        plan.embed_row_bytes = row_bytes + 4096;
        plan.weights_bytes += param_bytes(p).min(rows.min(max_ctx) * (row_bytes + 4096));
    }
    plan.kv_bytes = plan.kv_bytes_per_token * max_ctx;
    plan.total_bytes = plan.weights_bytes
        + plan.derived_bytes
        + plan.kv_bytes
        + plan.kv_tail_bytes
        + plan.arena_bytes
        + plan.scratch_bytes;
    Ok(plan)
}

/// Scratch a kernel needs beside its output: (per call, per worker).
pub fn scratch_bytes(spec: &KernelSpec, chunk: usize) -> (usize, usize) {
    let fixed = match spec {
        KernelSpec::QGemm { k, group, .. } => {
            let gl = wkvc_ir::quant::group_len(*k, *group);
            let ng = k.div_ceil(gl);
            // permuted/quantized rows (f32 either way), per-block scales, per-group sums
            chunk * (k * 4 + k.div_ceil(32) * 4 + ng * 4)
        }
        KernelSpec::RopeKv { rope_dim, .. } => chunk * rope_dim * 4,
        // the logits row, and the int8 prep of the input rows
        KernelSpec::Logits { vocab, dim, .. } => *vocab * 4 + chunk * (dim + dim / 32 * 4 + 4),
        _ => 0,
    };
    let per_thread = match spec {
        KernelSpec::Attention {
            heads,
            kv_heads,
            head_dim,
            ..
        } => 4 * head_dim * (heads / kv_heads.max(&1) + 1) * 4,
        _ => 0,
    };
    (fixed, per_thread)
}
