//! axolotl YAML. Keys and defaults from axolotl 0.18.0 (commit 067b021c, 2026-07-24):
//! `src/axolotl/utils/schemas/{config,training,peft,model}.py` (the pydantic schema) and
//! `src/axolotl/loaders/{model,adapter}.py` (what loading does with them).

use crate::dtype::Precision;
use crate::error::Error;
use crate::method::{Attention, Loss, Method};

use super::{hf_optimizer, lora_targets, Reader, Resolved, Source};

const SCHEMA: &str = "axolotl 0.18.0";

/// Keys that change memory but that memplan does not model, and what it does instead.
const UNMODELLED: &[(&str, &str)] = &[
    ("deepspeed", "sharding is not read from the file: pass --gpus and --zero"),
    ("fsdp", "sharding is not read from the file: pass --gpus and --fsdp"),
    ("fsdp_config", "sharding is not read from the file: pass --gpus and --fsdp"),
    ("lora_modules_to_save", "fully trained copies of these modules are not counted"),
    ("peft_use_dora", "DoRA's magnitude vectors and weight-norm activations are not modelled"),
    ("lora_mlp_kernel", "axolotl's fused LoRA MLP autograd saves other tensors; estimated as plain peft LoRA"),
    ("lora_qkv_kernel", "axolotl's fused LoRA QKV autograd saves other tensors; estimated as plain peft LoRA"),
    ("lora_o_kernel", "axolotl's fused LoRA O autograd saves other tensors; estimated as plain peft LoRA"),
    ("tiled_mlp", "ALST tiled MLP is not modelled; estimated untiled"),
    ("sequence_parallel_degree", "sequence parallelism is not modelled; estimated on one GPU's full sequence"),
    ("context_parallel_size", "context parallelism is not modelled; estimated on one GPU's full sequence"),
    ("unfrozen_parameters", "partial unfreezing is not modelled; estimated as full fine-tuning"),
    ("gptq", "GPTQ bases are not modelled"),
    ("fp8", "FP8 training is not modelled; estimated in the 16-bit compute dtype"),
    ("lora_target_parameters", "LoRA on nn.Parameter targets (MoE experts) is not modelled"),
    ("peft_layers_to_transform", "LoRA on a subset of layers is not modelled; estimated on every layer"),
    ("chunked_cross_entropy", "axolotl's chunked cross-entropy is not modelled; estimated with the full-logits loss (an upper bound)"),
    ("relora", "ReLoRA is not modelled"),
    ("torch_compile", "torch.compile changes which tensors are saved; estimated eager"),
    ("xformers_attention", "xformers attention saves what SDPA's memory-efficient kernel saves; estimated as sdpa"),
    ("flex_attention", "flex attention is not modelled; estimated as sdpa"),
];

pub(crate) fn resolve(r: &Reader, out: &mut Resolved) -> Result<(), Error> {
    if let Some(m) = r.str("base_model")? {
        out.put(
            "model",
            |s| &mut s.model,
            m.to_string(),
            Source::Key(r.name("base_model")),
        );
    }

    // Method: `adapter` (peft.py: blank trains all parameters) with load_in_4bit / load_in_8bit.
    let four = r.bool("load_in_4bit")?.unwrap_or(false);
    let eight = r.bool("load_in_8bit")?.unwrap_or(false);
    let adapter = r.str("adapter")?;
    let method = match adapter {
        None => Method::Full,
        Some("qlora") => Method::Qlora,
        Some("lora") if four => Method::Qlora,
        Some("lora") => Method::Lora,
        Some(other) => {
            return Err(r.error(
                "adapter",
                format!(
                    "is '{other}'; memplan models lora and qlora (or no adapter: full fine-tuning)"
                ),
            ))
        }
    };
    let method_source = match adapter {
        Some(_) => Source::Key(r.name("adapter")),
        None => Source::Default(format!(
            "full fine-tuning: no `adapter` ({SCHEMA} schemas/peft.py)"
        )),
    };
    out.put("method", |s| &mut s.method, method, method_source);
    if method == Method::Qlora && !four {
        return Err(r.error(
            "load_in_4bit",
            "must be true with adapter: qlora (axolotl loads the NF4 base only then)",
        ));
    }

    // Batch and sequence (schemas/training.py micro_batch_size = 1; config.py sequence_len = 512).
    let batch = r.count("micro_batch_size")?;
    out.put(
        "batch",
        |s| &mut s.batch,
        batch.unwrap_or(1),
        batch.map_or(
            Source::Default(format!("micro_batch_size 1 ({SCHEMA} schemas/training.py)")),
            |_| Source::Key(r.name("micro_batch_size")),
        ),
    );
    let seq = r.count("sequence_len")?;
    out.put(
        "seq",
        |s| &mut s.seq,
        seq.unwrap_or(512),
        seq.map_or(
            Source::Default(format!("sequence_len 512 ({SCHEMA} schemas/config.py)")),
            |_| Source::Key(r.name("sequence_len")),
        ),
    );

    // Dtype: cfg.torch_dtype is bf16 when bf16 is on ("auto" by default: on where the GPU has
    // bf16, i.e. Ampere or newer), else fp16, else fp32; the model loads in it (loaders/model.py).
    let (dtype, dtype_source) = if r.truthy("bfloat16") {
        (Precision::Bf16, Source::Key(r.name("bfloat16")))
    } else if r.truthy("float16") {
        (Precision::Fp16, Source::Key(r.name("float16")))
    } else if r.truthy("fp16") {
        (Precision::Fp16, Source::Key(r.name("fp16")))
    } else {
        match r.get("bf16") {
            Some(serde_json::Value::Bool(false)) => (
                Precision::Fp32,
                Source::Key(format!("{} (no bf16/fp16: fp32)", r.name("bf16"))),
            ),
            Some(_) => (Precision::Bf16, Source::Key(r.name("bf16"))),
            None => (
                Precision::Bf16,
                Source::Default(format!(
                    "bf16: auto → bf16 on an Ampere or newer GPU ({SCHEMA} schemas/config.py)"
                )),
            ),
        }
    };
    if method != Method::Qlora {
        let weights = if eight { Precision::Int8 } else { dtype };
        let src = if eight {
            Source::Key(r.name("load_in_8bit"))
        } else {
            dtype_source.clone()
        };
        out.put("weights", |s| &mut s.weights, weights, src);
    }
    if method == Method::Qlora {
        out.put(
            "weights",
            |s| &mut s.weights,
            Precision::Nf4,
            Source::Key(r.name("load_in_4bit")),
        );
    }
    out.put("compute", |s| &mut s.compute, dtype, dtype_source);

    // LoRA: LoraConfig(r=cfg.lora_r, lora_dropout=cfg.lora_dropout, target_modules=…)
    // (loaders/adapter.py); lora_dropout defaults to 0.0 (schemas/peft.py).
    if method != Method::Full {
        let rank = r.count("lora_r")?.ok_or_else(|| {
            r.error(
                "lora_r",
                "is missing: axolotl passes it to peft's LoraConfig(r=…) as is",
            )
        })?;
        out.put("rank", |s| &mut s.rank, rank, Source::Key(r.name("lora_r")));
        let dropout = r.float("lora_dropout")?;
        out.put(
            "lora_dropout",
            |s| &mut s.lora_dropout,
            dropout.unwrap_or(0.0),
            dropout.map_or(
                Source::Default(format!("lora_dropout 0.0 ({SCHEMA} schemas/peft.py)")),
                |_| Source::Key(r.name("lora_dropout")),
            ),
        );
        let targets = if r.bool("lora_target_linear")?.unwrap_or(false) {
            Some((crate::method::all_linear(), "lora_target_linear"))
        } else if let Some(v) = r.get("lora_target_modules") {
            let (kinds, unknown) = lora_targets(v)
                .ok_or_else(|| r.error("lora_target_modules", "expected a list of module names"))?;
            for u in unknown {
                out.warn(format!("lora_target_modules: '{u}' is not a decoder Linear memplan models; not counted"));
            }
            Some((kinds, "lora_target_modules"))
        } else {
            None
        };
        let (kinds, key) = targets.ok_or_else(|| {
            r.error("lora_target_modules", "is missing (and lora_target_linear is not true): axolotl gives peft an empty target list")
        })?;
        if kinds.is_empty() {
            return Err(r.error(key, "selects no q/k/v/o/gate/up/down projection"));
        }
        out.put(
            "lora_targets",
            |s| &mut s.lora_targets,
            kinds,
            Source::Key(r.name(key)),
        );
    }
    if method == Method::Qlora {
        // loaders/model.py: bnb_4bit_use_double_quant True, nf4, overridable by bnb_config_kwargs.
        let kw = r.section("bnb_config_kwargs");
        let dq = match &kw {
            Some(k) => k
                .bool("bnb_4bit_use_double_quant")?
                .map(|v| (v, k.name("bnb_4bit_use_double_quant"))),
            None => None,
        };
        match dq {
            Some((v, key)) => out.put("double_quant", |s| &mut s.double_quant, v, Source::Key(key)),
            None => out.put(
                "double_quant",
                |s| &mut s.double_quant,
                true,
                Source::Default(format!(
                    "bnb_4bit_use_double_quant True ({SCHEMA} loaders/model.py)"
                )),
            ),
        }
        // prepare_model_for_kbit_training upcasts norms and embeddings to fp32, but with an
        // adapter axolotl casts them back to cfg.torch_dtype right after (loaders/model.py
        // _convert_embedding_modules_dtype, before_kbit_train_or_finetune=False).
        out.put(
            "kbit_prep",
            |s| &mut s.kbit_prep,
            false,
            Source::Default(format!("norms/embeddings cast back to the compute dtype after prepare_model_for_kbit_training ({SCHEMA} loaders/model.py)")),
        );
    }

    // Optimizer (schemas/training.py: adamw_torch_fused).
    let opt_name = r.str("optimizer")?;
    let opt = hf_optimizer(opt_name.unwrap_or("adamw_torch_fused")).ok_or_else(|| {
        r.error(
            "optimizer",
            format!(
                "is '{}'; memplan models adamw_torch, adamw_torch_fused, adamw_bnb_8bit, paged_adamw_32bit, paged_adamw_8bit, sgd, adafactor",
                opt_name.unwrap_or_default()
            ),
        )
    })?;
    out.put(
        "optimizer",
        |s| &mut s.optimizer,
        opt,
        opt_name.map_or(
            Source::Default(format!("adamw_torch_fused ({SCHEMA} schemas/training.py)")),
            |_| Source::Key(r.name("optimizer")),
        ),
    );

    // Gradient checkpointing: false | true | "offload" | "offload_disk" (schemas/config.py).
    let (ckpt, ckpt_offload) = match r.get("gradient_checkpointing") {
        None => (false, false),
        Some(serde_json::Value::Bool(b)) => (*b, false),
        Some(serde_json::Value::String(s)) if s == "offload" => (true, true),
        Some(serde_json::Value::String(s)) if s == "offload_disk" => {
            out.warn("gradient_checkpointing: offload_disk writes the checkpointed inputs to disk; counted as host RAM");
            (true, true)
        }
        Some(v) => {
            return Err(r.error(
                "gradient_checkpointing",
                format!("is {v}; expected true, false, offload or offload_disk"),
            ))
        }
    };
    out.put(
        "grad_checkpointing",
        |s| &mut s.grad_checkpointing,
        ckpt,
        if r.has("gradient_checkpointing") {
            Source::Key(r.name("gradient_checkpointing"))
        } else {
            Source::Default(format!("false ({SCHEMA} schemas/config.py)"))
        },
    );
    let act = match r.get("activation_offloading") {
        Some(serde_json::Value::String(s)) if s == "disk" => {
            out.warn("activation_offloading: disk writes activations to disk; counted as host RAM");
            true
        }
        _ => r.truthy("activation_offloading"),
    };
    let offload_key = if ckpt_offload {
        Some("gradient_checkpointing")
    } else if act {
        Some("activation_offloading")
    } else {
        None
    };
    out.put(
        "activation_offload",
        |s| &mut s.activation_offload,
        offload_key.is_some(),
        match offload_key {
            Some(k) => Source::Key(r.name(k)),
            None => Source::Default(format!("off ({SCHEMA} schemas/config.py)")),
        },
    );

    // Attention: attn_implementation, or the legacy flags normalize_attn_implementation maps.
    let (attention, key) = if let Some(a) = r.str("attn_implementation")? {
        let att = super::hf_attention(a).ok_or_else(|| {
            r.error(
                "attn_implementation",
                format!("is '{a}'; memplan models sdpa, eager and flash_attention_2"),
            )
        })?;
        (att, Some("attn_implementation"))
    } else if r.truthy("flash_attention") {
        (Attention::Flash, Some("flash_attention"))
    } else if r.truthy("eager_attention") {
        (Attention::Eager, Some("eager_attention"))
    } else if r.truthy("sdp_attention") {
        (Attention::Sdpa, Some("sdp_attention"))
    } else {
        (Attention::Sdpa, None)
    };
    out.put(
        "attention",
        |s| &mut s.attention,
        attention,
        key.map_or(
            Source::Default("sdpa (transformers' default attn_implementation)".into()),
            |k| Source::Key(r.name(k)),
        ),
    );

    let packing = r.bool("sample_packing")?;
    out.put(
        "packing",
        |s| &mut s.packing,
        packing.unwrap_or(false),
        packing.map_or(
            Source::Default(format!("off ({SCHEMA} schemas/config.py sample_packing)")),
            |_| Source::Key(r.name("sample_packing")),
        ),
    );
    // Packed rows under SDPA: `sdpa_varlen` (unset: on where supported — torch >= 2.10,
    // head_dim <= 256, no sliding window) routes them through
    // torch.nn.attention.varlen.varlen_attn with cu_seqlens, a flash kernel without a mask
    // (schemas/config.py); memplan models that as flash attention.
    if packing == Some(true)
        && attention == Attention::Sdpa
        && r.bool("sdpa_varlen")? != Some(false)
    {
        out.put(
            "attention",
            |s| &mut s.attention,
            Attention::Flash,
            Source::Default(format!(
                "sdpa + sample_packing → sdpa_varlen (varlen_attn, a flash kernel; needs head_dim <= 256 and no sliding window) ({SCHEMA} schemas/config.py)"
            )),
        );
        out.provenance
            .retain(|p| !(p.setting == "attention" && matches!(p.value.as_str(), "sdpa")));
    }

    // Loss: the Liger and CCE plugins replace the model's loss; otherwise transformers'
    // ForCausalLMLoss.
    let (loss, key) = if r.truthy("liger_fused_linear_cross_entropy") {
        (Loss::Liger, Some("liger_fused_linear_cross_entropy"))
    } else if r.truthy("cut_cross_entropy") {
        (Loss::Cce, Some("cut_cross_entropy"))
    } else {
        (Loss::Ce, None)
    };
    out.put(
        "loss",
        |s| &mut s.loss,
        loss,
        key.map_or(
            Source::Default("ce (transformers ForCausalLMLoss; no loss plugin)".into()),
            |k| Source::Key(r.name(k)),
        ),
    );
    let norm = r.truthy("liger_rms_norm");
    let glu = r.truthy("liger_glu_activation");
    if norm != glu {
        out.warn("liger_rms_norm / liger_glu_activation: memplan models the two Liger kernels together; estimated with both on");
    }
    if norm || glu {
        out.put(
            "liger_kernels",
            |s| &mut s.liger_kernels,
            true,
            Source::Key(r.name(if norm {
                "liger_rms_norm"
            } else {
                "liger_glu_activation"
            })),
        );
    }

    for (key, why) in UNMODELLED {
        if r.truthy(key) {
            out.warn(format!("{key}: {why}"));
        }
    }
    Ok(())
}
