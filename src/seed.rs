//! The rule-of-thumb table people quote, exactly as it stands, beside memplan's estimates for the
//! same nominal sizes.
//!
//! The table (the seed of this project; the same rules as the Hugging Face "Model memory anatomy"
//! guide and countless forum answers) multiplies the *nominal* size by bytes per parameter and
//! prints decimal gigabytes: loading in FP32 takes 4 B/param (7B: 28 GB); training in FP32 takes
//! 16–24 B/param (weights 4 + gradients 4 + AdamW states 8, + activations: 7B: 112–168 GB); in
//! 8-bit it takes a quarter of that, 4–6 B/param (7B: 28–42 GB). [`RULES`] holds these
//! multipliers; every rule column is nominal size × multiplier, in GB (10^9 B).
//!
//! memplan's columns are its estimates of the device total (`device_bytes`, what nvidia-smi
//! would show) for a bare size of that nominal size ([`crate::model::size`]: the Llama 3
//! family), at batch 1 × 2048 tokens, SDPA, AdamW, gradient checkpointing on (the default of
//! `memplan estimate`), in the same unit (GB).

use serde::Serialize;

use crate::dtype::Precision;
use crate::error::Error;
use crate::estimate::estimate;
use crate::method::{Job, Method};
use crate::model::resolve_model;
use crate::units::Bytes;

/// Sizes of the seed's table.
pub const SEED_SIZES: [&str; 5] = ["1B", "7B", "10B", "70B", "140B"];

/// The source's rules: (column, low bytes per parameter, high bytes per parameter).
pub const RULES: [(&str, u128, u128); 3] = [("load", 4, 4), ("train", 16, 24), ("8-bit", 4, 6)];

/// One size: the source's figures and memplan's.
#[derive(Debug, Clone, Serialize)]
pub struct SeedRow {
    /// Nominal size as the table writes it (`7B`).
    pub size: String,
    pub nominal_params: u128,
    /// The model memplan estimates for that size, and its actual parameter count.
    pub model: String,
    pub params: u128,
    /// (column, low bytes, high bytes): nominal size × the rule's bytes per parameter.
    pub rules: Vec<(String, Bytes, Bytes)>,
    /// (label, device bytes) of memplan's estimates.
    pub memplan: Vec<(String, Bytes)>,
    /// Where the rule holds for this size, from the numbers above.
    pub note: String,
}

/// The configurations memplan estimates for each size: (label, method, weights, compute).
pub fn configurations() -> Vec<(&'static str, Method, Precision, Precision)> {
    vec![
        (
            "load fp32",
            Method::Inference,
            Precision::Fp32,
            Precision::Fp32,
        ),
        ("full fp32", Method::Full, Precision::Fp32, Precision::Fp32),
        ("full mixed", Method::Full, Precision::Fp32, Precision::Bf16),
        ("full bf16", Method::Full, Precision::Bf16, Precision::Bf16),
        ("LoRA bf16", Method::Lora, Precision::Bf16, Precision::Bf16),
        ("LoRA int8", Method::Lora, Precision::Int8, Precision::Bf16),
        ("QLoRA", Method::Qlora, Precision::Nf4, Precision::Bf16),
    ]
}

fn gb(b: Bytes) -> String {
    format!("{:.0}", b.0 as f64 / 1e9)
}

/// Whether `value` lies inside `[lo, hi]`, and by how much it misses.
fn against(value: Bytes, lo: Bytes, hi: Bytes) -> String {
    let v = value.0 as f64;
    if value < lo {
        format!("{:.0}% below", (1.0 - v / lo.0 as f64) * 100.0)
    } else if value > hi {
        format!("{:.0}% above", (v / hi.0 as f64 - 1.0) * 100.0)
    } else {
        "inside".into()
    }
}

fn note(row: &SeedRow) -> String {
    let m = |label: &str| {
        row.memplan
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, b)| *b)
            .unwrap_or_default()
    };
    let r = |i: usize| (row.rules[i].1, row.rules[i].2);
    let (load, _) = r(0);
    let (tlo, thi) = r(1);
    let (elo, ehi) = r(2);
    format!(
        "{}: load fp32 {} GB is {} the rule's {} (activations of one prefill, CUDA context); full fp32 {} GB is {} 16–24 B/param ({}–{}), full bf16 {} GB {}; 8-bit: LoRA int8 {} GB is {} 4–6 B/param ({}–{}) and QLoRA {} GB {} (adapters train, the base does not){}",
        row.size,
        gb(m("load fp32")),
        against(m("load fp32"), load, load),
        gb(load),
        gb(m("full fp32")),
        against(m("full fp32"), tlo, thi),
        gb(tlo),
        gb(thi),
        gb(m("full bf16")),
        against(m("full bf16"), tlo, thi),
        gb(m("LoRA int8")),
        against(m("LoRA int8"), elo, ehi),
        gb(elo),
        gb(ehi),
        gb(m("QLoRA")),
        against(m("QLoRA"), elo, ehi),
        if row.params.abs_diff(row.nominal_params) * 20 > row.nominal_params {
            format!(
                "; memplan's {} has {:.2}B parameters, not {}",
                row.model,
                row.params as f64 / 1e9,
                row.size
            )
        } else {
            String::new()
        }
    )
}

pub fn seed_table() -> Result<Vec<SeedRow>, Error> {
    SEED_SIZES
        .iter()
        .map(|size| {
            let nominal = crate::units::parse_count(size)
                .expect("the seed sizes parse (tested)")
                .round() as u128;
            let (shape, _) = resolve_model(size)?;
            let memplan = configurations()
                .into_iter()
                .map(|(label, method, weights, compute)| {
                    let mut job = Job::new(shape.clone(), method);
                    job.weights = weights;
                    job.compute = compute;
                    job.grad_checkpointing = method != Method::Inference;
                    Ok((label.to_string(), estimate(&job)?.device_bytes))
                })
                .collect::<Result<Vec<_>, Error>>()?;
            let mut row = SeedRow {
                size: size.to_string(),
                nominal_params: nominal,
                model: shape.name.clone(),
                params: shape.param_counts().total,
                rules: RULES
                    .iter()
                    .map(|(l, lo, hi)| (l.to_string(), Bytes(lo * nominal), Bytes(hi * nominal)))
                    .collect(),
                memplan,
                note: String::new(),
            };
            row.note = note(&row);
            Ok(row)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_figures_stand_as_written() {
        let rows = seed_table().unwrap();
        let gb = |b: Bytes| b.0 / 1_000_000_000;
        let r7 = &rows[1];
        assert_eq!(r7.size, "7B");
        // 7B: 28 GB to load, 112–168 GB to train, 28–42 GB in 8-bit.
        let figures: Vec<(u128, u128)> =
            r7.rules.iter().map(|(_, l, h)| (gb(*l), gb(*h))).collect();
        assert_eq!(figures, vec![(28, 28), (112, 168), (28, 42)]);
        let r140 = &rows[4];
        assert_eq!((gb(r140.rules[1].1), gb(r140.rules[1].2)), (2240, 3360));
        assert!(r7.note.starts_with("7B: load fp32"), "{}", r7.note);
    }

    #[test]
    fn memplan_columns_bracket_the_rules_where_the_mechanism_says() {
        for r in seed_table().unwrap() {
            let m = |label: &str| r.memplan.iter().find(|(l, _)| l == label).unwrap().1;
            // Full fp32 AdamW holds weights, gradients and two states: 16 B per actual parameter.
            assert!(m("full fp32").0 > 16 * r.params, "{}", r.size);
            // QLoRA stores the base in 4 bits: below 16-bit LoRA everywhere, and below the
            // rule's 8-bit floor of 4 B/param once the weights outweigh the 128k-vocabulary
            // logits (2048 × 128,256 × 12 B ≈ 3.2 GB) and the CUDA context.
            assert!(m("QLoRA") < m("LoRA bf16"), "{}", r.size);
            if r.params > 50_000_000_000 {
                assert!(m("QLoRA").0 < 4 * r.params, "{}", r.size);
            }
        }
    }
}
