//! LoRA (Hu et al., 2021) as peft implements it (`peft.tuners.lora.layer.Linear.forward`):
//! `y = base(x) + (dropout(x) · Aᵀ · Bᵀ) · α/r`, with A `(r × in)` initialised
//! kaiming-uniform (peft `reset_lora_parameters`: `kaiming_uniform_(a=√5)`, i.e. U(±1/√in)),
//! B `(out × r)` initialised to **zero** so the adapted layer starts equal to the base layer, and
//! dropout applied to the adapter's input only. Here the scale multiplies the r-wide product
//! (same result, an r-wide instead of an out-wide temporary).

use super::graph::Graph;
use super::rng::Rng;

/// The frozen weight of a Linear layer.
#[derive(Debug, Clone)]
pub enum Base<G: Graph> {
    /// NF4 storage, the custom op.
    Nf4(G::Nf4),
    /// A plain fp32 matrix `(out × in)`; the memory comparison's control.
    Dense(G::T),
}

/// LoRA adapter of one Linear layer.
#[derive(Debug, Clone)]
pub struct Adapter<G: Graph> {
    pub a: G::T,
    pub b: G::T,
    pub scale: f64,
    pub dropout: f32,
}

/// A frozen Linear layer with an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear<G: Graph> {
    pub base: Base<G>,
    pub adapter: Option<Adapter<G>>,
    pub in_features: usize,
    pub out_features: usize,
}

impl<G: Graph> Adapter<G> {
    /// A fresh adapter: A ~ U(±1/√in), B = 0.
    pub fn new(
        g: &G,
        in_features: usize,
        out_features: usize,
        rank: usize,
        alpha: f64,
        dropout: f32,
        rng: &mut Rng,
    ) -> Result<Adapter<G>, G::Error> {
        let bound = 1.0 / (in_features as f32).sqrt();
        let a = g.variable(&[rank, in_features], || {
            (0..rank * in_features)
                .map(|_| rng.uniform_symmetric(bound))
                .collect()
        })?;
        let b = g.variable(&[out_features, rank], || vec![0.0; out_features * rank])?;
        Ok(Adapter {
            a,
            b,
            scale: alpha / rank as f64,
            dropout,
        })
    }
}

impl<G: Graph> LoraLinear<G> {
    /// `x (tokens × in)` → `(tokens × out)`.
    pub fn forward(&self, g: &G, x: &G::T, rng: &mut Rng) -> Result<G::T, G::Error> {
        let base = match &self.base {
            Base::Nf4(w) => g.nf4_linear(x, w)?,
            Base::Dense(w) => g.matmul(x, &g.transpose(w, 0, 1)?)?,
        };
        let Some(ad) = &self.adapter else {
            return Ok(base);
        };
        let xd = if ad.dropout > 0.0 {
            let dims = g.dims(x);
            let n: usize = dims.iter().product();
            let keep = 1.0 / (1.0 - ad.dropout);
            let p = ad.dropout;
            let mask = g.constant(&dims, || {
                (0..n)
                    .map(|_| if rng.uniform() < p { 0.0 } else { keep })
                    .collect()
            })?;
            g.mul(x, &mask)?
        } else {
            x.clone()
        };
        let xa = g.matmul(&xd, &g.transpose(&ad.a, 0, 1)?)?;
        let xa = g.affine(&xa, ad.scale, 0.0)?;
        let xab = g.matmul(&xa, &g.transpose(&ad.b, 0, 1)?)?;
        g.add(&base, &xab)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::graph::Candle;
    use candle_core::Device;

    #[test]
    fn zero_b_returns_the_base_output_even_with_dropout() {
        let g = Candle::new(Device::Cpu);
        let mut rng = Rng::new(7);
        let (inf, outf, t) = (64, 128, 6);
        let w = g
            .nf4(outf, inf, true, || rng.normal_vec(outf * inf, 0.02))
            .unwrap();
        let x = g
            .constant(&[t, inf], || rng.normal_vec(t * inf, 1.0))
            .unwrap();
        let layer = LoraLinear::<Candle> {
            base: Base::Nf4(w.clone()),
            adapter: Some(Adapter::new(&g, inf, outf, 8, 16.0, 0.1, &mut rng).unwrap()),
            in_features: inf,
            out_features: outf,
        };
        let y = layer.forward(&g, &x, &mut rng).unwrap();
        let base = g.nf4_linear(&x, &w).unwrap();
        let diff = (y - &base).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        // With B ≠ 0 the adapter changes the output (the test above can fail).
        let ad = layer.adapter.as_ref().unwrap();
        let b1 = (ad.b.ones_like().unwrap() * 0.1).unwrap();
        g.vars.borrow()[1].set(&b1).unwrap();
        let y = layer.forward(&g, &x, &mut rng).unwrap();
        let diff = (y - &base).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() > 1e-3);
    }
}
