//! GGML block dequantization against an independent implementation (gguf-py's numpy
//! dequantizer, recorded in fixtures/ggml_dequant.json on random blocks).

use wkvc_ir::gguf::{GgmlType, dequantize};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn dequantization_matches_gguf_py() {
    let text = include_str!("fixtures/ggml_dequant.json");
    let doc: serde_json::Value = serde_json::from_str(text).expect("fixture json");
    let types = [
        ("Q4_0", GgmlType::Q4_0),
        ("Q4_1", GgmlType::Q4_1),
        ("Q8_0", GgmlType::Q8_0),
        ("Q4_K", GgmlType::Q4K),
        ("Q6_K", GgmlType::Q6K),
        ("F16", GgmlType::F16),
        ("BF16", GgmlType::BF16),
    ];
    for (name, t) in types {
        let case = &doc["types"][name];
        let bytes = hex(case["hex"].as_str().expect("hex"));
        let want: Vec<f32> = case["values"]
            .as_array()
            .expect("values")
            .iter()
            .map(|v| v.as_f64().expect("f") as f32)
            .collect();
        let got = dequantize(t, &bytes);
        assert_eq!(got.len(), want.len(), "{name}: element count");
        // Both sides evaluate the same f32 expressions; allow one rounding step of slack.
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "{name}[{i}]: {g} vs {w}"
            );
        }
    }
}

#[test]
fn block_sizes_match_ggml() {
    assert_eq!(GgmlType::Q4_0.block(), (32, 18));
    assert_eq!(GgmlType::Q4_1.block(), (32, 20));
    assert_eq!(GgmlType::Q8_0.block(), (32, 34));
    assert_eq!(GgmlType::Q4K.block(), (256, 144));
    assert_eq!(GgmlType::Q6K.block(), (256, 210));
    for id in [0, 1, 2, 3, 8, 12, 14, 30] {
        assert_eq!(GgmlType::from_id(id).expect("supported").id(), id);
    }
    let e = GgmlType::from_id(13).expect_err("Q5_K unsupported");
    assert!(e.contains("Q5_K") && e.contains("not supported"), "{e}");
}
