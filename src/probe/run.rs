//! The probe pipeline and its report.
//!
//! One model is built at the deepest depth of [`ProbeOptions::layer_runs`] and measured at each
//! depth in turn, deepest first, dropping decoder layers between runs (so the random embedding,
//! the costliest part to build, is made once). The toy model runs at one depth; a plan runs at
//! 2 (or more) and 1, which is what the per-layer and fixed terms of [`super::plan`] come from.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use candle_core::{Device, Var};
use serde::Serialize;

use crate::estimate::runtime::Calibration;
use crate::method::{Attention, Job, LoraSettings, Method, Optimizer};
use crate::model::ModelShape;
use crate::Precision;

use super::expected::{estimate_step, CandleEstimate};
use super::graph::Candle;
use super::model::{scalar, Decoder, ModelConfig};
use super::nvml::{self, Inventory};
use super::plan::{self, DepthTerms, PlanCheck, PlanRequest, Term};
use super::rng::Rng;
use super::train::{AdamW, AdamWConfig};
use super::{alloc, device};

/// Share of free memory a step may be predicted to use before the probe refuses to run it.
pub const SAFETY_FRACTION: f64 = 0.8;
/// Most training steps one run takes (a bound on `--steps`).
pub const MAX_STEPS: usize = 1000;
/// Phases measured in their own window, in step order.
pub const PHASES: [&str; 3] = ["forward", "backward", "optimizer"];

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
    /// The model at the deepest measured depth (`layers`); JSON `config.hidden`, `config.vocab`, …
    #[serde(flatten)]
    pub model: ModelConfig,
    pub steps: usize,
    pub lr: f64,
    pub backend: Backend,
    /// Depths measured, deepest first (`[layers]` for one run).
    pub layer_runs: Vec<usize>,
    /// The plan being checked (`--model`); None for the toy model.
    #[serde(skip)]
    pub plan: Option<PlanRequest>,
}

impl ProbeOptions {
    /// One run of `model` at its own depth.
    pub fn single(model: ModelConfig, steps: usize, lr: f64, backend: Backend) -> ProbeOptions {
        let layer_runs = vec![model.layers];
        ProbeOptions {
            model,
            steps,
            lr,
            backend,
            layer_runs,
            plan: None,
        }
    }

    fn at_depth(&self, layers: usize) -> ModelConfig {
        ModelConfig {
            layers,
            ..self.model.clone()
        }
    }
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

/// One measured depth.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    pub layers: usize,
    pub losses: Vec<f32>,
    /// Steady-state peak (see [`ProbeReport::measured_peak_bytes`]).
    pub measured_peak_bytes: u64,
    pub estimated_peak_bytes: u64,
    /// (estimated − measured) / measured × 100.
    pub error_pct: f64,
    pub measured_phase_peak_bytes: Vec<(&'static str, u64)>,
    pub estimated_phase_peak_bytes: Vec<(&'static str, u64)>,
    pub measured_resident_bytes: u64,
    pub estimated_resident_bytes: u64,
    pub step_peak_bytes: Vec<u64>,
    /// Wall time of this run's steps.
    pub seconds: f64,
}

/// The probe's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeReport {
    pub backend: Backend,
    pub device: DeviceSummary,
    /// One line: the NVIDIA driver and GPUs NVML found, or why there is none.
    pub nvml_status: String,
    /// NVML inventory (null without an NVIDIA driver): per GPU total, used, free and the memory
    /// of other processes.
    pub gpus: Option<Inventory>,
    /// What ran: the model at `layers` (the deepest run), steps, learning rate, backend.
    pub config: ProbeOptions,
    /// Free memory the verdict and the safety check are held against: GPU 0's free memory from
    /// NVML when there is a GPU, else the machine's available RAM.
    pub free_bytes: u64,
    /// What `free_bytes` is.
    pub free_of: String,
    /// The deepest run's losses, one per step.
    pub losses: Vec<f32>,
    /// Peak of the deepest run's steady-state step: the model's resident bytes plus the smallest
    /// rise of live bytes within a step after the first (one-time runtime allocations, which land
    /// in some step, are thereby left out).
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
    /// The candle runtime model's walk of the deepest run: phases and breakdown at the peak.
    pub estimate: CandleEstimate,
    /// memplan's PyTorch estimate (`peak_allocated_bytes`) of the same step, for contrast: the
    /// two runtimes keep different buffers alive.
    pub pytorch_estimated_peak_bytes: Option<u64>,
    /// Every measured depth, deepest first.
    pub runs: Vec<RunReport>,
    /// The step's peak per decoder layer, measured (from the runs) and modelled (candle runtime
    /// model at the same shapes); null with one depth.
    pub per_layer: Option<Term>,
    /// The step's peak without decoder layers (embedding, lm_head, logits, loss), measured and
    /// modelled; null with one depth.
    pub fixed: Option<Term>,
    /// The same two terms for each phase and for the resident bytes.
    pub terms: Vec<DepthTerms>,
    /// The user's plan beside the candle figures and the free memory (`--model`).
    pub plan: Option<PlanCheck>,
    /// What the reader should know: a shortened sequence, where the candle step differs from the
    /// plan.
    pub notes: Vec<String>,
    /// Wall time to build the model (random weights, NF4 quantization).
    pub build_seconds: f64,
    /// Wall time of the whole probe.
    pub total_seconds: f64,
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
    #[error("refusing to run: the step is estimated at {estimated} bytes ({:.1} MiB), more than {pct:.0}% of the {free} bytes ({:.1} MiB) free on {device}; {advice}", *estimated as f64 / 1048576.0, *free as f64 / 1048576.0, pct = SAFETY_FRACTION * 100.0)]
    TooLarge {
        estimated: u64,
        free: u64,
        device: String,
        advice: String,
    },
    #[error("out of memory on {device} during the {layers}-layer step (estimated {estimated} bytes, {free} bytes were free): {message}")]
    OutOfMemory {
        device: String,
        layers: usize,
        estimated: u64,
        free: u64,
        message: String,
    },
    #[error("the loss of step {step} is {loss} (not finite) with {layers} layer(s): lower --lr or --alpha")]
    NonFiniteLoss {
        step: usize,
        layers: usize,
        loss: f32,
    },
    #[error("the training step failed on {device}: {message}")]
    Step { device: String, message: String },
    #[error("peak memory cannot be measured on the CPU: the counting allocator is not installed in this binary (memplan's main.rs installs it)")]
    NoAllocator,
    #[error("{0}")]
    Measure(String),
}

/// Whether a runtime error message is an allocation failure (cudarc: `CUDA_ERROR_OUT_OF_MEMORY`;
/// cuBLAS: `CUBLAS_STATUS_ALLOC_FAILED`; candle's own messages say "out of memory").
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out_of_memory") || m.contains("out of memory") || m.contains("alloc_failed")
}

/// memplan's PyTorch Job for the same step (NF4 weights or a frozen fp32 base, fp32 compute,
/// eager attention).
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
    let (method, weights) = if cfg.nf4 {
        (Method::Qlora, Precision::Nf4)
    } else {
        (Method::Lora, Precision::Fp32)
    };
    let mut job = Job::new(shape, method);
    job.weights = weights;
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
    layers: usize,
    losses: Vec<f32>,
    step_peaks: Vec<u64>,
    /// Per step: the highest live bytes of its forward, backward and optimizer phases.
    phase_peaks: Vec<[u64; 3]>,
    resident: u64,
    /// Live bytes the steps left behind that no tensor of the model owns (cumulative over runs).
    runtime: u64,
    seconds: f64,
}

struct Measured {
    runs: Vec<Trained>,
    build_seconds: f64,
}

/// Builds the model at the deepest depth and runs the steps at every depth of
/// `opts.layer_runs`, deepest first. `depth` says which run is under way (for error messages).
fn measure_runs(
    device: &Device,
    opts: &ProbeOptions,
    meter: &mut dyn Meter,
    depth: &mut usize,
) -> candle_core::Result<Result<Measured, ProbeError>> {
    let started = Instant::now();
    let g = Candle::new(device.clone());
    *depth = opts.layer_runs[0];
    let mut model = Decoder::new(&g, &opts.at_depth(*depth))?;
    // The adapters own their variables; each run's optimizer takes those of the layers it keeps.
    g.vars.borrow_mut().clear();
    let batch = model.batch(&g)?;
    let build_seconds = started.elapsed().as_secs_f64();
    let mut runs = Vec::with_capacity(opts.layer_runs.len());
    // Runtime buffers earlier runs left (gemm's per-thread packing buffers): not the model's.
    let mut carried = 0u64;
    for (run, &k) in opts.layer_runs.iter().enumerate() {
        *depth = k;
        let started = Instant::now();
        // The first step of the first run pays the runtime's one-time allocations (gemm's
        // per-thread buffers) and is left out of the steady state; later runs start warm and
        // need one step fewer.
        let steps = if run == 0 {
            opts.steps
        } else {
            opts.steps.saturating_sub(1).max(1)
        };
        model.layers.truncate(k);
        model.cfg.layers = k;
        let vars = model
            .layers
            .iter()
            .flat_map(|l| &l.linears)
            .filter_map(|l| l.adapter.as_ref())
            .flat_map(|a| [&a.a, &a.b])
            .map(Var::from_tensor)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut opt = AdamW::new(vars, AdamWConfig::with_lr(opts.lr))?;
        let resident = meter.live_above_baseline().saturating_sub(carried);
        let mut rng = Rng::new(opts.model.seed);
        let mut losses = Vec::with_capacity(steps);
        let mut step_peaks = Vec::with_capacity(steps);
        let mut phase_peaks = Vec::with_capacity(steps);
        for step in 1..=steps {
            let start = meter.live_above_baseline();
            // The step's own rise above what was live when it started, on top of the model; one
            // window per phase (forward, backward, optimizer), in the order the estimate walks them.
            let mut phases = [0u64; 3];
            meter.start_window();
            let loss = model.loss(&g, &batch, &mut rng)?;
            let value = scalar(&loss)?;
            if !value.is_finite() {
                return Ok(Err(ProbeError::NonFiniteLoss {
                    step,
                    layers: k,
                    loss: value,
                }));
            }
            losses.push(value);
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
        carried = meter.live_above_baseline().saturating_sub(resident);
        drop(opt);
        runs.push(Trained {
            layers: k,
            losses,
            step_peaks,
            phase_peaks,
            resident,
            runtime: carried,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    Ok(Ok(Measured {
        runs,
        build_seconds,
    }))
}

/// Steps after the first (the first pays one-time runtime allocations), or the only one (a
/// later run, which starts warm, may take one step).
fn steady<T>(v: &[T]) -> &[T] {
    if v.len() > 1 {
        &v[1..]
    } else {
        v
    }
}

fn error_pct(measured: u64, estimated: u64) -> f64 {
    if measured > 0 {
        (estimated as f64 - measured as f64) / measured as f64 * 100.0
    } else {
        0.0
    }
}

fn run_report(t: &Trained, est: &CandleEstimate) -> RunReport {
    let measured = steady(&t.step_peaks).iter().copied().min().unwrap_or(0);
    let measured_phase_peak_bytes = PHASES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let v = steady(&t.phase_peaks)
                .iter()
                .map(|p| p[i])
                .min()
                .unwrap_or(0);
            (*name, v)
        })
        .collect();
    let estimated = est.peak_bytes as u64;
    RunReport {
        layers: t.layers,
        losses: t.losses.clone(),
        measured_peak_bytes: measured,
        estimated_peak_bytes: estimated,
        error_pct: error_pct(measured, estimated),
        measured_phase_peak_bytes,
        estimated_phase_peak_bytes: est
            .phases
            .iter()
            .filter(|(p, _)| PHASES.contains(p))
            .map(|(p, b)| (*p, *b as u64))
            .collect(),
        measured_resident_bytes: t.resident,
        estimated_resident_bytes: est.resident_bytes as u64,
        step_peak_bytes: t.step_peaks.clone(),
        seconds: t.seconds,
    }
}

fn phase_value(v: &[(&'static str, u64)], phase: &str) -> u64 {
    v.iter().find(|(p, _)| *p == phase).map_or(0, |(_, b)| *b)
}

/// Per-layer and fixed terms of the peak, of each phase and of the resident bytes, measured and
/// modelled, from the runs at different depths.
fn depth_terms(runs: &[RunReport]) -> Vec<DepthTerms> {
    // (measured, modelled) of one quantity of one run.
    let value = |r: &RunReport, quantity: &str| match quantity {
        "peak" => (r.measured_peak_bytes, r.estimated_peak_bytes),
        "resident" => (r.measured_resident_bytes, r.estimated_resident_bytes),
        phase => (
            phase_value(&r.measured_phase_peak_bytes, phase),
            phase_value(&r.estimated_phase_peak_bytes, phase),
        ),
    };
    ["peak", "resident", "forward", "backward", "optimizer"]
        .into_iter()
        .filter_map(|quantity| {
            let measured: Vec<(usize, u64)> = runs
                .iter()
                .map(|r| (r.layers, value(r, quantity).0))
                .collect();
            let modelled: Vec<(usize, u64)> = runs
                .iter()
                .map(|r| (r.layers, value(r, quantity).1))
                .collect();
            let (mp, mf) = plan::affine_terms(&measured)?;
            let (ep, ef) = plan::affine_terms(&modelled)?;
            Some(DepthTerms {
                quantity,
                per_layer: Term::new(mp, ep),
                fixed: Term::new(mf, ef),
            })
        })
        .collect()
}

fn check_options(opts: &ProbeOptions) -> Result<(), ProbeError> {
    let bad = |m: String| Err(ProbeError::Config(crate::Error::Unsupported(m)));
    opts.model.validate()?;
    if !(1..=MAX_STEPS).contains(&opts.steps) {
        return bad(format!("--steps {}: between 1 and {MAX_STEPS}", opts.steps));
    }
    if !(opts.lr > 0.0 && opts.lr.is_finite()) {
        return bad(format!("--lr {} must be positive and finite", opts.lr));
    }
    let runs = &opts.layer_runs;
    if runs.is_empty()
        || runs[0] != opts.model.layers
        || runs.contains(&0)
        || runs.windows(2).any(|w| w[1] >= w[0])
    {
        return bad(format!(
            "layer runs {runs:?}: depths from {} down, each at least 1",
            opts.model.layers
        ));
    }
    Ok(())
}

/// Makes the deepest run fit [`SAFETY_FRACTION`] of `free`: a plan first measures fewer depths
/// (down to 2), then a shorter sequence (the longest that fits, said in a note); the toy model is
/// refused. Returns the candle estimate of each depth.
fn size_to_fit(
    opts: &mut ProbeOptions,
    free: u64,
    device: &str,
    notes: &mut Vec<String>,
) -> Result<Vec<CandleEstimate>, ProbeError> {
    let budget = SAFETY_FRACTION * free as f64;
    let peak = |cfg: &ModelConfig| estimate_step(cfg).map(|e| e.peak_bytes);
    let fits = |cfg: &ModelConfig| peak(cfg).map(|p| p as f64 <= budget);
    let top = opts.layer_runs[0];
    if !fits(&opts.at_depth(top))? {
        let refuse = |estimated: u128, advice: &str| ProbeError::TooLarge {
            estimated: u64::try_from(estimated).unwrap_or(u64::MAX),
            free,
            device: device.to_string(),
            advice: advice.to_string(),
        };
        if opts.plan.is_none() {
            return Err(refuse(
                peak(&opts.at_depth(top))?,
                "lower --batch, --seq, --hidden, --layers, --intermediate or --vocab",
            ));
        }
        // Fewer depths first (two are what the terms need), then a shorter sequence.
        let mut k = top;
        while k > 2 && !fits(&opts.at_depth(k))? {
            k -= 1;
        }
        if k < top {
            notes.push(format!(
                "measured at {k} and fewer layers: {top} layers would exceed {:.0}% of the free memory",
                SAFETY_FRACTION * 100.0
            ));
            opts.layer_runs.retain(|&d| d <= k);
            if opts.layer_runs.first() != Some(&k) {
                opts.layer_runs.insert(0, k);
            }
            opts.model.layers = k;
        }
        if !fits(&opts.model)? {
            let plan_seq = opts.model.seq;
            let at_seq = |s: usize| ModelConfig {
                seq: s,
                ..opts.model.clone()
            };
            if !fits(&at_seq(1))? {
                return Err(refuse(
                    peak(&at_seq(1))?,
                    "even one token does not fit (the embedding, lm_head and their gradients alone); use a device with more free memory",
                ));
            }
            let (mut lo, mut hi) = (1usize, plan_seq);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if fits(&at_seq(mid))? {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            notes.push(format!(
                "--seq {plan_seq} shortened to {lo} for the measured runs: at {plan_seq} tokens the {}-layer candle step ({:.2} GiB by the candle model) exceeds {:.0}% of the {:.2} GiB free; the whole-plan candle figure is the model's at {plan_seq} tokens",
                opts.model.layers,
                peak(&opts.model)? as f64 / crate::units::GIB as f64,
                SAFETY_FRACTION * 100.0,
                free as f64 / crate::units::GIB as f64
            ));
            opts.model.seq = lo;
        }
    }
    opts.layer_runs
        .iter()
        .map(|&k| estimate_step(&opts.at_depth(k)).map_err(ProbeError::from))
        .collect()
}

/// GPU 0 from NVML when there is one (the plan is for a GPU), else this machine's RAM.
fn verdict_memory(inv: &Result<Inventory, String>, cpu: &DeviceSummary) -> (u64, String) {
    match inv.as_ref().ok().and_then(|i| i.gpus.first()) {
        Some(g) => (g.free_bytes, format!("GPU {} ({})", g.index, g.name)),
        None => (
            cpu.free_bytes,
            "this machine's available RAM (no NVIDIA GPU found)".into(),
        ),
    }
}

fn plan_check(
    req: &PlanRequest,
    opts: &ProbeOptions,
    per_layer: Option<Term>,
    fixed: Option<Term>,
    free: u64,
    free_of: &str,
) -> Result<PlanCheck, ProbeError> {
    let job = &req.job;
    let est = crate::estimate::estimate(job)?;
    let have = plan::usable(free, req.margin_pct);
    let fits_now = plan::fits_in(&est, have);
    let suggestion = plan::suggestion(job, have, fits_now)?;
    let device = free_of.split(" (").next().unwrap_or(free_of);
    let (fits, verdict) = plan::verdict(&est, device, free, req.margin_pct, suggestion.as_deref());
    let full = ModelConfig {
        layers: usize::try_from(job.model.layers).unwrap_or(usize::MAX),
        seq: usize::try_from(job.seq).unwrap_or(usize::MAX),
        ..opts.model.clone()
    };
    let candle_modelled_bytes = estimate_step(&full).ok().map(|e| e.peak_bytes as u64);
    Ok(PlanCheck {
        model: job.model.name.clone(),
        method: job.method,
        layers: job.model.layers,
        batch: job.batch,
        seq: job.seq,
        peak_allocated_bytes: est.peak_allocated_bytes.0 as u64,
        device_bytes: est.device_bytes.0 as u64,
        fits,
        verdict,
        suggestion,
        candle_modelled_bytes,
        candle_extrapolated_bytes: per_layer
            .zip(fixed)
            .map(|(p, f)| plan::extrapolate(p.measured_bytes, f.measured_bytes, job.model.layers)),
        candle_modelled_extrapolated_bytes: per_layer
            .zip(fixed)
            .map(|(p, f)| plan::extrapolate(p.modelled_bytes, f.modelled_bytes, job.model.layers)),
        candle_fits: candle_modelled_bytes.map(|c| c <= have),
    })
}

/// Runs the probe: inventory, estimate, safety check, the measured steps at each depth, the
/// comparison, and (with a plan) the verdict.
pub fn probe(opts: &ProbeOptions) -> Result<ProbeReport, ProbeError> {
    let started = Instant::now();
    check_options(opts)?;
    let mut opts = opts.clone();
    let mut notes = match &opts.plan {
        Some(p) => plan::differences(&p.job),
        None => Vec::new(),
    };
    let inv = nvml::inventory();
    let cpu = cpu_summary();

    // The step's device and what is free on it now (before any context or tensor of ours).
    let step_free = match opts.backend {
        Backend::Cpu => {
            if !alloc::is_installed() {
                return Err(ProbeError::NoAllocator);
            }
            (cpu.free_bytes, cpu.name.clone())
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
            (gpu.free_bytes, gpu.name.clone())
        }
    };
    let estimates = size_to_fit(&mut opts, step_free.0, &step_free.1, &mut notes)?;
    let opts = opts;
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
        Backend::Cpu => (
            {
                alloc::keep_freed_memory();
                Device::Cpu
            },
            cpu.clone(),
            Box::new(CpuMeter {
                baseline: alloc::current(),
            }),
            "counting global allocator: peak live heap bytes during the step, minus the bytes alive before the model was built".into(),
            None,
        ),
        Backend::Cuda => {
            let inv = inv.as_ref().map_err(|e| ProbeError::Measure(e.clone()))?;
            let gpu = inv
                .gpus
                .first()
                .ok_or_else(|| ProbeError::Measure("NVML lists no GPU; use --device cpu".into()))?;
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
            let context = after.saturating_sub(used_before);
            // The context came out of the free memory: check the step against what is left.
            let free_now = gpu.free_bytes.saturating_sub(context);
            let top = estimates[0].peak_bytes;
            if top as f64 > SAFETY_FRACTION * free_now as f64 {
                return Err(ProbeError::TooLarge {
                    estimated: top as u64,
                    free: free_now,
                    device: format!("{} after creating the CUDA context", gpu.name),
                    advice: "lower --batch or --seq, or free memory on the GPU".into(),
                });
            }
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
                cuda_context_bytes: Some(context),
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
    let mut depth = opts.layer_runs[0];
    let step_error = |depth: usize, message: String| {
        if is_out_of_memory(&message) {
            let estimated = opts
                .layer_runs
                .iter()
                .position(|&k| k == depth)
                .map_or(0, |i| estimates[i].peak_bytes as u64);
            ProbeError::OutOfMemory {
                device: name.clone(),
                layers: depth,
                estimated,
                free: summary.free_bytes,
                message,
            }
        } else {
            ProbeError::Step {
                device: name.clone(),
                message,
            }
        }
    };
    let measured = match catch_unwind(AssertUnwindSafe(|| {
        measure_runs(&device, &opts, meter.as_mut(), &mut depth)
    })) {
        Ok(Ok(Ok(m))) => m,
        Ok(Ok(Err(e))) => return Err(e),
        Ok(Err(e)) => return Err(step_error(depth, e.to_string())),
        Err(p) => {
            let message = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            return Err(step_error(depth, message));
        }
    };

    let runs: Vec<RunReport> = measured
        .runs
        .iter()
        .zip(&estimates)
        .map(|(t, e)| run_report(t, e))
        .collect();
    let terms = depth_terms(&runs);
    let peak_terms = terms.iter().find(|t| t.quantity == "peak");
    let (per_layer, fixed) = (peak_terms.map(|t| t.per_layer), peak_terms.map(|t| t.fixed));
    let (free_bytes, free_of) = verdict_memory(&inv, &cpu);
    let plan = match &opts.plan {
        Some(req) => Some(plan_check(
            req, &opts, per_layer, fixed, free_bytes, &free_of,
        )?),
        None => None,
    };
    let top = &runs[0];
    let est = estimates[0].clone();
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
        free_bytes,
        free_of,
        losses: top.losses.clone(),
        measured_peak_bytes: top.measured_peak_bytes,
        estimated_peak_bytes: top.estimated_peak_bytes,
        error_pct: top.error_pct,
        runtime_bytes: measured.runs[0].runtime,
        step_peak_bytes: top.step_peak_bytes.clone(),
        measured_phase_peak_bytes: top.measured_phase_peak_bytes.clone(),
        measured_resident_bytes: top.measured_resident_bytes,
        estimated_resident_bytes: top.estimated_resident_bytes,
        estimate: est,
        pytorch_estimated_peak_bytes: pytorch,
        per_layer,
        fixed,
        terms,
        plan,
        notes,
        build_seconds: measured.build_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
        measurement,
        calibration,
        config: opts,
        runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_options(seq: u128) -> ProbeOptions {
        let (shape, _) = crate::model::resolve_model("llama-3.2-1b").unwrap();
        let mut job = Job::new(shape, Method::Qlora);
        job.seq = seq;
        ProbeOptions {
            model: plan::probe_config(&job, 3, 16.0, 1).unwrap(),
            steps: 2,
            lr: 5e-3,
            backend: Backend::Cpu,
            layer_runs: vec![3, 2, 1],
            plan: Some(PlanRequest {
                job,
                margin_pct: plan::DEFAULT_MARGIN_PCT,
            }),
        }
    }

    #[test]
    fn a_plan_that_does_not_fit_measures_fewer_depths_then_a_shorter_sequence() {
        let peak = |o: &ProbeOptions, k: usize| estimate_step(&o.at_depth(k)).unwrap().peak_bytes;
        let o = plan_options(128);
        // Free memory between the 2- and 3-layer needs (÷ 0.8): 3 layers do not fit, 2 do.
        let free = ((peak(&o, 2) + peak(&o, 3)) as f64 / 2.0 / SAFETY_FRACTION) as u64;
        let mut fewer = o.clone();
        let mut notes = Vec::new();
        let est = size_to_fit(&mut fewer, free, "test", &mut notes).unwrap();
        assert_eq!(fewer.layer_runs, [2, 1]);
        assert_eq!((fewer.model.layers, fewer.model.seq), (2, 128));
        assert_eq!(est.len(), 2);
        assert!(notes[0].contains("measured at 2"), "{notes:?}");
        // Less than the 2-layer need at 128 tokens: the sequence is shortened, and said so; the
        // longest that fits (the next token would not).
        let free = (peak(&o, 2) as f64 * 0.9 / SAFETY_FRACTION) as u64;
        let mut shorter = o.clone();
        let mut notes = Vec::new();
        size_to_fit(&mut shorter, free, "test", &mut notes).unwrap();
        let s = shorter.model.seq;
        assert!(s < 128, "{s}");
        let fits = |seq: usize| {
            let c = ModelConfig {
                seq,
                ..shorter.model.clone()
            };
            estimate_step(&c).unwrap().peak_bytes as f64 <= SAFETY_FRACTION * free as f64
        };
        assert!(fits(s) && !fits(s + 1));
        assert!(
            notes.iter().any(|n| n.contains("--seq 128 shortened to")),
            "{notes:?}"
        );
        // The toy model is refused with the numbers instead.
        let mut toy = o.clone();
        toy.plan = None;
        let e = size_to_fit(&mut toy, free, "test", &mut Vec::new()).unwrap_err();
        assert!(e.to_string().starts_with("refusing to run"), "{e}");
    }

    #[test]
    fn allocation_failures_are_recognised() {
        assert!(is_out_of_memory(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        ));
        assert!(is_out_of_memory("cublas error CUBLAS_STATUS_ALLOC_FAILED"));
        assert!(!is_out_of_memory("shape mismatch in matmul"));
    }

    #[test]
    fn depth_terms_separate_per_layer_and_fixed() {
        let run = |layers, measured, estimated| RunReport {
            layers,
            losses: vec![],
            measured_peak_bytes: measured,
            estimated_peak_bytes: estimated,
            error_pct: 0.0,
            measured_phase_peak_bytes: PHASES.iter().map(|p| (*p, measured)).collect(),
            estimated_phase_peak_bytes: PHASES.iter().map(|p| (*p, estimated)).collect(),
            measured_resident_bytes: measured / 2,
            estimated_resident_bytes: estimated / 2,
            step_peak_bytes: vec![],
            seconds: 0.0,
        };
        // Measured 1000 + 300·k, modelled 1000 + 297·k.
        let t = depth_terms(&[run(2, 1600, 1594), run(1, 1300, 1297)]);
        let peak = t.iter().find(|t| t.quantity == "peak").unwrap();
        assert_eq!(
            (peak.per_layer.measured_bytes, peak.per_layer.modelled_bytes),
            (300, 297)
        );
        assert_eq!(
            (peak.fixed.measured_bytes, peak.fixed.modelled_bytes),
            (1000, 1000)
        );
        assert!((peak.per_layer.error_pct + 1.0).abs() < 1e-9);
        assert_eq!(t.len(), 5);
        assert!(depth_terms(&[run(1, 1300, 1297)]).is_empty());
    }
}
