//! Where the CUDA kernels run: a GPU through the driver (one stream), or the CUDA host
//! emulator (host memory for device memory, launches on the calling thread); device buffers,
//! launches with a kernel's argument struct, copies, and graph capture and replay.

use crate::RuntimeError;
use cudarc::driver::{CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, sys};
use std::sync::{Arc, Mutex};
use wkvc_codegen::cuda_host::HostModule;
use wkvc_ir::kernel::args::KernelArgs;

pub(crate) fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Cuda(msg.into())
}

pub(crate) fn derr(what: &str, e: cudarc::driver::DriverError) -> RuntimeError {
    err(format!("{what}: {e:?}"))
}

/// Is there a CUDA driver library to load? (No cudarc call that could panic.)
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its names.
    unsafe { sys::is_culib_present() }
}

/// The context and a stream of its own on GPU `device` (the legacy default stream cannot be
/// captured into a graph), and its compute capability as 10 * major + minor; a clean error
/// without a driver or device.
pub(crate) fn open_device(
    device: usize,
) -> Result<(Arc<CudaContext>, Arc<CudaStream>, u32), RuntimeError> {
    if !driver_present() {
        return Err(err(
            "no NVIDIA driver: libcuda.so.1 was not found (the CUDA engine needs an NVIDIA GPU \
             and its driver; use --engine cpu)",
        ));
    }
    let n = CudaContext::device_count().map_err(|e| derr("cuInit / device count", e))?;
    if device as i32 >= n {
        return Err(err(format!(
            "no CUDA device {device}: the driver reports {n} device(s)"
        )));
    }
    let ctx = CudaContext::new(device).map_err(|e| derr("creating the context", e))?;
    // SAFETY: wkvc uses one stream per context: launches, copies and the frees of dropped
    // buffers are ordered on it, so no cross-stream event tracking is needed.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().map_err(|e| derr("creating a stream", e))?;
    let (maj, min) = ctx
        .compute_capability()
        .map_err(|e| derr("compute capability", e))?;
    Ok((ctx, stream, (10 * maj + min) as u32))
}

/// Host memory standing for device memory in the emulator: zeroed, 256-byte aligned (as
/// cudaMalloc's).
struct HostMem {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: a plain heap allocation; the engine orders every access (one stream).
unsafe impl Send for HostMem {}
unsafe impl Sync for HostMem {}

impl HostMem {
    fn new(n: usize) -> Result<HostMem, RuntimeError> {
        let layout = std::alloc::Layout::from_size_align(n.max(16), 256)
            .map_err(|e| err(format!("host memory of {n} bytes: {e}")))?;
        // SAFETY: a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(err(format!("out of host memory ({n} bytes)")));
        }
        Ok(HostMem { ptr, layout })
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in HostMem::new.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

enum Mem {
    Cuda(CudaSlice<u8>),
    Host(HostMem),
}

/// A device buffer and its address.
pub(crate) struct DevBuf {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    mem: Mem,
}

/// A kernel entry point.
#[derive(Clone)]
pub(crate) enum Func {
    Cuda(CudaFunction),
    Host(Arc<HostModule>, usize),
}

/// A launch recorded by the emulator's graph capture.
pub(crate) struct HostLaunch {
    module: Arc<HostModule>,
    entry: usize,
    grid: (u32, u32, u32),
    block: u32,
    args: Vec<u64>,
}

/// A captured decode step.
pub(crate) enum StepGraph {
    Cuda(CudaGraph),
    Host(Vec<HostLaunch>),
}

/// Where the kernels run: a GPU through the driver (one stream), or the host emulator
/// (launches run on the calling thread, in order; a capture records them).
pub(crate) enum Gpu {
    Cuda {
        // held for the engine's lifetime
        _ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
    },
    Host {
        capture: Mutex<Option<Vec<HostLaunch>>>,
    },
}

impl Gpu {
    /// `n` zeroed bytes.
    pub(crate) fn alloc(&self, n: usize) -> Result<DevBuf, RuntimeError> {
        match self {
            Gpu::Cuda { stream, .. } => {
                let b = stream
                    .alloc_zeros::<u8>(n.max(16))
                    .map_err(|e| derr("allocating device memory", e))?;
                let ptr = dev_ptr(&b, stream);
                Ok(DevBuf {
                    ptr,
                    len: n,
                    mem: Mem::Cuda(b),
                })
            }
            Gpu::Host { .. } => {
                let h = HostMem::new(n)?;
                Ok(DevBuf {
                    ptr: h.ptr as u64,
                    len: n,
                    mem: Mem::Host(h),
                })
            }
        }
    }

    /// A buffer holding `bytes`.
    pub(crate) fn upload(&self, bytes: &[u8]) -> Result<DevBuf, RuntimeError> {
        let mut b = self.alloc(bytes.len())?;
        self.htod(bytes, &mut b)?;
        Ok(b)
    }

    /// Copy `src` to the start of `dst` (ordered on the stream).
    pub(crate) fn htod(&self, src: &[u8], dst: &mut DevBuf) -> Result<(), RuntimeError> {
        if src.len() > dst.len {
            return Err(err(format!(
                "a copy of {} bytes into a buffer of {}",
                src.len(),
                dst.len
            )));
        }
        match (self, &mut dst.mem) {
            (Gpu::Cuda { stream, .. }, Mem::Cuda(d)) => {
                let mut v = d.slice_mut(0..src.len());
                stream
                    .memcpy_htod(src, &mut v)
                    .map_err(|e| derr("copying to the device", e))
            }
            (Gpu::Host { .. }, Mem::Host(h)) => {
                // SAFETY: h holds at least src.len() bytes (checked above).
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), h.ptr, src.len()) };
                Ok(())
            }
            _ => Err(err("a buffer of another device")),
        }
    }

    /// Copy the start of `src` into `dst` and wait for it.
    pub(crate) fn dtoh(&self, src: &DevBuf, dst: &mut [u8]) -> Result<(), RuntimeError> {
        if dst.len() > src.len {
            return Err(err(format!(
                "a copy of {} bytes from a buffer of {}",
                dst.len(),
                src.len
            )));
        }
        match (self, &src.mem) {
            (Gpu::Cuda { stream, .. }, Mem::Cuda(d)) => {
                let v = d.slice(0..dst.len());
                stream
                    .memcpy_dtoh(&v, dst)
                    .map_err(|e| derr("copying from the device", e))?;
                stream.synchronize().map_err(|e| derr("synchronize", e))
            }
            (Gpu::Host { .. }, Mem::Host(h)) => {
                // SAFETY: h holds at least dst.len() bytes (checked above).
                unsafe { std::ptr::copy_nonoverlapping(h.ptr, dst.as_mut_ptr(), dst.len()) };
                Ok(())
            }
            _ => Err(err("a buffer of another device")),
        }
    }

    pub(crate) fn sync(&self) -> Result<(), RuntimeError> {
        match self {
            Gpu::Cuda { stream, .. } => stream.synchronize().map_err(|e| derr("synchronize", e)),
            Gpu::Host { .. } => Ok(()),
        }
    }

    /// Launch `f` on `grid` blocks of `block` threads with its argument struct `args`
    /// (recorded instead while the emulator captures a graph).
    pub(crate) fn launch<A: KernelArgs>(
        &self,
        f: &Func,
        grid: (u32, u32, u32),
        block: u32,
        args: &A,
    ) -> Result<(), RuntimeError> {
        match (self, f) {
            (Gpu::Cuda { stream, .. }, Func::Cuda(f)) => {
                let mut params = [args as *const A as *mut std::ffi::c_void];
                // SAFETY: the kernel takes `A` (its kind's argument struct) by value: params
                // holds a pointer to it, as cuLaunchKernel expects; every pointer in it is a
                // live device allocation of the engine or a session.
                unsafe {
                    cudarc::driver::result::launch_kernel(
                        f.cu_function(),
                        grid,
                        (block, 1, 1),
                        0,
                        stream.cu_stream(),
                        &mut params,
                    )
                }
                .map_err(|e| derr("kernel launch", e))
            }
            (Gpu::Host { capture }, Func::Host(m, entry)) => {
                let l = HostLaunch {
                    module: m.clone(),
                    entry: *entry,
                    grid,
                    block,
                    args: args.words().to_vec(),
                };
                let mut cap = capture.lock().map_err(|_| err("a poisoned capture"))?;
                match cap.as_mut() {
                    Some(rec) => {
                        rec.push(l);
                        Ok(())
                    }
                    None => {
                        drop(cap);
                        host_run(&l)
                    }
                }
            }
            _ => Err(err("a kernel of another device")),
        }
    }

    /// Copy `bytes` bytes from device address `src` to `dst` (ordered on the stream).
    pub(crate) fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<(), RuntimeError> {
        match self {
            Gpu::Cuda { stream, .. } => {
                // SAFETY: both ranges lie in live allocations of the engine (the caller's
                // offsets are within its buffers).
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream())
                }
                .map_err(|e| derr("device copy", e))
            }
            Gpu::Host { .. } => {
                // SAFETY: as above, in host memory standing for device memory.
                unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes) };
                Ok(())
            }
        }
    }

    /// Record the launches of `run` as a graph (None where the driver gives no graph: then
    /// the caller launches directly).
    pub(crate) fn capture(
        &self,
        run: impl FnOnce() -> Result<(), RuntimeError>,
    ) -> Result<Option<StepGraph>, RuntimeError> {
        match self {
            Gpu::Cuda { stream, .. } => {
                stream
                    .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(|e| derr("begin graph capture", e))?;
                let r = run();
                let g = stream
                    .end_capture(sys::CUgraphInstantiate_flags(0))
                    .map_err(|e| derr("end graph capture", e))?;
                r?;
                Ok(g.map(StepGraph::Cuda))
            }
            Gpu::Host { capture } => {
                *capture.lock().map_err(|_| err("a poisoned capture"))? = Some(Vec::new());
                let r = run();
                let rec = capture
                    .lock()
                    .map_err(|_| err("a poisoned capture"))?
                    .take()
                    .unwrap_or_default();
                r?;
                Ok(Some(StepGraph::Host(rec)))
            }
        }
    }

    pub(crate) fn replay(&self, g: &StepGraph) -> Result<(), RuntimeError> {
        match g {
            StepGraph::Cuda(g) => g.launch().map_err(|e| derr("graph launch", e)),
            StepGraph::Host(launches) => launches.iter().try_for_each(host_run),
        }
    }
}

/// Run one launch on the host emulator.
fn host_run(l: &HostLaunch) -> Result<(), RuntimeError> {
    // SAFETY: the words are the kernel's argument struct and every pointer in them is a live
    // host allocation of the engine or a session (HostMem).
    unsafe {
        l.module
            .launch(l.entry, l.grid, (l.block, 1, 1), &l.args)
            .map_err(|e| err(e.to_string()))
    }
}

pub(crate) fn dev_ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

/// The bytes of an f32 slice (for device copies).
pub(crate) fn f32_bytes(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: f32 has no invalid bit patterns and u8 has alignment 1; the length is exact.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, 4 * v.len()) }
}
