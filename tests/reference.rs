//! The estimator against the project's reference traces (tests/data/reference/README.md):
//! transformers' own training step and prefill traced on meta tensors with CUDA's kernel
//! choices by tests/reference/trace.py (which matches the 38 traceable H200 measurements to a
//! median 0.005%). Each case's `config` is the exact config.json that was traced.
//!
//! Asserts |estimate − trace| / trace of the peak allocated bytes: median ≤ 0.5%, every case
//! ≤ 2%. Only GPT-2 and Falcon may be refused; a case listed in `KNOWN_GAPS` (with its reason)
//! is printed as "gap" and must still be over 2%. Run with `--nocapture` to see the table.

use std::path::{Path, PathBuf};

use memplan::method::{all_linear, parse_targets};
use memplan::{estimate, resolve_model, Attention, Job, Method, Precision};
use serde_json::Value;

/// Model types memplan refuses by design (a one-line reason: Conv1D / fused-QKV parallel
/// layouts); any other refusal fails the test.
const REFUSED_BY_DESIGN: &[&str] = &["falcon-", "gpt2"];
/// Cases memplan accepts but misses by more than `CASE_MAX`, each with what is not modelled.
/// Printed as "gap" and left out of the thresholds; the list is exact (a gap that closes fails
/// the test too, so it cannot outlive its reason).
const KNOWN_GAPS: &[(&[&str], &str)] = &[
    (
        &["llama-4-scout-17b-16e-L4|inference|bf16|b2|s2048|gc0|eager"],
        "Llama 4 eager prefill: its fp32 softmax over the chunked mask keeps an extra score-sized copy (−2.6%)",
    ),
];

fn known_gap(id: &str) -> Option<&'static str> {
    KNOWN_GAPS
        .iter()
        .find(|(parts, _)| parts.iter().all(|p| id.contains(p)))
        .map(|(_, why)| *why)
}
const MEDIAN_MAX: f64 = 0.005;
const CASE_MAX: f64 = 0.02;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/reference")
}

fn str_field<'a>(r: &'a Value, k: &str) -> &'a str {
    r[k].as_str()
        .unwrap_or_else(|| panic!("traces.jsonl: {k} missing"))
}

fn precision(text: &str) -> Result<Precision, String> {
    text.parse::<Precision>()
        .map_err(|e| format!("precision {text}: {e}"))
}

/// The trace's case as a memplan job, or why memplan refuses it.
fn job_for(r: &Value) -> Result<Job, String> {
    let cfg = data_dir().join(str_field(r, "config"));
    let (model, _) = resolve_model(cfg.to_str().unwrap()).map_err(|e| e.to_string())?;
    let method = match str_field(r, "method") {
        "full" => Method::Full,
        "lora" => Method::Lora,
        "inference" => Method::Inference,
        m => panic!("traces.jsonl: unknown method {m}"),
    };
    let mut job = Job::new(model, method);
    job.weights = precision(str_field(r, "weights"))?;
    job.compute = precision(str_field(r, "compute"))?;
    job.batch = r["batch"].as_u64().unwrap().into();
    job.seq = r["seq"].as_u64().unwrap().into();
    job.grad_checkpointing = r["grad_ckpt"].as_bool().unwrap();
    job.attention = match str_field(r, "attn") {
        "sdpa" => Attention::Sdpa,
        "eager" => Attention::Eager,
        a => panic!("traces.jsonl: unknown attention {a}"),
    };
    if let Some(l) = job.lora.as_mut() {
        let lr = &r["lora"];
        l.rank = lr["r"].as_u64().unwrap().into();
        l.dropout = lr["dropout"].as_f64().unwrap();
        l.targets = match &lr["requested"] {
            Value::String(s) if s == "all-linear" => all_linear(),
            Value::Array(names) => {
                let list: Vec<&str> = names.iter().filter_map(Value::as_str).collect();
                parse_targets(&list.join(",")).map_err(|e| e.to_string())?
            }
            other => panic!("traces.jsonl: unknown lora.requested {other}"),
        };
    }
    job.validate().map_err(|e| e.to_string())?;
    Ok(job)
}

struct Row {
    id: String,
    trace: u128,
    /// memplan's peak, or the one-line reason it refused.
    memplan: Result<u128, String>,
}

fn rows() -> Vec<Row> {
    let text = std::fs::read_to_string(data_dir().join("traces.jsonl")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let r: Value = serde_json::from_str(l).unwrap();
            let memplan = job_for(&r).and_then(|job| {
                // The tracer counts each storage rounded to 512 B, not the allocator's blocks:
                // compare what memplan's step requests (its peak without block rounding).
                estimate(&job)
                    .map(|e| {
                        e.peak_allocated_bytes.0
                            - e.component("block_rounding").map_or(0, |c| c.bytes.0)
                    })
                    .map_err(|e| e.to_string())
            });
            Row {
                id: str_field(&r, "id").to_string(),
                trace: r["peak_bytes"].as_u64().unwrap().into(),
                memplan,
            }
        })
        .collect()
}

fn gib(b: u128) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

#[test]
fn estimate_matches_reference_traces() {
    let rows = rows();
    assert!(rows.len() >= 100, "traces.jsonl has {} cases", rows.len());
    let mut per_model: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut errs = Vec::new();
    let mut refused = Vec::new();
    let mut over = Vec::new();
    let mut gaps = Vec::new();
    println!("{:>10} {:>10} {:>9}  case", "trace GiB", "memplan", "error");
    for row in &rows {
        match &row.memplan {
            Ok(m) => {
                let err = (*m as f64 - row.trace as f64) / row.trace as f64;
                println!(
                    "{:>10.3} {:>10.3} {:>+8.3}%  {}",
                    gib(row.trace),
                    gib(*m),
                    err * 100.0,
                    row.id
                );
                let model = row.id.split('|').next().unwrap_or("");
                let model = match model.rfind("-L") {
                    Some(k) if model[k + 2..].starts_with(|c: char| c.is_ascii_digit()) => {
                        &model[..k]
                    }
                    _ => model,
                };
                per_model
                    .entry(model.to_string())
                    .or_default()
                    .push(err.abs());
                match known_gap(&row.id) {
                    Some(why) if std::env::var_os("MEMPLAN_NO_GAPS").is_none() => {
                        println!("{:>31}  gap: {why}", "");
                        assert!(
                            err.abs() > CASE_MAX,
                            "{} is within {:.0}% now: remove it from KNOWN_GAPS",
                            row.id,
                            CASE_MAX * 100.0
                        );
                        gaps.push(row.id.clone());
                    }
                    _ => {
                        if err.abs() > CASE_MAX {
                            over.push(format!("{} ({:+.2}%)", row.id, err * 100.0));
                        }
                        errs.push(err.abs());
                    }
                }
            }
            Err(why) => {
                let line = why.lines().next().unwrap_or("");
                println!(
                    "{:>10.3} {:>10} {:>9}  {}: {line}",
                    gib(row.trace),
                    "refused",
                    "",
                    row.id
                );
                refused.push(row.id.clone());
            }
        }
    }
    // The per-architecture table of the book (Architectures), gaps included.
    println!("| model (traced config) | cases | median | worst |\n|---|---:|---:|---:|");
    let mut all: Vec<f64> = Vec::new();
    let mid = |v: &[f64]| {
        if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        }
    };
    for (model, v) in &mut per_model {
        v.sort_by(f64::total_cmp);
        all.extend(v.iter());
        println!(
            "| {model} | {} | {:.3}% | {:.2}% |",
            v.len(),
            mid(v) * 100.0,
            v[v.len() - 1] * 100.0
        );
    }
    all.sort_by(f64::total_cmp);
    if !all.is_empty() {
        println!(
            "| **all** | **{}** | **{:.3}%** | **{:.2}%** |",
            all.len(),
            mid(&all) * 100.0,
            all[all.len() - 1] * 100.0
        );
    }
    errs.sort_by(f64::total_cmp);
    let median = if errs.is_empty() {
        0.0
    } else if errs.len() % 2 == 1 {
        errs[errs.len() / 2]
    } else {
        (errs[errs.len() / 2 - 1] + errs[errs.len() / 2]) / 2.0
    };
    println!(
        "{} cases: {} held to the thresholds (median |error| {:.3}%, {} over {:.0}%), {} known gaps, {} refused",
        rows.len(),
        errs.len(),
        median * 100.0,
        over.len(),
        CASE_MAX * 100.0,
        gaps.len(),
        refused.len()
    );
    let unexpected: Vec<&String> = refused
        .iter()
        .filter(|id| !REFUSED_BY_DESIGN.iter().any(|p| id.starts_with(p)))
        .collect();
    assert!(unexpected.is_empty(), "refused: {unexpected:?}");
    assert!(gaps.len() <= KNOWN_GAPS.len());
    assert!(
        median <= MEDIAN_MAX,
        "median |error| {:.3}%",
        median * 100.0
    );
    assert!(
        over.is_empty(),
        "cases over {:.0}%: {over:?}",
        CASE_MAX * 100.0
    );
}
