//! Named parameters: owned or memory-mapped, in f32 or a storage dtype (f16 scales, packed u4
//! codes). Checkpoint floats (f16/bf16 safetensors) are widened to f32 on read, so the graph
//! sees them as f32.

use crate::types::{DType, Dim, TensorType};
use half::{bf16, f16};
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Clone, Debug)]
enum Data {
    F32(Arc<Vec<f32>>),
    /// Raw little-endian bytes in `stored` dtype.
    Bytes(Arc<Vec<u8>>),
    /// Bytes at `offset` in a mapped file.
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
    },
    /// GGUF blocks of `ggml` type (`nbytes` at `offset` of a mapped file), dequantized to f32
    /// on every read; `unpermute`: llama.cpp's q/k row order undone for that many heads.
    Gguf {
        map: Arc<Mmap>,
        offset: usize,
        nbytes: usize,
        ggml: crate::gguf::GgmlType,
        unpermute: Option<usize>,
    },
}

/// One parameter tensor.
#[derive(Clone, Debug)]
pub struct Weight {
    pub shape: Vec<usize>,
    /// The dtype the graph sees.
    dtype: DType,
    /// The dtype of the stored bytes (f16/bf16 checkpoint data is seen as f32).
    stored: DType,
    data: Data,
}

impl Weight {
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Weight {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Weight {
            shape,
            dtype: DType::F32,
            stored: DType::F32,
            data: Data::F32(Arc::new(data)),
        }
    }

    /// f16 values, stored as f16 and seen as f16 by the graph (quantization scales).
    pub fn from_f16(shape: Vec<usize>, data: &[f16]) -> Weight {
        Weight {
            shape,
            dtype: DType::F16,
            stored: DType::F16,
            data: Data::Bytes(Arc::new(
                data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )),
        }
    }

    /// Raw bytes of `dtype` (u4: two codes per byte, low nibble first, rows padded to bytes).
    pub fn from_bytes(shape: Vec<usize>, dtype: DType, bytes: Vec<u8>) -> Weight {
        Weight {
            shape,
            dtype,
            stored: dtype,
            data: Data::Bytes(Arc::new(bytes)),
        }
    }

    /// A view into a mapped file; the caller has checked that the byte range is in bounds.
    /// `seen_as` is the graph dtype (f32 for checkpoint floats, else `stored`).
    pub(crate) fn mapped(
        shape: Vec<usize>,
        map: Arc<Mmap>,
        offset: usize,
        stored: DType,
        seen_as: DType,
    ) -> Weight {
        Weight {
            shape,
            dtype: seen_as,
            stored,
            data: Data::Mapped { map, offset },
        }
    }

    /// A GGUF tensor left in its file: `nbytes` of `ggml` blocks at `offset` (the caller has
    /// checked the range and that the blocks hold `shape`'s elements), read as f32 on demand.
    pub(crate) fn gguf(
        shape: Vec<usize>,
        map: Arc<Mmap>,
        offset: usize,
        nbytes: usize,
        ggml: crate::gguf::GgmlType,
        unpermute: Option<usize>,
    ) -> Weight {
        Weight {
            shape,
            dtype: DType::F32,
            stored: DType::F32,
            data: Data::Gguf {
                map,
                offset,
                nbytes,
                ggml,
                unpermute,
            },
        }
    }

    /// Is this weight read from a file on demand (its values not held in memory)?
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, Data::Mapped { .. } | Data::Gguf { .. })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn ty(&self) -> TensorType {
        TensorType::new(
            self.dtype,
            self.shape.iter().map(|&d| Dim::Const(d)).collect(),
        )
    }

    /// Storage dtype of the data.
    pub fn storage_dtype(&self) -> DType {
        self.stored
    }

    /// Bytes of storage: u4 rows are padded to whole bytes.
    pub fn storage_bytes(&self) -> usize {
        storage_bytes(self.stored, &self.shape)
    }

    /// The bytes of the values in the graph's dtype, little-endian: borrowed where stored so,
    /// converted otherwise (checkpoint f16/bf16 and GGUF blocks seen as f32 become f32 bytes).
    pub fn bytes(&self) -> Cow<'_, [u8]> {
        let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        match &self.data {
            Data::F32(v) => Cow::Owned(f32_bytes(v)),
            Data::Bytes(b) => Cow::Borrowed(&b[..]),
            Data::Mapped { map, offset } if self.stored == self.dtype => {
                Cow::Borrowed(&map[*offset..*offset + self.storage_bytes()])
            }
            Data::Mapped { .. } | Data::Gguf { .. } => Cow::Owned(f32_bytes(&self.f32())),
        }
    }

    /// The stored bytes when they are the graph dtype's and need no conversion (in memory or
    /// mapped); None for converted tensors (f16/bf16 seen as f32, GGUF blocks) and f32 vectors.
    pub fn raw_bytes(&self) -> Option<&[u8]> {
        match &self.data {
            Data::Bytes(b) => Some(&b[..]),
            Data::Mapped { map, offset } if self.stored == self.dtype => {
                Some(&map[*offset..*offset + self.storage_bytes()])
            }
            _ => None,
        }
    }

    /// The bytes `bytes()` gives, handed to `f` in order in slices of at most about 4 MiB:
    /// converted ones through one reused buffer, so a tensor's bytes are never all in memory
    /// twice (a 1.6 GB f32 embedding made from f16 costs 4 MiB, not 1.6 GB).
    pub fn visit_bytes<E>(&self, f: &mut dyn FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        const CHUNK: usize = 1 << 20; // elements
        let mut buf: Vec<u8> = Vec::new();
        let emit = |vals: &mut dyn Iterator<Item = f32>, buf: &mut Vec<u8>| {
            buf.clear();
            buf.extend(vals.flat_map(|x| x.to_le_bytes()));
        };
        match &self.data {
            Data::Mapped { map, offset } if self.stored != self.dtype => {
                let raw = &map[*offset..*offset + self.storage_bytes()];
                let conv: fn(&[u8]) -> f32 = match self.stored {
                    DType::F16 => |c| f16::from_le_bytes([c[0], c[1]]).to_f32(),
                    DType::BF16 => |c| bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                    _ => return f(&self.bytes()),
                };
                for part in raw.chunks(2 * CHUNK) {
                    emit(&mut part.chunks_exact(2).map(conv), &mut buf);
                    f(&buf)?;
                }
                Ok(())
            }
            Data::F32(_) | Data::Gguf { .. } => {
                let v = self.f32();
                for part in v.chunks(CHUNK) {
                    emit(&mut part.iter().copied(), &mut buf);
                    f(&buf)?;
                }
                Ok(())
            }
            _ => f(&self.bytes()),
        }
    }

    /// (stored bytes, elements)
    pub fn size(&self) -> (usize, usize) {
        (self.storage_bytes(), self.shape.iter().product())
    }

    /// Drop this weight's pages from memory when it is a view of a mapped file (they are read
    /// again from the file on the next access); a no-op for weights held in memory. Engines
    /// call it after building their own copy of a weight.
    pub fn release_pages(&self) {
        self.release_range(0, self.storage_bytes());
    }

    /// `release_pages` for the pages that hold the bytes `start..start + len` of this weight
    /// (a neighbour's bytes on a shared page are simply read again when used).
    pub fn release_range(&self, start: usize, len: usize) {
        if let Data::Gguf {
            map,
            offset,
            nbytes,
            ..
        } = &self.data
        {
            // `start`/`len` count f32 bytes: scaled to the blocks' bytes (whole pages either way)
            let f = (*nbytes as f64) / (self.storage_bytes().max(1) as f64);
            let a = ((start as f64) * f) as usize;
            let l = ((len as f64) * f).ceil() as usize + 1;
            release_mapped(map, offset + a.min(*nbytes), l.min(nbytes - a.min(*nbytes)));
            return;
        }
        if let Data::Mapped { map, offset } = &self.data {
            let page = 4096;
            let a = (offset + start) / page * page;
            let b = ((offset + start + len.min(self.storage_bytes().saturating_sub(start)))
                .div_ceil(page)
                * page)
                .min(map.len());
            if b > a {
                // SAFETY: the map is a read-only private file mapping: DONTNEED only drops
                // clean pages, which are re-read from the file when touched again.
                let _ = unsafe {
                    map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
                };
            }
        }
    }

    /// Tell the OS this weight is read in scattered rows (no read-ahead around a touched
    /// page): an embedding table of which a prompt uses a few rows.
    pub fn advise_random(&self) {
        match &self.data {
            Data::Mapped { map, offset } => {
                let _ = map.advise_range(memmap2::Advice::Random, *offset, self.storage_bytes());
            }
            Data::Gguf {
                map,
                offset,
                nbytes,
                ..
            } => {
                let _ = map.advise_range(memmap2::Advice::Random, *offset, *nbytes);
            }
            _ => {}
        }
    }

    /// The values as f32: borrowed when stored as aligned f32, converted otherwise. Packed
    /// u4 codes come back as their integer values 0..15.
    pub fn f32(&self) -> Cow<'_, [f32]> {
        if let Data::F32(v) = &self.data {
            return Cow::Borrowed(&v[..]);
        }
        if let Data::Gguf {
            map,
            offset,
            nbytes,
            ggml,
            unpermute,
        } = &self.data
        {
            let v = crate::gguf::dequantize(*ggml, &map[*offset..*offset + *nbytes]);
            return Cow::Owned(match unpermute {
                Some(h) => {
                    let rows = self.shape[0];
                    let cols = self.shape.get(1).copied().unwrap_or(1);
                    crate::import::unpermute_rows(&v, rows, cols, *h)
                }
                None => v,
            });
        }
        let bytes: &[u8] = match &self.data {
            Data::Bytes(b) => b,
            Data::Mapped { map, offset } => &map[*offset..*offset + self.storage_bytes()],
            Data::F32(_) | Data::Gguf { .. } => &[],
        };
        match self.stored {
            DType::F32 => {
                // SAFETY: f32 has no invalid bit patterns; align_to yields the aligned middle.
                let (pre, mid, post) = unsafe { bytes.align_to::<f32>() };
                if pre.is_empty() && post.is_empty() && cfg!(target_endian = "little") {
                    Cow::Borrowed(mid)
                } else {
                    Cow::Owned(
                        bytes
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect(),
                    )
                }
            }
            DType::F16 => Cow::Owned(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            DType::BF16 => Cow::Owned(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            DType::I32 => Cow::Owned(
                bytes
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                    .collect(),
            ),
            DType::I8 => Cow::Owned(bytes.iter().map(|&b| b as i8 as f32).collect()),
            DType::U4 => {
                let cols = self.shape.last().copied().unwrap_or(1);
                let row_bytes = cols.div_ceil(2);
                let mut out = Vec::with_capacity(self.numel());
                for row in bytes.chunks(row_bytes.max(1)) {
                    for c in 0..cols {
                        let b = row[c / 2];
                        out.push(if c % 2 == 0 { b & 0x0F } else { b >> 4 } as f32);
                    }
                }
                Cow::Owned(out)
            }
        }
    }
}

/// Storage bytes of a tensor: u4 rows (last dim) are padded to whole bytes.
pub fn storage_bytes(dtype: DType, shape: &[usize]) -> usize {
    match dtype {
        DType::U4 => {
            let cols = shape.last().copied().unwrap_or(1);
            let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
            rows * cols.div_ceil(2)
        }
        d => d.bytes_for(shape.iter().product()),
    }
}

/// A file that tensors made by passes (packed codes, scales) are written to as they are
/// produced, each read back through its own memory map: compiling a model bigger than
/// memory keeps its output on disk until the plan is written. The file is removed from its
/// folder as soon as it is created (it lives while mapped or open, and nothing is left
/// behind however the process ends).
#[derive(Debug)]
pub struct Spill {
    file: std::fs::File,
    len: u64,
}

static SPILL_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Spill {
    /// A new spill file in `dir`.
    pub fn create(dir: &std::path::Path) -> std::io::Result<Spill> {
        let path = dir.join(format!(
            ".wkvc-spill-{}-{}",
            std::process::id(),
            SPILL_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        // (a compile cleaning the folder may have removed it already: it only needs a name
        // until it is open)
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(Spill { file, len: 0 })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Write `w`'s bytes (page-aligned, in slices: a converted tensor is never whole in
    /// memory) and return the same weight read from the file.
    pub fn store(&mut self, w: &Weight) -> std::io::Result<Weight> {
        use std::os::unix::fs::FileExt;
        let offset = self.len.next_multiple_of(4096);
        let mut at = offset;
        let file = &self.file;
        w.visit_bytes(&mut |b| {
            file.write_all_at(b, at)?;
            at += b.len() as u64;
            Ok::<(), std::io::Error>(())
        })?;
        let len = (at - offset) as usize;
        if len == 0 {
            return Ok(w.clone());
        }
        self.len = at;
        w.release_pages();
        // SAFETY: the file is private to this process (unlinked at creation) and this region
        // is never written again.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len)
                .map(&self.file)
        }?;
        Ok(Weight::mapped(
            w.shape.clone(),
            Arc::new(map),
            0,
            w.dtype,
            w.dtype,
        ))
    }
}

/// The parameters of a module, by name.
#[derive(Clone, Debug, Default)]
pub struct WeightStore {
    map: BTreeMap<String, Weight>,
    /// Where `insert_made` puts new tensors (shared by clones of the store).
    spill: Option<Arc<std::sync::Mutex<Spill>>>,
}

impl WeightStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, w: Weight) {
        self.map.insert(name.into(), w);
    }

    /// Send the tensors passes make from now on (`insert_made`) to `spill` instead of memory.
    pub fn spill_to(&mut self, spill: Spill) {
        self.spill = Some(Arc::new(std::sync::Mutex::new(spill)));
    }

    /// Bytes spilled to disk so far.
    pub fn spilled_bytes(&self) -> u64 {
        self.spill
            .as_ref()
            .and_then(|s| s.lock().ok().map(|s| s.len()))
            .unwrap_or(0)
    }

    /// Insert a tensor a pass made: written to the spill file when the store has one
    /// (`spill_to`), held in memory otherwise.
    pub fn insert_made(&mut self, name: impl Into<String>, w: Weight) -> std::io::Result<()> {
        let w = match &self.spill {
            Some(s) => s
                .lock()
                .map_err(|_| std::io::Error::other("spill file lock poisoned"))?
                .store(&w)?,
            None => w,
        };
        self.map.insert(name.into(), w);
        Ok(())
    }

    /// With a spill file (`spill_to`): write every weight that is read by conversion
    /// (checkpoint f16/bf16, GGUF blocks: seen as f32) to it as f32, so that engines and the
    /// plan writer read them in place. Returns the bytes written.
    pub fn spill_converted(&mut self) -> std::io::Result<u64> {
        let Some(s) = self.spill.clone() else {
            return Ok(0);
        };
        let mut sp = s
            .lock()
            .map_err(|_| std::io::Error::other("spill file lock poisoned"))?;
        let before = sp.len();
        for w in self.map.values_mut() {
            let converted = match &w.data {
                Data::Gguf { .. } => true,
                Data::Mapped { .. } => w.stored != w.dtype,
                _ => false,
            };
            if converted {
                *w = sp.store(w)?;
            }
        }
        Ok(sp.len() - before)
    }

    pub fn get(&self, name: &str) -> Option<&Weight> {
        self.map.get(name)
    }

    pub fn remove(&mut self, name: &str) -> Option<Weight> {
        self.map.remove(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Weight)> {
        self.map.iter()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn type_of(&self, name: &str) -> Option<TensorType> {
        self.map.get(name).map(Weight::ty)
    }

    pub fn total_params(&self) -> usize {
        self.map.values().map(Weight::numel).sum()
    }

    pub fn total_storage_bytes(&self) -> usize {
        self.map.values().map(Weight::storage_bytes).sum()
    }
}

/// Memory-map a file read-only.
pub fn map_file(path: &std::path::Path) -> std::io::Result<Arc<Mmap>> {
    let f = std::fs::File::open(path)?;
    // SAFETY: the file is opened read-only; wkvc never writes to a file it maps. A file
    // modified by another process while mapped is outside what any mmap reader can defend.
    let m = unsafe { Mmap::map(&f) }?;
    Ok(Arc::new(m))
}

/// Drop the pages of `start..start + len` of a mapped file from memory (see
/// `Weight::release_pages`): for bytes read once, such as a parsed header.
pub fn release_mapped(map: &Mmap, start: usize, len: usize) {
    let page = 4096;
    let a = start / page * page;
    let b = ((start + len).div_ceil(page) * page).min(map.len());
    if b > a {
        // SAFETY: a read-only private file mapping: DONTNEED only drops clean pages, which
        // are re-read from the file when touched again.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a) };
    }
}

/// A weight viewing its bytes at `offset` of a mapped file, seen as `stored` (the caller
/// has checked that the byte range is in bounds).
pub fn mapped_weight(shape: Vec<usize>, map: Arc<Mmap>, offset: usize, stored: DType) -> Weight {
    Weight::mapped(shape, map, offset, stored, stored)
}

/// Hand memory the allocator holds free back to the OS. glibc keeps freed blocks below its
/// (self-raising, up to 32 MiB) mmap threshold in its heaps: after an engine or a block's f32
/// weights are dropped, gigabytes can stay in the process's RSS, and the next phase of a
/// compile then adds its own on top. Called between such phases; a no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only returns free memory to the OS; any thread may call it.
        unsafe {
            malloc_trim(0);
        }
    }
}
