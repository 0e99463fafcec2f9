//! torchtune recipe YAML (`tune run <recipe> --config file.yaml`). Keys from torchtune 0.7.0
//! (commit bd2a0fc7, 2026-04-23): `recipes/configs/*/*.yaml` and the builders they name
//! (`torchtune/models/<family>/_model_builders.py`: `lora_<model>` / `qlora_<model>` take
//! `lora_attn_modules`, `apply_lora_to_mlp`, `lora_rank`, `lora_dropout` (default 0.0)).
//!
//! torchtune runs its own modules (`torchtune.modules`), not transformers', and quantizes with
//! torchao's `NF4Tensor`; memplan estimates the transformers + peft + bitsandbytes step with the
//! same shapes and settings, and says so in a warning.

use crate::dtype::Precision;
use crate::error::Error;
use crate::method::{Loss, Method, Optimizer};
use crate::model::LinearKind;

use super::{torch_dtype, Reader, Resolved, Source};

const TT: &str = "torchtune 0.7.0";

/// `torchtune.models.llama3_1.qlora_llama3_1_8b` → (qlora, "llama3.1-8b"), the preset alias.
fn builder(component: &str) -> Option<(Method, String)> {
    let name = component.rsplit('.').next()?;
    let (method, base) = if let Some(b) = name.strip_prefix("qlora_") {
        (Method::Qlora, b)
    } else if let Some(b) = name.strip_prefix("lora_") {
        (Method::Lora, b)
    } else {
        (Method::Full, name)
    };
    let parts: Vec<&str> = base.split('_').collect();
    let (size, family) = parts.split_last()?;
    let mut out = String::new();
    for (i, p) in family.iter().enumerate() {
        // "llama3", "1" → "llama3.1"; "qwen2", "5" → "qwen2.5".
        if i > 0 {
            let numeric = p.chars().all(|c| c.is_ascii_digit());
            out.push(if numeric { '.' } else { '-' });
        }
        out.push_str(p);
    }
    Some((method, format!("{out}-{size}")))
}

pub(crate) fn resolve(r: &Reader, out: &mut Resolved) -> Result<(), Error> {
    out.warn(format!("{TT} runs its own modules (torchtune.modules) and torchao NF4, not transformers + peft + bitsandbytes: memplan estimates the transformers step with the same shapes and settings"));
    let model = r.section("model").ok_or_else(|| {
        r.error(
            "model",
            "is missing: expected a model section with _component_",
        )
    })?;
    let component = model
        .str("_component_")?
        .ok_or_else(|| model.error("_component_", "is missing"))?;
    let (method, name) = builder(component).ok_or_else(|| {
        model.error(
            "_component_",
            format!("'{component}' is not a torchtune model builder"),
        )
    })?;
    out.put(
        "model",
        |s| &mut s.model,
        name,
        Source::Key(model.name("_component_")),
    );
    out.put(
        "method",
        |s| &mut s.method,
        method,
        Source::Key(model.name("_component_")),
    );

    let batch = r.count("batch_size")?;
    if let Some(b) = batch {
        out.put(
            "batch",
            |s| &mut s.batch,
            b,
            Source::Key(r.name("batch_size")),
        );
    } else {
        out.warn("batch_size: missing; memplan uses --batch (default 1)");
    }
    match r.section("tokenizer").map(|t| (t.count("max_seq_len"), t.name("max_seq_len"))) {
        Some((Ok(Some(s)), key)) => out.put("seq", |st| &mut st.seq, s, Source::Key(key)),
        Some((Err(e), _)) => return Err(e),
        _ => out.warn("tokenizer.max_seq_len: null (torchtune does not truncate): the sequence length is the data's; memplan uses --seq (default 2048)"),
    }

    let dtype = r.str("dtype")?;
    let dt = match dtype {
        None => Precision::Bf16,
        Some(d) => torch_dtype(d)
            .ok_or_else(|| r.error("dtype", format!("is '{d}'; expected bf16, fp16 or fp32")))?,
    };
    let dsrc = dtype.map_or(Source::Default(format!("bf16 ({TT} recipes)")), |_| {
        Source::Key(r.name("dtype"))
    });
    if method == Method::Qlora {
        out.put(
            "weights",
            |s| &mut s.weights,
            Precision::Nf4,
            Source::Key(model.name("_component_")),
        );
    } else {
        out.put("weights", |s| &mut s.weights, dt, dsrc.clone());
    }
    out.put("compute", |s| &mut s.compute, dt, dsrc);

    if method != Method::Full {
        let rank = model
            .count("lora_rank")?
            .ok_or_else(|| model.error("lora_rank", "is missing"))?;
        out.put(
            "rank",
            |s| &mut s.rank,
            rank,
            Source::Key(model.name("lora_rank")),
        );
        let d = model.float("lora_dropout")?;
        out.put(
            "lora_dropout",
            |s| &mut s.lora_dropout,
            d.unwrap_or(0.0),
            d.map_or(
                Source::Default(format!(
                    "lora_dropout 0.0 ({TT} models/*/_model_builders.py)"
                )),
                |_| Source::Key(model.name("lora_dropout")),
            ),
        );
        let mut kinds = Vec::new();
        if let Some(serde_json::Value::Array(a)) = model.get("lora_attn_modules") {
            for m in a.iter().filter_map(|v| v.as_str()) {
                match m {
                    "q_proj" => kinds.push(LinearKind::Q),
                    "k_proj" => kinds.push(LinearKind::K),
                    "v_proj" => kinds.push(LinearKind::V),
                    "output_proj" => kinds.push(LinearKind::O),
                    other => out.warn(format!(
                        "model.lora_attn_modules: '{other}' is not modelled"
                    )),
                }
            }
        }
        if model.bool("apply_lora_to_mlp")?.unwrap_or(false) {
            kinds.extend([LinearKind::Gate, LinearKind::Up, LinearKind::Down]);
        }
        if model.bool("apply_lora_to_output")?.unwrap_or(false) {
            out.warn("model.apply_lora_to_output: LoRA on the output projection is not counted");
        }
        kinds.sort();
        kinds.dedup();
        if kinds.is_empty() {
            return Err(model.error(
                "lora_attn_modules",
                "selects no projection (and apply_lora_to_mlp is not true)",
            ));
        }
        out.put(
            "lora_targets",
            |s| &mut s.lora_targets,
            kinds,
            Source::Key(format!(
                "{} + {}",
                model.name("lora_attn_modules"),
                model.name("apply_lora_to_mlp")
            )),
        );
    }
    if method == Method::Qlora {
        // torchao NF4Tensor quantizes its per-block scalers again (double quantization).
        out.put(
            "double_quant",
            |s| &mut s.double_quant,
            true,
            Source::Default(format!(
                "torchao NF4 quantizes its scalers ({TT} qlora builders)"
            )),
        );
    }

    if let Some(o) = r.section("optimizer") {
        let comp = o.str("_component_")?.unwrap_or_default();
        let fused = o.bool("fused")?.unwrap_or(false);
        let opt = match comp {
            "torch.optim.AdamW" if fused => Optimizer::AdamwFused,
            "torch.optim.AdamW" => Optimizer::Adamw,
            "torch.optim.SGD" => Optimizer::Sgd,
            "bitsandbytes.optim.PagedAdamW8bit" => Optimizer::PagedAdamw8bit,
            "bitsandbytes.optim.PagedAdamW" | "bitsandbytes.optim.PagedAdamW32bit" => {
                Optimizer::PagedAdamw
            }
            "bitsandbytes.optim.AdamW8bit" | "torchao.optim.AdamW8bit" => Optimizer::Adamw8bit,
            other => {
                return Err(o.error(
                    "_component_",
                    format!("'{other}' is not an optimizer memplan models"),
                ))
            }
        };
        out.put(
            "optimizer",
            |s| &mut s.optimizer,
            opt,
            Source::Key(o.name("_component_")),
        );
    }
    if r.truthy("optimizer_in_bwd") {
        out.warn("optimizer_in_bwd: gradients freed as each parameter steps are not modelled; estimated with all gradients alive");
    }
    let ckpt = r.bool("enable_activation_checkpointing")?;
    out.put(
        "grad_checkpointing",
        |s| &mut s.grad_checkpointing,
        ckpt.unwrap_or(false),
        ckpt.map_or(Source::Default(format!("off ({TT} recipes)")), |_| {
            Source::Key(r.name("enable_activation_checkpointing"))
        }),
    );
    let off = r.bool("enable_activation_offloading")?;
    out.put(
        "activation_offload",
        |s| &mut s.activation_offload,
        off.unwrap_or(false),
        off.map_or(Source::Default(format!("off ({TT} recipes)")), |_| {
            Source::Key(r.name("enable_activation_offloading"))
        }),
    );
    if let Some(l) = r.section("loss") {
        let comp = l.str("_component_")?.unwrap_or_default();
        if comp.contains("Chunked") || comp.contains("LinearCrossEntropy") {
            out.warn(format!("loss._component_: {comp} chunks the output projection and loss; not modelled, estimated with the full-logits loss (an upper bound)"));
        }
        out.put(
            "loss",
            |s| &mut s.loss,
            Loss::Ce,
            Source::Key(l.name("_component_")),
        );
    }
    if r.section("dataset").is_some_and(|d| d.truthy("packed")) {
        out.warn("dataset.packed: torchtune packs with a block-causal mask (flex attention), not modelled; estimated unpacked");
    }
    if r.truthy("compile") {
        out.warn("compile: torch.compile changes which tensors are saved; estimated eager");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_names_map_to_preset_aliases() {
        assert_eq!(
            builder("torchtune.models.llama3_1.qlora_llama3_1_8b"),
            Some((Method::Qlora, "llama3.1-8b".into()))
        );
        assert_eq!(
            builder("torchtune.models.qwen2_5.lora_qwen2_5_7b"),
            Some((Method::Lora, "qwen2.5-7b".into()))
        );
        assert_eq!(
            builder("torchtune.models.llama2.llama2_7b"),
            Some((Method::Full, "llama2-7b".into()))
        );
    }
}
