//! The estimator: a [`Job`] in, an [`Estimate`] out.
//!
//! One steady-state training step (the second: optimizer state already exists) is replayed on a
//! [`Timeline`] in the order PyTorch runs it:
//!
//! ```text
//! resident (weights, constants, adapters, optimizer state, cuBLAS workspace)
//!  ─► forward: layer 1..L saves activations (or only its input, with checkpointing)
//!  ─► final norm, lm_head, logits, fp32 upcast, log-softmax (the logits spike)
//!  ─► backward: loss gradients; lm_head; layer L..1 (recompute if checkpointed; free saved
//!     tensors; create parameter gradients); embedding
//!  ─► optimizer step (temporaries) ─► zero_grad
//! ```
//!
//! The peak of that walk is `peak_allocated_bytes` (comparable to
//! `torch.cuda.max_memory_allocated`); the breakdown is what was alive at that moment.

pub mod activations;
mod attention;
mod backward;
mod inference;
mod liger;
mod linear;
pub mod logits;
pub mod resident;
pub mod runtime;
pub mod sharding;
mod step;
pub mod timeline;

use serde::Serialize;

use crate::error::Error;
use crate::method::{Job, Method};
use crate::units::Bytes;

use activations::{inventory, Dtypes, Fwd, LayerInventory, Saved};
use resident::{resident, Resident};
use runtime::{pytorch_cuda, RuntimeProfile};
use sharding::{per_gpu, PerGpu};
pub(crate) use step::mask_bytes;
use step::{train_step, StepExplain};
pub use timeline::{Buf, Category, Event, Phase, Timeline};

/// The model as the estimate saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSummary {
    pub name: String,
    pub params_total: u128,
    pub params_trainable: u128,
}

/// One line of the breakdown: bytes of a component alive at the peak.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Component {
    pub name: &'static str,
    pub bytes: Bytes,
    /// The formula with numbers substituted, and its source.
    pub explain: String,
    /// Whether the component is inside PyTorch's allocator (`max_memory_allocated`).
    pub allocated: bool,
    /// How far the number can be trusted: "exact", or the expected error of an approximation.
    pub accuracy: &'static str,
}

/// The highest live total of a phase of the step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhasePeak {
    pub phase: &'static str,
    pub bytes: Bytes,
}

/// The result of [`estimate`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    pub model: ModelSummary,
    pub method: Method,
    pub tokens: u128,
    pub components: Vec<Component>,
    /// Peak of allocated bytes over a steady-state step (`torch.cuda.max_memory_allocated`).
    pub peak_allocated_bytes: Bytes,
    /// Peak reserved by the caching allocator (`torch.cuda.max_memory_reserved`).
    pub peak_reserved_bytes: Bytes,
    /// Reserved + CUDA context + paged optimizer state (comparable to NVML used memory).
    pub device_bytes: Bytes,
    /// Optimizer state in CUDA managed memory (paged optimizers); in `device_bytes`, not in
    /// `peak_allocated_bytes`.
    pub paged_optimizer_bytes: Bytes,
    pub peak_phase: &'static str,
    pub phases: Vec<PhasePeak>,
    pub runtime: RuntimeProfile,
    /// The step's tensor events as the caching allocator replays them (for the out-of-memory
    /// line at a given capacity).
    #[serde(skip)]
    pub alloc_events: Vec<crate::alloc::Event>,
    #[serde(skip)]
    pub job_alloc_conf: crate::alloc::AllocConf,
    /// CPU RAM per node for offloaded state (DeepSpeed offload / FSDP CPUOffload); 0 without.
    pub cpu_offload_bytes: Bytes,
    /// Host RAM per GPU for offloaded activations (`--activation-offload`); 0 without.
    pub host_bytes: Bytes,
    /// The data-parallel layout, when the job is sharded; all byte figures above are per GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sharding: Option<ShardingSummary>,
}

/// How a sharded estimate was computed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardingSummary {
    pub engine: String,
    pub gpus: u128,
    pub nodes: u128,
    /// Ranks each sharded state is split over.
    pub shard_group: u128,
    pub offload: String,
    pub cpu_offload_per_gpu_bytes: Bytes,
    pub explain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
}

impl Estimate {
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }
}

/// Estimates peak GPU memory of one step of `job` with PyTorch's measured overheads.
pub fn estimate(job: &Job) -> Result<Estimate, Error> {
    estimate_with(job, &pytorch_cuda())
}

/// [`estimate`] with another runtime profile (e.g. calibrated by `memplan probe`).
pub fn estimate_with(job: &Job, profile: &RuntimeProfile) -> Result<Estimate, Error> {
    job.validate()?;
    let profile = profile.clone();
    let res = resident(job);
    // Per-GPU state: the single-GPU values unless the job is sharded (sharding.rs).
    let sh = per_gpu(job, &res);
    let mut t = Timeline::new();
    // Before the step: cuBLAS's workspaces of the forward and autograd threads (half each) and a
    // 1 KiB runtime buffer (the measured base_alloc: 67,109,888 B).
    let ws = profile.workspace_bytes;
    let _base = [
        t.tensor(Category::Workspace, ws / 2),
        t.tensor(Category::Workspace, ws - ws / 2),
        t.tensor(Category::Workspace, RUNTIME_BUFFER_BYTES),
    ];
    // Load: each parameter in module order (a tied lm_head is built, then dropped by
    // `tie_weights`), then the adapters; the cache emptied; the token ids.
    // Sharded: each tensor is this rank's share of it (the per-GPU totals of sharding.rs).
    let sharded = job.sharding.is_some();
    let share = |cat: Category| -> (u128, u128) {
        let (mine, all) = match cat {
            Category::Weights => (sh.weights, res.weights),
            Category::QuantConstants => (sh.quant_constants, res.quant_constants),
            Category::Adapters => (sh.adapters, res.adapters),
            _ => (1, 1),
        };
        (mine, all.max(1))
    };
    // One GPU without sharding or a one-way shard: the same load.
    let nf4_build = job.weights == crate::dtype::Precision::Nf4
        && sh.weights == res.weights
        && sh.quant_constants == res.quant_constants;
    if nf4_build {
        nf4_load(job, &res, &mut t);
    } else {
        for &(cat, bytes) in &res.load_tensors {
            let (mine, all) = share(cat);
            let _ = t.tensor(cat, bytes * mine / all);
        }
    }
    if job.model.tie_embeddings && !nf4_build {
        let (mine, all) = share(Category::Weights);
        t.transient(
            Category::Weights,
            job.model.param_counts().embedding * resident::dense_param_bytes(job) * mine / all,
        );
    }
    t.empty_cache();
    let _ids = t.tensor(Category::Activations, 8 * job.tokens());
    let explain_extra = if job.method == Method::Inference {
        inference::walk(job, &mut t)
    } else {
        // Two steps, as measured: the first creates the optimizer state in its step, the second
        // runs with it from the start (the steady state).
        let scale = |list: &[u128], mine: u128, all: u128| -> Vec<u128> {
            list.iter().map(|&b| b * mine / all.max(1)).collect()
        };
        let (state, temps) = if sharded {
            (
                scale(&res.state_tensors, sh.optimizer_state, res.optimizer_state),
                scale(
                    &res.step_temp_tensors,
                    sh.optimizer_step_temp,
                    res.optimizer_step_temp,
                ),
            )
        } else {
            (res.state_tensors.clone(), res.step_temp_tensors.clone())
        };
        let mut explain = StepExplain::default();
        for step in 1..=2 {
            explain = train_step(job, &sh, &mut t, step, &state, &temps);
        }
        explain
    };
    Ok(finish(job, &res, &sh, &t, profile, explain_extra))
}

/// Loading a 4-bit model as transformers' `from_pretrained` with a `BitsAndBytesConfig` does
/// (transformers 5.17 `quantizers/quantizer_bnb_4bit.py`, bitsandbytes 0.50.2 `Params4bit`):
/// parameters in module order; each quantized `nn.Linear` weight arrives on the device in 16
/// bits and is quantized there (`functional.quantize_4bit`): the fp32 absmax (one per
/// 64-block) and the packed weight, the 16-entry code (`get_4bit_type`, with two small
/// temporaries); with double quantization the absmax offset, `absmax - offset` (temporary),
/// `quantize_blockwise` (the nested state's absmax, the uint8 absmax, a copy of the dynamic
/// map), the fp32 absmax freed; then the 16-bit weight is freed. The small NF4 tensors land in
/// blocks freed 16-bit weights left, which keeps those segments reserved through
/// `empty_cache`. A tied lm_head is built, then dropped. Then the adapters.
fn nf4_load(job: &Job, res: &Resident, t: &mut Timeline) {
    // `prepare_model_for_kbit_training` casts the 16-bit parameters to fp32 after loading.
    let dense = if job.kbit_prep {
        job.compute.float_bytes()
    } else {
        resident::dense_param_bytes(job)
    };
    let order = job.model.recipe.build_order();
    let mut dense_bufs: Vec<Buf> = Vec::new();
    // `--quantize-after-load`: the whole model in 16 bits first (a tied lm_head built, then
    // dropped), quantized afterwards in module order.
    let mut built: Vec<Buf> = Vec::new();
    if job.quantize_after_load {
        for p in &order {
            let n = p.rows * p.cols;
            if resident::quantized(job, p) {
                for _ in 0..p.copies {
                    built.push(t.tensor(Category::Temporaries, n * dense));
                }
            } else {
                dense_bufs.push(t.tensor(Category::Weights, p.numel() * dense));
            }
        }
        tie(job, t, dense);
    }
    let mut built = built.into_iter();
    for p in &order {
        let n = p.rows * p.cols;
        if !resident::quantized(job, p) {
            if !job.quantize_after_load {
                dense_bufs.push(t.tensor(Category::Weights, p.numel() * dense));
            }
            continue;
        }
        let (data, consts) = job.weights.storage_bytes(1, n, job.double_quant);
        let blocks = n.div_ceil(crate::dtype::NF4_BLOCK);
        for _ in 0..p.copies {
            let w = match built.next() {
                Some(w) => w,
                None => t.tensor(Category::Temporaries, n * dense),
            };
            let absmax = t.tensor(Category::QuantConstants, 4 * blocks);
            let _packed = t.tensor(Category::Weights, data);
            let _code = t.tensor(Category::QuantConstants, 64);
            let abs = t.tensor(Category::Temporaries, 64);
            t.transient(Category::Temporaries, 4);
            t.release(abs);
            if job.double_quant {
                let _offset = t.tensor(Category::QuantConstants, 4);
                let centred = t.tensor(Category::Temporaries, 4 * blocks);
                let nested = consts.saturating_sub(blocks + 4 + 1024 + 64);
                let _state2 = t.tensor(Category::QuantConstants, nested);
                let _qabsmax = t.tensor(Category::QuantConstants, blocks);
                let _map = t.tensor(Category::QuantConstants, 1024);
                t.release(centred);
                t.release(absmax);
            } else {
                debug_assert_eq!(consts, 4 * blocks + 64);
            }
            t.release(w);
        }
    }
    if !job.quantize_after_load {
        tie(job, t, dense);
    }
    if job.kbit_prep {
        // peft 0.21 `prepare_model_for_kbit_training`: each 16-bit parameter, in
        // `parameters()` order, replaced by its fp32 copy (`param.data = param.data.to(fp32)`),
        // then `torch.cuda.empty_cache()`.
        for b in dense_bufs {
            let _ = t.tensor(Category::Weights, b.bytes / dense * 4);
            t.release(b);
        }
        t.empty_cache();
    }
    for &(cat, bytes) in &res.load_tensors {
        if cat == Category::Adapters {
            let _ = t.tensor(cat, bytes);
        }
    }
}

/// `tie_weights`: a tied lm_head is built, then dropped.
fn tie(job: &Job, t: &mut Timeline, dense: u128) {
    if job.model.tie_embeddings {
        t.transient(
            Category::Weights,
            job.model.param_counts().embedding * dense,
        );
    }
}

/// The out-of-memory line: the step replayed through the caching allocator with `capacity`
/// bytes to reserve (the card less the CUDA context and managed optimizer state). A request
/// that finds no cached block and cannot get a new segment even after the cache is freed is
/// PyTorch's out-of-memory error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OomCheck {
    pub fits: bool,
    /// The smallest `capacity − reserved` over the step: the margin at the tightest moment.
    pub min_headroom_bytes: Bytes,
    /// The allocation that failed, when it does not fit.
    pub failed_request_bytes: Option<Bytes>,
}

/// Replays `est`'s step at a device of `device_bytes` (see [`OomCheck`]).
pub fn oom_check(est: &Estimate, device_bytes: u128) -> OomCheck {
    let outside = est.runtime.cuda_context_bytes + est.paged_optimizer_bytes.0;
    let capacity = device_bytes.saturating_sub(outside);
    let cap = u64::try_from(capacity).unwrap_or(u64::MAX);
    match crate::alloc::simulate(&est.alloc_events, &est.job_alloc_conf, Some(cap)) {
        Ok(r) => OomCheck {
            fits: r.oom.is_none() && device_bytes >= outside,
            min_headroom_bytes: Bytes(u128::from(r.min_headroom.unwrap_or(0))),
            failed_request_bytes: r.oom.map(|o| Bytes(u128::from(o.request_bytes))),
        },
        // A stream the replay refuses (a request over 2^56 B) fits no device.
        Err(_) => OomCheck {
            fits: false,
            min_headroom_bytes: Bytes(0),
            failed_request_bytes: None,
        },
    }
}

/// The measured error of the allocator replay (book: Allocator).
/// The `allocator_reserve` accuracy note: one figure for every output (`crate::accuracy`).
pub const ACCURACY_RESERVED: &str = crate::accuracy::RESERVED_ACCURACY;
const ACCURACY_ALLOCATOR: &str = "exact rule of the caching allocator (block sizes)";

/// The timeline's events as the allocator replay takes them; phases named as the groundtruth
/// script names them (`fwd1`, `bwd1`, `opt1`, `fwd2`, …).
fn allocator_events(events: &[Event]) -> Vec<crate::alloc::Event> {
    use crate::alloc::Event as A;
    const NAMES: [[&str; 3]; 2] = [["fwd1", "bwd1", "opt1"], ["fwd2", "bwd2", "opt2"]];
    let mut step = 0usize;
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        out.push(match *e {
            Event::Alloc { id, bytes, .. } => A::Alloc {
                id: id as u64,
                bytes: u64::try_from(bytes).unwrap_or(u64::MAX),
            },
            Event::Free { id } => A::Free { id: id as u64 },
            Event::EmptyCache => A::EmptyCache,
            Event::Phase(p) => {
                if p == Phase::Forward {
                    step += 1;
                }
                let k = step.clamp(1, 2) - 1;
                A::Phase(match p {
                    Phase::Load => "load",
                    Phase::Forward => NAMES[k][0],
                    Phase::Backward => NAMES[k][1],
                    Phase::Optimizer => NAMES[k][2],
                })
            }
        });
    }
    out
}

/// Bytes allocated before the step besides the cuBLAS workspaces (measured: base_alloc −
/// 64 MiB = 1,024 B on the H200).
const RUNTIME_BUFFER_BYTES: u128 = 1024;

/// The expected error of each component, from the validation in the book.
fn accuracy(job: &Job, c: Category) -> &'static str {
    match c {
        Category::Weights
        | Category::QuantConstants
        | Category::Adapters
        | Category::Gradients
        | Category::Logits => "exact (bytes equal the measured tensors)",
        Category::OptimizerState => match job.optimizer {
            crate::method::Optimizer::Adafactor => "approximate: Adafactor's factored state, ±5%",
            _ => "exact",
        },
        Category::Activations if job.model.moe.is_some() => {
            "approximate: MoE routing modelled as k experts per token; unvalidated, expect ±15%"
        }
        Category::Activations if job.weights == crate::dtype::Precision::Int8 => {
            "approximate: what bitsandbytes' LLM.int8 matmul saves is not measured; expect ±10%"
        }
        Category::Activations if job.method == Method::Inference => {
            "approximate: one layer's working set; expect ±10%"
        }
        Category::Activations => "within 0.5% per token per layer on the measured Llama shapes",
        Category::KvCache => "exact",
        Category::Temporaries => {
            "per-op forward intermediates and backward buffers in the order autograd creates them (Llama-family ops scripted, others one buffer per op); the step's peak within 1.2% on the H200 measurements"
        }
        Category::Workspace => "measured constant (Hopper); smaller on older GPUs",
        // FSDP-HOOK: FSDP2's buffers are held to traces (tests/fsdp_reference.rs).
        Category::GatheredParams | Category::CommBuckets
            if job
                .sharding
                .as_ref()
                .is_some_and(|s| matches!(s.engine, sharding::Engine::Fsdp(_)) && s.fsdp_version == 2) =>
        {
            "FSDP2: the step peak within 0.5% of traced fully_shard steps (bf16 and fp32 + bf16 mixed precision)"
        }
        Category::GatheredParams | Category::CommBuckets => {
            "approximate: follows DeepSpeed/FSDP's documented buffers; not measured (multi-GPU)"
        }
    }
}

fn finish(
    job: &Job,
    res: &Resident,
    sh: &PerGpu,
    t: &Timeline,
    profile: RuntimeProfile,
    step: StepExplain,
) -> Estimate {
    let counts = job.model.param_counts();
    let explain_for = |c: Category| -> String {
        match c {
            Category::Weights => res.explain.weights.clone(),
            Category::QuantConstants => res.explain.quant_constants.clone(),
            Category::Adapters => res.explain.adapters.clone(),
            Category::Gradients => res.explain.gradients.clone(),
            Category::OptimizerState => res.explain.optimizer.clone(),
            Category::Activations => step.activations.clone(),
            Category::KvCache => step.kv_cache.clone(),
            Category::Logits => step.logits.clone(),
            Category::Temporaries => step.temporaries.clone(),
            Category::Workspace => format!(
                "cuBLAS workspaces of the forward and autograd threads ({} B measured, groundtruth base_alloc)",
                profile.workspace_bytes
            ),
            Category::GatheredParams | Category::CommBuckets => sh.explain.clone(),
        }
    };
    // Under sharding the resident components are per-GPU shards: say how they were divided.
    let explain_for = |c: Category| -> String {
        let base = explain_for(c);
        match c {
            Category::Weights
            | Category::QuantConstants
            | Category::Adapters
            | Category::Gradients
            | Category::OptimizerState
                if job.sharding.is_some() =>
            {
                format!("{base}; per GPU: {}", sh.explain)
            }
            _ => base,
        }
    };
    let mut components: Vec<Component> = t
        .at_peak()
        .filter(|(c, b)| *b > 0 || matches!(c, Category::Weights))
        .map(|(c, b)| Component {
            name: c.name(),
            bytes: Bytes(b),
            explain: explain_for(c),
            allocated: true,
            accuracy: accuracy(job, c),
        })
        .collect();
    let requested_peak = t.peak();
    // The caching allocator replayed over the step's tensor events (`crate::alloc`): what
    // `max_memory_allocated` (whole blocks) and `max_memory_reserved` report.
    let alloc_events = allocator_events(t.events());
    let sim = crate::alloc::simulate(&alloc_events, &job.alloc_conf, None)
        .ok()
        .and_then(|r| r.groundtruth_peaks());
    let (peak, peak_reserved) = match sim {
        Some((a, r)) => (
            u128::from(a).max(requested_peak),
            u128::from(r).max(u128::from(a)),
        ),
        // Beyond what the replay accepts (a request over 2^56 B): requests as they are.
        None => (requested_peak, requested_peak),
    };
    if peak > requested_peak {
        components.push(Component {
            name: "block_rounding",
            bytes: Bytes(peak - requested_peak),
            explain: format!(
                "the caching allocator rounds each request up to 512 B and hands out a whole cached block when splitting it would leave at most 1 MiB (CUDACachingAllocator.cpp round_size, should_split): {} B allocated at the peak against {requested_peak} B requested",
                peak
            ),
            allocated: true,
            accuracy: ACCURACY_ALLOCATOR,
        });
    }
    components.push(Component {
        name: "allocator_reserve",
        bytes: Bytes(peak_reserved - peak),
        explain: format!(
            "reserved but not allocated at the peak: the segments the caching allocator keeps cached (2 MiB small, 20 MiB or rounded-up large segments, split blocks, expandable segments with --alloc-conf), replayed over the {} tensor events of the step (PyTorch 2.11 CUDACachingAllocator.cpp)",
            alloc_events.len()
        ),
        allocated: false,
        accuracy: crate::accuracy::RESERVED_ACCURACY,
    });
    if sh.optimizer_paged > 0 {
        components.push(Component {
            name: "paged_optimizer_state",
            bytes: Bytes(sh.optimizer_paged),
            explain: res.explain.optimizer.clone(),
            allocated: false,
            accuracy:
                "exact size; resident on the device unless the driver evicts pages to host RAM",
        });
    }
    components.push(Component {
        name: "cuda_context",
        bytes: Bytes(profile.cuda_context_bytes),
        explain: format!(
            "CUDA context, kernels and library handles: {} B measured on H200 / driver 580 (NVML, before and after CUDA init); varies by GPU and driver",
            profile.cuda_context_bytes
        ),
        allocated: false,
        accuracy: "measured on one GPU and driver; typically 0.3–0.9 GiB elsewhere (calibrate with memplan probe)",
    });
    Estimate {
        model: ModelSummary {
            name: job.model.name.clone(),
            params_total: counts.total,
            params_trainable: res.trainable_params,
        },
        method: job.method,
        tokens: job.tokens(),
        components,
        peak_allocated_bytes: Bytes(peak),
        peak_reserved_bytes: Bytes(peak_reserved),
        device_bytes: Bytes(peak_reserved + profile.cuda_context_bytes + sh.optimizer_paged),
        paged_optimizer_bytes: Bytes(sh.optimizer_paged),
        peak_phase: t.peak_phase().name(),
        phases: t
            .phase_peaks()
            .into_iter()
            .map(|(p, b)| PhasePeak {
                phase: p.name(),
                bytes: Bytes(b),
            })
            .collect(),
        runtime: profile,
        alloc_events,
        job_alloc_conf: job.alloc_conf.clone(),
        host_bytes: Bytes(step.host_bytes),
        cpu_offload_bytes: Bytes(
            sh.cpu_offload * job.sharding.as_ref().map_or(1, |s| s.gpus_per_node()),
        ),
        sharding: job.sharding.as_ref().map(|s| ShardingSummary {
            engine: s.engine.to_string(),
            gpus: s.gpus,
            nodes: s.nodes,
            shard_group: s.group(),
            offload: s.offload.to_string(),
            cpu_offload_per_gpu_bytes: Bytes(sh.cpu_offload),
            explain: sh.explain.clone(),
            advice: s.advice(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::resolve_model;
    use crate::units::GIB;

    fn job(model: &str, method: Method) -> Job {
        Job::new(resolve_model(model).unwrap().0, method)
    }

    #[test]
    fn components_sum_to_the_peak() {
        for method in [Method::Full, Method::Lora, Method::Qlora, Method::Inference] {
            let e = estimate(&job("llama-3.2-1b", method)).unwrap();
            let sum: u128 = e
                .components
                .iter()
                .filter(|c| c.allocated)
                .map(|c| c.bytes.0)
                .sum();
            assert_eq!(sum, e.peak_allocated_bytes.0, "{method}");
            assert!(e.peak_reserved_bytes >= e.peak_allocated_bytes);
            assert!(e.device_bytes > e.peak_reserved_bytes);
        }
    }

    #[test]
    fn lora_peak_is_the_loss_backward_spike() {
        // 1B LoRA, b1 s512: resident + saved activations + 12 B per logit (log-softmax + two
        // fp32 gradients), by hand: 512 × 128,256 × 12 = 788,013,056 B of logits at the peak.
        let mut j = job("llama-3.2-1b", Method::Lora);
        j.seq = 512;
        let e = estimate(&j).unwrap();
        assert_eq!(e.peak_phase, "backward");
        assert_eq!(e.component("logits").unwrap().bytes.0, 512 * 128_256 * 12);
    }

    #[test]
    fn full_fine_tuning_short_sequence_peaks_in_the_optimizer() {
        let mut j = job("llama-3.1-8b", Method::Full);
        j.seq = 512;
        let e = estimate(&j).unwrap();
        assert_eq!(e.peak_phase, "optimizer");
        // weights + grads + 2 states + foreach temp = 5 × 2 B/param + 64 MiB workspace + the
        // 1 KiB runtime buffer + 512 int64 token ids, as requested; the allocator's blocks add
        // their rounding on top (under 0.01% here).
        let rounding = e.component("block_rounding").map_or(0, |c| c.bytes.0);
        assert_eq!(
            e.peak_allocated_bytes.0 - rounding,
            10 * 8_030_261_248 + 64 * (1 << 20) + 1024 + 8 * 512
        );
        assert!(rounding * 10_000 < e.peak_allocated_bytes.0);
        j.optimizer = crate::method::Optimizer::AdamwFused;
        assert_eq!(estimate(&j).unwrap().peak_phase, "backward");
    }

    #[test]
    fn checkpointing_cuts_activations() {
        let mut j = job("llama-3.1-8b", Method::Qlora);
        j.batch = 4;
        let off = estimate(&j).unwrap().peak_allocated_bytes;
        j.grad_checkpointing = true;
        let on = estimate(&j).unwrap().peak_allocated_bytes;
        assert!(on.0 * 4 < off.0, "{on} vs {off}");
    }

    #[test]
    fn inference_kv_cache_is_gqa_aware() {
        let mut j = job("llama-3.1-8b", Method::Inference);
        j.seq = 8192;
        let e = estimate(&j).unwrap();
        // 2 × 32 layers × 8 kv heads × 128 × 8192 tokens × 2 B = 1 GiB.
        assert_eq!(e.component("kv_cache").unwrap().bytes.0, GIB);
        assert!(e.component("gradients").is_none());
    }

    #[test]
    fn a_trillion_parameters_at_a_million_tokens_does_not_overflow() {
        let mut j = job("1000B", Method::Full);
        j.seq = 1 << 20;
        j.batch = 64;
        let e = estimate(&j).unwrap();
        // The logits alone: 64 × 2^20 tokens × 128,256 × 12 B ≈ 1.03e17 B at the loss spike.
        assert!(e.peak_allocated_bytes.0 > 64 * (1 << 20) * 128_256 * 12);
        j.attention = crate::method::Attention::Eager;
        assert!(estimate(&j).unwrap().peak_allocated_bytes > e.peak_allocated_bytes);
    }

    #[test]
    fn moe_trains_all_experts_but_activates_k() {
        // transformers 5 holds Mixtral's experts as fused 3-D parameters, which bitsandbytes
        // leaves in bf16: 32 layers × 8 experts × 3 × 4096 × 14336 × 2 B = 84 GiB of experts.
        let mut j = job("mixtral-8x7b", Method::Qlora);
        // peft's ParamWrapper on the fused experts refuses dropout.
        assert!(estimate(&j)
            .unwrap_err()
            .to_string()
            .contains("ParamWrapper"));
        j.lora.as_mut().unwrap().dropout = 0.0;
        let e = estimate(&j).unwrap();
        assert_eq!(e.model.params_total, 46_702_792_704);
        let experts: u128 = 32 * 8 * 3 * 4096 * 14336 * 2;
        assert!(e.component("weights").unwrap().bytes.0 > experts);
        // Quantized one expert at a time (transformers 4.x), they take a quarter of that.
        let mut q = j.clone();
        q.quantize_experts = true;
        let eq = estimate(&q).unwrap();
        let saved =
            e.component("weights").unwrap().bytes.0 - eq.component("weights").unwrap().bytes.0;
        assert_eq!(saved, experts - experts / 4);
        assert!(eq.peak_allocated_bytes < e.peak_allocated_bytes);
        assert!(
            eq.component("quant_constants").unwrap().bytes
                > e.component("quant_constants").unwrap().bytes
        );
    }

    #[test]
    fn first_layer_of_a_frozen_base_saves_less() {
        let j = job("llama-3.2-1b", Method::Lora);
        let k = &j.model.recipe.kinds[0];
        let layer = inventory(&j, k, 10, true);
        let first = inventory(&j, k, 10, false);
        // The first RMSNorm's fp32 input copy and rsqrt, 10 tokens × (4 · 2048 + 4) B, and the
        // dropout masks of q, k and v (1 B per input element: native_dropout's mask is saved
        // only when its input needs a gradient).
        assert_eq!(
            layer.saved() - first.saved(),
            10 * (4 * 2048 + 4) + 3 * 10 * 2048
        );
        let mut mlp_only = j.clone();
        mlp_only.lora.as_mut().unwrap().targets = crate::method::parse_targets("mlp").unwrap();
        let layer = inventory(&mlp_only, k, 10, true);
        let first = inventory(&mlp_only, k, 10, false);
        // Nothing of the attention block needs a gradient, nor the second norm's input.
        let attn_saved: u128 = first
            .ops
            .iter()
            .zip(&first.blocks)
            .filter(|(_, &b)| b == 0)
            .map(|(o, _)| o.saved.len() as u128)
            .sum();
        assert_eq!(attn_saved, 0);
        let mlp = |inv: &LayerInventory| -> u128 {
            let mut only = inv.clone();
            for (o, &b) in only.ops.iter_mut().zip(&inv.blocks) {
                if b == 0 {
                    o.saved.clear();
                }
            }
            only.saved()
        };
        // The second norm's fp32 input copy and rsqrt, and gate's and up's dropout masks.
        assert_eq!(
            mlp(&layer) - mlp(&first),
            10 * (4 * 2048 + 4) + 2 * 10 * 2048
        );
        // Full fine-tuning trains the embedding: nothing changes.
        let full = job("llama-3.2-1b", Method::Full);
        assert_eq!(inventory(&full, k, 10, true), inventory(&full, k, 10, true));
    }

    #[test]
    fn invalid_jobs_are_errors_not_panics() {
        let mut j = job("llama-3.2-1b", Method::Lora);
        j.lora.as_mut().unwrap().rank = 100_000;
        assert!(estimate(&j).is_err());
        let mut j = job("llama-3.2-1b", Method::Full);
        j.seq = 0;
        assert!(estimate(&j).is_err());
    }
}
