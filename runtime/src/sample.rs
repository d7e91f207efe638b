//! Next-token sampling: greedy, temperature, nucleus (top-p), seeded.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub struct Sampler {
    pub temperature: f32,
    pub top_p: f32,
    rng: StdRng,
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
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
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
