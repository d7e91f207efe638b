//! Named parameters: owned f32 (dequantized GGUF) or memory-mapped safetensors data.

use crate::types::{DType, Dim, TensorType};
use half::{bf16, f16};
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Clone, Debug)]
enum Data {
    Owned(Arc<Vec<f32>>),
    /// `len` elements of `dtype` at `offset` in the map, little endian.
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        dtype: DType,
    },
}

/// One parameter tensor.
#[derive(Clone, Debug)]
pub struct Weight {
    pub shape: Vec<usize>,
    data: Data,
}

impl Weight {
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Weight {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Weight {
            shape,
            data: Data::Owned(Arc::new(data)),
        }
    }

    /// A view into a mapped file; the caller has checked that the byte range is in bounds.
    pub(crate) fn mapped(shape: Vec<usize>, map: Arc<Mmap>, offset: usize, dtype: DType) -> Weight {
        Weight {
            shape,
            data: Data::Mapped { map, offset, dtype },
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The dtype the graph sees (always f32 for now: f16/bf16 are widened on read).
    pub fn ty(&self) -> TensorType {
        TensorType::new(
            DType::F32,
            self.shape.iter().map(|&d| Dim::Const(d)).collect(),
        )
    }

    /// Storage dtype of the data (f16/bf16 for mapped half-precision checkpoints).
    pub fn storage_dtype(&self) -> DType {
        match &self.data {
            Data::Owned(_) => DType::F32,
            Data::Mapped { dtype, .. } => *dtype,
        }
    }

    /// Bytes the data occupies where it is stored.
    pub fn storage_bytes(&self) -> usize {
        self.storage_dtype().bytes_for(self.numel())
    }

    /// The values as f32: borrowed when stored as aligned f32, converted otherwise.
    pub fn f32(&self) -> Cow<'_, [f32]> {
        let n = self.numel();
        match &self.data {
            Data::Owned(v) => Cow::Borrowed(&v[..]),
            Data::Mapped { map, offset, dtype } => {
                let bytes = &map[*offset..*offset + dtype.bytes_for(n)];
                match dtype {
                    DType::F32 => {
                        // SAFETY: f32 has no invalid bit patterns; align_to only yields the
                        // aligned middle, which is the whole slice when the data is aligned.
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
                    // Import only creates mapped weights of float dtypes.
                    _ => Cow::Owned(vec![0.0; 0]),
                }
            }
        }
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
}
