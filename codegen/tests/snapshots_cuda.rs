//! Snapshots of the generated CUDA C for representative specs of the demo model (reviewed like
//! code; `wkvc emit PLAN --kernel NAME --target cuda` prints the same text).

use wkvc_codegen::cuda;
use wkvc_ir::{Act, KernelSpec};

fn src(spec: &KernelSpec) -> String {
    cuda::emit(spec).expect("emits").source
}

#[test]
fn qgemm_k576_g128() {
    insta::assert_snapshot!(src(&KernelSpec::QGemm {
        k: 576,
        parts: vec![576, 192, 192],
        bits: 4,
        group: 128,
        residual: false,
        act: Act::F32,
    }));
}

#[test]
fn attention_demo() {
    insta::assert_snapshot!(src(&KernelSpec::Attention {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        kv_bits: 4,
        past_only: true,
        smooth: true,
        layer: 0,
        kv_group: 0,
    }));
}

#[test]
fn rope_kv_demo() {
    insta::assert_snapshot!(src(&KernelSpec::RopeKv {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        rope_dim: 64,
        kv_bits: 4,
        smooth: true,
        factors: false,
        layer: 0,
        rotate: 0,
        kv_group: 0,
    }));
}

/// The demo's rope_kv with the K/V rotation (Hadamard blocks of the head dim).
#[test]
fn rope_kv_demo_rot64() {
    insta::assert_snapshot!(src(&KernelSpec::RopeKv {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        rope_dim: 64,
        kv_bits: 4,
        smooth: true,
        factors: false,
        layer: 0,
        rotate: 64,
        kv_group: 0,
    }));
}

#[test]
fn rms_norm_d576() {
    insta::assert_snapshot!(src(&KernelSpec::RmsNorm {
        dim: 576,
        eps: 1e-5
    }));
}
