//! The reference interpreter as an engine: any graph, f32, one call at a time per item.

use crate::engine::{EngineOptions, Work};
use crate::{Model, RuntimeError};
use wkvc_ir::graph::{Attr, OpKind};
use wkvc_ir::{Interpreter, KvCache, RunMode, Tensor};
use wkvc_passes::lower::CHUNK;

self_cell::self_cell!(
    /// The interpreter with the model it borrows.
    struct Cell {
        owner: Model,
        #[covariant]
        dependent: Interpreter,
    }
);

pub(crate) struct InterpEngine {
    cell: Cell,
}

impl InterpEngine {
    pub(crate) fn new(model: &Model, opts: EngineOptions) -> Result<InterpEngine, RuntimeError> {
        let cell = Cell::try_new(model.clone(), |m| Interpreter::new(&m.module, opts.threads))?;
        Ok(InterpEngine { cell })
    }

    /// Bytes of the recent windows' f32 tails once the cache holds `ctx` tokens.
    pub(crate) fn kv_tail_bytes(&self, ctx: usize) -> usize {
        let g = &self.cell.borrow_owner().module.graph;
        g.nodes
            .iter()
            .filter(|n| {
                n.op == OpKind::Attention
                    && n.bool_attr("past_only").unwrap_or(false)
                    && n.int_attr("kv_bits").is_some_and(|b| b < 16)
            })
            .map(|n| {
                let kvh = n.int_attr("kv_heads").unwrap_or(1) as usize;
                let hd = n.int_attr("head_dim").unwrap_or(1) as usize;
                (wkvc_ir::kvcache::node_window(n) - 1).min(ctx) * 2 * kvh * hd * 4
            })
            .sum()
    }

    /// KV bytes per token of the interpreter's cache (`wkvc_ir::kvcache::bytes_per_token`
    /// per attention op, with its scale/zero dtype).
    pub(crate) fn kv_bytes_per_token(&self) -> usize {
        let g = &self.cell.borrow_owner().module.graph;
        g.nodes
            .iter()
            .filter(|n| n.op == OpKind::Attention)
            .map(|n| {
                let kvh = n.int_attr("kv_heads").unwrap_or(1) as usize;
                let hd = n.int_attr("head_dim").unwrap_or(1) as usize;
                let bits = n.int_attr("kv_bits").map_or(16, |b| b as u32);
                let pd = wkvc_ir::quant::ParamDtype::from_attr(match n.attr("kv_param_dtype") {
                    Some(Attr::Str(s)) => Some(s.as_str()),
                    _ => None,
                });
                let gl = wkvc_ir::kvcache::node_group_len(n, hd);
                wkvc_ir::kvcache::bytes_per_token(kvh * hd, kvh * hd / gl.max(1), bits, pd.bytes())
            })
            .sum()
    }

    /// Advance every item by its tokens. A prefill runs in chunks of `CHUNK` tokens, as on
    /// the compiled engines (`engine::next_round`): with past-only attention a chunk reads its
    /// own K/V in full precision, so the chunks' boundaries decide what is read quantized, and
    /// every engine draws them at the same places. When a chunk fails, every item's cache is
    /// returned to where the call found it.
    pub(crate) fn run(&self, work: &mut [Work<'_, KvCache>]) -> Result<(), RuntimeError> {
        let it = self.cell.borrow_dependent();
        let before: Vec<_> = work.iter().map(|w| w.kv.checkpoint()).collect();
        for i in 0..work.len() {
            let w = &mut work[i];
            let n = w.tokens.len();
            let piece = if w.mode == RunMode::Prefill { CHUNK } else { n };
            let v = w.logits.len();
            let mut all = w.all_logits.as_deref_mut();
            for a in (0..n).step_by(piece.max(1)) {
                let b = (a + piece).min(n);
                let toks: Vec<i32> = w.tokens[a..b].iter().map(|&t| t as i32).collect();
                let pos: Vec<i32> = (a..b).map(|i| (w.past + i) as i32).collect();
                let logits = it
                    .run_mode(
                        &[
                            ("tokens", Tensor::i32(vec![b - a], toks)),
                            ("positions", Tensor::i32(vec![b - a], pos)),
                        ],
                        w.kv,
                        w.mode,
                    )
                    .map_err(RuntimeError::from)
                    .and_then(|mut out| {
                        out.remove("logits")
                            .and_then(Tensor::into_f32)
                            .ok_or_else(|| {
                                RuntimeError::Invalid(
                                    "the graph has no f32 output \"logits\"".into(),
                                )
                            })
                    });
                let logits = match logits {
                    Ok(l) => l,
                    Err(e) => {
                        for (w, c) in work.iter_mut().zip(before) {
                            w.kv.rollback(c);
                        }
                        return Err(e);
                    }
                };
                if b == n {
                    w.logits.copy_from_slice(&logits[(b - a - 1) * v..]);
                }
                if let Some(all) = all.as_deref_mut() {
                    all.extend_from_slice(&logits);
                }
            }
        }
        Ok(())
    }
}
