//! The operations the probe model is written in, over two backends:
//!
//! - [`Candle`]: real candle tensors (CPU, or CUDA with the `cuda` feature); this is what runs.
//! - [`super::expected::Shadow`]: shapes only, no data; it replays candle 0.11's rules for which
//!   buffers a step allocates and keeps alive, and is what the probe's estimate comes from.
//!
//! Writing the model once against this trait means the estimate walks exactly the ops the real
//! step runs; the memory rules themselves live in the shadow backend, documented there.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};

use super::nf4::Nf4Matrix;
use super::nf4_linear::Nf4Linear;

/// A handle to a frozen NF4 matrix: the real bytes, or only its size for the shadow.
pub trait Nf4Handle: Clone + std::fmt::Debug {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
}

impl Nf4Handle for Arc<Nf4Matrix> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

/// Tensor operations used by the probe model (fp32 throughout).
pub trait Graph {
    type T: Clone + std::fmt::Debug;
    type Nf4: Nf4Handle;
    type Error: std::error::Error + Send + Sync + 'static;

    fn dims(&self, t: &Self::T) -> Vec<usize>;
    /// A constant fp32 tensor that is not trained (frozen weights, masks, rotary tables).
    /// `values` is only called by backends that hold data.
    fn constant(
        &self,
        shape: &[usize],
        values: impl FnOnce() -> Vec<f32>,
    ) -> Result<Self::T, Self::Error>;
    /// A u32 index tensor (token ids, targets).
    fn indices(
        &self,
        shape: &[usize],
        values: impl FnOnce() -> Vec<u32>,
    ) -> Result<Self::T, Self::Error>;
    /// A trainable variable.
    fn variable(
        &self,
        shape: &[usize],
        values: impl FnOnce() -> Vec<f32>,
    ) -> Result<Self::T, Self::Error>;
    /// A frozen weight `rows × cols` (row-major values) quantized to NF4.
    fn nf4(
        &self,
        rows: usize,
        cols: usize,
        double_quant: bool,
        values: impl FnOnce() -> Vec<f32>,
    ) -> Result<Self::Nf4, Self::Error>;

    /// `x · Wᵀ` with W in NF4 (the custom op of [`super::nf4_linear`]).
    fn nf4_linear(&self, x: &Self::T, w: &Self::Nf4) -> Result<Self::T, Self::Error>;
    fn matmul(&self, a: &Self::T, b: &Self::T) -> Result<Self::T, Self::Error>;
    /// Swaps two dimensions (a view).
    fn transpose(&self, a: &Self::T, d1: usize, d2: usize) -> Result<Self::T, Self::Error>;
    /// A view when `a` is contiguous, else a copy (candle `reshape`).
    fn reshape(&self, a: &Self::T, shape: &[usize]) -> Result<Self::T, Self::Error>;
    fn contiguous(&self, a: &Self::T) -> Result<Self::T, Self::Error>;
    fn add(&self, a: &Self::T, b: &Self::T) -> Result<Self::T, Self::Error>;
    fn mul(&self, a: &Self::T, b: &Self::T) -> Result<Self::T, Self::Error>;
    fn broadcast_add(&self, a: &Self::T, b: &Self::T) -> Result<Self::T, Self::Error>;
    fn broadcast_sub(&self, a: &Self::T, b: &Self::T) -> Result<Self::T, Self::Error>;
    fn broadcast_mul(&self, a: &Self::T, b: &Self::T) -> Result<Self::T, Self::Error>;
    fn broadcast_div(&self, a: &Self::T, b: &Self::T) -> Result<Self::T, Self::Error>;
    fn affine(&self, a: &Self::T, mul: f64, add: f64) -> Result<Self::T, Self::Error>;
    fn exp(&self, a: &Self::T) -> Result<Self::T, Self::Error>;
    fn log(&self, a: &Self::T) -> Result<Self::T, Self::Error>;
    fn sqr(&self, a: &Self::T) -> Result<Self::T, Self::Error>;
    fn sqrt(&self, a: &Self::T) -> Result<Self::T, Self::Error>;
    fn silu(&self, a: &Self::T) -> Result<Self::T, Self::Error>;
    /// Sum over the last dimension, kept as size 1.
    fn sum_last_keepdim(&self, a: &Self::T) -> Result<Self::T, Self::Error>;
    /// Max over the last dimension, kept as size 1, detached from the graph (softmax's shift).
    fn max_last_keepdim_detached(&self, a: &Self::T) -> Result<Self::T, Self::Error>;
    /// Rows of a frozen table (embedding lookup): `table[ids]`.
    fn index_select_rows(&self, table: &Self::T, ids: &Self::T) -> Result<Self::T, Self::Error>;
    /// `a[i, ids[i]]` along the last dimension, ids of shape `(n, 1)`.
    fn gather_last(&self, a: &Self::T, ids: &Self::T) -> Result<Self::T, Self::Error>;
    /// Mean of all elements, a scalar.
    fn mean_all(&self, a: &Self::T) -> Result<Self::T, Self::Error>;
}

/// The real backend.
#[derive(Debug, Clone)]
pub struct Candle {
    pub device: Device,
    /// Every variable created, in creation order (the optimizer's parameters).
    pub vars: std::cell::RefCell<Vec<Var>>,
}

impl Candle {
    pub fn new(device: Device) -> Candle {
        Candle {
            device,
            vars: std::cell::RefCell::new(Vec::new()),
        }
    }
}

type R = candle_core::Result<Tensor>;

impl Graph for Candle {
    type T = Tensor;
    type Nf4 = Arc<Nf4Matrix>;
    type Error = candle_core::Error;

    fn dims(&self, t: &Tensor) -> Vec<usize> {
        t.dims().to_vec()
    }
    fn constant(&self, shape: &[usize], values: impl FnOnce() -> Vec<f32>) -> R {
        Tensor::from_vec(values(), shape, &self.device)
    }
    fn indices(&self, shape: &[usize], values: impl FnOnce() -> Vec<u32>) -> R {
        Tensor::from_vec(values(), shape, &self.device)
    }
    fn variable(&self, shape: &[usize], values: impl FnOnce() -> Vec<f32>) -> R {
        let v = Var::from_vec(values(), shape, &self.device)?;
        let t = v.as_tensor().clone();
        self.vars.borrow_mut().push(v);
        Ok(t)
    }
    fn nf4(
        &self,
        rows: usize,
        cols: usize,
        double_quant: bool,
        values: impl FnOnce() -> Vec<f32>,
    ) -> candle_core::Result<Arc<Nf4Matrix>> {
        Nf4Matrix::quantize(&values(), rows, cols, double_quant)
            .map(Arc::new)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
    fn nf4_linear(&self, x: &Tensor, w: &Arc<Nf4Matrix>) -> R {
        Nf4Linear::new(w.clone()).forward(x)
    }
    fn matmul(&self, a: &Tensor, b: &Tensor) -> R {
        a.matmul(b)
    }
    fn transpose(&self, a: &Tensor, d1: usize, d2: usize) -> R {
        a.transpose(d1, d2)
    }
    fn reshape(&self, a: &Tensor, shape: &[usize]) -> R {
        a.reshape(shape)
    }
    fn contiguous(&self, a: &Tensor) -> R {
        a.contiguous()
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> R {
        a.add(b)
    }
    fn mul(&self, a: &Tensor, b: &Tensor) -> R {
        a.mul(b)
    }
    fn broadcast_add(&self, a: &Tensor, b: &Tensor) -> R {
        a.broadcast_add(b)
    }
    fn broadcast_sub(&self, a: &Tensor, b: &Tensor) -> R {
        a.broadcast_sub(b)
    }
    fn broadcast_mul(&self, a: &Tensor, b: &Tensor) -> R {
        a.broadcast_mul(b)
    }
    fn broadcast_div(&self, a: &Tensor, b: &Tensor) -> R {
        a.broadcast_div(b)
    }
    fn affine(&self, a: &Tensor, mul: f64, add: f64) -> R {
        a.affine(mul, add)
    }
    fn exp(&self, a: &Tensor) -> R {
        a.exp()
    }
    fn log(&self, a: &Tensor) -> R {
        a.log()
    }
    fn sqr(&self, a: &Tensor) -> R {
        a.sqr()
    }
    fn sqrt(&self, a: &Tensor) -> R {
        a.sqrt()
    }
    fn silu(&self, a: &Tensor) -> R {
        a.silu()
    }
    fn sum_last_keepdim(&self, a: &Tensor) -> R {
        a.sum_keepdim(D::Minus1)
    }
    fn max_last_keepdim_detached(&self, a: &Tensor) -> R {
        Ok(a.max_keepdim(D::Minus1)?.detach())
    }
    fn index_select_rows(&self, table: &Tensor, ids: &Tensor) -> R {
        table.index_select(ids, 0)
    }
    fn gather_last(&self, a: &Tensor, ids: &Tensor) -> R {
        a.gather(ids, D::Minus1)
    }
    fn mean_all(&self, a: &Tensor) -> R {
        a.mean_all()
    }
}

/// The dtype every probe tensor uses: fp32 (candle's CPU matmul and the NF4 op's CPU kernel are
/// fp32; the CUDA path keeps the same dtype so the two backends run the same step).
pub const DTYPE: DType = DType::F32;
/// Bytes per element of [`DTYPE`].
pub const ELEM_BYTES: usize = 4;
