//! The Cranelift IR the CPU back end emits for representative specs of the demo model (the
//! FMA variant, so the text does not depend on the host): reviewed like code.

use wkvc_codegen::cpu::CpuJit;
use wkvc_ir::{Act, KernelSpec};

fn ir(spec: &KernelSpec) -> String {
    let mut jit = CpuJit::host().expect("host JIT");
    let text = jit.kernel_ir_with(spec, true).expect("builds");
    // the variant without FMA is the same code with fmul + fadd
    let plain = jit.kernel_ir_with(spec, false).expect("builds");
    assert!(
        !plain.contains(" fma "),
        "{}: fma without the host flag",
        spec.code_name()
    );
    text
}

#[test]
fn qgemm_int8_k576_g128() {
    insta::assert_snapshot!(ir(&KernelSpec::QGemm {
        k: 576,
        parts: vec![576, 192, 192],
        bits: 4,
        group: 128,
        residual: false,
        act: Act::Int8,
    }));
}

#[test]
fn qgemm_f32_k1536_g128_residual() {
    insta::assert_snapshot!(ir(&KernelSpec::QGemm {
        k: 1536,
        parts: vec![576],
        bits: 4,
        group: 128,
        residual: true,
        act: Act::F32,
    }));
}

#[test]
fn attention_h9_kv3_d64_b4_past_only_smooth() {
    insta::assert_snapshot!(ir(&KernelSpec::Attention {
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
fn rope_kv_h9_kv3_d64_b4_smooth() {
    insta::assert_snapshot!(ir(&KernelSpec::RopeKv {
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

#[test]
fn rms_norm_and_silu_mul() {
    insta::assert_snapshot!(
        "rms_norm_d576",
        ir(&KernelSpec::RmsNorm {
            dim: 576,
            eps: 1e-5
        })
    );
    insta::assert_snapshot!("silu_mul_n1536", ir(&KernelSpec::SiluMul { n: 1536 }));
}

#[test]
fn logits_int8_d576() {
    insta::assert_snapshot!(ir(&KernelSpec::Logits {
        vocab: 49152,
        dim: 576,
        act: Act::Int8,
    }));
}
