//! The compiled CPU engine: the plan's graph lowered to kernels (`passes::lower`), every
//! distinct kernel JIT-compiled by Cranelift when the engine is made, buffers placed by the
//! memory plan, work split over a spinning thread pool. A session allocates its arena, scratch
//! and packed KV cache once; forward passes then allocate nothing.

use crate::RuntimeError;
use crate::pool::{Pool, grain};
use std::collections::HashMap;
use std::time::Instant;
use wkvc_codegen::cpu::{CpuJit, KernelFn};
use wkvc_codegen::kernels::{QTILE, prep_f32, prep_int8};
use wkvc_ir::graph::{Node, Operand};
use wkvc_ir::{Act, DType, Graph, KernelSpec, KvCache, KvLayer, Module, RunMode};
use wkvc_passes::lower::{LowerOptions, MemoryPlan, lower, memplan};

/// Default rows per prefill chunk (the arena is sized for it).
pub const CHUNK: usize = 512;

/// A param as the kernels read it: a pointer that lives as long as the engine.
#[derive(Clone, Copy)]
struct Ptr(*const u8);
// SAFETY: params are read-only for the engine's lifetime.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

enum Arg {
    /// an arena buffer (offset in floats)
    Buf(usize),
    /// graph input "tokens" / "positions"
    Tokens,
    Positions,
    Param(Ptr),
}

struct Step {
    spec: KernelSpec,
    f: KernelFn,
    args: Vec<Arg>,
    /// arena offset (floats) of the output
    out: usize,
    /// rope: index of the cos/sin table set
    rope: usize,
    /// int8 head: the quantized table and its block scales
    head: Option<(Ptr, Ptr)>,
    /// embedding from a table nothing else reads: its rows' pages are released after use
    release: Option<wkvc_ir::Weight>,
}

/// A compiled plan, ready to make sessions.
pub struct CpuEngine {
    steps: Vec<Step>,
    plan: MemoryPlan,
    pool: Pool,
    _jit: CpuJit,
    /// f32 copies of f16 scale/zero params and converted f32 params
    _owned: Vec<Vec<f32>>,
    /// the int8 head
    _owned_i8: Vec<Vec<i8>>,
    /// the quantized GEMMs' codes in tile order
    _owned_u8: Vec<Vec<u8>>,
    /// bytes of the engine's own copies of weights (quantized GEMM codes in tile order and
    /// scale/zero in f32, the int8 head)
    pub derived_bytes: usize,
    rope_sets: Vec<Vec<f32>>,
    vocab: usize,
    /// milliseconds spent lowering and JIT-compiling
    pub jit_ms: f64,
    /// WKVC_PROFILE, read once: 1 prints each chunk's time, 2 also each kernel's
    profile: u8,
    /// distinct kernels compiled, machine-code bytes
    pub kernels: usize,
    pub code_bytes: usize,
    pub act: Act,
    lowered: Graph,
}

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Invalid(msg.into())
}

impl CpuEngine {
    /// Lower, plan and JIT-compile `module` for `threads` workers and contexts up to `max_ctx`.
    pub fn new(
        module: &Module,
        threads: usize,
        act: Act,
        max_ctx: usize,
    ) -> Result<CpuEngine, RuntimeError> {
        let t0 = Instant::now();
        let lowered = lower(&module.graph, LowerOptions { act }).map_err(|e| err(e.to_string()))?;
        let threads = threads.max(1);
        let pb = |p: &str| module.weights.get(p).map(|w| w.size()).unwrap_or((0, 0));
        let plan =
            memplan(&lowered, CHUNK, max_ctx, threads, &pb).map_err(|e| err(e.to_string()))?;
        let mut jit = CpuJit::host().map_err(|e| err(e.to_string()))?;
        let mut compiled: HashMap<String, KernelFn> = HashMap::new();
        let mut owned: Vec<Vec<f32>> = Vec::new();
        let mut f32_cache: HashMap<String, Ptr> = HashMap::new();
        let mut steps = Vec::new();
        let mut rope_sets: Vec<Vec<f32>> = Vec::new();
        let mut code_bytes = 0;
        let mut derived_bytes = 0;
        let mut owned_i8: Vec<Vec<i8>> = Vec::new();
        let mut owned_u8: Vec<Vec<u8>> = Vec::new();
        let mut vocab = 0;
        for n in &lowered.nodes {
            let spec = KernelSpec::from_node(n).map_err(err)?;
            let key = spec.code_name();
            let f = match compiled.get(&key) {
                Some(f) => *f,
                None => {
                    let (f, size) = jit
                        .compile_kernel(&spec)
                        .map_err(|e| err(format!("{key}: {e}")))?;
                    code_bytes += size;
                    compiled.insert(key, f);
                    f
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
                                other => {
                                    return Err(err(format!("unknown graph input \"{other}\"")));
                                }
                            }
                        } else {
                            let (off, _) = plan
                                .buffers
                                .get(&v.0)
                                .ok_or_else(|| err(format!("{v} has no buffer")))?;
                            Arg::Buf(off / 4)
                        }
                    }
                    Operand::Param(p) => match &spec {
                        // codes, scales and zeros of a quantized GEMM part: engine copies in
                        // the kernel's tile order
                        KernelSpec::QGemm {
                            k, group, parts, ..
                        } if (1..1 + 3 * parts.len()).contains(&ai) => {
                            let rows = parts[(ai - 1) / 3];
                            let gl = wkvc_ir::quant::group_len(*k, *group);
                            Arg::Param(qgemm_param(
                                module,
                                p,
                                (ai - 1) % 3 == 0,
                                (rows, *k, gl),
                                &mut owned,
                                &mut owned_u8,
                                &mut f32_cache,
                            )?)
                        }
                        // small vectors read every step: f32 copies (see `memplan`)
                        KernelSpec::RmsNorm { .. }
                        | KernelSpec::RopeKv { .. }
                        | KernelSpec::Attention { .. } => {
                            Arg::Param(small_param(module, p, &mut owned, &mut f32_cache)?)
                        }
                        _ => Arg::Param(param_ptr(module, p, &mut owned, &mut f32_cache)?),
                    },
                });
            }
            let out = plan.buffers.get(&n.out.0).map(|b| b.0 / 4).unwrap_or(0);
            let mut rope = 0;
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
                let inv = wkvc_ir::interp::rope_inv_freq(n, *rope_dim, fac.as_deref());
                rope = match rope_sets.iter().position(|s| *s == inv) {
                    Some(i) => i,
                    None => {
                        rope_sets.push(inv);
                        rope_sets.len() - 1
                    }
                };
            }
            if let KernelSpec::Logits { vocab: v, .. } = &spec {
                vocab = *v;
            }
            let mut head = None;
            if let (
                KernelSpec::Logits {
                    vocab: v,
                    dim,
                    act: Act::Int8,
                },
                Some(Operand::Param(name)),
            ) = (&spec, n.args.get(1))
            {
                let w = module
                    .weights
                    .get(name)
                    .ok_or_else(|| err(format!("param @{name} is not in the weight store")))?;
                let (q, s) = quantize_head(w, *v, *dim);
                // the f32 table is read again only for the embedding rows a prompt uses
                w.advise_random();
                derived_bytes += q.len();
                head = Some((Ptr(q.as_ptr() as *const u8), Ptr(s.as_ptr() as *const u8)));
                owned_i8.push(q);
                owned.push(s);
            }
            steps.push(Step {
                spec,
                f,
                args,
                out,
                rope,
                head,
                release: None,
            });
        }
        if vocab == 0 {
            return Err(err("the lowered graph has no logits kernel"));
        }
        // an embedding table that only the embedding reads (the head has its int8 copy)
        for i in 0..steps.len() {
            if let (KernelSpec::Embed { .. }, Some(Operand::Param(name))) =
                (&steps[i].spec, lowered.nodes[i].args.get(1))
            {
                let shared = lowered.nodes.iter().enumerate().any(|(j, n)| {
                    j != i
                        && !matches!(steps[j].spec, KernelSpec::Logits { act: Act::Int8, .. })
                        && n.args.iter().any(|a| a == &Operand::Param(name.clone()))
                });
                if !shared {
                    steps[i].release = module.weights.get(name).cloned();
                }
            }
        }
        // Fault-around mapped neighbouring pages back while the copies were built: release
        // everything the engine holds its own copy of once more.
        for (n, st) in lowered.nodes.iter().zip(&steps) {
            let copied = matches!(
                st.spec,
                KernelSpec::QGemm { .. }
                    | KernelSpec::RmsNorm { .. }
                    | KernelSpec::RopeKv { .. }
                    | KernelSpec::Attention { .. }
                    | KernelSpec::Logits { act: Act::Int8, .. }
            );
            for a in &n.args {
                if let (true, Operand::Param(p)) = (copied, a)
                    && let Some(w) = module.weights.get(p)
                {
                    w.release_pages();
                }
            }
        }
        let kernels = compiled.len();
        derived_bytes += owned.iter().map(|v| 4 * v.len()).sum::<usize>();
        derived_bytes += owned_u8.iter().map(|v| v.len()).sum::<usize>();
        Ok(CpuEngine {
            steps,
            plan,
            pool: Pool::new(threads)
                .map_err(|e| err(format!("cannot start {threads} threads: {e}")))?,
            _jit: jit,
            _owned: owned,
            _owned_i8: owned_i8,
            _owned_u8: owned_u8,
            derived_bytes,
            rope_sets,
            vocab,
            jit_ms: t0.elapsed().as_secs_f64() * 1e3,
            profile: match std::env::var("WKVC_PROFILE").as_deref() {
                Ok("2") => 2,
                Ok(_) => 1,
                Err(_) => 0,
            },
            kernels,
            code_bytes,
            act,
            lowered,
        })
    }

    pub fn memory_plan(&self) -> &MemoryPlan {
        &self.plan
    }

    pub fn lowered(&self) -> &Graph {
        &self.lowered
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// A session with its own arena and a KV cache of `max_ctx` tokens.
    pub fn session(&self, max_ctx: usize) -> CpuSession<'_> {
        let mut layers = HashMap::new();
        let mut scratch_f = 0;
        let mut scratch_q = 0;
        let mut attn = 0;
        let mut rope = 0;
        let mut head = 0;
        for s in &self.steps {
            match &s.spec {
                KernelSpec::Attention {
                    layer,
                    kv_heads,
                    head_dim,
                    kv_bits,
                    heads,
                    ..
                } => {
                    let w = kv_heads * head_dim;
                    let kv = if *kv_bits == 16 {
                        LayerCache {
                            width: w,
                            heads: *kv_heads,
                            codes: [Vec::new(), Vec::new()],
                            params: [vec![0f32; max_ctx * w], vec![0f32; max_ctx * w]],
                        }
                    } else {
                        LayerCache {
                            width: w,
                            heads: *kv_heads,
                            codes: [
                                vec![0u8; max_ctx * w.div_ceil(2)],
                                vec![0u8; max_ctx * w.div_ceil(2)],
                            ],
                            params: [
                                vec![0f32; max_ctx * kv_heads * 2],
                                vec![0f32; max_ctx * kv_heads * 2],
                            ],
                        }
                    };
                    layers.insert(*layer, kv);
                    attn = attn.max(4 * head_dim * (heads / kv_heads + 1));
                }
                KernelSpec::QGemm { k, group, .. } => {
                    let gl = wkvc_ir::quant::group_len(*k, *group);
                    scratch_f = scratch_f.max(CHUNK * (k + k.div_ceil(gl) + k.div_ceil(32)));
                    scratch_q = scratch_q.max(CHUNK * k);
                }
                KernelSpec::RopeKv { rope_dim, .. } => rope = rope.max(CHUNK * rope_dim / 2),
                KernelSpec::Logits {
                    dim,
                    act: Act::Int8,
                    ..
                } => head = *dim,
                _ => {}
            }
        }
        let t = self.pool.threads();
        CpuSession {
            engine: self,
            arena: vec![0f32; self.plan.arena_bytes.div_ceil(4)],
            xp: vec![0f32; scratch_f],
            xq: vec![0i8; scratch_q],
            attn: vec![0f32; attn * t],
            cos: vec![0f32; rope * self.rope_sets.len().max(1)],
            sin: vec![0f32; rope * self.rope_sets.len().max(1)],
            layers,
            len: 0,
            max_ctx,
            logits: vec![0f32; self.vocab],
            hq: vec![0i8; CHUNK * head],
            hdx: vec![0f32; CHUNK * head / 32],
        }
    }
}

/// For the output rows a..b of GEMM parts laid side by side: `f(part, part start, lo, hi)`
/// for each part the range meets (rows lo..hi in output columns).
fn for_parts(parts: &[usize], a: usize, b: usize, f: &mut dyn FnMut(usize, usize, usize, usize)) {
    let mut base = 0;
    for (j, &nj) in parts.iter().enumerate() {
        let (lo, hi) = (a.max(base), b.min(base + nj));
        if lo < hi {
            f(j, base, lo, hi);
        }
        base += nj;
    }
}

/// Row-wise work: inline for a few rows (a decode step: a dispatch would cost more than the
/// work), else in chunks over the pool.
fn rows(pool: &Pool, m: usize, f: &(dyn Fn(usize, usize, usize) + Sync)) {
    if m < 4 {
        f(0, 0, m);
    } else {
        pool.run_chunks(m, grain(m, pool.threads(), 1), f);
    }
}

fn weight<'m>(module: &'m Module, name: &str) -> Result<&'m wkvc_ir::Weight, RuntimeError> {
    module
        .weights
        .get(name)
        .ok_or_else(|| err(format!("param @{name} is not in the weight store")))
}

fn param_ptr(
    module: &Module,
    name: &str,
    owned: &mut Vec<Vec<f32>>,
    cache: &mut HashMap<String, Ptr>,
) -> Result<Ptr, RuntimeError> {
    if let Some(p) = cache.get(name) {
        return Ok(*p);
    }
    let w = weight(module, name)?;
    let p = match (w.dtype(), w.storage_dtype()) {
        (DType::U4, _) | (DType::I8, _) => match w.bytes() {
            std::borrow::Cow::Borrowed(b) => Ptr(b.as_ptr()),
            std::borrow::Cow::Owned(_) => {
                return Err(err(format!("@{name}: packed data is not borrowable")));
            }
        },
        (DType::F32, DType::F32) => match w.f32() {
            std::borrow::Cow::Borrowed(b) => Ptr(b.as_ptr() as *const u8),
            std::borrow::Cow::Owned(_) => match w.bytes() {
                // f32 stored in a mapped file: read in place (the kernels load unaligned)
                std::borrow::Cow::Borrowed(b) => Ptr(b.as_ptr()),
                std::borrow::Cow::Owned(v) => {
                    owned.push(
                        v.chunks_exact(4)
                            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect(),
                    );
                    Ptr(owned
                        .last()
                        .map(|v| v.as_ptr() as *const u8)
                        .unwrap_or(std::ptr::null()))
                }
            },
        },
        _ => {
            owned.push(w.f32().into_owned());
            w.release_pages();
            Ptr(owned
                .last()
                .map(|v| v.as_ptr() as *const u8)
                .unwrap_or(std::ptr::null()))
        }
    };
    cache.insert(name.to_string(), p);
    Ok(p)
}

/// An f32 copy of a small param; the plan's pages are released (a mapped page read every
/// step would bring its neighbours with it through fault-around).
fn small_param(
    module: &Module,
    name: &str,
    owned: &mut Vec<Vec<f32>>,
    cache: &mut HashMap<String, Ptr>,
) -> Result<Ptr, RuntimeError> {
    if let Some(p) = cache.get(name) {
        return Ok(*p);
    }
    let w = weight(module, name)?;
    owned.push(w.f32().into_owned());
    w.release_pages();
    let p = Ptr(owned
        .last()
        .map_or(std::ptr::null(), |v| v.as_ptr() as *const u8));
    cache.insert(name.to_string(), p);
    Ok(p)
}

/// A quantized GEMM's codes (`codes`) or scales/zeros as the engine's copy in the kernel's
/// tile order (`tile_codes`, `tile_params`); the plan's pages are released.
#[allow(clippy::too_many_arguments)]
fn qgemm_param(
    module: &Module,
    name: &str,
    codes: bool,
    (rows, k, gl): (usize, usize, usize),
    owned: &mut Vec<Vec<f32>>,
    owned_u8: &mut Vec<Vec<u8>>,
    cache: &mut HashMap<String, Ptr>,
) -> Result<Ptr, RuntimeError> {
    if let Some(p) = cache.get(name) {
        return Ok(*p);
    }
    let w = weight(module, name)?;
    let ng = k.div_ceil(gl);
    let p = if codes {
        let b = w.bytes();
        if w.dtype() != DType::U4 || b.len() != rows * (k / 2) {
            return Err(err(format!(
                "@{name}: expected {rows} rows of {k} packed 4-bit codes, found {:?} {:?}",
                w.dtype(),
                w.shape
            )));
        }
        let t = wkvc_codegen::kernels::tile_codes(&b, rows, k, gl);
        drop(b);
        w.release_pages();
        owned_u8.push(t);
        Ptr(owned_u8.last().map_or(std::ptr::null(), |v| v.as_ptr()))
    } else {
        let f = w.f32();
        if f.len() != rows * ng {
            return Err(err(format!(
                "@{name}: expected {rows} x {ng} group parameters, found shape {:?}",
                w.shape
            )));
        }
        let t = wkvc_codegen::kernels::tile_params(&f, rows, ng);
        drop(f);
        w.release_pages();
        owned.push(t);
        Ptr(owned
            .last()
            .map_or(std::ptr::null(), |v| v.as_ptr() as *const u8))
    };
    cache.insert(name.to_string(), p);
    Ok(p)
}

struct LayerCache {
    /// values per token (kv heads x head dim) and kv heads
    width: usize,
    heads: usize,
    /// K and V codes (empty for an f32 cache)
    codes: [Vec<u8>; 2],
    /// K and V (scale, zero) per (token, kv head); or the f32 rows for a 16-bit cache
    params: [Vec<f32>; 2],
}

/// One sequence on the compiled engine.
pub struct CpuSession<'e> {
    engine: &'e CpuEngine,
    arena: Vec<f32>,
    xp: Vec<f32>,
    xq: Vec<i8>,
    attn: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    layers: HashMap<i64, LayerCache>,
    len: usize,
    max_ctx: usize,
    logits: Vec<f32>,
    /// int8 head: quantized input rows and their block scales
    hq: Vec<i8>,
    hdx: Vec<f32>,
}

#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut u8 {
        self.0
    }
}

impl CpuSession<'_> {
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
        self.len * self.engine.plan.kv_bytes_per_token
    }
    /// Bytes allocated for the cache (at max context).
    pub fn kv_capacity_bytes(&self) -> usize {
        self.max_ctx * self.engine.plan.kv_bytes_per_token
    }

    /// The cache's contents in the interpreter's form (the layout is the same).
    pub fn kv_cache(&self) -> Result<KvCache, RuntimeError> {
        let n = self.len;
        let layers = self
            .layers
            .iter()
            .map(|(&id, lc)| {
                let l = if lc.codes[0].is_empty() {
                    KvLayer {
                        width: lc.width,
                        heads: lc.heads,
                        k: lc.params[0][..n * lc.width].to_vec(),
                        v: lc.params[1][..n * lc.width].to_vec(),
                        ..Default::default()
                    }
                } else {
                    let rb = lc.width.div_ceil(2);
                    let pairs = |p: &[f32]| {
                        p[..2 * n * lc.heads]
                            .chunks(2)
                            .map(|c| (c[0], c[1]))
                            .collect()
                    };
                    KvLayer {
                        width: lc.width,
                        heads: lc.heads,
                        row_bytes: rb,
                        kc: lc.codes[0][..n * rb].to_vec(),
                        vc: lc.codes[1][..n * rb].to_vec(),
                        kp: pairs(&lc.params[0]),
                        vp: pairs(&lc.params[1]),
                        param_bytes: 2,
                        ..Default::default()
                    }
                };
                (id, l)
            })
            .collect();
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
        let fits = |lc: &LayerCache, l: &KvLayer| {
            l.width == lc.width
                && l.heads == lc.heads
                && l.rows() == n
                && l.is_quantized() != lc.codes[0].is_empty()
                && (!l.is_quantized() || l.row_bytes == lc.width.div_ceil(2))
        };
        if let Some(id) = self
            .layers
            .iter()
            .find(|(id, lc)| !cache.layer(**id).is_some_and(|l| fits(lc, l)))
            .map(|(id, _)| *id)
        {
            return Err(err(format!(
                "the cache has no layer {id} of this plan's shape with {n} rows"
            )));
        }
        for (id, lc) in self.layers.iter_mut() {
            let Some(l) = cache.layer(*id) else { continue };
            if l.is_quantized() {
                for (dst, src) in lc.codes.iter_mut().zip([&l.kc, &l.vc]) {
                    dst[..src.len()].copy_from_slice(src);
                }
                for (dst, src) in lc.params.iter_mut().zip([&l.kp, &l.vp]) {
                    for (d, &(s, z)) in dst.chunks_mut(2).zip(src.iter()) {
                        d[0] = s;
                        d[1] = z;
                    }
                }
            } else {
                for (dst, src) in lc.params.iter_mut().zip([&l.k, &l.v]) {
                    dst[..src.len()].copy_from_slice(src);
                }
            }
        }
        self.len = n;
        Ok(())
    }

    /// Run `ids`; logits of the last token (`&self.logits`) or, with `all`, of every token
    /// appended to `all`.
    pub fn run(
        &mut self,
        ids: &[u32],
        mode: RunMode,
        mut all: Option<&mut Vec<f32>>,
    ) -> Result<&[f32], RuntimeError> {
        crate::check_run(ids, self.engine.vocab, self.len, self.max_ctx)?;
        for chunk in ids.chunks(CHUNK) {
            self.chunk(chunk, mode, all.as_deref_mut())?;
        }
        Ok(&self.logits)
    }

    fn chunk(
        &mut self,
        ids: &[u32],
        mode: RunMode,
        all: Option<&mut Vec<f32>>,
    ) -> Result<(), RuntimeError> {
        let t_chunk = Instant::now();
        let eng = self.engine;
        let m = ids.len();
        let past = self.len;
        let mut tok = [0i32; CHUNK];
        let mut pos = [0i32; CHUNK];
        for (i, &t) in ids.iter().enumerate() {
            tok[i] = t as i32;
            pos[i] = (past + i) as i32;
        }
        // rope tables for every inv_freq set
        let hm = self.cos.len() / (CHUNK * eng.rope_sets.len().max(1));
        for (si, inv) in eng.rope_sets.iter().enumerate() {
            let half = inv.len();
            let base = si * CHUNK * hm;
            for (i, &pi) in pos.iter().enumerate().take(m) {
                for (j, &f) in inv.iter().enumerate() {
                    let a = (pi as f32 * f) as f64;
                    self.cos[base + i * half + j] = a.cos() as f32;
                    self.sin[base + i * half + j] = a.sin() as f32;
                }
            }
        }
        let threads = eng.pool.threads();
        let arena = SendPtr(self.arena.as_mut_ptr() as *mut u8);
        let fp = |off: usize| -> u64 { unsafe { (arena.get() as *mut f32).add(off) as u64 } };
        let mut all = all;
        let prof = eng.profile == 2;
        let mut ksum = 0f64;
        for st in &eng.steps {
            let tk = Instant::now();
            let p = |i: usize| -> u64 {
                match &st.args[i] {
                    Arg::Buf(o) => fp(*o),
                    Arg::Tokens => tok.as_ptr() as u64,
                    Arg::Positions => pos.as_ptr() as u64,
                    Arg::Param(q) => q.0 as u64,
                }
            };
            let y = fp(st.out);
            let f = st.f;
            match &st.spec {
                KernelSpec::Embed { dim, .. } => {
                    // in batches of 2 rows: once copied to the arena, a row's pages (and the
                    // 64 KiB around each that fault-around maps with it, up to 128 KiB a row)
                    // are released again when nothing else reads the table; batches of 16
                    // left up to 4 MiB of the table resident at a time during a prefill
                    const AROUND: usize = 64 << 10;
                    const BATCH: usize = 2;
                    for r0 in (0..m).step_by(BATCH) {
                        let r1 = (r0 + BATCH).min(m);
                        let a = [
                            p(0) + 4 * r0 as u64,
                            p(1),
                            y + (r0 * dim * 4) as u64,
                            (r1 - r0) as u64,
                        ];
                        unsafe { f(a.as_ptr()) };
                        if let Some(w) = &st.release {
                            for &t in &tok[r0..r1] {
                                let a = (t as usize * dim * 4).saturating_sub(AROUND);
                                w.release_range(a, 2 * AROUND + dim * 4);
                            }
                        }
                    }
                }
                KernelSpec::RmsNorm { .. } => {
                    let (x, w) = (p(0), p(1));
                    let dim = st.spec.out_cols() as u64;
                    rows(&eng.pool, m, &|_, a, b| {
                        let args = [
                            x + a as u64 * dim * 4,
                            w,
                            y + a as u64 * dim * 4,
                            (b - a) as u64,
                        ];
                        unsafe { f(args.as_ptr()) };
                    });
                }
                KernelSpec::SiluMul { n } => {
                    let x = p(0);
                    let n = *n as u64;
                    rows(&eng.pool, m, &|_, a, b| {
                        let args = [
                            x + a as u64 * 2 * n * 4,
                            y + a as u64 * n * 4,
                            (b - a) as u64,
                        ];
                        unsafe { f(args.as_ptr()) };
                    });
                }
                KernelSpec::QGemm {
                    k,
                    parts,
                    group,
                    residual,
                    act,
                    ..
                } => {
                    let k = *k;
                    let gl = wkvc_ir::quant::group_len(k, *group);
                    let ng = k.div_ceil(gl);
                    let nb = (k / gl) * (gl / 32) + (k % gl) / 32;
                    let x = p(0);
                    // prep: permuted / quantized rows, block scales, group sums
                    let (xp_len, gs_len) = (m * k, m * ng);
                    let (xpb, rest) = self.xp.split_at_mut(xp_len.max(1));
                    let (gsb, dxb) = rest.split_at_mut(gs_len.max(1));
                    let xs = unsafe { std::slice::from_raw_parts(x as *const f32, m * k) };
                    match act {
                        Act::F32 => {
                            for i in 0..m {
                                prep_f32(
                                    &xs[i * k..][..k],
                                    k,
                                    gl,
                                    &mut xpb[i * k..][..k],
                                    &mut gsb[i * ng..][..ng],
                                );
                            }
                        }
                        Act::Int8 => {
                            for i in 0..m {
                                prep_int8(
                                    &xs[i * k..][..k],
                                    k,
                                    gl,
                                    &mut self.xq[i * k..][..k],
                                    &mut dxb[i * nb..][..nb.max(1)],
                                    &mut gsb[i * ng..][..ng],
                                );
                            }
                        }
                    }
                    let xpp = match act {
                        Act::F32 => xpb.as_ptr() as u64,
                        Act::Int8 => self.xq.as_ptr() as u64,
                    };
                    let (gsp, dxp) = (gsb.as_ptr() as u64, dxb.as_ptr() as u64);
                    let ntot: usize = parts.iter().sum();
                    let r = if *residual { p(1 + 3 * parts.len()) } else { 0 };
                    eng.pool
                        // whole weight tiles per chunk
                        .run_chunks(ntot, grain(ntot, threads, QTILE), &|_, a, b| {
                            for_parts(parts, a, b, &mut |j, base, lo, hi| {
                                let args = [
                                    xpp,
                                    gsp,
                                    dxp,
                                    x,
                                    m as u64,
                                    p(1 + 3 * j),
                                    p(2 + 3 * j),
                                    p(3 + 3 * j),
                                    y + base as u64 * 4,
                                    ntot as u64,
                                    (lo - base) as u64,
                                    (hi - base) as u64,
                                    if r != 0 { r + base as u64 * 4 } else { 0 },
                                    ntot as u64,
                                ];
                                unsafe { f(args.as_ptr()) };
                            });
                        });
                }
                KernelSpec::Gemm {
                    parts, residual, ..
                } => {
                    let x = p(0);
                    let ntot: usize = parts.iter().sum();
                    let r = if *residual { p(1 + parts.len()) } else { 0 };
                    eng.pool
                        .run_chunks(ntot, grain(ntot, threads, 4), &|_, a, b| {
                            for_parts(parts, a, b, &mut |j, base, lo, hi| {
                                let args = [
                                    x,
                                    m as u64,
                                    p(1 + j),
                                    y + base as u64 * 4,
                                    ntot as u64,
                                    (lo - base) as u64,
                                    (hi - base) as u64,
                                    if r != 0 { r + base as u64 * 4 } else { 0 },
                                    ntot as u64,
                                ];
                                unsafe { f(args.as_ptr()) };
                            });
                        });
                }
                KernelSpec::Logits { vocab, dim, .. } => {
                    let (vocab, dim) = (*vocab, *dim);
                    let x = p(0);
                    let w = p(1);
                    let head = st.head;
                    let (hq, hdx) = (
                        SendPtr(self.hq.as_mut_ptr() as *mut u8),
                        SendPtr(self.hdx.as_mut_ptr() as *mut u8),
                    );
                    let run_rows = |x0: u64, rows: usize, y0: u64| {
                        if let Some((wq, ws)) = head {
                            let (wq, ws) = (wq.0 as u64, ws.0 as u64);
                            // int8 rows of the input (one group: the whole row)
                            let xs =
                                unsafe { std::slice::from_raw_parts(x0 as *const f32, rows * dim) };
                            let q = unsafe {
                                std::slice::from_raw_parts_mut(hq.get() as *mut i8, rows * dim)
                            };
                            let nb = dim / 32;
                            let d = unsafe {
                                std::slice::from_raw_parts_mut(hdx.get() as *mut f32, rows * nb)
                            };
                            let mut gs = [0f32; 1];
                            for r in 0..rows {
                                prep_int8(
                                    &xs[r * dim..][..dim],
                                    dim,
                                    dim,
                                    &mut q[r * dim..][..dim],
                                    &mut d[r * nb..][..nb],
                                    &mut gs,
                                );
                            }
                            eng.pool
                                .run_chunks(vocab, grain(vocab, threads, 4), &|_, a, b| {
                                    let args = [
                                        hq.get() as u64,
                                        hdx.get() as u64,
                                        rows as u64,
                                        wq,
                                        ws,
                                        y0,
                                        vocab as u64,
                                        a as u64,
                                        b as u64,
                                    ];
                                    unsafe { f(args.as_ptr()) };
                                });
                            return;
                        }
                        eng.pool
                            .run_chunks(vocab, grain(vocab, threads, 4), &|_, a, b| {
                                let args = [
                                    x0,
                                    rows as u64,
                                    w,
                                    y0,
                                    vocab as u64,
                                    a as u64,
                                    b as u64,
                                    0,
                                    0,
                                ];
                                unsafe { f(args.as_ptr()) };
                            });
                    };
                    match all.as_deref_mut() {
                        Some(out) => {
                            let start = out.len();
                            out.resize(start + m * vocab, 0.0);
                            run_rows(x, m, out[start..].as_mut_ptr() as u64);
                            self.logits.copy_from_slice(&out[start + (m - 1) * vocab..]);
                        }
                        None => {
                            let last = x + ((m - 1) * dim * 4) as u64;
                            run_rows(last, 1, self.logits.as_mut_ptr() as u64);
                        }
                    }
                }
                KernelSpec::RopeKv {
                    rope_dim,
                    layer,
                    smooth,
                    ..
                } => {
                    let half = rope_dim / 2;
                    let hm = self.cos.len() / (CHUNK * eng.rope_sets.len().max(1));
                    let base = st.rope * CHUNK * hm;
                    let c = self.cos[base..].as_ptr() as u64;
                    let s = self.sin[base..].as_ptr() as u64;
                    let lc = self
                        .layers
                        .get_mut(layer)
                        .ok_or_else(|| err(format!("no cache for layer {layer}")))?;
                    let (kc, vc) = if lc.codes[0].is_empty() {
                        (
                            lc.params[0].as_mut_ptr() as u64,
                            lc.params[1].as_mut_ptr() as u64,
                        )
                    } else {
                        (
                            lc.codes[0].as_mut_ptr() as u64,
                            lc.codes[1].as_mut_ptr() as u64,
                        )
                    };
                    let (kp, vp) = (
                        lc.params[0].as_mut_ptr() as u64,
                        lc.params[1].as_mut_ptr() as u64,
                    );
                    let sm = if *smooth {
                        [
                            p(st.args.len() - 4),
                            p(st.args.len() - 3),
                            p(st.args.len() - 2),
                            p(st.args.len() - 1),
                        ]
                    } else {
                        [0; 4]
                    };
                    let x = p(0);
                    let width = st.spec.out_cols() as u64;
                    rows(&eng.pool, m, &|_, a, b| {
                        let args = [
                            x + a as u64 * width * 4,
                            (b - a) as u64,
                            c + (a * half * 4) as u64,
                            s + (a * half * 4) as u64,
                            kc,
                            kp,
                            vc,
                            vp,
                            (past + a) as u64,
                            sm[0],
                            sm[1],
                            sm[2],
                            sm[3],
                        ];
                        unsafe { f(args.as_ptr()) };
                    });
                }
                KernelSpec::Attention {
                    heads,
                    kv_heads,
                    head_dim,
                    kv_bits,
                    past_only,
                    smooth,
                    layer,
                } => {
                    let (h, kvh, hd) = (*heads, *kv_heads, *head_dim);
                    let width = (h + 2 * kvh) * hd;
                    let x = p(0);
                    let lc = self
                        .layers
                        .get(layer)
                        .ok_or_else(|| err(format!("no cache for layer {layer}")))?;
                    let q16 = *kv_bits == 16;
                    let (kc, vc) = (lc.codes[0].as_ptr() as u64, lc.codes[1].as_ptr() as u64);
                    let (kp, vp) = (lc.params[0].as_ptr() as u64, lc.params[1].as_ptr() as u64);
                    let sm = if *smooth {
                        [p(1), p(2), p(3), p(4)]
                    } else {
                        [0; 4]
                    };
                    let per = self.attn.len() / threads;
                    let scr = SendPtr(self.attn.as_mut_ptr() as *mut u8);
                    let po = *past_only;
                    eng.pool.run_chunks(m * kvh, 1, &|t, a, b| {
                        let scratch = unsafe { (scr.get() as *mut f32).add(t * per) } as u64;
                        for item in a..b {
                            let (i, g) = (item / kvh, item % kvh);
                            let row = x + (i * width * 4) as u64;
                            let (nq, kf, vf, ldf, f0, f1) = if q16 {
                                (0, kp, vp, (kvh * hd) as u64, 0u64, (past + i + 1) as u64)
                            } else if !po {
                                (past + i + 1, 0, 0, 0, 0, 0)
                            } else if mode == RunMode::Prefill {
                                (
                                    past,
                                    row - (i * width * 4) as u64 + (h * hd * 4) as u64,
                                    row - (i * width * 4) as u64 + ((h + kvh) * hd * 4) as u64,
                                    width as u64,
                                    0,
                                    (i + 1) as u64,
                                )
                            } else {
                                (
                                    past + i,
                                    row - (i * width * 4) as u64 + (h * hd * 4) as u64,
                                    row - (i * width * 4) as u64 + ((h + kvh) * hd * 4) as u64,
                                    width as u64,
                                    i as u64,
                                    (i + 1) as u64,
                                )
                            };
                            let args = [
                                row,
                                kc,
                                kp,
                                vc,
                                vp,
                                nq as u64,
                                kf,
                                vf,
                                ldf,
                                f0,
                                f1,
                                g as u64,
                                y + (i * h * hd * 4) as u64,
                                scratch,
                                sm[0],
                                sm[1],
                                sm[2],
                                sm[3],
                            ];
                            unsafe { f(args.as_ptr()) };
                        }
                    });
                }
            }
            ksum += tk.elapsed().as_secs_f64();
            if prof {
                eprintln!(
                    "profile {} {:.3} ms",
                    st.spec.kind(),
                    tk.elapsed().as_secs_f64() * 1e3
                );
            }
        }
        if eng.profile > 0 {
            eprintln!(
                "profile chunk {:.3} ms, kernels {:.3} ms, waiting for workers {:.3} ms",
                t_chunk.elapsed().as_secs_f64() * 1e3,
                ksum * 1e3,
                crate::pool::WAIT_NS.swap(0, std::sync::atomic::Ordering::Relaxed) as f64 * 1e-6
            );
        }
        self.len += m;
        Ok(())
    }
}

/// The tied table as int8 per block of 32 columns (scale max|w|/127, round half to even),
/// each block permuted like the activations (`prep_int8`: evens, then odds).
fn quantize_head(w: &wkvc_ir::Weight, vocab: usize, dim: usize) -> (Vec<i8>, Vec<f32>) {
    use rayon::prelude::*;
    let nb = dim / 32;
    let mut q = vec![0i8; vocab * dim];
    let mut s = vec![0f32; vocab * nb];
    let raw = w.bytes();
    // in slices of rows, each slice's pages released once quantized (no 113 MB spike)
    let rows = (8 << 20) / (4 * dim).max(1);
    for (si, (qs, ss)) in q
        .chunks_mut(rows * dim)
        .zip(s.chunks_mut(rows * nb))
        .enumerate()
    {
        let r0 = si * rows;
        qs.par_chunks_mut(dim)
            .zip(ss.par_chunks_mut(nb))
            .enumerate()
            .for_each(|(r, (qr, sr))| {
                let row = &raw[(r0 + r) * dim * 4..(r0 + r + 1) * dim * 4];
                let w = |c: usize| {
                    f32::from_le_bytes([row[4 * c], row[4 * c + 1], row[4 * c + 2], row[4 * c + 3]])
                };
                for b in 0..nb {
                    let amax = (0..32).fold(0f32, |m, t| m.max(w(32 * b + t).abs()));
                    let d = amax / 127.0;
                    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                    for t in 0..32 {
                        let v = wkvc_ir::quant::rne(w(32 * b + t) * inv).clamp(-127.0, 127.0) as i8;
                        let pos = if t % 2 == 0 { t / 2 } else { 16 + t / 2 };
                        qr[32 * b + pos] = v;
                    }
                    sr[b] = d;
                }
            });
        w.release_range(r0 * dim * 4, qs.len() / dim * dim * 4);
    }
    (q, s)
}

/// Is this node's kernel one the engine runs? (for messages)
pub fn describe(n: &Node) -> String {
    wkvc_ir::text::print_node(n)
}
