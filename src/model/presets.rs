//! Model presets (`presets/models.toml`, embedded in the binary) and `--model` resolution.
//!
//! `--model` takes, in this order: a path to a `config.json` or a model folder; a preset name or
//! alias; a bare size such as `7B`, resolved by [`super::size`] within the Llama 3 family (a
//! published checkpoint or a synthetic interpolation between two, named `synthetic-…`).

use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::{HfConfig, ModelShape};
use crate::error::{find_named, Error, Named};
use crate::units::parse_count;

const MODELS_TOML: &str = include_str!("../../presets/models.toml");

#[derive(Debug, Clone, Deserialize)]
struct PresetFile {
    model: Vec<PresetEntry>,
}

#[derive(Debug, Clone, Deserialize)]
struct PresetEntry {
    name: String,
    #[serde(default)]
    aliases: Vec<String>,
    size: Option<String>,
    source: String,
    /// The config.json fields, as TOML carries them.
    #[serde(flatten)]
    config: toml::Table,
}

/// A preset as listed by `memplan models`.
#[derive(Debug, Clone, Serialize)]
pub struct Preset {
    pub name: String,
    pub aliases: Vec<String>,
    pub size: Option<String>,
    pub source: String,
    pub params_total: u128,
    pub shape: ModelShape,
}

/// Where a resolved model came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum ModelSource {
    Preset(String),
    ConfigFile(String),
    /// A bare size mapped onto a reference architecture (the text says which).
    Synthetic(String),
}

/// All presets, parsed once.
pub fn presets() -> &'static [Preset] {
    static PRESETS: OnceLock<Vec<Preset>> = OnceLock::new();
    PRESETS.get_or_init(|| {
        // The file is compiled in and covered by tests; a parse failure is a build defect.
        let file: PresetFile =
            toml::from_str(MODELS_TOML).expect("presets/models.toml is valid (tested)");
        file.model
            .iter()
            .map(|e| {
                let json =
                    serde_json::to_value(&e.config).expect("TOML values convert to JSON (tested)");
                let shape = HfConfig::from_value(json)
                    .resolve(&e.name, Path::new("presets/models.toml"))
                    .expect("presets/models.toml entries resolve (tested)");
                Preset {
                    name: e.name.clone(),
                    aliases: e.aliases.clone(),
                    size: e.size.clone(),
                    source: e.source.clone(),
                    params_total: shape.param_counts().total,
                    shape,
                }
            })
            .collect()
    })
}

impl Named for Preset {
    fn name(&self) -> &str {
        &self.name
    }

    fn aliases(&self) -> &[String] {
        &self.aliases
    }
}

/// Resolves `--model`.
pub fn resolve_model(arg: &str) -> Result<(ModelShape, ModelSource), Error> {
    let path = Path::new(arg);
    // HOOK(configs, hub): a folder without config.json says what is missing; `org/name` comes
    // from the local Hugging Face cache when it is there (named `org/name`).
    if path.is_dir() && !path.join("config.json").exists() {
        return Err(crate::hub::missing_config(path));
    }
    if !path.exists() {
        if let Some(found) = crate::hub::resolve_cached(arg)? {
            return Ok(found);
        }
    }
    if path.exists() || arg.ends_with(".json") {
        let (cfg, file) = HfConfig::from_path(path)?;
        let name = file
            .parent()
            .and_then(|d| d.file_name())
            .filter(|_| path.is_dir())
            .or_else(|| file.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| arg.to_string());
        let shape = cfg.resolve(&name, &file)?;
        return Ok((shape, ModelSource::ConfigFile(file.display().to_string())));
    }
    match find_named(presets(), arg) {
        Ok(p) => Ok((p.shape.clone(), ModelSource::Preset(p.source.clone()))),
        Err(suggestion) => {
            match parse_count(arg).filter(|_| arg.ends_with(['B', 'b', 'M', 'm', 'T', 't'])) {
                Some(params) => super::size::bare_size(arg, params),
                None => Err(Error::UnknownModel {
                    name: arg.to_string(),
                    suggestion,
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(name: &str) -> u128 {
        resolve_model(name).unwrap().0.param_counts().total
    }

    #[test]
    fn published_parameter_counts() {
        assert_eq!(total("llama-3.1-8b"), 8_030_261_248);
        assert_eq!(total("llama-3.2-1b"), 1_235_814_400);
        assert_eq!(total("llama-3.2-3b"), 3_212_749_824);
        assert_eq!(total("mistral-7b"), 7_241_732_096);
        assert_eq!(total("llama-2-7b"), 6_738_415_616);
        assert_eq!(total("llama-3-70b"), 70_553_706_496);
        assert_eq!(total("llama-3.1-405b"), 405_853_388_800);
        assert_eq!(total("mixtral-8x7b"), 46_702_792_704);
        assert_eq!(total("qwen2.5-7b"), 7_615_616_512);
    }

    #[test]
    fn bare_sizes_map_to_reference_architectures() {
        assert_eq!(total("70B"), 70_553_706_496);
        assert_eq!(total("8b"), 8_030_261_248);
        let (shape, src) = resolve_model("10B").unwrap();
        let p = shape.param_counts().total as f64;
        // Interpolated between 8B (8.03e9) and 70B (70.55e9) at t = ln(10/8)/ln(70/8) = 0.103:
        // 35 layers, 32 heads of 128, MLP 15,360 → 9.12e9 (near, not at, its nominal size).
        assert_eq!(p as u128, 9_124_999_168);
        assert!(matches!(src, ModelSource::Synthetic(_)));
        assert!(shape.name.starts_with("synthetic"));
    }

    #[test]
    fn unknown_model_suggests() {
        let e = resolve_model("lama-3.1-8b").unwrap_err().to_string();
        assert!(e.contains("did you mean 'llama-3.1-8b'"), "{e}");
    }

    #[test]
    fn aliases_resolve() {
        assert_eq!(total("meta-llama/Llama-3.1-8B"), 8_030_261_248);
        assert_eq!(total("LLAMA3.2-1B"), 1_235_814_400);
    }
}
