//! Job files: the training configuration a user already has (`--from FILE`), read into the
//! settings of a [`crate::Job`] with a record of where each value came from.
//!
//! Formats, detected from their keys ([`detect`]):
//! - axolotl YAML (`base_model`, `micro_batch_size`, `sequence_len`, `adapter` …) — axolotl.rs
//! - LLaMA-Factory YAML, the classic layout (`model_name_or_path`, `stage`, `finetuning_type`,
//!   `cutoff_len` …) and the v1 layout (`model`, `peft_config`, `quant_config`,
//!   `micro_batch_size` …) — llamafactory.rs
//! - TRL `SFTConfig` / transformers `TrainingArguments` as YAML or JSON, with TRL's
//!   `ModelConfig` keys and nested peft `LoraConfig` / `BitsAndBytesConfig` fields — trl.rs
//! - torchtune recipe YAML (`_component_` keys) — torchtune.rs
//!
//! Each parser applies its framework's own defaults where the file is silent, citing the source
//! file and version, and warns about keys that change memory but that memplan does not model.
//! YAML is read with `yaml-rust2` (pure Rust, YAML 1.2, maintained; `serde_yaml` is archived)
//! and turned into `serde_json::Value`, so JSON and YAML files share one reader.

mod axolotl;
mod llamafactory;
mod reader;
mod torchtune;
mod trl;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::dtype::Precision;
use crate::error::Error;
use crate::method::{Attention, Job, Loss, Method, Optimizer};
use crate::model::LinearKind;

pub use reader::Reader;

/// The training framework a file was written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Axolotl,
    LlamaFactory,
    LlamaFactoryV1,
    Trl,
    Torchtune,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Axolotl => "axolotl",
            Format::LlamaFactory => "LLaMA-Factory",
            Format::LlamaFactoryV1 => "LLaMA-Factory v1",
            Format::Trl => "TRL / transformers",
            Format::Torchtune => "torchtune",
        })
    }
}

/// Where a resolved setting came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum Source {
    /// A key of the file (dotted for nested keys).
    Key(String),
    /// The framework's default, with the file and version that sets it.
    Default(String),
    /// A command-line flag given beside `--from`.
    Flag(String),
    /// The model's own `config.json` (`quantization_config`).
    ModelConfig(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Key(k) => write!(f, "← {k}"),
            Source::Default(d) => write!(f, "default: {d}"),
            Source::Flag(flag) => write!(f, "← {flag} (overrides the file)"),
            Source::ModelConfig(d) => write!(f, "config.json {d}"),
        }
    }
}

/// One resolved setting and its origin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Provenance {
    pub setting: &'static str,
    pub value: String,
    pub source: Source,
}

/// The resolved settings of a job file, each `None` when neither the file nor the framework's
/// defaults decide it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FileSettings {
    pub model: Option<String>,
    pub method: Option<Method>,
    pub batch: Option<u128>,
    pub seq: Option<u128>,
    pub weights: Option<Precision>,
    pub compute: Option<Precision>,
    pub rank: Option<u128>,
    pub lora_targets: Option<Vec<LinearKind>>,
    pub lora_dropout: Option<f64>,
    pub double_quant: Option<bool>,
    pub optimizer: Option<Optimizer>,
    pub grad_checkpointing: Option<bool>,
    pub attention: Option<Attention>,
    pub kbit_prep: Option<bool>,
    pub loss: Option<Loss>,
    pub packing: Option<bool>,
    pub activation_offload: Option<bool>,
    pub liger_kernels: Option<bool>,
    /// LoRA targets left to peft's per-model-type default (`target_modules=None`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub peft_default_targets: bool,
}

/// A parsed job file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobFile {
    pub path: PathBuf,
    pub format: Format,
    pub settings: FileSettings,
    pub provenance: Vec<Provenance>,
    /// Keys that change memory but are not modelled, with what memplan does instead.
    pub warnings: Vec<String>,
}

/// What a parser fills in.
#[derive(Debug, Default)]
pub(crate) struct Resolved {
    pub settings: FileSettings,
    pub provenance: Vec<Provenance>,
    pub warnings: Vec<String>,
}

impl Resolved {
    /// Records `value` for `setting` from `source`.
    pub fn put<T: Clone + Display>(
        &mut self,
        setting: &'static str,
        slot: impl FnOnce(&mut FileSettings) -> &mut Option<T>,
        value: T,
        source: Source,
    ) {
        self.provenance.push(Provenance {
            setting,
            value: value.show(),
            source,
        });
        *slot(&mut self.settings) = Some(value);
    }

    pub fn warn(&mut self, text: impl Into<String>) {
        self.warnings.push(text.into());
    }
}

/// How a setting's value is printed in the provenance table.
pub trait Display {
    fn show(&self) -> String;
}

macro_rules! display_via_to_string {
    ($($t:ty),*) => { $(impl Display for $t { fn show(&self) -> String { self.to_string() } })* };
}
display_via_to_string!(String, u128, f64, bool, Method, Precision, Optimizer, Attention, Loss);

impl Display for Vec<LinearKind> {
    fn show(&self) -> String {
        if *self == crate::method::all_linear() {
            return "all-linear".into();
        }
        self.iter()
            .map(|k| k.module_name())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Reads and parses a job file, detecting its format.
pub fn load(path: &Path) -> Result<JobFile, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses the text of a job file; `path` names it in errors and decides nothing else (JSON and
/// YAML are told apart by their content).
pub fn parse(text: &str, path: &Path) -> Result<JobFile, Error> {
    let bad = |problem: String| Error::JobFileFormat {
        path: path.to_path_buf(),
        problem,
    };
    let value = match serde_json::from_str::<Value>(text) {
        Ok(v) => v,
        Err(_) => {
            reader::yaml_to_json(text).map_err(|e| bad(format!("is not YAML or JSON: {e}")))?
        }
    };
    let Value::Object(map) = &value else {
        return Err(bad(
            "is not a mapping of keys to values (a training config)".into(),
        ));
    };
    let format = detect(map).ok_or_else(|| {
        bad("does not look like an axolotl, LLaMA-Factory, TRL/transformers or torchtune config: expected base_model (axolotl), model_name_or_path with stage or finetuning_type (LLaMA-Factory), model with peft_config or micro_batch_size (LLaMA-Factory v1), output_dir or per_device_train_batch_size (TRL), or _component_ entries (torchtune)".into())
    })?;
    let r = Reader::new(map, path);
    let mut out = Resolved::default();
    match format {
        Format::Axolotl => axolotl::resolve(&r, &mut out)?,
        Format::LlamaFactory => llamafactory::resolve_classic(&r, &mut out)?,
        Format::LlamaFactoryV1 => llamafactory::resolve_v1(&r, &mut out)?,
        Format::Trl => trl::resolve(&r, &mut out)?,
        Format::Torchtune => torchtune::resolve(&r, &mut out)?,
    }
    Ok(JobFile {
        path: path.to_path_buf(),
        format,
        settings: out.settings,
        provenance: out.provenance,
        warnings: out.warnings,
    })
}

/// The format whose characteristic keys the file has.
pub fn detect(map: &serde_json::Map<String, Value>) -> Option<Format> {
    let has = |k: &str| map.get(k).is_some_and(|v| !v.is_null());
    let any_component = |v: &Value| v.get("_component_").is_some();
    if map.values().any(any_component) {
        return Some(Format::Torchtune);
    }
    if has("base_model") {
        return Some(Format::Axolotl);
    }
    if has("model_name_or_path")
        && [
            "stage",
            "finetuning_type",
            "cutoff_len",
            "template",
            "lora_target",
        ]
        .iter()
        .any(|k| has(k))
    {
        return Some(Format::LlamaFactory);
    }
    if map.get("model").is_some_and(Value::is_string)
        && [
            "peft_config",
            "quant_config",
            "kernel_config",
            "dist_config",
            "model_class",
            "micro_batch_size",
            "cutoff_len",
            "train_dataset",
        ]
        .iter()
        .any(|k| map.contains_key(*k))
    {
        return Some(Format::LlamaFactoryV1);
    }
    if [
        "output_dir",
        "per_device_train_batch_size",
        "model_name_or_path",
        "max_length",
        "max_seq_length",
        "use_peft",
        "gradient_checkpointing",
    ]
    .iter()
    .any(|k| has(k))
    {
        return Some(Format::Trl);
    }
    None
}

/// transformers `OptimizerNames` (training_args.py / trainer_utils.py, 5.17) that memplan
/// models, by the name a file gives.
pub(crate) fn hf_optimizer(name: &str) -> Option<Optimizer> {
    Some(match name.to_ascii_lowercase().as_str() {
        "adamw_torch" | "adamw_hf" | "adamw" | "adamw_torch_npu_fused" => Optimizer::Adamw,
        "adamw_torch_fused" => Optimizer::AdamwFused,
        "adamw_bnb_8bit" | "adamw_8bit" | "adamw8bit" => Optimizer::Adamw8bit,
        "paged_adamw_32bit" | "paged_adamw" => Optimizer::PagedAdamw,
        "paged_adamw_8bit" => Optimizer::PagedAdamw8bit,
        "sgd" => Optimizer::Sgd,
        "adafactor" => Optimizer::Adafactor,
        _ => return None,
    })
}

/// `attn_implementation` values as transformers spells them.
pub(crate) fn hf_attention(name: &str) -> Option<Attention> {
    Some(match name {
        "sdpa" => Attention::Sdpa,
        "eager" => Attention::Eager,
        "flash_attention_2"
        | "flash_attention_3"
        | "flash"
        | "fa2"
        | "kernels-community/flash-attn"
        | "kernels-community/flash-attn3" => Attention::Flash,
        _ => return None,
    })
}

/// torch dtype names (`bfloat16`, `torch.float16`, `bf16`, `fp32` …).
pub(crate) fn torch_dtype(name: &str) -> Option<Precision> {
    Some(
        match name
            .trim_start_matches("torch.")
            .to_ascii_lowercase()
            .as_str()
        {
            "bfloat16" | "bf16" => Precision::Bf16,
            "float16" | "fp16" | "half" => Precision::Fp16,
            "float32" | "fp32" | "float" => Precision::Fp32,
            _ => return None,
        },
    )
}

/// peft `target_modules`: a list of module names, or `all-linear`/`all`. Unknown names (lm_head,
/// embed_tokens …) are returned separately so the parser can warn about them.
pub(crate) fn lora_targets(value: &Value) -> Option<(Vec<LinearKind>, Vec<String>)> {
    let names: Vec<String> = match value {
        Value::String(s) => s.split(',').map(|p| p.trim().to_string()).collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => return None,
    };
    if names
        .iter()
        .any(|n| matches!(n.as_str(), "all-linear" | "all" | "all_linear"))
    {
        return Some((crate::method::all_linear(), Vec::new()));
    }
    let mut kinds = Vec::new();
    let mut unknown = Vec::new();
    for n in names {
        let module = n.rsplit('.').next().unwrap_or(&n);
        match LinearKind::from_module_name(module) {
            Some(k) if k != LinearKind::Router => kinds.push(k),
            _ => unknown.push(n),
        }
    }
    kinds.sort();
    kinds.dedup();
    Some((kinds, unknown))
}

/// peft's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` (utils/constants.py) for the
/// model types memplan models: q_proj and v_proj where it has an entry.
const PEFT_QV_DEFAULT: [&str; 9] = [
    "llama",
    "llama4",
    "mistral",
    "mixtral",
    "gemma",
    "gemma2",
    "gemma3_text",
    "qwen2",
    "qwen3",
];

/// The settings of `file` applied to a job built for its model and method.
pub fn apply(job: &mut Job, s: &FileSettings) -> Result<(), Error> {
    if s.peft_default_targets && job.lora.is_some() {
        let t = job.model.model_type.as_str();
        if !PEFT_QV_DEFAULT.contains(&t) {
            return Err(Error::Unsupported(format!(
                "the file leaves LoRA target_modules to peft, which has no default for model type '{t}' (peft raises \"Please specify `target_modules`\"); set lora_target_modules or pass --lora-targets"
            )));
        }
    }
    if let Some(v) = s.weights {
        job.weights = v;
    }
    if let Some(v) = s.compute {
        job.compute = v;
    }
    if let Some(l) = job.lora.as_mut() {
        if let Some(r) = s.rank {
            l.rank = r;
        }
        if let Some(t) = &s.lora_targets {
            l.targets = t.clone();
        }
        if let Some(d) = s.lora_dropout {
            l.dropout = d;
        }
    }
    macro_rules! copy {
        ($($f:ident),*) => { $(if let Some(v) = s.$f { job.$f = v; })* };
    }
    copy!(
        double_quant,
        optimizer,
        grad_checkpointing,
        attention,
        kbit_prep,
        loss,
        packing,
        activation_offload,
        liger_kernels
    );
    if let Some(b) = s.batch {
        job.batch = b;
    }
    if let Some(q) = s.seq {
        job.seq = q;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect_yaml(text: &str) -> Option<Format> {
        let v = reader::yaml_to_json(text).unwrap();
        detect(v.as_object().unwrap())
    }

    #[test]
    fn formats_are_told_apart_by_their_keys() {
        assert_eq!(
            detect_yaml("base_model: x\nmicro_batch_size: 2\n"),
            Some(Format::Axolotl)
        );
        assert_eq!(
            detect_yaml("model_name_or_path: x\nstage: sft\n"),
            Some(Format::LlamaFactory)
        );
        assert_eq!(
            detect_yaml("model: Qwen/Qwen3-4B\npeft_config:\n  name: lora\n"),
            Some(Format::LlamaFactoryV1)
        );
        assert_eq!(
            detect_yaml("model_name_or_path: x\noutput_dir: out\n"),
            Some(Format::Trl)
        );
        assert_eq!(
            detect_yaml("model:\n  _component_: torchtune.models.llama3_1.lora_llama3_1_8b\n"),
            Some(Format::Torchtune)
        );
        assert_eq!(detect_yaml("foo: 1\n"), None);
    }

    #[test]
    fn unknown_format_is_a_one_line_error() {
        let e = parse("foo: 1\n", Path::new("x.yml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("base_model") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn target_lists_map_to_modules_and_name_the_rest() {
        let (k, rest) = lora_targets(&serde_json::json!(["q_proj", "v_proj", "lm_head"])).unwrap();
        assert_eq!(k, vec![LinearKind::Q, LinearKind::V]);
        assert_eq!(rest, vec!["lm_head".to_string()]);
        assert_eq!(
            lora_targets(&serde_json::json!("all-linear")).unwrap().0,
            crate::method::all_linear()
        );
    }
}

#[cfg(test)]
mod defaults {
    //! Each framework's defaults and switches, from a minimal file.
    use super::*;

    fn settings(text: &str) -> FileSettings {
        parse(text, Path::new("job.yaml")).unwrap().settings
    }

    #[test]
    fn llamafactory_full_upcasts_to_fp32_and_checkpoints_by_default() {
        let s = settings("model_name_or_path: x\nstage: sft\nfinetuning_type: full\nbf16: true\n");
        assert_eq!(s.method, Some(Method::Full));
        // model/adapter.py: trainable parameters upcast to fp32 unless pure_bf16.
        assert_eq!(s.weights, Some(Precision::Fp32));
        assert_eq!(s.compute, Some(Precision::Bf16));
        assert_eq!(s.grad_checkpointing, Some(true));
        assert_eq!(s.batch, Some(8));
        let s = settings("model_name_or_path: x\nstage: sft\nfinetuning_type: full\npure_bf16: true\ndisable_gradient_checkpointing: true\n");
        assert_eq!(s.weights, Some(Precision::Bf16));
        assert_eq!(s.grad_checkpointing, Some(false));
    }

    #[test]
    fn trl_liger_switches_the_loss_and_refuses_chunked_nll_with_it() {
        let s = settings("model_name_or_path: x\noutput_dir: o\nuse_liger_kernel: true\n");
        assert_eq!(s.loss, Some(Loss::Liger));
        assert_eq!(s.liger_kernels, Some(true));
        let e = parse(
            "model_name_or_path: x\noutput_dir: o\nuse_liger_kernel: true\nloss_type: chunked_nll\n",
            Path::new("job.yaml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not compatible"), "{e}");
        let s = settings("model_name_or_path: x\noutput_dir: o\nloss_type: nll\nbf16: false\n");
        assert_eq!(s.loss, Some(Loss::Ce));
        // ModelConfig dtype float32 without mixed precision: fp32 compute.
        assert_eq!(s.compute, Some(Precision::Fp32));
    }

    #[test]
    fn axolotl_offloaded_checkpointing_and_plugins() {
        let s = settings(
            "base_model: x\ngradient_checkpointing: offload\ncut_cross_entropy: true\nliger_rms_norm: true\nliger_glu_activation: true\n",
        );
        assert_eq!(s.grad_checkpointing, Some(true));
        assert_eq!(s.activation_offload, Some(true));
        assert_eq!(s.loss, Some(Loss::Cce));
        assert_eq!(s.liger_kernels, Some(true));
        // schemas/training.py: adamw_torch_fused; config.py: sequence_len 512.
        assert_eq!(s.optimizer, Some(Optimizer::AdamwFused));
        assert_eq!(s.seq, Some(512));
        // sdpa + sample_packing: axolotl's sdpa_varlen (varlen_attn) is a flash kernel.
        let s = settings("base_model: x\nsample_packing: true\n");
        assert_eq!(s.attention, Some(Attention::Flash));
        let s = settings("base_model: x\nsample_packing: true\nsdpa_varlen: false\n");
        assert_eq!(s.attention, Some(Attention::Sdpa));
        let f = parse("base_model: x\ndeepspeed: zero3.json\n", Path::new("a.yml")).unwrap();
        assert!(f.warnings.iter().any(|w| w.starts_with("deepspeed:")));
    }
}
