//! Model architecture: from a Hugging Face `config.json` (or a preset, or a bare size) to a
//! resolved [`ModelShape`] with exact parameter counts.
//!
//! Counts follow the module layout of the transformers implementations (`LlamaForCausalLM`,
//! `MistralForCausalLM`, `MixtralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`):
//! token embedding V·h; per decoder layer q (h→heads·head_dim), k and v (h→kv_heads·head_dim),
//! o (heads·head_dim→h), a SwiGLU MLP (gate, up: h→i; down: i→h) or, for MoE, E such experts and
//! a router (h→E), two RMSNorm weights (h each; Qwen3 adds q/k norms of head_dim); a final norm
//! (h); and an lm_head (V·h) unless tied to the embedding.

pub mod bounds;
pub mod config;
pub mod presets;
pub mod size;

use serde::Serialize;

pub use crate::arch::Recipe;
pub use config::HfConfig;
pub use presets::{resolve_model, ModelSource};

/// Which projection a Linear layer is; the names are peft's `target_modules` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum LinearKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    Router,
    /// Phi-3's fused q, k, v projection.
    Qkv,
    /// Phi-3's fused gate and up projection; transformers 5's fused expert `gate_up_proj`.
    GateUp,
    /// DeepSeek MLA: `q_a_proj`, `q_b_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`.
    QA,
    QB,
    KvA,
    KvB,
}

impl LinearKind {
    pub const ALL: [LinearKind; 14] = [
        LinearKind::Q,
        LinearKind::K,
        LinearKind::V,
        LinearKind::O,
        LinearKind::Gate,
        LinearKind::Up,
        LinearKind::Down,
        LinearKind::Router,
        LinearKind::Qkv,
        LinearKind::GateUp,
        LinearKind::QA,
        LinearKind::QB,
        LinearKind::KvA,
        LinearKind::KvB,
    ];

    /// The module name transformers and peft use.
    pub fn module_name(self) -> &'static str {
        match self {
            LinearKind::Q => "q_proj",
            LinearKind::K => "k_proj",
            LinearKind::V => "v_proj",
            LinearKind::O => "o_proj",
            LinearKind::Gate => "gate_proj",
            LinearKind::Up => "up_proj",
            LinearKind::Down => "down_proj",
            LinearKind::Router => "router",
            LinearKind::Qkv => "qkv_proj",
            LinearKind::GateUp => "gate_up_proj",
            LinearKind::QA => "q_a_proj",
            LinearKind::QB => "q_b_proj",
            LinearKind::KvA => "kv_a_proj_with_mqa",
            LinearKind::KvB => "kv_b_proj",
        }
    }

    pub fn from_module_name(name: &str) -> Option<LinearKind> {
        Some(match name {
            "q_proj" | "q" => LinearKind::Q,
            "k_proj" | "k" => LinearKind::K,
            "v_proj" | "v" => LinearKind::V,
            "o_proj" | "o" => LinearKind::O,
            "gate_proj" | "w1" => LinearKind::Gate,
            "up_proj" | "w3" => LinearKind::Up,
            "down_proj" | "w2" => LinearKind::Down,
            "router" | "gate" => LinearKind::Router,
            "qkv_proj" => LinearKind::Qkv,
            "gate_up_proj" => LinearKind::GateUp,
            "q_a_proj" => LinearKind::QA,
            "q_b_proj" => LinearKind::QB,
            "kv_a_proj_with_mqa" => LinearKind::KvA,
            "kv_b_proj" => LinearKind::KvB,
            _ => return None,
        })
    }
}

/// Mixture-of-experts summary (top-k routing over E experts), for reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Moe {
    pub experts: u128,
    pub experts_per_token: u128,
}

/// A resolved model: its [`Recipe`] plus the summary dimensions reports and planners use (the
/// first layer's attention widths; the dense MLP width, or the expert width for MoE models).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    pub name: String,
    pub model_type: String,
    pub vocab: u128,
    pub hidden: u128,
    pub layers: u128,
    pub heads: u128,
    pub kv_heads: u128,
    pub head_dim: u128,
    /// MLP intermediate size (per expert for MoE).
    pub intermediate: u128,
    pub tie_embeddings: bool,
    pub moe: Option<Moe>,
    /// The architecture as data: what every number is derived from.
    #[serde(skip)]
    pub recipe: Recipe,
}

/// Parameter counts by where they live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    pub total: u128,
    pub embedding: u128,
    /// 0 when tied to the embedding.
    pub lm_head: u128,
    /// Weights of all decoder `nn.Linear` layers (what bitsandbytes quantizes).
    pub linear_weights: u128,
    /// Everything else: biases, norms, fused expert and router parameters, a frozen vision
    /// tower (kept in 16 bit by QLoRA).
    pub other: u128,
    /// The largest single decoder Linear weight (elements), for dequantization temporaries.
    pub largest_linear: u128,
}

impl ModelShape {
    /// A shape whose summary dimensions are read off `recipe`.
    pub fn from_recipe(name: &str, model_type: &str, recipe: Recipe) -> ModelShape {
        use crate::arch::OpKind;
        let mut heads = 0;
        let mut kv_heads = 0;
        let mut head_dim = 0;
        let mut inter = 0;
        let mut moe = None;
        for layer in &recipe.kinds {
            for op in &layer.ops {
                match &op.kind {
                    OpKind::Attention(a) if heads == 0 => {
                        heads = a.heads;
                        kv_heads = a.kv_heads;
                        head_dim = a.qk_head_dim;
                    }
                    OpKind::Glu(_) | OpKind::Mul if inter == 0 && moe.is_none() => {
                        inter = layer.tensors[op.output].width;
                    }
                    OpKind::Experts(e) => {
                        inter = e.inter;
                        moe = Some(Moe {
                            experts: e.experts,
                            experts_per_token: e.top_k,
                        });
                    }
                    _ => {}
                }
            }
        }
        ModelShape {
            name: name.to_string(),
            model_type: model_type.to_string(),
            vocab: recipe.vocab,
            hidden: recipe.hidden,
            layers: recipe.layers(),
            heads,
            kv_heads,
            head_dim,
            intermediate: inter,
            tie_embeddings: recipe.head.tied,
            moe,
            recipe,
        }
    }

    /// A Llama decoder (`LlamaForCausalLM`) of the given widths.
    #[allow(clippy::too_many_arguments)]
    pub fn llama(
        name: &str,
        vocab: u128,
        hidden: u128,
        layers: u128,
        heads: u128,
        kv_heads: u128,
        head_dim: u128,
        inter: u128,
        tie: bool,
    ) -> ModelShape {
        let cfg = serde_json::json!({
            "model_type": "llama",
            "vocab_size": vocab as u64,
            "hidden_size": hidden as u64,
            "num_hidden_layers": layers as u64,
            "num_attention_heads": heads as u64,
            "num_key_value_heads": kv_heads as u64,
            "head_dim": head_dim as u64,
            "intermediate_size": inter as u64,
            "tie_word_embeddings": tie,
        });
        HfConfig::from_value(cfg)
            .resolve(name, std::path::Path::new("llama"))
            .expect("a Llama of positive widths within bounds resolves")
    }

    pub fn q_dim(&self) -> u128 {
        self.heads * self.head_dim
    }

    pub fn kv_dim(&self) -> u128 {
        self.kv_heads * self.head_dim
    }

    /// The same architecture with `layers` decoder layers (the layer pattern repeated).
    pub fn with_layers(&self, layers: u128) -> ModelShape {
        let mut s = self.clone();
        let pattern = self.recipe.layer_kind.clone();
        s.recipe.layer_kind = (0..layers as usize)
            .map(|i| pattern[i % pattern.len().max(1)])
            .collect();
        s.layers = layers;
        s
    }

    pub fn param_counts(&self) -> ParamCounts {
        use crate::arch::ParamRole;
        let mut c = ParamCounts {
            total: 0,
            embedding: 0,
            lm_head: 0,
            linear_weights: 0,
            other: 0,
            largest_linear: 0,
        };
        for (p, n) in self.recipe.params() {
            let all = p.numel() * n;
            c.total += all;
            match p.role {
                ParamRole::Embedding => c.embedding += all,
                ParamRole::LmHead => c.lm_head += all,
                ParamRole::LinearWeight(_) => {
                    c.linear_weights += all;
                    c.largest_linear = c.largest_linear.max(p.numel());
                }
                _ => c.other += all,
            }
        }
        c
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn llama(
        vocab: u128,
        hidden: u128,
        layers: u128,
        heads: u128,
        kv: u128,
        inter: u128,
        tie: bool,
    ) -> ModelShape {
        ModelShape::llama(
            "test",
            vocab,
            hidden,
            layers,
            heads,
            kv,
            hidden / heads,
            inter,
            tie,
        )
    }

    #[test]
    fn tiny_model_counts_by_hand() {
        // V=10, h=4, 1 layer, 2 heads of 2, 1 kv head, i=6, untied:
        // emb 40 + head 40 + q 16 + k 8 + v 8 + o 16 + mlp 3·24 + norms 2·4 + final 4 = 212.
        let m = llama(10, 4, 1, 2, 1, 6, false);
        let c = m.param_counts();
        assert_eq!(c.total, 212);
        assert_eq!(c.linear_weights, 16 + 8 + 8 + 16 + 72);
        assert_eq!(c.other, 12);
        assert_eq!(c.largest_linear, 24);
    }
}
