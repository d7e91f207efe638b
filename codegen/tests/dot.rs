//! The JIT dot kernel against an f64 reference over lengths that exercise the 16-wide loop,
//! the scalar tail and both together; its IR text is snapshotted.

use wkvc_codegen::cpu::CpuJit;

#[test]
fn jit_dot_matches_f64_reference() {
    let mut jit = CpuJit::host().expect("host JIT");
    let dot = jit.compile_dot_f32("dot").expect("compile");
    let mut s = 12345u64;
    for n in [
        0usize, 1, 3, 4, 5, 15, 16, 17, 31, 33, 100, 576, 1536, 4096, 4099,
    ] {
        let mut r = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let a: Vec<f32> = (0..n).map(|_| r()).collect();
        let b: Vec<f32> = (0..n).map(|_| r()).collect();
        // SAFETY: both slices hold n floats.
        let got = unsafe { dot(a.as_ptr(), b.as_ptr(), n) } as f64;
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let mag: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (*x as f64 * *y as f64).abs())
            .sum();
        // f32 accumulation over n terms: error <= n * 2^-24 * sum|a b| (loose worst case)
        assert!(
            (got - want).abs() <= (n as f64 * 6e-8 * mag).max(1e-7),
            "n={n}: {got} vs {want}"
        );
    }
}

#[test]
fn dot_ir_snapshot() {
    let mut jit = CpuJit::host().expect("host JIT");
    let ir = jit.dot_f32_ir();
    // The snapshot is of the FMA variant (every x86-64 host here has FMA); without it the IR
    // uses fmul+fadd, checked below.
    assert_eq!(ir.contains(" fma "), jit.has_fma());
    if jit.has_fma() {
        insta::assert_snapshot!("dot_f32_fma", ir);
    } else {
        assert!(ir.contains("fmul"));
    }
}
