//! GGUF v2/v3 reader: header, metadata, tensor infos, alignment, and dequantization of
//! F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K tensors to f32.
//!
//! Every read is bounds-checked: a truncated or corrupted file is an error naming the field,
//! never a panic or a huge allocation.

use half::{bf16, f16};
use rayon::prelude::*;
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) if v >= 0 => Some(v as u64),
            MetaValue::I16(v) if v >= 0 => Some(v as u64),
            MetaValue::I32(v) if v >= 0 => Some(v as u64),
            MetaValue::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// GGML tensor types wkvc reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Result<GgmlType, String> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => {
                let name = match id {
                    6 => "Q5_0",
                    7 => "Q5_1",
                    9 => "Q8_1",
                    10 => "Q2_K",
                    11 => "Q3_K",
                    13 => "Q5_K",
                    15 => "Q8_K",
                    16..=23 => "IQ*",
                    _ => "unknown",
                };
                return Err(format!(
                    "GGML type {id} ({name}) is not supported; supported: F32, F16, BF16, Q8_0, \
                     Q4_0, Q4_1, Q4_K, Q6_K"
                ));
            }
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q6K => (256, 210),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: dims[0] is the contiguous (fastest) one.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    pub nbytes: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// Row-major shape (outermost first), as safetensors/PyTorch write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

#[derive(Clone, Debug)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: usize,
    pub data_offset: usize,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.b.len() - self.pos < n {
            return Err(format!(
                "truncated file: {what} needs {n} bytes at offset {} but the file has {}",
                self.pos,
                self.b.len()
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, w: &str) -> Result<u8, String> {
        Ok(self.take(1, w)?[0])
    }
    fn u16(&mut self, w: &str) -> Result<u16, String> {
        let s = self.take(2, w)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, w: &str) -> Result<u32, String> {
        let s = self.take(4, w)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, w: &str) -> Result<u64, String> {
        let s = self.take(8, w)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn string(&mut self, w: &str) -> Result<String, String> {
        let n = self.u64(w)?;
        if n > self.remaining() as u64 {
            return Err(format!(
                "{w}: string length {n} at offset {} runs past the end of the file",
                self.pos - 8
            ));
        }
        let s = self.take(n as usize, w)?;
        String::from_utf8(s.to_vec()).map_err(|_| format!("{w}: string is not valid UTF-8"))
    }
    fn value(&mut self, ty: u32, w: &str, depth: u32) -> Result<MetaValue, String> {
        Ok(match ty {
            0 => MetaValue::U8(self.u8(w)?),
            1 => MetaValue::I8(self.u8(w)? as i8),
            2 => MetaValue::U16(self.u16(w)?),
            3 => MetaValue::I16(self.u16(w)? as i16),
            4 => MetaValue::U32(self.u32(w)?),
            5 => MetaValue::I32(self.u32(w)? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32(w)?)),
            7 => MetaValue::Bool(self.u8(w)? != 0),
            8 => MetaValue::Str(self.string(w)?),
            9 => {
                if depth > 2 {
                    return Err(format!("{w}: arrays nested too deeply"));
                }
                let et = self.u32(w)?;
                let n = self.u64(w)?;
                // Every element takes at least one byte: a count beyond the remaining bytes is
                // corrupt (and must not become a huge allocation).
                if n > self.remaining() as u64 {
                    return Err(format!(
                        "{w}: array of {n} elements runs past the end of the file"
                    ));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, w, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64(w)?),
            11 => MetaValue::I64(self.u64(w)? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64(w)?)),
            _ => return Err(format!("{w}: unknown metadata value type {ty}")),
        })
    }
}

/// Parse the header, metadata and tensor infos of a GGUF file held in `b`.
pub fn parse(b: &[u8]) -> Result<GgufFile, String> {
    let mut r = Reader { b, pos: 0 };
    let magic = r.take(4, "magic")?;
    if magic != b"GGUF" {
        return Err(format!(
            "bad magic {:?}: not a GGUF file (expected \"GGUF\")",
            String::from_utf8_lossy(magic)
        ));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2 or 3)"));
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;
    if n_tensors > r.remaining() as u64 || n_kv > r.remaining() as u64 {
        return Err(format!(
            "header claims {n_tensors} tensors and {n_kv} metadata entries: more than the file can hold"
        ));
    }
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key #{i}"))?;
        let ty = r.u32(&key)?;
        let v = r.value(ty, &format!("metadata `{key}`"), 0)?;
        metadata.insert(key, v);
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => return Err(format!("general.alignment {v:?} is not a power of two")),
        },
    };
    let mut infos = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.string(&format!("tensor #{i} name"))?;
        let nd = r.u32(&name)?;
        if nd == 0 || nd > 4 {
            return Err(format!(
                "tensor `{name}`: {nd} dimensions (GGML allows 1 to 4)"
            ));
        }
        let mut dims = Vec::with_capacity(nd as usize);
        for _ in 0..nd {
            dims.push(r.u64(&name)?);
        }
        let ty_id = r.u32(&name)?;
        let rel = r.u64(&name)?;
        infos.push((name, dims, ty_id, rel));
    }
    let data_offset = r.pos.div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, dims, ty_id, rel) in infos {
        let ggml_type = GgmlType::from_id(ty_id).map_err(|e| format!("tensor `{name}`: {e}"))?;
        let numel = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n > 0 && n < (1u64 << 40))
            .ok_or_else(|| format!("tensor `{name}`: bad dimensions {dims:?}"))?;
        let (be, bb) = ggml_type.block();
        if dims[0] % be as u64 != 0 {
            return Err(format!(
                "tensor `{name}`: row length {} is not a multiple of the {} block size {be}",
                dims[0],
                ggml_type.name()
            ));
        }
        let nbytes = (numel / be as u64) as usize * bb;
        if rel % alignment as u64 != 0 {
            return Err(format!(
                "tensor `{name}`: data offset {rel} is not aligned to {alignment}"
            ));
        }
        let offset = (data_offset as u64)
            .checked_add(rel)
            .filter(|&o| {
                o.checked_add(nbytes as u64)
                    .is_some_and(|e| e <= b.len() as u64)
            })
            .ok_or_else(|| {
                format!(
                    "tensor `{name}`: data [{rel}, +{nbytes}) past the data start {data_offset} \
                     runs past the end of the file ({} bytes): truncated file?",
                    b.len()
                )
            })? as usize;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            nbytes,
        });
    }
    Ok(GgufFile {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn dequant_block(t: GgmlType, b: &[u8], y: &mut [f32]) {
    match t {
        GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => y[0] = f16_at(b, 0),
        GgmlType::BF16 => y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                y[j] = d * (b[2 + j] as i8) as f32;
            }
        }
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                y[j] = d * ((qs[j] & 0x0F) as i32 - 8) as f32;
                y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
            }
        }
        GgmlType::Q4_1 => {
            let d = f16_at(b, 0);
            let m = f16_at(b, 2);
            let qs = &b[4..20];
            for j in 0..16 {
                y[j] = d * (qs[j] & 0x0F) as f32 + m;
                y[j + 16] = d * (qs[j] >> 4) as f32 + m;
            }
        }
        GgmlType::Q4K => {
            let d = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let scales = &b[4..16];
            let qs = &b[16..144];
            let scale_min = |j: usize| -> (u8, u8) {
                if j < 4 {
                    (scales[j] & 63, scales[j + 4] & 63)
                } else {
                    (
                        (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
                        (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
                    )
                }
            };
            for (c, q) in qs.chunks_exact(32).enumerate() {
                let (sc1, m1) = scale_min(2 * c);
                let (sc2, m2) = scale_min(2 * c + 1);
                let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
                let yo = &mut y[c * 64..c * 64 + 64];
                for l in 0..32 {
                    yo[l] = d1 * (q[l] & 0x0F) as f32 - min1;
                    yo[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
                }
            }
        }
        GgmlType::Q6K => {
            let ql = &b[0..128];
            let qh = &b[128..192];
            let sc = &b[192..208];
            let d = f16_at(b, 208);
            for n in 0..2 {
                let ql = &ql[n * 64..];
                let qh = &qh[n * 32..];
                let sc = &sc[n * 8..];
                let yo = &mut y[n * 128..n * 128 + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    yo[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    yo[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    yo[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    yo[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
    }
}

/// Dequantize `data` (whole blocks of type `t`) to f32, in parallel.
pub fn dequantize(t: GgmlType, data: &[u8]) -> Vec<f32> {
    let (be, bb) = t.block();
    let nblocks = data.len() / bb;
    let mut out = vec![0f32; nblocks * be];
    // Chunks of many blocks keep the parallel overhead small.
    let per = 1024usize;
    out.par_chunks_mut(per * be)
        .zip(data.par_chunks(per * bb))
        .for_each(|(y, b)| {
            for (yb, bb_) in y.chunks_exact_mut(be).zip(b.chunks_exact(bb)) {
                dequant_block(t, bb_, yb);
            }
        });
    out
}
