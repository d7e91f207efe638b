//! Next-token sampling: greedy, temperature, nucleus (top-p), seeded.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub struct Sampler {
    pub temperature: f32,
    pub top_p: f32,
    rng: StdRng,
    /// reused between calls: the weights of the vocabulary and the nucleus' candidates
    weights: Vec<f64>,
    order: Vec<u32>,
}

impl Sampler {
    /// Greedy decoding (temperature 0).
    pub fn greedy() -> Self {
        Self::new(0.0, 1.0, 0)
    }

    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Self {
        Sampler {
            temperature,
            top_p,
            rng: StdRng::seed_from_u64(seed),
            weights: Vec::new(),
            order: Vec::new(),
        }
    }

    /// A token drawn from softmax(logits / temperature), restricted to the nucleus when
    /// `top_p` < 1: the most probable tokens (ties: the lower id first) until their
    /// probability reaches `top_p`, renormalized. The argmax at temperature 0.
    ///
    /// One pass over the vocabulary: the draw walks the cumulative weights in token order
    /// (no sort); the nucleus is found by selecting ever larger sets of the most probable
    /// tokens (64, 256, ...) and sorting only those.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 || logits.is_empty() {
            return argmax(logits) as u32;
        }
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !m.is_finite() {
            // no finite maximum (all -inf, or +inf/NaN among them): the argmax decides
            return argmax(logits) as u32;
        }
        let t = self.temperature;
        self.weights.clear();
        // f32 exp (relative error ~1e-7, far below what a draw resolves), f64 sums
        self.weights.extend(logits.iter().map(|&l| {
            let w = ((l - m) / t).exp() as f64;
            if w.is_nan() { 0.0 } else { w }
        }));
        let w = &self.weights;
        let total: f64 = w.iter().sum();
        if self.top_p >= 1.0 {
            let r = self.rng.random::<f64>() * total;
            let mut c = 0.0;
            let mut last = 0;
            for (i, &p) in w.iter().enumerate() {
                if p > 0.0 {
                    c += p;
                    last = i;
                    if c >= r {
                        return i as u32;
                    }
                }
            }
            return last as u32;
        }
        // the nucleus: the k most probable tokens in order, k grown until they hold top_p
        let rank = |a: &u32, b: &u32| w[*b as usize].total_cmp(&w[*a as usize]).then(a.cmp(b));
        let target = self.top_p.max(0.0) as f64 * total;
        let n = w.len();
        let mut k = 64.min(n);
        let keep = loop {
            self.order.clear();
            self.order.extend(0..n as u32);
            if k < n {
                self.order.select_nth_unstable_by(k - 1, rank);
                self.order.truncate(k);
            }
            self.order.sort_unstable_by(rank);
            let mut c = 0.0;
            let mut keep = None;
            for (j, &i) in self.order.iter().enumerate() {
                c += w[i as usize];
                if c >= target {
                    keep = Some(j + 1);
                    break;
                }
            }
            match keep {
                Some(j) => break j,
                None if k == n => break n,
                None => k = (4 * k).min(n),
            }
        };
        let kept = &self.order[..keep];
        let z: f64 = kept.iter().map(|&i| w[i as usize]).sum();
        let mut r = self.rng.random::<f64>() * z;
        for &i in kept {
            r -= w[i as usize];
            if r <= 0.0 {
                return i;
            }
        }
        kept[kept.len() - 1]
    }

    /// The draw `sample_text`'s data-free calibration and evaluation texts are defined by
    /// (temperature and `top_p` as in `sample`): the tokens sorted by descending probability,
    /// then the inverse of their cumulative distribution at a uniform draw. It sorts the
    /// whole vocabulary (milliseconds a token); kept so that those texts, and the plans and
    /// figures made from them, stay the same for a seed.
    pub fn sample_by_rank(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits) as u32;
        }
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, (((l - m) / self.temperature) as f64).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
        let mut keep = probs.len();
        if self.top_p < 1.0 {
            let mut c = 0.0;
            for (i, p) in probs.iter().enumerate() {
                c += p.1 / total;
                if c >= self.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept = &probs[..keep];
        let z: f64 = kept.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f64>() * z;
        for p in kept {
            r -= p.1;
            if r <= 0.0 {
                return p.0 as u32;
            }
        }
        kept[kept.len() - 1].0 as u32
    }
}

/// Index of the largest value (the first one on ties; NaN never wins).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in x.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax(l: &[f32], t: f32) -> Vec<f64> {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = l.iter().map(|&x| (((x - m) / t) as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    /// Counts over `n` draws against the expected probabilities: each count within 6
    /// binomial standard deviations (plus one) of n p; a correct sampler fails this with
    /// probability below 1e-8 per token.
    fn check_counts(counts: &[usize], probs: &[f64], n: usize) {
        for (i, (&c, &p)) in counts.iter().zip(probs).enumerate() {
            let mean = n as f64 * p;
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            assert!(
                (c as f64 - mean).abs() <= 6.0 * sd + 1.0,
                "token {i}: {c} draws of {n}, expected {mean:.1} (sd {sd:.1})"
            );
        }
    }

    #[test]
    fn draws_follow_the_tempered_softmax() {
        let logits = [2.0f32, 1.0, 0.5, -1.0, 3.0, 0.0, 2.0, -4.0];
        for t in [0.5f32, 1.0, 1.7] {
            let mut s = Sampler::new(t, 1.0, 11);
            let n = 200_000;
            let mut counts = vec![0usize; logits.len()];
            for _ in 0..n {
                counts[s.sample(&logits) as usize] += 1;
            }
            check_counts(&counts, &softmax(&logits, t), n);
        }
    }

    #[test]
    fn the_nucleus_is_the_smallest_top_set_reaching_top_p() {
        // probabilities (T = 1) about .49 .18 .18 .07 .04 ...: with top_p 0.7 the
        // nucleus is tokens 4, 0 and 6 (ties by lower id: 0 before 6), renormalized
        let logits = [2.0f32, -3.0, 0.5, -1.0, 3.0, 0.0, 2.0, 1.0];
        let p = softmax(&logits, 1.0);
        let mut ranked: Vec<usize> = (0..logits.len()).collect();
        ranked.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        let mut c = 0.0;
        let mut nucleus = Vec::new();
        for &i in &ranked {
            nucleus.push(i);
            c += p[i];
            if c >= 0.7 {
                break;
            }
        }
        let z: f64 = nucleus.iter().map(|&i| p[i]).sum();
        let expect: Vec<f64> = (0..logits.len())
            .map(|i| if nucleus.contains(&i) { p[i] / z } else { 0.0 })
            .collect();
        let mut s = Sampler::new(1.0, 0.7, 5);
        let n = 200_000;
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            if !nucleus.contains(&i) {
                assert_eq!(c, 0, "token {i} is outside the nucleus {nucleus:?}");
            }
        }
        check_counts(&counts, &expect, n);
    }

    /// A vocabulary-sized nucleus (more than the first candidate sets) is found the same way
    /// as the full sort finds it: the rank sampler's set.
    #[test]
    fn a_wide_nucleus_matches_the_full_sort() {
        let mut st = 3u64;
        let logits: Vec<f32> = (0..5000)
            .map(|_| {
                st = st
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((st >> 40) as f32 / (1u64 << 24) as f32) * 4.0
            })
            .collect();
        let p = softmax(&logits, 1.0);
        let mut ranked: Vec<usize> = (0..logits.len()).collect();
        ranked.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        let mut c = 0.0;
        let mut size = 0;
        for &i in &ranked {
            size += 1;
            c += p[i];
            if c >= 0.95 {
                break;
            }
        }
        assert!(size > 1024, "a nucleus of {size} tokens");
        let inside: std::collections::HashSet<usize> = ranked[..size].iter().copied().collect();
        let mut s = Sampler::new(1.0, 0.95, 9);
        for _ in 0..2_000 {
            let id = s.sample(&logits) as usize;
            assert!(inside.contains(&id), "token {id} is outside the nucleus");
        }
    }

    #[test]
    fn greedy_and_degenerate_logits() {
        let mut s = Sampler::greedy();
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, -1.0]), 1);
        let mut s = Sampler::new(1.0, 0.9, 1);
        // one finite logit among -inf: always that one
        let l = [f32::NEG_INFINITY, 0.5, f32::NEG_INFINITY];
        for _ in 0..100 {
            assert_eq!(s.sample(&l), 1);
        }
        let mut s = Sampler::new(1.0, 1.0, 1);
        for _ in 0..100 {
            assert_eq!(s.sample(&l), 1);
        }
        // +inf: the argmax; a NaN logit is never drawn
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0]), 1);
        for _ in 0..100 {
            assert_ne!(s.sample(&[f32::NAN, 2.0, 1.0]), 0);
        }
    }

    /// The rank sampler (data-free texts) draws from the same distribution.
    #[test]
    fn the_rank_sampler_follows_the_softmax() {
        let logits = [2.0f32, 1.0, 0.5, -1.0, 3.0];
        let mut s = Sampler::new(1.0, 1.0, 2);
        let n = 100_000;
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample_by_rank(&logits) as usize] += 1;
        }
        check_counts(&counts, &softmax(&logits, 1.0), n);
    }
}
