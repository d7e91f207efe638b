//! `wkvc inspect PLAN --plots DIR`: the K/V channel charts of the chosen layers and the
//! sensitivity scan's chart are written whole as SVG; a layer the model does not have is
//! refused before anything is written.

use std::process::Command;
use wkvc_tests::{temp_dir, tiny_gguf};

fn wkvc(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wkvc"))
        .args(args)
        .output()
        .expect("wkvc runs")
}

#[test]
fn inspect_plots_writes_the_kv_charts() {
    let dir = temp_dir("plots");
    let model = tiny_gguf(&dir);
    let plan = dir.join("mixed.wkv");
    let o = Command::new(env!("CARGO_BIN_EXE_wkvc"))
        .arg("compile")
        .arg(&model)
        .arg("-o")
        .arg(&plan)
        .args([
            "--calib-tokens",
            "64",
            "--threads",
            "1",
            "--kv-bits-per-layer",
            "auto:3.5",
            "--kv-scan-tokens",
            "24",
            "--kv-rotate",
            "hadamard",
            "--quality-check",
            "none",
        ])
        .output()
        .expect("wkvc compile runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("KV per layer"), "{out}");

    let charts = dir.join("charts");
    let o = wkvc(&[
        "inspect".as_ref(),
        plan.as_os_str(),
        "--plots".as_ref(),
        charts.as_os_str(),
        "--plot-tokens".as_ref(),
        "16".as_ref(),
        "--threads".as_ref(),
        "1".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // the tiny model has 2 layers: the first, middle and last are layers 0 and 1
    let mut names: Vec<String> = std::fs::read_dir(&charts)
        .expect("the folder exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["kv-layer-0.svg", "kv-layer-1.svg", "kv-sensitivity.svg"],
        "only whole charts, no temp files"
    );
    for (name, want) in [
        (
            "kv-layer-0.svg",
            "layer 0: K (after RoPE) and V channel ranges over 16 tokens",
        ),
        ("kv-layer-1.svg", "the plan&apos;s (rotated by "),
        ("kv-sensitivity.svg", "3 bits (red), 4 bits (blue)"),
    ] {
        let svg = std::fs::read_to_string(charts.join(name)).expect("chart");
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{name}"
        );
        assert!(
            svg.contains(want) || svg.contains(&want.replace("&apos;", "'")),
            "{name} lacks `{want}`"
        );
    }

    // a layer the model does not have: an error naming it, nothing written
    let none = dir.join("none");
    let o = wkvc(&[
        "inspect".as_ref(),
        plan.as_os_str(),
        "--plots".as_ref(),
        none.as_os_str(),
        "--plot-layers".as_ref(),
        "0,5".as_ref(),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("layer 5 is not in 0..2"), "{e}");
    assert!(!none.exists(), "nothing is written for a refused request");
    let _ = std::fs::remove_dir_all(dir);
}
