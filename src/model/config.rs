//! Hugging Face `config.json`, as written (every field optional), and its resolution into a
//! validated [`ModelShape`]. Field names and defaults follow transformers' `LlamaConfig`,
//! `MistralConfig`, `MixtralConfig`, `Qwen2Config` and `Qwen3Config`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ModelShape, Moe};
use crate::error::Error;

/// Architectures whose decoder layer memplan models (Llama-style: RMSNorm, RoPE, GQA, SwiGLU).
pub const SUPPORTED_MODEL_TYPES: [&str; 5] = ["llama", "mistral", "mixtral", "qwen2", "qwen3"];

/// The fields of a `config.json` that determine memory, as the file spells them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    /// e.g. `["LlamaForCausalLM"]`; names the architecture when `model_type` is absent.
    pub architectures: Option<Vec<String>>,
    pub vocab_size: Option<u64>,
    pub hidden_size: Option<u64>,
    pub intermediate_size: Option<u64>,
    pub num_hidden_layers: Option<u64>,
    pub num_attention_heads: Option<u64>,
    pub num_key_value_heads: Option<u64>,
    pub head_dim: Option<u64>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub num_local_experts: Option<u64>,
    pub num_experts_per_tok: Option<u64>,
    /// Multimodal wrappers nest the language model here; not supported (named in the error).
    pub text_config: Option<serde_json::Value>,
}

impl HfConfig {
    /// Reads a `config.json` file, or `config.json` inside a model folder.
    pub fn from_path(path: &Path) -> Result<(HfConfig, PathBuf), Error> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = crate::files::read_input(&file, "config.json")?;
        let cfg = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
            path: file.clone(),
            message: e.to_string(),
        })?;
        Ok((cfg, file))
    }

    /// Validates and resolves into a shape. `origin` names the file (or preset) in errors.
    pub fn resolve(&self, name: &str, origin: &Path) -> Result<ModelShape, Error> {
        let field = |field: &'static str, problem: &str| Error::ConfigField {
            path: origin.to_path_buf(),
            field,
            problem: problem.to_string(),
        };
        if self.text_config.is_some() && self.hidden_size.is_none() {
            return Err(field(
                "text_config",
                "holds the language model of a multimodal checkpoint; pass that text model's own config.json",
            ));
        }
        let model_type = match (&self.model_type, &self.architectures) {
            (Some(t), _) => t.clone(),
            // transformers names the class after the model type: `Qwen2ForCausalLM` → qwen2.
            (None, Some(archs)) => archs
                .iter()
                .find_map(|a| a.strip_suffix("ForCausalLM"))
                .map(str::to_ascii_lowercase)
                .ok_or_else(|| field("architectures", "names no *ForCausalLM class"))?,
            (None, None) => return Err(field("model_type", "is missing")),
        };
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(field(
                "model_type",
                &format!(
                    "is '{model_type}', which memplan does not model; supported: {}",
                    SUPPORTED_MODEL_TYPES.join(", ")
                ),
            ));
        }
        let need = |v: Option<u64>, name: &'static str| -> Result<u128, Error> {
            match v {
                None => Err(field(name, "is missing")),
                Some(0) => Err(field(name, "must be positive")),
                Some(x) => super::bounds::check(name, x, origin).map(|()| u128::from(x)),
            }
        };
        let hidden = need(self.hidden_size, "hidden_size")?;
        let heads = need(self.num_attention_heads, "num_attention_heads")?;
        let kv_heads = match self.num_key_value_heads {
            None => heads,
            Some(_) => need(self.num_key_value_heads, "num_key_value_heads")?,
        };
        if heads % kv_heads != 0 {
            return Err(field(
                "num_key_value_heads",
                &format!("({kv_heads}) must divide num_attention_heads ({heads})"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(_) => need(self.head_dim, "head_dim")?,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(field(
                    "head_dim",
                    "is missing and hidden_size is not divisible by num_attention_heads",
                ))
            }
        };
        let moe = match (model_type.as_str(), self.num_local_experts) {
            ("mixtral", _) | (_, Some(_)) => {
                let experts = need(self.num_local_experts, "num_local_experts")?;
                let k = need(self.num_experts_per_tok, "num_experts_per_tok")?;
                if k > experts {
                    return Err(field("num_experts_per_tok", "exceeds num_local_experts"));
                }
                Some(Moe {
                    experts,
                    experts_per_token: k,
                })
            }
            _ => None,
        };
        // transformers defaults: Qwen2 has biases on q/k/v and none elsewhere; Llama-family
        // `attention_bias` puts biases on q, k, v and o.
        let (qkv_bias, o_bias) = match model_type.as_str() {
            "qwen2" => (true, false),
            _ => {
                let b = self.attention_bias.unwrap_or(false);
                (b, b)
            }
        };
        Ok(ModelShape {
            name: name.to_string(),
            vocab: need(self.vocab_size, "vocab_size")?,
            hidden,
            intermediate: need(self.intermediate_size, "intermediate_size")?,
            layers: need(self.num_hidden_layers, "num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            tie_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            qk_norm: model_type == "qwen3",
            moe,
            model_type,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelShape, Error> {
        let cfg: HfConfig = serde_json::from_str(json).unwrap();
        cfg.resolve("t", Path::new("config.json"))
    }

    #[test]
    fn missing_field_is_named() {
        let e = parse(r#"{"model_type":"llama","hidden_size":64}"#).unwrap_err();
        assert!(e.to_string().contains("num_attention_heads"), "{e}");
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let e = parse(r#"{"model_type":"gpt2"}"#).unwrap_err();
        assert!(e.to_string().contains("'gpt2'"), "{e}");
    }

    #[test]
    fn architecture_class_names_the_model_type_when_it_is_absent() {
        let m = parse(
            r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":10,"hidden_size":64,
                "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4}"#,
        )
        .unwrap();
        assert_eq!(m.model_type, "qwen2");
        assert!(m.qkv_bias);
    }

    #[test]
    fn kv_heads_default_to_heads_and_head_dim_to_ratio() {
        let m = parse(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":128,
                "num_hidden_layers":2,"num_attention_heads":4}"#,
        )
        .unwrap();
        assert_eq!((m.kv_heads, m.head_dim), (4, 16));
    }
}
