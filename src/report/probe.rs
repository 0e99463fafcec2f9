//! `memplan probe` output: the measured step beside the candle runtime model's estimate, and with
//! a plan (`--model`) the per-layer and fixed terms, the whole-plan figures and the verdict.

use crate::error::Error;
use crate::probe::plan::Term;
use crate::probe::{ProbeReport, RunReport};
use crate::units::{GIB, MIB};

use super::{render, Format, Sheet};

fn mib(b: u64) -> String {
    format!("{:.2}", b as f64 / MIB as f64)
}

fn mib_signed(b: i64) -> String {
    format!("{:.2}", b as f64 / MIB as f64)
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / GIB as f64)
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

fn row(label: String, estimated: String, measured: String, error: String) -> Vec<String> {
    vec![label, estimated, measured, error]
}

fn term_row(label: &str, t: &Term) -> Vec<String> {
    row(
        label.to_string(),
        mib_signed(t.modelled_bytes),
        mib_signed(t.measured_bytes),
        format!("{:+.2}%", t.error_pct),
    )
}

/// Resident, per-phase and peak rows of one run; `prefix` names the depth in plan mode.
fn run_rows(r: &ProbeReport, run: &RunReport, prefix: &str, rows: &mut Vec<Vec<String>>) {
    rows.push(row(
        format!("{prefix}resident (model, adapters, AdamW state)"),
        mib(run.estimated_resident_bytes),
        mib(run.measured_resident_bytes),
        pct(run.measured_resident_bytes, run.estimated_resident_bytes),
    ));
    for (phase, estimated) in &run.estimated_phase_peak_bytes {
        let measured = run
            .measured_phase_peak_bytes
            .iter()
            .find(|(p, _)| p == phase)
            .map(|(_, b)| *b);
        rows.push(row(
            format!("{prefix}{phase} (highest live)"),
            mib(*estimated),
            measured.map(mib).unwrap_or_default(),
            measured.map(|m| pct(m, *estimated)).unwrap_or_default(),
        ));
    }
    rows.push(row(
        format!("{prefix}peak of the step ({})", r.estimate.peak_phase),
        mib(run.estimated_peak_bytes),
        mib(run.measured_peak_bytes),
        format!("{:+.1}%", run.error_pct),
    ));
}

fn losses(run: &RunReport) -> String {
    let l: Vec<String> = run.losses.iter().map(|l| format!("{l:.4}")).collect();
    l.join(" → ")
}

/// Renders a probe report as a table (or CSV/markdown), or the report itself as JSON.
pub fn render_probe(r: &ProbeReport, format: Format) -> Result<String, Error> {
    render(format, r, || {
        let c = &r.config.model;
        let mut title = vec![r.nvml_status.clone()];
        if let Some(inv) = &r.gpus {
            for g in &inv.gpus {
                title.push(format!(
                    "GPU {} {}: {} total, {} free, {} held by {} other process(es)",
                    g.index,
                    g.name,
                    gib(g.total_bytes),
                    gib(g.free_bytes),
                    gib(g.other_processes_bytes),
                    g.processes
                        .iter()
                        .filter(|p| p.pid != std::process::id())
                        .count()
                ));
            }
        }
        title.push(format!(
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
        ));
        let depths: Vec<String> = r.runs.iter().map(|x| x.layers.to_string()).collect();
        title.push(format!(
            "model: vocab {} hidden {} layers {} heads {}/{} kv head_dim {} intermediate {}{}; {} base, LoRA r={} α={} dropout {}; batch {} × seq {}; {} steps (deepest run), AdamW lr {}",
            c.vocab,
            c.hidden,
            depths.join(", "),
            c.heads,
            c.kv_heads,
            c.head_dim,
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
        ));
        let plan_mode = r.plan.is_some();
        for run in &r.runs {
            if plan_mode {
                title.push(format!(
                    "losses at {} layer(s): {}",
                    run.layers,
                    losses(run)
                ));
            } else {
                title.push(format!("losses: {}", losses(run)));
            }
        }
        if let Some(p) = &r.plan {
            title.push(format!(
                "plan: {} {}, {} layers, batch {} × seq {}: {}",
                p.model, p.method, p.layers, p.batch, p.seq, p.verdict
            ));
        }

        let mut rows = Vec::new();
        if plan_mode {
            for run in &r.runs {
                run_rows(r, run, &format!("{} layer(s): ", run.layers), &mut rows);
            }
            if let (Some(pl), Some(fx)) = (&r.per_layer, &r.fixed) {
                rows.push(term_row("per decoder layer (peak)", pl));
                rows.push(term_row(
                    "fixed: embedding, lm_head, logits, loss (peak)",
                    fx,
                ));
            }
            for t in r.terms.iter().filter(|t| t.quantity != "peak") {
                rows.push(term_row(
                    &format!("  per layer ({})", t.quantity),
                    &t.per_layer,
                ));
                rows.push(term_row(&format!("  fixed ({})", t.quantity), &t.fixed));
            }
        } else if let Some(run) = r.runs.first() {
            run_rows(r, run, "", &mut rows);
        }
        for (name, bytes) in &r.estimate.at_peak {
            rows.push(row(
                format!("  at the peak ({} layers): {name}", c.layers),
                mib(*bytes as u64),
                String::new(),
                String::new(),
            ));
        }
        rows.push(row(
            "runtime buffers kept after the steps (not modelled)".into(),
            String::new(),
            mib(r.runtime_bytes),
            String::new(),
        ));
        if let Some(p) = r.pytorch_estimated_peak_bytes {
            rows.push(row(
                "PyTorch estimate, same step (incl. 64 MiB cuBLAS workspace)".into(),
                mib(p),
                String::new(),
                String::new(),
            ));
        }
        if let Some(p) = &r.plan {
            let whole = format!("{} layers × {} tokens", p.layers, p.seq);
            if let Some(b) = p.candle_modelled_bytes {
                rows.push(row(
                    format!("candle, whole plan ({whole}): the model"),
                    mib(b),
                    String::new(),
                    String::new(),
                ));
            }
            if let (Some(m), Some(e)) = (
                p.candle_extrapolated_bytes,
                p.candle_modelled_extrapolated_bytes,
            ) {
                rows.push(row(
                    format!(
                        "candle, fixed + {} × per layer at {} tokens",
                        p.layers, c.seq
                    ),
                    mib(e),
                    mib(m),
                    pct(m, e),
                ));
            }
            rows.push(row(
                format!("PyTorch estimate of the plan ({whole}): peak allocated"),
                mib(p.peak_allocated_bytes),
                String::new(),
                String::new(),
            ));
            rows.push(row(
                "PyTorch estimate of the plan: on the device (reserved + CUDA context)".into(),
                mib(p.device_bytes),
                String::new(),
                String::new(),
            ));
            rows.push(row(
                format!("free now: {}", r.free_of),
                String::new(),
                mib(r.free_bytes),
                String::new(),
            ));
        }
        let mut notes = vec![
            format!("measured: {}", r.measurement),
            "estimated: candle runtime model (memplan::probe::expected), the same step walked on shapes".into(),
        ];
        if plan_mode {
            notes.push("per layer = (peak at the deepest run − peak at 1 layer) / (depth − 1); fixed = peak at 1 layer − per layer; error = (modelled − measured) / measured".into());
        }
        notes.extend(r.notes.iter().cloned());
        notes.push(format!(
            "wall time: {:.1} s (model built in {:.1} s)",
            r.total_seconds, r.build_seconds
        ));
        Sheet {
            title,
            headers: vec![
                "".into(),
                "estimated MiB".into(),
                "measured MiB".into(),
                "error".into(),
            ],
            rows,
            numeric: vec![1, 2, 3],
            notes,
        }
    })
}
