//! AdamW over named f32 params, with parameter groups (own learning rate and weight decay).
//! Fully deterministic: no randomness, updates in a fixed (name) order.

use std::collections::BTreeMap;

/// Params that share a learning rate and weight decay.
#[derive(Clone, Debug)]
pub struct ParamGroup {
    pub names: Vec<String>,
    pub lr: f32,
    pub weight_decay: f32,
}

#[derive(Clone, Debug)]
pub struct AdamW {
    pub groups: Vec<ParamGroup>,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    step: u64,
    m: BTreeMap<String, Vec<f32>>,
    v: BTreeMap<String, Vec<f32>>,
}

impl AdamW {
    /// PyTorch's defaults: betas (0.9, 0.999), eps 1e-8.
    pub fn new(groups: Vec<ParamGroup>) -> Self {
        AdamW {
            groups,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        }
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update of every grouped param that has a gradient (decoupled weight decay, bias
    /// corrected moments). Errors name a param whose gradient has the wrong length or is not
    /// finite; params are then left unchanged.
    pub fn step(
        &mut self,
        params: &mut BTreeMap<String, Vec<f32>>,
        grads: &BTreeMap<String, Vec<f32>>,
    ) -> Result<(), String> {
        for g in &self.groups {
            for n in &g.names {
                let (Some(p), Some(d)) = (params.get(n), grads.get(n)) else {
                    continue;
                };
                if p.len() != d.len() {
                    return Err(format!(
                        "gradient of {n} has {} values for {} params",
                        d.len(),
                        p.len()
                    ));
                }
                if let Some(i) = d.iter().position(|x| !x.is_finite()) {
                    return Err(format!("gradient of {n} is not finite at index {i}"));
                }
            }
        }
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - (b1 as f64).powi(t);
        let c2 = 1.0 - (b2 as f64).powi(t);
        for g in &self.groups {
            for n in &g.names {
                let (Some(p), Some(d)) = (params.get_mut(n), grads.get(n)) else {
                    continue;
                };
                let m = self
                    .m
                    .entry(n.clone())
                    .or_insert_with(|| vec![0.0; p.len()]);
                let v = self
                    .v
                    .entry(n.clone())
                    .or_insert_with(|| vec![0.0; p.len()]);
                for i in 0..p.len() {
                    let gi = d[i];
                    p[i] -= g.lr * g.weight_decay * p[i];
                    m[i] = b1 * m[i] + (1.0 - b1) * gi;
                    v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                    let mh = m[i] as f64 / c1;
                    let vh = v[i] as f64 / c2;
                    p[i] -= (g.lr as f64 * mh / (vh.sqrt() + self.eps as f64)) as f32;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(lr: f32, wd: f32) -> (AdamW, BTreeMap<String, Vec<f32>>) {
        let opt = AdamW::new(vec![ParamGroup {
            names: vec!["a".into()],
            lr,
            weight_decay: wd,
        }]);
        (opt, [("a".to_string(), vec![1.0, -2.0, 0.5])].into())
    }

    #[test]
    fn first_step_moves_by_lr_against_the_gradient_sign() {
        // Bias-corrected first step: m^ = g, v^ = g^2, so the update is lr * g / (|g| + eps).
        let (mut opt, mut p) = one(0.1, 0.0);
        let g = [("a".to_string(), vec![3.0, -0.25, 0.0])].into();
        opt.step(&mut p, &g).unwrap();
        let a = &p["a"];
        assert!((a[0] - 0.9).abs() < 1e-6 && (a[1] + 1.9).abs() < 1e-6 && a[2] == 0.5);
    }

    #[test]
    fn matches_the_reference_recursion_and_decays() {
        let (mut opt, mut p) = one(0.01, 0.1);
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let (mut x, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for t in 1..=50 {
            let g = (t as f64 * 0.37).sin();
            let grads = [("a".to_string(), vec![g as f32, 0.0, 0.0])].into();
            opt.step(&mut p, &grads).unwrap();
            x -= 0.01 * 0.1 * x;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let mh = m / (1.0 - b1.powi(t));
            let vh = v / (1.0 - b2.powi(t));
            x -= 0.01 * mh / (vh.sqrt() + eps);
            assert!((p["a"][0] as f64 - x).abs() < 1e-5, "step {t}");
        }
        assert_eq!(opt.steps(), 50);
    }

    #[test]
    fn rejects_bad_gradients_without_changing_params() {
        let (mut opt, mut p) = one(0.1, 0.0);
        let before = p.clone();
        let nan = [("a".to_string(), vec![1.0, f32::NAN, 0.0])].into();
        assert!(opt.step(&mut p, &nan).unwrap_err().contains("not finite"));
        let short = [("a".to_string(), vec![1.0])].into();
        assert!(opt.step(&mut p, &short).is_err());
        assert_eq!(p, before);
        assert_eq!(opt.steps(), 0);
    }
}
