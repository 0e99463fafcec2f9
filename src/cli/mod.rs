//! Command-line types (clap derive) and their conversion into library types. The library never
//! sees clap.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use memplan::estimate::sharding::{
    Engine, FsdpStrategy, Offload, Sharding, DEFAULT_PREFETCH_BUCKET, DEFAULT_REDUCE_BUCKET,
};
use memplan::hub::CheckpointQuant;
use memplan::jobfile::JobFile;
use memplan::method::parse_targets;
use memplan::units::parse_count;
use memplan::{resolve_model, Attention, Job, Loss, Method, Optimizer};

mod job;
mod probe;
pub use probe::*;

#[derive(Debug, Parser)]
#[command(
    name = "memplan",
    version,
    about = "How much GPU memory a fine-tuning step needs, why, and whether it fits",
    long_about = None,
    // A flag given twice takes its last value, so a suggestion (`would fit: --method qlora`)
    // can be appended to the command that printed it.
    args_override_self = true
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
    /// Draw a capacity-review chart: PNG, SVG or HTML, from --out's extension.
    Chart(ChartArgs),
    /// Write one self-contained HTML page for a capacity review.
    Report(ReportArgs),
    /// Search the plans that fit a GPU: method × optimizer × checkpointing, with the largest
    /// micro-batch and sequence each allows, ranked by estimated throughput.
    Fit(FitArgs),
    /// Training FLOPs, wall time, GPU-hours and money (rent and buy).
    Cost(CostArgs),
    /// Read the GPU through NVML and measure a real NF4 + LoRA training step (candle), compared
    /// with its estimate.
    Probe(Box<ProbeArgs>),
    /// Print a shell completion script: `memplan completions bash > /etc/bash_completion.d/memplan`.
    Completions(CompletionsArgs),
    /// Print the man page (roff): `memplan man > memplan.1 && man ./memplan.1`.
    Man,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `--batch 4`: a positive integer. Negative numbers reach this parser (the flag allows them), so
/// `--batch -1` is told what the flag expects instead of "unexpected argument '-1'".
pub fn positive_int(text: &str) -> Result<u64, String> {
    match text.trim().parse::<i128>() {
        Ok(v) if (1..=i128::from(u64::MAX)).contains(&v) => Ok(v as u64),
        _ => Err("expects a positive integer such as 4".into()),
    }
}

/// `--seq 4096` or `--seq 4k`: tokens, where `k` is 1024 and `M` is 1024² as context lengths are
/// quoted ("4k context" = 4096, "128k" = 131072, "1M" = 1048576).
pub fn seq_len(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1024),
        Some((i, 'm' | 'M')) => (&t[..i], 1024 * 1024),
        _ => (t, 1),
    };
    positive_int(num)
        .ok()
        .and_then(|v| v.checked_mul(mult))
        .ok_or_else(|| "expects a positive number of tokens such as 2048 or 4k (= 4096)".into())
}

/// `--zero 3`: a DeepSpeed ZeRO stage.
pub fn zero_stage(text: &str) -> Result<u8, String> {
    match text.trim().parse::<u8>() {
        Ok(v) if v <= 3 => Ok(v),
        _ => Err("expects a ZeRO stage 0–3 (0 replicates, 1 shards optimizer state, 2 + gradients, 3 + parameters)".into()),
    }
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
    /// Output format: a text table, JSON (the full record), CSV or Markdown.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// The flags that describe one job; shared by every command that estimates (and by `probe`,
/// where no `--model` means the built-in toy model).
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// Preset name (llama-3.1-8b, mistral-7b, …), bare size (7B, 70B, 1.5B), a path to a
    /// Hugging Face config.json (file or model folder), or a Hub id (org/name) in the local
    /// Hugging Face cache [required unless --from names the model].
    #[arg(long)]
    pub model: Option<String>,
    /// full, lora or qlora (`estimate` also takes inference: one prefill with a KV cache)
    /// [default: full, or the --from file's].
    #[arg(long)]
    pub method: Option<String>,
    /// Micro-batch size [default: 1, or the --from file's].
    #[arg(long, allow_negative_numbers = true, value_parser = positive_int)]
    pub batch: Option<u64>,
    /// Sequence length in tokens, 4k = 4096 [default: 2048, or the --from file's].
    #[arg(long, allow_negative_numbers = true, value_parser = seq_len)]
    pub seq: Option<u64>,
    #[command(flatten)]
    pub settings: JobSettings,
}

/// A job and, when it came from `--from`, where each setting came from.
pub struct ResolvedJob {
    pub job: Job,
    pub from: Option<JobFile>,
    /// The model folder's safetensors headers, when it has any.
    pub checkpoint: Option<memplan::hub::Checkpoint>,
}

impl JobArgs {
    /// Parses and validates into a [`Job`].
    pub fn job(&self) -> Result<Job> {
        Ok(self.resolve()?.job)
    }

    /// The job with the provenance of a `--from` file.
    pub fn resolve(&self) -> Result<ResolvedJob> {
        let file = self.settings.file()?;
        let model = model_arg(self.model.as_deref(), file.as_ref())?;
        let (shape, _) = resolve_model(&model)?;
        self.settings.resolve(
            shape,
            &model,
            file,
            self.method.as_deref(),
            self.batch,
            self.seq,
        )
    }
}

/// `--model`, or the model the `--from` file names.
fn model_arg(flag: Option<&str>, file: Option<&JobFile>) -> Result<String> {
    match (flag, file.and_then(|f| f.settings.model.as_deref())) {
        (Some(m), _) => Ok(m.to_string()),
        (None, Some(m)) => Ok(m.to_string()),
        (None, None) => match file {
            Some(f) => anyhow::bail!(
                "{} names no model: add --model (a preset, a config.json or a cached org/name)",
                f.path.display()
            ),
            None => anyhow::bail!(
                "--model is required (a preset, a size such as 8B, a config.json, or a cached org/name), or --from FILE naming one"
            ),
        },
    }
}

/// Multi-GPU data parallelism: how many GPUs and what DeepSpeed ZeRO / FSDP shards over them.
#[derive(Debug, Clone, Args)]
pub struct ShardArgs {
    /// GPUs in total (data-parallel ranks); byte figures are then per GPU.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub gpus: i64,
    /// Nodes the GPUs are spread over (FSDP hybrid-shard shards within a node).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub nodes: i64,
    /// DeepSpeed ZeRO stage: 0 (replicate), 1 (optimizer state), 2 (+ gradients), 3 (+ parameters).
    #[arg(long, conflicts_with = "fsdp", allow_negative_numbers = true, value_parser = zero_stage)]
    pub zero: Option<u8>,
    /// PyTorch FSDP sharding strategy: full-shard, shard-grad-op or hybrid-shard.
    #[arg(long)]
    pub fsdp: Option<String>,
    /// FSDP implementation: 2 (fully_shard) or 1 (FullyShardedDataParallel).
    #[arg(long, default_value_t = 2)]
    pub fsdp_version: u8,
    /// FSDP reduce_dtype: the dtype gradients are reduce-scattered in, fp32 or bf16 [default:
    /// the gathered parameters' dtype, as torch and accelerate default to].
    #[arg(long)]
    pub reduce_dtype: Option<String>,
    /// CPU offload: none, optimizer or optimizer+params.
    #[arg(long, default_value = "none")]
    pub offload: String,
    /// Gradient reduction bucket in elements (DeepSpeed reduce_bucket_size) [default: 5e8].
    #[arg(long)]
    pub reduce_bucket: Option<String>,
    /// ZeRO-3 parameter prefetch in elements (stage3_prefetch_bucket_size) [default: 5e7].
    #[arg(long)]
    pub prefetch_bucket: Option<String>,
}

/// A bucket size in elements: at least 1, at most 10^15 (a bucket larger than any model; the
/// bound keeps the count from saturating).
fn positive_count(flag: &str, text: &str) -> Result<u128> {
    let v = text
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 1.0)
        .or_else(|| parse_count(text).filter(|v| *v >= 1.0))
        .filter(|v| *v <= 1e15)
        .with_context(|| {
            format!("{flag} '{text}': expected a positive count such as 5e8 or 50M, at most 1e15")
        })?;
    Ok(v.round() as u128)
}

impl ShardArgs {
    /// The sharding of the job, or `None` for one GPU without an engine.
    pub fn sharding(&self) -> Result<Option<Sharding>> {
        if self.gpus < 1 {
            anyhow::bail!("--gpus {}: at least 1 GPU is needed", self.gpus);
        }
        if self.nodes < 1 {
            anyhow::bail!("--nodes {}: at least 1 node is needed", self.nodes);
        }
        let offload: Offload = self.offload.parse()?;
        let engine = match (self.zero, &self.fsdp) {
            (Some(z), _) => Engine::Zero(z),
            (None, Some(f)) => Engine::Fsdp(f.parse::<FsdpStrategy>()?),
            (None, None) => {
                if self.gpus == 1 && self.nodes == 1 && offload == Offload::None {
                    return Ok(None);
                }
                anyhow::bail!(
                    "--gpus {} / --offload {} need an engine: add --zero 0|1|2|3 (DeepSpeed; 0 replicates like DDP) or --fsdp full-shard|shard-grad-op|hybrid-shard",
                    self.gpus,
                    self.offload
                );
            }
        };
        let mut s = Sharding::new(self.gpus as u128, engine);
        s.nodes = self.nodes as u128;
        s.offload = offload;
        s.fsdp_version = self.fsdp_version;
        if let Some(d) = &self.reduce_dtype {
            let d: memplan::Precision = d.parse()?;
            if !d.is_float() || !matches!(engine, Engine::Fsdp(_)) {
                anyhow::bail!(
                    "--reduce-dtype {d}: FSDP reduces gradients in fp32, bf16 or fp16 (with --fsdp)"
                );
            }
            s.reduce_dtype = Some(d);
        }
        s.reduce_bucket = match &self.reduce_bucket {
            Some(t) => positive_count("--reduce-bucket", t)?,
            None => DEFAULT_REDUCE_BUCKET,
        };
        s.prefetch_bucket = match &self.prefetch_bucket {
            Some(t) => positive_count("--prefetch-bucket", t)?,
            None => DEFAULT_PREFETCH_BUCKET,
        };
        s.validate()?;
        Ok(Some(s))
    }
}

/// Engine configuration files `--emit` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Emit {
    /// DeepSpeed ds_config.json (needs --zero).
    Deepspeed,
    /// accelerate FSDP config YAML (needs --fsdp).
    Accelerate,
}

#[derive(Debug, Args)]
pub struct EstimateArgs {
    #[command(flatten)]
    pub job: JobArgs,
    #[command(flatten)]
    pub shard: ShardArgs,
    /// Print the engine config for this plan instead of the estimate (redirect to a file).
    #[arg(long, value_enum)]
    pub emit: Option<Emit>,
    /// Global batch in sequences that --emit reaches with gradient accumulation.
    #[arg(long, allow_negative_numbers = true, value_parser = positive_int)]
    pub global_batch: Option<u64>,
    /// TOML file of [[gpu]] entries that add GPUs or override preset fields.
    #[arg(long)]
    pub gpu_file: Option<PathBuf>,
    /// A GPU preset (h100-80gb, rtx-4090, …) or a size with its unit (24GB = 24·10^9 bytes,
    /// 24GiB = 24·2^30): adds a fit verdict.
    #[arg(long)]
    pub gpu: Option<String>,
    /// TOML written by `memplan probe --save-calibration`: measured CUDA context and workspace.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Output format: a text table, JSON (the full record), CSV or Markdown.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Print each component's formula with the numbers substituted, and its source.
    #[arg(long)]
    pub explain: bool,
    /// Exit with status 3 when the plan does not fit --gpu (for scripts and CI).
    #[arg(long, requires = "gpu")]
    pub check: bool,
}

#[derive(Debug, Args)]
pub struct TableArgs {
    /// The rule-of-thumb table (bytes per parameter) beside memplan's estimates.
    #[arg(long)]
    pub seed: bool,
    /// Output format: a text table, JSON (the full record), CSV or Markdown.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct ChartArgs {
    #[command(subcommand)]
    pub kind: ChartKind,
}

#[derive(Debug, Subcommand)]
pub enum ChartKind {
    /// Stacked bars of the memory breakdown per model × method, with GPU capacity lines.
    Breakdown(BreakdownArgs),
    /// Memory against sequence length or batch size, with where each GPU's capacity is crossed.
    Sweep(SweepArgs),
}

/// The estimate flags other than model, method, batch and sequence length (which the chart
/// commands take as lists); flattened into [`JobArgs`] too. Each is optional so that a
/// `--from` file's value stands unless the flag is given.
#[derive(Debug, Clone, Args)]
pub struct JobSettings {
    /// A training config to read the job from: axolotl YAML, LLaMA-Factory YAML (classic or v1),
    /// TRL SFTConfig / transformers TrainingArguments (YAML or JSON), or a torchtune recipe.
    /// Flags given beside it override the file.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// Storage of the base weights: fp32, fp16, bf16, int8, nf4 [default: bf16, nf4 for qlora].
    #[arg(long)]
    pub weights: Option<String>,
    /// Activation / autocast dtype: fp32, fp16, bf16 [default: the weights' dtype; bf16 for
    /// int8/nf4].
    #[arg(long)]
    pub compute: Option<String>,
    /// LoRA rank [default: 16].
    #[arg(long, allow_negative_numbers = true, value_parser = positive_int)]
    pub rank: Option<u64>,
    /// all-linear, attention, mlp, or a comma list of module names (q_proj,v_proj,…)
    /// [default: all-linear].
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// LoRA dropout probability [default: 0.05].
    #[arg(long, allow_negative_numbers = true)]
    pub lora_dropout: Option<f64>,
    /// QLoRA double quantization of the absmax constants (default on).
    #[arg(long, overrides_with = "no_double_quant")]
    pub double_quant: bool,
    /// Turn QLoRA double quantization off.
    #[arg(long)]
    pub no_double_quant: bool,
    /// adamw, adamw-fused, adamw-8bit, paged-adamw, paged-adamw-8bit, sgd, sgd-momentum,
    /// adafactor [default: adamw].
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Activation checkpointing per decoder layer: on by default for training, as TRL's SFT,
    /// LLaMA-Factory and Unsloth default and as the QLoRA paper trained.
    #[arg(long, overrides_with = "no_grad_checkpointing")]
    pub grad_checkpointing: bool,
    /// Keep every layer's activations (transformers' Trainer default, gradient_checkpointing=False),
    /// also over a --from file that turns checkpointing on.
    #[arg(long)]
    pub no_grad_checkpointing: bool,
    /// sdpa, eager or flash [default: sdpa; eager for models transformers runs eager-only].
    #[arg(long)]
    pub attention: Option<String>,
    /// QLoRA with peft's prepare_model_for_kbit_training (fp32 non-quantized parameters).
    #[arg(long)]
    pub kbit_prep: bool,
    /// How the loss is computed: ce (transformers, full logits), chunked-nll (TRL's SFT
    /// default), liger (fused linear cross-entropy) or cce (Cut Cross-Entropy) [default: ce].
    #[arg(long)]
    pub loss: Option<String>,
    /// Fraction of tokens with a label (completion-only losses) [default: 1].
    #[arg(long)]
    pub supervised_fraction: Option<f64>,
    /// Packed, padding-free batches (needs --attention flash).
    #[arg(long)]
    pub packing: bool,
    /// Keep saved activations (with checkpointing: the checkpointed layer inputs) in host RAM
    /// between forward and backward.
    #[arg(long)]
    pub activation_offload: bool,
    /// Liger's RMSNorm, SwiGLU and RoPE kernels in the decoder layers.
    #[arg(long)]
    pub liger_kernels: bool,
    /// MoE under QLoRA: quantize the fused experts one expert at a time (as transformers 4.x and
    /// some trainers do); by default transformers 5 + bitsandbytes keep them in 16 bit.
    #[arg(long)]
    pub quantize_experts: bool,
    /// QLoRA: the model was built in 16 bits on the GPU, then its Linear layers quantized one by
    /// one (bitsandbytes' replace_with_bnb_linear on a loaded model); by default each weight is
    /// quantized as it loads (from_pretrained with a BitsAndBytesConfig).
    #[arg(long)]
    pub quantize_after_load: bool,
    /// PyTorch caching-allocator settings, as in PYTORCH_CUDA_ALLOC_CONF, e.g.
    /// expandable_segments:True,max_split_size_mb:128.
    #[arg(long)]
    pub alloc_conf: Option<String>,
}

/// A comma list without empty items.
fn list<'a>(flag: &str, text: &'a str) -> Result<Vec<&'a str>> {
    let items: Vec<&str> = text.split(',').map(str::trim).collect();
    if items.iter().any(|i| i.is_empty()) {
        anyhow::bail!("{flag} '{text}': expected a comma list such as 8B,70B or full,lora,qlora");
    }
    Ok(items)
}

/// `--gpu a100-80gb,rtx-4090` resolved.
pub fn gpus(arg: Option<&str>) -> Result<Vec<memplan::gpu::Gpu>> {
    match arg {
        None => Ok(Vec::new()),
        Some(text) => list("--gpu", text)?
            .into_iter()
            .map(|g| Ok(memplan::gpu::resolve_gpu(g)?))
            .collect(),
    }
}

#[derive(Debug, Args)]
pub struct BreakdownArgs {
    /// Models, comma-separated (presets, sizes such as 8B, config.json paths or cached org/name)
    /// [required unless --from names the model].
    #[arg(long)]
    pub model: Option<String>,
    /// Methods, comma-separated: full, lora, qlora, inference [default: full, or the --from
    /// file's].
    #[arg(long)]
    pub method: Option<String>,
    /// Micro-batch size [default: 1, or the --from file's].
    #[arg(long, allow_negative_numbers = true, value_parser = positive_int)]
    pub batch: Option<u64>,
    /// Sequence length in tokens, 4k = 4096 [default: 2048, or the --from file's].
    #[arg(long, allow_negative_numbers = true, value_parser = seq_len)]
    pub seq: Option<u64>,
    #[command(flatten)]
    pub settings: JobSettings,
    /// GPUs whose capacity is drawn, comma-separated (presets or sizes such as 24GB).
    #[arg(long)]
    pub gpu: Option<String>,
    /// The file to write: .png, .svg or .html.
    #[arg(long)]
    pub out: PathBuf,
}

impl BreakdownArgs {
    pub fn jobs(&self) -> Result<Vec<Job>> {
        self.settings.jobs(
            self.model.as_deref(),
            self.method.as_deref(),
            self.batch,
            self.seq,
        )
    }
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Models, comma-separated (presets, sizes such as 8B, config.json paths or cached org/name)
    /// [required unless --from names the model].
    #[arg(long)]
    pub model: Option<String>,
    /// Methods, comma-separated: full, lora, qlora, inference [default: full, or the --from
    /// file's].
    #[arg(long)]
    pub method: Option<String>,
    /// Sequence lengths: 2048, a list (1024,2048), a doubling range (512..16384), a stepped
    /// range (512..16384:512) or a geometric one (512..65536*4) [default: 2048, or the --from
    /// file's].
    #[arg(long)]
    pub seq: Option<String>,
    /// Batch sizes, as --seq takes them (1..64 doubles: 1, 2, 4, …, 64) [default: 1, or the
    /// --from file's].
    #[arg(long)]
    pub batch: Option<String>,
    #[command(flatten)]
    pub settings: JobSettings,
    /// GPUs whose capacity is drawn, comma-separated (presets or sizes such as 24GB).
    #[arg(long)]
    pub gpu: Option<String>,
    /// The file to write: .png, .svg or .html.
    #[arg(long)]
    pub out: PathBuf,
}

/// A sweep's inputs, parsed.
pub struct SweepInput {
    pub jobs: Vec<Job>,
    pub seqs: Vec<u128>,
    pub batches: Vec<u128>,
}

impl SweepArgs {
    pub fn input(&self) -> Result<SweepInput> {
        let parse = |flag: &'static str, v: &Option<String>| {
            v.as_deref()
                .map(|t| memplan::chart::parse_values(flag, t))
                .transpose()
        };
        let seqs = parse("--seq", &self.seq)?;
        let batches = parse("--batch", &self.batch)?;
        // The jobs are built at the first point; the sweep sets the axis per point.
        let first = |v: &Option<Vec<u128>>, flag: &str| -> Result<Option<u64>> {
            v.as_ref()
                .map(|v| {
                    u64::try_from(v[0]).with_context(|| format!("{flag} {} is too large", v[0]))
                })
                .transpose()
        };
        let jobs = self.settings.jobs(
            self.model.as_deref(),
            self.method.as_deref(),
            first(&batches, "--batch")?,
            first(&seqs, "--seq")?,
        )?;
        // Without --seq/--batch the axis is the (file's or default) value of the first job.
        let seqs = seqs.unwrap_or_else(|| vec![jobs[0].seq]);
        let batches = batches.unwrap_or_else(|| vec![jobs[0].batch]);
        Ok(SweepInput {
            jobs,
            seqs,
            batches,
        })
    }
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// GPUs to give a verdict for, comma-separated (presets or sizes such as 24GB).
    #[arg(long, default_value = "rtx-4090,a100-80gb,h100-80gb")]
    pub gpu: String,
    /// The HTML file to write.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct FitArgs {
    /// Preset name, bare size (70B), config.json path or cached org/name [required unless
    /// --from names the model].
    #[arg(long)]
    pub model: Option<String>,
    /// A training config (see `memplan estimate --help`): its model, sequence length, attention,
    /// LoRA settings, loss and offload are kept; method, optimizer, batch and checkpointing are
    /// what the search varies.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// GPU preset or size (24GB).
    #[arg(long)]
    pub gpu: String,
    /// Sequence length the micro-batch search runs at, 4k = 4096 [default: 2048, or the --from
    /// file's].
    #[arg(long, allow_negative_numbers = true, value_parser = seq_len)]
    pub seq: Option<u64>,
    /// sdpa, eager or flash [default: sdpa; eager for models transformers runs eager-only].
    #[arg(long)]
    pub attention: Option<String>,
    /// LoRA rank of the LoRA/QLoRA plans [default: 16].
    #[arg(long, allow_negative_numbers = true, value_parser = positive_int)]
    pub rank: Option<u64>,
    /// LoRA target modules of the LoRA/QLoRA plans [default: all-linear].
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// LoRA dropout of the LoRA/QLoRA plans [default: 0.05].
    #[arg(long, allow_negative_numbers = true)]
    pub lora_dropout: Option<f64>,
    #[command(flatten)]
    pub shard: ShardArgs,
    /// Model FLOPs utilization for the throughput ranking.
    #[arg(long, default_value_t = memplan::cost::DEFAULT_MFU, allow_negative_numbers = true)]
    pub mfu: f64,
    /// TOML file of [[gpu]] entries that add GPUs or override preset fields (presets/README.md).
    #[arg(long)]
    pub gpu_file: Option<PathBuf>,
    /// Output format: a text table, JSON (the full record), CSV or Markdown.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

impl FitArgs {
    /// The base job of the search (method, optimizer, batch and checkpointing vary).
    pub fn base(&self) -> Result<Job> {
        let file = self
            .from
            .as_deref()
            .map(|p| memplan::jobfile::load(p).context("--from"))
            .transpose()?;
        let name = model_arg(self.model.as_deref(), file.as_ref())?;
        let (model, _) = resolve_model(&name)?;
        let mut job = Job::new(model, Method::Lora);
        if let Some(f) = &file {
            // What the search does not vary comes from the file.
            let mut s = f.settings.clone();
            (s.method, s.optimizer, s.batch, s.grad_checkpointing) = (None, None, None, None);
            (s.weights, s.kbit_prep) = (None, None);
            memplan::jobfile::apply(&mut job, &s)?;
        }
        if let Some(l) = job.lora.as_mut() {
            if let Some(r) = self.rank {
                l.rank = r.into();
            }
            if let Some(t) = &self.lora_targets {
                l.targets = parse_targets(t)?;
            }
            if let Some(d) = self.lora_dropout {
                l.dropout = d;
            }
        }
        if let Some(s) = self.seq {
            job.seq = s.into();
        }
        if let Some(a) = &self.attention {
            job.attention = a.parse::<Attention>()?;
        }
        job.sharding = self.shard.sharding()?;
        job.validate()?;
        Ok(job)
    }
}

#[derive(Debug, Args)]
pub struct CostArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// GPU preset (its throughput, bandwidth and prices are used).
    #[arg(long)]
    pub gpu: String,
    /// GPUs training together.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub gpus: i64,
    /// Tokens in the data set per epoch: 50M, 1.2B, 300000.
    #[arg(long, allow_hyphen_values = true)]
    pub tokens: String,
    /// Passes over the data set (fractions allowed: 0.5).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub epochs: f64,
    /// Model FLOPs utilization (fraction of peak).
    #[arg(long, default_value_t = memplan::cost::DEFAULT_MFU, allow_negative_numbers = true)]
    pub mfu: f64,
    /// Price per GPU-hour [default: the preset's typical price, USD].
    #[arg(long, allow_negative_numbers = true)]
    pub price: Option<f64>,
    /// Purchase price per GPU for the buy-vs-rent view [default: the preset's, USD].
    #[arg(long, allow_negative_numbers = true)]
    pub purchase_price: Option<f64>,
    /// Currency label of the prices (non-USD needs --price).
    #[arg(long, default_value = "USD")]
    pub currency: String,
    /// Peak dense TFLOP/s per GPU instead of the preset's.
    #[arg(long, allow_negative_numbers = true)]
    pub peak_tflops: Option<f64>,
    /// Leave attention-score FLOPs out (the classic 6·N·D).
    #[arg(long)]
    pub no_attention_flops: bool,
    /// Leave QLoRA's dequantization time out.
    #[arg(long)]
    pub no_dequant_overhead: bool,
    /// TOML file of [[gpu]] entries that add GPUs or override preset fields (presets/README.md).
    #[arg(long)]
    pub gpu_file: Option<PathBuf>,
    /// Output format: a text table, JSON (the full record), CSV or Markdown.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

impl CostArgs {
    pub fn tokens(&self) -> Result<u128> {
        let v = parse_count(&self.tokens)
            .filter(|v| (1.0..=memplan::cost::MAX_TOKENS as f64).contains(v))
            .with_context(|| {
                format!(
                    "--tokens '{}': expected a positive count such as 50M or 1.2B, at most 1e15",
                    self.tokens
                )
            })?;
        Ok(v.round() as u128)
    }

    pub fn gpus(&self) -> Result<u128> {
        if self.gpus < 1 {
            anyhow::bail!("--gpus {}: at least 1 GPU is needed", self.gpus);
        }
        Ok(self.gpus as u128)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    const BEGIN: &str = "<!-- BEGIN: generated from the CLI definition by `cargo test --bin memplan` (MEMPLAN_BLESS=1 rewrites it) -->\n";
    const END: &str = "<!-- END: generated -->\n";

    fn cell(text: &str) -> String {
        text.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replace('|', "\\|")
    }

    /// Every command and flag as Markdown: the reference part of book/src/usage.md.
    fn usage_reference() -> String {
        let cli = Cli::command();
        let mut out = String::new();
        for sub in cli.get_subcommands() {
            let mut cmds = vec![(format!("memplan {}", sub.get_name()), sub)];
            cmds.extend(
                sub.get_subcommands()
                    .map(|s| (format!("memplan {} {}", sub.get_name(), s.get_name()), s)),
            );
            for (name, cmd) in cmds {
                if cmd.has_subcommands() {
                    out += &format!(
                        "### `{name}`\n\n{}\n\n",
                        cell(&cmd.get_about().map(|a| a.to_string()).unwrap_or_default())
                    );
                    continue;
                }
                out += &format!(
                    "### `{name}`\n\n{}\n\n| flag | meaning | default |\n|---|---|---|\n",
                    cell(&cmd.get_about().map(|a| a.to_string()).unwrap_or_default())
                );
                for arg in cmd.get_arguments() {
                    let id = arg.get_id().as_str();
                    if id == "help" || id == "version" {
                        continue;
                    }
                    let flag = match arg.get_long() {
                        Some(l) => format!("`--{l}`"),
                        None => format!("`<{}>`", id.to_ascii_uppercase()),
                    };
                    let mut help = cell(&arg.get_help().map(|h| h.to_string()).unwrap_or_default());
                    let values: Vec<String> = arg
                        .get_possible_values()
                        .iter()
                        .filter(|_| arg.get_action().takes_values())
                        .map(|v| format!("`{}`", v.get_name()))
                        .collect();
                    if !values.is_empty() {
                        help += &format!(" ({})", values.join(", "));
                    }
                    let default: Vec<String> = arg
                        .get_default_values()
                        .iter()
                        .map(|v| v.to_string_lossy().into_owned())
                        .filter(|v| v != "false")
                        .map(|v| format!("`{v}`"))
                        .collect();
                    out += &format!("| {flag} | {help} | {} |\n", default.join(", "));
                }
                out += "\n";
            }
        }
        out
    }

    #[test]
    fn every_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    arg.get_help()
                        .is_some_and(|h| !h.to_string().trim().is_empty()),
                    "{path} --{id} has no help text"
                );
            }
            for sub in cmd.get_subcommands() {
                assert!(
                    sub.get_about().is_some(),
                    "{path} {} has no about",
                    sub.get_name()
                );
                walk(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        walk(&Cli::command(), "memplan");
    }

    /// book/src/usage.md holds the reference generated above, so it lists every flag of every
    /// command (sharding, --emit, --check, …) and cannot fall behind the CLI.
    #[test]
    fn the_books_usage_page_is_generated_from_the_cli() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("book/src/usage.md");
        let page = std::fs::read_to_string(&path).unwrap();
        let (start, end) = (page.find(BEGIN), page.find(END));
        let (Some(start), Some(end)) = (start, end) else {
            panic!("book/src/usage.md lacks the generated-reference markers");
        };
        let now = format!(
            "{}{BEGIN}\n{}{END}{}",
            &page[..start],
            usage_reference(),
            &page[end + END.len()..]
        );
        if std::env::var_os("MEMPLAN_BLESS").is_some() {
            std::fs::write(&path, &now).unwrap();
        }
        assert!(
            page == now,
            "book/src/usage.md is out of date: run MEMPLAN_BLESS=1 cargo test --bin memplan"
        );
    }

    #[test]
    fn value_parsers_say_what_they_expect() {
        assert_eq!(positive_int("4"), Ok(4));
        assert!(positive_int("-1").unwrap_err().contains("positive integer"));
        assert!(positive_int("0").is_err());
        assert_eq!(seq_len("4k"), Ok(4096));
        assert_eq!(seq_len("128K"), Ok(131072));
        assert_eq!(seq_len("1M"), Ok(1 << 20));
        assert!(seq_len("-4k").is_err());
        assert_eq!(zero_stage("3"), Ok(3));
        assert!(zero_stage("4").unwrap_err().contains("0–3"));
    }
}
