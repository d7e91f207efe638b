//! Engines against the reference interpreter, deterministically, also on quantized caches.
//!
//! Comparing two engines end to end on a 4-bit KV cache is not deterministic: their f32
//! summation orders differ by a few ulps, and a K/V value that lies within that distance of a
//! rounding boundary gets another code in each (one step of that token's scale). Which values
//! lie there depends on the plan and the text, so any bound on the end-to-end difference that
//! holds for one plan can fail on another while both engines are correct.
//!
//! `agreement` therefore checks the two things that are deterministic, chunk by chunk:
//!
//! 1. The engine's logits given its cache: the interpreter replays the engine's own KV cache
//!    (`wkvc_ir::kvcache`: the rows held before the chunk, and the rows the engine wrote for
//!    the chunk wherever the chunk reads its own quantized K/V), so both compute the same
//!    function of the same codes, and only the f32 summation order separates them.
//! 2. What the engine wrote to its cache: the interpreter's own quantization of the chunk's
//!    K/V (computed on the same inputs) against the engine's codes. Each stored value is
//!    within half a step of the smoothed value it encodes (round to nearest, the scale
//!    rounded up so the group's range fits the grid), so two correct engines' dequantized
//!    values differ by at most half of each one's step, plus what their f32 inputs differ by.
//!
//! Together they cover every step of a generation by induction, with bounds that hold for
//! every correct engine on any plan and text.

use wkvc_ir::{KvCache, KvLayer, RunMode};
use wkvc_runtime::Engine;

/// How an engine's run compares with the interpreter's replay of it.
#[derive(Clone, Debug, Default)]
pub struct Agreement {
    /// logit rows compared
    pub rows: usize,
    /// max and mean |logit difference|
    pub max_abs: f32,
    sum_abs: f64,
    n: usize,
    /// max and mean KL divergence (interpreter || engine) of the next-token distributions
    pub max_kld: f64,
    sum_kld: f64,
    /// K/V values written by the engine and compared
    pub kv_values: usize,
    /// ... whose code differs from the interpreter's (a boundary crossed: informative)
    pub kv_code_diffs: usize,
    /// max over the written values of (|engine - interpreter| - half of each one's step),
    /// relative to the group's range (quantized caches) or to the row's max |value| (f32
    /// caches): what is left after the rounding that a correct engine may do
    pub kv_excess: f64,
}

impl Agreement {
    pub fn mean_abs(&self) -> f64 {
        self.sum_abs / self.n.max(1) as f64
    }

    pub fn mean_kld(&self) -> f64 {
        self.sum_kld / self.rows.max(1) as f64
    }

    /// Add a row of logits: `reference` (the interpreter's) against `got`.
    pub fn add_logits(&mut self, reference: &[f32], got: &[f32]) {
        assert_eq!(reference.len(), got.len(), "logit rows of different widths");
        self.rows += 1;
        for (x, y) in reference.iter().zip(got) {
            let d = (x - y).abs();
            self.max_abs = self.max_abs.max(d);
            self.sum_abs += d as f64;
            self.n += 1;
        }
        let kl = kld(reference, got);
        self.max_kld = self.max_kld.max(kl);
        self.sum_kld += kl;
    }

    /// One line for the test's output.
    pub fn summary(&self) -> String {
        format!(
            "{} rows: max |diff| {:.3e}, mean |diff| {:.3e}, mean KLD {:.3e}, max KLD {:.3e}; \
             {} K/V values written, {} codes differ, excess over the rounding {:.2e}",
            self.rows,
            self.max_abs,
            self.mean_abs(),
            self.mean_kld(),
            self.max_kld,
            self.kv_values,
            self.kv_code_diffs,
            self.kv_excess
        )
    }

    /// Compare the full-precision tails of a recent window (`KvLayer::wk/wv`): the same
    /// number of rows, each value within `kv_excess` of the row's max |value|.
    fn add_tail(&mut self, engine: &KvLayer, own: &KvLayer) {
        assert_eq!(
            engine.window_rows(),
            own.window_rows(),
            "the engine's recent window holds another number of rows"
        );
        for (e, i) in [(&engine.wk, &own.wk), (&engine.wv, &own.wv)] {
            for (re, ri) in e.chunks(own.width).zip(i.chunks(own.width)) {
                let m = ri.iter().fold(0f32, |a, x| a.max(x.abs())).max(1e-6) as f64;
                for (x, y) in re.iter().zip(ri) {
                    self.kv_values += 1;
                    self.kv_excess = self.kv_excess.max((x - y).abs() as f64 / m);
                }
            }
        }
    }

    /// Compare the rows `past..` that the engine wrote (`engine`) with those the interpreter
    /// computed for them (`own`, rows from 0).
    fn add_kv(&mut self, engine: &KvLayer, past: usize, own: &KvLayer) {
        assert_eq!(
            (engine.width, engine.groups, engine.row_bytes),
            (own.width, own.groups, own.row_bytes),
            "KV layers of different shapes"
        );
        let hd = engine.group_len();
        for r in 0..own.rows() {
            for v in [false, true] {
                let e = engine.row(v, past + r);
                let i = own.row(v, r);
                for h in 0..engine.groups {
                    let (ce, ci) = (&e[h * hd..][..hd], &i[h * hd..][..hd]);
                    let (half, range) = if engine.is_quantized() {
                        let (se, _) = engine.param(v, past + r, h);
                        let (si, _) = own.param(v, r, h);
                        let (lo, hi) = ci
                            .iter()
                            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                                (a.min(x), b.max(x))
                            });
                        ((se + si) as f64 / 2.0, (hi - lo + si) as f64)
                    } else {
                        let m = ci.iter().fold(0f32, |a, x| a.max(x.abs()));
                        (0.0, m.max(1e-6) as f64)
                    };
                    for c in 0..hd {
                        self.kv_values += 1;
                        if engine.is_quantized()
                            && engine.code(v, past + r, h * hd + c) != own.code(v, r, h * hd + c)
                        {
                            self.kv_code_diffs += 1;
                        }
                        let d = (ce[c] - ci[c]).abs() as f64;
                        self.kv_excess = self.kv_excess.max((d - half).max(0.0) / range);
                    }
                }
            }
        }
    }
}

/// KL divergence of softmax(q) from softmax(p), in f64.
pub fn kld(p: &[f32], q: &[f32]) -> f64 {
    let lse = |v: &[f32]| {
        let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
    };
    let (lp, lq) = (lse(p), lse(q));
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let la = a as f64 - lp;
            la.exp() * (la - (b as f64 - lq))
        })
        .sum()
}

/// Check one call of an engine: `chunk` ran under `mode` after `past` cached tokens, the
/// engine's cache is now `written` and its logits `got` (the last rows of the chunk: all, or
/// only the last). The interpreter replays the engine's cache (module docs) and the result
/// is added to `a`. A plan with a recent window also needs the cache from before the call
/// (`before`), whose full-precision tails the replay starts from.
#[allow(clippy::too_many_arguments)]
pub fn check_call(
    interp: &Engine,
    ctx: usize,
    past: usize,
    written: &KvCache,
    before: Option<&KvCache>,
    (chunk, mode): (&[u32], RunMode),
    got: &[f32],
    a: &mut Agreement,
) {
    let vocab = interp.vocab_size();
    let mut is = interp.session(ctx);
    let mut layers = written.layers().clone();
    for (id, l) in layers.iter_mut() {
        let b = before.and_then(|b| b.layer(*id));
        l.wk = b.map(|b| b.wk.clone()).unwrap_or_default();
        l.wv = b.map(|b| b.wv.clone()).unwrap_or_default();
    }
    let replay = KvCache::from_layers(ctx, past, layers).expect("the engine's cache replays");
    is.load_kv(&replay)
        .expect("the interpreter takes the cache");
    let reference = is.forward_mode(chunk, mode).expect("interpreter run");
    for (r, g) in reference
        .chunks(vocab)
        .skip(reference.len() / vocab - got.len() / vocab)
        .zip(got.chunks(vocab))
    {
        a.add_logits(r, g);
    }
    let own = is.kv_cache().expect("the interpreter's cache");
    assert_eq!(
        own.computed().len(),
        written.layers().len(),
        "the interpreter replayed every layer"
    );
    for (id, l) in own.computed() {
        a.add_kv(&written.layers()[id], past, l);
    }
    // a recent window's tail after the call: the engine's against the interpreter's (both
    // the full-precision K/V of the same positions: only their f32 inputs differ)
    for (id, l) in own.layers() {
        a.add_tail(&written.layers()[id], l);
    }
}

/// Run `chunks` one after another through a session of `engine` under `mode` (a chunk of one
/// token through `Session::step`, the engines' decode path), and check every chunk against
/// the interpreter replaying the engine's cache (module docs). `interp` is the reference
/// interpreter of the same plan.
pub fn agreement(
    interp: &Engine,
    engine: &Engine,
    chunks: &[&[u32]],
    mode: RunMode,
    ctx: usize,
) -> Agreement {
    let mut a = Agreement::default();
    let mut es = engine.session(ctx);
    for chunk in chunks {
        let past = es.len();
        let before = es.kv_cache().expect("the engine's cache");
        let got = if chunk.len() == 1 {
            es.step(chunk).expect("engine step").to_vec()
        } else {
            es.forward_mode(chunk, mode).expect("engine run")
        };
        let written = es.kv_cache().expect("the engine's cache");
        check_call(
            interp,
            ctx,
            past,
            &written,
            Some(&before),
            (chunk, mode),
            &got,
            &mut a,
        );
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One quantized row of 2 kv heads of 4 channels.
    fn layer(codes: [u8; 8], params: [(f32, f32); 2]) -> KvLayer {
        let packed: Vec<u8> = codes.chunks(2).map(|c| c[0] | c[1] << 4).collect();
        KvLayer {
            width: 8,
            groups: 2,
            row_bytes: 4,
            kc: packed.clone(),
            vc: packed,
            kp: params.to_vec(),
            vp: params.to_vec(),
            param_bytes: 2,
            ..Default::default()
        }
    }

    #[test]
    fn a_crossed_boundary_is_within_the_bound_and_a_wrong_code_is_not() {
        let p = [(0.5, 8.0), (0.25, 3.0)];
        let reference = layer([0, 3, 8, 15, 1, 2, 3, 4], p);
        // one code one step away: a rounding boundary crossed, as correct engines may
        let mut a = Agreement::default();
        a.add_kv(&layer([0, 3, 9, 15, 1, 2, 3, 4], p), 0, &reference);
        assert_eq!((a.kv_values, a.kv_code_diffs), (16, 2));
        assert_eq!(a.kv_excess, 0.0);
        // the next scale up (an f16 ulp: the range rounded up the other way), same codes
        let mut a = Agreement::default();
        a.add_kv(
            &layer([0, 3, 8, 15, 1, 2, 3, 4], [(0.5004883, 8.0), p[1]]),
            0,
            &reference,
        );
        assert!(a.kv_excess < 1e-3, "{}", a.summary());
        // two steps away: no correct engine writes that
        let mut a = Agreement::default();
        a.add_kv(&layer([0, 3, 10, 15, 1, 2, 3, 4], p), 0, &reference);
        assert!(a.kv_excess > 1e-2, "{}", a.summary());
        // a zero point two off shifts the whole group by two steps
        let mut a = Agreement::default();
        a.add_kv(
            &layer([0, 3, 8, 15, 1, 2, 3, 4], [(0.5, 6.0), p[1]]),
            0,
            &reference,
        );
        assert!(a.kv_excess > 1e-2, "{}", a.summary());
    }
}
