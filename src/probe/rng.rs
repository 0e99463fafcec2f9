//! A small deterministic generator (SplitMix64, Steele et al. 2014) so a probe run is
//! reproducible without a random-number dependency.

use std::num::NonZeroU64;

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 random bits (an f32 mantissa).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn uniform_symmetric(&mut self, bound: f32) -> f32 {
        (2.0 * self.uniform() - 1.0) * bound
    }

    /// N(0, std²) by Box–Muller.
    pub fn normal(&mut self, std: f32) -> f32 {
        let u1 = self.uniform().max(f32::MIN_POSITIVE);
        let u2 = self.uniform();
        std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }

    /// `n` draws of N(0, std²): Box–Muller's cosine and sine halves of each pair of uniforms
    /// (two normals per logarithm, the costly part of building a large random embedding).
    pub fn normal_vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let u1 = self.uniform().max(f32::MIN_POSITIVE);
            let u2 = self.uniform();
            let r = std * (-2.0 * u1.ln()).sqrt();
            let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
            out.push(r * c);
            if out.len() < n {
                out.push(r * s);
            }
        }
        out
    }

    /// Uniform in `[0, n)` (modulo bias below 2^-32 for n < 2^32). `n` cannot be zero.
    pub fn below(&mut self, n: NonZeroU64) -> u64 {
        self.next_u64() % n.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_vec_has_the_asked_mean_and_std() {
        let v = Rng::new(3).normal_vec(100_001, 0.02);
        assert_eq!(v.len(), 100_001);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        // Standard error of the mean 0.02/√n ≈ 6e-5; of the std ≈ 0.02/√(2n) ≈ 4.5e-5.
        assert!(mean.abs() < 3e-4, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 3e-4, "{}", var.sqrt());
    }

    #[test]
    fn below_stays_in_range_for_any_nonzero_bound() {
        let mut r = Rng::new(1);
        for n in [1u64, 2, 255, 1 << 32, u64::MAX] {
            let n = NonZeroU64::new(n).unwrap();
            assert!((0..100).all(|_| r.below(n) < n.get()));
        }
    }
}
