//! A frozen Linear layer stored in NF4, as a candle custom op: `y = x · Wᵀ` with `W` dequantized
//! into a temporary inside the op, and the input gradient `∂L/∂x = ∂L/∂y · W` computed by
//! dequantizing **again** in the backward (bitsandbytes `MatMul4Bit.backward` does the same:
//! `grad_A = grad_output @ dequantize_4bit(B).t()`). No dequantized weight stays alive between
//! forward and backward: candle's graph keeps only the op's input `x` and output `y`, and the op
//! itself, which holds the NF4 bytes.
//!
//! The weight is frozen, so the op returns no weight gradient. Inputs are 2-D `(tokens, in)` fp32.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::nf4::Nf4Matrix;

/// `x (m×k) · Wᵀ (k×n)` with `W (n×k)` in NF4.
#[derive(Debug, Clone)]
pub struct Nf4Linear {
    pub weight: Arc<Nf4Matrix>,
}

/// The backward's product `g (m×n) · W (n×k)`, with `W` dequantized again.
#[derive(Debug, Clone)]
struct Nf4LinearInputGrad {
    weight: Arc<Nf4Matrix>,
}

fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")).bt())?;
    let (m, k) = layout.shape().dims2()?;
    let data = storage.as_slice::<f32>()?;
    Ok((&data[start..end], m, k))
}

impl Nf4Linear {
    pub fn new(weight: Arc<Nf4Matrix>) -> Nf4Linear {
        Nf4Linear { weight }
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }
}

impl CustomOp1 for Nf4Linear {
    fn name(&self) -> &'static str {
        "nf4-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, m, k) = contiguous_f32(storage, layout, self.name())?;
        let w = &self.weight;
        if k != w.cols {
            candle_core::bail!("nf4-linear: input has {k} features, the weight {}", w.cols);
        }
        let n = w.rows;
        // The temporary dequantized weight: alive only inside this call. The product is candle's
        // own CPU matmul (gemm, multi-threaded) with `W` read transposed through its layout.
        let deq = CpuStorage::F32(w.dequantize());
        let wt = Layout::contiguous((n, k)).transpose(0, 1)?;
        let y = storage.matmul(&deq, (1, m, n, k), layout, &wt)?;
        Ok((y, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let (m, k) = layout.shape().dims2()?;
        let (n, wk) = (self.weight.rows, self.weight.cols);
        if k != wk {
            candle_core::bail!("nf4-linear: input has {k} features, the weight {wk}");
        }
        // Dequantized on the host, uploaded as a temporary that is dropped when this returns.
        let w = storage
            .device()
            .storage_from_slice(&self.weight.dequantize())?;
        let wt = Layout::contiguous((n, k)).transpose(0, 1)?;
        let y = storage.matmul(&w, (1, m, n, k), layout, &wt)?;
        Ok((y, Shape::from((m, n))))
    }

    /// `y = x Wᵀ` ⇒ `∂L/∂x = ∂L/∂y · W`; W is frozen (no weight gradient).
    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let op = Nf4LinearInputGrad {
            weight: self.weight.clone(),
        };
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

impl CustomOp1 for Nf4LinearInputGrad {
    fn name(&self) -> &'static str {
        "nf4-linear-input-grad"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, m, n) = contiguous_f32(storage, layout, self.name())?;
        let w = &self.weight;
        if n != w.rows {
            candle_core::bail!(
                "nf4-linear backward: gradient has {n} features, the weight {} rows",
                w.rows
            );
        }
        let k = w.cols;
        // `g (m×n) · W (n×k)`, W dequantized again into a temporary for this call only.
        let deq = CpuStorage::F32(w.dequantize());
        let wl = Layout::contiguous((n, k));
        let gx = storage.matmul(&deq, (1, m, k, n), layout, &wl)?;
        Ok((gx, Shape::from((m, k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let (m, n) = layout.shape().dims2()?;
        let k = self.weight.cols;
        let w = storage
            .device()
            .storage_from_slice(&self.weight.dequantize())?;
        let wl = Layout::contiguous((n, k));
        let gx = storage.matmul(&w, (1, m, k, n), layout, &wl)?;
        Ok((gx, Shape::from((m, k))))
    }
}

/// The slow reference: dequantize to an ordinary tensor and multiply (`x · Wᵀ`). Differentiable
/// through candle's own matmul backward; the tests compare the op with it.
pub fn reference_forward(w: &Nf4Matrix, x: &Tensor) -> candle_core::Result<Tensor> {
    let deq = Tensor::from_vec(w.dequantize(), (w.rows, w.cols), x.device())?;
    x.matmul(&deq.t()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    fn setup(double_quant: bool) -> (Arc<Nf4Matrix>, Var, Tensor) {
        let (m, k, n) = (5, 128, 96);
        let w = Nf4Matrix::quantize(&pseudo_random(n * k, 1), n, k, double_quant).unwrap();
        let dev = Device::Cpu;
        let x = Var::from_vec(pseudo_random(m * k, 2), (m, k), &dev).unwrap();
        let g = Tensor::from_vec(pseudo_random(m * n, 3), (m, n), &dev).unwrap();
        (Arc::new(w), x, g)
    }

    #[test]
    fn forward_equals_dequantize_then_matmul() {
        for dq in [false, true] {
            let (w, x, _) = setup(dq);
            let y = Nf4Linear::new(w.clone()).forward(x.as_tensor()).unwrap();
            let r = reference_forward(&w, x.as_tensor()).unwrap();
            assert_eq!(y.dims(), &[5, 96]);
            let diff = (y - r).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }

    #[test]
    fn input_gradient_equals_reference_gradient() {
        let (w, x, g) = setup(true);
        // L = Σ y ⊙ g, so ∂L/∂y = g and ∂L/∂x = g · W.
        let y = Nf4Linear::new(w.clone()).forward(x.as_tensor()).unwrap();
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let got = grads.get(x.as_tensor()).unwrap();
        let yr = reference_forward(&w, x.as_tensor()).unwrap();
        let grads_r = (yr * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let want = grads_r.get(x.as_tensor()).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        // And the gradient is not trivially zero.
        let norm = want
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 1.0);
    }

    #[test]
    fn wrong_input_width_is_an_error_not_a_panic() {
        let (w, _, _) = setup(false);
        let x = Tensor::zeros((2, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(Nf4Linear::new(w).forward(&x).is_err());
    }
}
