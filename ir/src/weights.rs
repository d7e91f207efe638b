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

    /// The stored bytes (f32 weights as little-endian bytes).
    pub fn bytes(&self) -> Cow<'_, [u8]> {
        match &self.data {
            Data::F32(v) => Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::Bytes(b) => Cow::Borrowed(&b[..]),
            Data::Mapped { map, offset } => {
                Cow::Borrowed(&map[*offset..*offset + self.storage_bytes()])
            }
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
        if let Data::Mapped { map, offset } = &self.data {
            let _ = map.advise_range(memmap2::Advice::Random, *offset, self.storage_bytes());
        }
    }

    /// The values as f32: borrowed when stored as aligned f32, converted otherwise. Packed
    /// u4 codes come back as their integer values 0..15.
    pub fn f32(&self) -> Cow<'_, [f32]> {
        if let Data::F32(v) = &self.data {
            return Cow::Borrowed(&v[..]);
        }
        let bytes: &[u8] = match &self.data {
            Data::Bytes(b) => b,
            Data::Mapped { map, offset } => &map[*offset..*offset + self.storage_bytes()],
            Data::F32(_) => &[],
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

/// The parameters of a module, by name.
#[derive(Clone, Debug, Default)]
pub struct WeightStore {
    map: BTreeMap<String, Weight>,
}

impl WeightStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, w: Weight) {
        self.map.insert(name.into(), w);
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
