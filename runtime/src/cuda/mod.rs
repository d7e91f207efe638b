//! The CUDA engine: the lowered plan run as the CUDA kernels of `wkvc_codegen::cuda`,
//! compiled by NVRTC for the device's architecture when the engine is made (or, without NVRTC,
//! from the PTX the plan records). Weights are uploaded once; the engine keeps one workspace
//! in device memory (activation arena, attention partials, the round's tokens, positions and
//! cache lengths, logits) that calls take turns on; a session keeps its packed KV cache in
//! device memory. Every launch goes to one stream with its kind's argument struct. A session's
//! one-token step is captured once as a CUDA graph and replayed (the token, position and cache
//! length are read from device memory, so the graph does not change); the host synchronises
//! only to read the logits.
//!
//! Without a driver (`libcuda.so.1`) or a device, [`CudaEngine::new`] returns an error before
//! any cudarc call that would panic.
//!
//! [`CudaEngine::emulated`] runs the same engine (kernels, launch geometry, buffers, graph
//! capture and replay) on the CUDA host emulator of `wkvc_codegen::cuda_host`: host memory for
//! device memory, the kernels compiled by the host's C++ compiler. It checks the engine and
//! its kernels without a GPU, slowly; it is not a back end for real work.

mod bandwidth;
mod device;
mod launch;

pub use bandwidth::qgemv_bandwidth;
pub use device::driver_present;

use crate::engine::EngineOptions;
use crate::{Model, RuntimeError, plan};
use device::{DevBuf, Func, Gpu, StepGraph, err, open_device};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use wkvc_codegen::cuda::{self as cg};
use wkvc_ir::{Act, DType, KernelSpec, KvCache, KvLayer};
use wkvc_passes::lower::{CHUNK, LoweredPlan, MemoryPlan, StepOperand};

/// Most attention splits of a call (context tokens shared among blocks).
const SPLITS_MAX: usize = 32;

/// An operand bound to device memory.
#[derive(Clone, Copy)]
enum Bound {
    /// byte offset in the arena
    Buf(usize),
    Tokens,
    Positions,
    /// device pointer
    Param(u64),
}

struct CudaStep {
    spec: KernelSpec,
    f: Vec<Func>,
    /// entry point names (as `f`)
    entries: Vec<String>,
    operands: Vec<Bound>,
    /// byte offset of the output in the arena
    out: usize,
    /// RoPE: device pointer of the inv_freq table
    inv: u64,
    /// GEMMs: the parts' weights side by side (codes or f32 rows, f16 scales, f16 zeros)
    wcat: [u64; 3],
    /// RMSNorm or SiLU-mul whose only reader is the next step, a GEMM with a fused GEMV
    /// (`_gemv_rms` / `_gemv_silu`): not launched when that GEMM runs as a GEMV
    fuse_next: bool,
}

impl CudaStep {
    fn entry(&self, suffix: &str) -> Option<&Func> {
        self.entries
            .iter()
            .position(|e| e.ends_with(suffix))
            .map(|i| &self.f[i])
    }
}

/// The device memory calls work in.
struct Workspace {
    arena: DevBuf,
    /// attention partial results (`_split` to `_merge`)
    part: DevBuf,
    ids: DevBuf,
    pos: DevBuf,
    /// per segment of a round: its session's cache length (i32)
    state: DevBuf,
    /// logits rows, and the rows they are computed from (gathered from several sessions)
    logits: DevBuf,
    gather: DevBuf,
    /// host copy of logits rows
    host: Vec<f32>,
}

/// Builds a kernel's entry points for the engine's device.
type LoadFn<'a> = dyn Fn(&cg::CudaKernel, &KernelSpec) -> Result<Vec<Func>, RuntimeError> + 'a;

/// The shape of one layer's cache.
#[derive(Clone, Copy, Debug)]
struct KvShape {
    layer: i64,
    width: usize,
    /// (scale, zero) groups a row (kv heads for an f32 cache)
    groups: usize,
    quantized: bool,
    /// past-only attention's recent window (1: none)
    window: usize,
}

impl KvShape {
    /// Bytes of the window's tail in a cache of at most `max_ctx` tokens: K and V of
    /// min(window - 1, max_ctx) positions in f32.
    fn tail_bytes(&self, max_ctx: usize) -> usize {
        (self.window - 1).min(max_ctx) * 2 * self.width * 4
    }
}

/// The compiled CUDA engine of a plan. `Send + Sync`; calls take turns on its workspace.
pub struct CudaEngine {
    gpu: Arc<Gpu>,
    steps: Vec<CudaStep>,
    plan: MemoryPlan,
    vocab: usize,
    kv_shapes: Vec<KvShape>,
    work: Mutex<Workspace>,
    _weights: Vec<DevBuf>,
    profile: bool,
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
}

/// The plan the CUDA kernels run: the model's, f32 activations (the GPU reads the weights
/// as stored; the CPU's int8 mode has no CUDA counterpart).
fn cuda_lowered(model: &Model) -> Result<Arc<LoweredPlan>, RuntimeError> {
    model.lowered(Act::F32)
}

impl CudaEngine {
    /// Build the model's kernels for GPU `device` and upload the weights. The plan's recorded
    /// CUDA code is used when NVRTC is not available.
    pub(crate) fn new(
        model: &Model,
        device: usize,
        mma: bool,
        opts: EngineOptions,
    ) -> Result<CudaEngine, RuntimeError> {
        let t0 = Instant::now();
        let (ctx, stream, arch) = open_device(device)?;
        let cuda = model.plan.as_ref().and_then(|p| p.cuda.as_ref());
        let device_name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let nvrtc = wkvc_codegen::nvrtc::locate().is_ok();
        if !nvrtc && cuda.is_none() {
            return Err(err(
                "neither NVRTC nor CUDA code in the plan: install NVRTC (scripts/fetch-nvrtc.sh) \
                 or compile the plan with --target cpu,cuda",
            ));
        }
        let code = if nvrtc {
            let (a, b) = wkvc_codegen::nvrtc::version()?;
            format!("cubin sm_{arch} (NVRTC {a}.{b})")
        } else {
            "plan PTX".to_string()
        };
        let load = |k: &cg::CudaKernel, spec: &KernelSpec| -> Result<Vec<Func>, RuntimeError> {
            let ptx = if nvrtc {
                let c = wkvc_codegen::nvrtc::cubin(&k.source, &spec.code_name(), arch)?;
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
                .map_err(|e| device::derr(&format!("loading {}", spec.code_name()), e))?;
            k.entries
                .iter()
                .map(|e| {
                    md.load_function(e)
                        .map(Func::Cuda)
                        .map_err(|x| device::derr(e, x))
                })
                .collect()
        };
        let gpu = Gpu::Cuda {
            _ctx: ctx.clone(),
            stream: stream.clone(),
        };
        let lowered = cuda_lowered(model)?;
        Self::build(
            model,
            &lowered,
            gpu,
            mma,
            &load,
            (device_name, arch, code),
            t0,
            opts,
        )
    }

    /// The same engine on the CUDA host emulator (`wkvc_codegen::cuda_host`): host memory for
    /// device memory, each kernel module built by the host's C++ compiler. For checking the
    /// engine and its kernels without a GPU; slow.
    pub(crate) fn emulated(
        model: &Model,
        mma: bool,
        opts: EngineOptions,
    ) -> Result<CudaEngine, RuntimeError> {
        let t0 = Instant::now();
        let load = |k: &cg::CudaKernel, _: &KernelSpec| -> Result<Vec<Func>, RuntimeError> {
            let m = Arc::new(wkvc_codegen::cuda_host::build(k)?);
            Ok((0..k.entries.len())
                .map(|i| Func::Host(m.clone(), i))
                .collect())
        };
        let gpu = Gpu::Host {
            capture: Mutex::new(None),
        };
        let lowered = cuda_lowered(model)?;
        let name = (
            "CUDA host emulator".to_string(),
            0,
            "kernels built by the host's C++ compiler".to_string(),
        );
        Self::build(model, &lowered, gpu, mma, &load, name, t0, opts)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        model: &Model,
        lowered: &LoweredPlan,
        gpu: Gpu,
        mma: bool,
        load: &LoadFn,
        (device_name, arch, code): (String, u32, String),
        t0: Instant,
        opts: EngineOptions,
    ) -> Result<CudaEngine, RuntimeError> {
        let module = &model.module;
        let mut modules: HashMap<String, Vec<Func>> = HashMap::new();
        let mut bufs: Vec<DevBuf> = Vec::new();
        let mut params: HashMap<String, u64> = HashMap::new();
        let upload = |bytes: &[u8], bufs: &mut Vec<DevBuf>| -> Result<u64, RuntimeError> {
            let b = gpu.upload(bytes)?;
            let p = b.ptr;
            bufs.push(b);
            Ok(p)
        };
        let mut steps = Vec::with_capacity(lowered.steps.len());
        let (mut kv_shapes, mut part, mut dim) = (Vec::new(), 0usize, 0usize);
        for st in &lowered.steps {
            let spec = st.spec.clone();
            let k = cg::emit(&spec)?;
            let key = plan::sha256_hex(&k.source);
            let f = match modules.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let fs = load(&k, &spec)?;
                    modules.insert(key, fs.clone());
                    fs
                }
            };
            // the weight operands of a GEMM's parts (codes, scale, zero per part, or the f32
            // rows), gathered into `cat`: uploaded side by side, one launch for all parts
            let (quant, per, nparts) = match &spec {
                KernelSpec::QGemm { parts, .. } => (true, 3, parts.len()),
                KernelSpec::Gemm { parts, .. } => (false, 1, parts.len()),
                _ => (false, 1, 0),
            };
            let wops = 1..1 + per * nparts;
            let mut cat: [Vec<u8>; 3] = Default::default();
            let mut operands = Vec::with_capacity(st.operands.len());
            for (i, o) in st.operands.iter().enumerate() {
                operands.push(match o {
                    StepOperand::Buffer(b) => Bound::Buf(b.offset),
                    StepOperand::Tokens => Bound::Tokens,
                    StepOperand::Positions => Bound::Positions,
                    StepOperand::Param(p) if wops.contains(&i) => {
                        let w = module
                            .weights
                            .get(p)
                            .ok_or_else(|| err(format!("param @{p} is not in the weight store")))?;
                        let slot = (i - 1) % per;
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
                        Bound::Param(0)
                    }
                    StepOperand::Param(p) => match params.get(p) {
                        Some(d) => Bound::Param(*d),
                        None => {
                            let w = module.weights.get(p).ok_or_else(|| {
                                err(format!("param @{p} is not in the weight store"))
                            })?;
                            let b: Vec<u8> = w.f32().iter().flat_map(|v| v.to_le_bytes()).collect();
                            let d = upload(&b, &mut bufs)?;
                            params.insert(p.clone(), d);
                            Bound::Param(d)
                        }
                    },
                });
            }
            let mut wcat = [0u64; 3];
            for (i, c) in cat.iter().enumerate() {
                if !c.is_empty() {
                    wcat[i] = upload(c, &mut bufs)?;
                }
            }
            let mut inv = 0;
            if !st.inv_freq.is_empty() {
                let b: Vec<u8> = st.inv_freq.iter().flat_map(|v| v.to_le_bytes()).collect();
                inv = upload(&b, &mut bufs)?;
            }
            match &spec {
                KernelSpec::Attention {
                    heads,
                    kv_heads,
                    head_dim,
                    kv_bits,
                    layer,
                    kv_group,
                    past_only,
                    ..
                } => {
                    let gl = wkvc_ir::kvcache::group_len(*kv_group, *head_dim);
                    let window = if *past_only && *kv_bits != 16 {
                        st.window.max(1)
                    } else {
                        1
                    };
                    if window > 1 && k.entries.len() < 4 {
                        return Err(err(format!(
                            "layer {layer}: a recent window of {window} positions needs the \
                             attention's window kernels (_wput, _wkeep)"
                        )));
                    }
                    kv_shapes.push(KvShape {
                        window,
                        layer: *layer,
                        width: kv_heads * head_dim,
                        groups: if *kv_bits != 16 {
                            kv_heads * head_dim / gl
                        } else {
                            *kv_heads
                        },
                        quantized: *kv_bits != 16,
                    });
                    part = part.max(kv_heads * heads / kv_heads * (head_dim + 2));
                }
                KernelSpec::Logits { dim: d, .. } => dim = *d,
                _ => {}
            }
            steps.push(CudaStep {
                spec,
                f,
                entries: k.entries.clone(),
                operands,
                out: st.out.offset,
                inv,
                wcat,
                fuse_next: false,
            });
        }
        // decode GEMVs fused with the RMSNorm or SiLU-mul before them, where the GEMM is the
        // value's only reader
        for i in 0..steps.len().saturating_sub(1) {
            let suffix = match steps[i].spec {
                KernelSpec::RmsNorm { .. } => "_gemv_rms",
                KernelSpec::SiluMul { .. } => "_gemv_silu",
                _ => continue,
            };
            if lowered.steps[i].feeds_next_only && steps[i + 1].entry(suffix).is_some() {
                steps[i].fuse_next = true;
            }
        }
        let vocab = lowered.vocab;
        let alloc = |n: usize| gpu.alloc(n);
        let work = Workspace {
            arena: alloc(lowered.memory.arena_bytes)?,
            part: alloc(4 * part * 4 * CHUNK)?,
            ids: alloc(4 * CHUNK)?,
            pos: alloc(4 * CHUNK)?,
            state: alloc(4 * CHUNK)?,
            logits: alloc(4 * CHUNK * vocab)?,
            gather: alloc(4 * CHUNK * dim)?,
            host: Vec::new(),
        };
        gpu.sync()?;
        Ok(CudaEngine {
            kernels: modules.len(),
            gpu: Arc::new(gpu),
            steps,
            plan: lowered.memory.clone(),
            vocab,
            kv_shapes,
            work: Mutex::new(work),
            _weights: bufs,
            profile: opts.profile,
            device_name,
            arch,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            code,
            mma,
        })
    }

    pub fn memory_plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// Bytes of a session's recent-window tails once it holds `ctx` tokens.
    pub(crate) fn kv_tail_bytes(&self, ctx: usize) -> usize {
        self.kv_shapes
            .iter()
            .map(|s| (s.window - 1).min(ctx) * 2 * s.width * 4)
            .sum()
    }

    /// Is the engine on the CUDA host emulator rather than a GPU?
    pub fn is_emulated(&self) -> bool {
        matches!(*self.gpu, Gpu::Host { .. })
    }

    /// An empty KV cache of `max_ctx` tokens (device memory allocated at its first use).
    pub(crate) fn new_kv(&self, max_ctx: usize) -> CudaKv {
        CudaKv {
            gpu: self.gpu.clone(),
            shapes: self.kv_shapes.clone(),
            max_ctx,
            wsrc: None,
            // attention splits: enough blocks to fill the GPU at long contexts
            splits: max_ctx.div_ceil(256).clamp(1, SPLITS_MAX),
            layers: None,
            graph: None,
        }
    }
}

/// One layer's KV cache in device memory: K codes, K (scale, zero) pairs, V codes, V pairs
/// (f32 rows in the params buffers for a 16-bit cache): the CPU engine's layout.
struct DevLayer {
    shape: KvShape,
    bufs: [DevBuf; 4],
    /// a recent window's tail (K and V of the last min(window - 1, len) positions in f32, a
    /// row each) and the next one a call stages: copied over the tail when the call succeeds
    tail: Option<[DevBuf; 2]>,
}

/// The device pointers of a layer's recent window in a call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DevWindow {
    pub win: usize,
    pub tail: u64,
    pub next: u64,
    /// the session's full-precision source (`_wput`), shared by its layers
    pub src: u64,
}

/// A captured one-token step of a session.
struct Captured(StepGraph);
// SAFETY: a session's graph is used only by calls that hold the session mutably (one thread
// at a time) and the engine's workspace lock (so no two driver calls on it overlap).
unsafe impl Send for Captured {}

/// A session's KV cache on the CUDA engine.
pub struct CudaKv {
    gpu: Arc<Gpu>,
    shapes: Vec<KvShape>,
    max_ctx: usize,
    /// attention splits of this session's one-token steps
    splits: usize,
    layers: Option<Vec<DevLayer>>,
    /// with a recent window: the segment's full-precision source of the layer at hand (the
    /// tail's rows and a chunk's, `2 * width` floats each)
    wsrc: Option<DevBuf>,
    graph: Option<Captured>,
}

impl CudaKv {
    /// The device memory, allocated at the first use.
    fn layers(&mut self) -> Result<&mut Vec<DevLayer>, RuntimeError> {
        if self.layers.is_none() {
            let mut layers = Vec::with_capacity(self.shapes.len());
            for s in &self.shapes {
                let (c, p) = if s.quantized {
                    (
                        self.max_ctx * s.width.div_ceil(2),
                        // a word (two f16) per (token, group)
                        self.max_ctx * s.groups * 4,
                    )
                } else {
                    (0, self.max_ctx * s.width * 4)
                };
                let g = &self.gpu;
                let tail = if s.window > 1 {
                    let n = s.tail_bytes(self.max_ctx);
                    Some([g.alloc(n)?, g.alloc(n)?])
                } else {
                    None
                };
                layers.push(DevLayer {
                    shape: *s,
                    bufs: [g.alloc(c)?, g.alloc(p)?, g.alloc(c)?, g.alloc(p)?],
                    tail,
                });
            }
            let src = self
                .shapes
                .iter()
                .filter(|s| s.window > 1)
                .map(|s| s.tail_bytes(self.max_ctx) + CHUNK * 2 * s.width * 4)
                .max();
            if let Some(n) = src {
                self.wsrc = Some(self.gpu.alloc(n)?);
            }
            self.layers = Some(layers);
        }
        self.layers
            .as_mut()
            .ok_or_else(|| err("session memory is not allocated"))
    }

    /// Device pointers of layer `layer`: K codes, K params, V codes, V params.
    fn words(&mut self, layer: i64) -> Result<[u64; 4], RuntimeError> {
        let l = self
            .layers()?
            .iter()
            .find(|l| l.shape.layer == layer)
            .ok_or_else(|| err(format!("no cache for layer {layer}")))?;
        Ok([0, 1, 2, 3].map(|i| l.bufs[i].ptr))
    }

    /// Layer `layer`'s recent window, if it has one.
    pub(crate) fn window(&mut self, layer: i64) -> Result<Option<DevWindow>, RuntimeError> {
        let l = self
            .layers()?
            .iter()
            .find(|l| l.shape.layer == layer)
            .ok_or_else(|| err(format!("no cache for layer {layer}")))?;
        let (win, t) = (l.shape.window, l.tail.as_ref().map(|[t, n]| (t.ptr, n.ptr)));
        Ok(match (t, &self.wsrc) {
            (Some((tail, next)), Some(src)) => Some(DevWindow {
                win,
                tail,
                next,
                src: src.ptr,
            }),
            _ => None,
        })
    }

    /// The call succeeded: the tails it staged become the cache's.
    pub(crate) fn commit_tails(&self) -> Result<(), RuntimeError> {
        for l in self.layers.iter().flatten() {
            if let Some([t, n]) = &l.tail {
                self.gpu
                    .dtod(n.ptr, t.ptr, l.shape.tail_bytes(self.max_ctx))?;
            }
        }
        Ok(())
    }

    /// Bytes the recent windows' tails hold once the cache holds `n` tokens.
    pub(crate) fn tail_bytes(&self, n: usize) -> usize {
        self.shapes
            .iter()
            .map(|s| (s.window - 1).min(n) * 2 * s.width * 4)
            .sum()
    }

    /// The first `n` tokens in the interpreter's form (copied from the device).
    pub(crate) fn export(&self, n: usize, max_ctx: usize) -> Result<KvCache, RuntimeError> {
        let mut out = std::collections::BTreeMap::new();
        let gpu = &self.gpu;
        let f32s = |b: &DevBuf, count: usize| -> Result<Vec<f32>, RuntimeError> {
            let mut v = vec![0f32; count];
            gpu.dtoh(b, device::f32_bytes(&mut v))?;
            Ok(v)
        };
        for l in self.layers.iter().flatten() {
            let s = l.shape;
            let kl = if s.quantized {
                let rb = s.width.div_ceil(2);
                let codes = |b: &DevBuf| -> Result<Vec<u8>, RuntimeError> {
                    let mut v = vec![0u8; n * rb];
                    gpu.dtoh(b, &mut v)?;
                    Ok(v)
                };
                let pairs = |b: &DevBuf| -> Result<Vec<(f32, f32)>, RuntimeError> {
                    // a word per (token, group): f16 scale and zero
                    Ok(f32s(b, n * s.groups)?
                        .iter()
                        .map(|w| wkvc_ir::kvcache::unpack_params(w.to_bits()))
                        .collect())
                };
                // the window's tail: rows of K then V, split into the two
                let (mut wk, mut wv) = (Vec::new(), Vec::new());
                if let Some([t, _]) = &l.tail {
                    let rows = (s.window - 1).min(n);
                    for r in f32s(t, rows * 2 * s.width)?.chunks(2 * s.width) {
                        wk.extend_from_slice(&r[..s.width]);
                        wv.extend_from_slice(&r[s.width..]);
                    }
                }
                KvLayer {
                    width: s.width,
                    groups: s.groups,
                    row_bytes: rb,
                    kc: codes(&l.bufs[0])?,
                    kp: pairs(&l.bufs[1])?,
                    vc: codes(&l.bufs[2])?,
                    vp: pairs(&l.bufs[3])?,
                    param_bytes: 2,
                    wk,
                    wv,
                    ..Default::default()
                }
            } else {
                KvLayer {
                    width: s.width,
                    groups: s.groups,
                    k: f32s(&l.bufs[1], n * s.width)?,
                    v: f32s(&l.bufs[3], n * s.width)?,
                    ..Default::default()
                }
            };
            out.insert(s.layer, kl);
        }
        if self.layers.is_none() {
            // never run: an empty cache of the right shapes
            for s in &self.shapes {
                out.insert(
                    s.layer,
                    KvLayer {
                        width: s.width,
                        groups: s.groups,
                        row_bytes: if s.quantized { s.width.div_ceil(2) } else { 0 },
                        param_bytes: 2,
                        ..Default::default()
                    },
                );
            }
        }
        Ok(KvCache::from_layers(max_ctx, n, out)?)
    }

    /// Replace the contents by `cache`'s (exactly `cache.len()` rows in every layer).
    pub(crate) fn load(&mut self, cache: &KvCache) -> Result<(), RuntimeError> {
        let n = cache.len();
        let fits = |s: &KvShape, l: &KvLayer| {
            l.width == s.width
                && l.groups == s.groups
                && l.rows() == n
                && l.window_rows()
                    == if l.is_quantized() {
                        (s.window - 1).min(n)
                    } else {
                        0
                    }
                && l.is_quantized() == s.quantized
                && (!s.quantized || (l.row_bytes == s.width.div_ceil(2) && l.param_bytes == 2))
        };
        if let Some(s) = self
            .shapes
            .iter()
            .find(|s| !cache.layer(s.layer).is_some_and(|l| fits(s, l)))
        {
            return Err(err(format!(
                "the cache has no layer {} of this plan's shape with {n} rows (and, for a plan \
                 with a recent window, the full-precision rows of the window before them)",
                s.layer
            )));
        }
        let gpu = self.gpu.clone();
        let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let pairs = |p: &[(f32, f32)]| -> Vec<u8> {
            p.iter()
                .flat_map(|&(s, z)| wkvc_ir::kvcache::pack_params(s, z).to_le_bytes())
                .collect()
        };
        for d in self.layers()?.iter_mut() {
            let Some(l) = cache.layer(d.shape.layer) else {
                continue;
            };
            if let Some([t, _]) = &mut d.tail {
                let mut rows = Vec::with_capacity(4 * (l.wk.len() + l.wv.len()));
                for (k, v) in l.wk.chunks(d.shape.width).zip(l.wv.chunks(d.shape.width)) {
                    rows.extend(k.iter().chain(v).flat_map(|x| x.to_le_bytes()));
                }
                gpu.htod(&rows, t)?;
            }
            let [kc, kp, vc, vp] = &mut d.bufs;
            if d.shape.quantized {
                gpu.htod(&l.kc, kc)?;
                gpu.htod(&pairs(&l.kp), kp)?;
                gpu.htod(&l.vc, vc)?;
                gpu.htod(&pairs(&l.vp), vp)?;
            } else {
                gpu.htod(&bytes(&l.k), kp)?;
                gpu.htod(&bytes(&l.v), vp)?;
            }
        }
        gpu.sync()
    }
}
