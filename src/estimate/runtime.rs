//! Runtime overheads outside the model's tensors, as measured for PyTorch on CUDA.
//!
//! - cuBLAS workspace: PyTorch keeps one workspace per (handle, stream); the forward runs on the
//!   main thread and the backward on autograd's device thread, so a step holds two. On Hopper
//!   each is 32 MiB (`CUBLAS_WORKSPACE_CONFIG` default `:4096:8`): `base_alloc` = 64 MiB in
//!   the H200 measurements, `tests/data/h200-pytorch.jsonl` (inside `max_memory_allocated`).
//! - CUDA context: 648,871,936 B on the H200 with driver 580 / CUDA 13 (NVML used memory before
//!   and after `torch.cuda.init()`, groundtruth `meta.context`); outside the allocator. It varies
//!   with GPU, driver and loaded kernels (typically 0.3–0.9 GiB); `--calibration` overrides it.
//! - Allocator reserve: reserved minus allocated at the peak, from the caching-allocator
//!   simulation (`crate::alloc`) replayed over the step's tensor events (`estimate::finish`).
//!   Against the 75 groundtruth steps: median 0.1%, worst 8% (book: Allocator).

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
/// `memplan estimate --calibration`. Absent fields keep the profile's value, but a file must set
/// at least one number, and a key it does not know (a misspelling) is an error rather than
/// silently running on the defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Where the numbers were measured (GPU name, driver).
    pub source: Option<String>,
    pub cuda_context_bytes: Option<u64>,
    pub workspace_bytes: Option<u64>,
}

impl Calibration {
    pub fn load(path: &Path) -> Result<Calibration, Error> {
        let text =
            crate::files::read_input(path, "calibration file", crate::files::MAX_INPUT_BYTES)?;
        Calibration::parse(&text).map_err(|message| Error::BadCalibration {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses a calibration TOML text; the error is one line, reason first.
    pub fn parse(text: &str) -> Result<Calibration, String> {
        let cal: Calibration =
            toml::from_str(text).map_err(|e| crate::error::toml_error_line(&e, text))?;
        if cal.cuda_context_bytes.is_none() && cal.workspace_bytes.is_none() {
            return Err(
                "sets neither cuda_context_bytes nor workspace_bytes (write it with `memplan probe --save-calibration FILE`)"
                    .into(),
            );
        }
        // A CUDA context or cuBLAS workspace beyond 64 GiB is no measurement of either.
        for (name, v) in [
            ("cuda_context_bytes", cal.cuda_context_bytes),
            ("workspace_bytes", cal.workspace_bytes),
        ] {
            if v.is_some_and(|b| b > 64 << 30) {
                return Err(format!("{name} = {} is beyond 64 GiB", v.unwrap_or(0)));
            }
        }
        Ok(cal)
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

/// PyTorch 2.11 on an H200 (`tests/data/h200-pytorch.jsonl`, `meta`).
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

    #[test]
    fn empty_files_unknown_keys_and_syntax_errors_are_one_line() {
        let e = Calibration::parse("").unwrap_err();
        assert!(e.contains("sets neither"), "{e}");
        let e = Calibration::parse("cuda_context_byte = 5\n").unwrap_err();
        assert!(e.starts_with("unknown field `cuda_context_byte`"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = Calibration::parse("source = \"x\"\ncuda_context_bytes 5\n").unwrap_err();
        assert!(e.ends_with("(line 2, column 20)"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        assert!(Calibration::parse("workspace_bytes = 1099511627776").is_err());
    }
}
