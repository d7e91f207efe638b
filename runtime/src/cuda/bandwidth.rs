//! The int4 GEMV's memory bandwidth on a GPU against a device-to-device copy
//! (`scripts/gpu-check.sh`).

use super::device::{derr, dev_ptr, open_device};
use crate::RuntimeError;
use cudarc::driver::CudaSlice;
use std::time::Instant;
use wkvc_codegen::cuda::{self as cg, GEMV_ROWS};
use wkvc_ir::KernelSpec;
use wkvc_ir::kernel::args::QGemmArgs;

/// Bandwidth of the int4 GEMV kernel (`qgemm` decode, group 128) on an `n` x `k` weight
/// matrix of random codes (copies of it that overflow the L2 cache, one per launch), against
/// a device-to-device copy of 256 MiB or more, on GPU
/// `device`: (GEMV GB/s counting the bytes it reads, copy GB/s counting bytes read and
/// written, bytes per GEMV). Needs NVRTC.
pub fn qgemv_bandwidth(
    device: usize,
    n: usize,
    k: usize,
    iters: usize,
) -> Result<(f64, f64, usize), RuntimeError> {
    let (ctx, stream, arch) = open_device(device)?;
    let spec = KernelSpec::QGemm {
        k,
        parts: vec![n],
        bits: 4,
        group: 128,
        residual: false,
        act: wkvc_ir::Act::F32,
    };
    let kern = cg::emit(&spec)?;
    let c = wkvc_codegen::nvrtc::cubin(&kern.source, "qgemv", arch)?;
    let md = ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(c.image))
        .map_err(|e| derr("loading the kernel", e))?;
    let f = md
        .load_function(&kern.entries[0])
        .map_err(|e| derr("loading the kernel", e))?;
    let ng = k.div_ceil(128);
    let mut seed = 0x9e3779b97f4a7c15u64;
    let codes: Vec<u8> = (0..n * k / 2)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        })
        .collect();
    // f16 0.01 and 8.0
    let s16: Vec<u8> = (0..n * ng).flat_map(|_| 0x211Eu16.to_le_bytes()).collect();
    let z16: Vec<u8> = (0..n * ng).flat_map(|_| 0x4800u16.to_le_bytes()).collect();
    let x: Vec<u8> = (0..k)
        .flat_map(|i| ((i % 7) as f32 * 0.1).to_le_bytes())
        .collect();
    let up = |b: &[u8]| stream.clone_htod(b).map_err(|e| derr("upload", e));
    // copies of the weights that together overflow the L2 cache (each launch reads another)
    let bytes = n * k / 2 + 4 * n * ng + 4 * k;
    let reps = (512usize << 20).div_ceil(bytes).max(2);
    let mut held = Vec::new();
    let mut ptrs = Vec::new();
    for _ in 0..reps {
        let (cb, sb, zb) = (up(&codes)?, up(&s16)?, up(&z16)?);
        ptrs.push((
            dev_ptr(&cb, &stream),
            dev_ptr(&sb, &stream),
            dev_ptr(&zb, &stream),
        ));
        held.push((cb, sb, zb));
    }
    let xb = up(&x)?;
    let yb = stream
        .alloc_zeros::<u8>(4 * n)
        .map_err(|e| derr("alloc", e))?;
    let (px, py) = (dev_ptr(&xb, &stream), dev_ptr(&yb, &stream));
    let run = |times: usize| -> Result<f64, RuntimeError> {
        let t = Instant::now();
        for it in 0..times {
            let (pc, ps, pz) = ptrs[it % reps];
            let a = QGemmArgs {
                x: px,
                m: 1,
                w: pc,
                s: ps,
                z: pz,
                y: py,
                ldy: n as u64,
                n1: n as u64,
                ..Default::default()
            };
            let mut params = [&a as *const QGemmArgs as *mut std::ffi::c_void];
            // SAFETY: the kernel takes its QGemmArgs by value; all buffers are live.
            unsafe {
                cudarc::driver::result::launch_kernel(
                    f.cu_function(),
                    ((n as u32).div_ceil(GEMV_ROWS), 1, 1),
                    (32 * GEMV_ROWS, 1, 1),
                    0,
                    stream.cu_stream(),
                    &mut params,
                )
            }
            .map_err(|e| derr("launch", e))?;
        }
        stream.synchronize().map_err(|e| derr("synchronize", e))?;
        Ok(t.elapsed().as_secs_f64())
    };
    run(3)?;
    let tg = run(iters)?;
    drop(held);
    // the copy: buffers larger than the L2 cache too
    let cbytes = bytes.max(256 << 20);
    let src = stream
        .alloc_zeros::<u8>(cbytes)
        .map_err(|e| derr("alloc", e))?;
    let mut dst = stream
        .alloc_zeros::<u8>(cbytes)
        .map_err(|e| derr("alloc", e))?;
    let copy = |times: usize, dst: &mut CudaSlice<u8>| -> Result<f64, RuntimeError> {
        let t = Instant::now();
        for _ in 0..times {
            stream.memcpy_dtod(&src, dst).map_err(|e| derr("copy", e))?;
        }
        stream.synchronize().map_err(|e| derr("synchronize", e))?;
        Ok(t.elapsed().as_secs_f64())
    };
    copy(3, &mut dst)?;
    let tc = copy(iters, &mut dst)?;
    Ok((
        (bytes * iters) as f64 / tg / 1e9,
        (2 * cbytes * iters) as f64 / tc / 1e9,
        bytes,
    ))
}
