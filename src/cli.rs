//! Command-line types (clap derive) and their conversion into library types. The library never
//! sees clap.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use memplan::method::parse_targets;
use memplan::{resolve_model, Attention, Job, Method, Optimizer, Precision};

#[derive(Debug, Parser)]
#[command(
    name = "memplan",
    version,
    about = "How much GPU memory a fine-tuning step needs, why, and whether it fits",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Per-component memory breakdown of one training step (or an inference prefill).
    Estimate(Box<EstimateArgs>),
    /// List the model presets with parameter counts.
    Models(FormatArgs),
    /// List the GPU presets.
    Gpus(FormatArgs),
    /// Compare rules of thumb with memplan's estimates.
    Table(TableArgs),
}

/// Output format of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
    Markdown,
}

impl From<Format> for memplan::report::Format {
    fn from(f: Format) -> Self {
        match f {
            Format::Table => memplan::report::Format::Table,
            Format::Json => memplan::report::Format::Json,
            Format::Csv => memplan::report::Format::Csv,
            Format::Markdown => memplan::report::Format::Markdown,
        }
    }
}

#[derive(Debug, Args)]
pub struct FormatArgs {
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// The flags that describe one job; shared by every command that estimates.
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// Preset name (llama-3.1-8b, mistral-7b, …), bare size (7B, 70B, 1.5B), or a path to a
    /// Hugging Face config.json (file or model folder).
    #[arg(long)]
    pub model: String,
    /// full, lora, qlora or inference.
    #[arg(long, default_value = "full")]
    pub method: String,
    /// Storage of the base weights: fp32, fp16, bf16, int8, nf4 [default: bf16, nf4 for qlora].
    #[arg(long)]
    pub weights: Option<String>,
    /// Activation / autocast dtype: fp32, fp16, bf16 [default: the weights' dtype; bf16 for
    /// int8/nf4].
    #[arg(long)]
    pub compute: Option<String>,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: u64,
    /// all-linear, attention, mlp, or a comma list of module names (q_proj,v_proj,…).
    #[arg(long, default_value = "all-linear")]
    pub lora_targets: String,
    /// LoRA dropout probability.
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// QLoRA double quantization of the absmax constants (default on).
    #[arg(long, overrides_with = "no_double_quant")]
    pub double_quant: bool,
    /// Turn QLoRA double quantization off.
    #[arg(long)]
    pub no_double_quant: bool,
    /// adamw, adamw-fused, adamw-8bit, paged-adamw, paged-adamw-8bit, sgd, sgd-momentum,
    /// adafactor.
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// Micro-batch size.
    #[arg(long, default_value_t = 1)]
    pub batch: u64,
    /// Sequence length in tokens.
    #[arg(long, default_value_t = 2048)]
    pub seq: u64,
    /// Activation checkpointing per decoder layer.
    #[arg(long)]
    pub grad_checkpointing: bool,
    /// sdpa, eager or flash.
    #[arg(long, default_value = "sdpa")]
    pub attention: String,
    /// QLoRA with peft's prepare_model_for_kbit_training (fp32 non-quantized parameters).
    #[arg(long)]
    pub kbit_prep: bool,
}

impl JobArgs {
    /// Parses and validates into a [`Job`].
    pub fn job(&self) -> Result<Job> {
        let (model, _) = resolve_model(&self.model)?;
        self.job_for(model)
    }

    /// The job for an already-resolved model (commands that vary `--model`).
    pub fn job_for(&self, model: memplan::ModelShape) -> Result<Job> {
        let method: Method = self.method.parse()?;
        let mut job = Job::new(model, method);
        if let Some(w) = &self.weights {
            job.weights = w.parse().context("--weights")?;
        }
        job.compute = match &self.compute {
            Some(c) => c.parse().context("--compute")?,
            None if job.weights.is_float() => job.weights,
            None => Precision::Bf16,
        };
        if let Some(l) = job.lora.as_mut() {
            l.rank = self.rank.into();
            l.targets = parse_targets(&self.lora_targets)?;
            l.dropout = self.lora_dropout;
        }
        job.double_quant = !self.no_double_quant;
        job.optimizer = self.optimizer.parse::<Optimizer>()?;
        job.batch = self.batch.into();
        job.seq = self.seq.into();
        job.grad_checkpointing = self.grad_checkpointing;
        job.attention = self.attention.parse::<Attention>()?;
        job.kbit_prep = self.kbit_prep;
        job.validate()?;
        Ok(job)
    }
}

#[derive(Debug, Args)]
pub struct EstimateArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// A GPU preset (h100-80gb, rtx-4090, …) or a size (24GB): adds a fit verdict.
    #[arg(long)]
    pub gpu: Option<String>,
    /// TOML written by `memplan probe --save-calibration`: measured CUDA context and workspace.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Print each component's formula with the numbers substituted, and its source.
    #[arg(long)]
    pub explain: bool,
}

#[derive(Debug, Args)]
pub struct TableArgs {
    /// The rule-of-thumb table (bytes per parameter) beside memplan's estimates.
    #[arg(long)]
    pub seed: bool,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}
