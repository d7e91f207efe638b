//! `--method wkvquant` end to end on the demo model at a tiny setting (2 samples x 64 tokens,
//! one epoch, k = 2): every block is calibrated, the learned parameters reach the packed plan,
//! the settings are recorded, and the plan loads and runs. Skipped (with a message) when the
//! demo model is absent; calibrates on sampled text when ../shared/data is absent.

use wkvc_runtime::compile::{self, CalibConfig, CompileOptions};
use wkvc_runtime::{Model, plan};
use wkvc_tests::{data_dir, demo_model, temp_dir};

#[test]
fn wkvquant_tiny_setting_end_to_end() {
    let Some(path) = demo_model() else {
        return;
    };
    let m = Model::open(&path).expect("demo model opens");
    let o = CompileOptions {
        method: wkvc_runtime::compile::Method::WkvQuant,
        calib: data_dir().map(|d| d.join("wikitext2-calib.txt")),
        calib_tokens: Some(2 * 64),
        calib_window: 64,
        calib_cfg: CalibConfig {
            epochs: 1,
            crr_k: 2,
            ..CalibConfig::default()
        },
        threads: 2,
        seed: 3,
        ..Default::default()
    };
    let data = compile::calibration_data(&m, &o, &mut |_| {}).expect("calibration data");
    assert_eq!(data.windows.len(), 2);
    let mut msgs = 0usize;
    let c = compile::quantize(&m, &o, Some(&data), &mut |s| {
        if s.starts_with("calibrating block") {
            msgs += 1;
        }
    })
    .expect("wkvquant compile");
    assert!(msgs >= 30, "progress reported per block ({msgs} messages)");
    let info = c.quant.calibrate.clone().expect("calibration recorded");
    assert_eq!(info["settings"]["samples"], 2);
    assert_eq!(info["settings"]["tokens_per_sample"], 64);
    assert_eq!(info["settings"]["epochs"], 1);
    assert_eq!(info["settings"]["crr_k"], 2);
    assert_eq!(info["settings"]["loss"], "mae");
    assert_eq!(info["settings"]["schedule"], "joint");
    assert_eq!(info["steps"], 30 * 2);
    let blocks = info["blocks"].as_array().expect("blocks");
    assert_eq!(blocks.len(), 30);
    assert_eq!(blocks[29]["k_eff"], 0);
    assert_eq!(blocks[0]["k_eff"], 2);
    for b in blocks {
        assert!(b["first_loss"].as_f64().unwrap().is_finite());
    }
    // Learned clipping reached the packed weights: they differ from RTN's.
    let rtn = compile::quantize(
        &m,
        &CompileOptions {
            method: wkvc_runtime::compile::Method::Rtn,
            ..o.clone()
        },
        Some(&data),
        &mut |_| {},
    )
    .expect("rtn compile");
    let name = "model.layers.3.mlp.down_proj.scales";
    let (a, b) = (
        c.module.weights.get(name).expect("scales").bytes().to_vec(),
        rtn.module
            .weights
            .get(name)
            .expect("scales")
            .bytes()
            .to_vec(),
    );
    assert_eq!(a.len(), b.len());
    assert_ne!(a, b, "learned clipping changes the scales");
    // The plan round-trips and runs.
    let dir = temp_dir("wkvq");
    let file = dir.join("tiny.wkv");
    let q = m.with_module(c.module.clone(), None);
    let quality = compile::measure_quality(&m, &q, &data.held_out[..64], 2).expect("quality");
    let manifest = compile::manifest(&m, &c, quality, String::new());
    plan::write(&file, &c.module, manifest).expect("write plan");
    let p = Model::open(&file).expect("plan opens");
    let mq = &p.plan.as_ref().expect("manifest").quant;
    assert_eq!(mq.method, "wkvquant");
    assert_eq!(mq.calibrate.as_ref().expect("recorded")["steps"], 60);
    let e = p.engine(2).expect("engine");
    let mut s = e.session(32);
    let logits = s.prefill(&[1, 504, 3458, 282]).expect("forward");
    assert!(logits.iter().all(|v| v.is_finite()));
}
