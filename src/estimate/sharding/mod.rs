//! Data-parallel sharding: the per-GPU memory of DeepSpeed ZeRO and PyTorch FSDP.
//!
//! memplan does not run distributed training; it plans it for the engines people use. What each
//! engine keeps on one GPU of a data-parallel group of `S` ranks (S = all GPUs, or the GPUs of one
//! node for FSDP `HYBRID_SHARD`):
//!
//! | level | DeepSpeed        | FSDP             | sharded (/S)                          |
//! |-------|------------------|------------------|---------------------------------------|
//! | 0     | ZeRO-0 (DDP)     | —                | nothing                               |
//! | 1     | ZeRO-1           | —                | optimizer state                       |
//! | 2     | ZeRO-2           | `SHARD_GRAD_OP`  | + gradients                           |
//! | 3     | ZeRO-3           | `FULL_SHARD`, `HYBRID_SHARD` | + parameters              |
//!
//! Sources and the behaviour modelled:
//! - ZeRO (Rajbhandari et al., 2020, §5): P_os, P_os+g, P_os+g+p partition optimizer state,
//!   gradients and parameters over the data-parallel ranks.
//! - DeepSpeed mixed precision (`deepspeed/runtime/zero/stage_1_and_2.py`,
//!   `single_partition_of_fp32_groups`; `stage3.py` `fp32_partitioned_groups_flat`): the optimizer
//!   steps an fp32 master copy of its partition of the 16-bit parameters, so the optimizer state
//!   is the master copy (4 B/param) plus the optimizer's own state in fp32 (Adam: 8 B/param), and
//!   the averaged gradient partition is converted to fp32 (4 B/param) for the step. That is the
//!   `16 · P / N` of DeepSpeed's `estimate_zero2_model_states_mem_needs` and the `18 · P / N`
//!   (+ 2 B of 16-bit parameters) of `estimate_zero3_model_states_mem_needs`.
//! - DeepSpeed communication buckets: gradients are reduced through a bucket of
//!   `reduce_bucket_size` elements (default 5e8, DeepSpeed config docs, `zero_optimization`);
//!   ZeRO-3 fetches parameters module by module and prefetches up to
//!   `stage3_prefetch_bucket_size` elements (default 5e7) ahead. The largest gathered module is
//!   the embedding or lm_head for every LLM preset (the `4 · largest_layer` term of DeepSpeed's
//!   estimator: its 16-bit parameters and gradient).
//! - FSDP (`torch.distributed.fsdp`; Zhao et al., 2023, §3): units are the decoder layers
//!   (accelerate's `TRANSFORMER_BASED_WRAP`) plus the root (embeddings, final norm, lm_head),
//!   walked buffer by buffer as torch 2.11's FSDP2 code allocates them ([`FsdpWalk`]: all-gather
//!   buffers and copies, backward prefetch, the root's late reduce-scatter, reduce-scatter
//!   inputs held to the next unit); FSDP1 where it differs. FSDP keeps parameters, sharded
//!   gradients and optimizer state in the dtype they were loaded in (memplan's `--weights`);
//!   with `--weights fp32 --compute bf16` it gathers bf16 copies
//!   (`MixedPrecisionPolicy(param_dtype=bf16)`) and the step is the bf16 one ([`walk_job`]).
//!   Held to traces of real `fully_shard` steps: `tests/fsdp_reference.rs`.
//! - Offload: DeepSpeed `offload_optimizer` (ZeRO-Offload, Ren et al., 2021) keeps the fp32
//!   master, optimizer state and gradient partition in CPU RAM and steps there (DeepSpeedCPUAdam);
//!   `offload_param` (ZeRO-Infinity, stage 3 only) also keeps the 16-bit parameter partition
//!   there. FSDP `CPUOffload(offload_params=True)` moves parameters and gradients (and so the
//!   optimizer step) to the CPU; FSDP has no optimizer-only offload.
//!
//! Activations, logits and per-layer transients are per micro-batch and per GPU: unchanged.
//! Not modelled: NCCL's own buffers (outside the allocator, tens to hundreds of MiB), pinned CPU
//! staging buffers, and DeepSpeed's contiguous-gradient copies (`contiguous_gradients`).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::dtype::Precision;
use crate::error::Error;
use crate::method::{Job, Method};

use super::resident::{dense_param_bytes, resident, Resident, ADAPTER_BYTES};

mod fsdp;
pub use fsdp::*;

/// The engine and its sharding strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// DeepSpeed ZeRO stage 0–3.
    Zero(u8),
    /// PyTorch FSDP `ShardingStrategy`.
    Fsdp(FsdpStrategy),
}

/// PyTorch FSDP sharding strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsdpStrategy {
    FullShard,
    ShardGradOp,
    HybridShard,
}

/// What is moved to CPU RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Offload {
    None,
    Optimizer,
    #[serde(rename = "optimizer+params")]
    OptimizerParams,
}

/// DeepSpeed's default `reduce_bucket_size` (elements), `zero_optimization` config docs.
pub const DEFAULT_REDUCE_BUCKET: u128 = 500_000_000;
/// DeepSpeed's default `stage3_prefetch_bucket_size` (elements).
pub const DEFAULT_PREFETCH_BUCKET: u128 = 50_000_000;
/// DeepSpeed's default `sub_group_size` (elements): ZeRO-3 steps its partition one sub-group at a
/// time (`stage3.py` `_prepare_fp32_grad_for_sub_group` / `_release_sub_group`), so only one
/// sub-group's fp32 gradient exists at once.
pub const ZERO3_SUB_GROUP: u128 = 1_000_000_000;

/// A data-parallel layout: how many GPUs, and what is sharded over them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sharding {
    /// Total GPUs (data-parallel ranks).
    pub gpus: u128,
    pub nodes: u128,
    pub engine: Engine,
    pub offload: Offload,
    /// Gradient reduction bucket, elements (DeepSpeed `reduce_bucket_size`).
    pub reduce_bucket: u128,
    /// ZeRO-3 parameter prefetch, elements (`stage3_prefetch_bucket_size`).
    pub prefetch_bucket: u128,
    /// FSDP implementation: 2 (`fully_shard`, the default) or 1 (`FullyShardedDataParallel`).
    pub fsdp_version: u8,
    /// FSDP `MixedPrecisionPolicy.reduce_dtype` (`MixedPrecision.reduce_dtype` in FSDP1): the
    /// dtype gradients are reduce-scattered in. `None` is torch's default, the gathered
    /// parameters' dtype (and what accelerate builds from `mixed_precision`).
    pub reduce_dtype: Option<Precision>,
    /// FSDP `MixedPrecisionPolicy.param_dtype` when it narrows the stored parameters (fp32
    /// weights, 16-bit compute): set on the job [`walk_job`] returns, so that the walk sees
    /// every gathered parameter, LoRA adapters included, in that dtype.
    pub mixed_param_dtype: Option<Precision>,
    /// FSDP2: the root's `fully_shard` is given `reshard_after_forward=True` (not torch's
    /// default `None`, which keeps the root gathered from forward to backward).
    pub root_reshard_after_forward: bool,
}

impl Sharding {
    /// `gpus` GPUs on one node with `engine` and no offload, default buckets.
    pub fn new(gpus: u128, engine: Engine) -> Sharding {
        Sharding {
            gpus,
            nodes: 1,
            engine,
            offload: Offload::None,
            reduce_bucket: DEFAULT_REDUCE_BUCKET,
            prefetch_bucket: DEFAULT_PREFETCH_BUCKET,
            fsdp_version: 2,
            reduce_dtype: None,
            mixed_param_dtype: None,
            root_reshard_after_forward: false,
        }
    }

    /// 0 (nothing sharded) … 3 (parameters sharded).
    pub fn level(&self) -> u8 {
        match self.engine {
            Engine::Zero(s) => s,
            Engine::Fsdp(FsdpStrategy::ShardGradOp) => 2,
            Engine::Fsdp(_) => 3,
        }
    }

    /// Ranks a state is sharded over: every GPU, or one node's for `HYBRID_SHARD`.
    pub fn group(&self) -> u128 {
        match self.engine {
            Engine::Fsdp(FsdpStrategy::HybridShard) => self.gpus / self.nodes.max(1),
            _ => self.gpus,
        }
    }

    pub fn gpus_per_node(&self) -> u128 {
        self.gpus / self.nodes.max(1)
    }

    fn is_deepspeed(&self) -> bool {
        matches!(self.engine, Engine::Zero(_))
    }

    /// Rejects layouts the engines do not run, naming the flag to change.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Unsupported(m));
        if self.gpus == 0 {
            return bad("--gpus must be at least 1".into());
        }
        if self.nodes == 0 {
            return bad("--nodes must be at least 1".into());
        }
        if self.gpus % self.nodes != 0 {
            return bad(format!(
                "--gpus {} is not a multiple of --nodes {}: every node runs the same number of GPUs",
                self.gpus, self.nodes
            ));
        }
        if let Engine::Zero(s) = self.engine {
            if s > 3 {
                return bad(format!(
                    "--zero {s}: DeepSpeed ZeRO stages are 0, 1, 2 and 3"
                ));
            }
        }
        if !matches!(self.fsdp_version, 1 | 2) {
            return bad(format!(
                "--fsdp-version {}: FSDP is version 1 (FullyShardedDataParallel) or 2 (fully_shard)",
                self.fsdp_version
            ));
        }
        if self.reduce_bucket == 0 || self.prefetch_bucket == 0 {
            return bad("--reduce-bucket and --prefetch-bucket must be at least 1 element".into());
        }
        match (self.engine, self.offload) {
            (_, Offload::None) => {}
            (Engine::Zero(0), _) => {
                return bad("--offload needs --zero 1, 2 or 3 (ZeRO-Offload partitions what it offloads)".into())
            }
            (Engine::Zero(s), Offload::OptimizerParams) if s < 3 => {
                return bad(format!("--offload optimizer+params needs --zero 3 (DeepSpeed offload_param is a ZeRO-3 feature); with --zero {s} use --offload optimizer"))
            }
            (Engine::Fsdp(_), Offload::Optimizer) => {
                return bad("FSDP offloads parameters and gradients together (CPUOffload(offload_params=True)): use --offload optimizer+params, or DeepSpeed --zero 1|2|3 --offload optimizer".into())
            }
            (Engine::Fsdp(FsdpStrategy::ShardGradOp), Offload::OptimizerParams) => {
                return bad("FSDP CPU offload needs --fsdp full-shard or hybrid-shard".into())
            }
            _ => {}
        }
        Ok(())
    }

    /// A note when the layout is valid but unusual (e.g. sharding over one GPU).
    pub fn advice(&self) -> Option<String> {
        (self.group() == 1 && self.level() > 0).then(|| {
            format!(
                "sharding over {} GPU saves nothing: every shard is the whole state{}",
                self.group(),
                if self.offload == Offload::None {
                    "; it only adds gather/scatter work. It is useful on one GPU with --offload"
                } else {
                    "; only the offload moves memory"
                }
            )
        })
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Engine::Zero(s) => write!(f, "ZeRO-{s}"),
            Engine::Fsdp(s) => write!(f, "FSDP {s}"),
        }
    }
}

impl fmt::Display for FsdpStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsdpStrategy::FullShard => "full-shard",
            FsdpStrategy::ShardGradOp => "shard-grad-op",
            FsdpStrategy::HybridShard => "hybrid-shard",
        })
    }
}

impl FsdpStrategy {
    /// The `ShardingStrategy` / accelerate `fsdp_sharding_strategy` name.
    pub fn torch_name(self) -> &'static str {
        match self {
            FsdpStrategy::FullShard => "FULL_SHARD",
            FsdpStrategy::ShardGradOp => "SHARD_GRAD_OP",
            FsdpStrategy::HybridShard => "HYBRID_SHARD",
        }
    }
}

impl FromStr for FsdpStrategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "full-shard" | "full" => Ok(FsdpStrategy::FullShard),
            "shard-grad-op" => Ok(FsdpStrategy::ShardGradOp),
            "hybrid-shard" | "hybrid" => Ok(FsdpStrategy::HybridShard),
            _ => Err(Error::InvalidValue {
                flag: "--fsdp",
                value: s.into(),
                expected: "full-shard, shard-grad-op or hybrid-shard",
            }),
        }
    }
}

impl fmt::Display for Offload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Offload::None => "none",
            Offload::Optimizer => "optimizer",
            Offload::OptimizerParams => "optimizer+params",
        })
    }
}

impl FromStr for Offload {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().replace(' ', "").as_str() {
            "none" => Ok(Offload::None),
            "optimizer" | "cpu" => Ok(Offload::Optimizer),
            "optimizer+params" | "optimizer+param" | "params" | "all" => {
                Ok(Offload::OptimizerParams)
            }
            _ => Err(Error::InvalidValue {
                flag: "--offload",
                value: s.into(),
                expected: "none, optimizer or optimizer+params",
            }),
        }
    }
}

/// Per-GPU resident state and the buffers the sharded walk adds. For a job without sharding
/// every field equals the single-GPU value and the walk adds nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PerGpu {
    pub weights: u128,
    pub quant_constants: u128,
    pub adapters: u128,
    /// Optimizer state on the GPU (with DeepSpeed: incl. the fp32 master partition).
    pub optimizer_state: u128,
    pub optimizer_paged: u128,
    pub optimizer_step_temp: u128,
    /// Gradients kept per GPU = created bytes / `grad_divisor` (1 unless level ≥ 2); 0 keeps none
    /// on the GPU (offloaded after reduction).
    pub grad_divisor: u128,
    pub grads_on_gpu: bool,
    /// Gathered parameters alive through forward and backward (ZeRO-3 / FSDP full shard).
    pub gathered: u128,
    /// A unit's full gradient before reduce-scatter (FSDP) — spiked per layer.
    pub unsharded_grad_spike: bool,
    /// Gradient communication bucket alive through backward.
    pub bucket: u128,
    /// CPU RAM per GPU for offloaded state.
    pub cpu_offload: u128,
    /// FSDP's units, walked buffer by buffer ([`FsdpWalk`]); `None` for DeepSpeed / one GPU.
    pub fsdp: Option<FsdpUnits>,
    pub explain: String,
}

impl PerGpu {
    /// Single-GPU values: the walk is exactly the unsharded one.
    pub fn unsharded(res: &Resident) -> PerGpu {
        PerGpu {
            weights: res.weights,
            quant_constants: res.quant_constants,
            adapters: res.adapters,
            optimizer_state: res.optimizer_state,
            optimizer_paged: res.optimizer_paged,
            optimizer_step_temp: res.optimizer_step_temp,
            grad_divisor: 1,
            grads_on_gpu: true,
            ..PerGpu::default()
        }
    }

    /// Gradient bytes kept on this GPU after a layer creates `bytes` of them.
    pub fn kept_grad(&self, bytes: u128) -> u128 {
        if self.grads_on_gpu {
            bytes.div_ceil(self.grad_divisor)
        } else {
            0
        }
    }
}

/// Model-state bytes per GPU for a sharded job (the part DeepSpeed's estimators cover).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelStates {
    pub params_bytes: u128,
    pub grads_bytes: u128,
    pub optimizer_bytes: u128,
    pub gathered_bytes: u128,
}

/// Bytes of the root FSDP unit / largest module and of one decoder layer's parameters, as stored.
fn unit_bytes(job: &Job, res: &Resident) -> (u128, u128, u128) {
    let m = &job.model;
    let c = m.param_counts();
    let dense = dense_param_bytes(job);
    let root = (c.embedding + c.lm_head + m.hidden) * dense;
    let layer = (res.weights + res.adapters).saturating_sub(root) / m.layers.max(1);
    // DeepSpeed gathers module by module: the largest is the embedding / lm_head or one Linear.
    let largest_module = (c.embedding * dense).max(
        job.weights
            .storage_bytes(c.largest_linear, 1, job.double_quant)
            .0,
    );
    (root, layer, largest_module)
}

/// Scales a stored byte count to the dtype FSDP gathers in (`MixedPrecision(param_dtype)`).
fn gathered_dtype(job: &Job, bytes: u128) -> u128 {
    if job.weights == Precision::Fp32 && job.compute.float_bytes() < 4 {
        bytes * job.compute.float_bytes() / 4
    } else {
        bytes
    }
}

/// The per-GPU state of `job` under its sharding.
pub fn per_gpu(job: &Job, res: &Resident) -> PerGpu {
    let Some(sh) = job.sharding.as_ref() else {
        return PerGpu::unsharded(res);
    };
    let s = sh.group().max(1);
    let level = sh.level();
    let part = |b: u128| b.div_ceil(s);
    let mut p = PerGpu::unsharded(res);
    let trains = job.method != Method::Inference;

    // Optimizer state: DeepSpeed steps an fp32 master copy of 16-bit trainable parameters.
    let ds_mixed = sh.is_deepspeed()
        && trains
        && res.trainable_params > 0
        && res.trainable_bytes < 4 * res.trainable_params;
    let (opt_state, opt_paged, fp32_grad_partition, master) = if ds_mixed {
        let mut fp32 = job.clone();
        fp32.sharding = None;
        fp32.weights = Precision::Fp32;
        fp32.compute = Precision::Fp32;
        let r32 = resident(&fp32);
        (
            r32.optimizer_state + 4 * res.trainable_params,
            r32.optimizer_paged,
            4 * res.trainable_params,
            true,
        )
    } else {
        (res.optimizer_state, res.optimizer_paged, 0, false)
    };
    let opt_div = if level >= 1 { s } else { 1 };
    let opt_gpu = opt_state.div_ceil(opt_div);
    let paged_gpu = opt_paged.div_ceil(opt_div);
    let grad32_gpu = fp32_grad_partition.div_ceil(opt_div);
    // Stage 1/2 convert the whole gradient partition of a parameter group to fp32 before the
    // step (`stage_1_and_2.py` `single_grad_partition`); stage 3 one sub-group at a time.
    let grad32_step = if level >= 3 {
        grad32_gpu.min(4 * ZERO3_SUB_GROUP)
    } else {
        grad32_gpu
    };
    // DeepSpeed FusedAdam / the fused CPU Adam need no step temporaries beyond the fp32
    // gradient partition; FSDP runs the job's torch optimizer on the shard.
    let step_temp = if sh.is_deepspeed() {
        grad32_step
    } else {
        res.optimizer_step_temp.div_ceil(opt_div)
    };

    let offload_opt = sh.offload != Offload::None;
    let offload_params = sh.offload == Offload::OptimizerParams;
    let mut cpu = 0;
    if offload_opt && sh.is_deepspeed() {
        cpu += opt_gpu + paged_gpu + grad32_gpu;
        p.optimizer_state = 0;
        p.optimizer_paged = 0;
        p.optimizer_step_temp = 0;
    } else if offload_params {
        // FSDP CPUOffload: parameters and gradients on the CPU, so the optimizer steps there.
        cpu += opt_gpu + paged_gpu;
        p.optimizer_state = 0;
        p.optimizer_paged = 0;
        p.optimizer_step_temp = 0;
    } else {
        p.optimizer_state = opt_gpu;
        p.optimizer_paged = paged_gpu;
        p.optimizer_step_temp = step_temp;
    }

    if level >= 2 {
        p.grad_divisor = s;
    }
    // ZeRO-Offload copies each reduced gradient partition to CPU; FSDP offload keeps gradients
    // on the CPU.
    if (offload_opt && sh.is_deepspeed() && level >= 2) || offload_params {
        p.grads_on_gpu = false;
        cpu += res.trainable_bytes.div_ceil(s);
    }

    let (root, layer, largest_module) = unit_bytes(job, res);
    // FSDP shards parameters at rest under every strategy (SHARD_GRAD_OP only keeps them
    // gathered from a unit's forward to its backward: the walk holds them); ZeRO from stage 3.
    let params_sharded = level >= 3 || (!sh.is_deepspeed() && trains);
    if params_sharded {
        p.weights = part(res.weights);
        // bitsandbytes' quantization constants live in `Params4bit.quant_state`, plain tensors
        // that are no parameters: FSDP and ZeRO-3 leave them whole on every rank.
        p.quant_constants = res.quant_constants;
        p.adapters = part(res.adapters);
        if offload_params {
            // Only parameters move to the CPU; the quantization constants stay on the GPU.
            cpu += p.weights + p.adapters;
            p.weights = 0;
            p.adapters = 0;
        }
        p.gathered = if sh.is_deepspeed() {
            // The module being computed plus the prefetch bucket (16-bit elements as stored).
            let prefetch = sh
                .prefetch_bucket
                .saturating_mul(dense_param_bytes(job))
                .min(layer * 2);
            largest_module + prefetch
        } else {
            // Root unit (not resharded after forward) + current and prefetched decoder layer.
            gathered_dtype(job, root + 2 * layer)
        };
    }
    if trains && !sh.is_deepspeed() && level >= 2 {
        p.unsharded_grad_spike = true;
    }
    if trains && !sh.is_deepspeed() {
        // The FSDP walk replaces the gathered working set and the gradient spike. Unsharded
        // gradients are in the gathered dtype, sharded ones in the stored dtype.
        let walk = walk_job(job);
        let (grad_elem, shard_elem) = if job.method == Method::Full {
            (dense_param_bytes(&walk), dense_param_bytes(job))
        } else {
            (adapter_bytes(&walk), ADAPTER_BYTES)
        };
        p.fsdp = Some(FsdpUnits {
            version: sh.fsdp_version,
            root: gathered_dtype(job, root),
            layer: gathered_dtype(job, layer),
            layers: job.model.layers,
            root_reshard_after_forward: sh.fsdp_version == 2
                && level >= 3
                && sh.root_reshard_after_forward,
            reshard_after_forward: level >= 3,
            grad_elem,
            reduce_elem: sh.reduce_dtype.map_or(grad_elem, |d| d.float_bytes()),
            shard_elem,
            shards: if level >= 2 { s } else { 1 },
            grads_on_gpu: p.grads_on_gpu,
        });
        p.gathered = 0;
        p.unsharded_grad_spike = false;
    }
    if trains && sh.is_deepspeed() {
        // The gradient reduction bucket: up to reduce_bucket_size elements of 16-bit gradients.
        let grad_elem = if res.trainable_params > 0 {
            res.trainable_bytes.div_ceil(res.trainable_params)
        } else {
            0
        };
        p.bucket = sh.reduce_bucket.min(res.trainable_params) * grad_elem;
    }
    p.cpu_offload = cpu;
    let working_set = match &p.fsdp {
        Some(f) => format!(
            "FSDP{} units walked as they run: root {} B and one layer {} B gathered ({} B at most at once), unsharded gradients {} B per element, reduce-scattered in {} B per element",
            f.version,
            f.root,
            f.layer,
            f.largest_gathered(),
            f.grad_elem,
            f.reduce_elem
        ),
        None => format!("gathered working set {} B", p.gathered),
    };
    p.explain = format!(
        "{} over {} GPU(s) ({} node(s)), shard group {s}, offload {}: optimizer state{} /{opt_div}, gradients /{}{}, parameters /{}; {working_set}, gradient bucket {} B, CPU offload {} B per GPU",
        sh.engine,
        sh.gpus,
        sh.nodes,
        sh.offload,
        if master { " (fp32 master + fp32 states, DeepSpeed mixed precision)" } else { "" },
        p.grad_divisor,
        if p.grads_on_gpu { "" } else { " (reduced partitions moved to CPU)" },
        if params_sharded { s } else { 1 },
        p.bucket,
        cpu
    );
    p
}

/// The model-state part of the per-GPU memory: what DeepSpeed's estimators count (parameters,
/// gradients kept after reduction, optimizer state with master weights and the fp32 gradient
/// partition, gathered working set), without activations, buckets or runtime overheads.
pub fn model_states(job: &Job) -> ModelStates {
    let res = resident(job);
    let p = per_gpu(job, &res);
    ModelStates {
        params_bytes: p.weights + p.quant_constants + p.adapters,
        grads_bytes: p.kept_grad(res.trainable_bytes),
        optimizer_bytes: p.optimizer_state
            + p.optimizer_paged
            + if job.sharding.as_ref().is_some_and(|s| s.is_deepspeed()) {
                p.optimizer_step_temp
            } else {
                0
            },
        gathered_bytes: p
            .fsdp
            .as_ref()
            .map_or(p.gathered, FsdpUnits::largest_gathered),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::estimate;
    use crate::estimate::timeline::{Category, Timeline};
    use crate::model::resolve_model;

    /// Llama-3.1-8B: P = 8,030,261,248 parameters (model presets test), V·h = 128,256 × 4096.
    const P: u128 = 8_030_261_248;
    const EMB: u128 = 128_256 * 4096;

    fn job(method: Method, gpus: u128, engine: Engine, offload: Offload) -> Job {
        let mut j = Job::new(resolve_model("llama-3.1-8b").unwrap().0, method);
        let mut s = Sharding::new(gpus, engine);
        s.offload = offload;
        j.sharding = Some(s);
        j
    }

    // DeepSpeed's published estimators (deepspeed/runtime/zero/stage_1_and_2.py and stage3.py,
    // `estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`), GPU side.
    fn ds_zero2_gpu(p: u128, n: u128, offload: bool) -> u128 {
        if offload {
            2 * p
        } else {
            4 * p + 16 * p / n
        }
    }
    fn ds_zero3_gpu(p: u128, largest: u128, n: u128, offload: bool, offload_params: bool) -> u128 {
        let largest_mem = 4 * largest;
        match (offload, offload_params) {
            (true, true) => largest_mem,
            (true, false) => largest_mem + 2 * p / n,
            _ => largest_mem + 18 * p / n,
        }
    }

    #[test]
    fn zero_model_states_by_hand() {
        let n = 8;
        // ZeRO-1: 16-bit params 2P and gradients 2P whole; fp32 master 4P + Adam 8P + fp32 grad
        // partition 4P, each / N.
        let z1 = model_states(&job(Method::Full, n, Engine::Zero(1), Offload::None));
        assert_eq!(z1.params_bytes, 2 * P);
        assert_eq!(z1.grads_bytes, 2 * P);
        assert_eq!(
            z1.optimizer_bytes,
            (12 * P).div_ceil(n) + (4 * P).div_ceil(n)
        );
        // ZeRO-2: + gradients / N.
        let z2 = model_states(&job(Method::Full, n, Engine::Zero(2), Offload::None));
        assert_eq!(z2.grads_bytes, (2 * P).div_ceil(n));
        // ZeRO-3: + parameters / N, and the gathered embedding (largest module) + 5e7 prefetch.
        let z3 = model_states(&job(Method::Full, n, Engine::Zero(3), Offload::None));
        assert_eq!(z3.params_bytes, (2 * P).div_ceil(n));
        assert_eq!(z3.gathered_bytes, 2 * EMB + 2 * DEFAULT_PREFETCH_BUCKET);
    }

    #[test]
    fn zero2_matches_deepspeed_estimator_where_it_should() {
        let n = 8;
        // With offload the two agree exactly: only the 16-bit parameters stay on the GPU.
        let off = model_states(&job(Method::Full, n, Engine::Zero(2), Offload::Optimizer));
        let ours = off.params_bytes + off.grads_bytes + off.optimizer_bytes;
        assert_eq!(ours, ds_zero2_gpu(P, n, true));
        // Without offload DeepSpeed counts the 16-bit gradients whole (2P, as in stage 1), memplan
        // the reduced partition (2P/N; the bucket is a separate buffer in the walk).
        let on = model_states(&job(Method::Full, n, Engine::Zero(2), Offload::None));
        let ours = on.params_bytes + on.grads_bytes + on.optimizer_bytes;
        let ds = ds_zero2_gpu(P, n, false);
        let diff = ds as i128 - ours as i128;
        let expected = (2 * P) as i128 - (2 * P).div_ceil(n) as i128;
        assert!((diff - expected).abs() <= 2, "diff {diff} vs {expected}");
    }

    #[test]
    fn zero3_matches_deepspeed_estimator_up_to_documented_terms() {
        let n = 8;
        let check = |offload: Offload, opt: bool, params: bool| {
            let s = model_states(&job(Method::Full, n, Engine::Zero(3), offload));
            let ds = ds_zero3_gpu(P, EMB, n, opt, params);
            // DeepSpeed: 4 B × largest layer (16-bit param + grad); memplan: the gathered module
            // in 16 bit plus the prefetch bucket (compared separately). Without offload memplan
            // also keeps the 16-bit gradient partition (2P/N) beside the fp32 one during the step,
            // and holds the fp32 gradient of one 1e9-element sub-group at a time, not all 4P/N:
            // 8B / 8 GPUs = 1.004e9 elements per partition, so 4 × (P/8 − 1e9) B less.
            let ds_states = ds - 4 * EMB;
            let ours_states = s.params_bytes + s.grads_bytes + s.optimizer_bytes;
            let extra = if opt {
                0
            } else {
                (2 * P).div_ceil(n) as i128 - 4 * (P.div_ceil(n) as i128 - 1_000_000_000)
            };
            let diff = ours_states as i128 - ds_states as i128 - extra;
            assert!(diff.abs() <= 4, "{offload}: diff {diff}");
        };
        check(Offload::None, false, false);
        check(Offload::Optimizer, true, false);
        check(Offload::OptimizerParams, true, true);
        // The rule of thumb: ZeRO-3 ≈ 18·P/N + 4·largest layer.
        assert_eq!(ds_zero3_gpu(P, EMB, n, false, false), 4 * EMB + 18 * P / n);
    }

    #[test]
    fn fsdp_full_shard_divides_everything_and_gathers_two_layers_and_the_root() {
        let n = 4;
        let j = job(
            Method::Full,
            n,
            Engine::Fsdp(FsdpStrategy::FullShard),
            Offload::None,
        );
        let s = model_states(&j);
        // bf16 params, grads and AdamW states (torch AdamW keeps states in the param dtype).
        assert_eq!(s.params_bytes, (2 * P).div_ceil(n));
        assert_eq!(s.grads_bytes, (2 * P).div_ceil(n));
        assert_eq!(s.optimizer_bytes, (4 * P).div_ceil(n));
        // Root = embedding + lm_head + final norm (untied 8B); one layer = (P − root)/32, ×2 B.
        let root = 2 * EMB + 4096;
        let layer = (P - root) / 32;
        assert_eq!(s.gathered_bytes, 2 * root + 2 * 2 * layer);
        // HYBRID_SHARD over 2 nodes shards within a node only.
        let mut h = job(
            Method::Full,
            8,
            Engine::Fsdp(FsdpStrategy::HybridShard),
            Offload::None,
        );
        h.sharding.as_mut().unwrap().nodes = 2;
        assert_eq!(model_states(&h).params_bytes, (2 * P).div_ceil(4));
    }

    #[test]
    fn fsdp2_walk_holds_buffers_as_fully_shard_does() {
        // Root 100 B, layers 10 B, 4 ranks, bf16 gradients reduced in fp32, fp32 shards.
        let u = FsdpUnits {
            version: 2,
            root: 100,
            layer: 10,
            layers: 2,
            reshard_after_forward: true,
            root_reshard_after_forward: false,
            grad_elem: 2,
            reduce_elem: 4,
            shard_elem: 4,
            shards: 4,
            grads_on_gpu: true,
        };
        let w = FsdpWalk::new(&u);
        let mut t = Timeline::new();
        t.phase(super::super::timeline::Phase::Forward);
        let g = |t: &Timeline| t.live(Category::GatheredParams);
        w.forward_start(&mut t);
        assert_eq!(g(&t), 200); // all-gather buffer (held) + the root's copy
        w.layer_forward_pre(&mut t);
        assert_eq!(g(&t), 120); // root + layer 0's buffer and copy
        assert_eq!(t.peak(), 210); // both buffers for a moment
        w.layer_forward_post(&mut t);
        w.layer_forward_pre(&mut t);
        w.layer_forward_post(&mut t);
        assert_eq!(g(&t), 110); // root + the last buffer
        w.forward_end(&mut t);
        w.backward_start(&mut t);
        assert_eq!(g(&t), 110); // root + last layer prefetched
        w.root_grad(&mut t, 40);
        w.layer_backward_pre(&mut t, false);
        assert_eq!(g(&t), 120); // root + layer 1 + layer 0 prefetched
        w.layer_grad(&mut t, 8);
        w.layer_backward_post(&mut t);
        // Layer 1: fp32 reduce-scatter input (16 B) held; its fp32 shard 8·4/2/4 = 4 B kept.
        assert_eq!(t.live(Category::CommBuckets), 16);
        assert_eq!(t.live(Category::Gradients), 40 + 4);
        w.layer_backward_pre(&mut t, true);
        assert_eq!(g(&t), 110); // nothing to prefetch before layer 0
        w.layer_grad(&mut t, 8);
        w.layer_backward_post(&mut t);
        w.backward_end(&mut t);
        // Root: 40 B bf16 → 80 B fp32 input beside the 40 B gradient, then a 20 B shard.
        assert_eq!(g(&t), 0);
        assert_eq!(t.live(Category::CommBuckets), 0);
        assert_eq!(t.live(Category::Gradients), 4 + 4 + 20);
    }

    #[test]
    fn one_gpu_without_sharding_is_the_single_gpu_estimate() {
        for method in [Method::Full, Method::Lora, Method::Qlora] {
            let mut a = Job::new(resolve_model("llama-3.2-1b").unwrap().0, method);
            a.seq = 512;
            let mut b = a.clone();
            b.sharding = Some(Sharding::new(1, Engine::Fsdp(FsdpStrategy::ShardGradOp)));
            let (ea, eb) = (estimate(&a).unwrap(), estimate(&b).unwrap());
            // FSDP at N = 1 only adds its gathered copies and reduce buffers, phase by phase
            // (the allocator's block rounding of the peak may differ either way).
            for (pa, pb) in ea.phases.iter().zip(&eb.phases) {
                assert!(pb.bytes >= pa.bytes, "{method} {}", pa.phase);
            }
            assert_eq!(ea.cpu_offload_bytes.0, 0);
        }
    }

    #[test]
    fn more_gpus_never_need_more_memory_per_gpu() {
        for engine in [
            Engine::Zero(1),
            Engine::Zero(2),
            Engine::Zero(3),
            Engine::Fsdp(FsdpStrategy::FullShard),
        ] {
            let mut last = u128::MAX;
            for n in [1, 2, 4, 8, 16, 64] {
                let e = estimate(&job(Method::Full, n, engine, Offload::None)).unwrap();
                assert!(e.peak_allocated_bytes.0 <= last, "{engine} at {n}");
                last = e.peak_allocated_bytes.0;
            }
        }
    }

    #[test]
    fn offload_reports_cpu_memory_per_node() {
        let e = estimate(&job(
            Method::Full,
            8,
            Engine::Zero(3),
            Offload::OptimizerParams,
        ))
        .unwrap();
        // Per node of 8 GPUs: 16-bit params 2P + master/Adam 12P + fp32 grads 4P + 16-bit grads
        // 2P = 20 B/param, up to the rounding of 8 partitions.
        let diff = e.cpu_offload_bytes.0 as i128 - (20 * P) as i128;
        assert!(diff.abs() <= 64, "{diff}");
        assert_eq!(e.component("weights").unwrap().bytes.0, 0);
    }

    #[test]
    fn invalid_layouts_are_explained() {
        let bad = |s: Sharding| s.validate().unwrap_err().to_string();
        assert!(bad(Sharding::new(0, Engine::Zero(2))).contains("--gpus"));
        let mut s = Sharding::new(4, Engine::Zero(2));
        s.offload = Offload::OptimizerParams;
        assert!(bad(s).contains("--zero 3"));
        let mut s = Sharding::new(4, Engine::Fsdp(FsdpStrategy::FullShard));
        s.offload = Offload::Optimizer;
        assert!(bad(s).contains("optimizer+params"));
        let mut s = Sharding::new(6, Engine::Zero(3));
        s.nodes = 4;
        assert!(bad(s).contains("multiple"));
        let one = Sharding::new(1, Engine::Zero(3));
        assert!(one.validate().is_ok());
        assert!(one.advice().unwrap().contains("saves nothing"));
    }
}
