//! The probe pipeline and its report.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use candle_core::Device;
use serde::Serialize;

use crate::estimate::runtime::Calibration;
use crate::method::{Attention, Job, LoraSettings, Method, Optimizer};
use crate::model::ModelShape;
use crate::Precision;

use super::expected::{estimate_step, CandleEstimate};
use super::graph::Candle;
use super::model::{scalar, Decoder, ModelConfig};
use super::nvml::{self, Inventory};
use super::rng::Rng;
use super::train::{AdamW, AdamWConfig};
use super::{alloc, device};

/// Share of free memory a step may be predicted to use before the probe refuses to run it.
pub const SAFETY_FRACTION: f64 = 0.8;

/// Where the step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Cpu,
    Cuda,
}

/// What the probe runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeOptions {
    pub model: ModelConfig,
    pub steps: usize,
    pub lr: f64,
    pub backend: Backend,
}

/// The device the step ran on (fixed JSON fields).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceSummary {
    pub name: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// NVIDIA driver version; null on the CPU.
    pub driver: Option<String>,
}

/// The probe's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeReport {
    pub backend: Backend,
    pub device: DeviceSummary,
    /// One line: the NVIDIA driver and GPUs NVML found, or why there is none.
    pub nvml_status: String,
    /// NVML inventory (null without an NVIDIA driver).
    pub gpus: Option<Inventory>,
    pub config: ProbeOptions,
    pub losses: Vec<f32>,
    /// Peak of the steady-state step: the model's resident bytes plus the smallest rise of live
    /// bytes within a step after the first (one-time runtime allocations, which land in some step,
    /// are thereby left out).
    pub measured_peak_bytes: u64,
    /// Bytes the runtime allocated during the steps and kept (on the CPU: gemm's thread-local
    /// packing buffers, one per thread that ran a matmul; on CUDA: cuBLAS workspace and allocator
    /// pools), like a CUDA context outside the tensors the estimate models. Reported, not compared.
    pub runtime_bytes: u64,
    pub estimated_peak_bytes: u64,
    /// (estimated − measured) / measured × 100: the estimate's error, with the sign and base the
    /// groundtruth validation uses.
    pub error_pct: f64,
    /// Peak of every step: resident model bytes plus the step's rise above the live bytes at its
    /// start (a step that allocated a one-time runtime buffer shows it here).
    pub step_peak_bytes: Vec<u64>,
    /// Highest live bytes of each phase (forward, backward, optimizer) of the steady-state step,
    /// measured like `measured_peak_bytes` (the smallest over the steps after the first).
    pub measured_phase_peak_bytes: Vec<(&'static str, u64)>,
    /// Bytes alive after building the model and optimizer, before the first step.
    pub measured_resident_bytes: u64,
    pub estimated_resident_bytes: u64,
    /// The candle runtime model's walk: phases and breakdown at the peak.
    pub estimate: CandleEstimate,
    /// memplan's PyTorch estimate (`peak_allocated_bytes`) of the same step, for contrast: the
    /// two runtimes keep different buffers alive.
    pub pytorch_estimated_peak_bytes: Option<u64>,
    /// How the peak was measured.
    pub measurement: String,
    /// CUDA only: the measured context size, as `--save-calibration` writes it.
    pub calibration: Option<Calibration>,
}

/// Why a probe did not produce a report.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Config(#[from] crate::Error),
    #[error(transparent)]
    Cuda(#[from] device::CudaUnavailable),
    #[error("refusing to run: the step is estimated at {estimated} bytes ({:.1} MiB), more than {pct:.0}% of the {free} bytes ({:.1} MiB) free on {device}; lower --batch, --seq, --hidden, --layers, --intermediate or --vocab", *estimated as f64 / 1048576.0, *free as f64 / 1048576.0, pct = SAFETY_FRACTION * 100.0)]
    TooLarge {
        estimated: u64,
        free: u64,
        device: String,
    },
    #[error("the training step failed on {device}: {message}")]
    Step { device: String, message: String },
    #[error("peak memory cannot be measured on the CPU: the counting allocator is not installed in this binary (memplan's main.rs installs it)")]
    NoAllocator,
    #[error("{0}")]
    Measure(String),
}

/// memplan's PyTorch Job for the same step (NF4 weights, fp32 compute, eager attention).
pub fn pytorch_job(cfg: &ModelConfig) -> Job {
    let shape = ModelShape::llama(
        "probe",
        cfg.vocab as u128,
        cfg.hidden as u128,
        cfg.layers as u128,
        cfg.heads as u128,
        cfg.kv_heads as u128,
        cfg.head_dim() as u128,
        cfg.intermediate as u128,
        cfg.tie_embeddings,
    );
    let mut job = Job::new(shape, Method::Qlora);
    job.weights = Precision::Nf4;
    job.compute = Precision::Fp32;
    job.lora = Some(LoraSettings {
        rank: cfg.rank as u128,
        targets: cfg.targets.clone(),
        dropout: f64::from(cfg.dropout),
    });
    job.double_quant = cfg.double_quant;
    job.optimizer = Optimizer::Adamw;
    job.batch = cfg.batch as u128;
    job.seq = cfg.seq as u128;
    job.attention = Attention::Eager;
    job
}

/// CPU name and memory from /proc (Linux); MemAvailable is what a new allocation can use.
fn cpu_summary() -> DeviceSummary {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or_else(|| "CPU".to_string(), |s| s.trim().to_string());
    DeviceSummary {
        name,
        total_bytes: field("MemTotal:"),
        free_bytes: field("MemAvailable:"),
        driver: None,
    }
}

/// Measures peak bytes above a baseline.
trait Meter {
    fn start_window(&mut self);
    fn window_peak(&mut self) -> Result<u64, ProbeError>;
    fn live_above_baseline(&self) -> u64;
}

struct CpuMeter {
    baseline: usize,
}

impl Meter for CpuMeter {
    fn start_window(&mut self) {
        alloc::reset_peak();
    }
    fn window_peak(&mut self) -> Result<u64, ProbeError> {
        Ok(alloc::peak().saturating_sub(self.baseline) as u64)
    }
    fn live_above_baseline(&self) -> u64 {
        alloc::current().saturating_sub(self.baseline) as u64
    }
}

struct CudaMeter {
    sampler: nvml::UsedMemorySampler,
    device: Device,
    /// NVML used bytes before the model was built (context already created).
    baseline: u64,
}

impl Meter for CudaMeter {
    fn start_window(&mut self) {
        self.sampler.reset();
    }
    fn window_peak(&mut self) -> Result<u64, ProbeError> {
        device::synchronize(&self.device)?;
        // One more sampling period so the sampler sees the end of the step.
        std::thread::sleep(Duration::from_millis(5));
        Ok(self.sampler.peak().saturating_sub(self.baseline))
    }
    fn live_above_baseline(&self) -> u64 {
        nvml::inventory()
            .ok()
            .and_then(|i| i.gpus.first().map(|g| g.used_bytes))
            .unwrap_or(0)
            .saturating_sub(self.baseline)
    }
}

struct Trained {
    losses: Vec<f32>,
    step_peaks: Vec<u64>,
    /// Per step: the highest live bytes of its forward, backward and optimizer phases.
    phase_peaks: Vec<[u64; 3]>,
    resident: u64,
    /// Live bytes the steps left behind that no tensor of the model owns.
    runtime: u64,
}

fn train(
    device: &Device,
    opts: &ProbeOptions,
    meter: &mut dyn Meter,
) -> candle_core::Result<Result<Trained, ProbeError>> {
    let g = Candle::new(device.clone());
    let model = Decoder::new(&g, &opts.model)?;
    let batch = model.batch(&g)?;
    let vars = g.vars.borrow().clone();
    let mut opt = AdamW::new(vars, AdamWConfig::with_lr(opts.lr))?;
    let resident = meter.live_above_baseline();
    let mut rng = Rng::new(opts.model.seed);
    let mut losses = Vec::with_capacity(opts.steps);
    let mut step_peaks = Vec::with_capacity(opts.steps);
    let mut phase_peaks = Vec::with_capacity(opts.steps);
    for _ in 0..opts.steps {
        let start = meter.live_above_baseline();
        // The step's own rise above what was live when it started, on top of the model; one
        // window per phase (forward, backward, optimizer), in the order the estimate walks them.
        let mut phases = [0u64; 3];
        meter.start_window();
        let loss = model.loss(&g, &batch, &mut rng)?;
        losses.push(scalar(&loss)?);
        match meter.window_peak() {
            Ok(p) => phases[0] = resident + p.saturating_sub(start),
            Err(e) => return Ok(Err(e)),
        }
        meter.start_window();
        let grads = loss.backward()?;
        // Free the forward graph before the update (the estimate assumes this order).
        drop(loss);
        match meter.window_peak() {
            Ok(p) => phases[1] = resident + p.saturating_sub(start),
            Err(e) => return Ok(Err(e)),
        }
        meter.start_window();
        opt.step(&grads)?;
        drop(grads);
        match meter.window_peak() {
            Ok(p) => phases[2] = resident + p.saturating_sub(start),
            Err(e) => return Ok(Err(e)),
        }
        step_peaks.push(phases.iter().copied().max().unwrap_or(0));
        phase_peaks.push(phases);
    }
    let runtime = meter.live_above_baseline().saturating_sub(resident);
    Ok(Ok(Trained {
        losses,
        step_peaks,
        phase_peaks,
        resident,
        runtime,
    }))
}

/// Runs the probe: inventory, estimate, safety check, the measured steps, the comparison.
pub fn probe(opts: &ProbeOptions) -> Result<ProbeReport, ProbeError> {
    opts.model.validate()?;
    if opts.steps == 0 {
        return Err(crate::Error::Unsupported("--steps must be at least 1".into()).into());
    }
    if !(opts.lr > 0.0 && opts.lr.is_finite()) {
        return Err(crate::Error::Unsupported(format!("--lr {} must be positive", opts.lr)).into());
    }
    let inv = nvml::inventory();
    let est = estimate_step(&opts.model)?;
    let pytorch = crate::estimate::estimate(&pytorch_job(&opts.model))
        .ok()
        .map(|e| e.peak_allocated_bytes.0 as u64);

    let (device, summary, mut meter, measurement, calibration): (
        Device,
        DeviceSummary,
        Box<dyn Meter>,
        String,
        Option<Calibration>,
    ) = match opts.backend {
        Backend::Cpu => {
            if !alloc::is_installed() {
                return Err(ProbeError::NoAllocator);
            }
            let summary = cpu_summary();
            check_fits(est.peak_bytes, summary.free_bytes, &summary.name)?;
            (
                Device::Cpu,
                summary,
                Box::new(CpuMeter {
                    baseline: alloc::current(),
                }),
                "counting global allocator: peak live heap bytes during the step, minus the bytes alive before the model was built".into(),
                None,
            )
        }
        Backend::Cuda => {
            if !device::CUDA_COMPILED {
                return Err(device::CudaUnavailable::NotCompiled.into());
            }
            let inv = inv.as_ref().map_err(|e| ProbeError::Measure(e.clone()))?;
            let gpu = inv
                .gpus
                .first()
                .ok_or_else(|| ProbeError::Measure("NVML lists no GPU; use --device cpu".into()))?;
            check_fits(est.peak_bytes, gpu.free_bytes, &gpu.name)?;
            let used_before = gpu.used_bytes;
            let device = device::cuda_device()?;
            let sampler = nvml::UsedMemorySampler::start(0, Duration::from_millis(1))
                .map_err(ProbeError::Measure)?;
            // Context created: what it took is the calibration's cuda_context_bytes.
            let after = nvml::inventory()
                .map_err(ProbeError::Measure)?
                .gpus
                .first()
                .map_or(used_before, |g| g.used_bytes);
            let summary = DeviceSummary {
                name: gpu.name.clone(),
                total_bytes: gpu.total_bytes,
                free_bytes: gpu.free_bytes,
                driver: Some(inv.driver.clone()),
            };
            let calibration = Calibration {
                source: Some(format!(
                    "{} (driver {}, memplan probe)",
                    gpu.name, inv.driver
                )),
                cuda_context_bytes: Some(after.saturating_sub(used_before)),
                workspace_bytes: None,
            };
            (
                device.clone(),
                summary,
                Box::new(CudaMeter {
                    sampler,
                    device,
                    baseline: after,
                }),
                "NVML used memory of the device sampled every 1 ms during the step, minus the used memory after CUDA context creation (includes candle's cuBLAS workspace and allocator rounding)".into(),
                Some(calibration),
            )
        }
    };

    let name = summary.name.clone();
    let trained = catch_unwind(AssertUnwindSafe(|| train(&device, opts, meter.as_mut())))
        .map_err(|p| ProbeError::Step {
            device: name.clone(),
            message: p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()),
        })?
        .map_err(|e| ProbeError::Step {
            device: name.clone(),
            message: e.to_string(),
        })??;

    let steady = if trained.step_peaks.len() > 1 {
        &trained.step_peaks[1..]
    } else {
        &trained.step_peaks[..]
    };
    let measured = steady.iter().copied().min().unwrap_or(0);
    // Per phase, the same steady-state rule: the smallest over the steps after the first.
    let steady_phases = if trained.phase_peaks.len() > 1 {
        &trained.phase_peaks[1..]
    } else {
        &trained.phase_peaks[..]
    };
    let measured_phase_peak_bytes = ["forward", "backward", "optimizer"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let v = steady_phases.iter().map(|p| p[i]).min().unwrap_or(0);
            (*name, v)
        })
        .collect();
    let estimated = est.peak_bytes as u64;
    let error_pct = if measured > 0 {
        (estimated as f64 - measured as f64) / measured as f64 * 100.0
    } else {
        0.0
    };
    Ok(ProbeReport {
        backend: opts.backend,
        device: summary,
        nvml_status: match &inv {
            Ok(i) => format!(
                "NVML: driver {}, CUDA {}, {} GPU(s)",
                i.driver,
                i.cuda_driver,
                i.gpus.len()
            ),
            Err(line) => line.clone(),
        },
        gpus: inv.ok(),
        config: opts.clone(),
        losses: trained.losses,
        measured_peak_bytes: measured,
        estimated_peak_bytes: estimated,
        error_pct,
        runtime_bytes: trained.runtime,
        step_peak_bytes: trained.step_peaks,
        measured_phase_peak_bytes,
        measured_resident_bytes: trained.resident,
        estimated_resident_bytes: est.resident_bytes as u64,
        estimate: est,
        pytorch_estimated_peak_bytes: pytorch,
        measurement,
        calibration,
    })
}

fn check_fits(estimated: u128, free: u64, device: &str) -> Result<(), ProbeError> {
    if estimated as f64 > SAFETY_FRACTION * free as f64 {
        return Err(ProbeError::TooLarge {
            estimated: estimated as u64,
            free,
            device: device.to_string(),
        });
    }
    Ok(())
}
