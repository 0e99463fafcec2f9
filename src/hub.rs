//! Models by Hub id from the local Hugging Face cache, offline; safetensors headers; and what
//! the training stack does with a checkpoint's `quantization_config`.
//!
//! Cache layout (huggingface_hub `constants.py` / `file_download.py`): the cache is
//! `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub` (`~` is `$HOME`, or `%USERPROFILE%` on Windows); a model `org/name` lives in `models--org--name/`, whose
//! `refs/main` holds the commit hash of the snapshot `snapshots/<hash>/` with `config.json` and
//! the `*.safetensors` files (links into `blobs/`).
//!
//! Safetensors headers are read with the `safetensors` crate's `Metadata` (8-byte little-endian
//! header length, then the JSON header): dtype and shape of every tensor without reading the
//! weights.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::dtype::Precision;
use crate::error::Error;

/// The Hugging Face hub cache directory, as huggingface_hub resolves it.
pub fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("HF_HUB_CACHE")
        .or_else(|| env("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| env("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| env("XDG_CACHE_HOME").map(|x| x.join("huggingface").join("hub")))
        .or_else(|| {
            env("HOME")
                .or_else(|| env("USERPROFILE"))
                .map(|h| h.join(".cache").join("huggingface").join("hub"))
        })
}

/// Whether `arg` has the shape of a Hub model id (`org/name`).
pub fn is_repo_id(arg: &str) -> bool {
    let mut parts = arg.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(org) && ok(name) && !arg.ends_with(".json")
}

/// The snapshot folder of `repo_id` at `refs/main` in the cache, if the model is cached.
/// A cached model whose `refs/main` points at a missing snapshot is an error that says so.
pub fn cached_snapshot(repo_id: &str) -> Result<Option<PathBuf>, Error> {
    if !is_repo_id(repo_id) {
        return Ok(None);
    }
    let Some(cache) = cache_dir() else {
        return Ok(None);
    };
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    if !repo.is_dir() {
        return Ok(None);
    }
    let refs = repo.join("refs").join("main");
    let Ok(hash) = std::fs::read_to_string(&refs) else {
        return Err(Error::Unsupported(format!(
            "{repo_id} is in the Hugging Face cache ({}) but has no refs/main naming its snapshot (downloaded at another revision?); pass the snapshot folder as --model instead",
            repo.display()
        )));
    };
    let snap = repo.join("snapshots").join(hash.trim());
    if !snap.is_dir() {
        return Err(Error::Unsupported(format!(
            "{repo_id}: refs/main names snapshot {} but {} does not exist (an interrupted download? `huggingface-cli download {repo_id} config.json` fetches it)",
            hash.trim(),
            snap.display()
        )));
    }
    Ok(Some(snap))
}

/// The `config.json` behind a `--model` argument: a file, a folder's, or a cached snapshot's.
pub fn config_json_for(arg: &str) -> Option<PathBuf> {
    let path = Path::new(arg);
    if path.is_dir() {
        return Some(path.join("config.json"));
    }
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    cached_snapshot(arg)
        .ok()
        .flatten()
        .map(|d| d.join("config.json"))
}

/// `org/name` resolved from the cache (`Ok(None)` when it is not cached), named `org/name`.
pub fn resolve_cached(
    repo_id: &str,
) -> Result<Option<(crate::ModelShape, crate::model::ModelSource)>, Error> {
    let Some(dir) = cached_snapshot(repo_id)? else {
        return Ok(None);
    };
    let file = dir.join("config.json");
    if !file.is_file() {
        return Err(missing_config(&dir));
    }
    let (cfg, file) = crate::model::HfConfig::from_path(&file)?;
    let shape = cfg.resolve(repo_id, &file)?;
    Ok(Some((
        shape,
        crate::model::ModelSource::ConfigFile(file.display().to_string()),
    )))
}

/// The error for a model folder without `config.json`: what is missing, and what the folder's
/// safetensors headers hold.
pub fn missing_config(dir: &Path) -> Error {
    let headers = match read_headers(dir) {
        Ok(Some(h)) => format!("its {}", h.summary()),
        Ok(None) => "it has no *.safetensors files either".to_string(),
        Err(e) => format!("its safetensors headers are unreadable ({e})"),
    };
    Error::Unsupported(format!(
        "{}: no config.json, which names the architecture (model_type, vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads); {headers}",
        dir.display()
    ))
}

/// Totals of a folder's safetensors headers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Headers {
    pub files: usize,
    pub tensors: usize,
    /// Elements by safetensors dtype (`BF16`, `U8`, `F8_E4M3` …).
    pub elements_by_dtype: BTreeMap<String, u128>,
    /// Bytes of tensor data (what the files hold besides their headers).
    pub data_bytes: u128,
}

impl Headers {
    pub fn elements(&self) -> u128 {
        self.elements_by_dtype.values().sum()
    }

    /// "2 files, 399 tensors, 8,030,261,248 elements (BF16 8,030,261,248), 16.06 GB".
    pub fn summary(&self) -> String {
        let dtypes: Vec<String> = self
            .elements_by_dtype
            .iter()
            .map(|(d, n)| format!("{d} {n}"))
            .collect();
        format!(
            "{} safetensors file(s), {} tensors, {} elements ({}), {} bytes of data",
            self.files,
            self.tensors,
            self.elements(),
            dtypes.join(", "),
            self.data_bytes
        )
    }
}

/// A checkpoint's safetensors headers beside the parameter count of the architecture its
/// `config.json` describes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Checkpoint {
    pub headers: Headers,
    pub architecture_params: u128,
    /// The checkpoint has a `quantization_config`: packed tensors do not count parameters.
    pub quantized: bool,
}

impl Checkpoint {
    /// Reads the headers in `dir` (`Ok(None)` without safetensors files).
    pub fn read(
        dir: &Path,
        architecture_params: u128,
        quantized: bool,
    ) -> Result<Option<Checkpoint>, Error> {
        Ok(read_headers(dir)?.map(|headers| Checkpoint {
            headers,
            architecture_params,
            quantized,
        }))
    }

    /// One line: the totals and whether they match the architecture.
    pub fn summary(&self) -> String {
        let n = self.headers.elements();
        let verdict = if self.quantized {
            "pre-quantized: packed tensors and their constants are not parameter counts".to_string()
        } else if n == self.architecture_params {
            format!(
                "= the {} parameters of the architecture",
                self.architecture_params
            )
        } else {
            format!(
                "the architecture has {} parameters ({:+}: e.g. tied embeddings stored twice, or tensors memplan does not model)",
                self.architecture_params,
                n as i128 - self.architecture_params as i128
            )
        };
        format!("checkpoint: {}; {verdict}", self.headers.summary())
    }
}

/// The largest header memplan reads (the format caps it at 100 MB).
const MAX_HEADER: u64 = 100 * 1000 * 1000;

/// Reads the headers of every `*.safetensors` file in `dir` (none: `Ok(None)`).
pub fn read_headers(dir: &Path) -> Result<Option<Headers>, Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Ok(None);
    }
    let mut h = Headers::default();
    for f in &files {
        let bad = |m: String| Error::BadConfig {
            path: f.clone(),
            message: m,
        };
        let mut file = std::fs::File::open(f).map_err(io(f))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(io(f))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER {
            return Err(bad(format!(
                "safetensors header of {n} bytes exceeds the format's 100 MB limit"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(io(f))?;
        let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("not a safetensors header: {e}")))?;
        h.files += 1;
        for info in meta.tensors().values() {
            let elements: u128 = info.shape.iter().map(|&d| d as u128).product();
            h.tensors += 1;
            *h.elements_by_dtype
                .entry(format!("{:?}", info.dtype))
                .or_default() += elements;
            h.data_bytes += (info.data_offsets.1 - info.data_offsets.0) as u128;
        }
    }
    Ok(Some(h))
}

/// What the modelled stack (transformers 5.17 + peft + bitsandbytes) trains from a checkpoint
/// with a `quantization_config`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CheckpointQuant {
    /// bitsandbytes 4-bit, pre-quantized: QLoRA on the stored NF4 (or FP4, same storage) base.
    Bnb4bit {
        double_quant: bool,
        compute: Option<Precision>,
    },
    /// bitsandbytes LLM.int8, pre-quantized: LoRA on the int8 base.
    Bnb8bit,
    /// Stored quantized, but its quantizer cannot train (`is_trainable` is False): transformers'
    /// Trainer refuses it, and it trains after loading with `dequantize=True`, in bf16.
    DequantizedBf16 { quant_method: String },
}

/// Reads `quantization_config` from a model folder's (or file's) `config.json`; `Ok(None)`
/// without one. Methods memplan cannot model are errors with a one-line reason.
pub fn checkpoint_quant(config_json: &Path) -> Result<Option<CheckpointQuant>, Error> {
    let text = match std::fs::read_to_string(config_json) {
        Ok(t) => t,
        Err(_) => return Ok(None),
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: config_json.to_path_buf(),
        message: e.to_string(),
    })?;
    quant_from_config(&v, config_json)
}

fn quant_from_config(v: &Value, path: &Path) -> Result<Option<CheckpointQuant>, Error> {
    let Some(q) = v.get("quantization_config").filter(|q| !q.is_null()) else {
        return Ok(None);
    };
    let field = |problem: String| Error::ConfigField {
        path: path.to_path_buf(),
        field: "quantization_config".to_string(),
        problem,
    };
    let method = q
        .get("quant_method")
        .and_then(Value::as_str)
        .unwrap_or("bitsandbytes");
    let flag = |k: &str| q.get(k).and_then(Value::as_bool).unwrap_or(false);
    Ok(Some(match method {
        // transformers quantizers/quantizer_bnb_4bit.py / quantizer_bnb_8bit.py: is_trainable.
        "bitsandbytes" | "bitsandbytes_4bit" | "bitsandbytes_8bit" => {
            if flag("load_in_4bit") || method == "bitsandbytes_4bit" {
                let compute = q
                    .get("bnb_4bit_compute_dtype")
                    .and_then(Value::as_str)
                    .and_then(crate::jobfile::torch_dtype);
                CheckpointQuant::Bnb4bit {
                    double_quant: flag("bnb_4bit_use_double_quant"),
                    compute,
                }
            } else if flag("load_in_8bit") || method == "bitsandbytes_8bit" {
                CheckpointQuant::Bnb8bit
            } else {
                return Err(field(
                    "is bitsandbytes without load_in_4bit or load_in_8bit".into(),
                ));
            }
        }
        // quantizer_mxfp4.py and quantizer_finegrained_fp8.py: `is_trainable` is False; the
        // checkpoint trains after `from_pretrained(..., quantization_config=…(dequantize=True))`,
        // which dequantizes to bf16 (Mxfp4Dequantize).
        "mxfp4" | "fp8" => CheckpointQuant::DequantizedBf16 {
            quant_method: method.to_string(),
        },
        // quantizer_gptq.py / quantizer_awq.py: trainable, the base stays packed (int32 words of
        // 4-bit values, per-group scales and zeros) with LoRA on top through the GPTQ/AWQ
        // kernels — storage and saved tensors memplan does not model.
        "gptq" | "awq" => {
            let bits = q.get("bits").and_then(Value::as_u64).unwrap_or(4);
            let group = q
                .get("group_size")
                .or_else(|| q.get("q_group_size"))
                .and_then(Value::as_i64)
                .unwrap_or(128);
            return Err(field(format!(
                "is {method} ({bits}-bit, group {group}): transformers trains it with LoRA on the packed {method} base, whose storage and kernels memplan does not model; use the unquantized checkpoint with --method qlora"
            )));
        }
        other => {
            return Err(field(format!(
                "is '{other}', which memplan does not model (bitsandbytes 4/8-bit, and mxfp4/fp8 dequantized to bf16, are)"
            )))
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_org_slash_name() {
        assert!(is_repo_id("Qwen/Qwen3-8B"));
        assert!(is_repo_id("meta-llama/Llama-3.1-8B"));
        assert!(!is_repo_id("llama-3.1-8b"));
        assert!(!is_repo_id("./models/x"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("dir/config.json"));
    }

    fn quant(json: &str) -> Result<Option<CheckpointQuant>, Error> {
        quant_from_config(
            &serde_json::from_str(json).unwrap(),
            Path::new("config.json"),
        )
    }

    #[test]
    fn quantization_configs_map_to_what_training_does() {
        assert_eq!(
            quant(r#"{"quantization_config":{"quant_method":"bitsandbytes","load_in_4bit":true,"bnb_4bit_use_double_quant":true,"bnb_4bit_compute_dtype":"bfloat16"}}"#).unwrap(),
            Some(CheckpointQuant::Bnb4bit { double_quant: true, compute: Some(Precision::Bf16) })
        );
        assert_eq!(
            quant(r#"{"quantization_config":{"quant_method":"mxfp4"}}"#).unwrap(),
            Some(CheckpointQuant::DequantizedBf16 {
                quant_method: "mxfp4".into()
            })
        );
        let e =
            quant(r#"{"quantization_config":{"quant_method":"gptq","bits":4,"group_size":128}}"#)
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("gptq (4-bit, group 128)") && !e.contains('\n'),
            "{e}"
        );
        assert_eq!(quant("{}").unwrap(), None);
    }
}
