//! `--emit deepspeed|accelerate`: the engine configuration for a planned job, so what was
//! estimated is what runs.
//!
//! - DeepSpeed `ds_config.json` (DeepSpeed config docs: `train_batch_size` =
//!   `train_micro_batch_size_per_gpu` × `gradient_accumulation_steps` × data-parallel ranks, which
//!   DeepSpeed asserts at start-up; `zero_optimization.stage`, `offload_optimizer`,
//!   `offload_param`, `reduce_bucket_size`, `stage3_prefetch_bucket_size`; `bf16.enabled`).
//!   The optimizer's hyper-parameters are `"auto"`, filled by the transformers / accelerate
//!   integration from the training arguments.
//! - accelerate FSDP config (the YAML `accelerate config` writes: `distributed_type: FSDP` and an
//!   `fsdp_config` mapping with `fsdp_sharding_strategy`, `fsdp_offload_params`,
//!   `fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP` with the decoder layer class,
//!   `fsdp_backward_prefetch: BACKWARD_PRE`, `fsdp_activation_checkpointing`). accelerate's file
//!   has no batch fields: micro-batch and gradient accumulation are written as a comment for the
//!   training script. The YAML is written by hand (serde_yaml is unmaintained); every scalar is
//!   a number, a boolean or a quoted string, so no value can be misread (YAML 1.1 reads a bare
//!   `no` as false).

use serde_json::json;

use crate::dtype::Precision;
use crate::error::Error;
use crate::estimate::sharding::{Engine, Offload};
use crate::method::Job;

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
    let doc = json!({
        "train_batch_size": u64::try_from(b.global()).unwrap_or(u64::MAX),
        "train_micro_batch_size_per_gpu": u64::try_from(b.micro_batch).unwrap_or(u64::MAX),
        "gradient_accumulation_steps": u64::try_from(b.grad_accum).unwrap_or(u64::MAX),
        "bf16": {"enabled": job.compute == Precision::Bf16},
        "fp16": {"enabled": job.compute == Precision::Fp16, "loss_scale": 0},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
        },
        "gradient_clipping": 1.0,
        "steps_per_print": 100,
        "wall_clock_breakdown": false
    });
    serde_json::to_string_pretty(&doc)
        .map(|s| s + "\n")
        .map_err(|e| Error::Unsupported(format!("cannot write ds_config.json: {e}")))
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
    Ok(format!(
        "# accelerate FSDP config written by memplan for {model} ({method}).
# Per GPU: micro-batch {micro}; gradient accumulation {ga}; global batch {global} sequences
# over {gpus} GPU(s) (pass --per_device_train_batch_size {micro} --gradient_accumulation_steps {ga}).
compute_environment: 'LOCAL_MACHINE'
debug: false
distributed_type: 'FSDP'
downcast_bf16: 'no'
fsdp_config:
  fsdp_activation_checkpointing: {ckpt}
  fsdp_auto_wrap_policy: 'TRANSFORMER_BASED_WRAP'
  fsdp_backward_prefetch: 'BACKWARD_PRE'
  fsdp_cpu_ram_efficient_loading: true
  fsdp_forward_prefetch: false
  fsdp_offload_params: {offload}
  fsdp_sharding_strategy: '{strategy}'
  fsdp_state_dict_type: 'SHARDED_STATE_DICT'
  fsdp_sync_module_states: true
  fsdp_transformer_layer_cls_to_wrap: '{class}'
  fsdp_use_orig_params: true
machine_rank: 0
main_training_function: 'main'
mixed_precision: '{mixed}'
num_machines: {nodes}
num_processes: {gpus}
rdzv_backend: 'static'
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: false
",
        model = job.model.name.replace('\n', " "),
        method = job.method,
        micro = b.micro_batch,
        ga = b.grad_accum,
        global = b.global(),
        gpus = sh.gpus,
        ckpt = yn(job.grad_checkpointing),
        offload = yn(sh.offload == Offload::OptimizerParams),
        strategy = strategy.torch_name(),
        nodes = sh.nodes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::sharding::{FsdpStrategy, Sharding};
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
    fn accelerate_config_names_the_strategy_and_layer() {
        let mut j = job(Engine::Fsdp(FsdpStrategy::HybridShard), 16, 2);
        j.sharding.as_mut().unwrap().nodes = 2;
        j.grad_checkpointing = true;
        let y = accelerate_config(&j, Some(64)).unwrap();
        assert!(y.contains("fsdp_sharding_strategy: 'HYBRID_SHARD'"));
        assert!(y.contains("fsdp_transformer_layer_cls_to_wrap: 'LlamaDecoderLayer'"));
        assert!(y.contains("num_machines: 2\n"));
        assert!(y.contains("num_processes: 16\n"));
        assert!(y.contains("fsdp_activation_checkpointing: true"));
        assert!(y.contains("gradient accumulation 2"));
        assert_eq!(decoder_layer_class("gpt_neox"), "GptNeoxDecoderLayer");
    }
}
