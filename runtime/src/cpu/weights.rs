//! The weights as the CPU kernels read them: pointers into the plan's mapped pages where the
//! kernels read the stored format, else the engine's own copies (quantized GEMMs' codes and
//! scale/zero in the kernel's tile order, f32 copies of small vectors, the int8 head). Once
//! a copy is made the plan's pages of that weight are released.

use crate::RuntimeError;
use std::borrow::Cow;
use std::collections::HashMap;
use wkvc_ir::{DType, Module, Weight};

/// A pointer the kernels read; it lives as long as the engine (its copy or the model's
/// mapped file, which the engine keeps open).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ptr(pub *const u8);
// SAFETY: the data behind a `Ptr` is read-only for the engine's lifetime.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl Ptr {
    pub(crate) fn word(self) -> u64 {
        self.0 as u64
    }
}

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Invalid(msg.into())
}

/// The engine's copies and the pointers handed out, one per weight name and use.
#[derive(Default)]
pub(crate) struct Weights {
    f32s: Vec<Vec<f32>>,
    u8s: Vec<Vec<u8>>,
    i8s: Vec<Vec<i8>>,
    handed: HashMap<String, Ptr>,
}

fn weight<'m>(module: &'m Module, name: &str) -> Result<&'m Weight, RuntimeError> {
    module
        .weights
        .get(name)
        .ok_or_else(|| err(format!("param @{name} is not in the weight store")))
}

impl Weights {
    /// Bytes of the engine's own copies.
    pub(crate) fn derived_bytes(&self) -> usize {
        4 * self.f32s.iter().map(Vec::len).sum::<usize>()
            + self.u8s.iter().map(Vec::len).sum::<usize>()
            + self.i8s.iter().map(Vec::len).sum::<usize>()
    }

    fn keep_f32(&mut self, v: Vec<f32>) -> Ptr {
        let p = Ptr(v.as_ptr() as *const u8);
        self.f32s.push(v);
        p
    }

    /// A param as stored where the kernels read that format (packed codes, f32), else an
    /// f32 copy.
    pub(crate) fn param(&mut self, module: &Module, name: &str) -> Result<Ptr, RuntimeError> {
        if let Some(p) = self.handed.get(name) {
            return Ok(*p);
        }
        let w = weight(module, name)?;
        let p = match (w.dtype(), w.storage_dtype()) {
            (DType::U4, _) | (DType::I8, _) => match w.bytes() {
                Cow::Borrowed(b) => Ptr(b.as_ptr()),
                Cow::Owned(_) => {
                    return Err(err(format!("@{name}: packed data is not borrowable")));
                }
            },
            // f32 stored in a mapped file is read in place, aligned or not (the kernels load
            // unaligned); converted tensors (GGUF blocks) are converted once and kept
            (DType::F32, DType::F32) => match w.raw_bytes() {
                Some(b) => Ptr(b.as_ptr()),
                None => match w.f32() {
                    Cow::Borrowed(b) => Ptr(b.as_ptr() as *const u8),
                    Cow::Owned(f) => self.keep_f32(f),
                },
            },
            _ => {
                let p = self.keep_f32(w.f32().into_owned());
                w.release_pages();
                p
            }
        };
        self.handed.insert(name.to_string(), p);
        Ok(p)
    }

    /// An f32 copy of a small param; the plan's pages are released (a mapped page read every
    /// step would bring its neighbours with it through fault-around).
    pub(crate) fn small(&mut self, module: &Module, name: &str) -> Result<Ptr, RuntimeError> {
        let key = format!("{name}#small");
        if let Some(p) = self.handed.get(&key) {
            return Ok(*p);
        }
        let w = weight(module, name)?;
        let p = self.keep_f32(w.f32().into_owned());
        w.release_pages();
        self.handed.insert(key, p);
        Ok(p)
    }

    /// A quantized GEMM's codes (`codes`) or scales/zeros in the kernel's tile order
    /// (`tile_codes`, `tile_params`); the plan's pages are released.
    pub(crate) fn qgemm(
        &mut self,
        module: &Module,
        name: &str,
        codes: bool,
        (rows, k, gl): (usize, usize, usize),
    ) -> Result<Ptr, RuntimeError> {
        let key = format!("{name}#tiled");
        if let Some(p) = self.handed.get(&key) {
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
            let p = Ptr(t.as_ptr());
            self.u8s.push(t);
            p
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
            self.keep_f32(t)
        };
        self.handed.insert(key, p);
        Ok(p)
    }

    /// The head table as int8 per block of 32 columns and its block scales.
    pub(crate) fn int8_head(
        &mut self,
        module: &Module,
        name: &str,
        vocab: usize,
        dim: usize,
    ) -> Result<(Ptr, Ptr), RuntimeError> {
        let w = weight(module, name)?;
        let (q, s) = quantize_head(w, vocab, dim);
        // the f32 table is read again only for the embedding rows a prompt uses
        w.advise_random();
        let pq = Ptr(q.as_ptr() as *const u8);
        self.i8s.push(q);
        let ps = self.keep_f32(s);
        Ok((pq, ps))
    }
}

/// The tied table as int8 per block of 32 columns (scale max|w|/127, round half to even),
/// each block permuted like the activations (`prep_int8`: evens, then odds).
fn quantize_head(w: &Weight, vocab: usize, dim: usize) -> (Vec<i8>, Vec<f32>) {
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
