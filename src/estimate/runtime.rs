//! Runtime overheads outside the model's tensors, as measured for PyTorch on CUDA.
//!
//! - cuBLAS workspace: PyTorch keeps one workspace per (handle, stream); the forward runs on the
//!   main thread and the backward on autograd's device thread, so a step holds two. On Hopper
//!   each is 32 MiB (`CUBLAS_WORKSPACE_CONFIG` default `:4096:8`): `base_alloc` = 64 MiB in
//!   `../shared/groundtruth` (inside `max_memory_allocated`).
//! - CUDA context: 648,871,936 B on the H200 with driver 580 / CUDA 13 (NVML used memory before
//!   and after `torch.cuda.init()`, groundtruth `meta.context`); outside the allocator. It varies
//!   with GPU, driver and loaded kernels (typically 0.3–0.9 GiB); `--calibration` overrides it.
//! - Allocator reserve: reserved minus allocated at the peak, from the caching-allocator
//!   simulation (`crate::alloc`) replayed over the step's tensor events (`estimate::finish`).
//!   Against the 75 groundtruth steps: median 1.7%, worst 18% (book: Allocator).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::units::MIB;

/// A framework's fixed costs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuntimeProfile {
    pub name: String,
    pub workspace_bytes: u128,
    pub cuda_context_bytes: u128,
}

/// Measured overheads written by `memplan probe --save-calibration` and read by
/// `memplan estimate --calibration`. Absent fields keep the profile's value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Where the numbers were measured (GPU name, driver).
    pub source: Option<String>,
    pub cuda_context_bytes: Option<u64>,
    pub workspace_bytes: Option<u64>,
}

impl Calibration {
    pub fn load(path: &Path) -> Result<Calibration, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| Error::BadConfig {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a struct of options serializes to TOML")
    }
}

impl RuntimeProfile {
    /// The PyTorch CUDA profile with calibrated overheads substituted.
    pub fn calibrated(&self, cal: &Calibration) -> RuntimeProfile {
        RuntimeProfile {
            name: match &cal.source {
                Some(s) => format!("{} (calibrated: {s})", self.name),
                None => format!("{} (calibrated)", self.name),
            },
            workspace_bytes: cal.workspace_bytes.map_or(self.workspace_bytes, u128::from),
            cuda_context_bytes: cal
                .cuda_context_bytes
                .map_or(self.cuda_context_bytes, u128::from),
        }
    }
}

/// PyTorch 2.11 on an H200 (`../shared/groundtruth/h200-pytorch.jsonl`, `meta`).
pub fn pytorch_cuda() -> RuntimeProfile {
    RuntimeProfile {
        name: "pytorch-cuda".into(),
        workspace_bytes: 64 * MIB,
        cuda_context_bytes: 648_871_936,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_round_trips_and_overrides() {
        let cal = Calibration {
            source: Some("NVIDIA H200".into()),
            cuda_context_bytes: Some(500_000_000),
            workspace_bytes: None,
        };
        let back: Calibration = toml::from_str(&cal.to_toml()).unwrap();
        assert_eq!(back, cal);
        let p = pytorch_cuda().calibrated(&cal);
        assert_eq!(p.cuda_context_bytes, 500_000_000);
        assert_eq!(p.workspace_bytes, 64 * MIB);
    }
}
