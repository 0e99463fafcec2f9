//! `--emit deepspeed|accelerate`: the engine configuration for a planned job, so what was
//! estimated is what runs.
//!
//! - DeepSpeed `ds_config.json` (DeepSpeed config docs: `train_batch_size` =
//!   `train_micro_batch_size_per_gpu` × `gradient_accumulation_steps` × data-parallel ranks, which
//!   DeepSpeed asserts at start-up; `zero_optimization.stage`, `offload_optimizer`,
//!   `offload_param`, `reduce_bucket_size`, `stage3_prefetch_bucket_size`; `bf16.enabled`).
//!   The optimizer is the plan's: under the HF Trainer an `optimizer` block in the file replaces
//!   the Trainer's own optimizer (transformers 5.17 `integrations/deepspeed.py`
//!   `deepspeed_optim_sched`: `DummyOptim` when `"optimizer" in config`, else
//!   `trainer.create_optimizer()` with `zero_allow_untested_optimizer`). So the block is written
//!   only for AdamW (DeepSpeed's fused Adam, or `DeepSpeedCPUAdam` with offload: the step
//!   memplan models for ZeRO); for any other optimizer it is left out and the file says which
//!   `--optim` to pass. Its hyper-parameters are `"auto"`, which only the HF Trainer / accelerate
//!   fill (`HfTrainerDeepSpeedConfig.trainer_config_process`); `deepspeed.initialize` given the
//!   file directly keeps the strings and fails at the first `engine.step()`. The file says so in
//!   a top-level `"_memplan"` entry (DeepSpeed 0.19.8 ignores unknown top-level keys).
//! - accelerate FSDP config (the YAML `accelerate config` writes, accelerate 1.15
//!   `commands/config/cluster.py`): `distributed_type: FSDP` and an `fsdp_config` mapping. With
//!   `fsdp_version: 2` (the default here, `--fsdp-version`) accelerate ignores
//!   `fsdp_sharding_strategy` and takes the strategy from `fsdp_reshard_after_forward` (a bool:
//!   `false` is `SHARD_GRAD_OP`, `utils/dataclasses.py` `FullyShardedDataParallelPlugin`), and
//!   hybrid sharding from its parallelism config (`parallelism_config_dp_replicate_size` nodes ×
//!   `parallelism_config_dp_shard_size` GPUs per node); backward/forward prefetch,
//!   `sync_module_states` and `use_orig_params` are FSDP1-only. With `fsdp_version: 1` the
//!   strategy is the `ShardingStrategy` name, written as both `fsdp_reshard_after_forward`
//!   (what `accelerate config` writes) and `fsdp_sharding_strategy`: `accelerate launch` always
//!   exports `FSDP_SHARDING_STRATEGY` (default `FULL_SHARD`, `commands/launch.py`), which the
//!   FSDP1 plugin then prefers (checked with `tests/reference/check_emitted.py`). Multi-node files
//!   carry `main_process_ip` / `main_process_port` placeholders and say to set `machine_rank`
//!   per node. accelerate's file has no batch fields: micro-batch and gradient accumulation are
//!   written as a comment for the training script. The YAML is written by hand (serde_yaml is
//!   unmaintained); every scalar is a number, a boolean or a quoted string, so no value can be
//!   misread (YAML 1.1 reads a bare `no` as false).

use serde_json::json;

use crate::dtype::Precision;
use crate::error::Error;
use crate::estimate::sharding::{Engine, FsdpStrategy, Offload};
use crate::method::{Job, Optimizer};

/// Micro-batch, gradient accumulation and global batch of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub micro_batch: u128,
    pub grad_accum: u128,
    pub gpus: u128,
}

impl Batching {
    pub fn global(&self) -> u128 {
        self.micro_batch * self.grad_accum * self.gpus
    }
}

/// Gradient accumulation reaching `global_batch` sequences exactly (1 without a target).
pub fn batching(job: &Job, global_batch: Option<u128>) -> Result<Batching, Error> {
    let gpus = job.sharding.as_ref().map_or(1, |s| s.gpus);
    let per_step = job.batch * gpus;
    let grad_accum = match global_batch {
        None => 1,
        Some(0) => {
            return Err(Error::Unsupported(
                "--global-batch must be at least 1 sequence".into(),
            ))
        }
        Some(g) if g % per_step != 0 => {
            let lo = (g / per_step).max(1) * per_step;
            return Err(Error::Unsupported(format!(
                "--global-batch {g} is not a multiple of --batch {} × --gpus {gpus} = {per_step}; use {lo} or {}",
                job.batch,
                lo + per_step
            )));
        }
        Some(g) => g / per_step,
    };
    Ok(Batching {
        micro_batch: job.batch,
        grad_accum,
        gpus,
    })
}

/// A DeepSpeed `ds_config.json` for `job` (needs `--zero`).
pub fn deepspeed_config(job: &Job, global_batch: Option<u128>) -> Result<String, Error> {
    let sh = job.sharding.as_ref().ok_or_else(|| {
        Error::Unsupported("--emit deepspeed needs --zero 0|1|2|3 (and --gpus)".into())
    })?;
    let Engine::Zero(stage) = sh.engine else {
        return Err(Error::Unsupported(
            "--emit deepspeed describes a DeepSpeed ZeRO plan; with --fsdp use --emit accelerate"
                .into(),
        ));
    };
    let b = batching(job, global_batch)?;
    let mut zero = json!({
        "stage": stage,
        "overlap_comm": true,
        "contiguous_gradients": true,
        "reduce_bucket_size": u64::try_from(sh.reduce_bucket).unwrap_or(u64::MAX),
    });
    if stage == 3 {
        zero["stage3_prefetch_bucket_size"] =
            json!(u64::try_from(sh.prefetch_bucket).unwrap_or(u64::MAX));
        zero["stage3_gather_16bit_weights_on_model_save"] = json!(true);
    }
    if sh.offload != Offload::None {
        zero["offload_optimizer"] = json!({"device": "cpu", "pin_memory": true});
    }
    if sh.offload == Offload::OptimizerParams {
        zero["offload_param"] = json!({"device": "cpu", "pin_memory": true});
    }
    let optimizer = deepspeed_optimizer(job.optimizer, sh.offload != Offload::None)?;
    let mut doc = json!({
        "train_batch_size": u64::try_from(b.global()).unwrap_or(u64::MAX),
        "train_micro_batch_size_per_gpu": u64::try_from(b.micro_batch).unwrap_or(u64::MAX),
        "gradient_accumulation_steps": u64::try_from(b.grad_accum).unwrap_or(u64::MAX),
        "bf16": {"enabled": job.compute == Precision::Bf16},
        "fp16": {"enabled": job.compute == Precision::Fp16, "loss_scale": 0},
        "zero_optimization": zero,
        "gradient_clipping": 1.0,
        "steps_per_print": 100,
        "wall_clock_breakdown": false
    });
    let launcher = match optimizer {
        DsOptimizer::Block => {
            doc["optimizer"] = json!({
                "type": "AdamW",
                "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
            });
            "for the HF Trainer (--deepspeed ds_config.json) or accelerate launch, which fill the \"auto\" optimizer values from the training arguments; with deepspeed.initialize(config=...) replace each \"auto\" by a number"
        }
        DsOptimizer::Trainer(_) => {
            "for the HF Trainer (--deepspeed ds_config.json) or accelerate launch; with deepspeed.initialize pass the optimizer as optimizer=..."
        }
    };
    let optimizer_note =
        match optimizer {
            DsOptimizer::Block => format!(
            "{}: the optimizer block (DeepSpeed's fused AdamW{}) replaces the Trainer's --optim",
            job.optimizer,
            if sh.offload != Offload::None { "; DeepSpeedCPUAdam with offload" } else { "" }
        ),
            DsOptimizer::Trainer(optim) => format!(
                "{}: no optimizer block, so the Trainer's own optimizer runs: pass --optim {optim}",
                job.optimizer
            ),
        };
    doc["_memplan"] = json!({
        "launcher": launcher,
        "optimizer": optimizer_note,
        "plan": format!("{} {} on {} GPU(s), {} node(s)", job.model.name.replace('\n', " "), job.method, sh.gpus, sh.nodes),
    });
    serde_json::to_string_pretty(&doc)
        .map(|s| s + "\n")
        .map_err(|e| Error::Unsupported(format!("cannot write ds_config.json: {e}")))
}

/// How a ds_config carries the plan's optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DsOptimizer {
    /// An `"optimizer": {"type": "AdamW"}` block: DeepSpeed's own (fused / CPU) Adam.
    Block,
    /// No block: the HF Trainer's `--optim <name>` (transformers `OptimizerNames`).
    Trainer(&'static str),
}

/// The optimizer a ds_config should carry for `optimizer`, or why DeepSpeed cannot run it.
fn deepspeed_optimizer(optimizer: Optimizer, offload: bool) -> Result<DsOptimizer, Error> {
    let trainer = match optimizer {
        Optimizer::Adamw | Optimizer::AdamwFused => return Ok(DsOptimizer::Block),
        Optimizer::Adamw8bit => "adamw_bnb_8bit",
        Optimizer::PagedAdamw => "paged_adamw_32bit",
        Optimizer::PagedAdamw8bit => "paged_adamw_8bit",
        Optimizer::Sgd => "sgd",
        Optimizer::SgdMomentum => "sgd --optim_args momentum=0.9",
        Optimizer::Adafactor => "adafactor",
    };
    if offload {
        // DeepSpeed engine `_configure_zero_optimizer`: ZeRO-Offload steps the fp32 partition on
        // the CPU with DeepSpeedCPUAdam; a client optimizer there is refused unless
        // `zero_force_ds_cpu_optimizer: false`, and bitsandbytes' optimizers need CUDA tensors.
        return Err(Error::Unsupported(format!(
            "--emit deepspeed with --offload steps the optimizer on the CPU with DeepSpeedCPUAdam (fp32 Adam states), not --optimizer {optimizer}: use --optimizer adamw, or drop --offload"
        )));
    }
    Ok(DsOptimizer::Trainer(trainer))
}

/// The transformers decoder-layer class FSDP wraps for `model_type`.
pub fn decoder_layer_class(model_type: &str) -> String {
    match model_type {
        "llama" => "LlamaDecoderLayer".into(),
        "mistral" => "MistralDecoderLayer".into(),
        "mixtral" => "MixtralDecoderLayer".into(),
        "qwen2" => "Qwen2DecoderLayer".into(),
        "qwen3" => "Qwen3DecoderLayer".into(),
        other => {
            // transformers' convention: CamelCase model type + "DecoderLayer".
            let mut out = String::new();
            for part in other.split(['_', '-']) {
                let mut c = part.chars();
                if let Some(f) = c.next() {
                    out.extend(f.to_uppercase());
                    out.push_str(c.as_str());
                }
            }
            out + "DecoderLayer"
        }
    }
}

/// An accelerate FSDP config (YAML) for `job` (needs `--fsdp`).
pub fn accelerate_config(job: &Job, global_batch: Option<u128>) -> Result<String, Error> {
    let sh = job.sharding.as_ref().ok_or_else(|| {
        Error::Unsupported(
            "--emit accelerate needs --fsdp full-shard|shard-grad-op|hybrid-shard (and --gpus)"
                .into(),
        )
    })?;
    let Engine::Fsdp(strategy) = sh.engine else {
        return Err(Error::Unsupported(
            "--emit accelerate writes an FSDP config; with --zero use --emit deepspeed".into(),
        ));
    };
    let b = batching(job, global_batch)?;
    let mixed = match job.compute {
        Precision::Bf16 => "bf16",
        Precision::Fp16 => "fp16",
        _ => "no",
    };
    let class = decoder_layer_class(&job.model.model_type);
    // Only [A-Za-z0-9_] reaches a quoted scalar, so single quotes need no escaping.
    debug_assert!(class.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    let yn = |b: bool| if b { "true" } else { "false" };
    let offload = yn(sh.offload == Offload::OptimizerParams);
    let ckpt = yn(job.grad_checkpointing);
    // The fsdp_config block, keys in the order `accelerate config` writes them.
    let fsdp = if sh.fsdp_version == 1 {
        format!(
            "  fsdp_activation_checkpointing: {ckpt}
  fsdp_auto_wrap_policy: 'TRANSFORMER_BASED_WRAP'
  fsdp_backward_prefetch: 'BACKWARD_PRE'
  fsdp_cpu_ram_efficient_loading: true
  fsdp_forward_prefetch: false
  fsdp_offload_params: {offload}
  fsdp_reshard_after_forward: '{strategy}'
  fsdp_sharding_strategy: '{strategy}'
  fsdp_state_dict_type: 'SHARDED_STATE_DICT'
  fsdp_sync_module_states: true
  fsdp_transformer_layer_cls_to_wrap: '{class}'
  fsdp_use_orig_params: true
  fsdp_version: 1
",
            strategy = strategy.torch_name(),
        )
    } else {
        format!(
            "  fsdp_activation_checkpointing: {ckpt}
  fsdp_auto_wrap_policy: 'TRANSFORMER_BASED_WRAP'
  fsdp_cpu_ram_efficient_loading: true
  fsdp_offload_params: {offload}
  fsdp_reshard_after_forward: {reshard}
  fsdp_state_dict_type: 'SHARDED_STATE_DICT'
  fsdp_transformer_layer_cls_to_wrap: '{class}'
  fsdp_version: 2
",
            reshard = yn(strategy != FsdpStrategy::ShardGradOp),
        )
    };
    // FSDP2 hybrid sharding: a 2-D mesh, replicated over nodes and sharded within one
    // (accelerate `ParallelismConfig`, `commands/launch.py` `parallelism_config_*`).
    let parallelism = if sh.fsdp_version == 2 && strategy == FsdpStrategy::HybridShard {
        format!(
            "parallelism_config:
  parallelism_config_dp_replicate_size: {nodes}
  parallelism_config_dp_shard_size: {per_node}
",
            nodes = sh.nodes,
            per_node = sh.gpus_per_node(),
        )
    } else {
        String::new()
    };
    let multi_node = if sh.nodes > 1 {
        format!(
            "# {nodes} nodes: copy this file to every node and set machine_rank to 0 on the node at
# main_process_ip, 1 … {last} on the others (or pass --machine_rank N to accelerate launch);
# replace main_process_ip by node 0's address and check that main_process_port is free there.
",
            nodes = sh.nodes,
            last = sh.nodes - 1,
        )
    } else {
        String::new()
    };
    let rendezvous = if sh.nodes > 1 {
        "main_process_ip: 'NODE0_IP_OR_HOSTNAME'\nmain_process_port: 29500\n"
    } else {
        ""
    };
    let ckpt_note = if job.grad_checkpointing {
        "# Checkpointing is on here (fsdp_activation_checkpointing): do not also pass
# --gradient_checkpointing to the HF Trainer, which raises when both are set (transformers
# 5.17 trainer.py); a custom loop needs nothing more.
"
    } else {
        ""
    };
    let mp_note = if sh.fsdp_version == 2 && mixed != "no" {
        format!(
            "# mixed_precision '{mixed}': accelerate builds MixedPrecisionPolicy(param_dtype={mixed},
# reduce_dtype={mixed}) from it (utils/dataclasses.py set_mixed_precision).
"
        )
    } else {
        String::new()
    };
    Ok(format!(
        "# accelerate FSDP{version} config written by memplan for {model} ({method}).
# Per GPU: micro-batch {micro}; gradient accumulation {ga}; global batch {global} sequences
# over {gpus} GPU(s) (pass --per_device_train_batch_size {micro} --gradient_accumulation_steps {ga}).
{multi_node}{ckpt_note}{mp_note}compute_environment: 'LOCAL_MACHINE'
debug: false
distributed_type: 'FSDP'
downcast_bf16: 'no'
fsdp_config:
{fsdp}machine_rank: 0
{rendezvous}main_training_function: 'main'
mixed_precision: '{mixed}'
num_machines: {nodes}
num_processes: {gpus}
{parallelism}rdzv_backend: 'static'
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: false
",
        version = sh.fsdp_version,
        model = job.model.name.replace('\n', " "),
        method = job.method,
        micro = b.micro_batch,
        ga = b.grad_accum,
        global = b.global(),
        gpus = sh.gpus,
        nodes = sh.nodes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::sharding::Sharding;
    use crate::method::Method;
    use crate::model::resolve_model;

    fn job(engine: Engine, gpus: u128, batch: u128) -> Job {
        let mut j = Job::new(resolve_model("llama-3.1-8b").unwrap().0, Method::Full);
        j.batch = batch;
        j.sharding = Some(Sharding::new(gpus, engine));
        j
    }

    #[test]
    fn deepspeed_config_reaches_the_global_batch() {
        let mut j = job(Engine::Zero(3), 8, 4);
        j.sharding.as_mut().unwrap().offload = Offload::Optimizer;
        let text = deepspeed_config(&j, Some(256)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        // 256 = 4 per GPU × 8 GPUs × 8 accumulation steps.
        assert_eq!(v["train_micro_batch_size_per_gpu"], 4);
        assert_eq!(v["gradient_accumulation_steps"], 8);
        assert_eq!(v["train_batch_size"], 256);
        assert_eq!(v["zero_optimization"]["stage"], 3);
        assert_eq!(v["zero_optimization"]["offload_optimizer"]["device"], "cpu");
        assert!(v["zero_optimization"].get("offload_param").is_none());
        assert_eq!(v["bf16"]["enabled"], true);
        let e = deepspeed_config(&j, Some(100)).unwrap_err().to_string();
        assert!(e.contains("multiple of --batch 4 × --gpus 8 = 32"), "{e}");
        assert!(deepspeed_config(&job(Engine::Fsdp(FsdpStrategy::FullShard), 8, 1), None).is_err());
    }

    #[test]
    fn deepspeed_carries_the_plans_optimizer_or_none() {
        let mut j = job(Engine::Zero(3), 8, 1);
        let v: serde_json::Value =
            serde_json::from_str(&deepspeed_config(&j, None).unwrap()).unwrap();
        assert_eq!(v["optimizer"]["type"], "AdamW");
        assert!(v["_memplan"]["launcher"]
            .as_str()
            .unwrap()
            .contains("HF Trainer"));
        // An 8-bit plan leaves the block out, so the Trainer's --optim runs what was budgeted.
        j.optimizer = Optimizer::Adamw8bit;
        let text = deepspeed_config(&j, None).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v.get("optimizer").is_none());
        assert!(!text.contains("\"auto\""));
        assert!(v["_memplan"]["optimizer"]
            .as_str()
            .unwrap()
            .contains("--optim adamw_bnb_8bit"));
        // ZeRO-Offload steps with DeepSpeedCPUAdam: an 8-bit plan cannot be offloaded.
        j.sharding.as_mut().unwrap().offload = Offload::Optimizer;
        let e = deepspeed_config(&j, None).unwrap_err().to_string();
        assert!(e.contains("DeepSpeedCPUAdam"), "{e}");
    }

    #[test]
    fn accelerate_fsdp2_keeps_the_strategy() {
        let y = |strategy, nodes, version| {
            let mut j = job(Engine::Fsdp(strategy), 16, 1);
            j.sharding.as_mut().unwrap().nodes = nodes;
            j.sharding.as_mut().unwrap().fsdp_version = version;
            accelerate_config(&j, None).unwrap()
        };
        let full = y(FsdpStrategy::FullShard, 1, 2);
        assert!(full.contains("  fsdp_version: 2\n"));
        assert!(full.contains("  fsdp_reshard_after_forward: true\n"));
        assert!(!full.contains("fsdp_sharding_strategy"));
        assert!(!full.contains("fsdp_backward_prefetch"));
        assert!(!full.contains("main_process_ip"));
        let sgo = y(FsdpStrategy::ShardGradOp, 1, 2);
        assert!(sgo.contains("  fsdp_reshard_after_forward: false\n"));
        let hybrid = y(FsdpStrategy::HybridShard, 2, 2);
        assert!(hybrid.contains("  parallelism_config_dp_replicate_size: 2\n"));
        assert!(hybrid.contains("  parallelism_config_dp_shard_size: 8\n"));
        assert!(hybrid.contains("main_process_ip: "));
        assert!(hybrid.contains("main_process_port: 29500\n"));
        assert!(hybrid.contains("set machine_rank to 0"));
        let v1 = y(FsdpStrategy::HybridShard, 2, 1);
        assert!(v1.contains("  fsdp_reshard_after_forward: 'HYBRID_SHARD'\n"));
        assert!(v1.contains("  fsdp_version: 1\n"));
        assert!(v1.contains("  fsdp_sharding_strategy: 'HYBRID_SHARD'\n"));
        assert!(!v1.contains("parallelism_config"));
    }

    #[test]
    fn accelerate_config_names_the_strategy_and_layer() {
        let mut j = job(Engine::Fsdp(FsdpStrategy::HybridShard), 16, 2);
        j.sharding.as_mut().unwrap().nodes = 2;
        j.grad_checkpointing = true;
        let y = accelerate_config(&j, Some(64)).unwrap();
        assert!(y.contains("parallelism_config_dp_replicate_size: 2"));
        assert!(y.contains("fsdp_transformer_layer_cls_to_wrap: 'LlamaDecoderLayer'"));
        assert!(y.contains("num_machines: 2\n"));
        assert!(y.contains("num_processes: 16\n"));
        assert!(y.contains("fsdp_activation_checkpointing: true"));
        assert!(y.contains("do not also pass\n# --gradient_checkpointing"));
        assert!(y.contains("gradient accumulation 2"));
        assert_eq!(decoder_layer_class("gpt_neox"), "GptNeoxDecoderLayer");
    }
}
