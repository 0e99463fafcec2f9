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
}

impl LinearKind {
    /// The module name transformers and peft use (Mixtral's experts are w1/w3/w2).
    pub fn module_name(self) -> &'static str {
        match self {
            LinearKind::Q => "q_proj",
            LinearKind::K => "k_proj",
            LinearKind::V => "v_proj",
            LinearKind::O => "o_proj",
            LinearKind::Gate => "gate_proj",
            LinearKind::Up => "up_proj",
            LinearKind::Down => "down_proj",
            LinearKind::Router => "gate",
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
            _ => return None,
        })
    }
}

/// Mixture-of-experts MLP (Mixtral-style: top-k routing over E SwiGLU experts).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Moe {
    pub experts: u128,
    pub experts_per_token: u128,
}

/// A resolved decoder-only transformer shape. All sizes are element counts.
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
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3-style RMSNorm on q and k (head_dim weights each).
    pub qk_norm: bool,
    pub moe: Option<Moe>,
}

/// One Linear module of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Linear {
    pub kind: LinearKind,
    pub in_features: u128,
    pub out_features: u128,
    pub bias: bool,
    /// How many of these a layer has (E for expert weights, else 1).
    pub copies: u128,
    /// Tokens each copy sees per token of the batch (k/E for experts, else 1), as a fraction
    /// `tokens_num / tokens_den`.
    pub tokens_num: u128,
    pub tokens_den: u128,
}

impl Linear {
    pub fn weight_params(&self) -> u128 {
        self.in_features * self.out_features * self.copies
    }

    pub fn bias_params(&self) -> u128 {
        if self.bias {
            self.out_features * self.copies
        } else {
            0
        }
    }
}

/// Parameter counts by where they live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    pub total: u128,
    pub embedding: u128,
    /// 0 when tied to the embedding.
    pub lm_head: u128,
    /// Weights of all decoder Linear layers (what QLoRA quantizes).
    pub linear_weights: u128,
    /// Linear biases, norm weights: kept in 16 bit by QLoRA.
    pub other: u128,
    /// The largest single decoder Linear weight (elements), for dequantization temporaries.
    pub largest_linear: u128,
}

impl ModelShape {
    pub fn q_dim(&self) -> u128 {
        self.heads * self.head_dim
    }

    pub fn kv_dim(&self) -> u128 {
        self.kv_heads * self.head_dim
    }

    /// The Linear modules of one decoder layer, in forward order.
    pub fn layer_linears(&self) -> Vec<Linear> {
        let (h, i) = (self.hidden, self.intermediate);
        let dense = |kind, inf, outf, bias| Linear {
            kind,
            in_features: inf,
            out_features: outf,
            bias,
            copies: 1,
            tokens_num: 1,
            tokens_den: 1,
        };
        let mut v = vec![
            dense(LinearKind::Q, h, self.q_dim(), self.qkv_bias),
            dense(LinearKind::K, h, self.kv_dim(), self.qkv_bias),
            dense(LinearKind::V, h, self.kv_dim(), self.qkv_bias),
            dense(LinearKind::O, self.q_dim(), h, self.o_bias),
        ];
        match &self.moe {
            None => v.extend([
                dense(LinearKind::Gate, h, i, self.mlp_bias),
                dense(LinearKind::Up, h, i, self.mlp_bias),
                dense(LinearKind::Down, i, h, self.mlp_bias),
            ]),
            Some(m) => {
                v.push(dense(LinearKind::Router, h, m.experts, false));
                for (kind, inf, outf) in [
                    (LinearKind::Gate, h, i),
                    (LinearKind::Up, h, i),
                    (LinearKind::Down, i, h),
                ] {
                    v.push(Linear {
                        kind,
                        in_features: inf,
                        out_features: outf,
                        bias: false,
                        copies: m.experts,
                        tokens_num: m.experts_per_token,
                        tokens_den: m.experts,
                    });
                }
            }
        }
        v
    }

    pub fn param_counts(&self) -> ParamCounts {
        let linears = self.layer_linears();
        let lin_w: u128 = linears.iter().map(Linear::weight_params).sum();
        let lin_b: u128 = linears.iter().map(Linear::bias_params).sum();
        let norms = 2 * self.hidden + if self.qk_norm { 2 * self.head_dim } else { 0 };
        let embedding = self.vocab * self.hidden;
        let lm_head = if self.tie_embeddings { 0 } else { embedding };
        let other = self.layers * (lin_b + norms) + self.hidden;
        let linear_weights = self.layers * lin_w;
        ParamCounts {
            total: embedding + lm_head + linear_weights + other,
            embedding,
            lm_head,
            linear_weights,
            other,
            largest_linear: linears
                .iter()
                .map(|l| l.in_features * l.out_features)
                .max()
                .unwrap_or(0),
        }
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
        ModelShape {
            name: "test".into(),
            model_type: "llama".into(),
            vocab,
            hidden,
            layers,
            heads,
            kv_heads: kv,
            head_dim: hidden / heads,
            intermediate: inter,
            tie_embeddings: tie,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            moe: None,
        }
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
