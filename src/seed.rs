//! The rule-of-thumb table people quote, beside memplan's estimates for the same sizes.
//!
//! Rules (as commonly stated, e.g. the Hugging Face "Model memory anatomy" guide and the
//! original seed of this project): loading in FP32 takes 4 B/param; training takes 16–24 B/param
//! (weights + gradients + AdamW states + activations); loading in 8-bit takes a quarter of FP32.
//! memplan's columns are full estimates at batch 1 × 2048 tokens, SDPA, no checkpointing, as
//! NVML would show them (`device_bytes`).

use serde::Serialize;

use crate::dtype::Precision;
use crate::error::Error;
use crate::estimate::estimate;
use crate::method::{Job, Method};
use crate::model::resolve_model;
use crate::units::Bytes;

/// Sizes of the seed's table.
pub const SEED_SIZES: [&str; 5] = ["1B", "7B", "10B", "70B", "140B"];

#[derive(Debug, Clone, Serialize)]
pub struct SeedRow {
    pub size: String,
    pub model: String,
    pub params: u128,
    pub rule_load_fp32_bytes: Bytes,
    pub rule_load_int8_bytes: Bytes,
    pub rule_train_low_bytes: Bytes,
    pub rule_train_high_bytes: Bytes,
    /// (label, device bytes) of memplan's estimates.
    pub memplan: Vec<(String, Bytes)>,
}

/// The configurations memplan estimates for each size.
fn configurations() -> Vec<(&'static str, Method, Precision, Precision)> {
    vec![
        (
            "load fp32",
            Method::Inference,
            Precision::Fp32,
            Precision::Fp32,
        ),
        (
            "load int8",
            Method::Inference,
            Precision::Int8,
            Precision::Bf16,
        ),
        ("full fp32", Method::Full, Precision::Fp32, Precision::Fp32),
        ("full mixed", Method::Full, Precision::Fp32, Precision::Bf16),
        ("full bf16", Method::Full, Precision::Bf16, Precision::Bf16),
        ("LoRA r16", Method::Lora, Precision::Bf16, Precision::Bf16),
        ("QLoRA r16", Method::Qlora, Precision::Nf4, Precision::Bf16),
    ]
}

pub fn seed_table() -> Result<Vec<SeedRow>, Error> {
    SEED_SIZES
        .iter()
        .map(|size| {
            let (shape, _) = resolve_model(size)?;
            let p = shape.param_counts().total;
            let memplan = configurations()
                .into_iter()
                .map(|(label, method, weights, compute)| {
                    let mut job = Job::new(shape.clone(), method);
                    job.weights = weights;
                    job.compute = compute;
                    Ok((label.to_string(), estimate(&job)?.device_bytes))
                })
                .collect::<Result<Vec<_>, Error>>()?;
            Ok(SeedRow {
                size: size.to_string(),
                model: shape.name.clone(),
                params: p,
                rule_load_fp32_bytes: Bytes(4 * p),
                rule_load_int8_bytes: Bytes(p),
                rule_train_low_bytes: Bytes(16 * p),
                rule_train_high_bytes: Bytes(24 * p),
                memplan,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_the_stated_multiples() {
        let rows = seed_table().unwrap();
        assert_eq!(rows.len(), 5);
        let r7 = &rows[1];
        assert_eq!(r7.rule_load_fp32_bytes.0, 4 * r7.params);
        assert_eq!(r7.rule_train_high_bytes.0, 24 * r7.params);
        // Full fp32 AdamW needs at least weights+grads+2 states = 16 B/param: the rule's floor.
        let full32 = r7
            .memplan
            .iter()
            .find(|(l, _)| l.starts_with("full fp32"))
            .unwrap()
            .1;
        assert!(full32.0 > 16 * r7.params);
        // QLoRA is far below the training rule (under half its 16 B/param floor), although
        // its activations at 2048 tokens exceed its 4-bit weights.
        let q = r7
            .memplan
            .iter()
            .find(|(l, _)| l.starts_with("QLoRA"))
            .unwrap()
            .1;
        assert!(q.0 < 8 * r7.params);
    }
}
