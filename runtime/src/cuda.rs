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

use crate::{RuntimeError, plan};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg, sys,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use wkvc_codegen::cuda::{self as cg, GEMV_MAX_M, GEMV_ROWS, TILE_M, TILE_N};
use wkvc_ir::{DType, Graph, KernelSpec, Module, Operand, RunMode};
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
    f: Vec<CudaFunction>,
    args: Vec<Arg>,
    /// byte offset of the output in the arena
    out: usize,
    /// RoPE: device pointer of the inv_freq table
    inv: u64,
}

/// A kernel launch argument.
enum K {
    P(u64),
    I(i32),
}

/// The compiled CUDA engine of a plan.
pub struct CudaEngine {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    steps: Vec<Step>,
    plan: MemoryPlan,
    vocab: usize,
    _bufs: Vec<CudaSlice<u8>>,
    pub device_name: String,
    /// compute capability as 10 * major + minor
    pub arch: u32,
    /// milliseconds spent compiling (NVRTC) and loading the kernels and uploading weights
    pub load_ms: f64,
    /// distinct kernel modules
    pub kernels: usize,
    /// how the kernels were built: "cubin sm_XX (NVRTC a.b)" or "plan PTX"
    pub code: String,
    /// prefill's quantized GEMMs on tensor cores
    pub mma: bool,
    lowered: Graph,
}

fn dev_ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
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
        let lowered = lower(&module.graph, LowerOptions::default())
            .map_err(|e| err(format!("lowering: {e}")))?;
        let pb = |p: &str| module.weights.get(p).map(|w| w.size()).unwrap_or((0, 0));
        let plan =
            memplan(&lowered, CHUNK, 1, 1, &pb).map_err(|e| err(format!("memory plan: {e}")))?;
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
        let mut modules: HashMap<String, Vec<CudaFunction>> = HashMap::new();
        let mut bufs: Vec<CudaSlice<u8>> = Vec::new();
        let mut params: HashMap<String, u64> = HashMap::new();
        let upload = |bytes: &[u8], bufs: &mut Vec<CudaSlice<u8>>| -> Result<u64, RuntimeError> {
            let b = stream
                .clone_htod(bytes)
                .map_err(|e| derr("uploading weights", e))?;
            let p = dev_ptr(&b, &stream);
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
                    let ptx = if nvrtc {
                        let c = wkvc_codegen::nvrtc::cubin(&k.source, &spec.code_name(), arch)
                            .map_err(|e| err(e.to_string()))?;
                        cudarc::nvrtc::Ptx::from_binary(c.image)
                    } else {
                        let m = cuda
                            .and_then(|c| c.kernels.iter().find(|m| m.sha256 == key))
                            .ok_or_else(|| {
                                err(format!(
                                    "{}: the plan's CUDA code does not have this kernel (recompile \
                                     the plan with this wkvc, or install NVRTC)",
                                    spec.code_name()
                                ))
                            })?;
                        cudarc::nvrtc::Ptx::from_src(m.ptx.clone())
                    };
                    let md = ctx
                        .load_module(ptx)
                        .map_err(|e| derr(&format!("loading {}", spec.code_name()), e))?;
                    let fs = k
                        .entries
                        .iter()
                        .map(|e| md.load_function(e).map_err(|x| derr(e, x)))
                        .collect::<Result<Vec<_>, _>>()?;
                    modules.insert(key, fs.clone());
                    fs
                }
            };
            let mut args = Vec::new();
            for (ai, a) in n.args.iter().enumerate() {
                args.push(match a {
                    Operand::Value(v) => {
                        if let Some(i) = lowered.inputs.iter().find(|i| i.value == *v) {
                            match i.name.as_str() {
                                "tokens" => Arg::Tokens,
                                "positions" => Arg::Positions,
                                other => return Err(err(format!("unknown graph input \"{other}\""))),
                            }
                        } else {
                            let (off, _) = plan
                                .buffers
                                .get(&v.0)
                                .ok_or_else(|| err(format!("{v} has no buffer")))?;
                            Arg::Buf(*off)
                        }
                    }
                    Operand::Param(p) => {
                        if let Some(d) = params.get(p) {
                            Arg::Param(*d)
                        } else {
                            let w = module
                                .weights
                                .get(p)
                                .ok_or_else(|| err(format!("param @{p} is not in the weight store")))?;
                            let quant_part = matches!(&spec, KernelSpec::QGemm { parts, .. }
                                if (1..1 + 3 * parts.len()).contains(&ai));
                            let d = if quant_part {
                                // codes as stored; scale/zero as f16
                                match (ai - 1) % 3 {
                                    0 if w.dtype() == DType::U4 => upload(&w.bytes(), &mut bufs)?,
                                    1 | 2 if w.storage_dtype() == DType::F16 => {
                                        upload(&w.bytes(), &mut bufs)?
                                    }
                                    _ => {
                                        return Err(err(format!(
                                            "@{p}: the CUDA kernels read packed 4-bit codes with f16 \
                                             scales and zeros, found {:?} (recompile without \
                                             --f32-params)",
                                            w.storage_dtype()
                                        )));
                                    }
                                }
                            } else {
                                let f = w.f32();
                                let b: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
                                upload(&b, &mut bufs)?
                            };
                            params.insert(p.clone(), d);
                            Arg::Param(d)
                        }
                    }
                });
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
            });
        }
        if vocab == 0 {
            return Err(err("the lowered graph has no logits kernel"));
        }
        stream
            .synchronize()
            .map_err(|e| derr("uploading weights", e))?;
        Ok(CudaEngine {
            kernels: modules.len(),
            ctx,
            stream,
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
        let s = &self.stream;
        let alloc = |n: usize| -> Result<CudaSlice<u8>, RuntimeError> {
            s.alloc_zeros::<u8>(n.max(16))
                .map_err(|e| derr("allocating device memory", e))
        };
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
                layers.insert(*layer, [0, 1, 2, 3].map(|i| dev_ptr(&b[i], s)));
                kv.push(b);
                part = part.max(CHUNK * kv_heads * splits * (heads / kv_heads) * (head_dim + 2));
            }
        }
        let arena = alloc(self.plan.arena_bytes)?;
        let part_b = alloc(4 * part)?;
        let logits_b = alloc(4 * CHUNK * self.vocab)?;
        let ids_b = alloc(4 * CHUNK)?;
        let pos_b = alloc(4 * CHUNK)?;
        let state_b = alloc(16)?;
        Ok(Dev {
            p_arena: dev_ptr(&arena, s),
            p_part: dev_ptr(&part_b, s),
            p_logits: dev_ptr(&logits_b, s),
            p_ids: dev_ptr(&ids_b, s),
            p_pos: dev_ptr(&pos_b, s),
            p_state: dev_ptr(&state_b, s),
            logits_b,
            _bufs: vec![arena, part_b],
            ids_b,
            pos_b,
            state_b,
            layers,
            _kv: kv,
            splits: splits as u32,
            graph: None,
        })
    }

    fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &[K],
    ) -> Result<(), RuntimeError> {
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                K::P(p) => {
                    b.arg(p);
                }
                K::I(i) => {
                    b.arg(i);
                }
            }
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature (see wkvc_codegen::cuda) and
        // every pointer is a live device allocation of the engine or the session.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| derr("kernel launch", e))
    }

    pub fn device(&self) -> &Arc<CudaContext> {
        &self.ctx
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

/// A session's device memory.
struct Dev {
    logits_b: CudaSlice<u8>,
    _bufs: Vec<CudaSlice<u8>>,
    ids_b: CudaSlice<u8>,
    pos_b: CudaSlice<u8>,
    state_b: CudaSlice<u8>,
    p_arena: u64,
    p_part: u64,
    p_logits: u64,
    p_ids: u64,
    p_pos: u64,
    p_state: u64,
    /// per layer: K codes, K params, V codes, V params
    layers: HashMap<i64, [u64; 4]>,
    _kv: Vec<[CudaSlice<u8>; 4]>,
    splits: u32,
    graph: Option<CudaGraph>,
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
        let s = &eng.stream;
        let m = ids.len();
        let tok: Vec<u8> = ids.iter().flat_map(|&t| (t as i32).to_le_bytes()).collect();
        let pos: Vec<u8> = (0..m)
            .flat_map(|i| ((self.len + i) as i32).to_le_bytes())
            .collect();
        let st = (self.len as i32).to_le_bytes();
        let h2d = |src: &[u8], dst: &mut CudaSlice<u8>| -> Result<(), RuntimeError> {
            let mut v = dst.slice_mut(0..src.len());
            s.memcpy_htod(src, &mut v)
                .map_err(|e| derr("copying the step's inputs", e))
        };
        h2d(&tok, &mut d.ids_b)?;
        h2d(&pos, &mut d.pos_b)?;
        h2d(&st, &mut d.state_b)?;
        let whole = all.is_some();
        if m == 1 && !whole {
            // one token: the captured graph (the same launches every step)
            if d.graph.is_none() {
                s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(|e| derr("begin graph capture", e))?;
                let r = launch_all(eng, d, 1, mode, false);
                let g = s
                    .end_capture(sys::CUgraphInstantiate_flags(0))
                    .map_err(|e| derr("end graph capture", e))?;
                r?;
                d.graph = g;
            }
            match &d.graph {
                Some(g) => g.launch().map_err(|e| derr("graph launch", e))?,
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
                let src = d.logits_b.slice(0..4 * m * v);
                s.memcpy_dtoh(&src, f32_bytes(&mut a[start..]))
                    .map_err(|e| derr("reading the logits", e))?;
                s.synchronize().map_err(|e| derr("synchronize", e))?;
                self.logits.copy_from_slice(&a[start + (m - 1) * v..]);
            }
            None => {
                // the last row only, into the session's buffer (no allocation per step)
                let src = d.logits_b.slice(0..4 * v);
                s.memcpy_dtoh(&src, f32_bytes(&mut self.logits))
                    .map_err(|e| derr("reading the logits", e))?;
                s.synchronize().map_err(|e| derr("synchronize", e))?;
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
        for st in &eng.steps {
            let p = |i: usize| -> u64 {
                match st.args.get(i) {
                    Some(Arg::Buf(o)) => buf(*o),
                    Some(Arg::Tokens) => d.p_ids,
                    Some(Arg::Positions) => d.p_pos,
                    Some(Arg::Param(d)) => *d,
                    None => 0,
                }
            };
            let y = buf(st.out);
            let f = &st.f;
            match &st.spec {
                KernelSpec::Embed { .. } => eng.launch(
                    &f[0],
                    (m as u32, 1, 1),
                    128,
                    &[K::P(p(0)), K::P(p(1)), K::P(y), K::I(mi)],
                )?,
                KernelSpec::RmsNorm { .. } => eng.launch(
                    &f[0],
                    (m as u32, 1, 1),
                    cg::BLOCK,
                    &[K::P(p(0)), K::P(p(1)), K::P(y), K::I(mi)],
                )?,
                KernelSpec::SiluMul { n } => eng.launch(
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
                    let q = matches!(st.spec, KernelSpec::QGemm { .. });
                    let per = if q { 3 } else { 1 };
                    let ntot: usize = parts.iter().sum();
                    let r = if *residual {
                        p(1 + per * parts.len())
                    } else {
                        0
                    };
                    let mut base = 0usize;
                    for (j, &nj) in parts.iter().enumerate() {
                        let (w, sc, z) = if q {
                            (p(1 + 3 * j), p(2 + 3 * j), p(3 + 3 * j))
                        } else {
                            (p(1 + j), 0, 0)
                        };
                        let args = [
                            K::P(p(0)),
                            K::I(mi),
                            K::P(w),
                            K::P(sc),
                            K::P(z),
                            K::P(y + 4 * base as u64),
                            K::I(ntot as i32),
                            K::I(nj as i32),
                            K::P(if r != 0 { r + 4 * base as u64 } else { 0 }),
                            K::I(ntot as i32),
                        ];
                        gemm(eng, f, m, nj, &args)?;
                        base += nj;
                    }
                }
                KernelSpec::Logits { vocab, dim, .. } => {
                    let (x, rows) = if whole {
                        (p(0), m)
                    } else {
                        (p(0) + 4 * ((m - 1) * dim) as u64, 1)
                    };
                    let args = [
                        K::P(x),
                        K::I(rows as i32),
                        K::P(p(1)),
                        K::P(0),
                        K::P(0),
                        K::P(d.p_logits),
                        K::I(*vocab as i32),
                        K::I(*vocab as i32),
                        K::P(0),
                        K::I(0),
                    ];
                    gemm(eng, f, rows, *vocab, &args)?;
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
                    eng.launch(
                        &f[0],
                        (m as u32, 1, 1),
                        128,
                        &[
                            K::P(p(0)),
                            K::I(mi),
                            K::P(d.p_pos),
                            K::P(st.inv),
                            K::P(kv[0]),
                            K::P(kv[1]),
                            K::P(kv[2]),
                            K::P(kv[3]),
                            K::P(d.p_state),
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
                    eng.launch(
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
                            K::P(d.p_state),
                            K::I(decode),
                            K::P(sm[0]),
                            K::P(sm[1]),
                            K::P(sm[2]),
                            K::P(sm[3]),
                            K::P(d.p_part),
                            K::I(d.splits as i32),
                        ],
                    )?;
                    eng.launch(
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

/// The bytes of an f32 slice (for device copies).
fn f32_bytes(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: f32 has no invalid bit patterns and u8 has alignment 1; the length is exact.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, 4 * v.len()) }
}

/// A GEMM of `m` rows and `n` outputs: the GEMV kernel for a few rows, else the tiled one
/// (or the tensor-core one, where the engine asks for it and the kernel has it).
fn gemm(
    eng: &CudaEngine,
    f: &[CudaFunction],
    m: usize,
    n: usize,
    args: &[K],
) -> Result<(), RuntimeError> {
    if m as u32 <= GEMV_MAX_M {
        eng.launch(
            &f[0],
            ((n as u32).div_ceil(GEMV_ROWS), 1, 1),
            32 * GEMV_ROWS,
            args,
        )
    } else if eng.mma && f.len() > 2 {
        eng.launch(
            &f[2],
            (
                (n as u32).div_ceil(cg::MMA_N),
                (m as u32).div_ceil(cg::MMA_M),
                1,
            ),
            128,
            args,
        )
    } else {
        eng.launch(
            &f[1],
            ((n as u32).div_ceil(TILE_N), (m as u32).div_ceil(TILE_M), 1),
            256,
            args,
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
