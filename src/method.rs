//! What is trained and how: method, precisions, LoRA settings, optimizer, batch and kernels.
//! A [`Job`] is the validated input of [`crate::estimate`].

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::alloc::AllocConf;
use crate::dtype::Precision;
use crate::error::Error;
use crate::estimate::sharding::Sharding;
use crate::model::{LinearKind, ModelShape};

/// Fine-tuning method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every parameter trainable.
    Full,
    /// Frozen base, trainable low-rank adapters (Hu et al., 2021).
    Lora,
    /// LoRA over an NF4-quantized frozen base (Dettmers et al., 2023).
    Qlora,
    /// One forward pass over a prompt, with a KV cache; nothing trained.
    Inference,
}

/// Optimizer, as torch / bitsandbytes / transformers implement it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Optimizer {
    /// `torch.optim.AdamW` (foreach implementation, the default on CUDA).
    Adamw,
    /// `torch.optim.AdamW(fused=True)`.
    AdamwFused,
    /// `bitsandbytes.optim.AdamW8bit`.
    #[serde(rename = "adamw-8bit")]
    Adamw8bit,
    /// `bitsandbytes.optim.PagedAdamW32bit`.
    PagedAdamw,
    /// `bitsandbytes.optim.PagedAdamW8bit`.
    #[serde(rename = "paged-adamw-8bit")]
    PagedAdamw8bit,
    /// `torch.optim.SGD` without momentum.
    Sgd,
    /// `torch.optim.SGD(momentum>0)`.
    SgdMomentum,
    /// `transformers.optimization.Adafactor` (factored second moment, no first moment).
    Adafactor,
}

/// Attention implementation (`attn_implementation` in transformers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels).
    Sdpa,
    /// Materialized b·heads·s² scores and softmax.
    Eager,
    /// `flash_attention_2` from the flash-attn package.
    Flash,
}

/// LoRA settings (peft `LoraConfig`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraSettings {
    pub rank: u128,
    pub targets: Vec<LinearKind>,
    pub dropout: f64,
}

/// How the loss over the vocabulary is computed; decides the logits spike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loss {
    /// transformers `ForCausalLMLoss`: full b·s·V logits, fp32 upcast, log-softmax.
    Ce,
    /// TRL `loss_type="chunked_nll"` (the SFTTrainer default): supervised tokens only, 256 at a
    /// time under checkpointing.
    ChunkedNll,
    /// Liger `LigerFusedLinearCrossEntropyLoss`: lm_head and loss fused, chunked over tokens.
    Liger,
    /// Apple Cut Cross-Entropy (`cut_cross_entropy.linear_cross_entropy`): logits never exist.
    Cce,
}

/// The framework whose allocation behaviour is modelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    /// PyTorch + transformers + peft + bitsandbytes on CUDA (what the H200 measurements in `tests/data/` ran).
    Pytorch,
}

/// A validated estimation request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub model: ModelShape,
    pub method: Method,
    /// Storage of the frozen or trained base weights.
    pub weights: Precision,
    /// Activation / autocast dtype.
    pub compute: Precision,
    pub lora: Option<LoraSettings>,
    pub double_quant: bool,
    pub optimizer: Optimizer,
    pub batch: u128,
    pub seq: u128,
    pub grad_checkpointing: bool,
    pub attention: Attention,
    pub kbit_prep: bool,
    /// How the loss is computed (`--loss`).
    pub loss: Loss,
    /// Fraction of tokens that carry a label (completion-only / assistant-only losses).
    pub supervised_fraction: f64,
    /// Packed, padding-free batches (`--packing`): every micro-batch is b·s real tokens.
    pub packing: bool,
    /// Saved activations (or, with checkpointing, the checkpointed layer inputs) held in host RAM
    /// between forward and backward (`--activation-offload`).
    pub activation_offload: bool,
    /// Liger's RMSNorm / SwiGLU / RoPE kernels in the decoder layers (`--liger-kernels`).
    pub liger_kernels: bool,
    /// Quantize fused MoE experts one expert at a time (transformers 4.x, some trainers);
    /// transformers 5 + bitsandbytes leave them in 16 bit.
    pub quantize_experts: bool,
    /// A 4-bit model built in 16 bits on the GPU first, then quantized Linear by Linear
    /// (`--quantize-after-load`); by default each weight is quantized as it loads, as
    /// `from_pretrained` with a `BitsAndBytesConfig` does.
    pub quantize_after_load: bool,
    pub runtime: Runtime,
    /// Data-parallel sharding (ZeRO / FSDP); `None` is one GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sharding: Option<Sharding>,
    /// PyTorch caching-allocator settings (`PYTORCH_CUDA_ALLOC_CONF`, `--alloc-conf`).
    #[serde(skip_serializing_if = "AllocConf::is_default")]
    pub alloc_conf: AllocConf,
}

impl Job {
    /// A job with the documented defaults for `method`: bf16 weights (NF4 for QLoRA), compute
    /// bf16, rank 16 on all linear layers with dropout 0.05, AdamW, batch 1, 2048 tokens, SDPA.
    pub fn new(model: ModelShape, method: Method) -> Job {
        let weights = if method == Method::Qlora {
            Precision::Nf4
        } else {
            Precision::Bf16
        };
        let model_eager_only = model.recipe.eager_only.is_some();
        Job {
            model,
            method,
            weights,
            compute: Precision::Bf16,
            lora: matches!(method, Method::Lora | Method::Qlora).then(|| LoraSettings {
                rank: 16,
                targets: all_linear(),
                dropout: 0.05,
            }),
            double_quant: true,
            optimizer: Optimizer::Adamw,
            batch: 1,
            seq: 2048,
            grad_checkpointing: false,
            attention: if model_eager_only {
                Attention::Eager
            } else {
                Attention::Sdpa
            },
            kbit_prep: false,
            loss: Loss::Ce,
            supervised_fraction: 1.0,
            packing: false,
            activation_offload: false,
            liger_kernels: false,
            quantize_experts: false,
            quantize_after_load: false,
            runtime: Runtime::Pytorch,
            sharding: None,
            alloc_conf: AllocConf::default(),
        }
    }

    /// Tokens in one micro-batch.
    pub fn tokens(&self) -> u128 {
        self.batch * self.seq
    }

    /// Rejects combinations that no library runs, with the flag to change.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Unsupported(msg));
        if self.batch == 0 {
            return bad("--batch must be at least 1".into());
        }
        if self.seq == 0 {
            return bad("--seq must be at least 1 token".into());
        }
        // Bounds that keep every product of the model (b·heads·s² scores × layers × bytes) far
        // inside u128 while allowing any real configuration (a 1T model at 64 × 1M tokens).
        const MAX_SEQ: u128 = 1 << 32;
        const MAX_TOKENS: u128 = 1 << 40;
        if self.seq > MAX_SEQ {
            return bad(format!(
                "--seq {} exceeds the supported 2^32 tokens",
                self.seq
            ));
        }
        if self
            .batch
            .checked_mul(self.seq)
            .map_or(true, |t| t > MAX_TOKENS)
        {
            return bad(format!(
                "--batch {} × --seq {} exceeds the supported 2^40 tokens per micro-batch",
                self.batch, self.seq
            ));
        }
        if !self.compute.is_float() {
            return bad(format!(
                "--compute {} is not a compute dtype: use fp32, fp16 or bf16",
                self.compute
            ));
        }
        match (self.method, self.weights) {
            (Method::Qlora, Precision::Nf4) => {}
            (Method::Qlora, w) => {
                return bad(format!(
                    "--method qlora stores the base in NF4; --weights {w} contradicts it (use --method lora --weights {w}, or drop --weights)"
                ))
            }
            (Method::Full, Precision::Int8 | Precision::Nf4) => {
                return bad(format!(
                    "--method full cannot train {} weights (no gradients through quantized storage); use --method lora or qlora",
                    self.weights
                ))
            }
            (Method::Lora, Precision::Nf4) => {
                return bad("--method lora --weights nf4 is QLoRA: use --method qlora".into())
            }
            _ => {}
        }
        if self.weights.is_float()
            && self.weights.float_bytes() < self.compute.float_bytes()
            && self.method != Method::Inference
        {
            return bad(format!(
                "--weights {} with --compute {} would upcast activations above the weights' precision; use --compute {} or --weights fp32",
                self.weights, self.compute, self.weights
            ));
        }
        if let Some(l) = &self.lora {
            if l.rank == 0 {
                return bad("--rank must be at least 1".into());
            }
            if l.targets.is_empty() {
                return bad("--lora-targets selects no module".into());
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return bad(format!("--lora-dropout {} must be in [0, 1)", l.dropout));
            }
            let modules = crate::estimate::resident::lora_modules(self);
            if modules.is_empty() {
                return bad(format!(
                    "--lora-targets selects no module of {} (peft raises NoMatchingPeftModuleError); its projections: {}",
                    self.model.name,
                    self.model.recipe.projection_names().join(", ")
                ));
            }
            if l.dropout > 0.0 && modules.iter().any(|m| m.param_wrapper) {
                return bad(format!(
                    "--lora-dropout {}: peft 0.21 adapts {}'s fused experts and router with lora.ParamWrapper, which raises \"lora.ParamWrapper does not work with lora_dropout != 0\"; pass --lora-dropout 0, or --lora-targets attention",
                    l.dropout, self.model.name
                ));
            }
            if let Some(router) = self.model.recipe.subclass_router() {
                if l.targets.contains(&LinearKind::Router)
                    && matches!(self.method, Method::Lora | Method::Qlora)
                {
                    return bad(format!(
                        "--lora-targets reaches {router}, an nn.Linear subclass that returns a tuple: peft 0.21 wraps it and the forward fails ('tuple' object has no attribute 'dtype'); name the modules instead, e.g. --lora-targets attention,mlp"
                    ));
                }
            }
            let max_rank = modules
                .iter()
                .filter(|m| !m.param_wrapper)
                .map(|m| m.in_f.min(m.out_f))
                .min()
                .unwrap_or(u128::MAX);
            if l.rank > max_rank {
                return bad(format!(
                    "--rank {} exceeds the smallest targeted layer dimension ({max_rank}): a LoRA update cannot have higher rank than its matrix",
                    l.rank
                ));
            }
        }
        if !(self.supervised_fraction > 0.0 && self.supervised_fraction <= 1.0) {
            return bad(format!(
                "--supervised-fraction {} must be in (0, 1]",
                self.supervised_fraction
            ));
        }
        if self.packing && self.attention != Attention::Flash && self.method != Method::Inference {
            // TRL sft_config.py (1.10.0.dev0) `padding_free`: "only supported with FlashAttention
            // 2 or 3"; transformers' sdpa/eager paths then build a packed-sequence mask over the
            // whole flattened row (masking_utils), which memplan does not model.
            return bad(format!(
                "--packing flattens the batch into one padding-free row, which only flash attention runs without a (b·s)² mask; use --attention flash (not {})",
                self.attention
            ));
        }
        if let Some(why) = &self.model.recipe.eager_only {
            if self.attention != Attention::Eager {
                return bad(format!(
                    "--attention {}: {why}; drop --attention or pass --attention eager",
                    self.attention
                ));
            }
        }
        if self.kbit_prep && self.method != Method::Qlora {
            return bad("--kbit-prep applies to --method qlora only".into());
        }
        if let Some(s) = &self.sharding {
            s.validate()?;
        }
        Ok(())
    }
}

/// peft's `all-linear`: every projection kind; which modules it reaches is the recipe's to say
/// (`nn.Linear` modules except the output layer, and fused expert parameters where peft maps
/// them through `target_parameters`).
pub fn all_linear() -> Vec<LinearKind> {
    LinearKind::ALL.to_vec()
}

/// The seven projections of a dense Llama-style layer (what `all-linear` reaches there).
pub fn dense_all_linear() -> Vec<LinearKind> {
    vec![
        LinearKind::Q,
        LinearKind::K,
        LinearKind::V,
        LinearKind::O,
        LinearKind::Gate,
        LinearKind::Up,
        LinearKind::Down,
    ]
}

/// Parses `--lora-targets`: `all-linear`, `attention`, `mlp`, or a comma list of module names.
pub fn parse_targets(text: &str) -> Result<Vec<LinearKind>, Error> {
    let invalid = || {
        Error::InvalidValue {
        flag: "--lora-targets",
        value: text.to_string(),
        expected: "all-linear, attention, mlp, or a comma list of module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, qkv_proj, gate_up_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, router)",
    }
    };
    let group = |name: &str| -> Option<Vec<LinearKind>> {
        Some(match name {
            "all-linear" | "all" => all_linear(),
            "attention" | "attn" => vec![
                LinearKind::Q,
                LinearKind::K,
                LinearKind::V,
                LinearKind::O,
                LinearKind::Qkv,
                LinearKind::QA,
                LinearKind::QB,
                LinearKind::KvA,
                LinearKind::KvB,
            ],
            "mlp" => vec![
                LinearKind::Gate,
                LinearKind::Up,
                LinearKind::Down,
                LinearKind::GateUp,
            ],
            _ => return None,
        })
    };
    let mut out = Vec::new();
    for name in text.split(',').map(str::trim) {
        match group(name) {
            Some(kinds) => out.extend(kinds),
            None => out.push(LinearKind::from_module_name(name).ok_or_else(invalid)?),
        }
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(invalid());
    }
    Ok(out)
}

macro_rules! keyword_enum {
    ($ty:ty, $flag:literal, $expected:literal, { $($text:literal => $variant:expr),+ $(,)? }) => {
        impl FromStr for $ty {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                match s.to_ascii_lowercase().replace('_', "-").as_str() {
                    $($text => Ok($variant),)+
                    _ => Err(Error::InvalidValue { flag: $flag, value: s.to_string(), expected: $expected }),
                }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let name = match self { $(v if *v == $variant => $text,)+ _ => unreachable!() };
                f.write_str(name)
            }
        }
    };
}

keyword_enum!(Method, "--method", "full, lora, qlora or inference", {
    "full" => Method::Full, "lora" => Method::Lora, "qlora" => Method::Qlora, "inference" => Method::Inference,
});
keyword_enum!(Optimizer, "--optimizer",
    "adamw, adamw-fused, adamw-8bit, paged-adamw, paged-adamw-8bit, sgd, sgd-momentum or adafactor", {
    "adamw" => Optimizer::Adamw, "adamw-fused" => Optimizer::AdamwFused,
    "adamw-8bit" => Optimizer::Adamw8bit, "paged-adamw" => Optimizer::PagedAdamw,
    "paged-adamw-8bit" => Optimizer::PagedAdamw8bit, "sgd" => Optimizer::Sgd,
    "sgd-momentum" => Optimizer::SgdMomentum, "adafactor" => Optimizer::Adafactor,
});
keyword_enum!(Loss, "--loss", "ce, chunked-nll, liger or cce", {
    "ce" => Loss::Ce, "chunked-nll" => Loss::ChunkedNll, "liger" => Loss::Liger, "cce" => Loss::Cce,
});
keyword_enum!(Attention, "--attention", "sdpa, eager or flash", {
    "sdpa" => Attention::Sdpa, "eager" => Attention::Eager, "flash" => Attention::Flash,
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::llama;

    #[test]
    fn keywords_round_trip() {
        for o in [
            "adamw",
            "adamw-fused",
            "adamw-8bit",
            "paged-adamw-8bit",
            "adafactor",
        ] {
            assert_eq!(o.parse::<Optimizer>().unwrap().to_string(), o);
        }
        assert_eq!(
            "adamw_8bit".parse::<Optimizer>().unwrap(),
            Optimizer::Adamw8bit
        );
        assert!("adam".parse::<Optimizer>().is_err());
    }

    #[test]
    fn targets_parse() {
        assert_eq!(parse_targets("attention").unwrap().len(), 9);
        assert_eq!(
            parse_targets("v_proj,q_proj").unwrap(),
            vec![LinearKind::Q, LinearKind::V]
        );
        assert!(parse_targets("qkv").is_err());
    }

    #[test]
    fn nonsense_combinations_are_rejected() {
        let m = llama(100, 64, 2, 4, 2, 128, false);
        let mut j = Job::new(m.clone(), Method::Qlora);
        j.weights = Precision::Fp32;
        assert!(j.validate().unwrap_err().to_string().contains("qlora"));
        let mut j = Job::new(m.clone(), Method::Full);
        j.weights = Precision::Nf4;
        assert!(j.validate().is_err());
        let mut j = Job::new(m.clone(), Method::Lora);
        j.lora.as_mut().unwrap().rank = 0;
        assert!(j.validate().unwrap_err().to_string().contains("--rank"));
        let mut j = Job::new(m, Method::Full);
        j.batch = 0;
        assert!(j.validate().unwrap_err().to_string().contains("--batch"));
    }
}
