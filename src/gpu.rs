//! GPU catalogue (`presets/gpus.toml`, embedded) and the fits / does-not-fit verdict.
//!
//! A job fits when the estimate's `device_bytes` (reserved peak + CUDA context + paged state)
//! is at most the board's total memory as NVML reports it.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::error::{did_you_mean, Error};
use crate::estimate::Estimate;
use crate::units::{parse_size, Bytes, MIB};

const GPUS_TOML: &str = include_str!("../presets/gpus.toml");

/// A GPU preset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub memory_mib: u64,
    #[serde(default)]
    pub spec_source: String,
}

impl Gpu {
    pub fn memory(&self) -> Bytes {
        Bytes(u128::from(self.memory_mib) * MIB)
    }
}

#[derive(Debug, Deserialize)]
struct GpuFile {
    gpu: Vec<Gpu>,
}

/// All GPU presets, parsed once.
pub fn gpus() -> &'static [Gpu] {
    static GPUS: OnceLock<Vec<Gpu>> = OnceLock::new();
    GPUS.get_or_init(|| {
        toml::from_str::<GpuFile>(GPUS_TOML)
            .expect("presets/gpus.toml is valid (tested)")
            .gpu
    })
}

/// Resolves `--gpu`: a preset name or alias, or a size such as `24GB`.
pub fn resolve_gpu(arg: &str) -> Result<Gpu, Error> {
    if let Some(g) = gpus().iter().find(|g| {
        g.name.eq_ignore_ascii_case(arg) || g.aliases.iter().any(|a| a.eq_ignore_ascii_case(arg))
    }) {
        return Ok(g.clone());
    }
    if arg.starts_with(|c: char| c.is_ascii_digit()) {
        let bytes = parse_size(arg)?;
        return Ok(Gpu {
            name: arg.to_string(),
            aliases: Vec::new(),
            memory_mib: (bytes.0 / MIB) as u64,
            spec_source: "given on the command line".into(),
        });
    }
    let names = gpus()
        .iter()
        .flat_map(|g| std::iter::once(g.name.as_str()).chain(g.aliases.iter().map(String::as_str)));
    Err(Error::UnknownGpu {
        name: arg.to_string(),
        suggestion: did_you_mean(arg, names),
    })
}

/// Whether an estimate fits a GPU, and by how much.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fit {
    pub gpu: String,
    pub gpu_bytes: Bytes,
    pub fits: bool,
    /// GPU memory minus `device_bytes` (negative: the shortfall).
    pub headroom_bytes: i128,
    /// Share of the GPU's memory the step needs, in percent.
    pub utilization_pct: f64,
}

pub fn fit(est: &Estimate, gpu: &Gpu) -> Fit {
    let need = est.device_bytes.0;
    let have = gpu.memory().0;
    Fit {
        gpu: gpu.name.clone(),
        gpu_bytes: gpu.memory(),
        fits: need <= have,
        headroom_bytes: have as i128 - need as i128,
        utilization_pct: need as f64 / have as f64 * 100.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_resolve() {
        assert!(gpus().len() >= 15);
        assert_eq!(resolve_gpu("H100").unwrap().name, "h100-80gb");
        assert_eq!(resolve_gpu("24GB").unwrap().memory(), Bytes(24 << 30));
        let e = resolve_gpu("rtx-4080").unwrap_err().to_string();
        assert!(e.contains("did you mean"), "{e}");
    }
}
