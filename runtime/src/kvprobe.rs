//! K and V as a model's cache receives them, per channel, for `wkvc inspect --plots`: the
//! outlier channels the K/V smoothing and the rotation are there for. One prefill of some
//! tokens on the interpreter with every chosen attention's K (after RoPE) and V captured;
//! from those the three views of the plots: the cache's input with neither smoothing nor
//! rotation, with the smoothing the plan applies, and with a Hadamard rotation.

use crate::{Model, RuntimeError};
use wkvc_ir::KvCache;
use wkvc_ir::graph::{OpKind, Operand};
use wkvc_ir::interp::{Interpreter, Tensor};
use wkvc_ir::math::hadamard_in_place;

/// One layer's K and V channels over the probed tokens.
#[derive(Clone, Debug)]
pub struct KvChannels {
    pub layer: i64,
    /// kv heads x head dim: the channels of a row
    pub width: usize,
    pub head_dim: usize,
    /// `[tokens, width]` row-major, unrotated (the plan's rotation, if any, undone)
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// The plan's static smoothing (k_shift, k_scale, v_shift, v_scale), in the basis of the
    /// plan's cache: rotated when `rotate > 0`.
    pub smoothing: Option<[Vec<f32>; 4]>,
    /// The plan's Hadamard block (0: not rotated).
    pub rotate: usize,
}

/// Per-channel (min, max) of `[rows, width]` values.
pub fn channel_ranges(x: &[f32], width: usize) -> Vec<(f32, f32)> {
    let mut r = vec![(f32::INFINITY, f32::NEG_INFINITY); width];
    for row in x.chunks_exact(width) {
        for (c, &v) in row.iter().enumerate() {
            r[c].0 = r[c].0.min(v);
            r[c].1 = r[c].1.max(v);
        }
    }
    r
}

impl KvChannels {
    /// K (`v == false`) or V rotated by Hadamard blocks of `block` within each head.
    pub fn rotated(&self, v: bool, block: usize) -> Vec<f32> {
        let mut x = if v { self.v.clone() } else { self.k.clone() };
        hadamard_in_place(&mut x, block);
        x
    }

    /// K or V as the plan's cache quantizes it: rotated by the plan's block (if it rotates),
    /// then smoothed ((x - shift) / scale per channel); None when the plan does not smooth.
    pub fn smoothed(&self, v: bool) -> Option<Vec<f32>> {
        let s = self.smoothing.as_ref()?;
        let (shift, scale) = if v { (&s[2], &s[3]) } else { (&s[0], &s[1]) };
        let mut x = if self.rotate > 0 {
            self.rotated(v, self.rotate)
        } else if v {
            self.v.clone()
        } else {
            self.k.clone()
        };
        for row in x.chunks_exact_mut(self.width) {
            for (c, e) in row.iter_mut().enumerate() {
                *e = (*e - shift[c]) / scale[c];
            }
        }
        Some(x)
    }
}

/// Run `ids` through `model` (a prefill on the interpreter, `threads` workers) and capture the
/// K and V of the attentions of `layers` (all when empty).
pub fn kv_channels(
    model: &Model,
    ids: &[u32],
    layers: &[i64],
    threads: usize,
) -> Result<Vec<KvChannels>, RuntimeError> {
    if ids.is_empty() {
        return Err(RuntimeError::Invalid("no tokens to probe K/V with".into()));
    }
    let m = &model.module;
    let mut g = m.graph.clone();
    let found =
        wkvc_passes::quant::add_kv_probes(&mut g, |l| layers.is_empty() || layers.contains(&l));
    let mut probes = Vec::new();
    for p in found {
        let n = &g.nodes[p.node];
        let layer = p.layer;
        let head_dim = n.int_attr("head_dim").unwrap_or(1) as usize;
        // the rotation: on the rope that makes K
        let rotate = g
            .nodes
            .iter()
            .find(|r| r.out == p.k && r.op == OpKind::Rope)
            .and_then(|r| r.int_attr("rotate"))
            .unwrap_or(0) as usize;
        let smoothing = if n.args.len() == 7 {
            let mut s: [Vec<f32>; 4] = Default::default();
            for (i, a) in n.args[3..7].iter().enumerate() {
                let Operand::Param(name) = a else {
                    return Err(RuntimeError::Invalid(format!(
                        "layer {layer}: the smoothing operands are not weights"
                    )));
                };
                let w = m.weights.get(name).ok_or_else(|| {
                    RuntimeError::Invalid(format!("layer {layer}: no weight `{name}`"))
                })?;
                s[i] = w.f32().into_owned();
            }
            Some(s)
        } else {
            None
        };
        probes.push((p, head_dim, rotate, smoothing));
    }
    if let Some(&l) = layers
        .iter()
        .find(|l| !probes.iter().any(|p| p.0.layer == **l))
    {
        return Err(RuntimeError::Invalid(format!(
            "the model has no attention of layer {l}"
        )));
    }
    let probe = wkvc_ir::Module {
        graph: g,
        weights: m.weights.clone(),
    };
    let it = Interpreter::new(&probe, threads)?;
    let n = ids.len();
    let toks = Tensor::i32(vec![n], ids.iter().map(|&t| t as i32).collect());
    let pos = Tensor::i32(vec![n], (0..n as i32).collect());
    let mut cache = KvCache::new(n);
    let out = it.run(&[("tokens", toks), ("positions", pos)], &mut cache)?;
    let mut res = Vec::new();
    for (p, head_dim, rotate, smoothing) in probes {
        let layer = p.layer;
        let get = |key: String| -> Result<Vec<f32>, RuntimeError> {
            out.get(&key)
                .and_then(|t| t.as_f32())
                .map(<[f32]>::to_vec)
                .ok_or_else(|| RuntimeError::Invalid(format!("no probe `{key}`")))
        };
        let mut k = get(p.k_output())?;
        let mut v = get(p.v_output())?;
        let width = k.len() / n;
        if rotate > 0 {
            // the orthonormal Hadamard matrix is its own inverse
            hadamard_in_place(&mut k, rotate);
            hadamard_in_place(&mut v, rotate);
        }
        res.push(KvChannels {
            layer,
            width,
            head_dim,
            k,
            v,
            smoothing,
            rotate,
        });
    }
    Ok(res)
}
