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

/// The flags that describe one job; shared by every command that estimates (and by `probe`,
/// where no `--model` means the built-in toy model).
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// Preset name (llama-3.1-8b, mistral-7b, …), bare size (7B, 70B, 1.5B), a path to a
    /// Hugging Face config.json (file or model folder), or a Hub id (org/name) in the local
    /// Hugging Face cache [required unless --from names the model].
    #[arg(long)]
    pub model: Option<String>,
    /// full, lora, qlora or inference [default: full, or the --from file's].
    #[arg(long)]
    pub method: Option<String>,
    /// Micro-batch size [default: 1, or the --from file's].
    #[arg(long)]
    pub batch: Option<u64>,
    /// Sequence length in tokens [default: 2048, or the --from file's].
    #[arg(long)]
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
    #[arg(long, conflicts_with = "fsdp")]
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

fn positive_count(flag: &str, text: &str) -> Result<u128> {
    let v = text
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 1.0)
        .or_else(|| parse_count(text).filter(|v| *v >= 1.0))
        .with_context(|| {
            format!("{flag} '{text}': expected a positive count such as 5e8 or 50M")
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
    #[arg(long)]
    pub global_batch: Option<u128>,
    /// TOML file of [[gpu]] entries that add GPUs or override preset fields.
    #[arg(long)]
    pub gpu_file: Option<PathBuf>,
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
    #[arg(long)]
    pub rank: Option<u64>,
    /// all-linear, attention, mlp, or a comma list of module names (q_proj,v_proj,…)
    /// [default: all-linear].
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// LoRA dropout probability [default: 0.05].
    #[arg(long)]
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
    /// Activation checkpointing per decoder layer.
    #[arg(long, overrides_with = "no_grad_checkpointing")]
    pub grad_checkpointing: bool,
    /// Turn activation checkpointing off (e.g. over a --from file that turns it on).
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
    /// PyTorch caching-allocator settings, as in PYTORCH_CUDA_ALLOC_CONF, e.g.
    /// expandable_segments:True,max_split_size_mb:128.
    #[arg(long)]
    pub alloc_conf: Option<String>,
}

impl JobSettings {
    /// The `--from` file, parsed.
    pub fn file(&self) -> Result<Option<JobFile>> {
        self.from
            .as_deref()
            .map(|p| memplan::jobfile::load(p).context("--from"))
            .transpose()
    }

    /// The job: built-in defaults, then the file (and the checkpoint's `quantization_config`),
    /// then the flags given. `model_arg` is what names the model (to find its config.json).
    pub fn resolve(
        &self,
        model: memplan::ModelShape,
        model_arg: &str,
        mut file: Option<JobFile>,
        method: Option<&str>,
        batch: Option<u64>,
        seq: Option<u64>,
    ) -> Result<ResolvedJob> {
        use memplan::jobfile::{Provenance, Source};
        let fs = file
            .as_ref()
            .map(|f| f.settings.clone())
            .unwrap_or_default();
        let quant = memplan::hub::config_json_for(model_arg)
            .map(|p| memplan::hub::checkpoint_quant(&p))
            .transpose()?
            .flatten();
        let mut notes: Vec<Provenance> = Vec::new();
        let mut flag = |setting: &'static str, value: String, flag: String| {
            notes.push(Provenance {
                setting,
                value,
                source: Source::Flag(flag),
            })
        };
        let method_flag: Option<Method> = method.map(str::parse).transpose()?;
        let method = match (method_flag, fs.method, &quant) {
            (Some(m), _, _) => m,
            (None, Some(m), _) => m,
            (None, None, Some(CheckpointQuant::Bnb4bit { .. })) => Method::Qlora,
            (None, None, Some(CheckpointQuant::Bnb8bit)) => Method::Lora,
            (None, None, _) => Method::Full,
        };
        if let Some(m) = method_flag {
            flag("method", m.to_string(), format!("--method {m}"));
        }
        let mut job = Job::new(model, method);
        let mut file_settings = fs.clone();
        if method_flag.is_some_and(|m| Some(m) != fs.method) {
            // The file's precisions belong to its own method.
            file_settings.weights = None;
        }
        memplan::jobfile::apply(&mut job, &file_settings)?;
        match &quant {
            None => {}
            Some(CheckpointQuant::Bnb4bit {
                double_quant,
                compute,
            }) => {
                if method != Method::Qlora {
                    anyhow::bail!("{model_arg} is stored pre-quantized in bitsandbytes 4-bit (config.json quantization_config): it trains only as QLoRA (--method qlora), not {method}");
                }
                job.double_quant = *double_quant;
                if let Some(c) = compute {
                    job.compute = *c;
                }
            }
            Some(CheckpointQuant::Bnb8bit) => {
                if method != Method::Lora {
                    anyhow::bail!("{model_arg} is stored pre-quantized in bitsandbytes 8-bit (config.json quantization_config): it trains only as LoRA on the int8 base (--method lora), not {method}");
                }
                job.weights = memplan::Precision::Int8;
            }
            Some(CheckpointQuant::DequantizedBf16 { quant_method }) => {
                if method == Method::Qlora {
                    // transformers' AutoHfQuantizer.merge_quantization_configs keeps a
                    // pre-quantized checkpoint's own config over one passed at load.
                    anyhow::bail!("{model_arg} is stored in {quant_method} (config.json quantization_config): transformers keeps that config over a BitsAndBytesConfig passed at load, so QLoRA needs a bf16 copy of the checkpoint first; use --method lora (trained dequantized to bf16) or a bf16 checkpoint");
                }
                job.weights = memplan::Precision::Bf16;
            }
        }
        if let Some(w) = &self.weights {
            job.weights = w.parse().context("--weights")?;
            flag("weights", job.weights.to_string(), format!("--weights {w}"));
        }
        job.compute = match &self.compute {
            Some(c) => {
                let c: memplan::Precision = c.parse().context("--compute")?;
                flag("compute", c.to_string(), format!("--compute {c}"));
                c
            }
            None if self.weights.is_none()
                && (fs.compute.is_some()
                    || matches!(
                        &quant,
                        Some(CheckpointQuant::Bnb4bit {
                            compute: Some(_),
                            ..
                        })
                    )) =>
            {
                job.compute
            }
            None if job.weights.is_float() => job.weights,
            None => memplan::Precision::Bf16,
        };
        if let Some(l) = job.lora.as_mut() {
            if let Some(r) = self.rank {
                l.rank = r.into();
                flag("rank", r.to_string(), format!("--rank {r}"));
            }
            if let Some(t) = &self.lora_targets {
                l.targets = parse_targets(t)?;
                flag("lora_targets", t.clone(), format!("--lora-targets {t}"));
            }
            if let Some(d) = self.lora_dropout {
                l.dropout = d;
                flag("lora_dropout", d.to_string(), format!("--lora-dropout {d}"));
            }
        }
        if self.no_double_quant {
            job.double_quant = false;
            flag("double_quant", "false".into(), "--no-double-quant".into());
        } else if self.double_quant {
            job.double_quant = true;
            flag("double_quant", "true".into(), "--double-quant".into());
        }
        if let Some(o) = &self.optimizer {
            job.optimizer = o.parse::<Optimizer>()?;
            flag(
                "optimizer",
                job.optimizer.to_string(),
                format!("--optimizer {o}"),
            );
        }
        if let Some(b) = batch {
            job.batch = b.into();
            flag("batch", b.to_string(), format!("--batch {b}"));
        }
        if let Some(s) = seq {
            job.seq = s.into();
            flag("seq", s.to_string(), format!("--seq {s}"));
        }
        if self.grad_checkpointing {
            job.grad_checkpointing = true;
            flag(
                "grad_checkpointing",
                "true".into(),
                "--grad-checkpointing".into(),
            );
        } else if self.no_grad_checkpointing {
            job.grad_checkpointing = false;
            flag(
                "grad_checkpointing",
                "false".into(),
                "--no-grad-checkpointing".into(),
            );
        }
        if let Some(a) = &self.attention {
            job.attention = a.parse::<Attention>()?;
            flag(
                "attention",
                job.attention.to_string(),
                format!("--attention {a}"),
            );
        }
        if self.kbit_prep {
            job.kbit_prep = true;
            flag("kbit_prep", "true".into(), "--kbit-prep".into());
        }
        if let Some(l) = &self.loss {
            job.loss = l.parse::<Loss>()?;
            flag("loss", job.loss.to_string(), format!("--loss {l}"));
        }
        if let Some(f) = self.supervised_fraction {
            job.supervised_fraction = f;
            flag(
                "supervised_fraction",
                f.to_string(),
                format!("--supervised-fraction {f}"),
            );
        }
        for (on, setting, name, slot) in [
            (self.packing, "packing", "--packing", &mut job.packing),
            (
                self.activation_offload,
                "activation_offload",
                "--activation-offload",
                &mut job.activation_offload,
            ),
            (
                self.liger_kernels,
                "liger_kernels",
                "--liger-kernels",
                &mut job.liger_kernels,
            ),
        ] {
            if on {
                *slot = true;
                flag(setting, "true".into(), name.into());
            }
        }
        if self.quantize_experts {
            job.quantize_experts = true;
            flag(
                "quantize_experts",
                "true".into(),
                "--quantize-experts".into(),
            );
        }
        if let Some(c) = &self.alloc_conf {
            job.alloc_conf = c.parse()?;
            flag("alloc_conf", c.clone(), format!("--alloc-conf {c}"));
        }
        job.validate()?;
        if let Some(f) = file.as_mut() {
            // A flag replaces the file's row for the same setting.
            for n in notes {
                match f.provenance.iter_mut().find(|p| p.setting == n.setting) {
                    Some(row) => *row = n,
                    None => f.provenance.push(n),
                }
            }
            if let Some(q) = &quant {
                f.provenance.push(Provenance {
                    setting: "quantization_config",
                    value: match q {
                        CheckpointQuant::Bnb4bit { .. } => {
                            "bitsandbytes 4-bit (QLoRA on the stored base)".into()
                        }
                        CheckpointQuant::Bnb8bit => {
                            "bitsandbytes 8-bit (LoRA on the int8 base)".into()
                        }
                        CheckpointQuant::DequantizedBf16 { quant_method } => {
                            format!("{quant_method}: not trainable quantized; dequantized to bf16")
                        }
                    },
                    source: Source::ModelConfig(model_arg.to_string()),
                });
            }
        }
        let checkpoint = match memplan::hub::config_json_for(model_arg)
            .as_deref()
            .and_then(std::path::Path::parent)
        {
            Some(dir) if dir.is_dir() => memplan::hub::Checkpoint::read(
                dir,
                job.model.param_counts().total,
                quant.is_some(),
            )?,
            _ => None,
        };
        Ok(ResolvedJob {
            job,
            from: file,
            checkpoint,
        })
    }

    /// One job per model × method (models outer), batch and sequence length as given.
    fn jobs(
        &self,
        models: Option<&str>,
        methods: Option<&str>,
        batch: Option<u64>,
        seq: Option<u64>,
    ) -> Result<Vec<Job>> {
        let file = self.file()?;
        let file_model = file.as_ref().and_then(|f| f.settings.model.clone());
        let models = match (models, &file_model) {
            (Some(m), _) => m.to_string(),
            (None, Some(m)) => m.clone(),
            (None, None) => model_arg(None, file.as_ref())?,
        };
        let methods: Vec<Option<&str>> = match methods {
            Some(m) => list("--method", m)?.into_iter().map(Some).collect(),
            None if file.is_some() => vec![None],
            None => vec![Some("full")],
        };
        let mut jobs = Vec::new();
        for m in list("--model", &models)? {
            let (model, _) = resolve_model(m)?;
            for method in &methods {
                let job = self
                    .resolve(model.clone(), m, file.clone(), *method, batch, seq)
                    .with_context(|| {
                        format!(
                            "--model {m} --method {}",
                            method.unwrap_or("(from the file)")
                        )
                    })?
                    .job;
                memplan::chart::values::check_value("--batch", job.batch)?;
                memplan::chart::values::check_value("--seq", job.seq)?;
                jobs.push(job);
            }
        }
        Ok(jobs)
    }
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
    #[arg(long)]
    pub batch: Option<u64>,
    /// Sequence length in tokens [default: 2048, or the --from file's].
    #[arg(long)]
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
    /// Sequence length the micro-batch search runs at [default: 2048, or the --from file's].
    #[arg(long)]
    pub seq: Option<u64>,
    /// sdpa, eager or flash [default: sdpa; eager for models transformers runs eager-only].
    #[arg(long)]
    pub attention: Option<String>,
    /// LoRA rank of the LoRA/QLoRA plans [default: 16].
    #[arg(long)]
    pub rank: Option<u64>,
    /// LoRA target modules of the LoRA/QLoRA plans [default: all-linear].
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// LoRA dropout of the LoRA/QLoRA plans [default: 0.05].
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    #[command(flatten)]
    pub shard: ShardArgs,
    /// Model FLOPs utilization for the throughput ranking.
    #[arg(long, default_value_t = memplan::cost::DEFAULT_MFU, allow_negative_numbers = true)]
    pub mfu: f64,
    #[arg(long)]
    pub gpu_file: Option<PathBuf>,
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
    #[arg(long)]
    pub gpu_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

impl CostArgs {
    pub fn tokens(&self) -> Result<u128> {
        let v = parse_count(&self.tokens)
            .filter(|v| *v >= 1.0)
            .with_context(|| {
                format!(
                    "--tokens '{}': expected a positive count such as 50M or 1.2B",
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

/// Where `memplan probe` runs its step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProbeDevice {
    /// CUDA when this build has it and NVML sees a GPU, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// Output format of `memplan probe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProbeFormat {
    Table,
    Json,
}

/// `memplan probe`: the job flags of `estimate` (with `--model`, the plan the probe checks) and the
/// probe's own. Without `--model` it trains the toy decoder the `--vocab … --intermediate` flags
/// shape.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub job: JobArgs,
    #[arg(long, value_enum, default_value_t = ProbeDevice::Auto)]
    pub device: ProbeDevice,
    /// Toy model (no --model): vocabulary size [default: 256 on the CPU, 32000 on CUDA].
    #[arg(long, conflicts_with_all = ["model", "from"])]
    pub vocab: Option<usize>,
    /// Toy model: hidden size [default: 128 on the CPU, 512 on CUDA].
    #[arg(long, conflicts_with_all = ["model", "from"])]
    pub hidden: Option<usize>,
    /// Toy model: decoder layers [default: 2 on the CPU, 4 on CUDA].
    #[arg(long, conflicts_with_all = ["model", "from"])]
    pub layers: Option<usize>,
    /// Toy model: attention heads [default: 4 on the CPU, 8 on CUDA].
    #[arg(long, conflicts_with_all = ["model", "from"])]
    pub heads: Option<usize>,
    /// Toy model: key/value heads (grouped-query attention) [default: 2].
    #[arg(long, conflicts_with_all = ["model", "from"])]
    pub kv_heads: Option<usize>,
    /// Toy model: MLP intermediate size [default: 256 on the CPU, 1408 on CUDA].
    #[arg(long, conflicts_with_all = ["model", "from"])]
    pub intermediate: Option<usize>,
    /// Toy model: tie lm_head to the embedding.
    #[arg(long, conflicts_with_all = ["model", "from"])]
    pub tied: bool,
    /// Toy model: frozen weights in fp32 instead of NF4 (the control for the memory comparison;
    /// with --model, --method lora does this).
    #[arg(long, conflicts_with_all = ["model", "from"])]
    pub fp32_base: bool,
    /// With a plan (--model or --from): the deepest k-layer run (the probe measures k, k-1, …,
    /// 1 layers) [default: 2 on the CPU, 3 on CUDA; fewer when memory does not allow].
    #[arg(long)]
    pub probe_layers: Option<usize>,
    /// With a plan: share of the free memory the verdict keeps back, percent.
    #[arg(long, default_value_t = memplan::probe::plan::DEFAULT_MARGIN_PCT, allow_negative_numbers = true)]
    pub margin_pct: f64,
    /// LoRA alpha (scale alpha/rank).
    #[arg(long, default_value_t = 16.0, allow_negative_numbers = true)]
    pub alpha: f64,
    /// Training steps of the deepest run (the ones after the first are the measured steady
    /// state); shallower runs start warm and take one fewer [default: 5 for the toy model, 2 with
    /// --model].
    #[arg(long)]
    pub steps: Option<usize>,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 5e-3, allow_negative_numbers = true)]
    pub lr: f64,
    /// Seed of the random weights, batch and dropout masks.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = ProbeFormat::Table)]
    pub format: ProbeFormat,
    /// Write the measured CUDA context size as TOML for `memplan estimate --calibration`.
    #[arg(long)]
    pub save_calibration: Option<PathBuf>,
}

/// Toy-model defaults on the CPU: a step of a few MB that runs in seconds in a debug build.
const TOY_CPU: (usize, usize, usize, usize, usize, usize) = (256, 128, 2, 4, 2, 256);
/// Toy-model defaults on CUDA: ~0.8 GB by the candle estimate (782 MiB measured on the CPU).
const TOY_CUDA: (usize, usize, usize, usize, usize, usize) = (32000, 512, 4, 8, 2, 1408);

fn usize_flag(flag: &str, v: u64) -> Result<usize> {
    usize::try_from(v).with_context(|| format!("{flag} {v} is too large"))
}

impl ProbeArgs {
    fn backend(&self) -> memplan::probe::Backend {
        use memplan::probe::Backend;
        match self.device {
            ProbeDevice::Cpu => Backend::Cpu,
            ProbeDevice::Cuda => Backend::Cuda,
            ProbeDevice::Auto => {
                let gpu = memplan::probe::nvml::inventory().is_ok_and(|i| !i.gpus.is_empty());
                if memplan::probe::device::CUDA_COMPILED && gpu {
                    Backend::Cuda
                } else {
                    Backend::Cpu
                }
            }
        }
    }

    /// Resolves the device, the plan (or the toy model) and the defaults into probe options.
    pub fn options(&self) -> Result<memplan::probe::ProbeOptions> {
        use memplan::probe::{model::ModelConfig, Backend, PlanRequest, ProbeOptions};
        let backend = self.backend();
        let gpu = backend == Backend::Cuda;
        if self.job.model.is_some() || self.job.settings.from.is_some() {
            let job = self.job.job()?;
            if !(self.margin_pct.is_finite() && (0.0..100.0).contains(&self.margin_pct)) {
                anyhow::bail!("--margin-pct {}: a percentage in [0, 100)", self.margin_pct);
            }
            let depth = usize::try_from(job.model.layers).unwrap_or(usize::MAX);
            let deepest = match self.probe_layers {
                Some(0) => anyhow::bail!("--probe-layers must be at least 1"),
                Some(k) if k as u128 > job.model.layers => anyhow::bail!(
                    "--probe-layers {k}: {} has {} layers",
                    job.model.name,
                    job.model.layers
                ),
                Some(k) => k,
                None => (if gpu { 3 } else { 2 }).min(depth),
            };
            let model = memplan::probe::plan::probe_config(&job, deepest, self.alpha, self.seed)?;
            return Ok(ProbeOptions {
                model,
                steps: self.steps.unwrap_or(2),
                lr: self.lr,
                backend,
                layer_runs: (1..=deepest).rev().collect(),
                plan: Some(PlanRequest {
                    job,
                    margin_pct: self.margin_pct,
                }),
            });
        }
        if self.probe_layers.is_some() {
            anyhow::bail!("--probe-layers needs a plan: add --model (or --from)");
        }
        let d = if gpu { TOY_CUDA } else { TOY_CPU };
        let (hidden, heads) = (self.hidden.unwrap_or(d.1), self.heads.unwrap_or(d.3));
        if heads == 0 || hidden % heads != 0 {
            anyhow::bail!("--hidden {hidden} must be a multiple of --heads {heads}");
        }
        let s = &self.job.settings;
        let model = ModelConfig {
            vocab: self.vocab.unwrap_or(d.0),
            hidden,
            layers: self.layers.unwrap_or(d.2),
            heads,
            kv_heads: self.kv_heads.unwrap_or(d.4),
            head_dim: hidden / heads,
            intermediate: self.intermediate.unwrap_or(d.5),
            tie_embeddings: self.tied,
            // Job::new's LoRA defaults (rank 16, dropout 0.05, all-linear) unless given.
            // The toy model's own small default (the shared --rank defaults to 16 for plans).
            rank: usize_flag("--rank", s.rank.unwrap_or(8))?,
            alpha: self.alpha,
            dropout: s.lora_dropout.unwrap_or(0.05) as f32,
            // The probe's decoder is a dense Llama layer: all-linear reaches its seven projections.
            targets: parse_targets(s.lora_targets.as_deref().unwrap_or("all-linear"))?
                .into_iter()
                .filter(|k| memplan::method::dense_all_linear().contains(k))
                .collect(),
            double_quant: !s.no_double_quant,
            nf4: !self.fp32_base,
            batch: usize_flag("--batch", self.job.batch.unwrap_or(2))?,
            seq: usize_flag("--seq", self.job.seq.unwrap_or(if gpu { 128 } else { 32 }))?,
            seed: self.seed,
        };
        model.validate()?;
        Ok(ProbeOptions::single(
            model,
            self.steps.unwrap_or(5),
            self.lr,
            backend,
        ))
    }
}
