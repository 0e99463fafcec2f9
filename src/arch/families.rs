//! config.json → [`Recipe`], one function per architecture family.
//!
//! Each follows the module layout of its transformers 5.17 modeling file
//! (`src/transformers/models/<family>/modeling_<family>.py`) and the defaults of its
//! `configuration_<family>.py`. Parameter counts derived from these recipes equal the meta-device
//! counts of `AutoModelForCausalLM.from_config` for every config in `tests/data/reference/configs`
//! (a test holds them to `params.tsv` there).

use std::path::Path;

use serde_json::Value;

use super::decoder::{build, LayerSpec, Mlp, Norms, QkNorm, QkvProj};
use super::{
    Act, AttnSpec, Experts, Head, LayerRecipe, Module, Norm, NormKind, Param, ParamRole, Proj,
    Recipe, Router,
};
use crate::error::Error;
use crate::model::LinearKind;

/// The model types memplan builds a recipe for.
pub const SUPPORTED: [&str; 19] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "granite",
    "phi3",
    "olmo2",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "mixtral",
    "qwen3_moe",
    "phimoe",
    "gpt_oss",
    "deepseek_v2",
    "deepseek_v3",
    "llama4",
    "llama4_text",
    "gemma",
];

/// Model types refused with a reason (the design does not cover them yet).
pub fn refusal(model_type: &str) -> Option<&'static str> {
    Some(match model_type {
        "gpt2" => "GPT-2 uses Conv1D (not nn.Linear) projections, learned absolute positions and LayerNorm with GELU MLPs; memplan does not model that stack",
        "falcon" => "Falcon uses a fused query_key_value projection with multi-query attention and a parallel attention/MLP block; memplan does not model that layout",
        _ => return None,
    })
}

/// Largest value accepted for each kind of config field: about 16× what released models use,
/// so a typo or a corrupt file is an error, never a 4 GB walk or a wrapped product.
fn bound(field: &str) -> u128 {
    match field {
        "vocab_size" => 1 << 24,
        "num_hidden_layers" => 1 << 12,
        "num_local_experts" | "num_experts" | "n_routed_experts" => 1 << 14,
        "num_attention_heads" | "num_key_value_heads" => 1 << 12,
        _ => 1 << 20,
    }
}

/// Typed, bounded access to a config object (`text_config` for multimodal wrappers).
pub struct Fields<'a> {
    v: &'a Value,
    origin: &'a Path,
    /// `text_config.` when reading a nested text model, for error messages.
    prefix: &'static str,
}

impl<'a> Fields<'a> {
    pub fn new(v: &'a Value, origin: &'a Path, prefix: &'static str) -> Fields<'a> {
        Fields { v, origin, prefix }
    }

    pub fn error(&self, field: &str, problem: String) -> Error {
        Error::ConfigField {
            path: self.origin.to_path_buf(),
            field: format!("{}{field}", self.prefix),
            problem,
        }
    }

    /// A non-negative integer field, `None` when absent or null.
    pub fn opt(&self, field: &str) -> Result<Option<u128>, Error> {
        match self.v.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => {
                let n = x.as_u64().ok_or_else(|| {
                    self.error(field, format!("must be a non-negative integer, not {x}"))
                })?;
                let n = u128::from(n);
                let max = bound(field);
                if n > max {
                    return Err(self.error(
                        field,
                        format!("is {n}, beyond the {max} memplan accepts (no released model comes near)"),
                    ));
                }
                Ok(Some(n))
            }
        }
    }

    /// A positive integer field that must be present.
    pub fn need(&self, field: &str) -> Result<u128, Error> {
        match self.opt(field)? {
            None => Err(self.error(field, "is missing".into())),
            Some(0) => Err(self.error(field, "must be positive".into())),
            Some(n) => Ok(n),
        }
    }

    /// A positive integer field with a default.
    pub fn or(&self, field: &str, default: u128) -> Result<u128, Error> {
        match self.opt(field)? {
            None => Ok(default),
            Some(0) => Err(self.error(field, "must be positive".into())),
            Some(n) => Ok(n),
        }
    }

    pub fn flag(&self, field: &str, default: bool) -> Result<bool, Error> {
        match self.v.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(x) => Err(self.error(field, format!("must be true or false, not {x}"))),
        }
    }

    /// Whether a float field is set to a non-null value.
    pub fn is_set(&self, field: &str) -> bool {
        self.v.get(field).is_some_and(|x| !x.is_null())
    }

    pub fn str(&self, field: &str) -> Option<&'a str> {
        self.v.get(field).and_then(Value::as_str)
    }

    /// `layer_types` (`"sliding_attention"` / `"full_attention"` per layer), when given.
    pub fn layer_types(&self, layers: u128) -> Result<Option<Vec<bool>>, Error> {
        let Some(list) = self.v.get("layer_types").and_then(Value::as_array) else {
            return Ok(None);
        };
        if list.len() as u128 != layers {
            return Err(self.error(
                "layer_types",
                format!("has {} entries for {layers} layers", list.len()),
            ));
        }
        list.iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") | Some("chunked_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(self.error("layer_types", format!("has an unknown entry {t}"))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// A list of layer indices (`mlp_only_layers`).
    pub fn index_list(&self, field: &str) -> Result<Vec<u128>, Error> {
        match self.v.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(u128::from)
                        .ok_or_else(|| self.error(field, "must list layer indices".into()))
                })
                .collect(),
            Some(x) => Err(self.error(field, format!("must be a list, not {x}"))),
        }
    }
}

/// The common shape of a family's attention: heads, kv heads, head_dim.
struct Dims {
    vocab: u128,
    hidden: u128,
    layers: u128,
    heads: u128,
    kv_heads: u128,
    head_dim: u128,
    inter: u128,
}

fn dims(f: &Fields, inter_field: &str) -> Result<Dims, Error> {
    let hidden = f.need("hidden_size")?;
    let heads = f.need("num_attention_heads")?;
    let kv_heads = f.or("num_key_value_heads", heads)?;
    if heads % kv_heads != 0 {
        return Err(f.error(
            "num_key_value_heads",
            format!("({kv_heads}) must divide num_attention_heads ({heads})"),
        ));
    }
    let head_dim = match f.opt("head_dim")? {
        Some(0) => return Err(f.error("head_dim", "must be positive".into())),
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(f.error(
                "head_dim",
                "is missing and hidden_size is not divisible by num_attention_heads".into(),
            ))
        }
    };
    Ok(Dims {
        vocab: f.need("vocab_size")?,
        hidden,
        layers: f.need("num_hidden_layers")?,
        heads,
        kv_heads,
        head_dim,
        inter: f.need(inter_field)?,
    })
}

/// The experts count (`field`) and `num_experts_per_tok`, checked against each other.
fn routing(f: &Fields, field: &str) -> Result<(u128, u128), Error> {
    let e = f.need(field)?;
    let k = f.need("num_experts_per_tok")?;
    if k > e {
        return Err(f.error(
            "num_experts_per_tok",
            format!("({k}) exceeds {field} ({e})"),
        ));
    }
    Ok((e, k))
}

fn attn(d: &Dims, window: Option<u128>) -> AttnSpec {
    AttnSpec {
        heads: d.heads,
        kv_heads: d.kv_heads,
        qk_head_dim: d.head_dim,
        v_head_dim: d.head_dim,
        window,
        sinks: false,
        softcap: false,
    }
}

fn dense(inter: u128, fused: bool, bias: bool, act: Act) -> Mlp {
    Mlp::Dense {
        inter,
        fused_gate_up: fused,
        bias,
        act,
    }
}

fn router(hidden: u128, experts: u128, top_k: u128, module: Module, bias: bool) -> Router {
    Router {
        proj: Proj {
            name: "router",
            kind: LinearKind::Router,
            in_f: hidden,
            out_f: experts,
            bias,
            module,
        },
        experts,
        top_k,
    }
}

/// A recipe whose layers alternate between a few specs.
struct Builder {
    kinds: Vec<(String, LayerSpec)>,
    layer_kind: Vec<usize>,
}

impl Builder {
    fn new() -> Builder {
        Builder {
            kinds: Vec::new(),
            layer_kind: Vec::new(),
        }
    }

    fn push(&mut self, name: &str, spec: LayerSpec) {
        let k = match self.kinds.iter().position(|(_, s)| *s == spec) {
            Some(k) => k,
            None => {
                self.kinds.push((name.to_string(), spec));
                self.kinds.len() - 1
            }
        };
        self.layer_kind.push(k);
    }

    fn finish(self, class: &str, d: &Dims, final_norm: Norm, head: Head) -> Recipe {
        Recipe {
            class: class.to_string(),
            vocab: d.vocab,
            hidden: d.hidden,
            kinds: self
                .kinds
                .iter()
                .map(|(n, s)| build(n, s))
                .collect::<Vec<LayerRecipe>>(),
            layer_kind: self.layer_kind,
            final_norm,
            head,
            vision: Vec::new(),
            peft_moe_conversion: false,
            notes: Vec::new(),
            eager_only: None,
            use_cache: true,
        }
    }
}

fn head(tied: bool) -> Head {
    Head {
        tied,
        bias: false,
        softcap: false,
        scaling: false,
        embed_scale: false,
    }
}

/// Builds the recipe of `model_type` from its config object.
pub fn recipe(model_type: &str, f: &Fields) -> Result<Recipe, Error> {
    let mut r = family(model_type, f)?;
    r.use_cache = f.flag("use_cache", true)?;
    Ok(r)
}

fn family(model_type: &str, f: &Fields) -> Result<Recipe, Error> {
    match model_type {
        "llama" | "mistral" | "qwen2" | "qwen3" | "granite" => llama_like(model_type, f),
        "phi3" => phi3(f),
        "olmo2" => olmo2(f),
        "gemma" | "gemma2" | "gemma3_text" => gemma(model_type, f),
        "mixtral" | "qwen3_moe" | "phimoe" => moe(model_type, f),
        "gpt_oss" => gpt_oss(f),
        "deepseek_v2" | "deepseek_v3" => deepseek(model_type, f),
        "llama4_text" => llama4_text(f),
        other => Err(f.error(
            "model_type",
            match refusal(other) {
                Some(why) => format!("is '{other}': {why}"),
                None => format!(
                    "is '{other}', which memplan does not model; supported: {}",
                    SUPPORTED.join(", ")
                ),
            },
        )),
    }
}

/// The sliding window of Mistral-style configs (all layers), if enabled.
fn uniform_window(model_type: &str, f: &Fields) -> Result<Option<u128>, Error> {
    let w = f.opt("sliding_window")?;
    Ok(match model_type {
        // Qwen2/3 enable it only with `use_sliding_window` (and then for layers past
        // max_window_layers, which memplan treats as all layers: the released configs disable it).
        "qwen2" | "qwen3" | "qwen3_moe" if !f.flag("use_sliding_window", false)? => None,
        _ => w,
    })
}

/// Llama (`LlamaDecoderLayer`), Mistral, Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm),
/// Granite (Llama with residual, embedding and logits multipliers).
fn llama_like(model_type: &str, f: &Fields) -> Result<Recipe, Error> {
    let d = dims(f, "intermediate_size")?;
    // configuration_qwen2.py: biases on q, k, v only; Llama-family `attention_bias` puts them on
    // q, k, v and o.
    let (qkv_bias, o_bias) = match model_type {
        "qwen2" => (true, false),
        _ => {
            let b = f.flag("attention_bias", false)?;
            (b, b)
        }
    };
    let granite = model_type == "granite";
    let spec = LayerSpec {
        hidden: d.hidden,
        norms: Norms::pre(NormKind::Rms),
        qkv: QkvProj::Separate { bias: qkv_bias },
        qk_norm: if model_type == "qwen3" {
            QkNorm::PerHead(NormKind::Rms)
        } else {
            QkNorm::None
        },
        attn: attn(&d, uniform_window(model_type, f)?),
        o_bias,
        mlp: dense(d.inter, false, f.flag("mlp_bias", false)?, Act::Silu),
        residual_scale: granite,
    };
    let mut b = Builder::new();
    for _ in 0..d.layers {
        b.push("decoder", spec);
    }
    let class = match model_type {
        "llama" => "LlamaForCausalLM",
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        _ => "GraniteForCausalLM",
    };
    let mut h = head(f.flag("tie_word_embeddings", granite)?);
    h.embed_scale = granite;
    h.scaling = granite;
    Ok(b.finish(class, &d, Norm::new(NormKind::Rms, d.hidden), h))
}

/// Phi-3 and Phi-4 (`Phi3DecoderLayer`): fused `qkv_proj` and `gate_up_proj`.
fn phi3(f: &Fields) -> Result<Recipe, Error> {
    let d = dims(f, "intermediate_size")?;
    let bias = f.flag("attention_bias", false)?;
    let spec = LayerSpec {
        hidden: d.hidden,
        norms: Norms::pre(NormKind::Rms),
        qkv: QkvProj::Fused { bias },
        qk_norm: QkNorm::None,
        attn: attn(&d, f.opt("sliding_window")?),
        o_bias: bias,
        mlp: dense(d.inter, true, false, Act::Silu),
        residual_scale: false,
    };
    let mut b = Builder::new();
    for _ in 0..d.layers {
        b.push("decoder", spec);
    }
    Ok(b.finish(
        "Phi3ForCausalLM",
        &d,
        Norm::new(NormKind::Rms, d.hidden),
        head(f.flag("tie_word_embeddings", false)?),
    ))
}

/// OLMo-2 (`Olmo2DecoderLayer`): post-norm (the branch output is normalised before the add) and
/// RMSNorm over the full q and k widths.
fn olmo2(f: &Fields) -> Result<Recipe, Error> {
    let d = dims(f, "intermediate_size")?;
    let bias = f.flag("attention_bias", false)?;
    let spec = LayerSpec {
        hidden: d.hidden,
        norms: Norms {
            kind: NormKind::RmsFp32Weight,
            pre_attn: false,
            post_attn: true,
            pre_mlp: false,
            post_mlp: true,
        },
        qkv: QkvProj::Separate { bias },
        qk_norm: QkNorm::Full(NormKind::RmsFp32Weight),
        attn: attn(&d, None),
        o_bias: bias,
        mlp: dense(d.inter, false, false, Act::Silu),
        residual_scale: false,
    };
    let mut b = Builder::new();
    for _ in 0..d.layers {
        b.push("decoder", spec);
    }
    Ok(b.finish(
        "Olmo2ForCausalLM",
        &d,
        Norm::new(NormKind::RmsFp32Weight, d.hidden),
        head(f.flag("tie_word_embeddings", false)?),
    ))
}

/// Gemma 2 and Gemma 3 text (`Gemma2DecoderLayer`, `Gemma3DecoderLayer`): four RMSNorms per
/// layer computed in fp32 with `(1 + weight)`, GeGLU, embeddings scaled by sqrt(hidden), tied
/// lm_head, alternating sliding-window and global layers; Gemma 2 soft-caps attention scores
/// and the final logits; Gemma 3 adds per-head q/k norms.
fn gemma(model_type: &str, f: &Fields) -> Result<Recipe, Error> {
    let d = dims(f, "intermediate_size")?;
    let gemma3 = model_type == "gemma3_text";
    let window = f.opt("sliding_window")?;
    // configuration_gemma2.py: layer i is sliding when (i + 1) % 2 == 1; configuration_gemma3.py:
    // global every `sliding_window_pattern` (6) layers.
    let sliding: Vec<bool> = match f.layer_types(d.layers)? {
        Some(t) => t,
        None => (0..d.layers)
            .map(|i| match model_type {
                "gemma2" => (i + 1) % 2 == 1,
                "gemma3_text" => {
                    let p = f.or("sliding_window_pattern", 6).unwrap_or(6);
                    (i + 1) % p != 0
                }
                _ => false,
            })
            .collect(),
    };
    let mut b = Builder::new();
    for &s in &sliding {
        let mut a = attn(&d, if s { window } else { None });
        a.softcap = f.is_set("attn_logit_softcapping");
        let spec = LayerSpec {
            hidden: d.hidden,
            norms: Norms {
                kind: NormKind::RmsGemma,
                pre_attn: true,
                post_attn: model_type != "gemma",
                pre_mlp: true,
                post_mlp: model_type != "gemma",
            },
            qkv: QkvProj::Separate {
                bias: f.flag("attention_bias", false)?,
            },
            qk_norm: if gemma3 {
                QkNorm::PerHead(NormKind::RmsGemma)
            } else {
                QkNorm::None
            },
            attn: a,
            o_bias: f.flag("attention_bias", false)?,
            mlp: dense(d.inter, false, false, Act::GeluTanh),
            residual_scale: false,
        };
        b.push(
            if s && window.is_some() {
                "sliding"
            } else {
                "global"
            },
            spec,
        );
    }
    let mut h = head(f.flag("tie_word_embeddings", true)?);
    h.embed_scale = true;
    h.softcap = f.is_set("final_logit_softcapping");
    let class = match model_type {
        "gemma" => "GemmaForCausalLM",
        "gemma2" => "Gemma2ForCausalLM",
        _ => "Gemma3ForCausalLM",
    };
    let mut r = b.finish(class, &d, Norm::new(NormKind::RmsGemma, d.hidden), h);
    if model_type == "gemma2" && f.is_set("attn_logit_softcapping") {
        r.notes.push("attention-logit soft-capping applies under eager attention only (transformers' SDPA path ignores `softcap`)".into());
    }
    Ok(r)
}

/// Mixtral, Qwen3-MoE and Phi-3.5-MoE: every (sparse) layer's MLP is a top-k MoE with fused
/// experts (`MixtralExperts`, `Qwen3MoeExperts`, `PhimoeExperts`) and a router parameter.
fn moe(model_type: &str, f: &Fields) -> Result<Recipe, Error> {
    let inter_field = if model_type == "qwen3_moe" {
        "moe_intermediate_size"
    } else {
        "intermediate_size"
    };
    let d = dims(f, inter_field)?;
    let experts_field = if model_type == "qwen3_moe" {
        "num_experts"
    } else {
        "num_local_experts"
    };
    let (e, k) = routing(f, experts_field)?;
    let phimoe = model_type == "phimoe";
    let bias = f.flag("attention_bias", phimoe)?;
    let norm = if phimoe {
        NormKind::Layer
    } else {
        NormKind::Rms
    };
    // phimoe's router is `PhimoeTopKRouter(nn.Linear)`; Mixtral's and Qwen3-MoE's a parameter.
    let router_module = if phimoe {
        Module::LinearSubclass
    } else {
        Module::Param
    };
    let moe_mlp = Mlp::Moe {
        router: router(d.hidden, e, k, router_module, false),
        experts: Experts {
            experts: e,
            top_k: k,
            hidden: d.hidden,
            inter: d.inter,
            bias: false,
            act: Act::Silu,
            fp32_weights: model_type == "mixtral",
            dense_all: false,
        },
        shared_inter: None,
    };
    let qwen = model_type == "qwen3_moe";
    let mlp_only = f.index_list("mlp_only_layers")?;
    let step = if qwen {
        f.or("decoder_sparse_step", 1)?
    } else {
        1
    };
    let dense_inter = if qwen {
        f.or("intermediate_size", d.inter)?
    } else {
        d.inter
    };
    let mut b = Builder::new();
    for i in 0..d.layers {
        let sparse = !mlp_only.contains(&i) && (i + 1) % step == 0;
        let spec = LayerSpec {
            hidden: d.hidden,
            norms: Norms::pre(norm),
            qkv: QkvProj::Separate { bias },
            qk_norm: if qwen {
                QkNorm::PerHead(NormKind::Rms)
            } else {
                QkNorm::None
            },
            attn: attn(&d, uniform_window(model_type, f)?),
            o_bias: bias,
            mlp: if sparse {
                moe_mlp
            } else {
                dense(dense_inter, false, false, Act::Silu)
            },
            residual_scale: false,
        };
        b.push(if sparse { "moe" } else { "dense" }, spec);
    }
    let class = match model_type {
        "mixtral" => "MixtralForCausalLM",
        "qwen3_moe" => "Qwen3MoeForCausalLM",
        _ => "PhimoeForCausalLM",
    };
    let mut h = head(f.flag("tie_word_embeddings", false)?);
    h.bias = phimoe && f.flag("lm_head_bias", false)?;
    let mut r = b.finish(class, &d, Norm::new(norm, d.hidden), h);
    r.peft_moe_conversion = !phimoe;
    Ok(r)
}

/// gpt-oss (`GptOssDecoderLayer`): attention with biases and per-head sinks, alternating
/// sliding (128) and full layers, a router with bias, fused experts with biases and the clamped
/// SwiGLU. The MXFP4 checkpoint is dequantized to bf16 for training (`Mxfp4Config`).
fn gpt_oss(f: &Fields) -> Result<Recipe, Error> {
    let d = dims(f, "intermediate_size")?;
    let (e, k) = routing(f, "num_local_experts")?;
    let window = f.opt("sliding_window")?;
    let sliding = match f.layer_types(d.layers)? {
        Some(t) => t,
        None => (0..d.layers).map(|i| i % 2 == 0).collect(),
    };
    let mut b = Builder::new();
    for &s in &sliding {
        let mut a = attn(&d, if s { window } else { None });
        a.sinks = true;
        let spec = LayerSpec {
            hidden: d.hidden,
            norms: Norms::pre(NormKind::RmsFp32Weight),
            qkv: QkvProj::Separate {
                bias: f.flag("attention_bias", true)?,
            },
            qk_norm: QkNorm::None,
            attn: a,
            o_bias: f.flag("attention_bias", true)?,
            mlp: Mlp::Moe {
                router: router(d.hidden, e, k, Module::Param, true),
                experts: Experts {
                    experts: e,
                    top_k: k,
                    hidden: d.hidden,
                    inter: d.inter,
                    bias: true,
                    act: Act::ClampedSwiglu,
                    fp32_weights: false,
                    dense_all: false,
                },
                shared_inter: None,
            },
            residual_scale: false,
        };
        b.push(if s { "sliding" } else { "full" }, spec);
    }
    let mut r = b.finish(
        "GptOssForCausalLM",
        &d,
        Norm::new(NormKind::RmsFp32Weight, d.hidden),
        head(f.flag("tie_word_embeddings", false)?),
    );
    r.eager_only = Some(
        "transformers 5.17 has no SDPA path for gpt-oss (attention sinks; `_supports_sdpa = False`), so it trains with eager attention".into(),
    );
    r.notes.push("the MXFP4 checkpoint is dequantized to bf16 for training (transformers' Mxfp4 quantizer is not trainable; `dequantize=True`)".into());
    Ok(r)
}

/// DeepSeek-V2 and V3 (`DeepseekV3DecoderLayer`): multi-head latent attention, the first
/// `first_k_dense_replace` layers dense, the rest MoE with shared experts. V3's
/// `e_score_correction_bias` is a buffer (not a parameter); its multi-token-prediction layer is
/// not built by transformers.
fn deepseek(model_type: &str, f: &Fields) -> Result<Recipe, Error> {
    let d = dims(f, "intermediate_size")?;
    let nope = f.need("qk_nope_head_dim")?;
    let rope = f.need("qk_rope_head_dim")?;
    let vd = f.need("v_head_dim")?;
    let kv_lora_rank = f.need("kv_lora_rank")?;
    let q_lora_rank = f.opt("q_lora_rank")?;
    let (e, k) = routing(f, "n_routed_experts")?;
    let mi = f.need("moe_intermediate_size")?;
    let shared = f.opt("n_shared_experts")?.unwrap_or(0);
    let first_dense = f.opt("first_k_dense_replace")?.unwrap_or(0);
    let freq = f.or("moe_layer_freq", 1)?;
    let a = AttnSpec {
        heads: d.heads,
        kv_heads: d.heads,
        qk_head_dim: nope + rope,
        v_head_dim: vd,
        window: None,
        sinks: false,
        softcap: false,
    };
    let qkv = QkvProj::Mla {
        q_lora_rank,
        kv_lora_rank,
        rope_dim: rope,
        nope_dim: nope,
    };
    let bias = f.flag("attention_bias", false)?;
    let mut b = Builder::new();
    for i in 0..d.layers {
        let sparse = i >= first_dense && i % freq == 0;
        let spec = LayerSpec {
            hidden: d.hidden,
            norms: Norms::pre(NormKind::Rms),
            qkv,
            qk_norm: QkNorm::None,
            attn: a,
            o_bias: bias,
            mlp: if sparse {
                Mlp::Moe {
                    router: router(d.hidden, e, k, Module::Param, false),
                    experts: Experts {
                        experts: e,
                        top_k: k,
                        hidden: d.hidden,
                        inter: mi,
                        bias: false,
                        act: Act::Silu,
                        fp32_weights: true,
                        dense_all: false,
                    },
                    shared_inter: (shared > 0).then_some(shared * mi),
                }
            } else {
                dense(d.inter, false, false, Act::Silu)
            },
            residual_scale: false,
        };
        b.push(if sparse { "moe" } else { "dense" }, spec);
    }
    let class = if model_type == "deepseek_v2" {
        "DeepseekV2ForCausalLM"
    } else {
        "DeepseekV3ForCausalLM"
    };
    let mut r = b.finish(
        class,
        &d,
        Norm::new(NormKind::Rms, d.hidden),
        head(f.flag("tie_word_embeddings", false)?),
    );
    r.peft_moe_conversion = true;
    Ok(r)
}

/// Llama 4 text (`Llama4TextDecoderLayer`): MoE every `interleave_moe_layer_step` layers (a
/// router `nn.Linear`, fused experts, one shared expert), dense layers of
/// `intermediate_size_mlp`, a weightless L2 norm on q and k in RoPE layers.
fn llama4_text(f: &Fields) -> Result<Recipe, Error> {
    let d = dims(f, "intermediate_size")?;
    let (e, k) = routing(f, "num_local_experts")?;
    let step = f.or("interleave_moe_layer_step", 1)?;
    let dense_inter = f.or("intermediate_size_mlp", d.inter)?;
    let nope = f.index_list("no_rope_layers")?;
    let qk = f.flag("use_qk_norm", true)?;
    let chunk = f.opt("attention_chunk_size")?;
    let mut b = Builder::new();
    for i in 0..d.layers {
        let sparse = (i + 1) % step == 0;
        // configuration_llama4.py: `no_rope_layers` lists 1 for RoPE layers, 0 for NoPE ones
        // (default: every 4th layer is NoPE).
        let rope_layer = if nope.is_empty() {
            (i + 1) % 4 != 0
        } else {
            nope.get(i as usize).map_or(true, |&v| v != 0)
        };
        let spec = LayerSpec {
            hidden: d.hidden,
            norms: Norms::pre(NormKind::Rms),
            qkv: QkvProj::Separate {
                bias: f.flag("attention_bias", false)?,
            },
            qk_norm: if qk && rope_layer {
                QkNorm::PerHead(NormKind::L2)
            } else {
                QkNorm::None
            },
            // RoPE layers attend in chunks of `attention_chunk_size` (a materialised chunked
            // mask once the sequence reaches it, like a window).
            attn: attn(&d, if rope_layer { chunk } else { None }),
            o_bias: f.flag("attention_bias", false)?,
            mlp: if sparse {
                Mlp::Moe {
                    router: router(d.hidden, e, k, Module::LinearSubclass, false),
                    experts: Experts {
                        experts: e,
                        top_k: k,
                        hidden: d.hidden,
                        inter: d.inter,
                        bias: false,
                        act: Act::Silu,
                        fp32_weights: false,
                        dense_all: true,
                    },
                    shared_inter: Some(d.inter),
                }
            } else {
                dense(dense_inter, false, false, Act::Silu)
            },
            residual_scale: false,
        };
        b.push(if sparse { "moe" } else { "dense" }, spec);
    }
    Ok(b.finish(
        "Llama4ForCausalLM",
        &d,
        Norm::new(NormKind::Rms, d.hidden),
        head(f.flag("tie_word_embeddings", false)?),
    ))
}

fn vlin(name: &'static str, in_f: u128, out_f: u128, bias: bool, n: u128) -> [(Param, u128); 2] {
    [
        (
            Param {
                name,
                rows: out_f,
                cols: in_f,
                copies: 1,
                role: ParamRole::VisionLinear(LinearKind::from_module_name(name)),
            },
            n,
        ),
        (
            Param {
                name: "vision.bias",
                rows: 1,
                cols: if bias { out_f } else { 0 },
                copies: 1,
                role: ParamRole::VisionOther,
            },
            n,
        ),
    ]
}

fn vother(n: u128) -> (Param, u128) {
    (
        Param {
            name: "vision.other",
            rows: 1,
            cols: n,
            copies: 1,
            role: ParamRole::VisionOther,
        },
        1,
    )
}

/// Parameters of a SigLIP vision tower and Gemma 3's `multi_modal_projector`
/// (`modeling_siglip.py` `SiglipVisionTransformer` without its pooling head
/// (`vision_use_head=False`); `modeling_gemma3.py` `Gemma3MultiModalProjector`: a plain
/// [vision_h, text_h] parameter and a Gemma RMSNorm of vision_h).
pub fn gemma3_vision(v: &Fields, text_hidden: u128) -> Result<Vec<(Param, u128)>, Error> {
    let h = v.need("hidden_size")?;
    let i = v.need("intermediate_size")?;
    let layers = v.need("num_hidden_layers")?;
    let patch = v.need("patch_size")?;
    let image = v.need("image_size")?;
    let channels = v.or("num_channels", 3)?;
    let patches = (image / patch) * (image / patch);
    let mut out = Vec::new();
    // Patch Conv2d (weight + bias), position embedding; per layer 2 LayerNorms; post_layernorm;
    // the projector parameter and its norm.
    out.push(vother(
        channels * patch * patch * h
            + h
            + patches * h
            + layers * 4 * h
            + 2 * h
            + h * text_hidden
            + h,
    ));
    for name in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        out.extend(vlin(name, h, h, true, layers));
    }
    out.extend(vlin("fc1", h, i, true, layers));
    out.extend(vlin("fc2", i, h, true, layers));
    out.retain(|(p, _)| p.numel() > 0);
    Ok(out)
}

/// Parameters of Llama 4's vision model and projector (`modeling_llama4.py`
/// `Llama4VisionModel`: an unfold-conv patch `nn.Linear` without bias, a class embedding,
/// (patches + 1) positional embeddings, pre/post LayerNorms, encoder layers with biased q/k/v/o
/// and fc1/fc2 and two LayerNorms, the pixel-shuffle MLP adapter (fc1 intermediate →
/// projector_input_dim, fc2 projector_output_dim², no biases); `Llama4MultiModalProjector`: one
/// vision_output_dim → text hidden `nn.Linear` without bias).
pub fn llama4_vision(v: &Fields, text_hidden: u128) -> Result<Vec<(Param, u128)>, Error> {
    let h = v.need("hidden_size")?;
    let i = v.need("intermediate_size")?;
    let layers = v.need("num_hidden_layers")?;
    let patch = v.need("patch_size")?;
    let image = v.need("image_size")?;
    let channels = v.or("num_channels", 3)?;
    let proj_in = v.need("projector_input_dim")?;
    let proj_out = v.need("projector_output_dim")?;
    let out_dim = v.need("vision_output_dim")?;
    let patches = (image / patch) * (image / patch) + 1;
    let mut out = vec![vother(h + patches * h + 4 * h + layers * 4 * h)];
    out.extend(vlin(
        "patch_embedding",
        channels * patch * patch,
        h,
        false,
        1,
    ));
    for name in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        out.extend(vlin(name, h, h, true, layers));
    }
    out.extend(vlin("fc1", h, i, true, layers));
    out.extend(vlin("fc2", i, h, true, layers));
    out.extend(vlin("vision_adapter.fc1", i, proj_in, false, 1));
    out.extend(vlin("vision_adapter.fc2", proj_out, proj_out, false, 1));
    out.extend(vlin(
        "multi_modal_projector",
        out_dim,
        text_hidden,
        false,
        1,
    ));
    out.retain(|(p, _)| p.numel() > 0);
    Ok(out)
}
