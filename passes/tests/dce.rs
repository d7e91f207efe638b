//! The pass manager and DCE, with IR snapshots before and after (Cranelift filetest habit).

use wkvc_ir::graph::{OpKind, Operand, ValueId};
use wkvc_ir::text::{parse, print};
use wkvc_ir::{Module, Weight, WeightStore};
use wkvc_passes::{Dce, Pass, PassError, PassManager, PassReport};

const BEFORE: &str = r#"graph "dce" {
  param @w : f32[4,3]
  param @unused : f32[4,3]
  input %0 "x" : f32[seq,3]
  input %1 "dead_input" : f32[seq,3]
  %2 = linear(%0, @w) : f32[seq,4]
  %3 = linear(%1, @unused) : f32[seq,4]
  %4 = silu(%2) : f32[seq,4]
  %5 = add(%3, %4) : f32[seq,4]
  %6 = mul(%2, %4) : f32[seq,4]
  output "y" %6
}
"#;

fn module() -> Module {
    let mut w = WeightStore::new();
    w.insert("w", Weight::from_f32(vec![4, 3], vec![0.5; 12]));
    w.insert("unused", Weight::from_f32(vec![4, 3], vec![0.5; 12]));
    Module {
        graph: parse(BEFORE).expect("parse"),
        weights: w,
    }
}

#[test]
fn dce_removes_dead_nodes_inputs_and_params() {
    let mut m = module();
    insta::assert_snapshot!("dce_before", print(&m.graph));
    let reports = PassManager::new()
        .with(Dce {
            prune_weights: true,
        })
        .run(&mut m)
        .expect("run");
    insta::assert_snapshot!("dce_after", print(&m.graph));
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_eq!((r.nodes_before, r.nodes_after), (5, 3));
    assert_eq!(r.stats["nodes_removed"], 2.0);
    assert_eq!(r.stats["inputs_removed"], 1.0);
    assert_eq!(r.stats["params_removed"], 1.0);
    assert!(!m.weights.contains("unused") && m.weights.contains("w"));
    // idempotent
    let again = PassManager::new()
        .with(Dce::default())
        .run(&mut m)
        .expect("run");
    assert_eq!(again[0].stats["nodes_removed"], 0.0);
}

/// A deliberately broken pass: the manager must catch its invalid output.
struct Breaker;
impl Pass for Breaker {
    fn name(&self) -> &str {
        "breaker"
    }
    fn run(&self, m: &mut Module, _: &mut PassReport) -> Result<(), PassError> {
        let n = m
            .graph
            .nodes
            .iter_mut()
            .find(|n| n.op == OpKind::Silu)
            .expect("silu");
        n.args = vec![Operand::Value(ValueId(42))];
        Ok(())
    }
}

#[test]
fn the_manager_verifies_after_every_pass() {
    let mut m = module();
    let e = PassManager::new()
        .with(Dce::default())
        .with(Breaker)
        .run(&mut m)
        .expect_err("caught");
    let s = e.to_string();
    assert!(
        s.contains("pass `breaker` produced an invalid graph")
            && s.contains("%42 is used before it is defined"),
        "{s}"
    );
    // an invalid input is refused before any pass runs
    let mut bad = module();
    bad.weights.remove("w");
    let e = PassManager::new()
        .with(Dce::default())
        .run(&mut bad)
        .expect_err("input");
    assert!(
        e.to_string()
            .contains("param @w is not in the weight store"),
        "{e}"
    );
}
