//! The reference interpreter as an engine: any graph, f32, one call at a time per item.

use crate::engine::{EngineOptions, Work};
use crate::{Model, RuntimeError};
use wkvc_ir::graph::{Attr, OpKind};
use wkvc_ir::{Interpreter, KvCache, Tensor};

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

    pub(crate) fn run(&self, work: &mut [Work<'_, KvCache>]) -> Result<(), RuntimeError> {
        let it = self.cell.borrow_dependent();
        for w in work.iter_mut() {
            let n = w.tokens.len();
            let toks: Vec<i32> = w.tokens.iter().map(|&t| t as i32).collect();
            let pos: Vec<i32> = (0..n).map(|i| (w.past + i) as i32).collect();
            let mut out = it.run_mode(
                &[
                    ("tokens", Tensor::i32(vec![n], toks)),
                    ("positions", Tensor::i32(vec![n], pos)),
                ],
                w.kv,
                w.mode,
            )?;
            let logits = out
                .remove("logits")
                .and_then(Tensor::into_f32)
                .ok_or_else(|| {
                    RuntimeError::Invalid("the graph has no f32 output \"logits\"".into())
                })?;
            let v = w.logits.len();
            w.logits.copy_from_slice(&logits[(n - 1) * v..]);
            if let Some(all) = w.all_logits.as_deref_mut() {
                all.extend_from_slice(&logits);
            }
        }
        Ok(())
    }
}
