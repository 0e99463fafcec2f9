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
mod inference;
pub mod logits;
pub mod resident;
pub mod runtime;
pub mod sharding;
pub mod timeline;

use serde::Serialize;

use crate::error::Error;
use crate::method::{Job, Method};
use crate::units::Bytes;

use activations::{layer_profile, norm_saved_per_token, Dtypes, LayerProfile};
use resident::{resident, Resident};
use runtime::{pytorch_cuda, RuntimeProfile, RESIDENT_ROUNDING};
use sharding::{per_gpu, PerGpu};
pub use timeline::{Category, Phase, Timeline};

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
    /// CPU RAM per node for offloaded state (DeepSpeed offload / FSDP CPUOffload); 0 without.
    pub cpu_offload_bytes: Bytes,
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
    t.alloc(Category::Workspace, profile.workspace_bytes);
    t.alloc(Category::Weights, sh.weights);
    t.alloc(Category::QuantConstants, sh.quant_constants);
    t.alloc(Category::Adapters, sh.adapters);
    let explain_extra = if job.method == Method::Inference {
        inference::walk(job, &mut t)
    } else {
        t.alloc(Category::OptimizerState, sh.optimizer_state);
        train_step(job, &sh, &mut t)
    };
    Ok(finish(job, &res, &sh, &t, profile, explain_extra))
}

/// Formula text for the step-dependent components.
#[derive(Debug, Default)]
struct StepExplain {
    activations: String,
    logits: String,
    temporaries: String,
    kv_cache: String,
    /// The largest single transient buffer (sets the allocator reserve).
    largest_block: u128,
}

fn train_step(job: &Job, sh: &PerGpu, t: &mut Timeline) -> StepExplain {
    let m = &job.model;
    let tokens = job.tokens();
    let dt = Dtypes::of(job);
    let layer = layer_profile(job, tokens);
    let lg = logits::logits(&dt, tokens, m.vocab);
    let full = job.method == Method::Full;
    let counts = m.param_counts();
    let param_bytes = resident::dense_param_bytes(job);

    // Final norm + lm_head input (saved when lm_head trains; a 16-bit copy under autocast).
    let lm_head_input = if full {
        if dt.autocast {
            dt.compute * m.hidden
        } else {
            dt.residual * m.hidden
        }
    } else {
        0
    };
    let head_saved = tokens * (norm_saved_per_token(job, &dt, m.hidden) + lm_head_input)
        + if full && dt.autocast {
            m.vocab * m.hidden * dt.compute
        } else {
            0
        };

    // Eager attention builds one 4-D causal mask (b·1·s·s in the compute dtype) per forward;
    // checkpointing passes it to every layer's recompute, so it then lives through backward.
    let mask = if job.attention == crate::method::Attention::Eager {
        job.batch * job.seq * job.seq * dt.compute
    } else {
        0
    };

    // A layer's parameter gradient: kept whole on one GPU; with sharding, reduced to this rank's
    // shard (FSDP: the unit's full gradient exists until its reduce-scatter).
    let grad = |t: &mut Timeline, bytes: u128| {
        let spike = sh.unsharded_grad_spike;
        if spike {
            t.alloc(Category::Temporaries, bytes);
        }
        t.alloc(Category::Gradients, sh.kept_grad(bytes));
        if spike {
            t.free(Category::Temporaries, bytes);
        }
    };

    // ---------------- forward
    t.phase(Phase::Forward);
    if sh.gathered > 0 {
        t.alloc(Category::GatheredParams, sh.gathered);
    }
    t.alloc(Category::Temporaries, mask);
    let kept_per_layer = if job.grad_checkpointing {
        layer.input
    } else {
        layer.saved()
    };
    // The first layer saves less when the embedding output needs no gradient (frozen base).
    let first = first_layer(job, &layer, tokens);
    for l in 0..m.layers {
        t.spike(Category::Temporaries, layer.fwd_transient);
        let kept = if l == 0 && !job.grad_checkpointing {
            first.saved()
        } else {
            kept_per_layer
        };
        t.alloc(Category::Activations, kept);
    }
    t.alloc(Category::Activations, head_saved);
    t.alloc(Category::Logits, lg.raw);
    t.alloc(Category::Logits, lg.upcast);
    t.alloc(Category::Logits, lg.log_softmax);
    t.free(Category::Logits, lg.raw + lg.upcast);
    if !job.grad_checkpointing {
        t.free(Category::Temporaries, mask);
    }

    // ---------------- backward
    t.phase(Phase::Backward);
    if sh.bucket > 0 {
        t.alloc(Category::CommBuckets, sh.bucket);
    }
    t.alloc(Category::Logits, 2 * lg.grad_fp32);
    t.free(Category::Logits, lg.grad_fp32 + lg.log_softmax);
    t.alloc(Category::Logits, lg.grad_raw);
    t.free(Category::Logits, lg.grad_fp32);
    // lm_head backward: input gradient, and the weight gradient when it trains.
    let hidden_grad = tokens * dt.residual * m.hidden;
    t.alloc(Category::Temporaries, hidden_grad);
    if full {
        grad(t, m.vocab * m.hidden * param_bytes);
    }
    t.free(Category::Logits, lg.grad_raw);
    t.free(Category::Activations, head_saved);
    if full {
        grad(t, m.hidden * param_bytes); // final norm
    }
    for l in (0..m.layers).rev() {
        let this = if l == 0 { &first } else { &layer };
        if job.grad_checkpointing {
            t.spike(Category::Temporaries, this.fwd_transient);
            t.alloc(Category::Activations, this.saved());
        }
        t.spike(Category::Temporaries, this.mlp_bwd_transient);
        t.free(Category::Activations, this.mlp_saved);
        grad(t, this.mlp_grads);
        t.spike(Category::Temporaries, this.attn_bwd_transient);
        t.free(Category::Activations, this.attn_saved);
        grad(t, this.attn_grads);
        if job.grad_checkpointing {
            t.free(Category::Activations, this.input);
        }
    }
    if full {
        let emb = counts.embedding * param_bytes;
        if m.tie_embeddings {
            // The embedding's dense gradient plus the out-of-place sum with lm_head's gradient
            // (measured: +2 × V·h on the 1B and 3B tied models).
            t.spike(Category::Temporaries, 2 * emb);
        } else {
            grad(t, emb);
        }
    }
    t.free(Category::Temporaries, hidden_grad);
    if job.grad_checkpointing {
        t.free(Category::Temporaries, mask);
    }

    if sh.bucket > 0 {
        t.free(Category::CommBuckets, sh.bucket);
    }
    if sh.gathered > 0 {
        t.free(Category::GatheredParams, sh.gathered);
    }

    // ---------------- optimizer
    t.phase(Phase::Optimizer);
    t.spike(Category::Temporaries, sh.optimizer_step_temp);
    t.free(Category::Gradients, t.live(Category::Gradients));

    StepExplain {
        activations: explain_activations(job, &layer, head_saved),
        logits: format!(
            "{tokens} tokens × vocab {} = {} logits: {}-bit logits + fp32 upcast + fp32 log-softmax (saved) in the forward; 2 fp32 gradients beside the saved log-softmax in the backward (transformers ForCausalLMLoss; 12 B/logit at the backward spike)",
            m.vocab,
            tokens * m.vocab,
            dt.logits * 8
        ),
        temporaries: format!(
            "per-layer forward transients {} B, backward gradient buffers {} B (MLP) / {} B (attention){}; optimizer step {} B",
            layer.fwd_transient,
            layer.mlp_bwd_transient,
            layer.attn_bwd_transient,
            if mask > 0 { format!("; eager causal mask {mask} B") } else { String::new() },
            sh.optimizer_step_temp
        ),
        kv_cache: String::new(),
        largest_block: [
            lg.grad_fp32,
            lg.raw,
            tokens * m.intermediate * dt.linear_out,
            if job.attention == crate::method::Attention::Eager {
                job.batch * m.heads * job.seq * job.seq * 4
            } else {
                0
            },
            // Sharded steps: the gradient bucket and FSDP's unsharded gradient of one unit
            // (both 0 on one GPU).
            sh.bucket,
            if sh.unsharded_grad_spike {
                layer.mlp_grads.max(layer.attn_grads)
            } else {
                0
            },
        ]
        .into_iter()
        .max()
        .unwrap_or(0),
    }
}

/// The first decoder layer's profile. With a frozen base (LoRA/QLoRA) the embedding output
/// needs no gradient — unless peft's `enable_input_require_grads` hook is on (`--kbit-prep` with
/// checkpointing) — and an op saves tensors only when one of its inputs needs a gradient: the
/// first RMSNorm saves nothing, and if no attention module carries an adapter, neither does the
/// rest of the attention half nor the second RMSNorm.
fn first_layer(job: &Job, layer: &LayerProfile, tokens: u128) -> LayerProfile {
    let frozen_input = matches!(job.method, Method::Lora | Method::Qlora)
        && !(job.kbit_prep && job.grad_checkpointing);
    if !frozen_input {
        return layer.clone();
    }
    let dt = Dtypes::of(job);
    let norm = tokens * norm_saved_per_token(job, &dt, job.model.hidden);
    let attention_adapted = job.lora.as_ref().is_some_and(|l| {
        l.targets.iter().any(|k| {
            matches!(
                k,
                crate::model::LinearKind::Q
                    | crate::model::LinearKind::K
                    | crate::model::LinearKind::V
                    | crate::model::LinearKind::O
            )
        })
    });
    let mut first = layer.clone();
    if attention_adapted {
        first.attn_saved -= norm;
    } else {
        first.attn_saved = 0;
        first.mlp_saved -= norm;
    }
    first
}

fn explain_activations(job: &Job, layer: &LayerProfile, head_saved: u128) -> String {
    let per_token = layer.attn_saved_per_token + layer.mlp_saved_per_token;
    let base = format!(
        "tensors autograd saves for backward (PyTorch derivatives of the transformers Llama layer, peft LoRA, SDPA/eager): {} B/token/layer ({} attention + {} MLP) × {} tokens × {} layers{} + final norm/lm_head {} B",
        per_token,
        layer.attn_saved_per_token,
        layer.mlp_saved_per_token,
        job.tokens(),
        job.model.layers,
        match job.attention {
            crate::method::Attention::Eager => " (eager: incl. 6 B × heads × seq per token of scores)",
            _ => "",
        },
        head_saved
    );
    if job.grad_checkpointing {
        format!(
            "{base}; with checkpointing only each layer's input ({} B) is kept and one layer is recomputed at a time in backward",
            layer.input
        )
    } else {
        base
    }
}

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
            "approximate: largest module's gradient buffers; ±25% of this component"
        }
        Category::Workspace => "measured constant (Hopper); smaller on older GPUs",
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
    let peak = t.peak();
    let resident_bytes = sh.weights
        + sh.quant_constants
        + sh.adapters
        + sh.optimizer_state
        + profile.workspace_bytes;
    let block = step.largest_block;
    let reserve = block + (resident_bytes as f64 * RESIDENT_ROUNDING).round() as u128;
    components.push(Component {
        name: "allocator_reserve",
        bytes: Bytes(reserve),
        explain: format!(
            "caching-allocator fragmentation and rounding: the largest transient block ({block} B, kept cached once split) + {RESIDENT_ROUNDING} × {resident_bytes} B resident"
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
    let peak_reserved = peak + reserve;
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
        // weights + grads + 2 states + foreach temp = 5 × 2 B/param + 64 MiB workspace.
        assert_eq!(
            e.peak_allocated_bytes.0,
            10 * 8_030_261_248 + 64 * (1 << 20)
        );
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
        let j = job("mixtral-8x7b", Method::Qlora);
        let e = estimate(&j).unwrap();
        assert_eq!(e.model.params_total, 46_702_792_704);
        assert!(e.peak_allocated_bytes.gib() > 20.0 && e.peak_allocated_bytes.gib() < 80.0);
    }

    #[test]
    fn first_layer_of_a_frozen_base_saves_less() {
        let j = job("llama-3.2-1b", Method::Lora);
        let layer = layer_profile(&j, 10);
        let first = first_layer(&j, &layer, 10);
        // The first RMSNorm's fp32 input copy and rsqrt: 10 tokens × (4 · 2048 + 4) B.
        assert_eq!(layer.saved() - first.saved(), 10 * (4 * 2048 + 4));
        let mut mlp_only = j.clone();
        mlp_only.lora.as_mut().unwrap().targets = crate::method::parse_targets("mlp").unwrap();
        let layer = layer_profile(&mlp_only, 10);
        let first = first_layer(&mlp_only, &layer, 10);
        assert_eq!(first.attn_saved, 0);
        assert_eq!(layer.mlp_saved - first.mlp_saved, 10 * (4 * 2048 + 4));
        // Full fine-tuning trains the embedding: nothing changes.
        let full = job("llama-3.2-1b", Method::Full);
        let layer = layer_profile(&full, 10);
        assert_eq!(first_layer(&full, &layer, 10), layer);
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
