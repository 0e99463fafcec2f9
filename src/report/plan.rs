//! Sheets of `memplan fit` and `memplan cost`; their JSON is the domain types themselves.

use super::{gib, render, Format, Sheet};
use crate::cost::CostEstimate;
use crate::error::Error;
use crate::plan::FitReport;

fn tokens_per_s(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |t| format!("{t:.0}"))
}

pub fn render_fit(r: &FitReport, format: Format) -> Result<String, Error> {
    render(format, r, || {
        let mut rows: Vec<Vec<String>> = r
            .plans
            .iter()
            .enumerate()
            .map(|(i, p)| {
                vec![
                    (i + 1).to_string(),
                    p.method.to_string(),
                    p.optimizer.to_string(),
                    if p.grad_checkpointing { "on" } else { "off" }.into(),
                    p.max_batch.to_string(),
                    p.max_seq.to_string(),
                    gib(p.device_bytes),
                    gib(p.headroom_bytes),
                    gib(p.cpu_offload_bytes),
                    tokens_per_s(p.tokens_per_second),
                    "fits".into(),
                ]
            })
            .collect();
        rows.extend(r.rejected.iter().map(|x| {
            vec![
                "–".into(),
                x.method.to_string(),
                x.optimizer.to_string(),
                if x.grad_checkpointing { "on" } else { "off" }.into(),
                "0".into(),
                x.max_seq.to_string(),
                gib(x.device_bytes),
                String::new(),
                String::new(),
                String::new(),
                x.reason.clone(),
            ]
        }));
        let mut notes = vec![format!(
            "{} plan(s) fit, {} rejected; {} estimates searched. max batch: largest micro-batch at seq {} (max + 1 does not fit); device GiB, headroom GiB, CPU RAM GiB and tokens/s: at max batch × that seq; max seq: longest sequence at batch 1.",
            r.plans.len(),
            r.rejected.len(),
            r.estimates_evaluated,
            r.seq
        )];
        notes.extend(r.notes.iter().cloned());
        Sheet {
            title: vec![
                format!(
                    "Plans for {} on {} × {} ({} each), seq {}",
                    r.model,
                    r.gpus,
                    r.gpu,
                    r.gpu_memory,
                    r.seq
                ),
                "Ranked by estimated tokens/s at each plan's max batch (ties: the larger max batch, then the smaller device memory); plans that do not fit at batch 1 follow, unranked.".into(),
            ],
            headers: [
                "rank",
                "method",
                "optimizer",
                "ckpt",
                "max batch",
                "max seq",
                "device GiB",
                "headroom GiB",
                "CPU RAM GiB",
                "tokens/s",
                "verdict",
            ]
            .map(String::from)
            .to_vec(),
            rows,
            numeric: vec![0, 4, 5, 6, 7, 8, 9],
            notes,
        }
    })
}

pub fn render_cost(c: &CostEstimate, format: Format) -> Result<String, Error> {
    render(format, c, || {
        let mut rows = vec![
            vec!["tokens trained".into(), c.tokens_trained.to_string()],
            vec![
                "FLOPs per token".into(),
                c.flops_per_token.total().to_string(),
            ],
            vec!["training FLOPs".into(), format!("{:.3e}", c.flops)],
            vec![
                "peak per GPU".into(),
                format!("{:.1} TFLOP/s", c.peak_flops_per_gpu / 1e12),
            ],
            vec!["wall time".into(), format!("{:.2} h", c.wall_hours)],
            vec!["GPU-hours".into(), format!("{:.2}", c.gpu_hours)],
            vec![
                "rental cost".into(),
                format!("{:.2} {}", c.cost.amount, c.cost.currency),
            ],
        ];
        if c.dequant_hours > 0.0 {
            rows.insert(
                5,
                vec![
                    "of which QLoRA dequantization".into(),
                    format!("{:.2} h", c.dequant_hours),
                ],
            );
        }
        if let Some(b) = &c.buy_vs_rent {
            rows.push(vec![
                "buying the GPUs".into(),
                format!("{:.0} {}", b.purchase.amount, b.purchase.currency),
            ]);
            rows.push(vec![
                "break-even".into(),
                format!(
                    "{:.0} GPU-hours of rental per card = {:.1} runs like this one",
                    b.break_even_gpu_hours, b.runs_to_break_even
                ),
            ]);
        }
        // First: whether the plan runs at all on the GPU it is priced on.
        rows.insert(
            0,
            vec![
                "memory per GPU".into(),
                format!(
                    "{}: {:.2} GiB of {}",
                    if c.fits { "fits" } else { "DOES NOT FIT" },
                    (c.fit.gpu_bytes.0 as i128 - c.fit.headroom_bytes) as f64 / (1u64 << 30) as f64,
                    c.fit.gpu_memory
                ),
            ],
        );
        let mut notes: Vec<String> = Vec::new();
        if !c.fits {
            notes.push(format!(
                "{}; the cost below is for a run that cannot start",
                c.fit.verdict()
            ));
            notes.extend(c.fit.advice());
        }
        notes.extend(c.assumptions.iter().map(|a| {
            format!(
                "assumption {} = {} ({}; change with {})",
                a.name, a.value, a.source, a.override_with
            )
        }));
        Sheet {
            title: vec![format!(
                "Cost of {} {} on {} × {}",
                c.model, c.method, c.gpus, c.gpu
            )],
            headers: vec!["quantity".into(), "value".into()],
            rows,
            numeric: vec![1],
            notes,
        }
    })
}
