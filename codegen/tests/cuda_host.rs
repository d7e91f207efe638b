//! The CUDA host emulator itself: its execution model (barriers across the block, shuffles
//! within a warp, shared memory per block, every block of a 3-D grid), its argument passing
//! (one struct by value, as every wkvc kernel takes), and its errors: a missing compiler, a
//! compile error, a deadlock on a divergent barrier.

use wkvc_codegen::cuda::{CudaKernel, Launch};
use wkvc_codegen::cuda_host;

fn kernel(entry: &str, body: &str) -> CudaKernel {
    CudaKernel {
        entries: vec![entry.to_string()],
        source: format!("typedef unsigned int u32;\n{body}"),
        launch: Launch::Elementwise,
    }
}

/// A block-wide reverse through shared memory (needs the barrier), a warp butterfly sum by
/// shuffles, and the grid indices, over a 3-D grid of 2 x 3 x 2 blocks of 64 threads.
#[test]
fn the_emulator_runs_blocks_barriers_and_shuffles() {
    let k = kernel(
        "probe",
        r#"
struct ProbeArgs { unsigned long long out, grid; };
extern "C" __global__ void probe(const ProbeArgs a) {
    float* out = (float*)a.out;
    int* grid = (int*)a.grid;
    __shared__ float buf[64];
    int t = threadIdx.x;
    int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    buf[t] = (float)(b * 64 + t);
    __syncthreads();
    float v = buf[63 - t];
    float s = (float)t;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    out[(b * 64 + t) * 2] = v;
    out[(b * 64 + t) * 2 + 1] = s;
    if (t == 0) grid[b] = blockIdx.x * 100 + blockIdx.y * 10 + blockIdx.z;
}
"#,
    );
    let m = cuda_host::build(&k).expect("builds");
    let nb = 12;
    let mut out = vec![f32::NAN; nb * 64 * 2];
    let mut grid = vec![-1i32; nb];
    // SAFETY: the probe's two arguments, with room for every block.
    unsafe {
        m.launch(
            0,
            (2, 3, 2),
            (64, 1, 1),
            &[out.as_mut_ptr() as u64, grid.as_mut_ptr() as u64],
        )
    }
    .expect("runs");
    for b in 0..nb {
        for t in 0..64 {
            assert_eq!(out[(b * 64 + t) * 2], (b * 64 + 63 - t) as f32, "reverse");
            // lanes of warp w sum 32 w + 0..31
            let w = t / 32;
            let want: usize = (0..32).map(|l| 32 * w + l).sum();
            assert_eq!(out[(b * 64 + t) * 2 + 1], want as f32, "warp sum");
        }
        let (x, y, z) = (b % 2, (b / 2) % 3, b / 6);
        assert_eq!(grid[b], (x * 100 + y * 10 + z) as i32);
    }
}

#[test]
fn a_divergent_barrier_is_a_deadlock_error_not_a_hang() {
    let k = kernel(
        "stuck",
        r#"
struct StuckArgs { unsigned long long x; };
extern "C" __global__ void stuck(const StuckArgs a) {
    int* x = (int*)a.x;
    // half the warp shuffles (waiting for the other half), the other half waits at the block
    // barrier (waiting for the first)
    if (threadIdx.x < 16) { float v = __shfl_xor_sync(0xffffffffu, 1.0f, 1); x[1] = (int)v; }
    else { __syncthreads(); x[0] = 1; }
}
"#,
    );
    let m = cuda_host::build(&k).expect("builds");
    let mut x = [0i32; 2];
    // SAFETY: the kernel's one argument.
    let e = unsafe { m.launch(0, (1, 1, 1), (32, 1, 1), &[x.as_mut_ptr() as u64]) }
        .expect_err("deadlocks");
    assert!(e.to_string().contains("deadlocked"), "{e}");
}

#[test]
fn compiler_errors_name_the_compiler_and_the_cause() {
    let k = kernel(
        "broken",
        "extern \"C\" __global__ void broken(int* x) { x[0] = undeclared; }\n",
    );
    let e = cuda_host::build(&k).expect_err("does not compile");
    assert!(e.to_string().contains("undeclared"), "{e}");
    let ok = kernel(
        "fine",
        "extern \"C\" __global__ void fine(int* x) { x[0] = 1; }\n",
    );
    let e = cuda_host::build_with(&ok, "/nonexistent/wkvc-c++").expect_err("no compiler");
    let e = e.to_string();
    assert!(
        e.contains("/nonexistent/wkvc-c++") && e.contains("WKVC_CXX"),
        "{e}"
    );
}
