//! GPU catalogue (`presets/gpus.toml`, embedded) and the fits / does-not-fit verdict.
//!
//! A job fits when the estimate's `device_bytes` (reserved peak + CUDA context + paged state)
//! is at most the board's total memory as NVML reports it.
//!
//! Throughput, bandwidth and prices (for `memplan cost` and the ranking of `memplan fit`) are
//! optional fields with their source and date; presets/README.md documents units and sources.
//! `--gpu-file my.toml` adds GPUs or overrides fields of presets ([`Catalogue::with_file`]).

use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::error::{find_named, Error, Named};
use crate::estimate::Estimate;
use crate::units::{parse_size, Bytes, SizeUnit, MIB};

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
    /// Peak dense (no sparsity) BF16 tensor throughput, TFLOP/s; absent where there is no bf16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bf16_dense_tflops: Option<f64>,
    /// Peak dense FP16 tensor throughput (FP32 accumulate), TFLOP/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp16_dense_tflops: Option<f64>,
    /// Memory bandwidth, GB/s (10^9 bytes per second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bandwidth_gb_per_s: Option<f64>,
    #[serde(default)]
    pub throughput_source: String,
    /// Typical rental price per GPU-hour, USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hourly_price_usd: Option<f64>,
    #[serde(default)]
    pub hourly_price_source: String,
    /// Typical purchase price per GPU, USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purchase_price_usd: Option<f64>,
    #[serde(default)]
    pub purchase_price_source: String,
    /// When the prices were typical.
    #[serde(default)]
    pub prices_as_of: String,
    /// The exact size and its unit when the GPU was given as a size (`--gpu 24GB`).
    #[serde(skip)]
    pub written_size: Option<(Bytes, SizeUnit)>,
}

impl Gpu {
    pub fn memory(&self) -> Bytes {
        match self.written_size {
            Some((b, _)) => b,
            None => Bytes(u128::from(self.memory_mib) * MIB),
        }
    }

    /// The memory in the unit it was given in: `24.00 GB` for `--gpu 24GB`, GiB for presets
    /// (whose sizes are MiB, as nvidia-smi reports them).
    pub fn memory_text(&self) -> String {
        let unit = self.written_size.map_or(SizeUnit::Binary, |(_, u)| u);
        self.memory().display_in(unit)
    }

    /// A GPU known only by its memory size, as written.
    pub fn of_written_size(name: &str, bytes: Bytes, unit: SizeUnit) -> Gpu {
        let mut g = Gpu::of_size(name, bytes);
        g.written_size = Some((bytes, unit));
        g
    }

    /// A GPU known only by its memory size (whole MiB).
    pub fn of_size(name: &str, bytes: Bytes) -> Gpu {
        Gpu {
            name: name.to_string(),
            aliases: Vec::new(),
            memory_mib: u64::try_from(bytes.0 / MIB).unwrap_or(u64::MAX),
            spec_source: "given on the command line".into(),
            bf16_dense_tflops: None,
            fp16_dense_tflops: None,
            memory_bandwidth_gb_per_s: None,
            throughput_source: String::new(),
            hourly_price_usd: None,
            hourly_price_source: String::new(),
            purchase_price_usd: None,
            purchase_price_source: String::new(),
            prices_as_of: String::new(),
            written_size: None,
        }
    }
}

impl Named for Gpu {
    fn name(&self) -> &str {
        &self.name
    }

    fn aliases(&self) -> &[String] {
        &self.aliases
    }
}

#[derive(Debug, Deserialize)]
struct GpuFile {
    gpu: Vec<Gpu>,
}

/// One `[[gpu]]` of a user file: every field optional, so an entry can override a preset's
/// price alone; a new GPU needs `memory_mib`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuPatch {
    name: String,
    aliases: Option<Vec<String>>,
    memory_mib: Option<u64>,
    spec_source: Option<String>,
    bf16_dense_tflops: Option<f64>,
    fp16_dense_tflops: Option<f64>,
    memory_bandwidth_gb_per_s: Option<f64>,
    throughput_source: Option<String>,
    hourly_price_usd: Option<f64>,
    hourly_price_source: Option<String>,
    purchase_price_usd: Option<f64>,
    purchase_price_source: Option<String>,
    prices_as_of: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PatchFile {
    gpu: Vec<GpuPatch>,
}

/// The presets plus a user's `--gpu-file`.
#[derive(Debug, Clone, PartialEq)]
pub struct Catalogue {
    pub gpus: Vec<Gpu>,
}

impl Default for Catalogue {
    fn default() -> Self {
        Catalogue {
            gpus: gpus().to_vec(),
        }
    }
}

impl Catalogue {
    /// The presets, with `path` (if any) merged over them.
    pub fn load(path: Option<&Path>) -> Result<Catalogue, Error> {
        let mut c = Catalogue::default();
        if let Some(p) = path {
            let text = crate::files::read_input(p, "GPU file", crate::files::MAX_INPUT_BYTES)?;
            c.with_file(&text, &p.display().to_string())?;
        }
        Ok(c)
    }

    /// Merges a TOML text of `[[gpu]]` entries: a known name or alias overrides the fields it
    /// sets; a new name adds a GPU.
    pub fn with_file(&mut self, text: &str, origin: &str) -> Result<(), Error> {
        let bad = |message: String| Error::Preset {
            path: origin.to_string(),
            message,
        };
        let file: PatchFile =
            toml::from_str(text).map_err(|e| bad(crate::error::toml_error_line(&e, text)))?;
        for p in file.gpu {
            let idx = match self.gpus.iter().position(|g| g.answers_to(&p.name)) {
                Some(i) => i,
                None => {
                    let mib = p.memory_mib.ok_or_else(|| {
                        bad(format!(
                            "new GPU '{}' needs memory_mib (MiB, as nvidia-smi shows)",
                            p.name
                        ))
                    })?;
                    let mut g = Gpu::of_size(&p.name, Bytes(u128::from(mib) * MIB));
                    g.spec_source = origin.to_string();
                    self.gpus.push(g);
                    self.gpus.len() - 1
                }
            };
            let g = &mut self.gpus[idx];
            let positive = |v: Option<f64>, field: &str| -> Result<Option<f64>, Error> {
                let max = number_bound(field);
                match v {
                    Some(x) if !(x.is_finite() && x > 0.0 && x <= max) => Err(bad(format!(
                        "{}: {field} must be a positive number up to {max}, not {x}",
                        p.name
                    ))),
                    _ => Ok(v),
                }
            };
            macro_rules! set {
                ($f:ident) => {
                    if let Some(v) = p.$f.clone() {
                        g.$f = v;
                    }
                };
                ($f:ident, num) => {
                    if let Some(v) = positive(p.$f, stringify!($f))? {
                        g.$f = Some(v);
                    }
                };
            }
            if let Some(mib) = p.memory_mib {
                let bytes = u128::from(mib) * MIB;
                if !(crate::units::GPU_SIZE_MIN..=crate::units::GPU_SIZE_MAX).contains(&bytes) {
                    return Err(bad(format!(
                        "{}: memory_mib = {mib} is outside 256 to 67108864 MiB (256 MiB to 64 TiB)",
                        p.name
                    )));
                }
            }
            set!(aliases);
            set!(memory_mib);
            set!(spec_source);
            set!(bf16_dense_tflops, num);
            set!(fp16_dense_tflops, num);
            set!(memory_bandwidth_gb_per_s, num);
            set!(throughput_source);
            set!(hourly_price_usd, num);
            set!(hourly_price_source);
            set!(purchase_price_usd, num);
            set!(purchase_price_source);
            set!(prices_as_of);
        }
        Ok(())
    }

    /// Resolves `--gpu`: a name or alias, or a size such as `24GB`.
    pub fn resolve(&self, arg: &str) -> Result<Gpu, Error> {
        match find_named(&self.gpus, arg) {
            Ok(g) => Ok(g.clone()),
            Err(_) if arg.starts_with(|c: char| c.is_ascii_digit()) => {
                let (bytes, unit) = parse_size(arg)?;
                Ok(Gpu::of_written_size(arg, bytes, unit))
            }
            Err(suggestion) => Err(Error::UnknownGpu {
                name: arg.to_string(),
                suggestion,
            }),
        }
    }
}

/// The largest value a `--gpu-file` number may have, so that cost arithmetic stays finite:
/// throughput 10^5 TFLOP/s (40× a B200's 2,250 dense BF16), bandwidth 10^6 GB/s (125× a B200's
/// 8,000), prices 10^9 USD.
pub fn number_bound(field: &str) -> f64 {
    match field {
        "bf16_dense_tflops" | "fp16_dense_tflops" => 1e5,
        "memory_bandwidth_gb_per_s" => 1e6,
        _ => 1e9,
    }
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
    Catalogue::default().resolve(arg)
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
    /// The GPU's memory as written: `24.00 GB` for `--gpu 24GB`, GiB for presets.
    pub gpu_memory: String,
    /// When it does not fit: what would (`memplan fit`'s best plan, or a smaller batch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_fit: Option<crate::plan::Suggestion>,
}

impl Fit {
    /// The verdict line: `DOES NOT FIT on rtx-4090 (23.99 GiB): 101.5% used, headroom -0.36 GiB`,
    /// in the GPU's unit.
    pub fn verdict(&self) -> String {
        let unit = if self.gpu_memory.ends_with(" GB") {
            SizeUnit::Decimal
        } else {
            SizeUnit::Binary
        };
        let headroom = Bytes(self.headroom_bytes.unsigned_abs()).display_in(unit);
        if self.fits && self.utilization_pct > 100.0 {
            // The replay at the card's capacity fits only because the caching allocator frees
            // its cached blocks and retries before failing (CUDACachingAllocator.cpp
            // `release_cached_blocks`): say so rather than "FITS … 102% used".
            return format!(
                "FITS on {} ({}) only by the allocator freeing its cache: uncapped, the step would reserve {:.1}% of it; margin at the tightest moment {headroom}",
                self.gpu, self.gpu_memory, self.utilization_pct,
            );
        }
        format!(
            "{} on {} ({}): {:.1}% used, headroom {}{headroom}",
            if self.fits { "FITS" } else { "DOES NOT FIT" },
            self.gpu,
            self.gpu_memory,
            self.utilization_pct,
            if self.headroom_bytes < 0 { "-" } else { "" },
        )
    }

    /// `would fit: --method qlora --batch 2 (21.30 GiB)`, or why nothing does.
    pub fn advice(&self) -> Option<String> {
        if self.fits {
            return None;
        }
        Some(match &self.would_fit {
            // Fits only by the allocator freeing its cache and retrying: say so.
            Some(s) if s.device_bytes.0 > self.gpu_bytes.0 => format!(
                "would fit: {} (once the allocator frees its cache: {} uncapped; `memplan fit` lists every plan)",
                s.flags,
                s.device_bytes
            ),
            Some(s) => format!(
                "would fit: {} ({} on the device; `memplan fit` lists every plan)",
                s.flags,
                s.device_bytes
            ),
            None => "no method, optimizer or checkpointing fits at this sequence length: shorten --seq, shard over --gpus, or `memplan fit` for the longest sequence each plan allows".into(),
        })
    }
}

/// Whether the step fits: replayed through the caching allocator at the card's capacity
/// ([`crate::estimate::oom_check`]), not a margin over the allocated peak.
pub fn fit(est: &Estimate, gpu: &Gpu) -> Fit {
    let need = est.device_bytes.0;
    let have = gpu.memory().0;
    let check = crate::estimate::oom_check(est, have);
    Fit {
        gpu: gpu.name.clone(),
        gpu_bytes: gpu.memory(),
        fits: check.fits,
        // Fits: the margin at the tightest moment of the replay at capacity; else the shortfall
        // of the step's uncapped device total.
        headroom_bytes: if check.fits {
            check.min_headroom_bytes.0 as i128
        } else {
            have as i128 - need as i128
        },
        utilization_pct: need as f64 / have as f64 * 100.0,
        gpu_memory: gpu.memory_text(),
        would_fit: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_resolve() {
        assert!(gpus().len() >= 15);
        assert_eq!(resolve_gpu("H100").unwrap().name, "h100-80gb");
        assert_eq!(resolve_gpu("24GB").unwrap().memory(), Bytes(24_000_000_000));
        assert_eq!(resolve_gpu("24GB").unwrap().memory_text(), "24.00 GB");
        assert_eq!(resolve_gpu("24GiB").unwrap().memory(), Bytes(24 << 30));
        assert_eq!(resolve_gpu("rtx-4090").unwrap().memory_text(), "23.99 GiB");
        let e = resolve_gpu("rtx-4080").unwrap_err().to_string();
        assert!(e.contains("did you mean"), "{e}");
    }

    #[test]
    fn every_preset_has_throughput_and_sources() {
        for g in gpus() {
            let tf = g.bf16_dense_tflops.or(g.fp16_dense_tflops);
            assert!(tf.is_some_and(|t| t > 10.0), "{}", g.name);
            assert!(g.memory_bandwidth_gb_per_s.is_some(), "{}", g.name);
            assert!(!g.throughput_source.is_empty() && !g.hourly_price_source.is_empty());
            assert!(!g.purchase_price_source.is_empty() && !g.prices_as_of.is_empty());
        }
        // H100 SXM: 1,979 TFLOPS with 2:4 sparsity = 989.4 dense (datasheet).
        assert_eq!(resolve_gpu("h100").unwrap().bf16_dense_tflops, Some(989.4));
        assert_eq!(resolve_gpu("t4").unwrap().bf16_dense_tflops, None);
    }

    #[test]
    fn a_user_file_overrides_and_adds() {
        let mut c = Catalogue::default();
        c.with_file(
            "[[gpu]]\nname = \"H100\"\nhourly_price_usd = 1.5\n\n[[gpu]]\nname = \"my-card\"\nmemory_mib = 12288\nbf16_dense_tflops = 50\n",
            "my.toml",
        )
        .unwrap();
        let h = c.resolve("h100-80gb").unwrap();
        assert_eq!(h.hourly_price_usd, Some(1.5));
        assert_eq!(h.memory_mib, 81559);
        assert_eq!(c.resolve("my-card").unwrap().memory(), Bytes(12 << 30));
        assert!(c
            .with_file("[[gpu]]\nname = \"new\"\n", "x.toml")
            .unwrap_err()
            .to_string()
            .contains("memory_mib"));
        assert!(c
            .with_file(
                "[[gpu]]\nname = \"h100\"\nhourly_price_usd = -2\n",
                "x.toml"
            )
            .is_err());
    }
}
