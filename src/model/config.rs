//! Hugging Face `config.json`, as written, and its resolution into a validated [`ModelShape`]
//! through the architecture's recipe ([`crate::arch::families`]). Field names and defaults follow
//! each family's transformers 5.17 `configuration_<family>.py`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ModelShape;
use crate::arch::families::{self, Fields};
use crate::error::Error;

pub use families::SUPPORTED as SUPPORTED_MODEL_TYPES;

/// Largest config.json memplan reads (real ones are a few KiB; multimodal ones tens of KiB).
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// A `config.json` as parsed JSON.
#[derive(Debug, Clone, Default)]
pub struct HfConfig {
    pub raw: Value,
}

impl HfConfig {
    pub fn from_value(raw: Value) -> HfConfig {
        HfConfig { raw }
    }

    /// Reads a `config.json` file, or `config.json` inside a model folder.
    pub fn from_path(path: &Path) -> Result<(HfConfig, PathBuf), Error> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = crate::files::read_input(&file, "config.json", MAX_CONFIG_BYTES)?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
            path: file.clone(),
            message: e.to_string(),
        })?;
        if !raw.is_object() {
            return Err(Error::BadConfig {
                path: file.clone(),
                message: "the top level is not a JSON object".into(),
            });
        }
        Ok((HfConfig { raw }, file))
    }

    /// The model type: `model_type`, or the `*ForCausalLM` class in `architectures`.
    fn model_type(&self, f: &Fields) -> Result<String, Error> {
        if let Some(t) = f.str("model_type") {
            return Ok(t.to_string());
        }
        let archs = self.raw.get("architectures").and_then(Value::as_array);
        match archs {
            // transformers names the class after the model type: `Qwen2ForCausalLM` → qwen2.
            Some(a) => a
                .iter()
                .filter_map(Value::as_str)
                .find_map(|a| a.strip_suffix("ForCausalLM"))
                .map(str::to_ascii_lowercase)
                .ok_or_else(|| field_err(f, "architectures", "names no *ForCausalLM class")),
            None => Err(field_err(f, "model_type", "is missing")),
        }
    }

    /// Validates and resolves into a shape. `origin` names the file (or preset) in errors.
    pub fn resolve(&self, name: &str, origin: &Path) -> Result<ModelShape, Error> {
        let top = Fields::new(&self.raw, origin, "");
        let model_type = self.model_type(&top)?;
        // Multimodal wrappers: the text model is trained, the vision tower is frozen and
        // resident (no image tokens in the batch).
        let (text_type, recipe) = match model_type.as_str() {
            "gemma3" | "llama4" | "mistral3" => {
                let text = self.raw.get("text_config").ok_or_else(|| {
                    field_err(
                        &top,
                        "text_config",
                        "is missing (a multimodal wrapper holds its language model there)",
                    )
                })?;
                let f = Fields::new(text, origin, "text_config.");
                let text_type = match (f.str("model_type"), model_type.as_str()) {
                    (Some(t), _) => t.to_string(),
                    (None, "gemma3") => "gemma3_text".into(),
                    (None, _) => "llama4_text".into(),
                };
                let mut r = families::recipe(&text_type, &f)?;
                let vision = self.raw.get("vision_config").ok_or_else(|| {
                    field_err(
                        &top,
                        "vision_config",
                        "is missing (its vision tower is resident)",
                    )
                })?;
                let vf = Fields::new(vision, origin, "vision_config.");
                r.vision = match model_type.as_str() {
                    "gemma3" => families::gemma3_vision(&vf, r.hidden)?,
                    "llama4" => families::llama4_vision(&vf, r.hidden)?,
                    other => {
                        return Err(field_err(
                            &top,
                            "model_type",
                            &format!("is '{other}', a multimodal wrapper memplan does not model"),
                        ))
                    }
                };
                r.class = match model_type.as_str() {
                    "gemma3" => "Gemma3ForConditionalGeneration".into(),
                    _ => "Llama4ForConditionalGeneration".into(),
                };
                r.notes.push(format!(
                    "multimodal wrapper: the {} vision tower and projector ({} params) stay resident and frozen (its nn.Linear layers quantized under QLoRA and adapted by all-linear, but never run: the batch holds text tokens only, so their adapters get no gradients or optimizer state)",
                    model_type,
                    r.vision_params()
                ));
                (text_type, r)
            }
            "gemma3_text" | "llama4_text" => {
                (model_type.clone(), families::recipe(&model_type, &top)?)
            }
            _ => {
                if self.raw.get("text_config").is_some() && top.opt("hidden_size")?.is_none() {
                    return Err(field_err(
                        &top,
                        "text_config",
                        &format!("holds the language model of a '{model_type}' multimodal checkpoint, which memplan does not model; pass that text model's own config.json"),
                    ));
                }
                (model_type.clone(), families::recipe(&model_type, &top)?)
            }
        };
        let _ = text_type;
        Ok(ModelShape::from_recipe(name, &model_type, recipe))
    }
}

fn field_err(f: &Fields, field: &str, problem: &str) -> Error {
    f.error(field, problem.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelShape, Error> {
        let cfg = HfConfig::from_value(serde_json::from_str(json).unwrap());
        cfg.resolve("t", Path::new("config.json"))
    }

    #[test]
    fn missing_field_is_named() {
        let e = parse(r#"{"model_type":"llama","hidden_size":64}"#).unwrap_err();
        assert!(e.to_string().contains("num_attention_heads"), "{e}");
    }

    #[test]
    fn unsupported_architecture_is_named_with_its_reason() {
        let e = parse(r#"{"model_type":"gpt2"}"#).unwrap_err().to_string();
        assert!(e.contains("'gpt2'") && e.contains("Conv1D"), "{e}");
        let e = parse(r#"{"model_type":"bert"}"#).unwrap_err().to_string();
        assert!(e.contains("'bert'") && e.contains("supported:"), "{e}");
    }

    #[test]
    fn architecture_class_names_the_model_type_when_it_is_absent() {
        let m = parse(
            r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":10,"hidden_size":64,
                "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4}"#,
        )
        .unwrap();
        assert_eq!(m.model_type, "qwen2");
        // Qwen2: q, k, v biases (4·16 + 2·4·16 = 192 per layer over the Llama count).
        let llama = parse(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,
                "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4}"#,
        )
        .unwrap();
        assert_eq!(m.param_counts().total - llama.param_counts().total, 2 * 192);
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

    #[test]
    fn huge_fields_are_errors_naming_the_field() {
        let e = parse(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":128,
                "num_hidden_layers":10000000,"num_attention_heads":4}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("num_hidden_layers") && e.contains("beyond"),
            "{e}"
        );
        let e = parse(
            r#"{"model_type":"llama","vocab_size":18446744073709551615,"hidden_size":64,
                "intermediate_size":128,"num_hidden_layers":1,"num_attention_heads":4}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("vocab_size"), "{e}");
    }
}
