//! `memplan probe`: its flags and how they become the probe's options (a plan at its own
//! shapes, or the built-in toy model).

use super::*;

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
    /// Where the step runs: auto (CUDA when built with it and a GPU is present), cpu or cuda.
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
    /// Output format: a text table or JSON.
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
