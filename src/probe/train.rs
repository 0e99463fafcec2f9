//! The real training step: forward, cross-entropy, candle's backward, AdamW on the adapters.
//!
//! AdamW is written here on candle tensors (Loshchilov & Hutter, "Decoupled Weight Decay
//! Regularization", 2019, Algorithm 2; the update of `torch.optim.AdamW`):
//! `p ← p·(1 − lr·λ)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p − lr · (m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)`.
//! candle-nn has an AdamW too; a dozen lines here avoid a dependency and make its temporaries
//! (which the estimate counts, rule 7 of [`super::expected`]) visible.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// `torch.optim.AdamW` defaults: β₁ = 0.9, β₂ = 0.999, ε = 1e-8, weight decay 0.01.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    pub fn with_lr(lr: f64) -> AdamWConfig {
        AdamWConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW over a fixed list of variables (the LoRA adapters).
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i32,
}

impl AdamW {
    /// Creates the optimizer and its zeroed state (`m`, `v`: two copies of every variable).
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> candle_core::Result<AdamW> {
        let m = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m
            .iter()
            .map(|t| t.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            cfg,
            vars,
            m,
            v,
            t: 0,
        })
    }

    /// One update from `grads`; variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t);
        let bc2 = 1.0 - c.beta2.powi(self.t);
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - c.lr * c.weight_decay))?;
            var.set(&(decayed - (update * c.lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::graph::Candle;
    use crate::probe::model::{Decoder, ModelConfig};
    use crate::probe::rng::Rng;
    use candle_core::Device;

    fn small() -> ModelConfig {
        ModelConfig {
            vocab: 64,
            hidden: 64,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            head_dim: 32,
            intermediate: 128,
            tie_embeddings: true,
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: crate::method::dense_all_linear(),
            double_quant: false,
            nf4: true,
            batch: 1,
            seq: 8,
            seed: 3,
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn adamw_moves_only_the_adapters() {
        let g = Candle::new(Device::Cpu);
        let model = Decoder::new(&g, &small()).unwrap();
        let batch = model.batch(&g).unwrap();
        let frozen: Vec<Vec<f32>> = [&model.embed, &model.final_norm, &model.layers[0].attn_norm]
            .iter()
            .map(|t| values(t))
            .collect();
        let nf4: Vec<Vec<u8>> = model.layers[0]
            .linears
            .iter()
            .map(|l| match &l.base {
                crate::probe::lora::Base::Nf4(w) => w.packed.clone(),
                crate::probe::lora::Base::Dense(_) => unreachable!("nf4 config"),
            })
            .collect();
        let vars = g.vars.borrow().clone();
        let before: Vec<Vec<f32>> = vars.iter().map(|v| values(v.as_tensor())).collect();
        let mut opt = AdamW::new(vars.clone(), AdamWConfig::with_lr(1e-2)).unwrap();
        let loss = model.loss(&g, &batch, &mut Rng::new(1)).unwrap();
        let grads = loss.backward().unwrap();
        // The store also holds gradients of frozen inputs (candle computes them); the optimizer
        // must not apply them.
        assert!(grads.get(&model.embed).is_some() || grads.get_ids().count() > vars.len());
        opt.step(&grads).unwrap();
        // Every B moved (its gradient is nonzero while A is random); A only by weight decay at
        // step one (B = 0 makes its gradient zero), so it moved too, by lr·λ·A.
        for (i, v) in vars.iter().enumerate() {
            let after = values(v.as_tensor());
            assert_ne!(after, before[i], "variable {i} did not move");
        }
        let frozen_after: Vec<Vec<f32>> =
            [&model.embed, &model.final_norm, &model.layers[0].attn_norm]
                .iter()
                .map(|t| values(t))
                .collect();
        assert_eq!(frozen, frozen_after);
        for (l, packed) in model.layers[0].linears.iter().zip(&nf4) {
            if let crate::probe::lora::Base::Nf4(w) = &l.base {
                assert_eq!(&w.packed, packed);
            }
        }
    }
}
