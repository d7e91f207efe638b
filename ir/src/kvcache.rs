//! The KV cache of the reference interpreter, in the layout every engine shares: per attention
//! layer, K and V as packed codes of the smoothed values (two 4-bit codes per byte, low nibble
//! = even channel; one byte per code above 4 bits) with a (scale, zero) pair per (token, group)
//! (a group is a kv head, or `kv_group` channels of one), or as f32 rows for a layer without
//! KV quantization.
//!
//! A cache can be exported from one engine and loaded into another (`KvCache::layer`,
//! `KvCache::from_layers`). A cache whose layers hold more rows than its length *replays*
//! them: the next runs' attention reads those rows wherever it would read its own quantized
//! K/V of the chunk, and keeps what it computed itself in `KvCache::computed` instead of
//! appending it (a call run in chunks replays the held rows chunk by chunk). Replaying
//! another engine's cache makes the interpreter's output a deterministic function of that
//! engine's cache contents, which is how the engines are checked against it without
//! depending on where 4-bit rounding boundaries fall.

use crate::Error;
use std::collections::BTreeMap;

/// Bytes one token takes in one layer's cache (K and V): `width` values, as f32 (`bits` 16
/// or more) or as codes of `bits` bits (two per byte up to 4 bits) with a (scale, zero) pair
/// of `param_bytes` each per group (`groups` a row: a kv head each, or smaller groups). The
/// one definition every engine's accounting uses.
pub fn bytes_per_token(width: usize, groups: usize, bits: u32, param_bytes: usize) -> usize {
    if bits >= 16 {
        2 * 4 * width
    } else {
        2 * (row_bytes(width, bits) + groups * 2 * param_bytes)
    }
}

/// A group's (scale, zero) as the compiled engines store it: one 4-byte word, the f16 scale in
/// the low half and the f16 zero in the high half. Both values are f16-exact (`ParamDtype::F16`
/// rounds them so), so the word holds them without loss.
pub fn pack_params(scale: f32, zero: f32) -> u32 {
    let h = |v: f32| half::f16::from_f32(v).to_bits() as u32;
    h(scale) | (h(zero) << 16)
}

/// The (scale, zero) of a word written by `pack_params`.
pub fn unpack_params(word: u32) -> (f32, f32) {
    let f = |b: u32| half::f16::from_bits(b as u16).to_f32();
    (f(word & 0xffff), f(word >> 16))
}

/// Channels per (scale, zero) group of a cache row: `kv_group` when set (non-zero), else the
/// head dim (a pair a kv head). The one rule every engine and the memory plan read a group's
/// length by.
pub fn group_len(kv_group: usize, head_dim: usize) -> usize {
    if kv_group > 0 { kv_group } else { head_dim }
}

/// `group_len` of an attention node: its `kv_group` attribute (absent, or not positive: a pair
/// a kv head).
pub fn node_group_len(node: &crate::graph::Node, head_dim: usize) -> usize {
    group_len(
        node.int_attr("kv_group")
            .and_then(|g| usize::try_from(g).ok())
            .unwrap_or(0),
        head_dim,
    )
}

/// The recent window of a past-only attention node: a position reads the K/V of the last
/// `kv_window` positions (itself included) in full precision and older ones from the cache;
/// 1 (the attribute absent) is past-only as the paper has it.
pub fn node_window(node: &crate::graph::Node) -> usize {
    node.int_attr("kv_window")
        .and_then(|w| usize::try_from(w).ok())
        .filter(|&w| w >= 1)
        .unwrap_or(1)
}

/// The recent window's read rule: the first position a past-only reader at position `p`
/// reads in full precision with a window of `window` positions (its own included; 1: itself
/// only); older ones come from the quantized cache. In prefill the chunk's own positions (from
/// `past` on) are read in full precision as well. The reference interpreter, the autodiff
/// rule and the compiled engines all read by this one rule.
pub fn window_start(p: usize, window: usize, past: usize, prefill: bool) -> usize {
    let a = (p + 1).saturating_sub(window.max(1));
    if prefill { a.min(past) } else { a }
}

/// Bytes of one row of `width` codes of `bits` bits.
pub fn row_bytes(width: usize, bits: u32) -> usize {
    if bits <= 4 { width.div_ceil(2) } else { width }
}

/// K and V of one attention layer, `rows()` tokens.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KvLayer {
    /// f32 values per row (kv_heads * head_dim)
    pub width: usize,
    /// (scale, zero) groups a row: one a kv head, or `width / groups` channels each (groups
    /// of 32 within a head)
    pub groups: usize,
    /// bytes per row of codes: ceil(width / 2) for <= 4 bits, width above; 0 for an FP layer
    pub row_bytes: usize,
    /// FP rows (an FP layer only), `width` floats each
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// codes of the smoothed K/V, `row_bytes` per row
    pub kc: Vec<u8>,
    pub vc: Vec<u8>,
    /// per (token, group): scale and zero
    pub kp: Vec<(f32, f32)>,
    pub vp: Vec<(f32, f32)>,
    /// bytes per stored scale or zero (2 for f16 values, 4 for f32)
    pub param_bytes: usize,
    /// a quantized layer of an attention with a recent window R > 1: the full-precision K/V
    /// of the last min(R - 1, len) positions before the cache's length (not its held rows:
    /// a replaying cache holds the tail from before the replayed chunk), `width` floats a row
    pub wk: Vec<f32>,
    pub wv: Vec<f32>,
}

impl KvLayer {
    /// Tokens held.
    pub fn rows(&self) -> usize {
        match self.kc.len().checked_div(self.row_bytes) {
            Some(rows) => rows,
            None => self.k.len().checked_div(self.width).unwrap_or(0),
        }
    }

    /// Does the layer hold codes (a quantized cache) rather than f32 rows?
    pub fn is_quantized(&self) -> bool {
        self.row_bytes > 0
    }

    /// Channels per (scale, zero) group.
    pub fn group_len(&self) -> usize {
        self.width / self.groups.max(1)
    }

    /// Code `c` of row `r` of K (`v == false`) or V.
    pub fn code(&self, v: bool, r: usize, c: usize) -> u8 {
        let codes = if v { &self.vc } else { &self.kc };
        let row = &codes[r * self.row_bytes..][..self.row_bytes];
        if self.row_bytes == self.width {
            row[c]
        } else if c.is_multiple_of(2) {
            row[c / 2] & 0x0F
        } else {
            row[c / 2] >> 4
        }
    }

    /// (scale, zero) of row `r`, group `h`, of K or V.
    pub fn param(&self, v: bool, r: usize, h: usize) -> (f32, f32) {
        (if v { &self.vp } else { &self.kp })[r * self.groups + h]
    }

    /// Row `r` of K or V as the cache gives it back: `scale * (code - zero)` (still smoothed)
    /// for a quantized layer, the f32 row otherwise.
    pub fn row(&self, v: bool, r: usize) -> Vec<f32> {
        if !self.is_quantized() {
            return (if v { &self.v } else { &self.k })[r * self.width..][..self.width].to_vec();
        }
        let hd = self.group_len();
        (0..self.width)
            .map(|c| {
                let (s, z) = self.param(v, r, c / hd);
                (self.code(v, r, c) as f32 - z) * s
            })
            .collect()
    }

    /// Rows of the recent window's full-precision tail.
    pub fn window_rows(&self) -> usize {
        self.wk.len().checked_div(self.width).unwrap_or(0)
    }

    /// Keep the first `n` rows (the window's tail is the caller's to restore).
    pub fn truncate(&mut self, n: usize) {
        self.k.truncate(n * self.width);
        self.v.truncate(n * self.width);
        self.kc.truncate(n * self.row_bytes);
        self.vc.truncate(n * self.row_bytes);
        self.kp.truncate(n * self.groups);
        self.vp.truncate(n * self.groups);
    }

    /// Append `other`'s rows (the same layout; an empty layer takes `other`'s).
    pub fn append(&mut self, other: KvLayer) {
        if self.width == 0 {
            *self = other;
            return;
        }
        self.k.extend_from_slice(&other.k);
        self.v.extend_from_slice(&other.v);
        self.kc.extend_from_slice(&other.kc);
        self.vc.extend_from_slice(&other.vc);
        self.kp.extend_from_slice(&other.kp);
        self.vp.extend_from_slice(&other.vp);
    }

    /// Rows `from..` only.
    pub fn tail(&self, from: usize) -> KvLayer {
        KvLayer {
            k: self.k.get(from * self.width..).unwrap_or(&[]).to_vec(),
            v: self.v.get(from * self.width..).unwrap_or(&[]).to_vec(),
            kc: self.kc.get(from * self.row_bytes..).unwrap_or(&[]).to_vec(),
            vc: self.vc.get(from * self.row_bytes..).unwrap_or(&[]).to_vec(),
            kp: self.kp.get(from * self.groups..).unwrap_or(&[]).to_vec(),
            vp: self.vp.get(from * self.groups..).unwrap_or(&[]).to_vec(),
            // a window's tail belongs to the whole cache's length, not to these rows
            wk: Vec::new(),
            wv: Vec::new(),
            ..self.clone()
        }
    }

    /// Are the parts' lengths consistent (the same number of rows in each)?
    fn consistent(&self) -> bool {
        if self.groups == 0 || self.width == 0 || !self.width.is_multiple_of(self.groups) {
            return false;
        }
        let n = self.rows();
        let same = self.kc.len() == self.vc.len()
            && self.kp.len() == self.vp.len()
            && self.k.len() == self.v.len()
            && self.wk.len() == self.wv.len()
            && self.wk.len().is_multiple_of(self.width)
            && (self.is_quantized() || self.wk.is_empty());
        let parts = if self.is_quantized() {
            (self.row_bytes == self.width.div_ceil(2) || self.row_bytes == self.width)
                && self.kc.len() == n * self.row_bytes
                && self.kp.len() == n * self.groups
                && self.k.is_empty()
        } else {
            self.k.len() == n * self.width && self.kc.is_empty() && self.kp.is_empty()
        };
        same && parts
    }

    pub(crate) fn bytes(&self) -> usize {
        4 * (self.k.len() + self.v.len() + self.wk.len() + self.wv.len())
            + self.kc.len()
            + self.vc.len()
            + 2 * self.param_bytes * (self.kp.len() + self.vp.len())
    }
}

/// The interpreter's KV cache: one `KvLayer` per `layer` attribute of the attention ops.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub(crate) layers: BTreeMap<i64, KvLayer>,
    /// what the replaying runs computed themselves for the replayed rows
    pub(crate) computed: BTreeMap<i64, KvLayer>,
    pub(crate) len: usize,
    pub(crate) max_len: usize,
}

/// What `KvCache::rollback` returns a cache to: its length, its recent windows' tails and
/// what replaying runs computed so far.
#[derive(Clone, Debug)]
pub struct KvCheckpoint {
    len: usize,
    tails: BTreeMap<i64, (Vec<f32>, Vec<f32>)>,
    computed: BTreeMap<i64, KvLayer>,
}

impl KvCache {
    pub fn new(max_len: usize) -> Self {
        KvCache {
            layers: BTreeMap::new(),
            computed: BTreeMap::new(),
            len: 0,
            max_len,
        }
    }

    /// A cache of `len` tokens from layers exported by an engine. Layers may hold more rows
    /// than `len` (the same number each): the next run, which must then be of exactly that
    /// many tokens, replays them (see the module docs).
    pub fn from_layers(
        max_len: usize,
        len: usize,
        layers: BTreeMap<i64, KvLayer>,
    ) -> Result<KvCache, Error> {
        let mut held = None;
        for (id, l) in &layers {
            if !l.consistent() {
                return Err(Error::Interp(format!(
                    "KV cache layer {id}: inconsistent sizes (width {}, groups {}, {} bytes per \
                     row, {} codes, {} params, {} f32 values)",
                    l.width,
                    l.groups,
                    l.row_bytes,
                    l.kc.len(),
                    l.kp.len(),
                    l.k.len()
                )));
            }
            if l.window_rows() > len {
                return Err(Error::Interp(format!(
                    "KV cache layer {id}: a recent window of {} full-precision rows before a \
                     length of {len}",
                    l.window_rows()
                )));
            }
            let rows = l.rows();
            if rows < len || held.is_some_and(|h| h != rows) || rows > max_len {
                return Err(Error::Interp(format!(
                    "KV cache layer {id} holds {rows} rows: expected the same number in every \
                     layer, at least {len} and at most {max_len}"
                )));
            }
            held = Some(rows);
        }
        Ok(KvCache {
            layers,
            computed: BTreeMap::new(),
            len,
            max_len,
        })
    }

    /// The cache as it is now, to return to when runs that follow fail.
    pub fn checkpoint(&self) -> KvCheckpoint {
        KvCheckpoint {
            len: self.len,
            tails: self
                .layers
                .iter()
                .filter(|(_, l)| !l.wk.is_empty())
                .map(|(&id, l)| (id, (l.wk.clone(), l.wv.clone())))
                .collect(),
            computed: self.computed.clone(),
        }
    }

    /// Back to `c`: the rows appended since cut off, the windows' tails and the replays'
    /// computed rows restored (rows held for replay past the checkpoint's length are dropped
    /// with the appended ones).
    pub fn rollback(&mut self, c: KvCheckpoint) {
        self.truncate(c.len);
        self.len = c.len;
        for (id, l) in self.layers.iter_mut() {
            (l.wk, l.wv) = c.tails.get(id).cloned().unwrap_or_default();
        }
        self.computed = c.computed;
    }

    /// Tokens held (the `past` length).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The layers by `layer` attribute.
    pub fn layers(&self) -> &BTreeMap<i64, KvLayer> {
        &self.layers
    }

    /// One layer.
    pub fn layer(&self, layer: i64) -> Option<&KvLayer> {
        self.layers.get(&layer)
    }

    /// After runs that replayed held rows: per layer, the rows they computed themselves for
    /// them (codes and scale/zero of their own K/V, or their f32 rows), which they did not
    /// store; in order, since the cache was made.
    pub fn computed(&self) -> &BTreeMap<i64, KvLayer> {
        &self.computed
    }

    /// Forget everything after the first `n` tokens. A recent window's tail (the full-precision
    /// rows before the length) cannot be rebuilt for a shorter length: it is dropped, and a
    /// plan with a window then refuses to run on the cache until it is cleared.
    pub fn truncate(&mut self, n: usize) {
        let shorter = n < self.len;
        for l in self.layers.values_mut() {
            l.truncate(n);
            if shorter || n == 0 {
                (l.wk, l.wv) = (Vec::new(), Vec::new());
            }
        }
        self.len = self.len.min(n);
    }

    pub fn clear(&mut self) {
        self.truncate(0);
        self.computed.clear();
    }

    /// Bytes held by the cache now.
    pub fn bytes(&self) -> usize {
        self.layers.values().map(KvLayer::bytes).sum()
    }
}
