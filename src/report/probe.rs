//! `memplan probe` output: the measured step beside the candle runtime model's estimate.

use crate::error::Error;
use crate::probe::ProbeReport;
use crate::units::MIB;

use super::{render, Format, Sheet};

fn mib(b: u64) -> String {
    format!("{:.2}", b as f64 / MIB as f64)
}

/// The estimate's error, (estimated − measured) / measured, as the groundtruth validation reports it.
fn pct(measured: u64, estimated: u64) -> String {
    if measured == 0 {
        return "-".into();
    }
    format!(
        "{:+.1}%",
        (estimated as f64 - measured as f64) / measured as f64 * 100.0
    )
}

/// Renders a probe report as a table (or CSV/markdown), or the report itself as JSON.
pub fn render_probe(r: &ProbeReport, format: Format) -> Result<String, Error> {
    render(format, r, || {
        let c = &r.config.model;
        let mut rows = vec![vec![
            "resident (model, adapters, AdamW state)".to_string(),
            mib(r.estimated_resident_bytes),
            mib(r.measured_resident_bytes),
            pct(r.measured_resident_bytes, r.estimated_resident_bytes),
        ]];
        for (phase, bytes) in &r.estimate.phases {
            if *phase != "load" {
                let measured = r
                    .measured_phase_peak_bytes
                    .iter()
                    .find(|(p, _)| p == phase)
                    .map(|(_, b)| *b);
                rows.push(vec![
                    format!("{phase} (highest live)"),
                    mib(*bytes as u64),
                    measured.map(mib).unwrap_or_default(),
                    measured.map(|m| pct(m, *bytes as u64)).unwrap_or_default(),
                ]);
            }
        }
        rows.push(vec![
            format!("peak of the step ({})", r.estimate.peak_phase),
            mib(r.estimated_peak_bytes),
            mib(r.measured_peak_bytes),
            format!("{:+.1}%", r.error_pct),
        ]);
        for (name, bytes) in &r.estimate.at_peak {
            rows.push(vec![
                format!("  at the peak: {name}"),
                mib(*bytes as u64),
                String::new(),
                String::new(),
            ]);
        }
        rows.push(vec![
            "runtime buffers kept after the steps (not modelled)".into(),
            String::new(),
            mib(r.runtime_bytes),
            String::new(),
        ]);
        if let Some(p) = r.pytorch_estimated_peak_bytes {
            rows.push(vec![
                "PyTorch estimate, same step (incl. 64 MiB cuBLAS workspace)".into(),
                mib(p),
                String::new(),
                String::new(),
            ]);
        }
        let losses: Vec<String> = r.losses.iter().map(|l| format!("{l:.4}")).collect();
        Sheet {
            title: vec![
                r.nvml_status.clone(),
                format!(
                    "backend {}: {} ({} MiB total, {} MiB free{})",
                    match r.backend {
                        crate::probe::Backend::Cpu => "cpu",
                        crate::probe::Backend::Cuda => "cuda",
                    },
                    r.device.name,
                    mib(r.device.total_bytes),
                    mib(r.device.free_bytes),
                    r.device
                        .driver
                        .as_deref()
                        .map(|d| format!(", driver {d}"))
                        .unwrap_or_default()
                ),
                format!(
                    "model: vocab {} hidden {} layers {} heads {}/{} kv intermediate {}{}; {} base, LoRA r={} α={} dropout {}; batch {} × seq {}; {} steps, AdamW lr {}",
                    c.vocab,
                    c.hidden,
                    c.layers,
                    c.heads,
                    c.kv_heads,
                    c.intermediate,
                    if c.tie_embeddings { " (tied)" } else { "" },
                    if c.nf4 {
                        if c.double_quant { "NF4 (double quant)" } else { "NF4" }
                    } else {
                        "fp32"
                    },
                    c.rank,
                    c.alpha,
                    c.dropout,
                    c.batch,
                    c.seq,
                    r.config.steps,
                    r.config.lr
                ),
                format!("losses: {}", losses.join(" → ")),
            ],
            headers: vec![
                "".into(),
                "estimated MiB".into(),
                "measured MiB".into(),
                "error".into(),
            ],
            rows,
            numeric: vec![1, 2, 3],
            notes: vec![
                format!("measured: {}", r.measurement),
                "estimated: candle runtime model (memplan::probe::expected), the same step walked on shapes".into(),
            ],
        }
    })
}
