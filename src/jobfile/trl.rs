//! TRL `SFTConfig` / transformers `TrainingArguments` files (YAML for `trl sft --config`, or
//! JSON), with TRL's `ModelConfig` keys and nested peft `LoraConfig` / transformers
//! `BitsAndBytesConfig` sections. Defaults from:
//! - TRL 1.10.0.dev0 (commit f2cd5771, 2026-07-24): `trl/trainer/sft_config.py` (loss_type
//!   None → "chunked_nll", or "nll" with use_liger_kernel; max_length 1024; packing,
//!   padding_free, activation_offloading false), `trl/trainer/base_config.py`
//!   (gradient_checkpointing True; bf16 True unless fp16), `trl/trainer/model_config.py`
//!   (dtype "float32", lora_r 16, lora_dropout 0.05, lora_target_modules None, load_in_4bit,
//!   use_bnb_nested_quant False), `trl/trainer/utils.py` `get_quantization_config`
//!   (bnb_4bit_compute_dtype = dtype);
//! - transformers 5.17 `training_args.py` (per_device_train_batch_size 8, optim
//!   adamw_torch_fused on torch >= 2.8), `utils/quantization_config.py` BitsAndBytesConfig
//!   (bnb_4bit_use_double_quant False);
//! - peft 0.21 `LoraConfig` (r 8, lora_dropout 0.0; target_modules None → the model type's
//!   default from `utils/constants.py`, q_proj and v_proj for every architecture memplan
//!   models).

use crate::dtype::Precision;
use crate::error::Error;
use crate::method::{Attention, Loss, Method};
use crate::model::LinearKind;

use super::{hf_attention, hf_optimizer, lora_targets, torch_dtype, Reader, Resolved, Source};

const TRL: &str = "TRL 1.10.0.dev0";
const TF: &str = "transformers 5.17";

const UNMODELLED: &[(&str, &str)] = &[
    (
        "deepspeed",
        "sharding is not read from the file: pass --gpus and --zero",
    ),
    (
        "fsdp",
        "sharding is not read from the file: pass --gpus and --fsdp",
    ),
    (
        "fsdp_config",
        "sharding is not read from the file: pass --gpus and --fsdp",
    ),
    (
        "use_dora",
        "DoRA's magnitude vectors and weight-norm activations are not modelled",
    ),
    (
        "lora_modules_to_save",
        "fully trained copies of these modules are not counted",
    ),
    (
        "torch_compile",
        "torch.compile changes which tensors are saved; estimated eager",
    ),
    (
        "lora_target_parameters",
        "LoRA on nn.Parameter targets (MoE experts) is not modelled",
    ),
];

pub(crate) fn resolve(r: &Reader, out: &mut Resolved) -> Result<(), Error> {
    let init = r.section("model_init_kwargs");
    for key in ["model_name_or_path", "model"] {
        if let Some(m) = r.str(key)? {
            out.put(
                "model",
                |s| &mut s.model,
                m.to_string(),
                Source::Key(r.name(key)),
            );
            break;
        }
    }

    // Quantization: ModelConfig's load_in_4bit / load_in_8bit, or a BitsAndBytesConfig section.
    let bnb = r
        .section("quantization_config")
        .or_else(|| r.section("bnb_config"))
        .or_else(|| init.as_ref().and_then(|i| i.section("quantization_config")));
    let four = r.bool("load_in_4bit")?.unwrap_or(false)
        || bnb
            .as_ref()
            .map(|b| b.bool("load_in_4bit"))
            .transpose()?
            .flatten()
            .unwrap_or(false);
    let eight = r.bool("load_in_8bit")?.unwrap_or(false)
        || bnb
            .as_ref()
            .map(|b| b.bool("load_in_8bit"))
            .transpose()?
            .flatten()
            .unwrap_or(false);
    let lora_section = r
        .section("peft_config")
        .or_else(|| r.section("lora_config"));
    let use_peft = r.bool("use_peft")?.unwrap_or(false) || lora_section.is_some();
    let method = match (use_peft, four, eight) {
        (false, false, false) => Method::Full,
        (false, _, _) => return Err(r.error(
            if four { "load_in_4bit" } else { "load_in_8bit" },
            "quantizes the base, which trains only with use_peft: true (or a peft_config section)",
        )),
        (true, true, _) => Method::Qlora,
        (true, false, _) => Method::Lora,
    };
    let msrc = match (use_peft, four || eight) {
        (false, _) => Source::Default(format!(
            "full: use_peft false ({TRL} trainer/model_config.py)"
        )),
        (true, false) => Source::Key(if r.has("use_peft") {
            r.name("use_peft")
        } else {
            "peft_config".into()
        }),
        (true, true) => Source::Key(format!(
            "use_peft + {}",
            if four { "load_in_4bit" } else { "load_in_8bit" }
        )),
    };
    out.put("method", |s| &mut s.method, method, msrc);

    let batch = r.count("per_device_train_batch_size")?;
    out.put(
        "batch",
        |s| &mut s.batch,
        batch.unwrap_or(8),
        batch.map_or(
            Source::Default(format!(
                "per_device_train_batch_size 8 ({TF} training_args.py)"
            )),
            |_| Source::Key(r.name("per_device_train_batch_size")),
        ),
    );
    let (seq, key) = match r.count("max_length")? {
        Some(s) => (s, Some("max_length")),
        None => match r.count("max_seq_length")? {
            Some(s) => (s, Some("max_seq_length")),
            None => (1024, None),
        },
    };
    out.put(
        "seq",
        |s| &mut s.seq,
        seq,
        key.map_or(
            Source::Default(format!("max_length 1024 ({TRL} trainer/sft_config.py)")),
            |k| Source::Key(r.name(k)),
        ),
    );

    // Dtypes: the model loads in ModelConfig.dtype (float32 by default) or
    // model_init_kwargs.dtype; bf16 (mixed precision, autocast) is on unless fp16.
    let dtype_key = init
        .as_ref()
        .and_then(|i| i.str("dtype").ok().flatten().map(|d| (d, i.name("dtype"))))
        .or_else(|| {
            init.as_ref().and_then(|i| {
                i.str("torch_dtype")
                    .ok()
                    .flatten()
                    .map(|d| (d, i.name("torch_dtype")))
            })
        })
        .or_else(|| r.str("dtype").ok().flatten().map(|d| (d, r.name("dtype"))))
        .or_else(|| {
            r.str("torch_dtype")
                .ok()
                .flatten()
                .map(|d| (d, r.name("torch_dtype")))
        });
    let (load, lsrc) = match dtype_key {
        Some(("auto", key)) => (
            Precision::Bf16,
            Source::Key(format!("{key} (auto: the checkpoint's bf16)")),
        ),
        Some((d, key)) => (
            torch_dtype(d).ok_or_else(|| {
                r.error(
                    "dtype",
                    format!("is '{d}'; expected auto, bfloat16, float16 or float32"),
                )
            })?,
            Source::Key(key),
        ),
        None => (
            Precision::Fp32,
            Source::Default(format!("dtype float32 ({TRL} trainer/model_config.py)")),
        ),
    };
    let fp16 = r.bool("fp16")?.unwrap_or(false);
    let bf16 = r.bool("bf16")?.unwrap_or(!fp16);
    let (mixed, msrc) = if fp16 {
        (Some(Precision::Fp16), Source::Key(r.name("fp16")))
    } else if bf16 {
        (
            Some(Precision::Bf16),
            if r.has("bf16") {
                Source::Key(r.name("bf16"))
            } else {
                Source::Default(format!(
                    "bf16 true unless fp16 ({TRL} trainer/base_config.py)"
                ))
            },
        )
    } else {
        (None, Source::Key(r.name("bf16")))
    };
    // Under autocast the matmuls and activations run in the mixed dtype; without it, in the
    // weights' own dtype.
    let compute = match mixed {
        Some(m) if m.float_bytes() <= load.float_bytes() => m,
        _ => load,
    };
    let csrc = if mixed.is_some() { msrc } else { lsrc.clone() };
    match method {
        Method::Qlora => {
            // get_quantization_config: bnb_4bit_compute_dtype = dtype; the other parameters
            // (norms, embeddings, lm_head) load in dtype: fp32 by default, which is what
            // memplan's kbit-prep models.
            out.put(
                "weights",
                |s| &mut s.weights,
                Precision::Nf4,
                Source::Key(if r.has("load_in_4bit") {
                    r.name("load_in_4bit")
                } else {
                    "quantization_config.load_in_4bit".into()
                }),
            );
            out.put("compute", |s| &mut s.compute, compute, csrc);
            out.put(
                "kbit_prep",
                |s| &mut s.kbit_prep,
                load == Precision::Fp32,
                lsrc,
            );
            let dq = match &bnb {
                Some(b) if b.has("bnb_4bit_use_double_quant") => (b.bool("bnb_4bit_use_double_quant")?.unwrap_or(false), Source::Key(b.name("bnb_4bit_use_double_quant"))),
                _ => match r.bool("use_bnb_nested_quant")? {
                    Some(v) => (v, Source::Key(r.name("use_bnb_nested_quant"))),
                    None => (false, Source::Default(format!("use_bnb_nested_quant false ({TRL} trainer/model_config.py); BitsAndBytesConfig bnb_4bit_use_double_quant false ({TF})"))),
                },
            };
            out.put("double_quant", |s| &mut s.double_quant, dq.0, dq.1);
            out.warn("QLoRA: TRL casts the LoRA adapters to bf16 (trainer/sft_trainer.py); memplan keeps peft's fp32 adapters (adapters and their optimizer state over by 2×)");
        }
        _ => {
            let w = if eight { Precision::Int8 } else { load };
            out.put(
                "weights",
                |s| &mut s.weights,
                w,
                if eight {
                    Source::Key("load_in_8bit".into())
                } else {
                    lsrc
                },
            );
            out.put("compute", |s| &mut s.compute, compute, csrc);
        }
    }

    if method != Method::Full {
        // A peft_config section is a LoraConfig (peft defaults); otherwise ModelConfig's keys.
        let (rank, dropout, targets) = match &lora_section {
            Some(p) => {
                let rank = p.count("r")?;
                let d = p.float("lora_dropout")?;
                (
                    (
                        rank.unwrap_or(8),
                        rank.map_or(Source::Default("r 8 (peft 0.21 LoraConfig)".into()), |_| {
                            Source::Key(p.name("r"))
                        }),
                    ),
                    (
                        d.unwrap_or(0.0),
                        d.map_or(
                            Source::Default("lora_dropout 0.0 (peft 0.21 LoraConfig)".into()),
                            |_| Source::Key(p.name("lora_dropout")),
                        ),
                    ),
                    p.get("target_modules")
                        .map(|v| (v, p.name("target_modules"))),
                )
            }
            None => {
                let rank = r.count("lora_r")?;
                let d = r.float("lora_dropout")?;
                (
                    (
                        rank.unwrap_or(16),
                        rank.map_or(
                            Source::Default(format!("lora_r 16 ({TRL} trainer/model_config.py)")),
                            |_| Source::Key(r.name("lora_r")),
                        ),
                    ),
                    (
                        d.unwrap_or(0.05),
                        d.map_or(
                            Source::Default(format!(
                                "lora_dropout 0.05 ({TRL} trainer/model_config.py)"
                            )),
                            |_| Source::Key(r.name("lora_dropout")),
                        ),
                    ),
                    r.get("lora_target_modules")
                        .map(|v| (v, r.name("lora_target_modules"))),
                )
            }
        };
        out.put("rank", |s| &mut s.rank, rank.0, rank.1);
        out.put(
            "lora_dropout",
            |s| &mut s.lora_dropout,
            dropout.0,
            dropout.1,
        );
        let (kinds, src) = match targets {
            None => {
                // Resolved per model type when the job is built (jobfile::apply).
                out.settings.peft_default_targets = true;
                (vec![LinearKind::Q, LinearKind::V], Source::Default("target_modules None → peft's default for the model type: q_proj,v_proj for llama, llama4, mistral, mixtral, gemma, gemma2, gemma3_text, qwen2, qwen3 (peft utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)".into()))
            }
            Some((v, key)) => {
                let (k, unknown) = lora_targets(v).ok_or_else(|| {
                    r.error(&key, "expected all-linear or a list of module names")
                })?;
                for u in unknown {
                    out.warn(format!("{key}: '{u}' is not a decoder Linear memplan models; not counted (chunked_nll also refuses a LoRA lm_head)"));
                }
                if k.is_empty() {
                    return Err(r.error(&key, "selects no q/k/v/o/gate/up/down projection"));
                }
                (k, Source::Key(key))
            }
        };
        out.put("lora_targets", |s| &mut s.lora_targets, kinds, src);
    }

    let optim = r.str("optim")?;
    let opt = hf_optimizer(optim.unwrap_or("adamw_torch_fused"))
        .ok_or_else(|| r.error("optim", format!("is '{}'; memplan models adamw_torch, adamw_torch_fused, adamw_bnb_8bit, paged_adamw_32bit, paged_adamw_8bit, sgd, adafactor", optim.unwrap_or_default())))?;
    out.put(
        "optimizer",
        |s| &mut s.optimizer,
        opt,
        optim.map_or(
            Source::Default(format!(
                "adamw_torch_fused ({TF} training_args.py, torch >= 2.8)"
            )),
            |_| Source::Key(r.name("optim")),
        ),
    );

    let gc = r.bool("gradient_checkpointing")?;
    out.put(
        "grad_checkpointing",
        |s| &mut s.grad_checkpointing,
        gc.unwrap_or(true),
        gc.map_or(
            Source::Default(format!(
                "gradient_checkpointing true ({TRL} trainer/base_config.py)"
            )),
            |_| Source::Key(r.name("gradient_checkpointing")),
        ),
    );
    if let Some(k) = r.section("gradient_checkpointing_kwargs") {
        for key in k.keys().filter(|key| key.as_str() != "use_reentrant") {
            out.warn(format!("gradient_checkpointing_kwargs.{key}: not modelled"));
        }
    }
    let off = r.bool("activation_offloading")?;
    out.put(
        "activation_offload",
        |s| &mut s.activation_offload,
        off.unwrap_or(false),
        off.map_or(
            Source::Default(format!(
                "activation_offloading false ({TRL} trainer/sft_config.py)"
            )),
            |_| Source::Key(r.name("activation_offloading")),
        ),
    );

    let att = init
        .as_ref()
        .and_then(|i| {
            i.str("attn_implementation")
                .ok()
                .flatten()
                .map(|a| (a, i.name("attn_implementation")))
        })
        .or_else(|| {
            r.str("attn_implementation")
                .ok()
                .flatten()
                .map(|a| (a, r.name("attn_implementation")))
        });
    let (attention, asrc) = match att {
        None => (
            Attention::Sdpa,
            Source::Default("sdpa (transformers' default attn_implementation)".into()),
        ),
        Some((a, key)) => (
            hf_attention(a).ok_or_else(|| {
                r.error(
                    "attn_implementation",
                    format!("is '{a}'; memplan models sdpa, eager and flash_attention_2"),
                )
            })?,
            Source::Key(key),
        ),
    };
    out.put("attention", |s| &mut s.attention, attention, asrc);

    // packing with strategy bfd turns padding_free on (sft_config.py); padding_free alone too.
    let packing = r.bool("packing")?.unwrap_or(false);
    let padding_free = r.bool("padding_free")?.unwrap_or(false);
    out.put(
        "packing",
        |s| &mut s.packing,
        packing || padding_free,
        if packing {
            Source::Key(r.name("packing"))
        } else if padding_free {
            Source::Key(r.name("padding_free"))
        } else {
            Source::Default(format!("packing false ({TRL} trainer/sft_config.py)"))
        },
    );

    let liger = r.bool("use_liger_kernel")?.unwrap_or(false);
    if liger {
        // transformers Trainer applies apply_liger_kernel_to_<model> with its defaults: RoPE,
        // RMSNorm, SwiGLU and the fused linear cross-entropy.
        out.put(
            "liger_kernels",
            |s| &mut s.liger_kernels,
            true,
            Source::Key(r.name("use_liger_kernel")),
        );
    }
    let loss_type = r.str("loss_type")?;
    let loss = match (loss_type, liger) {
        (None, false) => Loss::ChunkedNll,
        (Some("chunked_nll"), false) => Loss::ChunkedNll,
        (Some("chunked_nll"), true) => {
            return Err(r.error(
                "loss_type",
                "chunked_nll is not compatible with use_liger_kernel: true (TRL raises ValueError)",
            ))
        }
        (None | Some("nll"), true) => Loss::Liger,
        (Some("nll"), false) => Loss::Ce,
        (Some("dft"), _) => {
            out.warn("loss_type: dft computes the full logits plus per-token weights; estimated as nll (ce)");
            if liger {
                Loss::Liger
            } else {
                Loss::Ce
            }
        }
        (Some(other), _) => {
            return Err(r.error(
                "loss_type",
                format!("is '{other}'; TRL takes nll, dft or chunked_nll"),
            ))
        }
    };
    out.put(
        "loss",
        |s| &mut s.loss,
        loss,
        match (loss_type, liger) {
            (Some(_), _) => Source::Key(r.name("loss_type")),
            (None, true) => Source::Default(format!("nll with use_liger_kernel → Liger fused linear cross-entropy ({TRL} trainer/sft_config.py)")),
            (None, false) => Source::Default(format!("loss_type chunked_nll ({TRL} trainer/sft_config.py)")),
        },
    );
    for (key, why) in UNMODELLED {
        if r.truthy(key) || lora_section.as_ref().is_some_and(|p| p.truthy(key)) {
            out.warn(format!("{key}: {why}"));
        }
    }
    Ok(())
}
