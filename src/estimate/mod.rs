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
mod liger;
pub mod logits;
pub mod resident;
pub mod runtime;
pub mod sharding;
pub mod timeline;

use serde::Serialize;

use crate::error::Error;
use crate::method::{Job, Method};
use crate::units::Bytes;

use activations::{inventory, Dtypes, Fwd, LayerInventory, Saved};
use resident::{resident, Resident};
use runtime::{pytorch_cuda, RuntimeProfile};
use sharding::{per_gpu, PerGpu};
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
    for &(cat, bytes) in &res.load_tensors {
        let (mine, all) = share(cat);
        let _ = t.tensor(cat, bytes * mine / all);
    }
    if job.model.tie_embeddings {
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

/// Formula text for the step-dependent components.
#[derive(Debug, Default)]
struct StepExplain {
    activations: String,
    logits: String,
    temporaries: String,
    kv_cache: String,
    /// Host RAM holding offloaded activations (`--activation-offload`).
    host_bytes: u128,
}

fn train_step(
    job: &Job,
    sh: &PerGpu,
    t: &mut Timeline,
    step: u32,
    state: &[u128],
    step_temps: &[u128],
) -> StepExplain {
    // FSDP-HOOK(a): under FSDP mixed precision the step computes on the gathered 16-bit
    // copies: walk the 16-bit job (sharding.rs `walk_job`); resident state stays the job's.
    let walk = sharding::walk_job(job);
    let job: &Job = &walk;
    // FSDP-HOOK(b): FSDP's per-unit buffers (sharding.rs `FsdpWalk`), None otherwise.
    let fsdp = sh.fsdp.as_ref().map(sharding::FsdpWalk::new);
    let m = &job.model;
    let r = &m.recipe;
    let tokens = job.tokens();
    let dt = Dtypes::of(job);
    let lg = logits::logits(&dt, tokens, m.vocab);
    let full = job.method == Method::Full;

    // The layer inventories: one per layer kind, and the first layer's own when its input needs
    // no gradient (a frozen base's embedding output) — an op saves tensors only when one of its
    // inputs needs a gradient or it owns a trained parameter.
    let first_input_grad = !(matches!(job.method, Method::Lora | Method::Qlora)
        && !(job.kbit_prep && job.grad_checkpointing));
    // HOOK(configs, liger kernels): Liger's RMSNorm/SwiGLU save less (liger.rs); identity
    // without --liger-kernels.
    let kinds: Vec<LayerInventory> = r
        .kinds
        .iter()
        .map(|k| liger::apply(job, k, inventory(job, k, tokens, true), tokens))
        .collect();
    let first_kind = r.layer_kind.first().copied().unwrap_or(0);
    let first = liger::apply(
        job,
        &r.kinds[first_kind],
        inventory(job, &r.kinds[first_kind], tokens, first_input_grad),
        tokens,
    );
    let layer_inv = |l: usize| -> &LayerInventory {
        if l == 0 {
            &first
        } else {
            &kinds[r.layer_kind[l]]
        }
    };
    let mut head = head_inventory(job, tokens);
    // HOOK(configs, loss): the loss's buffers come from logits::loss_walk for chunked-nll, liger
    // and cce (`ce` keeps the walk below); those losses run lm_head themselves and save what
    // they need, so lm_head's own saved input goes.
    let fused_loss = job.loss != crate::method::Loss::Ce;
    let lw = logits::loss_walk(
        &dt,
        &logits::LossInput {
            tokens,
            batch: job.batch,
            vocab: m.vocab,
            hidden: m.hidden,
            head_trains: full,
            head_weight_bytes: resident::dense_param_bytes(job),
            supervised_fraction: job.supervised_fraction,
            // The Trainer's bf16/fp16 mixed precision runs the model under autocast.
            autocast: dt.compute < 4,
        },
        job.loss,
    );
    if fused_loss {
        if let Some(op) = head.ops.last_mut() {
            op.saved.clear();
        }
    }
    // The loss walk frees by size: each free releases the latest live loss tensor of that size.
    let mut loss_live: Vec<Buf> = Vec::new();
    let mut loss_events = |t: &mut Timeline, evs: &[logits::LossEvent]| {
        for e in evs {
            match *e {
                logits::LossEvent::Alloc(b) => loss_live.push(t.tensor(Category::Logits, b)),
                logits::LossEvent::Free(b) => {
                    let mut left = b;
                    while left > 0 {
                        let i = loss_live
                            .iter()
                            .rposition(|x| x.bytes == left)
                            .or_else(|| loss_live.len().checked_sub(1));
                        let Some(i) = i else { break };
                        let x = loss_live.remove(i);
                        left = left.saturating_sub(x.bytes);
                        t.release(x);
                    }
                }
                logits::LossEvent::Spike(b) => t.transient(Category::Logits, b),
            }
        }
    };
    // HOOK(configs, activation offload): what each layer keeps leaves the GPU after its forward
    // and comes back just before its backward; `host` counts what is held in host RAM.
    let offload = job.activation_offload;
    let mut host: u128 = 0;

    // Masks built once per forward: eager attention's 4-D float masks (causal, and sliding when
    // some layer has a window), SDPA's boolean window mask when a window is shorter than the
    // sequence. Checkpointing passes them to every layer's recompute, so they then live through
    // backward.
    let masks = mask_bytes(job);

    // A layer's parameter gradient: kept whole on one GPU; with sharding, reduced to this rank's
    // shard (FSDP: the unit's full gradient exists until its reduce-scatter).
    // FSDP-HOOK(c): FSDP keeps a layer's (or the root's: lm_head, final norm, embedding)
    // unsharded gradients until that unit's post-backward (sharding.rs `FsdpWalk`).
    let mut grads: Vec<Buf> = Vec::new();
    let mut grad = |t: &mut Timeline, bytes: u128, root: bool| {
        if let Some(f) = &fsdp {
            if root {
                f.root_grad(t, bytes);
            } else {
                f.layer_grad(t, bytes);
            }
            return;
        }
        let spike = sh
            .unsharded_grad_spike
            .then(|| t.tensor(Category::Temporaries, bytes));
        grads.push(t.tensor(Category::Gradients, sh.kept_grad(bytes)));
        if let Some(b) = spike {
            t.release(b);
        }
    };

    // ---------------- forward
    t.phase(Phase::Forward);
    let gathered = (sh.gathered > 0).then(|| t.tensor(Category::GatheredParams, sh.gathered));
    if let Some(f) = &fsdp {
        f.forward_start(t); // FSDP-HOOK(d)
    }
    let mask_bufs: Vec<Buf> = masks
        .iter()
        .map(|&b| t.tensor(Category::Temporaries, b))
        .collect();
    let mut layer_saved: Vec<Vec<Vec<Buf>>> = Vec::with_capacity(m.layers as usize);
    let mut kept_inputs: Vec<Option<Buf>> = Vec::with_capacity(m.layers as usize);
    // The residual stream between layers: each layer's output is the next one's input (the
    // embedding output, before the first layer, is not tracked).
    let mut stream: Option<Buf> = None;
    for l in 0..r.layer_kind.len() {
        let inv = layer_inv(l);
        if let Some(f) = &fsdp {
            f.layer_forward_pre(t); // FSDP-HOOK(e)
        }
        if job.grad_checkpointing {
            // Checkpointing keeps the layer input for the recompute and nothing else.
            let input = if offload {
                let b = stream
                    .take()
                    .unwrap_or_else(|| t.tensor(Category::Activations, inv.input));
                host += inv.input;
                kept_inputs.push(None);
                Some(b)
            } else {
                let b = stream
                    .take()
                    .unwrap_or_else(|| t.tensor(Category::Activations, inv.input));
                kept_inputs.push(Some(b));
                Some(b)
            };
            let (_, out) = forward_layer(t, inv, input, offload, false, true, true);
            stream = out;
            layer_saved.push(Vec::new());
        } else {
            kept_inputs.push(None);
            let (saved, out) = forward_layer(t, inv, None, true, true, true, false);
            stream = out;
            if offload {
                saved.into_iter().flatten().for_each(|b| t.release(b));
                host += inv.saved();
                layer_saved.push(Vec::new());
            } else {
                layer_saved.push(saved);
            }
        }
        if let Some(f) = &fsdp {
            f.layer_forward_post(t); // FSDP-HOOK(f)
        }
    }
    let (head_saved, _) = forward_layer(
        t,
        &head,
        stream.take(),
        true,
        true,
        false,
        job.grad_checkpointing,
    );
    if fused_loss {
        loss_events(t, &lw.forward);
    }
    // Logits: lm_head output, the ops transformers applies before the loss (Granite's scaling,
    // Gemma 2's soft-capping: its tanh output is saved), the fp32 upcast and log-softmax.
    let mut raw = t.tensor(Category::Logits, if fused_loss { 0 } else { lg.raw });
    if r.head.scaling && !fused_loss {
        let scaled = t.tensor(Category::Logits, lg.raw);
        t.release(raw);
        raw = scaled;
    }
    let tanh_saved = if r.head.softcap && !fused_loss {
        let divided = t.tensor(Category::Logits, lg.raw);
        t.release(raw);
        let y = t.tensor(Category::Logits, lg.raw);
        t.release(divided);
        raw = t.tensor(Category::Logits, lg.raw);
        Some(y)
    } else {
        None
    };
    let ce = |b: u128| if fused_loss { 0 } else { b };
    let upcast = t.tensor(Category::Logits, ce(lg.upcast));
    let log_softmax = t.tensor(Category::Logits, ce(lg.log_softmax));
    t.release(raw);
    t.release(upcast);
    let mut mask_bufs = mask_bufs;
    if !job.grad_checkpointing {
        for b in mask_bufs.drain(..) {
            t.release(b);
        }
    }

    if let Some(f) = &fsdp {
        f.forward_end(t); // FSDP-HOOK(g): the root's post-forward, after the loss
    }

    // ---------------- backward
    t.phase(Phase::Backward);
    if let Some(f) = &fsdp {
        f.backward_start(t); // FSDP-HOOK(h): the root's pre-backward
    }
    let bucket = (sh.bucket > 0).then(|| t.tensor(Category::CommBuckets, sh.bucket));
    // nll_loss and log_softmax backward: two fp32 gradients beside the saved log-softmax.
    if fused_loss {
        loss_events(t, &lw.backward);
    }
    let g1 = t.tensor(Category::Logits, ce(lg.grad_fp32));
    let g2 = t.tensor(Category::Logits, ce(lg.grad_fp32));
    t.release(g1);
    t.release(log_softmax);
    let mut g_raw = t.tensor(Category::Logits, ce(lg.grad_raw));
    t.release(g2);
    if let Some(y) = tanh_saved {
        // `* cap`, `tanh` (needs its output) and `/ cap` backward, one logits-sized gradient each.
        for _ in 0..3 {
            let next = t.tensor(Category::Logits, lg.grad_raw.max(lg.raw));
            t.release(g_raw);
            g_raw = next;
        }
        t.release(y);
    }
    if r.head.scaling {
        let next = t.tensor(Category::Logits, lg.grad_raw.max(lg.raw));
        t.release(g_raw);
        g_raw = next;
    }
    // lm_head backward: the input gradient, and the weight gradient when it trains.
    let hidden_grad = t.tensor(Category::Temporaries, tokens * dt.residual * m.hidden);
    backward_layer(
        t,
        &head,
        head_saved,
        &mut |t: &mut Timeline, b| grad(t, b, true),
        Some(g_raw),
    );
    if fused_loss {
        loss_events(t, &lw.after_head);
    }
    for l in (0..r.layer_kind.len()).rev() {
        let inv = layer_inv(l);
        if let Some(f) = &fsdp {
            f.layer_backward_pre(t, l == 0); // FSDP-HOOK(i)
        }
        // Offloaded: the checkpointed input (or the saved tensors) come back for this layer.
        let back =
            (offload && job.grad_checkpointing).then(|| t.tensor(Category::Activations, inv.input));
        let saved = if job.grad_checkpointing || offload {
            // The recompute (or the saved tensors brought back), from the kept input.
            if job.grad_checkpointing {
                t.transient(Category::Temporaries, inv.fwd_transient);
            }
            forward_layer(t, inv, None, false, true, false, false).0
        } else {
            std::mem::take(&mut layer_saved[l])
        };
        backward_layer(
            t,
            inv,
            saved,
            &mut |t: &mut Timeline, b| grad(t, b, false),
            None,
        );
        if let Some(b) = kept_inputs[l].take().or(back) {
            t.release(b);
        }
        if let Some(f) = &fsdp {
            f.layer_backward_post(t); // FSDP-HOOK(j)
        }
    }
    if full {
        let emb = m.param_counts().embedding * resident::dense_param_bytes(job);
        if m.tie_embeddings {
            // The embedding's dense gradient plus the out-of-place sum with lm_head's gradient
            // (measured: +2 × V·h on the 1B and 3B tied models).
            t.transient(Category::Temporaries, 2 * emb);
        } else {
            grad(t, emb, true);
        }
    }
    t.release(hidden_grad);
    for b in mask_bufs {
        t.release(b);
    }
    if let Some(b) = bucket {
        t.release(b);
    }
    if let Some(b) = gathered {
        t.release(b);
    }
    if let Some(f) = &fsdp {
        f.backward_end(t); // FSDP-HOOK(k): the root's post-backward in the final callback
    }

    // ---------------- optimizer
    t.phase(Phase::Optimizer);
    if step == 1 {
        // `_init_group`: the state is created at the first step and kept.
        for &b in state {
            let _ = t.tensor(Category::OptimizerState, b);
        }
    }
    let temps: Vec<Buf> = step_temps
        .iter()
        .map(|&b| t.tensor(Category::Temporaries, b))
        .collect();
    for b in temps {
        t.release(b);
    }
    // zero_grad(set_to_none=True)
    for g in grads {
        t.release(g);
    }
    if let Some(f) = &fsdp {
        f.zero_grad(t); // FSDP-HOOK(l)
    }

    let head_bytes = head.saved();
    // HOOK(configs): what the loss, offload and Liger switches changed.
    let activations = format!(
        "{}{}{}",
        explain_activations(job, &kinds, &first, head_bytes),
        if offload {
            format!("; offloaded to host RAM after each layer's forward and brought back for its backward: {host} B on the host (TRL activation_offloading / axolotl offloaded checkpointing; their in-flight copies, e.g. TRL's max_fwd_stash_size 5 tensors, are not counted: expect up to a few layers' worth more)")
        } else {
            String::new()
        },
        if job.liger_kernels {
            "; Liger RMSNorm saves its input and fp32 rstd, Liger SwiGLU its two inputs (Liger-Kernel 0.8.2; Triton, derived from source)"
        } else {
            ""
        }
    );
    let ce_explain = format!(
            "{tokens} tokens × vocab {} = {} logits: {}-bit logits + fp32 upcast + fp32 log-softmax (saved) in the forward; 2 fp32 gradients beside the saved log-softmax in the backward (transformers ForCausalLMLoss; 12 B/logit at the backward spike){}",
            m.vocab,
            tokens * m.vocab,
            dt.logits * 8,
            match (r.head.softcap, r.head.scaling) {
                (true, _) => "; final-logit soft-capping (/ cap, tanh, × cap) adds a saved 16-bit tanh output and one logits-sized copy per op",
                (_, true) => "; logits scaling (/ logits_scaling) adds one logits-sized copy",
                _ => "",
            }
        );
    StepExplain {
        activations,
        logits: if fused_loss {
            format!(
                "{}{}",
                lw.explain,
                if r.head.softcap || r.head.scaling {
                    "; the model's logit soft-capping / scaling runs inside the loss's chunks (not modelled separately)"
                } else {
                    ""
                }
            )
        } else {
            ce_explain
        },
        temporaries: format!(
            "per-layer forward transients up to {} B (dequantized weights, fp32 LoRA sums, eager scores), backward gradient buffers of each module, the residual-stream gradients{}; optimizer step {} B",
            kinds.iter().map(|k| k.fwd_transient).max().unwrap_or(0),
            if masks.is_empty() { String::new() } else { format!("; attention masks {:?} B", masks) },
            sh.optimizer_step_temp
        ),
        kv_cache: String::new(),
        host_bytes: host,
    }
}

/// Runs a layer's forward op by op, as autograd does: each op's script (its temporaries,
/// freed where the op frees them; its saved tensors, allocated where they are created) or, for
/// an op without one, its one forward transient; each op's output, alive until its last
/// consumer has run, or until backward when an op saves it (`save`: autograd records; false
/// under checkpointing, where nothing is kept). In op order, so the caching allocator sees each
/// op's temporaries freed before later tensors are carved out of them.
///
/// `input`: the layer input's buffer (the previous layer's output), freed after its last
/// consumer when `free_input`; `None`: not tracked (a saved input is then allocated where it
/// is saved). Returns the tensors saved per op and the layer's output (the last op's), which is
/// not allocated unless `keep_output` (checkpoint recompute stops once the saved tensors exist;
/// lm_head's output is the logits, which the caller walks).
fn forward_layer(
    t: &mut Timeline,
    inv: &LayerInventory,
    input: Option<Buf>,
    free_input: bool,
    save: bool,
    keep_output: bool,
    track: bool,
) -> (Vec<Vec<Buf>>, Option<Buf>) {
    let n = inv.tensor_bytes.len();
    let n_ops = inv.ops.len();
    // The last op reading each tensor; whether some op saves it (first saver holds it).
    let mut last_use: Vec<Option<usize>> = vec![None; n];
    for (i, ins) in inv.inputs.iter().enumerate() {
        for &x in ins {
            last_use[x] = Some(i);
        }
    }
    let mut will_save = vec![false; n];
    if save {
        for op in &inv.ops {
            for s in &op.saved {
                if let Saved::Shared(x) = *s {
                    will_save[x] = true;
                }
            }
        }
    }
    let mut bufs: Vec<Option<Buf>> = vec![None; n];
    bufs[0] = input;
    let mut seen = vec![false; n];
    let mut layer_out = None;
    let mut per_op = Vec::with_capacity(n_ops);
    for (i, op) in inv.ops.iter().enumerate() {
        let o = inv.outputs.get(i).copied();
        let is_last = i + 1 == n_ops;
        let alloc_out = |t: &mut Timeline, bufs: &mut Vec<Option<Buf>>| {
            if let Some(o) = o {
                if bufs[o].is_none() && (!is_last || keep_output) {
                    let cat = if will_save[o] || is_last {
                        Category::Activations
                    } else {
                        Category::Temporaries
                    };
                    bufs[o] = Some(t.tensor(cat, inv.tensor_bytes[o]));
                }
            }
        };
        let mut save_one =
            |t: &mut Timeline, bufs: &mut Vec<Option<Buf>>, s: Saved| -> Option<Buf> {
                match s {
                    Saved::Own(b) => Some(t.tensor(
                        if save {
                            Category::Activations
                        } else {
                            Category::Temporaries
                        },
                        b,
                    )),
                    Saved::Shared(x) if save && !seen[x] => {
                        seen[x] = true;
                        Some(bufs[x].take().unwrap_or_else(|| {
                            t.tensor(Category::Activations, inv.tensor_bytes[x])
                        }))
                    }
                    Saved::Shared(_) => None,
                }
            };
        // A script that does not save each saved tensor exactly once (a rule changed the saved
        // list after it, e.g. Liger's) falls back to the op's one transient.
        let mut saves: Vec<usize> = op
            .fwd_script
            .iter()
            .filter_map(|e| match *e {
                Fwd::Save(j) => Some(j),
                _ => None,
            })
            .collect();
        saves.sort_unstable();
        let scripted =
            !op.fwd_script.is_empty() && saves == (0..op.saved.len()).collect::<Vec<_>>();
        let mut out: Vec<Option<Buf>> = vec![None; op.saved.len()];
        let mut temps: Vec<Option<Buf>> = Vec::new();
        if scripted {
            for e in &op.fwd_script {
                match *e {
                    Fwd::Temp(b) => temps.push(Some(t.tensor(Category::Temporaries, b))),
                    Fwd::Free(k) => {
                        if let Some(b) = temps.get_mut(k).and_then(Option::take) {
                            t.release(b);
                        }
                    }
                    Fwd::Save(j) => out[j] = save_one(t, &mut bufs, op.saved[j]),
                    Fwd::Out if !track => {
                        if let Some(o) = o {
                            temps.push(Some(t.tensor(Category::Temporaries, inv.tensor_bytes[o])));
                        }
                    }
                    Fwd::Out => alloc_out(t, &mut bufs),
                }
            }
        } else {
            temps.push(Some(t.tensor(Category::Temporaries, op.fwd_transient)));
            for (j, &s) in op.saved.iter().enumerate() {
                out[j] = save_one(t, &mut bufs, s);
            }
        }
        if track {
            alloc_out(t, &mut bufs);
        }
        for b in temps.into_iter().flatten() {
            t.release(b);
        }
        // Not saving: what the op "saved" was only its own intermediate.
        if !save {
            for b in out.drain(..).flatten() {
                t.release(b);
            }
        }
        per_op.push(out.into_iter().flatten().collect());
        // Inputs whose last consumer this was (the layer input only when the caller lets go).
        let mut dead: Vec<crate::arch::T> = inv.inputs[i]
            .iter()
            .copied()
            .filter(|&x| last_use[x] == Some(i) && (x != 0 || free_input))
            .collect();
        dead.sort_unstable();
        dead.dedup();
        if let Some(o) = o {
            if last_use[o].is_none() && !is_last {
                dead.push(o);
            }
        }
        for x in dead {
            if let Some(b) = bufs[x].take() {
                t.release(b);
            }
        }
        if is_last {
            layer_out = o.and_then(|o| bufs[o].take());
        }
    }
    // Tensors nobody consumed inside the layer (none in a well-formed recipe) go now, except
    // the caller's input.
    for (x, b) in bufs.into_iter().enumerate() {
        if let Some(b) = b {
            if x != 0 || free_input {
                t.release(b);
            }
        }
    }
    (per_op, layer_out)
}

/// The backward of one layer, block by block in reverse: the incoming and outgoing residual
/// gradients alive through each block; each op, in reverse, allocates its gradient buffers,
/// frees the tensors it saved (a shared tensor goes with the first op in forward order that
/// saved it, i.e. the last to run backward) and creates its parameters' gradients.
fn backward_layer(
    t: &mut Timeline,
    inv: &LayerInventory,
    saved: Vec<Vec<Buf>>,
    grad: &mut impl FnMut(&mut Timeline, u128),
    upstream: Option<Buf>,
) {
    let mut saved = saved;
    // A shared tensor allocated by op i may be saved by later ops too; it is released with op i,
    // which runs backward after them. So releasing each op's own list in reverse order is
    // exactly right.
    let mut upstream = upstream;
    let mut block: Option<u8> = None;
    let mut residual: Vec<Buf> = Vec::new();
    for (i, op) in inv.ops.iter().enumerate().rev() {
        let b = inv.blocks[i];
        if block != Some(b) {
            for r in residual.drain(..) {
                t.release(r);
            }
            if inv.residual_grad > 0 {
                residual.push(t.tensor(Category::Temporaries, inv.residual_grad));
                residual.push(t.tensor(Category::Temporaries, inv.residual_grad));
            }
            block = Some(b);
        }
        let mut mine = saved.get_mut(i).map(std::mem::take).unwrap_or_default();
        if op.bwd_stages.is_empty() {
            t.transient(Category::Temporaries, op.bwd_transient);
        } else {
            for &(bytes, n) in &op.bwd_stages {
                t.transient(Category::Temporaries, bytes);
                for s in mine.split_off(mine.len().saturating_sub(n)) {
                    t.release(s);
                }
            }
        }
        if let Some(u) = upstream.take() {
            t.release(u);
        }
        for s in mine {
            t.release(s);
        }
        for &g in &op.grads {
            grad(t, g);
        }
    }
    for r in residual {
        t.release(r);
    }
    if let Some(u) = upstream {
        t.release(u);
    }
}

/// The final norm and lm_head as a one-block layer under the same op rules (lm_head is never a
/// LoRA target and never quantized: transformers skips it). Its backward has no residual
/// gradients of its own.
fn head_inventory(job: &Job, tokens: u128) -> LayerInventory {
    use crate::arch::{LayerBuilder, Module, Proj};
    let m = &job.model;
    let mut b = LayerBuilder::new(m.hidden);
    let x = b.input();
    let n = b.norm(x, m.recipe.final_norm);
    b.linear(
        n,
        Proj {
            name: "lm_head",
            kind: crate::model::LinearKind::Router,
            in_f: m.hidden,
            out_f: m.vocab,
            bias: false,
            module: Module::Param,
        },
    );
    let mut inv = inventory(job, &b.build("head"), tokens, true);
    // The Linear rule's gradient buffers are the lm_head's input gradient (allocated by the
    // caller, alive through the decoder's backward); its weight gradient is V·h (tied: the
    // embedding's, added at the end).
    for op in &mut inv.ops {
        op.bwd_transient = 0;
        op.fwd_transient = 0;
    }
    inv.residual_grad = 0;
    inv
}

/// Attention masks built once per forward (bytes each).
pub(crate) fn mask_bytes(job: &Job) -> Vec<u128> {
    use crate::arch::OpKind;
    let r = &job.model.recipe;
    let (mut causal, mut window) = (false, false);
    for (k, n) in r.kind_counts().into_iter().enumerate() {
        if n == 0 {
            continue;
        }
        for op in &r.kinds[k].ops {
            if let OpKind::Attention(a) = &op.kind {
                match job.attention {
                    crate::method::Attention::Eager => {
                        if a.window.is_some() {
                            window = true;
                        } else {
                            causal = true;
                        }
                    }
                    _ => window |= activations::sdpa_masked(job, a),
                }
            }
        }
    }
    let bs2 = job.batch * job.seq * job.seq;
    let c = job.compute.float_bytes();
    let mut out = Vec::new();
    match job.attention {
        crate::method::Attention::Eager => {
            if causal {
                out.push(bs2 * c);
            }
            if window {
                out.push(bs2 * c);
            }
        }
        _ => {
            if window {
                out.push(bs2);
            }
        }
    }
    out
}

fn explain_activations(
    job: &Job,
    kinds: &[LayerInventory],
    first: &LayerInventory,
    head_saved: u128,
) -> String {
    let r = &job.model.recipe;
    let counts = r.kind_counts();
    let tokens = job.tokens().max(1);
    let per_kind: Vec<String> = r
        .kinds
        .iter()
        .zip(kinds)
        .zip(&counts)
        .filter(|(_, n)| **n > 0)
        .map(|((k, inv), n)| format!("{n} × {} layer {} B/token", k.name, inv.saved() / tokens))
        .collect();
    let base = format!(
        "tensors autograd saves for backward, op by op over the {} recipe (PyTorch derivatives of its transformers modules, peft LoRA, {} attention): {} × {} tokens; first layer {} B (frozen input saves less){} + final norm/lm_head {} B",
        r.class,
        job.attention,
        per_kind.join(", "),
        job.tokens(),
        first.saved(),
        match job.attention {
            crate::method::Attention::Eager => " (eager: incl. the scores of every head, 6 B each)",
            _ => "",
        },
        head_saved
    );
    let base = if r.notes.is_empty() {
        base
    } else {
        format!("{base}; {}", r.notes.join("; "))
    };
    if job.grad_checkpointing {
        format!(
            "{base}; with checkpointing only each layer's input ({} B) is kept and one layer is recomputed at a time in backward",
            first.input
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
        // The first RMSNorm's fp32 input copy and rsqrt: 10 tokens × (4 · 2048 + 4) B.
        assert_eq!(layer.saved() - first.saved(), 10 * (4 * 2048 + 4));
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
        assert_eq!(mlp(&layer) - mlp(&first), 10 * (4 * 2048 + 4));
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
