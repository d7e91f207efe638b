//! wkvc-passes owns IR-to-IR transformation: the `Pass` trait, the pass manager (which runs
//! the verifier after every pass and records a report per pass), and the passes themselves.
//! Passes: dead-code elimination, and the WKVQuant rewrites in `quant` (weight fake
//! quantization, KV smoothing, KV quantization, past-only attention, int4 packing), and
//! `lower` (fusion into kernel nodes, memory planning).

pub mod autodiff;
pub mod calibrate;
pub mod lower;
pub mod optim;
pub mod quant;
pub mod stream;

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;
use wkvc_ir::graph::Operand;
use wkvc_ir::{Module, verify::VerifyError};

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("pass `{pass}` produced an invalid graph: {source}")]
    Verify {
        pass: String,
        #[source]
        source: VerifyError,
    },
    #[error("the input graph is invalid: {0}")]
    Input(#[source] VerifyError),
    #[error("pass `{pass}`: {msg}")]
    Failed { pass: String, msg: String },
}

/// What a pass did: counters for reports and the plan's provenance.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PassReport {
    pub pass: String,
    pub seconds: f64,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub stats: BTreeMap<String, f64>,
}

/// An IR-to-IR transformation with its options in `self`.
pub trait Pass {
    fn name(&self) -> &str;
    /// Rewrite the module; fill `report.stats` with what changed.
    fn run(&self, m: &mut Module, report: &mut PassReport) -> Result<(), PassError>;
}

/// Runs passes in order, verifying the module (graph and weight store) after each.
#[derive(Default)]
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
}

impl PassManager {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, p: impl Pass + 'static) -> Self {
        self.passes.push(Box::new(p));
        self
    }

    pub fn run(&self, m: &mut Module) -> Result<Vec<PassReport>, PassError> {
        m.verify().map_err(PassError::Input)?;
        let mut reports = Vec::new();
        for p in &self.passes {
            let t0 = Instant::now();
            let mut r = PassReport {
                pass: p.name().to_string(),
                nodes_before: m.graph.nodes.len(),
                ..Default::default()
            };
            p.run(m, &mut r)?;
            m.verify().map_err(|e| PassError::Verify {
                pass: p.name().to_string(),
                source: e,
            })?;
            r.nodes_after = m.graph.nodes.len();
            r.seconds = t0.elapsed().as_secs_f64();
            tracing::info!(
                "pass {}: {} -> {} nodes in {:.3}s",
                r.pass,
                r.nodes_before,
                r.nodes_after,
                r.seconds
            );
            reports.push(r);
        }
        Ok(reports)
    }
}

/// Dead-code elimination: drops nodes whose results reach no output, then inputs and param
/// declarations nothing uses, and (with `prune_weights`) the weights they named.
#[derive(Clone, Debug, Default)]
pub struct Dce {
    pub prune_weights: bool,
}

impl Pass for Dce {
    fn name(&self) -> &str {
        "dce"
    }

    fn run(&self, m: &mut Module, report: &mut PassReport) -> Result<(), PassError> {
        let g = &mut m.graph;
        let mut live: HashSet<u32> = g.outputs.iter().map(|o| o.value.0).collect();
        // Nodes are in definition order: one backwards sweep finds everything live.
        let mut keep = vec![false; g.nodes.len()];
        for (i, n) in g.nodes.iter().enumerate().rev() {
            if live.contains(&n.out.0) {
                keep[i] = true;
                live.extend(n.value_args().map(|v| v.0));
            }
        }
        let before = g.nodes.len();
        let mut it = keep.iter();
        g.nodes.retain(|_| *it.next().unwrap_or(&false));
        let inputs_before = g.inputs.len();
        g.inputs.retain(|i| live.contains(&i.value.0));
        let used: HashSet<&str> = g
            .nodes
            .iter()
            .flat_map(|n| n.args.iter())
            .filter_map(|a| match a {
                Operand::Param(p) => Some(p.as_str()),
                Operand::Value(_) => None,
            })
            .collect();
        let dropped: Vec<String> = g
            .params
            .iter()
            .filter(|p| !used.contains(p.name.as_str()))
            .map(|p| p.name.clone())
            .collect();
        g.params.retain(|p| used.contains(p.name.as_str()));
        if self.prune_weights {
            for d in &dropped {
                m.weights.remove(d);
            }
        }
        report.stats.insert(
            "nodes_removed".into(),
            (before - m.graph.nodes.len()) as f64,
        );
        report.stats.insert(
            "inputs_removed".into(),
            (inputs_before - m.graph.inputs.len()) as f64,
        );
        report
            .stats
            .insert("params_removed".into(), dropped.len() as f64);
        Ok(())
    }
}
