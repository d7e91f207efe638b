//! `wkvc compile --max-kld / --max-ppl-ratio`: a plan within the bounds is written with the
//! gate recorded; a plan worse than asked fails the compile with the figures and writes
//! nothing; bounds that cannot be checked are refused before any work.

use std::path::Path;
use std::process::{Command, Output};
use wkvc_tests::{temp_dir, tiny_gguf};

fn compile(model: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wkvc"))
        .arg("compile")
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(["--calib-tokens", "128", "--threads", "1"])
        .args(extra)
        .output()
        .expect("wkvc compile runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn quality_gate_keeps_bad_plans_out() {
    let dir = temp_dir("quality-gate");
    let model = tiny_gguf(&dir);
    let good = dir.join("good.wkv");
    // bounds no plan can miss: written, with the gate and its figures recorded
    let o = compile(
        &model,
        &good,
        &["--max-kld", "1000", "--max-ppl-ratio", "1000"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("quality gate  passed"), "{out}");
    let (_, manifest) = wkvc_runtime::plan::open(&good).expect("the plan opens");
    let q = &manifest.quality;
    let gate = &q["gate"];
    assert_eq!(gate["passed"], true, "{q}");
    assert_eq!(gate["max_kld"], 1000.0, "{q}");
    let kld = q["kld_vs_fp"].as_f64().expect("kld recorded");
    let ratio = q["perplexity"].as_f64().expect("ppl") / q["perplexity_fp"].as_f64().expect("fp");
    assert_eq!(gate["kld_vs_fp"].as_f64(), Some(kld));
    // a W4KV4 plan of a random model differs from its FP model (else the bounds below could
    // not be missed)
    assert!(kld > 0.0 && ratio.is_finite(), "KLD {kld}, ratio {ratio}");

    // the same compile (same seed and text: the same plan) held to half its KLD: refused,
    // nothing at the path, the figures in the message
    let bad = dir.join("bad.wkv");
    let half = format!("{}", kld / 2.0);
    let o = compile(&model, &bad, &["--max-kld", &half]);
    assert!(!o.status.success(), "a plan over --max-kld was accepted");
    let e = stderr(&o);
    assert!(
        e.contains("quality gate failed") && e.contains("--max-kld"),
        "{e}"
    );
    assert!(e.contains("no plan was written"), "{e}");
    assert!(!bad.exists(), "a plan was written although the gate failed");

    // a perplexity ratio bound below the plan's
    let o = compile(
        &model,
        &bad,
        &["--max-ppl-ratio", &format!("{}", ratio * 0.5)],
    );
    assert!(
        !o.status.success(),
        "a plan over --max-ppl-ratio was accepted"
    );
    assert!(stderr(&o).contains("--max-ppl-ratio"), "{}", stderr(&o));
    assert!(!bad.exists());

    // bounds that cannot be checked: refused up front
    for (args, says) in [
        (&["--max-kld", "0.1", "--quality-check", "none"][..], "need"),
        (&["--max-kld=-1"][..], "--max-kld -1"),
        (&["--max-ppl-ratio", "NaN"][..], "--max-ppl-ratio NaN"),
    ] {
        let o = compile(&model, &bad, args);
        assert!(!o.status.success(), "{args:?} accepted");
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
        assert!(!bad.exists());
    }
}
