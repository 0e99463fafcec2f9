//! `memplan fit`: which training plans fit a GPU, how far each can be pushed, and why the others
//! do not fit.
//!
//! The search is exhaustive over the discrete choices a user tries by hand — method (full, LoRA,
//! QLoRA) × optimizer (AdamW, 8-bit AdamW, paged 8-bit AdamW) × gradient checkpointing — and
//! exact over the two integers: for each combination it finds, by exponential then binary search
//! on the estimator itself, the largest micro-batch at `--seq` and the longest sequence at
//! micro-batch 1 whose `device_bytes` fit the GPU. Exactness relies on the estimate growing with
//! batch and sequence (every activation, logit and transient term is a non-decreasing function of
//! both); the property test checks the boundary (maximum fits, maximum + 1 does not).
//!
//! Plans are ranked by estimated step throughput in tokens per second:
//! GPUs × peak dense FLOP/s × MFU / training FLOPs per token ([`crate::cost::flops_per_token`]),
//! so the ranking reflects recomputation (checkpointing), the frozen base of LoRA/QLoRA and, for
//! QLoRA, dequantization time per micro-batch. The effect of micro-batch size on utilization is
//! not modelled (ties are broken by the larger batch).

use serde::Serialize;

use crate::cost::{flops_per_token, DEQUANT_BYTES_PER_WEIGHT};
use crate::error::Error;
use crate::estimate::runtime::RuntimeProfile;
use crate::estimate::{estimate_with, Estimate};
use crate::gpu::Gpu;
use crate::method::{Job, Method, Optimizer};
use crate::units::Bytes;
use crate::Precision;

/// Upper bounds of the search (a plan that fits at the cap reports the cap).
pub const MAX_BATCH_CAP: u128 = 4096;
pub const MAX_SEQ_CAP: u128 = 1 << 20;

/// What `memplan fit` searches.
#[derive(Debug, Clone)]
pub struct FitRequest {
    /// Model, sequence length, LoRA settings, attention and sharding; method, optimizer, batch
    /// and checkpointing are searched.
    pub base: Job,
    pub gpu: Gpu,
    pub profile: RuntimeProfile,
    pub methods: Vec<Method>,
    pub optimizers: Vec<Optimizer>,
    pub mfu: f64,
}

impl FitRequest {
    /// The default search space: full, LoRA, QLoRA × AdamW, 8-bit AdamW, paged 8-bit AdamW ×
    /// checkpointing off/on.
    pub fn new(base: Job, gpu: Gpu, profile: RuntimeProfile) -> FitRequest {
        FitRequest {
            base,
            gpu,
            profile,
            methods: vec![Method::Full, Method::Lora, Method::Qlora],
            optimizers: vec![
                Optimizer::Adamw,
                Optimizer::Adamw8bit,
                Optimizer::PagedAdamw8bit,
            ],
            mfu: crate::cost::DEFAULT_MFU,
        }
    }
}

/// A plan that fits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub method: Method,
    /// As `--optimizer` spells it (`adamw-8bit`), so a plan can be passed back to `estimate`.
    #[serde(serialize_with = "as_flag")]
    pub optimizer: Optimizer,
    pub grad_checkpointing: bool,
    pub seq: u128,
    /// Largest micro-batch at `seq` that fits.
    pub max_batch: u128,
    /// Longest sequence at micro-batch 1 that fits.
    pub max_seq: u128,
    /// At `max_batch` × `seq`.
    pub peak_allocated_bytes: Bytes,
    pub device_bytes: Bytes,
    /// GPU memory minus `device_bytes` at `max_batch`.
    pub headroom_bytes: Bytes,
    /// At batch 1 × `seq`.
    pub headroom_at_batch1_bytes: Bytes,
    /// CPU RAM per node the plan's offload needs (not checked against the host: see notes).
    pub cpu_offload_bytes: Bytes,
    pub flops_per_token: u128,
    /// Estimated tokens per second over all GPUs (absent when the GPU has no throughput figure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    pub fits: bool,
}

/// A combination that does not fit even at micro-batch 1.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejected {
    pub method: Method,
    /// As `--optimizer` spells it (`adamw-8bit`), so a plan can be passed back to `estimate`.
    #[serde(serialize_with = "as_flag")]
    pub optimizer: Optimizer,
    pub grad_checkpointing: bool,
    pub fits: bool,
    /// At batch 1 × `seq`.
    pub peak_allocated_bytes: Bytes,
    pub device_bytes: Bytes,
    /// The largest component at the peak.
    pub dominant_component: String,
    /// Longest sequence that would fit at batch 1 (0: none).
    pub max_seq: u128,
    pub reason: String,
}

/// The answer of `memplan fit`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FitReport {
    pub model: String,
    pub gpu: String,
    pub gpu_bytes: Bytes,
    /// The GPU's memory as written (`24.00 GB` for `--gpu 24GB`, GiB for presets).
    pub gpu_memory: String,
    pub gpus: u128,
    pub seq: u128,
    pub plans: Vec<Plan>,
    pub rejected: Vec<Rejected>,
    /// Estimates evaluated by the search.
    pub estimates_evaluated: u64,
    pub notes: Vec<String>,
}

fn as_flag<S: serde::Serializer>(o: &Optimizer, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(o)
}

struct Searcher<'a> {
    req: &'a FitRequest,
    have: u128,
    evaluated: u64,
}

impl Searcher<'_> {
    fn estimate(&mut self, job: &Job) -> Result<Estimate, Error> {
        self.evaluated += 1;
        estimate_with(job, &self.req.profile)
    }

    fn fits(&mut self, job: &Job) -> Result<bool, Error> {
        // The out-of-memory line: the step replayed through the allocator at the capacity.
        Ok(crate::estimate::oom_check(&self.estimate(job)?, self.have).fits)
    }

    /// The largest `x` in [1, cap] with `fits(set(x))`, given that `fits(set(1))`; exponential
    /// then binary search.
    fn largest(
        &mut self,
        job: &Job,
        cap: u128,
        set: impl Fn(&mut Job, u128),
    ) -> Result<u128, Error> {
        let mut j = job.clone();
        let mut ok = |s: &mut Self, x: u128| -> Result<bool, Error> {
            set(&mut j, x);
            s.fits(&j)
        };
        let (mut lo, mut hi) = (1u128, 2u128);
        // Invariant: lo fits; hi does not (or hi > cap).
        while hi <= cap && ok(self, hi)? {
            lo = hi;
            hi *= 2;
        }
        if hi > cap {
            if ok(self, cap)? {
                return Ok(cap);
            }
            hi = cap;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if ok(self, mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }
}

/// A job of the search space: `base` with another method, optimizer and checkpointing.
pub fn variant(base: &Job, method: Method, optimizer: Optimizer, ckpt: bool) -> Job {
    let mut j = Job::new(base.model.clone(), method);
    // Keep the user's LoRA settings (rank, targets, dropout) for the adapter methods.
    if let (Some(l), Some(user)) = (j.lora.as_mut(), base.lora.as_ref()) {
        *l = user.clone();
    }
    j.double_quant = base.double_quant;
    j.compute = if base.compute.is_float() {
        base.compute
    } else {
        Precision::Bf16
    };
    if method != Method::Qlora && j.compute.float_bytes() <= 2 {
        j.weights = j.compute;
    }
    j.optimizer = optimizer;
    j.grad_checkpointing = ckpt;
    j.seq = base.seq;
    j.batch = 1;
    j.attention = base.attention;
    // The loss, packing, offload and kernels the user's stack runs (a --from file).
    j.loss = base.loss;
    j.supervised_fraction = base.supervised_fraction;
    j.packing = base.packing;
    j.activation_offload = base.activation_offload;
    j.liger_kernels = base.liger_kernels;
    j.sharding = base.sharding.clone();
    j
}

fn dominant(est: &Estimate, have: u128) -> (String, String) {
    let need = est.device_bytes.0;
    let top = est
        .components
        .iter()
        .filter(|c| c.name != "cuda_context")
        .max_by_key(|c| c.bytes.0);
    match top {
        Some(c) => {
            let rest = need - c.bytes.0;
            let reason = if rest < have {
                // What the GPU leaves for this component once everything else is placed.
                format!(
                    "{} {:.2} GiB > {:.2} GiB free (needs {:.2} of {:.2} GiB)",
                    c.name,
                    c.bytes.gib(),
                    Bytes(have - rest).gib(),
                    est.device_bytes.gib(),
                    Bytes(have).gib()
                )
            } else {
                format!(
                    "needs {:.2} GiB > {:.2} GiB; largest part: {} {:.2} GiB (the rest alone is {:.2} GiB)",
                    est.device_bytes.gib(),
                    Bytes(have).gib(),
                    c.name,
                    c.bytes.gib(),
                    Bytes(rest).gib()
                )
            };
            (c.name.to_string(), reason)
        }
        None => (String::new(), "no component".into()),
    }
}

/// What would fit when a job does not: the flags to change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suggestion {
    pub method: Method,
    #[serde(serialize_with = "as_flag")]
    pub optimizer: Optimizer,
    pub grad_checkpointing: bool,
    pub batch: u128,
    pub device_bytes: Bytes,
    /// The flags that differ from the job, e.g. `--method qlora --batch 2`.
    pub flags: String,
}

/// For a job that does not fit `gpu`: its own settings at the largest micro-batch that fits, or
/// else the best-ranked plan of [`fit`] (method, optimizer, checkpointing) at the job's batch or
/// the plan's largest, whichever is smaller. `None` when no plan fits at the job's sequence length.
pub fn suggest(
    job: &Job,
    gpu: &Gpu,
    profile: &RuntimeProfile,
) -> Result<Option<Suggestion>, Error> {
    let mut req = FitRequest::new(job.clone(), gpu.clone(), profile.clone());
    let have = gpu.memory().0;
    let mut s = Searcher {
        req: &req,
        have,
        evaluated: 0,
    };
    let mut one = job.clone();
    one.batch = 1;
    let flags = |method: Method, optimizer: Optimizer, ckpt: bool, batch: u128| {
        let mut f = Vec::new();
        if method != job.method {
            f.push(format!("--method {method}"));
        }
        if optimizer != job.optimizer {
            f.push(format!("--optimizer {optimizer}"));
        }
        if ckpt != job.grad_checkpointing {
            f.push(
                if ckpt {
                    "--grad-checkpointing"
                } else {
                    "--no-grad-checkpointing"
                }
                .to_string(),
            );
        }
        if batch != job.batch {
            f.push(format!("--batch {batch}"));
        }
        f.join(" ")
    };
    if job.batch > 1 && s.fits(&one)? {
        let batch = s.largest(&one, job.batch - 1, |j, x| j.batch = x)?;
        let mut at = one.clone();
        at.batch = batch;
        return Ok(Some(Suggestion {
            method: job.method,
            optimizer: job.optimizer,
            grad_checkpointing: job.grad_checkpointing,
            batch,
            device_bytes: s.estimate(&at)?.device_bytes,
            flags: flags(job.method, job.optimizer, job.grad_checkpointing, batch),
        }));
    }
    if job.method == Method::Inference {
        return Ok(None);
    }
    req.methods = vec![Method::Full, Method::Lora, Method::Qlora];
    let report = fit(&req)?;
    let Some(best) = report.plans.first() else {
        return Ok(None);
    };
    let batch = best.max_batch.min(job.batch);
    let mut at = variant(job, best.method, best.optimizer, best.grad_checkpointing);
    at.batch = batch;
    Ok(Some(Suggestion {
        method: best.method,
        optimizer: best.optimizer,
        grad_checkpointing: best.grad_checkpointing,
        batch,
        device_bytes: estimate_with(&at, profile)?.device_bytes,
        flags: flags(best.method, best.optimizer, best.grad_checkpointing, batch),
    }))
}

/// Step throughput in tokens/s for `job` at micro-batch `batch` on all GPUs.
fn throughput(req: &FitRequest, job: &Job, gpus: u128) -> (u128, Option<f64>) {
    let fpt = flops_per_token(job, true).total();
    let peak = match job.compute {
        Precision::Fp16 => req.gpu.fp16_dense_tflops,
        _ => req.gpu.bf16_dense_tflops.or(req.gpu.fp16_dense_tflops),
    };
    let tps = peak.map(|tf| {
        let compute_s_per_token = fpt as f64 / (tf * 1e12 * req.mfu);
        let dequant_s_per_token = match (job.method, req.gpu.memory_bandwidth_gb_per_s) {
            (Method::Qlora, Some(bw)) => {
                let passes = if job.grad_checkpointing { 3.0 } else { 2.0 };
                passes * job.model.param_counts().linear_weights as f64 * DEQUANT_BYTES_PER_WEIGHT
                    / (bw * 1e9)
                    / job.tokens() as f64
            }
            _ => 0.0,
        };
        gpus as f64 / (compute_s_per_token + dequant_s_per_token)
    });
    (fpt, tps)
}

/// Runs the search.
pub fn fit(req: &FitRequest) -> Result<FitReport, Error> {
    let (min_mfu, max_mfu) = crate::cost::input_bounds("--mfu");
    if !(req.mfu.is_finite() && req.mfu >= min_mfu && req.mfu <= max_mfu) {
        return Err(Error::Unsupported(format!(
            "--mfu {}: utilization is a fraction of peak between {min_mfu} and {max_mfu}",
            crate::cost::number_text(req.mfu)
        )));
    }
    let have = req.gpu.memory().0;
    let gpus = req.base.sharding.as_ref().map_or(1, |s| s.gpus);
    let mut s = Searcher {
        req,
        have,
        evaluated: 0,
    };
    let mut plans = Vec::new();
    let mut rejected = Vec::new();
    for &method in &req.methods {
        for &optimizer in &req.optimizers {
            for ckpt in [false, true] {
                let job = variant(&req.base, method, optimizer, ckpt);
                job.validate()?;
                let at1 = s.estimate(&job)?;
                let mut seq1 = job.clone();
                seq1.seq = 1;
                let max_seq = if s.fits(&seq1)? {
                    s.largest(&job, MAX_SEQ_CAP, |j, x| j.seq = x)?
                } else {
                    0
                };
                if !crate::estimate::oom_check(&at1, have).fits {
                    let (dom, why) = dominant(&at1, have);
                    rejected.push(Rejected {
                        method,
                        optimizer,
                        grad_checkpointing: ckpt,
                        fits: false,
                        peak_allocated_bytes: at1.peak_allocated_bytes,
                        device_bytes: at1.device_bytes,
                        dominant_component: dom,
                        max_seq,
                        reason: if max_seq > 0 {
                            format!("{why}; fits up to {max_seq} tokens at batch 1")
                        } else {
                            why
                        },
                    });
                    continue;
                }
                let max_batch = s.largest(&job, MAX_BATCH_CAP, |j, x| j.batch = x)?;
                let mut at_max = job.clone();
                at_max.batch = max_batch;
                let e = s.estimate(&at_max)?;
                let (fpt, tps) = throughput(req, &at_max, gpus);
                plans.push(Plan {
                    method,
                    optimizer,
                    grad_checkpointing: ckpt,
                    seq: job.seq,
                    max_batch,
                    max_seq,
                    peak_allocated_bytes: e.peak_allocated_bytes,
                    device_bytes: e.device_bytes,
                    // The margin left at the tightest moment of the step replayed at the card's
                    // capacity (the allocator frees its cache before running out).
                    headroom_bytes: crate::estimate::oom_check(&e, have).min_headroom_bytes,
                    headroom_at_batch1_bytes: crate::estimate::oom_check(&at1, have)
                        .min_headroom_bytes,
                    cpu_offload_bytes: e.cpu_offload_bytes,
                    flops_per_token: fpt,
                    tokens_per_second: tps,
                    fits: true,
                });
            }
        }
    }
    plans.sort_by(|a, b| {
        let key = |p: &Plan| {
            p.tokens_per_second
                .unwrap_or(1.0 / p.flops_per_token as f64)
        };
        key(b)
            .total_cmp(&key(a))
            .then(b.max_batch.cmp(&a.max_batch))
            .then(a.device_bytes.cmp(&b.device_bytes))
    });
    let mut notes = vec![format!(
        "ranked by estimated throughput: {gpus} GPU(s) × peak dense FLOP/s × MFU {} / training FLOPs per token (checkpointing recomputes a forward; LoRA/QLoRA skip frozen weight gradients; QLoRA adds dequantization time); micro-batch effects on utilization are not modelled",
        req.mfu
    )];
    if let Some(sh) = &req.base.sharding {
        notes.push(format!(
            "per GPU under {} over {} GPU(s), offload {}",
            sh.engine, sh.gpus, sh.offload
        ));
        if let Some(a) = sh.advice() {
            notes.push(a);
        }
        if sh.offload != crate::estimate::sharding::Offload::None {
            notes.push("offload: each plan needs the CPU RAM in `cpu_offload_bytes` per node (JSON; the CPU RAM column), which memplan does not check against the host; the ranking ignores PCIe traffic and the CPU optimizer step, which typically halve throughput or worse (use a lower --mfu)".into());
        }
    }
    notes.push("paged optimizers can spill their state to CPU RAM under pressure; memplan counts it on the device (no spill)".into());
    Ok(FitReport {
        model: req.base.model.name.clone(),
        gpu: req.gpu.name.clone(),
        gpu_bytes: Bytes(have),
        gpu_memory: req.gpu.memory_text(),
        gpus,
        seq: req.base.seq,
        plans,
        rejected,
        estimates_evaluated: s.evaluated,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::runtime::pytorch_cuda;
    use crate::gpu::resolve_gpu;
    use crate::model::resolve_model;

    fn request(model: &str, gpu: &str, seq: u128) -> FitRequest {
        let mut base = Job::new(resolve_model(model).unwrap().0, Method::Lora);
        base.seq = seq;
        FitRequest::new(base, resolve_gpu(gpu).unwrap(), pytorch_cuda())
    }

    /// The out-of-memory line the search decides on.
    fn fits_at(job: &Job, have: u128) -> bool {
        crate::estimate::oom_check(&crate::estimate::estimate(job).unwrap(), have).fits
    }

    #[allow(dead_code)]
    fn device(job: &Job) -> u128 {
        estimate_with(job, &pytorch_cuda()).unwrap().device_bytes.0
    }

    /// A small deterministic generator (xorshift64*) for the property test.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
            &v[(self.next() % v.len() as u64) as usize]
        }
    }

    #[test]
    fn reported_maxima_are_exact_boundaries() {
        let models = [
            "llama-3.2-1b",
            "llama-3.1-8b",
            "mistral-7b",
            "qwen2.5-7b",
            "70B",
        ];
        let gpus = ["rtx-4090", "l4", "a100-40gb", "h100", "t4", "12GB", "48GB"];
        let seqs = [128u128, 512, 1000, 2048, 4096];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut checked = 0;
        for _ in 0..12 {
            let (m, g, s) = (rng.pick(&models), rng.pick(&gpus), *rng.pick(&seqs));
            let Ok((shape, _)) = resolve_model(m) else {
                continue;
            };
            let mut base = Job::new(shape, Method::Lora);
            base.seq = s;
            let req = FitRequest::new(base, resolve_gpu(g).unwrap(), pytorch_cuda());
            let have = req.gpu.memory().0;
            let r = fit(&req).unwrap();
            for p in &r.plans {
                let mut j = variant(&req.base, p.method, p.optimizer, p.grad_checkpointing);
                j.batch = p.max_batch;
                assert!(fits_at(&j, have), "{m} {g} {p:?}");
                if p.max_batch < MAX_BATCH_CAP {
                    j.batch += 1;
                    assert!(!fits_at(&j, have), "{m} {g} batch+1 {p:?}");
                }
                let mut j = variant(&req.base, p.method, p.optimizer, p.grad_checkpointing);
                j.seq = p.max_seq;
                assert!(fits_at(&j, have));
                if p.max_seq < MAX_SEQ_CAP {
                    j.seq += 1;
                    assert!(!fits_at(&j, have), "{m} {g} seq+1 {p:?}");
                }
                checked += 1;
            }
            for x in &r.rejected {
                let j = variant(&req.base, x.method, x.optimizer, x.grad_checkpointing);
                assert!(!fits_at(&j, have));
            }
        }
        assert!(checked > 20, "the sample exercised {checked} plans");
    }

    #[test]
    fn seventy_b_on_a_4090_fits_nothing_and_says_why() {
        let r = fit(&request("70B", "rtx-4090", 2048)).unwrap();
        assert!(r.plans.is_empty());
        assert_eq!(r.rejected.len(), 18);
        // QLoRA 70B: ~35 GiB of NF4 weights alone exceed 24 GiB.
        let q = r
            .rejected
            .iter()
            .find(|x| x.method == Method::Qlora && x.grad_checkpointing)
            .unwrap();
        assert_eq!(q.dominant_component, "weights");
        assert!(q.reason.contains("weights"), "{}", q.reason);
        // 8B LoRA without checkpointing at 2048 tokens: activations are what does not fit, and
        // the reason says how much room the rest leaves them.
        let r = fit(&request("llama-3.1-8b", "rtx-4090", 2048)).unwrap();
        let l = r
            .rejected
            .iter()
            .find(|x| x.method == Method::Lora && !x.grad_checkpointing)
            .unwrap();
        assert_eq!(l.dominant_component, "activations");
        assert!(
            l.reason.starts_with("activations ") && l.reason.contains("GiB free"),
            "{}",
            l.reason
        );
    }

    #[test]
    fn eight_b_on_a_4090_ranks_qlora_and_lora_plans() {
        let r = fit(&request("llama-3.1-8b", "rtx-4090", 2048)).unwrap();
        assert!(r.plans.iter().any(|p| p.method == Method::Qlora));
        assert!(r.plans.iter().all(|p| p.method != Method::Full));
        // Ranked by throughput: non-decreasing FLOPs per token down the list (dequant aside).
        let first = &r.plans[0];
        assert!(!first.grad_checkpointing || r.plans.iter().all(|p| p.grad_checkpointing));
        for w in r.plans.windows(2) {
            assert!(w[0].tokens_per_second >= w[1].tokens_per_second);
        }
    }
}
