//! Training compute, time and money: `memplan cost`.
//!
//! What it models and where the numbers come from:
//! - FLOPs per token of a decoder-only transformer (Kaplan et al., 2020, §2.1; Hoffmann et al.,
//!   2022, App. F): a matmul with N parameters costs 2·N FLOPs per token forward; backward costs
//!   2·N for the input gradients plus 2·N for the weight gradients. N counts matmul parameters:
//!   every parameter except the input-embedding lookup, which multiplies nothing (a tied
//!   embedding is counted once, as lm_head).
//!   - full fine-tuning: 6·N per token;
//!   - LoRA / QLoRA: the frozen base needs no weight gradients: 4·N, plus 6·A for the A adapter
//!     parameters (Hu et al., 2021, §4.2 make the same argument for their speed-up);
//!   - gradient checkpointing re-runs each decoder layer's forward in backward: + 2·(N − lm_head)
//!     (+ 2·A) per token;
//!   - attention scores and their product with v (not parameters): 2·2·s·(heads·head_dim) FLOPs
//!     per token per layer forward, halved for the causal mask (flash/SDPA kernels skip masked
//!     blocks), ×3 for forward + backward (+1 forward with checkpointing). On by default;
//!     `--no-attention-flops` drops it to get the classic 6·N·D.
//! - QLoRA dequantization (stated assumption): bitsandbytes dequantizes every NF4 weight to the
//!   compute dtype before each matmul (`MatMul4Bit`: forward, input-gradient backward, and the
//!   recompute with checkpointing). memplan counts it as memory time, not FLOPs: 2.5 bytes moved
//!   per weight per pass (0.5 B of NF4 read + 2 B of bf16 written) at the GPU's memory
//!   bandwidth, once per micro-batch. `--no-dequant-overhead` drops it.
//! - Wall time = FLOPs / (GPUs × peak dense tensor FLOP/s × MFU) + dequantization time. Peak is
//!   the preset's dense (no sparsity) bf16 or fp16 figure for the job's compute dtype; MFU
//!   (model FLOPs utilization, Chowdhery et al., 2022, App. B) defaults to 0.4 — PaLM reports
//!   46%, well-tuned fine-tuning runs 30–50%; small micro-batches, offload and paged optimizers run
//!   lower. Expected error of the result: as good as the MFU guess, typically ±30%.
//! - Money = GPU-hours × hourly price. Buying = GPUs × purchase price, against which the rental
//!   cost is compared (break-even GPU-hours = purchase price / hourly price). Power, hosting,
//!   networking and resale are not included.

use serde::Serialize;

use crate::error::Error;
use crate::estimate::resident::resident;
use crate::gpu::Gpu;
use crate::method::{Job, Method};
use crate::Precision;

/// Default model FLOPs utilization.
pub const DEFAULT_MFU: f64 = 0.4;
/// Bytes moved per NF4 weight per dequantization: 0.5 B read + 2 B bf16 written.
pub const DEQUANT_BYTES_PER_WEIGHT: f64 = 2.5;

/// Training FLOPs per token, by term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FlopsPerToken {
    /// Matmul parameters N.
    pub matmul_params: u128,
    /// Trainable adapter parameters A (0 for full fine-tuning).
    pub adapter_params: u128,
    pub forward: u128,
    pub backward: u128,
    pub recompute: u128,
    pub attention: u128,
}

impl FlopsPerToken {
    pub fn total(&self) -> u128 {
        self.forward + self.backward + self.recompute + self.attention
    }
}

/// FLOPs per trained token of `job` (see the module docs for each term).
pub fn flops_per_token(job: &Job, attention: bool) -> FlopsPerToken {
    let m = &job.model;
    let c = m.param_counts();
    // The input embedding is a lookup; a tied matrix still does lm_head's matmul.
    let n = c.total - if m.tie_embeddings { 0 } else { c.embedding };
    let lm_head = c.embedding; // V·h either way
    let a = match job.method {
        Method::Lora | Method::Qlora => resident(job).trainable_params,
        _ => 0,
    };
    let (forward, backward) = match job.method {
        Method::Full => (2 * n, 4 * n),
        Method::Lora | Method::Qlora => (2 * n + 2 * a, 2 * n + 4 * a),
        Method::Inference => (2 * n, 0),
    };
    let recompute = if job.grad_checkpointing && job.method != Method::Inference {
        2 * (n - lm_head) + 2 * a
    } else {
        0
    };
    let attention = if attention {
        // 2 matmuls × 2 FLOPs × s × q_dim, halved by the causal mask = 2·s·q_dim per layer.
        let fwd = 2 * job.seq * m.q_dim() * m.layers;
        let passes = match (job.method, job.grad_checkpointing) {
            (Method::Inference, _) => 1,
            (_, false) => 3,
            (_, true) => 4,
        };
        fwd * passes
    } else {
        0
    };
    FlopsPerToken {
        matmul_params: n,
        adapter_params: a,
        forward,
        backward,
        recompute,
        attention,
    }
}

/// What `memplan cost` is asked.
#[derive(Debug, Clone)]
pub struct CostRequest {
    pub job: Job,
    pub gpu: Gpu,
    pub gpus: u128,
    /// Tokens in the data set (one epoch).
    pub tokens: u128,
    pub epochs: f64,
    pub mfu: f64,
    /// Per GPU-hour; `None`: the preset's (USD only).
    pub price: Option<f64>,
    /// Per GPU; `None`: the preset's (USD only).
    pub purchase_price: Option<f64>,
    pub currency: String,
    /// Overrides the preset's peak dense TFLOP/s.
    pub peak_tflops: Option<f64>,
    pub attention_flops: bool,
    pub dequant_overhead: bool,
}

/// An amount of money.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Money {
    pub amount: f64,
    pub currency: String,
}

/// One stated assumption: its value, where it comes from, and the flag that changes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assumption {
    pub name: &'static str,
    pub value: String,
    pub source: String,
    pub override_with: &'static str,
}

/// Renting against buying the GPUs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuyVsRent {
    /// GPUs × purchase price.
    pub purchase: Money,
    /// Purchase price / hourly price: GPU-hours of rental that cost as much as one card.
    pub break_even_gpu_hours: f64,
    /// How many runs like this one the purchase price would rent.
    pub runs_to_break_even: f64,
}

/// The answer of `memplan cost`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostEstimate {
    pub model: String,
    pub method: Method,
    pub gpu: String,
    pub gpus: u128,
    pub tokens_trained: u128,
    pub flops_per_token: FlopsPerToken,
    pub flops: f64,
    pub peak_flops_per_gpu: f64,
    pub dequant_hours: f64,
    pub wall_hours: f64,
    pub gpu_hours: f64,
    pub cost: Money,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buy_vs_rent: Option<BuyVsRent>,
    pub assumptions: Vec<Assumption>,
    /// Whether one step of the job fits each GPU (the job's estimate against the GPU's memory).
    pub fits: bool,
    /// The verdict in full, with what would fit when it does not.
    pub fit: crate::gpu::Fit,
}

/// A number as a user would write it: `0.4`, `1e300` (not 301 digits).
pub fn number_text(v: f64) -> String {
    if v == 0.0 || (1e-4..1e7).contains(&v.abs()) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

fn positive(v: f64, flag: &'static str, what: &str) -> Result<f64, Error> {
    let (min, max) = input_bounds(flag);
    let ok = v.is_finite() && v > 0.0 && (min..=max).contains(&v);
    let (v_text, min, max) = (number_text(v), number_text(min), number_text(max));
    if ok {
        Ok(v)
    } else if v.is_finite() && v > 0.0 {
        Err(Error::Unsupported(format!(
            "{flag} {v_text}: {what} must be between {min} and {max}"
        )))
    } else {
        Err(Error::Unsupported(format!(
            "{flag} {v_text}: {what} must be a positive number"
        )))
    }
}

/// The range each numeric input of `memplan cost` accepts, so that every result is a finite
/// number (no `inf`, no `NaN`) and none saturates. The bounds are far outside real runs: MFU
/// 1% (no training run is slower) to 1; throughput 1 GFLOP/s to 10^5 TFLOP/s (40× a B200);
/// 10^-3 to 10^3 epochs; prices 10^-6 to 10^9; up to 10^15 tokens (66× Llama 3's 15T
/// pre-training set) and 10^6 GPUs.
pub fn input_bounds(flag: &str) -> (f64, f64) {
    match flag {
        "--mfu" => (0.01, 1.0),
        "--peak-tflops" => (1e-3, 1e5),
        "--epochs" => (1e-3, 1e3),
        "--price" | "--purchase-price" => (1e-6, 1e9),
        "--tokens" => (1.0, MAX_TOKENS as f64),
        "--gpus" => (1.0, MAX_GPUS as f64),
        _ => (f64::MIN_POSITIVE, f64::MAX),
    }
}

/// Largest `--tokens` (see [`input_bounds`]).
pub const MAX_TOKENS: u128 = 1_000_000_000_000_000;
/// Largest `--gpus` of `memplan cost`.
pub const MAX_GPUS: u128 = 1_000_000;

/// Peak dense FLOP/s for the job's compute dtype, with where it came from.
fn peak(req: &CostRequest) -> Result<(f64, String), Error> {
    if let Some(t) = req.peak_tflops {
        let t = positive(t, "--peak-tflops", "peak throughput")?;
        return Ok((t * 1e12, "--peak-tflops".into()));
    }
    let g = &req.gpu;
    let (v, dtype) = match req.job.compute {
        Precision::Bf16 => (g.bf16_dense_tflops, "bf16"),
        Precision::Fp16 => (g.fp16_dense_tflops, "fp16"),
        other => {
            return Err(Error::Unsupported(format!(
                "memplan cost needs the tensor throughput of --compute {other}, which the presets do not list; pass --peak-tflops"
            )))
        }
    };
    match v {
        Some(t) => Ok((
            t * 1e12,
            format!("{} dense {dtype}: {}", g.name, g.throughput_source),
        )),
        None => Err(Error::Unsupported(format!(
            "{} has no {dtype} tensor throughput in the presets{}; pass --peak-tflops, or a --gpu-file with {dtype}_dense_tflops",
            g.name,
            if dtype == "bf16" && g.fp16_dense_tflops.is_some() { " (no bf16 support: use --compute fp16)" } else { "" }
        ))),
    }
}

/// Computes time and money for training `req.job` on `req.tokens × req.epochs` tokens.
pub fn cost(req: &CostRequest) -> Result<CostEstimate, Error> {
    if req.gpus == 0 || req.gpus > MAX_GPUS {
        return Err(Error::Unsupported(format!(
            "--gpus {}: between 1 and {MAX_GPUS}",
            req.gpus
        )));
    }
    if req.tokens == 0 || req.tokens > MAX_TOKENS {
        return Err(Error::Unsupported(format!(
            "--tokens {}: a positive count such as 50M, at most 1e15",
            req.tokens
        )));
    }
    let epochs = positive(req.epochs, "--epochs", "the number of epochs")?;
    if !(req.mfu > 0.0 && req.mfu <= 1.0) {
        return Err(Error::Unsupported(format!(
            "--mfu {}: utilization is a fraction of peak, at most 1 (typical 0.3–0.5)",
            number_text(req.mfu)
        )));
    }
    let mfu = positive(req.mfu, "--mfu", "model FLOPs utilization")?;
    if req.job.method == Method::Inference {
        return Err(Error::Unsupported(
            "memplan cost prices training: use --method full, lora or qlora".into(),
        ));
    }
    let usd = req.currency.eq_ignore_ascii_case("USD");
    let price = match req.price {
        Some(p) => positive(p, "--price", "the price per GPU-hour")?,
        None if !usd => {
            return Err(Error::Unsupported(format!(
                "--currency {}: the presets price GPUs in USD; pass --price (per GPU-hour in {})",
                req.currency, req.currency
            )))
        }
        None => req.gpu.hourly_price_usd.ok_or_else(|| {
            Error::Unsupported(format!(
                "{} has no typical hourly price in the presets; pass --price",
                req.gpu.name
            ))
        })?,
    };
    let purchase = match req.purchase_price {
        Some(p) => Some(positive(p, "--purchase-price", "the purchase price")?),
        None if usd => req.gpu.purchase_price_usd,
        None => None,
    };
    let (peak_flops, peak_source) = peak(req)?;

    let tokens_trained = (req.tokens as f64 * epochs).round() as u128;
    if tokens_trained == 0 {
        return Err(Error::Unsupported(format!(
            "--tokens {} × --epochs {epochs} trains less than one token",
            req.tokens
        )));
    }
    let fpt = flops_per_token(&req.job, req.attention_flops);
    let flops = fpt.total() as f64 * tokens_trained as f64;
    let gpus = req.gpus as f64;
    let compute_s = flops / (gpus * peak_flops * mfu);

    let dequant = req.job.method == Method::Qlora && req.dequant_overhead;
    let dequant_s = if dequant {
        let bw = req.gpu.memory_bandwidth_gb_per_s.ok_or_else(|| {
            Error::Unsupported(format!(
                "{} has no memory bandwidth in the presets (needed for the QLoRA dequantization time); add memory_bandwidth_gb_per_s with --gpu-file, or pass --no-dequant-overhead",
                req.gpu.name
            ))
        })?;
        let passes = if req.job.grad_checkpointing { 3.0 } else { 2.0 };
        let weights = req.job.model.param_counts().linear_weights as f64;
        let per_micro_batch = passes * weights * DEQUANT_BYTES_PER_WEIGHT / (bw * 1e9);
        let micro_batches_per_gpu = tokens_trained as f64 / (req.job.tokens() as f64 * gpus);
        per_micro_batch * micro_batches_per_gpu
    } else {
        0.0
    };
    let wall_hours = (compute_s + dequant_s) / 3600.0;
    let gpu_hours = wall_hours * gpus;
    let amount = gpu_hours * price;
    let buy_vs_rent = purchase.map(|p| BuyVsRent {
        purchase: Money {
            amount: p * gpus,
            currency: req.currency.clone(),
        },
        break_even_gpu_hours: p / price,
        runs_to_break_even: if amount > 0.0 {
            p * gpus / amount
        } else {
            f64::INFINITY
        },
    });

    let method_rule = match req.job.method {
        Method::Full => "6·N per token (forward 2N, backward 4N)".to_string(),
        _ => format!(
            "4·N + 6·A per token (frozen base: no weight gradients; A = {} adapter params)",
            fpt.adapter_params
        ),
    };
    let mut assumptions = vec![
        Assumption {
            name: "flops_per_token",
            value: format!("{}", fpt.total()),
            source: format!(
                "{method_rule}; N = {} matmul params (all but the input-embedding lookup){}{}",
                fpt.matmul_params,
                if fpt.recompute > 0 { format!("; + {} recompute (checkpointing: one more forward of the decoder layers)", fpt.recompute) } else { String::new() },
                if fpt.attention > 0 { format!("; + {} attention scores (2·s·heads·head_dim per layer forward, causal-halved, ×{} passes) at seq {}", fpt.attention, if req.job.grad_checkpointing { 4 } else { 3 }, req.job.seq) } else { String::new() },
            ),
            override_with: "--no-attention-flops, --grad-checkpointing, --seq",
        },
        Assumption {
            name: "peak_flops_per_gpu",
            value: format!("{:.1} TFLOP/s", peak_flops / 1e12),
            source: peak_source,
            override_with: "--peak-tflops, --compute, --gpu-file",
        },
        Assumption {
            name: "mfu",
            value: format!("{mfu}"),
            source: "model FLOPs utilization; 0.4 default (PaLM reports 0.46; fine-tuning runs 0.3–0.5, lower with small micro-batches or offload)".into(),
            override_with: "--mfu",
        },
        Assumption {
            name: "tokens",
            value: format!("{} × {epochs} epochs = {tokens_trained}", req.tokens),
            source: "given".into(),
            override_with: "--tokens, --epochs",
        },
        Assumption {
            name: "price_per_gpu_hour",
            value: format!("{price} {}", req.currency),
            source: if req.price.is_some() {
                "--price".into()
            } else {
                format!("{} ({})", req.gpu.hourly_price_source, req.gpu.prices_as_of)
            },
            override_with: "--price, --currency",
        },
    ];
    if dequant {
        assumptions.push(Assumption {
            name: "qlora_dequant",
            value: format!("{:.3} h", dequant_s / 3600.0),
            source: format!(
                "bitsandbytes dequantizes each NF4 weight before every matmul: {} passes × {} weights × {DEQUANT_BYTES_PER_WEIGHT} B at {} GB/s per micro-batch of {} tokens",
                if req.job.grad_checkpointing { 3 } else { 2 },
                req.job.model.param_counts().linear_weights,
                req.gpu.memory_bandwidth_gb_per_s.unwrap_or(0.0),
                req.job.tokens()
            ),
            override_with: "--no-dequant-overhead, --batch, --seq",
        });
    }
    if let Some(p) = purchase {
        assumptions.push(Assumption {
            name: "purchase_price_per_gpu",
            value: format!("{p} {}", req.currency),
            source: if req.purchase_price.is_some() {
                "--purchase-price".into()
            } else {
                format!(
                    "{} ({}); power, hosting and resale not included",
                    req.gpu.purchase_price_source, req.gpu.prices_as_of
                )
            },
            override_with: "--purchase-price",
        });
    }
    // The plan must fit the GPU it is priced on: one replica of the step per GPU.
    let profile = crate::estimate::runtime::pytorch_cuda();
    let est = crate::estimate::estimate_with(&req.job, &profile)?;
    let mut fit = crate::gpu::fit(&est, &req.gpu);
    if !fit.fits {
        fit.would_fit = crate::plan::suggest(&req.job, &req.gpu, &profile)?;
    }
    Ok(CostEstimate {
        fits: fit.fits,
        fit,
        model: req.job.model.name.clone(),
        method: req.job.method,
        gpu: req.gpu.name.clone(),
        gpus: req.gpus,
        tokens_trained,
        flops_per_token: fpt,
        flops,
        peak_flops_per_gpu: peak_flops,
        dequant_hours: dequant_s / 3600.0,
        wall_hours,
        gpu_hours,
        cost: Money {
            amount,
            currency: req.currency.clone(),
        },
        buy_vs_rent,
        assumptions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::resolve_gpu;
    use crate::model::resolve_model;

    fn job(model: &str, method: Method) -> Job {
        Job::new(resolve_model(model).unwrap().0, method)
    }

    fn request(job: Job) -> CostRequest {
        CostRequest {
            job,
            gpu: resolve_gpu("h100").unwrap(),
            gpus: 8,
            tokens: 50_000_000,
            epochs: 3.0,
            mfu: 0.4,
            price: Some(2.5),
            purchase_price: Some(30_000.0),
            currency: "USD".into(),
            peak_tflops: None,
            attention_flops: false,
            dequant_overhead: false,
        }
    }

    #[test]
    fn full_fine_tuning_is_six_n_d_by_hand() {
        // Llama-3.1-8B: 8,030,261,248 params, untied 128,256 × 4096 embedding:
        // N = 8,030,261,248 − 525,336,576 = 7,504,924,672 matmul params.
        let r = cost(&request(job("llama-3.1-8b", Method::Full))).unwrap();
        let n: u128 = 7_504_924_672;
        assert_eq!(r.flops_per_token.total(), 6 * n);
        let d = 150_000_000f64; // 50M × 3 epochs
        let flops = 6.0 * n as f64 * d;
        assert_eq!(r.flops, flops);
        // 6.754e18 FLOPs / (8 × 989.4e12 × 0.4) = 2,133.5 s = 0.5926 h; × 8 GPUs × 2.5 USD.
        let wall = flops / (8.0 * 989.4e12 * 0.4) / 3600.0;
        assert!((r.wall_hours - wall).abs() < 1e-12);
        assert!((r.wall_hours - 0.59264).abs() < 1e-4, "{}", r.wall_hours);
        assert!((r.cost.amount - wall * 8.0 * 2.5).abs() < 1e-9);
        let b = r.buy_vs_rent.unwrap();
        assert_eq!(b.purchase.amount, 240_000.0);
        assert_eq!(b.break_even_gpu_hours, 12_000.0);
    }

    #[test]
    fn lora_skips_frozen_weight_gradients_and_checkpointing_adds_a_forward() {
        let j = job("llama-3.1-8b", Method::Lora);
        let f = flops_per_token(&j, false);
        let n = 7_504_924_672u128;
        // All-linear rank 16 on 32 layers: 16 × (q 4096+4096, k 4096+1024, v 4096+1024,
        // o 4096+4096, gate 4096+14336, up 4096+14336, down 14336+4096) × 32 = 41,943,040.
        assert_eq!(f.adapter_params, 41_943_040);
        assert_eq!(f.total(), 4 * n + 6 * f.adapter_params);
        let mut c = j.clone();
        c.grad_checkpointing = true;
        let fc = flops_per_token(&c, false);
        // One more forward of the decoder layers (not lm_head, V·h = 525,336,576) and adapters.
        assert_eq!(
            fc.total() - f.total(),
            2 * (n - 525_336_576) + 2 * f.adapter_params
        );
    }

    #[test]
    fn attention_flops_by_hand() {
        let mut j = job("llama-3.1-8b", Method::Full);
        j.seq = 4096;
        // 2 · s · q_dim · layers forward = 2 × 4096 × 4096 × 32, × 3 passes.
        let f = flops_per_token(&j, true);
        assert_eq!(f.attention, 3 * 2 * 4096 * 4096 * 32);
    }

    #[test]
    fn qlora_dequantization_is_memory_time() {
        let mut r = request(job("llama-3.1-8b", Method::Qlora));
        let off = cost(&r).unwrap();
        r.dequant_overhead = true;
        let on = cost(&r).unwrap();
        // 2 passes × linear weights × 2.5 B / 3,350 GB/s per micro-batch of 2048 tokens, over
        // 150M / (2048 × 8) micro-batches per GPU.
        let w = job("llama-3.1-8b", Method::Qlora)
            .model
            .param_counts()
            .linear_weights as f64;
        let per = 2.0 * w * 2.5 / 3350e9;
        let expect = per * 150e6 / (2048.0 * 8.0) / 3600.0;
        assert!((on.dequant_hours - expect).abs() < 1e-12);
        assert!((on.wall_hours - off.wall_hours - expect).abs() < 1e-9);
    }

    #[test]
    fn bad_input_gives_one_clear_error_each() {
        let base = || request(job("llama-3.2-1b", Method::Full));
        let err = |r: CostRequest| cost(&r).unwrap_err().to_string();
        let mut r = base();
        r.mfu = 1.5;
        assert!(err(r).contains("--mfu"));
        let mut r = base();
        r.price = Some(0.0);
        assert!(err(r).contains("--price"));
        let mut r = base();
        r.price = Some(-1.0);
        assert!(err(r).contains("--price"));
        let mut r = base();
        r.tokens = 0;
        assert!(err(r).contains("--tokens"));
        let mut r = base();
        r.gpus = 0;
        assert!(err(r).contains("--gpus"));
        let mut r = base();
        r.price = None;
        r.currency = "EUR".into();
        assert!(err(r).contains("--price"));
        let mut r = base();
        r.gpu = resolve_gpu("t4").unwrap();
        assert!(err(r).contains("--compute fp16"));
    }
}
