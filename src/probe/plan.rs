//! The user's plan on the probe: the candle step at the plan's own widths, the per-layer and
//! fixed terms from runs at two (or more) depths, and the verdict against the memory free now.
//!
//! A decoder's step memory is, to within the allocator's bookkeeping, an affine function of the
//! number of identical decoder layers `k`: everything a layer allocates (its weights, adapters,
//! optimizer state, and in candle the forward graph and the gradients it keeps) repeats per
//! layer, while the embedding, the final norm, lm_head, the logits and the loss are there once.
//! So the probe measures the same step at `k = k_max … 1` layers on one model (dropping layers
//! between runs), and derives
//!
//! ```text
//! per_layer = (P(k_max) − P(1)) / (k_max − 1)        fixed = P(1) − per_layer
//! P(L) ≈ fixed + L · per_layer                        (the plan's depth L)
//! ```
//!
//! for the measured peaks and, the same way, for the candle runtime model's peaks
//! ([`super::expected`]) at the same shapes; the two pairs of terms are compared. The shadow walk
//! at depth `L` itself checks that the step is affine in `k` (`candle_modelled_bytes` against the
//! modelled extrapolation).
//!
//! The verdict holds memplan's PyTorch estimate of the plan (`crate::estimate`, the stack users
//! train with) against the free memory now less a stated margin, and suggests the largest batch
//! that fits with the library's fit search ([`crate::plan::fit`]).

use serde::Serialize;

use crate::error::Error;
use crate::estimate::runtime::pytorch_cuda;
use crate::estimate::{estimate_with, Estimate};
use crate::gpu::Gpu;
use crate::method::{Attention, Job, Method, Optimizer};
use crate::plan::fit::{fit, FitRequest};
use crate::units::{Bytes, GIB};
use crate::Precision;

use super::model::ModelConfig;

/// Default share of the free memory the verdict keeps back, percent: room for the estimate's
/// error beyond its validation (median 0.03%, worst cases about 1–2% at 512 tokens where the
/// caching allocator's block rules are not modelled) and for other processes that grow between
/// the probe and the training run. A stated choice, changed with `--margin-pct`.
pub const DEFAULT_MARGIN_PCT: f64 = 5.0;

/// What `memplan probe --model …` checks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanRequest {
    pub job: Job,
    /// Share of the free memory the verdict keeps back, percent.
    pub margin_pct: f64,
}

fn size(flag: &str, v: u128) -> Result<usize, Error> {
    usize::try_from(v).map_err(|_| Error::Unsupported(format!("{flag} {v} is too large")))
}

/// The probe model at the plan's true widths with `layers` decoder layers: NF4 base with the
/// plan's double quantization (QLoRA) or a frozen fp32 base (LoRA), LoRA at the plan's rank,
/// targets and dropout, the plan's batch and sequence. A plan the candle decoder cannot build
/// (full fine-tuning, inference, mixture of experts) is refused in one line.
pub fn probe_config(job: &Job, layers: usize, alpha: f64, seed: u64) -> Result<ModelConfig, Error> {
    let m = &job.model;
    let nf4 = match job.method {
        Method::Qlora => true,
        Method::Lora => false,
        other => {
            return Err(Error::Unsupported(format!(
                "--method {other}: the probe measures a LoRA or QLoRA step (frozen base, trained adapters); use --method qlora or --method lora"
            )))
        }
    };
    if m.moe.is_some() {
        return Err(Error::Unsupported(format!(
            "{}: a mixture of experts; the probe builds dense decoder layers only",
            m.name
        )));
    }
    let lora = job.lora.as_ref().ok_or_else(|| {
        Error::Unsupported("the probe needs LoRA settings (--rank, --lora-targets)".into())
    })?;
    let cfg = ModelConfig {
        vocab: size("vocab", m.vocab)?,
        hidden: size("hidden", m.hidden)?,
        layers,
        heads: size("heads", m.heads)?,
        kv_heads: size("kv heads", m.kv_heads)?,
        head_dim: size("head_dim", m.head_dim)?,
        intermediate: size("intermediate", m.intermediate)?,
        tie_embeddings: m.tie_embeddings,
        rank: size("--rank", lora.rank)?,
        alpha,
        dropout: lora.dropout as f32,
        // all-linear also names modules a dense Llama layer lacks (router, experts): it reaches
        // the seven projections here, as peft's all-linear does on such a layer.
        targets: lora
            .targets
            .iter()
            .copied()
            .filter(|k| crate::method::dense_all_linear().contains(k))
            .collect(),
        double_quant: job.double_quant,
        nf4,
        batch: size("--batch", job.batch)?,
        seq: size("--seq", job.seq)?,
        seed,
    };
    if cfg.targets.is_empty() {
        return Err(Error::Unsupported(
            "--lora-targets: none of the targets is a projection of a dense Llama layer (q_proj … down_proj)".into(),
        ));
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Where the candle step differs from the plan as PyTorch runs it (the candle comparison is
/// unaffected: both sides are candle; the PyTorch estimate is of the plan as given).
pub fn differences(job: &Job) -> Vec<String> {
    let mut d = Vec::new();
    if job.compute != Precision::Fp32 {
        d.push(format!(
            "the candle step computes in fp32; the plan computes in {}",
            job.compute
        ));
    }
    if job.method == Method::Lora {
        d.push(format!(
            "LoRA: the candle step keeps the frozen base in fp32; the plan stores it in {}",
            job.weights
        ));
    }
    if job.optimizer != Optimizer::Adamw {
        d.push(format!(
            "the candle step runs fp32 AdamW; the plan uses {}",
            job.optimizer
        ));
    }
    if job.grad_checkpointing {
        d.push("the candle step does not checkpoint activations; the plan does".into());
    }
    if job.attention != Attention::Eager {
        d.push(format!(
            "the candle step computes attention with explicit scores (eager); the plan uses {}",
            job.attention
        ));
    }
    // The candle layer is a plain Llama layer: any other architecture (biases, q/k norms, extra
    // norms, another MLP) shows up as a different parameter count at the same widths.
    let m = &job.model;
    if m.moe.is_some() {
        d.push(format!(
            "{}: a mixture of experts; the candle step is dense",
            m.name
        ));
        return d;
    }
    let llama = crate::model::ModelShape::llama(
        &m.name,
        m.vocab,
        m.hidden,
        m.layers,
        m.heads,
        m.kv_heads,
        m.head_dim,
        m.intermediate,
        m.tie_embeddings,
    );
    let (theirs, ours) = (m.param_counts().total, llama.param_counts().total);
    if theirs != ours {
        d.push(format!(
            "{} ({}) is not a plain Llama decoder: {theirs} parameters against {ours} for the Llama layers the candle step builds at the same widths",
            m.name, m.model_type
        ));
    }
    if job.sharding.is_some() {
        d.push("the candle step runs on one device; the plan is sharded".into());
    }
    d
}

/// A quantity measured and modelled, with the model's error as the validation reports it:
/// (modelled − measured) / measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Term {
    pub measured_bytes: i64,
    pub modelled_bytes: i64,
    pub error_pct: f64,
}

impl Term {
    pub fn new(measured: i64, modelled: i64) -> Term {
        let error_pct = if measured != 0 {
            (modelled as f64 - measured as f64) / (measured as f64).abs() * 100.0
        } else {
            0.0
        };
        Term {
            measured_bytes: measured,
            modelled_bytes: modelled,
            error_pct,
        }
    }
}

/// Per-layer and fixed terms of one quantity (the step's peak, a phase's peak, or the resident
/// bytes).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DepthTerms {
    pub quantity: &'static str,
    pub per_layer: Term,
    pub fixed: Term,
}

/// `(per_layer, fixed)` of an affine fit through the shallowest and deepest of `points`
/// (`(layers, bytes)`); with depths 1 and 2: `per_layer = P(2) − P(1)`, `fixed = P(1) − per_layer`.
/// None with fewer than two distinct depths.
pub fn affine_terms(points: &[(usize, u64)]) -> Option<(i64, i64)> {
    let lo = points.iter().min_by_key(|p| p.0)?;
    let hi = points.iter().max_by_key(|p| p.0)?;
    if hi.0 == lo.0 {
        return None;
    }
    let per = (hi.1 as f64 - lo.1 as f64) / (hi.0 - lo.0) as f64;
    let fixed = lo.1 as f64 - lo.0 as f64 * per;
    Some((per.round() as i64, fixed.round() as i64))
}

/// `fixed + layers · per_layer`, at least 0.
pub fn extrapolate(per_layer: i64, fixed: i64, layers: u128) -> u64 {
    let v = i128::from(fixed) + i128::from(per_layer) * layers as i128;
    u64::try_from(v.max(0)).unwrap_or(u64::MAX)
}

/// The plan's figures, side by side with the candle ones and the free memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanCheck {
    pub model: String,
    pub method: Method,
    /// The plan's depth.
    pub layers: u128,
    pub batch: u128,
    /// The plan's sequence length (the probe ran at `config.seq`, shorter only when the plan's
    /// could not fit; `notes` says so).
    pub seq: u128,
    /// memplan's PyTorch estimate of the plan (`torch.cuda.max_memory_allocated`).
    pub peak_allocated_bytes: u64,
    /// Reserved + CUDA context (what NVML would show in use).
    pub device_bytes: u64,
    /// The step, replayed through the caching allocator with the free memory less the margin,
    /// never runs out (as `memplan estimate --gpu` decides; `device_bytes` within it fits).
    pub fits: bool,
    /// One line: needs, has, fits or not, and the suggestion.
    pub verdict: String,
    /// The largest `--batch` (or a shorter `--seq`, or checkpointing) that fits, verified with
    /// the estimate of the plan itself.
    pub suggestion: Option<String>,
    /// The candle runtime model at the plan's full depth and sequence length: what candle would
    /// need for the whole plan.
    pub candle_modelled_bytes: Option<u64>,
    /// Measured fixed + depth × measured per-layer (at `config.seq`).
    pub candle_extrapolated_bytes: Option<u64>,
    /// Modelled fixed + depth × modelled per-layer (at `config.seq`); equal to the shadow walk at
    /// full depth when the step is affine in depth.
    pub candle_modelled_extrapolated_bytes: Option<u64>,
    /// Whether candle's need (`candle_modelled_bytes`) fits the same free memory.
    pub candle_fits: Option<bool>,
}

fn gib(b: u128) -> String {
    format!("{:.1} GiB", b as f64 / GIB as f64)
}

/// Free memory less the margin.
pub fn usable(free: u64, margin_pct: f64) -> u64 {
    let keep = 1.0 - margin_pct / 100.0;
    (free as f64 * keep).floor() as u64
}

/// Whether `job` fits `have` bytes as `memplan estimate --gpu` decides it: the step replayed
/// through the caching allocator at that capacity runs out of memory nowhere
/// ([`crate::estimate::oom_check`]).
pub fn fits_in(est: &Estimate, have: u64) -> bool {
    crate::estimate::oom_check(est, u128::from(have)).fits
}

fn job_fits(job: &Job, have: u64) -> Result<bool, Error> {
    Ok(fits_in(&estimate_with(job, &pytorch_cuda())?, have))
}

/// The largest `x` in `[1, hi]` with `fits(x)`, given `fits(1)`, by bisection (device bytes grow
/// with batch and sequence; see `crate::plan::fit`).
fn largest(hi: u128, mut fits: impl FnMut(u128) -> Result<bool, Error>) -> Result<u128, Error> {
    let (mut lo, mut hi) = (1u128, hi);
    if fits(hi)? {
        return Ok(hi);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// What to change so the plan fits `have` bytes (or how far it can grow when it fits), from
/// [`crate::plan::fit`]'s search restricted to the plan's method and optimizer; every number is
/// checked against the estimate of the plan itself (the search rebuilds jobs from the method's
/// defaults, so e.g. `--kbit-prep` is not part of it).
pub fn suggestion(job: &Job, have: u64, fits_now: bool) -> Result<Option<String>, Error> {
    let mut req = FitRequest::new(
        job.clone(),
        Gpu::of_size("free memory", Bytes(u128::from(have))),
        pytorch_cuda(),
    );
    req.methods = vec![job.method];
    req.optimizers = vec![job.optimizer];
    let report = fit(&req)?;
    let verified_batch = |ckpt: bool, found: u128| -> Result<Option<u128>, Error> {
        let mut j = job.clone();
        j.grad_checkpointing = ckpt;
        j.batch = 1;
        if !job_fits(&j, have)? {
            return Ok(None);
        }
        let set = |x: u128| {
            let mut j = j.clone();
            j.batch = x;
            job_fits(&j, have)
        };
        Ok(Some(largest(found.max(1), set)?))
    };
    let same = report
        .plans
        .iter()
        .find(|p| p.grad_checkpointing == job.grad_checkpointing);
    if let Some(p) = same {
        if let Some(b) = verified_batch(job.grad_checkpointing, p.max_batch)? {
            if fits_now {
                let cap = if b >= crate::plan::fit::MAX_BATCH_CAP {
                    " (the search's cap)"
                } else {
                    ""
                };
                return Ok((b > job.batch).then(|| format!("fits up to `--batch {b}`{cap}")));
            }
            return Ok(Some(format!("at `--batch {b}` it does")));
        }
    }
    if fits_now {
        return Ok(None);
    }
    if !job.grad_checkpointing {
        if let Some(p) = report.plans.iter().find(|p| p.grad_checkpointing) {
            if let Some(b) = verified_batch(true, p.max_batch)? {
                return Ok(Some(format!(
                    "with `--grad-checkpointing` at `--batch {b}` it does"
                )));
            }
        }
    }
    // Not even batch 1: the longest sequence at batch 1 with the plan's checkpointing.
    let mut j = job.clone();
    j.batch = 1;
    j.seq = 1;
    if job_fits(&j, have)? {
        let s = largest(job.seq, |x| {
            let mut j = j.clone();
            j.seq = x;
            job_fits(&j, have)
        })?;
        return Ok(Some(format!("at `--batch 1 --seq {s}` it does")));
    }
    Ok(Some(
        "not at batch 1 with one token either: `memplan fit` lists the plans that fit".into(),
    ))
}

/// The verdict line and whether the plan fits: PyTorch's estimate against `free` less the margin,
/// decided like `memplan estimate --gpu` ([`fits_in`]).
pub fn verdict(
    est: &Estimate,
    device: &str,
    free: u64,
    margin_pct: f64,
    suggestion: Option<&str>,
) -> (bool, String) {
    let have = usable(free, margin_pct);
    let fits = fits_in(est, have);
    let mut line = format!(
        "needs {} allocated, {} on the device; {device} has {} free ({} after the {margin_pct}% margin): {}",
        gib(est.peak_allocated_bytes.0),
        gib(est.device_bytes.0),
        gib(free.into()),
        gib(have.into()),
        if fits { "fits" } else { "does not fit" }
    );
    if let Some(s) = suggestion {
        line.push_str(if fits { "; " } else { " — " });
        line.push_str(s);
    }
    (fits, line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::resolve_model;

    fn qlora(model: &str) -> Job {
        let mut j = Job::new(resolve_model(model).unwrap().0, Method::Qlora);
        j.seq = 128;
        j
    }

    #[test]
    fn llama_1b_config_has_the_true_widths() {
        let c = probe_config(&qlora("llama-3.2-1b"), 2, 16.0, 1).unwrap();
        // Llama 3.2 1B config.json: hidden 2048, intermediate 8192, 32 heads, 8 kv heads,
        // head_dim 64, vocab 128256, tie_word_embeddings true.
        assert_eq!(
            (
                c.hidden,
                c.intermediate,
                c.heads,
                c.kv_heads,
                c.head_dim,
                c.vocab
            ),
            (2048, 8192, 32, 8, 64, 128256)
        );
        assert!(c.tie_embeddings && c.nf4 && c.double_quant);
        assert_eq!((c.layers, c.batch, c.seq, c.rank), (2, 1, 128, 16));
    }

    #[test]
    fn full_fine_tuning_and_moe_are_refused_in_one_line() {
        let mut j = qlora("llama-3.2-1b");
        j.method = Method::Full;
        j.lora = None;
        let e = probe_config(&j, 2, 16.0, 1).unwrap_err().to_string();
        assert!(e.contains("--method qlora") && !e.contains('\n'), "{e}");
        if let Ok((m, _)) = resolve_model("mixtral-8x7b") {
            let mut j = Job::new(m, Method::Qlora);
            j.seq = 128;
            let e = probe_config(&j, 2, 16.0, 1).unwrap_err().to_string();
            assert!(e.contains("mixture of experts"), "{e}");
        }
    }

    #[test]
    fn affine_terms_by_hand() {
        // P(1) = 100, P(2) = 130: 30 per layer, 70 fixed; 16 layers: 70 + 480 = 550.
        assert_eq!(affine_terms(&[(2, 130), (1, 100)]), Some((30, 70)));
        assert_eq!(extrapolate(30, 70, 16), 550);
        // Three depths: the line through the shallowest and deepest.
        assert_eq!(
            affine_terms(&[(3, 160), (2, 131), (1, 100)]),
            Some((30, 70))
        );
        assert_eq!(affine_terms(&[(2, 130)]), None);
        let t = Term::new(200, 206);
        assert!((t.error_pct - 3.0).abs() < 1e-12);
    }

    #[test]
    fn verdict_uses_free_memory_less_the_margin_and_suggests_a_batch_that_fits() {
        // llama-3.1-8b QLoRA at 2048 tokens: hold it against memory between its batch-1 and
        // batch-8 needs, so batch 8 does not fit but batch 1 does.
        let mut base = qlora("llama-3.1-8b");
        base.seq = 2048;
        let at = |b: u128| {
            let mut j = base.clone();
            j.batch = b;
            crate::estimate::estimate(&j).unwrap()
        };
        let (e1, e8) = (at(1), at(8));
        let free = ((e1.device_bytes.0 + e8.device_bytes.0) / 2) as u64;
        let mut job = base.clone();
        job.batch = 8;
        let have = usable(free, DEFAULT_MARGIN_PCT);
        assert_eq!(have, (free as f64 * 0.95).floor() as u64);
        let s = suggestion(&job, have, false).unwrap().unwrap();
        let b: u128 = s
            .trim_start_matches("at `--batch ")
            .trim_end_matches("` it does")
            .parse()
            .unwrap_or_else(|_| panic!("{s}"));
        assert!((1..8).contains(&b), "{s}");
        // The suggestion is the boundary: b fits, b + 1 does not.
        assert!(fits_in(&at(b), have));
        assert!(!fits_in(&at(b + 1), have));
        let (fits, line) = verdict(&e8, "GPU 0", free, DEFAULT_MARGIN_PCT, Some(&s));
        assert!(!fits);
        assert!(line.contains("does not fit — at `--batch"), "{line}");
        assert!(
            line.starts_with("needs ") && line.contains("GPU 0 has"),
            "{line}"
        );
        // Without the margin the same memory may fit more; with it, batch 1 fits.
        let (fits1, _) = verdict(&e1, "GPU 0", free, DEFAULT_MARGIN_PCT, None);
        assert!(fits1);
    }
}
