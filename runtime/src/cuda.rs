//! The CUDA engine: the lowered graph of a plan run as the CUDA kernels of
//! `wkvc_codegen::cuda`, compiled by NVRTC for the device's architecture when the engine is
//! made (or, without NVRTC, from the PTX the plan records). Weights are uploaded once; a
//! session keeps its activation arena, packed KV cache and attention scratch in device memory;
//! every launch goes to one stream; a one-token step is captured once as a CUDA graph and
//! replayed (the step's token, position and cache length are read from device memory, so the
//! graph does not change); the host synchronises only to read the logits.
//!
//! Without a driver (`libcuda.so.1`) or a device, [`CudaEngine::new`] returns an error before
//! any cudarc call that would panic.
//!
//! [`CudaEngine::emulated`] runs the same engine (kernels, launch geometry, buffers, graph
//! capture and replay) on the CUDA host emulator of `wkvc_codegen::cuda_host`: host memory
//! for device memory, the kernels compiled by the host's C++ compiler. It checks the engine
//! and its kernels without a GPU, slowly; it is not a back end for real work.

use crate::{RuntimeError, plan};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg, sys,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use wkvc_codegen::cuda::{self as cg, GEMV_MAX_M, GEMV_ROWS, TILE_M, TILE_N};
use wkvc_codegen::cuda_host::{self, HostArg, HostModule};
use wkvc_ir::{DType, Graph, KernelSpec, KvCache, KvLayer, Module, Operand, RunMode};
use wkvc_passes::lower::{LowerOptions, MemoryPlan, lower, memplan};

/// Rows per launch (prefill chunks), as the CPU engine.
pub const CHUNK: usize = crate::cpu::CHUNK;

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Invalid(format!("CUDA engine: {}", msg.into()))
}

fn derr(what: &str, e: cudarc::driver::DriverError) -> RuntimeError {
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
fn open_device(device: usize) -> Result<(Arc<CudaContext>, Arc<CudaStream>, u32), RuntimeError> {
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
struct DevBuf {
    ptr: u64,
    len: usize,
    mem: Mem,
}

/// A kernel entry point.
#[derive(Clone)]
enum Func {
    Cuda(CudaFunction),
    Host(Arc<HostModule>, usize),
}

/// A launch recorded by the emulator's graph capture.
struct HostLaunch {
    module: Arc<HostModule>,
    entry: usize,
    grid: (u32, u32, u32),
    block: u32,
    args: Vec<HostArg>,
}

/// A captured decode step.
enum StepGraph {
    Cuda(CudaGraph),
    Host(Vec<HostLaunch>),
}

/// Where the kernels run: a GPU through the driver (one stream), or the host emulator
/// (launches run on the calling thread, in order; a capture records them).
enum Gpu {
    Cuda {
        // held for the engine's lifetime
        _ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
    },
    Host {
        capture: Mutex<Option<Vec<HostLaunch>>>,
    },
}

/// A kernel launch argument.
enum K {
    P(u64),
    I(i32),
    F(f32),
}

impl Gpu {
    /// `n` zeroed bytes.
    fn alloc(&self, n: usize) -> Result<DevBuf, RuntimeError> {
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
    fn upload(&self, bytes: &[u8]) -> Result<DevBuf, RuntimeError> {
        let mut b = self.alloc(bytes.len())?;
        self.htod(bytes, &mut b)?;
        Ok(b)
    }

    /// Copy `src` to the start of `dst` (ordered on the stream).
    fn htod(&self, src: &[u8], dst: &mut DevBuf) -> Result<(), RuntimeError> {
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
    fn dtoh(&self, src: &DevBuf, dst: &mut [u8]) -> Result<(), RuntimeError> {
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

    fn sync(&self) -> Result<(), RuntimeError> {
        match self {
            Gpu::Cuda { stream, .. } => stream.synchronize().map_err(|e| derr("synchronize", e)),
            Gpu::Host { .. } => Ok(()),
        }
    }

    fn launch(
        &self,
        f: &Func,
        grid: (u32, u32, u32),
        block: u32,
        args: &[K],
    ) -> Result<(), RuntimeError> {
        match (self, f) {
            (Gpu::Cuda { stream, .. }, Func::Cuda(f)) => {
                let mut b = stream.launch_builder(f);
                for a in args {
                    match a {
                        K::P(p) => {
                            b.arg(p);
                        }
                        K::I(i) => {
                            b.arg(i);
                        }
                        K::F(x) => {
                            b.arg(x);
                        }
                    }
                }
                let cfg = LaunchConfig {
                    grid_dim: grid,
                    block_dim: (block, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the arguments match the kernel's signature (see wkvc_codegen::cuda)
                // and every pointer is a live device allocation of the engine or the session.
                unsafe { b.launch(cfg) }
                    .map(|_| ())
                    .map_err(|e| derr("kernel launch", e))
            }
            (Gpu::Host { capture }, Func::Host(m, entry)) => {
                let l = HostLaunch {
                    module: m.clone(),
                    entry: *entry,
                    grid,
                    block,
                    args: args
                        .iter()
                        .map(|a| match a {
                            K::P(p) => HostArg::Ptr(*p),
                            K::I(i) => HostArg::I32(*i),
                            K::F(x) => HostArg::F32(*x),
                        })
                        .collect(),
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

    /// Record the launches of `run` as a graph (None where the driver gives no graph: then
    /// the caller launches directly).
    fn capture(
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

    fn replay(&self, g: &StepGraph) -> Result<(), RuntimeError> {
        match g {
            StepGraph::Cuda(g) => g.launch().map_err(|e| derr("graph launch", e)),
            StepGraph::Host(launches) => launches.iter().try_for_each(host_run),
        }
    }
}

/// Run one launch on the host emulator.
fn host_run(l: &HostLaunch) -> Result<(), RuntimeError> {
    // SAFETY: the arguments match the kernel's signature (see wkvc_codegen::cuda) and every
    // pointer is a live host allocation of the engine or the session (HostMem).
    unsafe {
        l.module
            .launch(l.entry, l.grid, (l.block, 1, 1), &l.args)
            .map_err(|e| err(e.to_string()))
    }
}

#[derive(Clone, Copy)]
enum Arg {
    /// byte offset in the arena
    Buf(usize),
    Tokens,
    Positions,
    /// device pointer (0 for an absent param)
    Param(u64),
}

struct Step {
    spec: KernelSpec,
    f: Vec<Func>,
    args: Vec<Arg>,
    /// byte offset of the output in the arena
    out: usize,
    /// RoPE: device pointer of the inv_freq table
    inv: u64,
    /// GEMMs: the parts' weights side by side (codes or f32 rows, f16 scales, f16 zeros)
    wcat: [u64; 3],
    /// entry point names (as `f`)
    entries: Vec<String>,
    /// RMSNorm or SiLU-mul whose only reader is the next step, a GEMM with a fused GEMV
    /// (`_gemv_rms` / `_gemv_silu`): not launched when that GEMM runs as a GEMV
    fuse_next: bool,
}

impl Step {
    fn entry(&self, suffix: &str) -> Option<&Func> {
        self.entries
            .iter()
            .position(|e| e.ends_with(suffix))
            .map(|i| &self.f[i])
    }
}

/// Builds a kernel's entry points for the engine's device.
type LoadFn<'a> = dyn Fn(&cg::CudaKernel, &KernelSpec) -> Result<Vec<Func>, RuntimeError> + 'a;

/// The compiled CUDA engine of a plan.
pub struct CudaEngine {
    gpu: Gpu,
    steps: Vec<Step>,
    plan: MemoryPlan,
    vocab: usize,
    _bufs: Vec<DevBuf>,
    pub device_name: String,
    /// compute capability as 10 * major + minor (0 on the host emulator)
    pub arch: u32,
    /// milliseconds spent compiling (NVRTC) and loading the kernels and uploading weights
    pub load_ms: f64,
    /// distinct kernel modules
    pub kernels: usize,
    /// how the kernels were built: "cubin sm_XX (NVRTC a.b)", "plan PTX" or "host emulator"
    pub code: String,
    /// prefill's quantized GEMMs on tensor cores
    pub mma: bool,
    lowered: Graph,
}

impl CudaEngine {
    /// Lower the module, build its kernels for device `device` and upload the weights. The
    /// plan's recorded CUDA code (`cuda`) is used when NVRTC is not available.
    pub fn new(
        module: &Module,
        device: usize,
        mma: bool,
        cuda: Option<&plan::CudaPlan>,
    ) -> Result<CudaEngine, RuntimeError> {
        let t0 = Instant::now();
        let (ctx, stream, arch) = open_device(device)?;
        let device_name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let nvrtc = wkvc_codegen::nvrtc::locate().is_ok();
        if !nvrtc && cuda.is_none() {
            return Err(err(
                "neither NVRTC nor CUDA code in the plan: install NVRTC (scripts/fetch-nvrtc.sh) \
                 or compile the plan with --target cpu,cuda",
            ));
        }
        let code = if nvrtc {
            let (a, b) = wkvc_codegen::nvrtc::version().map_err(|e| err(e.to_string()))?;
            format!("cubin sm_{arch} (NVRTC {a}.{b})")
        } else {
            "plan PTX".to_string()
        };
        let load = |k: &cg::CudaKernel, spec: &KernelSpec| -> Result<Vec<Func>, RuntimeError> {
            let ptx = if nvrtc {
                let c = wkvc_codegen::nvrtc::cubin(&k.source, &spec.code_name(), arch)
                    .map_err(|e| err(e.to_string()))?;
                cudarc::nvrtc::Ptx::from_binary(c.image)
            } else {
                let key = plan::sha256_hex(&k.source);
                let m = cuda
                    .and_then(|c| c.kernels.iter().find(|m| m.sha256 == key))
                    .ok_or_else(|| {
                        err(format!(
                            "{}: the plan's CUDA code does not have this kernel (recompile the \
                             plan with this wkvc, or install NVRTC)",
                            spec.code_name()
                        ))
                    })?;
                cudarc::nvrtc::Ptx::from_src(m.ptx.clone())
            };
            let md = ctx
                .load_module(ptx)
                .map_err(|e| derr(&format!("loading {}", spec.code_name()), e))?;
            k.entries
                .iter()
                .map(|e| md.load_function(e).map(Func::Cuda).map_err(|x| derr(e, x)))
                .collect()
        };
        let gpu = Gpu::Cuda {
            _ctx: ctx.clone(),
            stream: stream.clone(),
        };
        Self::build(module, gpu, mma, &load, device_name, arch, code, t0)
    }

    /// The same engine on the CUDA host emulator (`wkvc_codegen::cuda_host`): host memory
    /// for device memory, each kernel module built by the host's C++ compiler. For checking
    /// the engine and its kernels without a GPU; slow.
    pub fn emulated(module: &Module, mma: bool) -> Result<CudaEngine, RuntimeError> {
        let t0 = Instant::now();
        let load = |k: &cg::CudaKernel, _: &KernelSpec| -> Result<Vec<Func>, RuntimeError> {
            let m = Arc::new(cuda_host::build(k).map_err(|e| err(e.to_string()))?);
            Ok((0..k.entries.len())
                .map(|i| Func::Host(m.clone(), i))
                .collect())
        };
        let gpu = Gpu::Host {
            capture: Mutex::new(None),
        };
        Self::build(
            module,
            gpu,
            mma,
            &load,
            "CUDA host emulator".into(),
            0,
            "kernels built by the host's C++ compiler".into(),
            t0,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        module: &Module,
        gpu: Gpu,
        mma: bool,
        load: &LoadFn,
        device_name: String,
        arch: u32,
        code: String,
        t0: Instant,
    ) -> Result<CudaEngine, RuntimeError> {
        let lowered = lower(&module.graph, LowerOptions::default())
            .map_err(|e| err(format!("lowering: {e}")))?;
        let pb = |p: &str| module.weights.get(p).map(|w| w.size()).unwrap_or((0, 0));
        let plan =
            memplan(&lowered, CHUNK, 1, 1, &pb).map_err(|e| err(format!("memory plan: {e}")))?;
        let mut modules: HashMap<String, Vec<Func>> = HashMap::new();
        let mut bufs: Vec<DevBuf> = Vec::new();
        let mut params: HashMap<String, u64> = HashMap::new();
        let upload = |bytes: &[u8], bufs: &mut Vec<DevBuf>| -> Result<u64, RuntimeError> {
            let b = gpu.upload(bytes)?;
            let p = b.ptr;
            bufs.push(b);
            Ok(p)
        };
        let mut steps = Vec::new();
        let mut vocab = 0;
        for n in &lowered.nodes {
            let spec = KernelSpec::from_node(n).map_err(err)?;
            let k = cg::emit(&spec).map_err(|e| err(e.to_string()))?;
            let key = plan::sha256_hex(&k.source);
            let f = match modules.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let fs = load(&k, &spec)?;
                    modules.insert(key, fs.clone());
                    fs
                }
            };
            // the weight arguments of a GEMM's parts (codes, scale, zero per part, or the f32
            // rows), gathered into `cat`
            let (quant, per, nparts) = match &spec {
                KernelSpec::QGemm { parts, .. } => (true, 3, parts.len()),
                KernelSpec::Gemm { parts, .. } => (false, 1, parts.len()),
                _ => (false, 1, 0),
            };
            let wargs = 1..1 + per * nparts;
            let mut cat: [Vec<u8>; 3] = Default::default();
            let mut args = Vec::new();
            for (ai, a) in n.args.iter().enumerate() {
                args.push(match a {
                    Operand::Value(v) => {
                        if let Some(i) = lowered.inputs.iter().find(|i| i.value == *v) {
                            match i.name.as_str() {
                                "tokens" => Arg::Tokens,
                                "positions" => Arg::Positions,
                                other => {
                                    return Err(err(format!("unknown graph input \"{other}\"")));
                                }
                            }
                        } else {
                            let (off, _) = plan
                                .buffers
                                .get(&v.0)
                                .ok_or_else(|| err(format!("{v} has no buffer")))?;
                            Arg::Buf(*off)
                        }
                    }
                    Operand::Param(p) if wargs.contains(&ai) => {
                        let w = module
                            .weights
                            .get(p)
                            .ok_or_else(|| err(format!("param @{p} is not in the weight store")))?;
                        let slot = (ai - 1) % per;
                        if !quant {
                            let f = w.f32();
                            cat[0].extend(f.iter().flat_map(|v| v.to_le_bytes()));
                        } else if (slot == 0 && w.dtype() == DType::U4)
                            || (slot > 0 && w.storage_dtype() == DType::F16)
                        {
                            // codes as stored; scale/zero as f16
                            cat[slot].extend_from_slice(&w.bytes());
                        } else {
                            return Err(err(format!(
                                "@{p}: the CUDA kernels read packed 4-bit codes with f16 scales \
                                 and zeros, found {:?} (recompile without --f32-params)",
                                w.storage_dtype()
                            )));
                        }
                        Arg::Param(0)
                    }
                    Operand::Param(p) => {
                        if let Some(d) = params.get(p) {
                            Arg::Param(*d)
                        } else {
                            let w = module.weights.get(p).ok_or_else(|| {
                                err(format!("param @{p} is not in the weight store"))
                            })?;
                            let f = w.f32();
                            let b: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
                            let d = upload(&b, &mut bufs)?;
                            params.insert(p.clone(), d);
                            Arg::Param(d)
                        }
                    }
                });
            }
            // a GEMM's parts are rows of one matrix: uploaded side by side, one launch for all
            let mut wcat = [0u64; 3];
            for (i, c) in cat.iter().enumerate() {
                if !c.is_empty() {
                    wcat[i] = upload(c, &mut bufs)?;
                }
            }
            let mut inv = 0;
            if let KernelSpec::RopeKv {
                rope_dim, factors, ..
            } = &spec
            {
                let fac = if *factors {
                    match &n.args[2] {
                        Operand::Param(p) => module.weights.get(p).map(|w| w.f32().into_owned()),
                        _ => None,
                    }
                } else {
                    None
                };
                let t = wkvc_ir::interp::rope_inv_freq(n, *rope_dim, fac.as_deref());
                let b: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
                inv = upload(&b, &mut bufs)?;
            }
            if let KernelSpec::Logits { vocab: v, .. } = &spec {
                vocab = *v;
            }
            let out = plan.buffers.get(&n.out.0).map(|b| b.0).unwrap_or(0);
            steps.push(Step {
                spec,
                f,
                args,
                out,
                inv,
                wcat,
                entries: k.entries.clone(),
                fuse_next: false,
            });
        }
        if vocab == 0 {
            return Err(err("the lowered graph has no logits kernel"));
        }
        // decode GEMVs fused with the RMSNorm or SiLU-mul before them: where the next node is
        // the only reader of its value
        for i in 0..steps.len().saturating_sub(1) {
            let (a, b) = (&lowered.nodes[i], &lowered.nodes[i + 1]);
            let suffix = match steps[i].spec {
                KernelSpec::RmsNorm { .. } => "_gemv_rms",
                KernelSpec::SiluMul { .. } => "_gemv_silu",
                _ => continue,
            };
            let reads = |n: &wkvc_ir::Node| {
                n.args
                    .iter()
                    .filter(|x| matches!(x, Operand::Value(v) if *v == a.out))
                    .count()
            };
            let readers: usize = lowered.nodes.iter().map(reads).sum();
            let output = lowered.outputs.iter().any(|o| o.value == a.out);
            if matches!(b.args.first(), Some(Operand::Value(v)) if *v == a.out)
                && readers == 1
                && !output
                && steps[i + 1].entry(suffix).is_some()
            {
                steps[i].fuse_next = true;
            }
        }
        gpu.sync()?;
        Ok(CudaEngine {
            kernels: modules.len(),
            gpu,
            steps,
            plan,
            vocab,
            _bufs: bufs,
            device_name,
            arch,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            code,
            mma,
            lowered,
        })
    }

    pub fn lowered(&self) -> &Graph {
        &self.lowered
    }

    /// A session with a KV cache of `max_ctx` tokens (device memory is allocated at its
    /// first run, so that a failure is an error there).
    pub fn session(&self, max_ctx: usize) -> CudaSession<'_> {
        CudaSession {
            engine: self,
            dev: None,
            len: 0,
            max_ctx,
            logits: vec![0f32; self.vocab],
        }
    }

    /// KV cache bytes per token (all layers, K and V; the same layout as the CPU engine's).
    fn kv_bytes_per_token(&self) -> usize {
        self.plan.kv_bytes_per_token
    }

    fn alloc_session(&self, max_ctx: usize) -> Result<Dev, RuntimeError> {
        let alloc = |n: usize| self.gpu.alloc(n);
        // attention splits: enough blocks to fill the GPU at long contexts
        let splits = max_ctx.div_ceil(256).clamp(1, 32);
        let mut layers = HashMap::new();
        let mut kv = Vec::new();
        let mut part = 0usize;
        for st in &self.steps {
            if let KernelSpec::Attention {
                heads,
                kv_heads,
                head_dim,
                kv_bits,
                layer,
                ..
            } = &st.spec
            {
                let w = kv_heads * head_dim;
                let (c, p) = if *kv_bits == 16 {
                    (0, max_ctx * w * 4)
                } else {
                    (max_ctx * w.div_ceil(2), max_ctx * kv_heads * 2 * 4)
                };
                let b = [alloc(c)?, alloc(p)?, alloc(c)?, alloc(p)?];
                layers.insert(*layer, [0, 1, 2, 3].map(|i| b[i].ptr));
                kv.push(DevKv {
                    layer: *layer,
                    width: w,
                    heads: *kv_heads,
                    quantized: *kv_bits != 16,
                    bufs: b,
                });
                part = part.max(CHUNK * kv_heads * splits * (heads / kv_heads) * (head_dim + 2));
            }
        }
        let arena = alloc(self.plan.arena_bytes)?;
        let part_b = alloc(4 * part)?;
        Ok(Dev {
            p_arena: arena.ptr,
            p_part: part_b.ptr,
            logits_b: alloc(4 * CHUNK * self.vocab)?,
            _bufs: vec![arena, part_b],
            ids_b: alloc(4 * CHUNK)?,
            pos_b: alloc(4 * CHUNK)?,
            state_b: alloc(16)?,
            layers,
            kv,
            splits: splits as u32,
            graph: None,
        })
    }

    /// Is step `si` (a norm or SiLU-mul) done by the GEMV after it in a call of `m` rows?
    fn fused_away(&self, si: usize, m: usize, whole: bool) -> bool {
        self.steps[si].fuse_next
            && self
                .steps
                .get(si + 1)
                .is_some_and(|b| runs_gemv(&b.spec, m, whole))
    }

    /// Kernel launches of a call of `m` rows (logits of the last row): the lowered graph's
    /// kernels, two for attention (split and merge), less the norms and SiLU-muls fused into
    /// the GEMVs after them.
    pub fn launches(&self, m: usize) -> usize {
        (0..self.steps.len())
            .filter(|&si| !self.fused_away(si, m, false))
            .map(|si| match self.steps[si].spec {
                KernelSpec::Attention { .. } => 2,
                _ => 1,
            })
            .sum()
    }

    /// Is the engine on the CUDA host emulator rather than a GPU?
    pub fn is_emulated(&self) -> bool {
        matches!(self.gpu, Gpu::Host { .. })
    }
}

/// One sequence on the CUDA engine.
pub struct CudaSession<'e> {
    engine: &'e CudaEngine,
    dev: Option<Dev>,
    len: usize,
    max_ctx: usize,
    logits: Vec<f32>,
}

/// One layer's KV cache in device memory: K codes, K (scale, zero) pairs, V codes, V pairs
/// (f32 rows in the params buffers for a 16-bit cache), the CPU engine's layout.
struct DevKv {
    layer: i64,
    width: usize,
    heads: usize,
    quantized: bool,
    bufs: [DevBuf; 4],
}

/// A session's device memory.
struct Dev {
    logits_b: DevBuf,
    _bufs: Vec<DevBuf>,
    ids_b: DevBuf,
    pos_b: DevBuf,
    state_b: DevBuf,
    p_arena: u64,
    p_part: u64,
    /// per layer: K codes, K params, V codes, V params
    layers: HashMap<i64, [u64; 4]>,
    kv: Vec<DevKv>,
    splits: u32,
    graph: Option<StepGraph>,
}

impl CudaSession<'_> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_ctx(&self) -> usize {
        self.max_ctx
    }

    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Bytes the KV cache holds now.
    pub fn kv_bytes(&self) -> usize {
        self.len * self.engine.kv_bytes_per_token()
    }

    /// The cache's contents in the interpreter's form (copied from the device).
    pub fn kv_cache(&self) -> Result<KvCache, RuntimeError> {
        let n = self.len;
        let mut layers = BTreeMap::new();
        let gpu = &self.engine.gpu;
        for d in self.dev.iter().flat_map(|d| &d.kv) {
            let f32s = |b: &DevBuf, count: usize| -> Result<Vec<f32>, RuntimeError> {
                let mut raw = vec![0u8; 4 * count];
                gpu.dtoh(b, &mut raw)?;
                Ok(raw
                    .chunks(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            };
            let l = if d.quantized {
                let rb = d.width.div_ceil(2);
                let codes = |b: &DevBuf| -> Result<Vec<u8>, RuntimeError> {
                    let mut v = vec![0u8; n * rb];
                    gpu.dtoh(b, &mut v)?;
                    Ok(v)
                };
                let pairs = |b: &DevBuf| -> Result<Vec<(f32, f32)>, RuntimeError> {
                    Ok(f32s(b, 2 * n * d.heads)?
                        .chunks(2)
                        .map(|c| (c[0], c[1]))
                        .collect())
                };
                KvLayer {
                    width: d.width,
                    heads: d.heads,
                    row_bytes: rb,
                    kc: codes(&d.bufs[0])?,
                    kp: pairs(&d.bufs[1])?,
                    vc: codes(&d.bufs[2])?,
                    vp: pairs(&d.bufs[3])?,
                    param_bytes: 2,
                    ..Default::default()
                }
            } else {
                KvLayer {
                    width: d.width,
                    heads: d.heads,
                    k: f32s(&d.bufs[1], n * d.width)?,
                    v: f32s(&d.bufs[3], n * d.width)?,
                    ..Default::default()
                }
            };
            layers.insert(d.layer, l);
        }
        Ok(KvCache::from_layers(self.max_ctx, n, layers)?)
    }

    /// Replace the cache's contents by `cache`'s (exported by any engine of the same plan).
    pub fn load_kv(&mut self, cache: &KvCache) -> Result<(), RuntimeError> {
        let n = cache.len();
        if n > self.max_ctx {
            return Err(err(format!(
                "a cache of {n} tokens does not fit this session's context of {}",
                self.max_ctx
            )));
        }
        if self.dev.is_none() {
            self.dev = Some(self.engine.alloc_session(self.max_ctx)?);
        }
        let Some(dev) = self.dev.as_mut() else {
            return Err(err("no device memory"));
        };
        let fits = |d: &DevKv, l: &KvLayer| {
            l.width == d.width
                && l.heads == d.heads
                && l.rows() == n
                && l.is_quantized() == d.quantized
                && (!d.quantized || l.row_bytes == d.width.div_ceil(2))
        };
        if let Some(d) = dev
            .kv
            .iter()
            .find(|d| !cache.layer(d.layer).is_some_and(|l| fits(d, l)))
        {
            return Err(err(format!(
                "the cache has no layer {} of this plan's shape with {n} rows",
                d.layer
            )));
        }
        let gpu = &self.engine.gpu;
        let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let pairs = |p: &[(f32, f32)]| -> Vec<u8> {
            p.iter()
                .flat_map(|&(s, z)| [s.to_le_bytes(), z.to_le_bytes()])
                .flatten()
                .collect()
        };
        for d in dev.kv.iter_mut() {
            let Some(l) = cache.layer(d.layer) else {
                continue;
            };
            let [kc, kp, vc, vp] = &mut d.bufs;
            if d.quantized {
                gpu.htod(&l.kc, kc)?;
                gpu.htod(&pairs(&l.kp), kp)?;
                gpu.htod(&l.vc, vc)?;
                gpu.htod(&pairs(&l.vp), vp)?;
            } else {
                gpu.htod(&bytes(&l.k), kp)?;
                gpu.htod(&bytes(&l.v), vp)?;
            }
        }
        gpu.sync()?;
        self.len = n;
        Ok(())
    }

    /// Run `ids` after the cache; the last row's logits (all rows appended to `all` when
    /// given). Bad ids and context overflow are errors that leave the session unchanged.
    pub fn run(
        &mut self,
        ids: &[u32],
        mode: RunMode,
        mut all: Option<&mut Vec<f32>>,
    ) -> Result<&[f32], RuntimeError> {
        crate::check_run(ids, self.engine.vocab, self.len, self.max_ctx)?;
        if self.dev.is_none() {
            self.dev = Some(self.engine.alloc_session(self.max_ctx)?);
        }
        for c in ids.chunks(CHUNK) {
            self.chunk(c, mode, all.as_deref_mut())?;
        }
        Ok(&self.logits)
    }

    fn chunk(
        &mut self,
        ids: &[u32],
        mode: RunMode,
        all: Option<&mut Vec<f32>>,
    ) -> Result<(), RuntimeError> {
        let eng = self.engine;
        let d = self
            .dev
            .as_mut()
            .ok_or_else(|| err("session memory is not allocated"))?;
        let gpu = &eng.gpu;
        let m = ids.len();
        let tok: Vec<u8> = ids.iter().flat_map(|&t| (t as i32).to_le_bytes()).collect();
        let pos: Vec<u8> = (0..m)
            .flat_map(|i| ((self.len + i) as i32).to_le_bytes())
            .collect();
        let st = (self.len as i32).to_le_bytes();
        gpu.htod(&tok, &mut d.ids_b)?;
        gpu.htod(&pos, &mut d.pos_b)?;
        gpu.htod(&st, &mut d.state_b)?;
        let whole = all.is_some();
        if m == 1 && !whole {
            // one token: the captured graph (the same launches every step; for one row the
            // prefill and decode-equivalent protocols see the same tokens)
            if d.graph.is_none() {
                let g = gpu.capture(|| launch_all(eng, d, 1, mode, false))?;
                d.graph = g;
            }
            match &d.graph {
                Some(g) => gpu.replay(g)?,
                None => launch_all(eng, d, 1, mode, false)?,
            }
        } else {
            launch_all(eng, d, m, mode, whole)?;
        }
        let v = eng.vocab;
        match all {
            Some(a) => {
                let start = a.len();
                a.resize(start + m * v, 0.0);
                gpu.dtoh(&d.logits_b, f32_bytes(&mut a[start..]))?;
                self.logits.copy_from_slice(&a[start + (m - 1) * v..]);
            }
            None => {
                // the last row only, into the session's buffer (no allocation per step)
                gpu.dtoh(&d.logits_b, f32_bytes(&mut self.logits))?;
            }
        }
        self.len += m;
        Ok(())
    }
}

/// Every kernel of the lowered graph for `m` rows (logits of all rows when `whole`, else of
/// the last one).
fn launch_all(
    eng: &CudaEngine,
    d: &Dev,
    m: usize,
    mode: RunMode,
    whole: bool,
) -> Result<(), RuntimeError> {
    {
        let mi = m as i32;
        let buf = |o: usize| d.p_arena + o as u64;
        let ptr = |st: &Step, i: usize| -> u64 {
            match st.args.get(i) {
                Some(Arg::Buf(o)) => buf(*o),
                Some(Arg::Tokens) => d.ids_b.ptr,
                Some(Arg::Positions) => d.pos_b.ptr,
                Some(Arg::Param(d)) => *d,
                None => 0,
            }
        };
        let gemv = |spec: &KernelSpec| runs_gemv(spec, m, whole);
        for (si, st) in eng.steps.iter().enumerate() {
            let p = |i: usize| ptr(st, i);
            if eng.fused_away(si, m, whole) {
                continue;
            }
            // this GEMV does the step before it: its input replaces x, plus its arguments
            let pro = si
                .checked_sub(1)
                .map(|j| &eng.steps[j])
                .filter(|a| a.fuse_next && gemv(&st.spec))
                .map(|a| match a.spec {
                    KernelSpec::RmsNorm { eps, .. } => (
                        "_gemv_rms",
                        ptr(a, 0),
                        vec![K::P(ptr(a, 1)), K::F(eps as f32)],
                    ),
                    _ => ("_gemv_silu", ptr(a, 0), vec![]),
                });
            let x0 = pro.as_ref().map_or(p(0), |f| f.1);
            let y = buf(st.out);
            let f = &st.f;
            match &st.spec {
                KernelSpec::Embed { .. } => eng.gpu.launch(
                    &f[0],
                    (m as u32, 1, 1),
                    128,
                    &[K::P(p(0)), K::P(p(1)), K::P(y), K::I(mi)],
                )?,
                KernelSpec::RmsNorm { .. } => eng.gpu.launch(
                    &f[0],
                    (m as u32, 1, 1),
                    cg::BLOCK,
                    &[K::P(p(0)), K::P(p(1)), K::P(y), K::I(mi)],
                )?,
                KernelSpec::SiluMul { n } => eng.gpu.launch(
                    &f[0],
                    (((m * n) as u32).div_ceil(256), 1, 1),
                    256,
                    &[K::P(p(0)), K::P(y), K::I(mi)],
                )?,
                KernelSpec::QGemm {
                    parts, residual, ..
                }
                | KernelSpec::Gemm {
                    parts, residual, ..
                } => {
                    // all parts in one launch: their rows are side by side in st.wcat
                    let per = if matches!(st.spec, KernelSpec::QGemm { .. }) {
                        3
                    } else {
                        1
                    };
                    let ntot: usize = parts.iter().sum();
                    let r = if *residual {
                        p(1 + per * parts.len())
                    } else {
                        0
                    };
                    let args = [
                        K::P(x0),
                        K::I(mi),
                        K::P(st.wcat[0]),
                        K::P(st.wcat[1]),
                        K::P(st.wcat[2]),
                        K::P(y),
                        K::I(ntot as i32),
                        K::I(ntot as i32),
                        K::P(r),
                        K::I(ntot as i32),
                    ];
                    gemm(eng, st, m, ntot, args, pro)?;
                }
                KernelSpec::Logits { vocab, dim, .. } => {
                    let (x, rows) = if whole {
                        (x0, m)
                    } else {
                        (x0 + 4 * ((m - 1) * dim) as u64, 1)
                    };
                    let args = [
                        K::P(x),
                        K::I(rows as i32),
                        K::P(p(1)),
                        K::P(0),
                        K::P(0),
                        K::P(d.logits_b.ptr),
                        K::I(*vocab as i32),
                        K::I(*vocab as i32),
                        K::P(0),
                        K::I(0),
                    ];
                    gemm(eng, st, rows, *vocab, args, pro)?;
                }
                KernelSpec::RopeKv { layer, smooth, .. } => {
                    let kv = d
                        .layers
                        .get(layer)
                        .ok_or_else(|| err(format!("no cache for layer {layer}")))?;
                    let na = st.args.len();
                    let sm = if *smooth {
                        [p(na - 4), p(na - 3), p(na - 2), p(na - 1)]
                    } else {
                        [0; 4]
                    };
                    eng.gpu.launch(
                        &f[0],
                        (m as u32, 1, 1),
                        128,
                        &[
                            K::P(p(0)),
                            K::I(mi),
                            K::P(d.pos_b.ptr),
                            K::P(st.inv),
                            K::P(kv[0]),
                            K::P(kv[1]),
                            K::P(kv[2]),
                            K::P(kv[3]),
                            K::P(d.state_b.ptr),
                            K::P(sm[0]),
                            K::P(sm[1]),
                            K::P(sm[2]),
                            K::P(sm[3]),
                        ],
                    )?
                }
                KernelSpec::Attention {
                    heads,
                    kv_heads,
                    head_dim,
                    smooth,
                    layer,
                    ..
                } => {
                    let kv = d
                        .layers
                        .get(layer)
                        .ok_or_else(|| err(format!("no cache for layer {layer}")))?;
                    let sm = if *smooth {
                        [p(1), p(2), p(3), p(4)]
                    } else {
                        [0; 4]
                    };
                    let decode = i32::from(mode == RunMode::DecodeEquivalent);
                    eng.gpu.launch(
                        &f[0],
                        (d.splits, *kv_heads as u32, m as u32),
                        cg::ATTN_TILE,
                        &[
                            K::P(p(0)),
                            K::I(mi),
                            K::P(kv[0]),
                            K::P(kv[1]),
                            K::P(kv[2]),
                            K::P(kv[3]),
                            K::P(d.state_b.ptr),
                            K::I(decode),
                            K::P(sm[0]),
                            K::P(sm[1]),
                            K::P(sm[2]),
                            K::P(sm[3]),
                            K::P(d.p_part),
                            K::I(d.splits as i32),
                        ],
                    )?;
                    eng.gpu.launch(
                        &f[1],
                        (*heads as u32, m as u32, 1),
                        *head_dim as u32,
                        &[K::P(d.p_part), K::I(d.splits as i32), K::P(y), K::I(mi)],
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn dev_ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

/// Does a GEMM step of a call of `m` rows run as a GEMV (logits: of all rows when `whole`, else
/// of the last)? (Other kinds: no.)
fn runs_gemv(spec: &KernelSpec, m: usize, whole: bool) -> bool {
    let rows = match spec {
        KernelSpec::QGemm { .. } | KernelSpec::Gemm { .. } => m,
        KernelSpec::Logits { .. } if !whole => 1,
        KernelSpec::Logits { .. } => m,
        _ => return false,
    };
    rows <= GEMV_MAX_M as usize
}

/// The bytes of an f32 slice (for device copies).
fn f32_bytes(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: f32 has no invalid bit patterns and u8 has alignment 1; the length is exact.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, 4 * v.len()) }
}

/// A GEMM of `m` rows and `n` outputs: the GEMV kernel for a few rows, else the tiled one
/// (or the tensor-core one, where the engine asks for it and the kernel has it).
fn gemm(
    eng: &CudaEngine,
    st: &Step,
    m: usize,
    n: usize,
    args: [K; 10],
    pro: Option<(&str, u64, Vec<K>)>,
) -> Result<(), RuntimeError> {
    let entry = |suffix: &str| {
        st.entry(suffix)
            .ok_or_else(|| err(format!("{}: no entry point *{suffix}", st.spec.code_name())))
    };
    if m as u32 <= GEMV_MAX_M {
        let (suffix, extra) = pro.map_or(("_gemv", vec![]), |p| (p.0, p.2));
        let mut a = Vec::from(args);
        a.extend(extra);
        eng.gpu.launch(
            entry(suffix)?,
            ((n as u32).div_ceil(GEMV_ROWS), 1, 1),
            32 * GEMV_ROWS,
            &a,
        )
    } else if let Some(f) = st.entry("_mma").filter(|_| eng.mma) {
        eng.gpu.launch(
            f,
            (
                (n as u32).div_ceil(cg::MMA_N),
                (m as u32).div_ceil(cg::MMA_M),
                1,
            ),
            128,
            &args,
        )
    } else {
        eng.gpu.launch(
            entry("_tiled")?,
            ((n as u32).div_ceil(TILE_N), (m as u32).div_ceil(TILE_M), 1),
            256,
            &args,
        )
    }
}

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
    let kern = cg::emit(&spec).map_err(|e| err(e.to_string()))?;
    let c =
        wkvc_codegen::nvrtc::cubin(&kern.source, "qgemv", arch).map_err(|e| err(e.to_string()))?;
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
            let mut b = stream.launch_builder(&f);
            let (m1, ni, zero) = (1i32, n as i32, 0u64);
            b.arg(&px)
                .arg(&m1)
                .arg(&pc)
                .arg(&ps)
                .arg(&pz)
                .arg(&py)
                .arg(&ni)
                .arg(&ni);
            b.arg(&zero).arg(&ni);
            let cfg = LaunchConfig {
                grid_dim: ((n as u32).div_ceil(GEMV_ROWS), 1, 1),
                block_dim: (32 * GEMV_ROWS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments as the kernel's signature; all buffers are live.
            unsafe { b.launch(cfg) }.map_err(|e| derr("launch", e))?;
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
