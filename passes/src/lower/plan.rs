//! The lowered plan: what every compiled engine runs. Built once per plan (at compile time,
//! stored in the plan file as the lowered graph's text; rebuilt from that text when the plan
//! is opened, without lowering again): the kernel graph, its memory plan, and for each step
//! its kernel, typed operands and output buffer.

use super::{LowerError, LowerOptions, MemoryPlan, lower, memplan, unsupported};
use wkvc_ir::graph::Operand;
use wkvc_ir::{Act, Graph, KernelSpec, WeightStore};

/// Rows per prefill chunk the arena holds (a longer call runs in chunks of this size).
pub const CHUNK: usize = 512;

/// A place in the activation arena.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Buffer {
    /// byte offset
    pub offset: usize,
    /// bytes (for `CHUNK` rows)
    pub bytes: usize,
}

/// What a kernel reads.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOperand {
    /// an earlier step's output
    Buffer(Buffer),
    /// the graph inputs: the tokens (i32) and their positions (i32) of the rows run
    Tokens,
    Positions,
    /// a weight of the module, by name
    Param(String),
}

/// One kernel launch of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub spec: KernelSpec,
    /// the kernel node's operands, in order
    pub operands: Vec<StepOperand>,
    /// where the output goes (`logits` write to the caller's rows: no buffer)
    pub out: Buffer,
    /// `rope_kv`: the inverse frequencies of its rotary embedding (`rope_dim / 2`)
    pub inv_freq: Vec<f32>,
    /// The next step is the only reader of this step's output, as its first operand (a
    /// back end may fuse this step into the next one's prologue).
    pub feeds_next_only: bool,
    /// `attention` with past-only: the recent window, positions read in full precision
    /// (the row's own included; 1: its own only)
    pub window: usize,
}

impl Step {
    /// The name of operand `i`'s weight, when it is one.
    pub fn param(&self, i: usize) -> Option<&str> {
        match self.operands.get(i) {
            Some(StepOperand::Param(p)) => Some(p),
            _ => None,
        }
    }
}

/// A module's graph lowered for the compiled back ends (module docs).
#[derive(Clone, Debug)]
pub struct LoweredPlan {
    /// the kernel graph
    pub graph: Graph,
    pub memory: MemoryPlan,
    pub steps: Vec<Step>,
    /// the quantized GEMMs' activation mode
    pub act: Act,
    /// vocabulary of the logits kernel
    pub vocab: usize,
}

impl LoweredPlan {
    /// Lower `graph` (a module's, with its `weights`) for contexts up to `max_ctx`.
    pub fn build(
        graph: &Graph,
        weights: &WeightStore,
        act: Act,
        max_ctx: usize,
    ) -> Result<LoweredPlan, LowerError> {
        let lowered = lower(graph, LowerOptions { act })?;
        Self::from_lowered(lowered, weights, act, max_ctx)
    }

    /// The plan of an already lowered graph (a plan file's), checked kernel by kernel.
    pub fn from_lowered(
        graph: Graph,
        weights: &WeightStore,
        act: Act,
        max_ctx: usize,
    ) -> Result<LoweredPlan, LowerError> {
        let size = |p: &str| weights.get(p).map(|w| w.size()).unwrap_or((0, 0));
        let memory = memplan(&graph, CHUNK, max_ctx, &size)?;
        let mut steps = Vec::with_capacity(graph.nodes.len());
        let mut vocab = 0;
        for n in &graph.nodes {
            let spec = KernelSpec::from_node(n).map_err(|e| unsupported(n, &e))?;
            match &spec {
                KernelSpec::QGemm { act: a, .. } | KernelSpec::Logits { act: a, .. }
                    if *a != act =>
                {
                    return Err(unsupported(
                        n,
                        &format!("lowered for {} activations, not {}", a.name(), act.name()),
                    ));
                }
                _ => {}
            }
            let mut operands = Vec::with_capacity(n.args.len());
            for a in &n.args {
                operands.push(match a {
                    Operand::Param(p) => {
                        if weights.get(p).is_none() {
                            return Err(unsupported(
                                n,
                                &format!("param @{p} is not in the weight store"),
                            ));
                        }
                        StepOperand::Param(p.clone())
                    }
                    Operand::Value(v) => match graph.inputs.iter().find(|i| i.value == *v) {
                        Some(i) if i.name == "tokens" => StepOperand::Tokens,
                        Some(i) if i.name == "positions" => StepOperand::Positions,
                        Some(i) => {
                            return Err(unsupported(
                                n,
                                &format!("unknown graph input \"{}\"", i.name),
                            ));
                        }
                        None => {
                            let &(offset, bytes) = memory
                                .buffers
                                .get(&v.0)
                                .ok_or_else(|| unsupported(n, &format!("{v} has no buffer")))?;
                            StepOperand::Buffer(Buffer { offset, bytes })
                        }
                    },
                });
            }
            let out = memory
                .buffers
                .get(&n.out.0)
                .map(|&(offset, bytes)| Buffer { offset, bytes })
                .unwrap_or_default();
            let mut inv_freq = Vec::new();
            if let KernelSpec::RopeKv {
                rope_dim, factors, ..
            } = &spec
            {
                let fac = match (factors, n.args.get(2)) {
                    (true, Some(Operand::Param(p))) => weights.get(p).map(|w| w.f32().into_owned()),
                    _ => None,
                };
                inv_freq = wkvc_ir::interp::rope_inv_freq(n, *rope_dim, fac.as_deref());
            }
            if let KernelSpec::Logits { vocab: v, .. } = &spec {
                vocab = *v;
            }
            steps.push(Step {
                spec,
                operands,
                out,
                inv_freq,
                feeds_next_only: false,
                window: wkvc_ir::kvcache::node_window(n),
            });
        }
        if vocab == 0 {
            return Err(LowerError("the lowered graph has no logits kernel".into()));
        }
        for (i, step) in steps.iter_mut().enumerate() {
            let Some(next) = graph.nodes.get(i + 1) else {
                break;
            };
            let v = graph.nodes[i].out;
            let readers: usize = graph
                .nodes
                .iter()
                .flat_map(|n| &n.args)
                .filter(|a| matches!(a, Operand::Value(x) if *x == v))
                .count();
            let output = graph.outputs.iter().any(|o| o.value == v);
            step.feeds_next_only = readers == 1
                && !output
                && matches!(next.args.first(), Some(Operand::Value(x)) if *x == v);
        }
        Ok(LoweredPlan {
            graph,
            memory,
            steps,
            act,
            vocab,
        })
    }

    /// Distinct kernels (by code name), in first-use order.
    pub fn kernels(&self) -> Vec<&KernelSpec> {
        let mut seen = std::collections::HashSet::new();
        self.steps
            .iter()
            .map(|s| &s.spec)
            .filter(|s| seen.insert(s.code_name()))
            .collect()
    }
}
