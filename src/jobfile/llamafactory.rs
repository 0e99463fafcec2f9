//! LLaMA-Factory YAML, both layouts. Keys and defaults from LLaMA-Factory 0.9.6.dev0 (commit
//! ff6d4d12, 2026-08-18):
//! - classic: `src/llamafactory/hparams/{model_args,finetuning_args,data_args,parser}.py`,
//!   `model/adapter.py` (trainable parameters upcast to fp32 unless `pure_bf16`),
//!   `model/model_utils/checkpointing.py` (checkpointing on unless
//!   `disable_gradient_checkpointing`), `model/model_utils/attention.py`; the Trainer's own
//!   fields are transformers `TrainingArguments` (5.17: `per_device_train_batch_size` 8,
//!   `optim` adamw_torch_fused on torch >= 2.8).
//! - v1: `src/llamafactory/v1/config/{model_args,training_args}.py`,
//!   `v1/plugins/model_plugins/{peft,quantization}.py`, `v1/core/base_trainer.py`
//!   (`torch.optim.AdamW` without `optim_config`), `v1/plugins/model_plugins/kernels/`.

use crate::dtype::Precision;
use crate::error::Error;
use crate::method::{Attention, Loss, Method, Optimizer};

use super::{hf_attention, hf_optimizer, lora_targets, Reader, Resolved, Source};

const V0: &str = "LLaMA-Factory 0.9.6.dev0";
const TF: &str = "transformers 5.17 TrainingArguments";

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
        "use_dora",
        "DoRA's magnitude vectors and weight-norm activations are not modelled",
    ),
    (
        "pissa_init",
        "PiSSA initialisation's SVD buffers at load time are not modelled",
    ),
    (
        "additional_target",
        "fully trained extra modules are not counted",
    ),
    (
        "use_galore",
        "GaLore's projected optimizer state is not modelled",
    ),
    ("use_apollo", "APOLLO's optimizer state is not modelled"),
    ("use_badam", "BAdam's block-wise training is not modelled"),
    (
        "use_unsloth",
        "Unsloth's kernels are not modelled; estimated with transformers' layers",
    ),
    ("upcast_layernorm", "fp32 layer norms are not modelled"),
    ("use_kt", "KTransformers offload is not modelled"),
    (
        "dist_config",
        "sharding is not read from the file: pass --gpus and --fsdp",
    ),
    (
        "optim_config",
        "a v1 optimizer plugin is not read; estimated with torch.optim.AdamW",
    ),
    (
        "cp_size",
        "context parallelism is not modelled; estimated on one GPU's full sequence",
    ),
];

fn warn_unmodelled(r: &Reader, out: &mut Resolved) {
    for (key, why) in UNMODELLED {
        if r.truthy(key) && !(*key == "cp_size" && r.count(key).ok().flatten() == Some(1)) {
            out.warn(format!("{key}: {why}"));
        }
    }
}

fn int(r: &Reader, key: &str) -> Result<Option<u128>, Error> {
    r.count(key)
}

/// The classic layout (`llamafactory-cli train job.yaml`).
pub(crate) fn resolve_classic(r: &Reader, out: &mut Resolved) -> Result<(), Error> {
    if let Some(m) = r.str("model_name_or_path")? {
        out.put(
            "model",
            |s| &mut s.model,
            m.to_string(),
            Source::Key(r.name("model_name_or_path")),
        );
    }
    if let Some(stage) = r.str("stage")? {
        if !matches!(stage, "sft" | "pt") {
            out.warn(format!("stage: {stage} trains with extra models or forward passes (reward / reference) that are not modelled; estimated as one SFT step"));
        }
    }
    let ft = r.str("finetuning_type")?.unwrap_or("lora");
    let bits = int(r, "quantization_bit")?;
    let method = match (ft, bits) {
        ("full", None) => Method::Full,
        ("lora", None | Some(8)) => Method::Lora,
        ("lora", Some(4)) => Method::Qlora,
        ("full", Some(_)) => {
            return Err(r.error(
                "quantization_bit",
                "cannot be combined with finetuning_type: full",
            ))
        }
        ("lora", Some(b)) => {
            return Err(r.error(
                "quantization_bit",
                format!("is {b}; memplan models bitsandbytes 4 and 8 bit"),
            ))
        }
        (other, _) => {
            return Err(r.error(
                "finetuning_type",
                format!("is '{other}'; memplan models lora and full"),
            ))
        }
    };
    out.put(
        "method",
        |s| &mut s.method,
        method,
        match (r.has("finetuning_type"), bits) {
            (_, Some(_)) => Source::Key(format!(
                "{} + {}",
                r.name("finetuning_type"),
                r.name("quantization_bit")
            )),
            (true, None) => Source::Key(r.name("finetuning_type")),
            (false, None) => Source::Default(format!(
                "finetuning_type lora ({V0} hparams/finetuning_args.py)"
            )),
        },
    );
    if let Some(m) = r.str("quantization_method")? {
        if m != "bnb" && m != "bitsandbytes" {
            return Err(r.error(
                "quantization_method",
                format!("is '{m}'; memplan models bitsandbytes (bnb)"),
            ));
        }
    }

    let batch = r.count("per_device_train_batch_size")?;
    out.put(
        "batch",
        |s| &mut s.batch,
        batch.unwrap_or(8),
        batch.map_or(
            Source::Default(format!("per_device_train_batch_size 8 ({TF})")),
            |_| Source::Key(r.name("per_device_train_batch_size")),
        ),
    );
    let seq = r.count("cutoff_len")?;
    out.put(
        "seq",
        |s| &mut s.seq,
        seq.unwrap_or(2048),
        seq.map_or(
            Source::Default(format!("cutoff_len 2048 ({V0} hparams/data_args.py)")),
            |_| Source::Key(r.name("cutoff_len")),
        ),
    );

    // compute_dtype: bf16 when bf16 or pure_bf16, fp16 when fp16 (hparams/parser.py), else the
    // model's dtype as infer_optim_dtype picks it (bf16 on an Ampere or newer GPU).
    let pure = r.bool("pure_bf16")?.unwrap_or(false);
    let (compute, csrc) = if pure {
        (Precision::Bf16, Source::Key(r.name("pure_bf16")))
    } else if r.bool("bf16")?.unwrap_or(false) {
        (Precision::Bf16, Source::Key(r.name("bf16")))
    } else if r.bool("fp16")?.unwrap_or(false) {
        (Precision::Fp16, Source::Key(r.name("fp16")))
    } else {
        (
            Precision::Bf16,
            Source::Default(format!(
                "infer_optim_dtype → bf16 on an Ampere or newer GPU ({V0} model/patcher.py)"
            )),
        )
    };
    let autocast = pure || r.bool("bf16")?.unwrap_or(false) || r.bool("fp16")?.unwrap_or(false);
    match method {
        // model/adapter.py: trainable parameters are upcast to fp32 unless pure_bf16.
        Method::Full if !pure => {
            out.put(
                "weights",
                |s| &mut s.weights,
                Precision::Fp32,
                Source::Default(format!(
                    "trainable parameters upcast to fp32 without pure_bf16 ({V0} model/adapter.py)"
                )),
            );
            let c = if autocast { compute } else { Precision::Fp32 };
            out.put(
                "compute",
                |s| &mut s.compute,
                c,
                if autocast {
                    csrc
                } else {
                    Source::Default(format!("fp32: no bf16/fp16 mixed precision ({TF})"))
                },
            );
        }
        Method::Qlora => {
            out.put(
                "weights",
                |s| &mut s.weights,
                Precision::Nf4,
                Source::Key(r.name("quantization_bit")),
            );
            out.put("compute", |s| &mut s.compute, compute, csrc);
        }
        _ => {
            let w = if bits == Some(8) {
                Precision::Int8
            } else {
                compute
            };
            let wsrc = if bits == Some(8) {
                Source::Key(r.name("quantization_bit"))
            } else {
                csrc.clone()
            };
            out.put("weights", |s| &mut s.weights, w, wsrc);
            out.put("compute", |s| &mut s.compute, compute, csrc);
        }
    }

    if method != Method::Full {
        let rank = r.count("lora_rank")?;
        out.put(
            "rank",
            |s| &mut s.rank,
            rank.unwrap_or(8),
            rank.map_or(
                Source::Default(format!("lora_rank 8 ({V0} hparams/finetuning_args.py)")),
                |_| Source::Key(r.name("lora_rank")),
            ),
        );
        let d = r.float("lora_dropout")?;
        out.put(
            "lora_dropout",
            |s| &mut s.lora_dropout,
            d.unwrap_or(0.0),
            d.map_or(
                Source::Default(format!(
                    "lora_dropout 0.0 ({V0} hparams/finetuning_args.py)"
                )),
                |_| Source::Key(r.name("lora_dropout")),
            ),
        );
        let targets = match r.get("lora_target") {
            None => (
                crate::method::all_linear(),
                Source::Default(format!("lora_target all ({V0} hparams/finetuning_args.py)")),
            ),
            Some(v) => {
                let (kinds, unknown) = lora_targets(v).ok_or_else(|| {
                    r.error(
                        "lora_target",
                        "expected all or a comma list of module names",
                    )
                })?;
                for u in unknown {
                    out.warn(format!(
                        "lora_target: '{u}' is not a decoder Linear memplan models; not counted"
                    ));
                }
                if kinds.is_empty() {
                    return Err(
                        r.error("lora_target", "selects no q/k/v/o/gate/up/down projection")
                    );
                }
                (kinds, Source::Key(r.name("lora_target")))
            }
        };
        out.put(
            "lora_targets",
            |s| &mut s.lora_targets,
            targets.0,
            targets.1,
        );
    }
    if method == Method::Qlora {
        let dq = r.bool("double_quantization")?;
        out.put(
            "double_quant",
            |s| &mut s.double_quant,
            dq.unwrap_or(true),
            dq.map_or(
                Source::Default(format!(
                    "double_quantization true ({V0} hparams/model_args.py)"
                )),
                |_| Source::Key(r.name("double_quantization")),
            ),
        );
    }

    let optim = r.str("optim")?;
    let opt = hf_optimizer(optim.unwrap_or("adamw_torch_fused"))
        .ok_or_else(|| r.error("optim", format!("is '{}'; memplan models adamw_torch, adamw_torch_fused, adamw_bnb_8bit, paged_adamw_32bit, paged_adamw_8bit, sgd, adafactor", optim.unwrap_or_default())))?;
    out.put(
        "optimizer",
        |s| &mut s.optimizer,
        opt,
        optim.map_or(
            Source::Default(format!("adamw_torch_fused ({TF}, torch >= 2.8)")),
            |_| Source::Key(r.name("optim")),
        ),
    );

    let disable = r.bool("disable_gradient_checkpointing")?;
    out.put(
        "grad_checkpointing",
        |s| &mut s.grad_checkpointing,
        !disable.unwrap_or(false),
        disable.map_or(
            Source::Default(format!("on: disable_gradient_checkpointing false ({V0} model/model_utils/checkpointing.py)")),
            |_| Source::Key(r.name("disable_gradient_checkpointing")),
        ),
    );
    // use_unsloth_gc: Unsloth's checkpointing offloads each checkpointed input to the CPU.
    let unsloth_gc = r.bool("use_unsloth_gc")?.unwrap_or(false);
    out.put(
        "activation_offload",
        |s| &mut s.activation_offload,
        unsloth_gc,
        if r.has("use_unsloth_gc") {
            Source::Key(r.name("use_unsloth_gc"))
        } else {
            Source::Default(format!("off ({V0} use_unsloth_gc false)"))
        },
    );

    // flash_attn: auto (transformers' default, sdpa) | disabled (eager) | sdpa | fa2 | fa3.
    let fa = r.str("flash_attn")?;
    let att = match fa.unwrap_or("auto") {
        "auto" | "sdpa" => Attention::Sdpa,
        "disabled" => Attention::Eager,
        "fa2" | "fa3" => Attention::Flash,
        other => {
            return Err(r.error(
                "flash_attn",
                format!("is '{other}'; expected auto, disabled, sdpa, fa2 or fa3"),
            ))
        }
    };
    out.put("attention", |s| &mut s.attention, att, fa.map_or(Source::Default(format!("flash_attn auto → transformers' default sdpa ({V0} model/model_utils/attention.py)")), |_| Source::Key(r.name("flash_attn"))));

    // packing: None → on only for stage pt (hparams/parser.py); neat_packing packs too.
    let stage_pt = r.str("stage")? == Some("pt");
    let packing = r.bool("packing")?;
    let neat = r.bool("neat_packing")?.unwrap_or(false);
    let on = neat || packing.unwrap_or(stage_pt);
    out.put(
        "packing",
        |s| &mut s.packing,
        on,
        if neat {
            Source::Key(r.name("neat_packing"))
        } else if packing.is_some() {
            Source::Key(r.name("packing"))
        } else {
            Source::Default(format!(
                "packing only for stage pt ({V0} hparams/parser.py)"
            ))
        },
    );

    // enable_liger_kernel: apply_liger_kernel_to_<model> with its defaults (rope, rms_norm,
    // swiglu and fused_linear_cross_entropy) for sft/pt (model/model_utils/liger_kernel.py).
    let liger = r.bool("enable_liger_kernel")?.unwrap_or(false);
    if liger {
        out.put(
            "liger_kernels",
            |s| &mut s.liger_kernels,
            true,
            Source::Key(r.name("enable_liger_kernel")),
        );
    }
    out.put(
        "loss",
        |s| &mut s.loss,
        if liger { Loss::Liger } else { Loss::Ce },
        if liger {
            Source::Key(r.name("enable_liger_kernel"))
        } else {
            Source::Default("ce (transformers ForCausalLMLoss)".into())
        },
    );
    warn_unmodelled(r, out);
    Ok(())
}

/// The v1 layout (`model`, `peft_config`, `quant_config`, `kernel_config`, `dist_config`).
pub(crate) fn resolve_v1(r: &Reader, out: &mut Resolved) -> Result<(), Error> {
    const V1: &str = "LLaMA-Factory 0.9.6.dev0 v1";
    if let Some(m) = r.str("model")? {
        out.put(
            "model",
            |s| &mut s.model,
            m.to_string(),
            Source::Key(r.name("model")),
        );
    }
    let peft = r.section("peft_config");
    let quant = r.section("quant_config");
    let bits = match &quant {
        None => None,
        Some(q) => {
            let name = q.str("name")?.unwrap_or("bnb");
            if !matches!(name, "bnb" | "auto") {
                return Err(q.error(
                    "name",
                    format!("is '{name}'; memplan models bitsandbytes (bnb)"),
                ));
            }
            // quantization.py: bnb without quantization_bit defaults to 4; auto applies none.
            match (name, q.count("quantization_bit")?) {
                ("bnb", None) => Some(4),
                (_, b) => b,
            }
        }
    };
    let method = match (&peft, bits) {
        (None, None) => Method::Full,
        (None, Some(_)) => {
            return Err(r.error(
                "quant_config",
                "quantizes the base, which needs a peft_config to train",
            ))
        }
        (Some(p), b) => {
            let name = p.str("name")?.unwrap_or("lora");
            if name != "lora" {
                return Err(p.error("name", format!("is '{name}'; memplan models lora")));
            }
            match b {
                None | Some(8) => Method::Lora,
                Some(4) => Method::Qlora,
                Some(other) => {
                    return Err(r.error(
                        "quant_config.quantization_bit",
                        format!("is {other}; bitsandbytes takes 4 or 8"),
                    ))
                }
            }
        }
    };
    out.put(
        "method",
        |s| &mut s.method,
        method,
        match (&peft, bits) {
            (None, _) => {
                Source::Default(format!("full: no peft_config ({V1} config/model_args.py)"))
            }
            (Some(_), None) => Source::Key(r.name("peft_config")),
            (Some(_), Some(_)) => Source::Key(format!(
                "{} + {}",
                r.name("peft_config"),
                r.name("quant_config")
            )),
        },
    );
    let batch = r.count("micro_batch_size")?;
    out.put(
        "batch",
        |s| &mut s.batch,
        batch.unwrap_or(1),
        batch.map_or(
            Source::Default(format!("micro_batch_size 1 ({V1} config/training_args.py)")),
            |_| Source::Key(r.name("micro_batch_size")),
        ),
    );
    let seq = r.count("cutoff_len")?;
    out.put(
        "seq",
        |s| &mut s.seq,
        seq.unwrap_or(2048),
        seq.map_or(
            Source::Default(format!("cutoff_len 2048 ({V1} config/training_args.py)")),
            |_| Source::Key(r.name("cutoff_len")),
        ),
    );

    let bf16 = r.bool("bf16")?;
    let dtype = if bf16.unwrap_or(true) {
        Precision::Bf16
    } else {
        Precision::Fp32
    };
    let dsrc = bf16.map_or(
        Source::Default(format!("bf16 true ({V1} config/training_args.py)")),
        |_| Source::Key(r.name("bf16")),
    );
    match method {
        Method::Qlora => {
            // quantization.py BnbParams: compute_dtype float16, double_quantization true.
            let q = quant.as_ref().expect("qlora has a quant_config");
            out.put(
                "weights",
                |s| &mut s.weights,
                Precision::Nf4,
                Source::Key(q.name("quantization_bit")),
            );
            let cd = q.str("compute_dtype")?;
            let compute = match cd {
                None => Precision::Fp16,
                Some(n) => super::torch_dtype(n).ok_or_else(|| {
                    q.error(
                        "compute_dtype",
                        format!("is '{n}'; expected float16, bfloat16 or float32"),
                    )
                })?,
            };
            out.put(
                "compute",
                |s| &mut s.compute,
                compute,
                cd.map_or(
                    Source::Default(format!(
                        "compute_dtype float16 ({V1} plugins/model_plugins/quantization.py)"
                    )),
                    |_| Source::Key(q.name("compute_dtype")),
                ),
            );
            let dq = q.bool("double_quantization")?;
            out.put(
                "double_quant",
                |s| &mut s.double_quant,
                dq.unwrap_or(true),
                dq.map_or(
                    Source::Default(format!(
                        "double_quantization true ({V1} plugins/model_plugins/quantization.py)"
                    )),
                    |_| Source::Key(q.name("double_quantization")),
                ),
            );
        }
        _ => {
            let w = if bits == Some(8) {
                Precision::Int8
            } else {
                dtype
            };
            out.put(
                "weights",
                |s| &mut s.weights,
                w,
                if bits == Some(8) {
                    Source::Key(r.name("quant_config.quantization_bit"))
                } else {
                    Source::Default(format!(
                        "dtype auto: the checkpoint's (bf16) ({V1} core/model_engine.py)"
                    ))
                },
            );
            out.put("compute", |s| &mut s.compute, dtype, dsrc);
        }
    }
    if let Some(p) = &peft {
        // peft.py LoraParams: r 8, lora_dropout 0.05, target_modules all.
        let rank = p.count("r")?;
        out.put(
            "rank",
            |s| &mut s.rank,
            rank.unwrap_or(8),
            rank.map_or(
                Source::Default(format!("r 8 ({V1} plugins/model_plugins/peft.py)")),
                |_| Source::Key(p.name("r")),
            ),
        );
        let d = p.float("lora_dropout")?;
        out.put(
            "lora_dropout",
            |s| &mut s.lora_dropout,
            d.unwrap_or(0.05),
            d.map_or(
                Source::Default(format!(
                    "lora_dropout 0.05 ({V1} plugins/model_plugins/peft.py)"
                )),
                |_| Source::Key(p.name("lora_dropout")),
            ),
        );
        let (kinds, src) = match p.get("target_modules") {
            None => (
                crate::method::all_linear(),
                Source::Default(format!(
                    "target_modules all ({V1} plugins/model_plugins/peft.py)"
                )),
            ),
            Some(v) => {
                let (k, unknown) = lora_targets(v).ok_or_else(|| {
                    p.error("target_modules", "expected all or a list of module names")
                })?;
                for u in unknown {
                    out.warn(format!("peft_config.target_modules: '{u}' is not a decoder Linear memplan models; not counted"));
                }
                if k.is_empty() {
                    return Err(p.error(
                        "target_modules",
                        "selects no q/k/v/o/gate/up/down projection",
                    ));
                }
                (k, Source::Key(p.name("target_modules")))
            }
        };
        out.put("lora_targets", |s| &mut s.lora_targets, kinds, src);
        if p.truthy("use_dora") {
            out.warn("peft_config.use_dora: DoRA's magnitude vectors and weight-norm activations are not modelled");
        }
    }
    out.put(
        "optimizer",
        |s| &mut s.optimizer,
        Optimizer::Adamw,
        Source::Default(format!(
            "torch.optim.AdamW without optim_config ({V1} core/base_trainer.py)"
        )),
    );
    let ckpt = r.bool("enable_activation_checkpointing")?;
    out.put(
        "grad_checkpointing",
        |s| &mut s.grad_checkpointing,
        ckpt.unwrap_or(true),
        ckpt.map_or(
            Source::Default(format!(
                "enable_activation_checkpointing true ({V1} config/training_args.py)"
            )),
            |_| Source::Key(r.name("enable_activation_checkpointing")),
        ),
    );
    let fa = r.str("flash_attn")?;
    let att = match fa {
        None => Attention::Sdpa,
        Some(a) => hf_attention(a).ok_or_else(|| {
            r.error(
                "flash_attn",
                format!("is '{a}'; expected eager, sdpa or flash_attention_2"),
            )
        })?,
    };
    out.put(
        "attention",
        |s| &mut s.attention,
        att,
        fa.map_or(
            Source::Default(format!("sdpa ({V1} config/model_args.py)")),
            |_| Source::Key(r.name("flash_attn")),
        ),
    );
    let strategy = r.str("batching_strategy")?;
    let packing = matches!(strategy, Some(s) if s.contains("padding_free"));
    out.put(
        "packing",
        |s| &mut s.packing,
        packing,
        strategy.map_or(
            Source::Default(format!(
                "batching_strategy normal ({V1} config/training_args.py)"
            )),
            |_| Source::Key(r.name("batching_strategy")),
        ),
    );
    let kernels = r.section("kernel_config");
    let kname = match &kernels {
        Some(k) => k.str("name")?,
        None => None,
    };
    let liger = kname.is_some_and(|n| n.split(',').any(|p| p.trim() == "liger_kernel"));
    if liger {
        out.put(
            "liger_kernels",
            |s| &mut s.liger_kernels,
            true,
            Source::Key(r.name("kernel_config.name")),
        );
    }
    if kname.is_some_and(|n| n.split(',').any(|p| p.trim() == "auto")) {
        out.warn("kernel_config.name: auto applies LLaMA-Factory's own fused kernels (plugins/model_plugins/kernels/ops), which are not modelled");
    }
    out.put(
        "loss",
        |s| &mut s.loss,
        if liger { Loss::Liger } else { Loss::Ce },
        if liger {
            Source::Key(r.name("kernel_config.name"))
        } else {
            Source::Default("ce (transformers ForCausalLMLoss)".into())
        },
    );
    warn_unmodelled(r, out);
    Ok(())
}
