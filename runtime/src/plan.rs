//! The plan file: one safetensors container. Tensors are the module's weights (packed int4
//! codes as bytes, f16 scales/zeros, f32 embeddings, norms and smoothing vectors);
//! `__metadata__["wkvc.manifest"]` is a versioned JSON manifest (config, quant config, graph
//! text, tokenizer, provenance, measured quality, memory plan, pass reports, and per-tensor
//! dtype, shape and sha256). Written to a temp file and renamed; opened with mmap and
//! validated field by field before use.

use crate::RuntimeError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use wkvc_ir::import::{Source, TokenizerSpec};
use wkvc_ir::weights::{map_file, mapped_weight, storage_bytes};
use wkvc_ir::{DType, ModelConfig, Module, WeightStore};

pub const FORMAT: &str = "wkvc-plan";
pub const VERSION: u32 = 2;
const META_KEY: &str = "wkvc.manifest";

/// How a plan was quantized.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantConfig {
    /// 16 = full precision
    pub wbits: u32,
    pub wgroup: i64,
    pub kvbits: u32,
    pub past_only: bool,
    /// Past-only attention's recent window (1: the position's own K/V only; absent in plans
    /// from before it existed).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub kv_window: usize,
    pub smooth: bool,
    pub method: String,
    /// Where calibration text came from ("file PATH", "sampled from the FP model (data-free)",
    /// or "none").
    pub calibration: String,
    pub calib_tokens: usize,
    /// `--method wkvquant`: the calibration settings and what it did (per-block losses, steps,
    /// seconds, peak RSS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibrate: Option<serde_json::Value>,
    /// The K/V rotation's Hadamard block (0: none; absent in plans from before it existed).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub kv_rotate: usize,
    /// Channels per (scale, zero) group of the cache (0: one group a kv head; absent in plans
    /// from before it existed).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub kv_group: usize,
    /// Bits of each layer's cache when they differ from `kvbits` (`--kv-bits-per-layer`;
    /// 16: that layer's cache in full precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_bits_per_layer: Option<Vec<u32>>,
    /// The sensitivity scan that chose them (`--kv-bits-per-layer auto:B`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_sensitivity: Option<crate::compile::KvScan>,
}

impl QuantConfig {
    /// The cache's precision in words: `KV4`, or with per-layer bits
    /// `KV per layer 4,3,4,... (average 3.50 bits)`; `, groups of 32` with `kv_group`.
    pub fn kv_label(&self) -> String {
        let bits = match &self.kv_bits_per_layer {
            None => format!("KV{}", self.kvbits),
            Some(l) => format!(
                "KV per layer {} (average {:.2} bits)",
                l.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
                l.iter().sum::<u32>() as f64 / l.len().max(1) as f64
            ),
        };
        match self.kv_group {
            0 => bits,
            g => format!("{bits}, groups of {g}"),
        }
    }

    /// Past-only attention in words: `true`, `true (window 16)` or `false`.
    pub fn past_only_label(&self) -> String {
        match (self.past_only, self.kv_window) {
            (true, w) if w > 1 => format!("true (window {w})"),
            (p, _) => p.to_string(),
        }
    }

    /// The K/V rotation in words: `none` or `hadamard/64`.
    pub fn rotation_label(&self) -> String {
        match self.kv_rotate {
            0 => "none".into(),
            b => format!("hadamard/{b}"),
        }
    }
}

fn one() -> usize {
    1
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

/// The lowered plan as recorded at compile time (`wkvc_passes::lower::LoweredPlan`): the
/// kernel graph's text and its memory plan. Engines rebuild the plan's steps from the text
/// without lowering again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoweredRecord {
    /// The GEMMs' activation mode the plan selects (`wkvc compile --cpu-act`).
    pub act: wkvc_ir::Act,
    pub graph: String,
    pub memory: wkvc_passes::lower::MemoryPlan,
}

/// The CUDA back end's code for a plan (`wkvc compile --target cpu,cuda`): per distinct
/// kernel of the lowered graph its CUDA C and the PTX NVRTC made of it, keyed by the sha256
/// of the source. The PTX runs on the recorded architecture and later ones (the driver
/// JIT-compiles it); an engine for another architecture recompiles the source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CudaPlan {
    /// NVRTC version that made the PTX ("12.9")
    pub nvrtc: String,
    /// the PTX's virtual architecture (80: compute_80)
    pub ptx_arch: u32,
    pub kernels: Vec<CudaModule>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CudaModule {
    /// the kernel spec's code name
    pub name: String,
    /// sha256 of `source` (hex)
    pub sha256: String,
    /// `extern "C"` entry points
    pub entries: Vec<String>,
    pub source: String,
    pub ptx: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Logical dtype the graph sees (u4 is stored as U8 bytes, two codes per byte).
    pub dtype: String,
    pub shape: Vec<usize>,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub tool_version: String,
    pub config: ModelConfig,
    pub quant: QuantConfig,
    pub graph: String,
    pub tokenizer: Option<TokenizerSpec>,
    pub source: Source,
    pub source_sha256: String,
    pub quality: serde_json::Value,
    /// The lowered plan of the compiled back ends (chunks of `CHUNK` rows, the model's
    /// maximum context). Absent when the graph has something the kernels do not implement
    /// (the interpreter runs such plans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lowered: Option<LoweredRecord>,
    /// The CUDA back end's sources and PTX (only with `--target cuda`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda: Option<CudaPlan>,
    pub passes: serde_json::Value,
    pub tensors: BTreeMap<String, TensorEntry>,
}

/// sha256 of a string, hex.
pub fn sha256_hex(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

fn perr(path: &Path, msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Plan(format!("{}: {}", path.display(), msg.into()))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, streamed.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::I32 => safetensors::Dtype::I32,
        DType::I8 => safetensors::Dtype::I8,
        DType::U4 => safetensors::Dtype::U8,
    }
}

/// Physical shape in the container: u4 rows become bytes.
fn physical_shape(d: DType, shape: &[usize]) -> Vec<usize> {
    match d {
        DType::U4 => {
            let mut s = shape.to_vec();
            if let Some(l) = s.last_mut() {
                *l = l.div_ceil(2);
            }
            s
        }
        _ => shape.to_vec(),
    }
}

/// Can a plan be written to `path`? Its folder must exist and take a new file (checked by
/// creating and removing one), and `path` must not be a folder. Run before long work, so that
/// a compile fails at once rather than after calibrating.
pub fn check_destination(path: &Path) -> Result<(), RuntimeError> {
    if path.is_dir() {
        return Err(perr(path, "is a folder: give the plan file's name"));
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(perr(
            path,
            format!("the folder {} does not exist", dir.display()),
        ));
    }
    for f in clean_stale_temp_files(dir) {
        tracing::warn!(
            "removed {} (left by an interrupted compile)",
            dir.join(f).display()
        );
    }
    let probe = dir.join(format!(".wkvc-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| {
        perr(
            path,
            format!(
                "cannot write to {}: {}",
                dir.display(),
                wkvc_ir::io_reason(&e)
            ),
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Write `module` with `manifest` (its `tensors` and `graph` are filled in here) to `path`
/// atomically: a temp file in the same directory, renamed at the end.
pub fn write(path: &Path, module: &Module, mut manifest: Manifest) -> Result<u64, RuntimeError> {
    manifest.graph = wkvc_ir::text::print(&module.graph);
    // The container is written as it is produced: tensors in safetensors' order (dtype
    // alignment, then name), each one's bytes made (converted from a mapped source, say) only
    // while hashed and again while written, so memory holds one tensor at a time.
    let mut order: Vec<(&String, &wkvc_ir::Weight)> = module.weights.iter().collect();
    order.sort_by(|(ln, l), (rn, r)| {
        st_dtype(r.dtype())
            .cmp(&st_dtype(l.dtype()))
            .then(ln.cmp(rn))
    });
    manifest.tensors.clear();
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0usize;
    for (name, w) in &order {
        let mut h = Sha256::new();
        let mut len = 0usize;
        w.visit_bytes(&mut |b| {
            h.update(b);
            len += b.len();
            Ok::<(), ()>(())
        })
        .map_err(|_| perr(path, format!("tensor `{name}`: cannot read its bytes")))?;
        manifest.tensors.insert(
            (*name).clone(),
            TensorEntry {
                dtype: w.dtype().name().into(),
                shape: w.shape.clone(),
                sha256: hex(&h.finalize()),
            },
        );
        let d = st_dtype(w.dtype());
        let shape = physical_shape(w.dtype(), &w.shape);
        let want = shape.iter().product::<usize>() * d.bitsize() / 8;
        if len != want {
            return Err(perr(
                path,
                format!("tensor `{name}`: {len} bytes for shape {shape:?} of {d:?}"),
            ));
        }
        infos.push((
            (*name).clone(),
            safetensors::tensor::TensorInfo {
                dtype: d,
                shape,
                data_offsets: (offset, offset + len),
            },
        ));
        offset += len;
        w.release_pages();
    }
    let json = serde_json::to_string(&manifest).map_err(|e| perr(path, e.to_string()))?;
    let meta: HashMap<String, String> = [(META_KEY.to_string(), json)].into_iter().collect();
    let header = safetensors::tensor::Metadata::new(Some(meta), infos)
        .map_err(|e| perr(path, format!("container header: {e}")))?;
    let mut header = serde_json::to_string(&header)
        .map_err(|e| perr(path, e.to_string()))?
        .into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let fname = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(
        ".{fname}{TEMP_MARK}{}-{}",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    // Held (locked) for as long as the temp file is being written: a compile that finds an
    // unlocked temp file knows its writer is gone (killed) and removes it.
    let lock = create_locked(&tmp).map_err(|e| perr(&tmp, format!("cannot create: {e}")))?;
    let r = write_container(&lock, &header, &order)
        .map_err(|e| perr(&tmp, format!("cannot write: {e}")))
        .and_then(|_| {
            // on disk before it gets the plan's name: a crash after the rename never
            // leaves a plan with missing data
            lock.sync_all()
                .map_err(|e| perr(&tmp, format!("cannot flush to disk: {e}")))
        })
        .map(|_| {
            // the temp file is created private; a finished plan is an ordinary file
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644));
            }
        })
        .and_then(|_| {
            std::fs::rename(&tmp, path).map_err(|e| {
                perr(
                    path,
                    format!("cannot rename the finished plan into place: {e}"),
                )
            })
        });
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // the rename itself on disk (best effort: not every file system syncs folders)
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    drop(lock);
    Ok(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0))
}

/// The container's bytes: header length, header, each tensor's bytes in `order`.
fn write_container(
    f: &std::fs::File,
    header: &[u8],
    order: &[(&String, &wkvc_ir::Weight)],
) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(header)?;
    for (_, w) in order {
        w.visit_bytes(&mut |b| out.write_all(b))?;
        w.release_pages();
    }
    out.flush()
}

/// What names a plan's temp file: `.NAME.wkvc-tmp-PID-N` beside the plan.
const TEMP_MARK: &str = ".wkvc-tmp-";
static TEMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Create `tmp` (new, private) and hold an exclusive lock on it. The lock is taken on the
/// file that is at `tmp` afterwards (a concurrent cleanup could remove the file between the
/// create and the lock: then it is created again).
fn create_locked(tmp: &Path) -> std::io::Result<std::fs::File> {
    for _ in 0..8 {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        let f = o.open(tmp)?;
        f.lock()?;
        if same_file(&f, tmp) {
            return Ok(f);
        }
    }
    Err(std::io::Error::other(
        "the temp file keeps being removed by another process",
    ))
}

#[cfg(unix)]
fn same_file(f: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::File, path: &Path) -> bool {
    path.exists()
}

/// Remove the temp files that compiles killed mid-write left in `dir` (a plan's temp file
/// whose lock nobody holds, a write probe, a spill file killed in the moment between its
/// creation and its unlinking); returns their names. A temp file of a compile
/// that is still writing is locked and stays.
pub fn clean_stale_temp_files(dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return removed;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = (name.starts_with('.') && name.contains(TEMP_MARK))
            || name.starts_with(".wkvc-probe-")
            || name.starts_with(".wkvc-spill-");
        if !ours || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Ok(f) = std::fs::File::open(e.path()) else {
            continue;
        };
        if f.try_lock().is_ok() && std::fs::remove_file(e.path()).is_ok() {
            removed.push(name);
        }
    }
    removed.sort();
    removed
}

/// Does the file look like a plan (safetensors header carrying a wkvc manifest)?
pub fn is_plan(path: &Path) -> bool {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut head = [0u8; 8];
    if f.read_exact(&mut head).is_err() {
        return false;
    }
    let n = u64::from_le_bytes(head);
    if n == 0 || n > 100 << 20 {
        return false;
    }
    let mut buf = vec![0u8; (n as usize).min(1 << 16)];
    if f.read_exact(&mut buf).is_err() || buf.first() != Some(&b'{') {
        return false;
    }
    path.extension().is_some_and(|e| e == "wkv")
        || buf
            .windows(META_KEY.len())
            .any(|w| w == META_KEY.as_bytes())
}

/// Open and validate a plan: container structure, manifest format and version, every
/// tensor's dtype, shape and sha256, the graph (parsed and verified against the tensors).
pub fn open(path: &Path) -> Result<(Module, Manifest), RuntimeError> {
    let map = map_file(path).map_err(|e| perr(path, format!("cannot open: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| {
        perr(
            path,
            format!("not a valid plan container (truncated or corrupt?): {e}"),
        )
    })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map)
        .map_err(|e| perr(path, format!("bad container header: {e}")))?;
    let text = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| perr(path, "no wkvc manifest in the header: not a wkvc plan"))?;
    let (manifest, graph) = parse_manifest(text).map_err(|e| perr(path, e))?;
    let base = map.as_ptr() as usize;
    let mut weights = WeightStore::new();
    let names: std::collections::BTreeSet<String> =
        st.names().into_iter().map(String::from).collect();
    for (name, e) in &manifest.tensors {
        let view = st.tensor(name).map_err(|_| {
            perr(
                path,
                format!("tensor `{name}` listed in the manifest is missing"),
            )
        })?;
        let dtype = DType::from_name(&e.dtype).ok_or_else(|| {
            perr(
                path,
                format!("tensor `{name}`: unknown dtype `{}`", e.dtype),
            )
        })?;
        if view.dtype() != st_dtype(dtype)
            || view.shape() != physical_shape(dtype, &e.shape).as_slice()
        {
            return Err(perr(
                path,
                format!(
                    "tensor `{name}`: container holds {:?}{:?}, the manifest says {}{:?}",
                    view.dtype(),
                    view.shape(),
                    e.dtype,
                    e.shape
                ),
            ));
        }
        if view.data().len() != storage_bytes(dtype, &e.shape) {
            return Err(perr(
                path,
                format!(
                    "tensor `{name}`: {} bytes, expected {}",
                    view.data().len(),
                    storage_bytes(dtype, &e.shape)
                ),
            ));
        }
        let got = hex(&Sha256::digest(view.data()));
        if got != e.sha256 {
            return Err(perr(
                path,
                format!(
                    "tensor `{name}`: content hash mismatch (the plan is corrupt or was modified)"
                ),
            ));
        }
        let offset = view.data().as_ptr() as usize - base;
        let w = mapped_weight(e.shape.clone(), map.clone(), offset, dtype);
        // hashing read every page; engines read again what they use
        w.release_pages();
        weights.insert(name.clone(), w);
    }
    if let Some(extra) = names.iter().find(|n| !manifest.tensors.contains_key(*n)) {
        return Err(perr(
            path,
            format!("tensor `{extra}` is not listed in the manifest"),
        ));
    }
    // the header (manifest) is parsed: its pages are not read again
    let header = 8 + u64::from_le_bytes(map[..8].try_into().unwrap_or_default()) as usize;
    wkvc_ir::weights::release_mapped(&map, 0, header.min(map.len()));
    let module = Module { graph, weights };
    module
        .verify()
        .map_err(|e| perr(path, format!("manifest graph: {e}")))?;
    Ok((module, manifest))
}

/// Parse and check a plan's manifest (the JSON in the container's header): format and
/// version, the model config, the graph text and the lowered graph text (both parsed). The
/// graph is returned parsed; [`open`] then checks it against the container's tensors.
pub fn parse_manifest(text: &str) -> Result<(Manifest, wkvc_ir::Graph), String> {
    let manifest: Manifest = serde_json::from_str(text).map_err(|e| format!("manifest: {e}"))?;
    if manifest.format != FORMAT {
        return Err(format!(
            "manifest format is `{}`, expected `{FORMAT}`",
            manifest.format
        ));
    }
    if manifest.version != VERSION {
        return Err(format!(
            "plan format version {} is not supported by this wkvc (reads version {VERSION}); \
             recompile the plan",
            manifest.version
        ));
    }
    manifest
        .config
        .validate()
        .map_err(|e| format!("manifest config: {e}"))?;
    let graph =
        wkvc_ir::text::parse(&manifest.graph).map_err(|e| format!("manifest graph: {e}"))?;
    if let Some(l) = &manifest.lowered {
        wkvc_ir::text::parse(&l.graph).map_err(|e| format!("manifest lowered graph: {e}"))?;
    }
    Ok((manifest, graph))
}
