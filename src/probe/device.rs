//! Opening the CUDA device, as a twin module: without the `cuda` cargo feature the probe says it
//! was not compiled in; with it, a missing driver or GPU at run time is a different message.

use candle_core::Device;

/// Why a CUDA device is not usable.
#[derive(Debug, thiserror::Error)]
pub enum CudaUnavailable {
    #[error("this memplan was built without CUDA support; rebuild with `cargo build --release --features cuda` (needs the CUDA toolkit, nvcc, at build time) or use --device cpu")]
    NotCompiled,
    #[error("CUDA device 0 could not be opened ({0}); is an NVIDIA GPU and driver present? use --device cpu")]
    NotPresent(String),
}

#[cfg(feature = "cuda")]
mod enabled {
    use super::*;

    pub fn cuda_device() -> Result<Device, CudaUnavailable> {
        Device::new_cuda(0).map_err(|e| CudaUnavailable::NotPresent(e.to_string()))
    }

    pub fn synchronize(device: &Device) -> Result<(), CudaUnavailable> {
        device
            .synchronize()
            .map_err(|e| CudaUnavailable::NotPresent(e.to_string()))
    }
}

#[cfg(not(feature = "cuda"))]
mod disabled {
    use super::*;

    pub fn cuda_device() -> Result<Device, CudaUnavailable> {
        Err(CudaUnavailable::NotCompiled)
    }

    pub fn synchronize(_device: &Device) -> Result<(), CudaUnavailable> {
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
pub use disabled::{cuda_device, synchronize};
#[cfg(feature = "cuda")]
pub use enabled::{cuda_device, synchronize};

/// Whether this build has the CUDA backend.
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");

#[cfg(test)]
mod tests {
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn not_compiled_is_its_own_message() {
        let e = super::cuda_device().unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
