//! Rendering: each text format turns a [`Sheet`] into a string; JSON serializes the domain
//! types themselves. Renderers return strings; only `main` writes.

mod csv;
pub mod html;
mod markdown;
mod plan;
mod probe;
mod table;

pub use plan::{render_cost, render_fit};

use serde::Serialize;

use crate::error::Error;
use crate::estimate::Estimate;
use crate::gpu::{Fit, Gpu};
use crate::hub::Checkpoint;
use crate::jobfile::JobFile;
use crate::method::Job;
use crate::model::presets::Preset;
use crate::seed::SeedRow;
use crate::units::Bytes;

pub use probe::render_probe;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
    Markdown,
}

/// A titled grid of cells with notes: what the text formats render.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sheet {
    pub title: Vec<String>,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Right-aligned columns (numbers).
    pub numeric: Vec<usize>,
    pub notes: Vec<String>,
}

/// A text format.
pub trait Renderer {
    fn render(&self, sheet: &Sheet) -> String;
}

fn renderer(format: Format) -> Option<Box<dyn Renderer>> {
    match format {
        Format::Table => Some(Box::new(table::TableRenderer)),
        Format::Csv => Some(Box::new(csv::CsvRenderer)),
        Format::Markdown => Some(Box::new(markdown::MarkdownRenderer)),
        Format::Json => None,
    }
}

fn json<T: Serialize + ?Sized>(value: &T) -> Result<String, Error> {
    serde_json::to_string_pretty(value)
        .map(|s| s + "\n")
        .map_err(|e| Error::Unsupported(format!("cannot serialize to JSON: {e}")))
}

fn render<T: Serialize + ?Sized>(
    format: Format,
    value: &T,
    sheet: impl FnOnce() -> Sheet,
) -> Result<String, Error> {
    match renderer(format) {
        Some(r) => Ok(r.render(&sheet())),
        None => json(value),
    }
}

fn gib(b: Bytes) -> String {
    format!("{:.2}", b.gib())
}

/// The JSON document of `memplan estimate`.
#[derive(Serialize)]
struct EstimateDoc<'a> {
    #[serde(flatten)]
    estimate: &'a Estimate,
    job: &'a Job,
    #[serde(skip_serializing_if = "Option::is_none")]
    fits: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fit: Option<&'a Fit>,
    /// The `--from` file: its format, where each setting came from, and unmodelled keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a JobFile>,
    /// The model folder's safetensors headers.
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint: Option<&'a Checkpoint>,
}

pub fn render_estimate(
    job: &Job,
    est: &Estimate,
    fit: Option<&Fit>,
    from: Option<&JobFile>,
    checkpoint: Option<&Checkpoint>,
    explain: bool,
    format: Format,
) -> Result<String, Error> {
    let doc = EstimateDoc {
        estimate: est,
        job,
        fits: fit.map(|f| f.fits),
        fit,
        from,
        checkpoint,
    };
    let sheet = || {
        let mut s = estimate_sheet(job, est, fit, explain);
        if let Some(c) = checkpoint {
            s.notes.push(c.summary());
        }
        s
    };
    match (format, from) {
        (Format::Table, Some(f)) => Ok(format!(
            "{}\n{}",
            renderer(format).map_or_else(String::new, |r| r.render(&provenance_sheet(f))),
            table::TableRenderer.render(&sheet())
        )),
        _ => render(format, &doc, sheet),
    }
}

/// Which setting came from which key of a `--from` file, which default was applied, and the
/// keys that change memory but are not modelled.
fn provenance_sheet(f: &JobFile) -> Sheet {
    Sheet {
        title: vec![format!("{} ({})", f.path.display(), f.format)],
        headers: vec!["setting".into(), "value".into(), "from".into()],
        rows: f
            .provenance
            .iter()
            .map(|p| vec![p.setting.to_string(), p.value.clone(), p.source.to_string()])
            .collect(),
        numeric: vec![],
        notes: f.warnings.iter().map(|w| format!("warning: {w}")).collect(),
    }
}

fn estimate_sheet(job: &Job, est: &Estimate, fit: Option<&Fit>, explain: bool) -> Sheet {
    let mut title = vec![
        format!(
            "{}: {} params ({} trainable), {} step",
            est.model.name, est.model.params_total, est.model.params_trainable, job.method
        ),
        format!(
            "weights {} · compute {} · batch {} × seq {} · {} attention · optimizer {}{}{}",
            job.weights,
            job.compute,
            job.batch,
            job.seq,
            job.attention,
            job.optimizer,
            match (job.method, job.grad_checkpointing) {
                (crate::method::Method::Inference, _) => "",
                (_, true) => " · checkpointing on",
                (_, false) => " · checkpointing off",
            },
            job.lora
                .as_ref()
                .map(|l| format!(" · LoRA r{} dropout {}", l.rank, l.dropout))
                .unwrap_or_default()
        ),
        format!(
            "loss {}{}{}{}",
            job.loss,
            if job.packing { " · packing" } else { "" },
            if job.activation_offload {
                " · activation offload"
            } else {
                ""
            },
            if job.liger_kernels {
                " · Liger kernels"
            } else {
                ""
            }
        ),
    ];
    title.push(format!("peak during: {}", est.peak_phase));
    let peak = est.peak_allocated_bytes.0.max(1) as f64;
    let mut headers = vec!["component".to_string(), "GiB".into(), "% of peak".into()];
    if explain {
        headers.push("formula and source".into());
    }
    let mut rows: Vec<Vec<String>> = est
        .components
        .iter()
        .map(|c| {
            let mut r = vec![
                c.name.to_string(),
                gib(c.bytes),
                if c.allocated {
                    format!("{:.1}", c.bytes.0 as f64 / peak * 100.0)
                } else {
                    "outside".into()
                },
            ];
            if explain {
                r.push(format!("{} [accuracy: {}]", c.explain, c.accuracy));
            }
            r
        })
        .collect();
    let total = |name: &str, b: Bytes, what: &str| {
        let mut r = vec![name.to_string(), gib(b), String::new()];
        if explain {
            r.push(what.to_string());
        }
        r
    };
    rows.push(total(
        "peak allocated",
        est.peak_allocated_bytes,
        "sum of the allocated components at the peak (torch.cuda.max_memory_allocated)",
    ));
    rows.push(total(
        "peak reserved",
        est.peak_reserved_bytes,
        "+ allocator reserve (torch.cuda.max_memory_reserved)",
    ));
    rows.push(total(
        "device total",
        est.device_bytes,
        "+ CUDA context + paged optimizer state (NVML / nvidia-smi used memory)",
    ));
    if let Some(f) = fit {
        // In the rows too, so CSV (which drops notes) keeps the verdict.
        let mut r = vec![
            format!("headroom on {}", f.gpu),
            format!("{:.2}", f.headroom_bytes as f64 / (1u64 << 30) as f64),
            if f.fits { "fits" } else { "does not fit" }.to_string(),
        ];
        if explain {
            r.push(format!("GPU memory {} minus device total", f.gpu_memory));
        }
        rows.push(r);
    }
    let mut notes = Vec::new();
    if let Some(f) = fit {
        notes.push(f.verdict());
        notes.extend(f.advice());
    }
    if est.host_bytes.0 > 0 {
        notes.push(format!(
            "host RAM: {} GiB of offloaded activations ({})",
            gib(est.host_bytes),
            if job.grad_checkpointing {
                "the checkpointed input of every layer"
            } else {
                "every layer's saved tensors"
            }
        ));
    }
    if let Some(s) = &est.sharding {
        notes.push(format!(
            "per GPU: {} over {} GPU(s) on {} node(s), shard group {}, offload {}; CPU RAM for offload {} GiB per node",
            s.engine,
            s.gpus,
            s.nodes,
            s.shard_group,
            s.offload,
            gib(est.cpu_offload_bytes)
        ));
        if let Some(a) = &s.advice {
            notes.push(format!("note: {a}"));
        }
    }
    notes.push(format!(
        "phase peaks: {}",
        est.phases
            .iter()
            .map(|p| format!("{} {}", p.phase, gib(p.bytes)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if explain {
        notes.push(crate::accuracy::explain_note());
    }
    Sheet {
        title,
        headers,
        rows,
        numeric: vec![1, 2],
        notes,
    }
}

pub fn render_models(presets: &[Preset], format: Format) -> Result<String, Error> {
    render(format, presets, || Sheet {
        title: vec!["Model presets (`--model NAME`, or a bare size, or a config.json path)".into()],
        headers: [
            "name", "params", "size", "layers", "hidden", "heads/kv", "vocab", "aliases",
        ]
        .map(String::from)
        .to_vec(),
        rows: presets
            .iter()
            .map(|p| {
                let s = &p.shape;
                vec![
                    p.name.clone(),
                    p.params_total.to_string(),
                    p.size.clone().unwrap_or_default(),
                    s.layers.to_string(),
                    s.hidden.to_string(),
                    format!("{}/{}", s.heads, s.kv_heads),
                    s.vocab.to_string(),
                    p.aliases.join(", "),
                ]
            })
            .collect(),
        numeric: vec![1, 3, 4, 6],
        notes: Vec::new(),
    })
}

pub fn render_gpus(gpus: &[Gpu], format: Format) -> Result<String, Error> {
    render(format, gpus, || {
        Sheet {
        title: vec!["GPU presets (`--gpu NAME`, or a size such as 24GB)".into()],
        headers: [
            "name",
            "memory GiB",
            "bf16 TFLOP/s",
            "fp16 TFLOP/s",
            "GB/s",
            "USD/GPU-h",
            "USD to buy",
            "aliases",
        ]
        .map(String::from)
        .to_vec(),
        rows: gpus
            .iter()
            .map(|g| {
                let num = |v: Option<f64>| v.map_or_else(|| "–".to_string(), |x| format!("{x}"));
                vec![
                    g.name.clone(),
                    gib(g.memory()),
                    num(g.bf16_dense_tflops),
                    num(g.fp16_dense_tflops),
                    num(g.memory_bandwidth_gb_per_s),
                    num(g.hourly_price_usd),
                    num(g.purchase_price_usd),
                    g.aliases.join(", "),
                ]
            })
            .collect(),
        numeric: vec![1, 2, 3, 4, 5, 6],
        notes: vec![
            "Dense tensor throughput (no sparsity); typical prices with their date and source: `memplan gpus --format json`, presets/README.md. Override with --gpu-file.".into(),
        ],
    }
    })
}

pub fn render_seed(rows: &[SeedRow], format: Format) -> Result<String, Error> {
    let gb = |b: Bytes| format!("{:.0}", b.0 as f64 / 1e9);
    render(format, rows, || {
        let mut headers: Vec<String> = ["size", "memplan model", "params"]
            .map(String::from)
            .to_vec();
        if let Some(r) = rows.first() {
            headers.extend(r.rules.iter().map(|(l, _, _)| format!("src {l}")));
            headers.extend(r.memplan.iter().map(|(l, _)| l.clone()));
        }
        Sheet {
            title: vec![
                "Rules of thumb, as the source states them, vs memplan — all in GB (10^9 bytes)".into(),
                "src columns: the source's rule, nominal size × bytes per parameter: load fp32 4 B/p, train fp32 16–24 B/p, 8-bit (a quarter of training) 4–6 B/p".into(),
                "memplan columns: device total (nvidia-smi) at batch 1 × 2048 tokens, SDPA, AdamW, gradient checkpointing on; load = an fp32 inference prefill; full mixed = fp32 master weights + bf16 autocast; LoRA/QLoRA r16 on all linear layers; LoRA int8 = LoRA on an 8-bit base".into(),
            ],
            numeric: (2..headers.len()).collect(),
            headers,
            rows: rows
                .iter()
                .map(|r| {
                    let mut v = vec![
                        r.size.clone(),
                        r.model.clone(),
                        format!("{:.2}B", r.params as f64 / 1e9),
                    ];
                    v.extend(r.rules.iter().map(|(_, lo, hi)| {
                        if lo == hi {
                            gb(*lo)
                        } else {
                            format!("{}–{}", gb(*lo), gb(*hi))
                        }
                    }));
                    v.extend(r.memplan.iter().map(|(_, b)| gb(*b)));
                    v
                })
                .collect(),
            notes: rows.iter().map(|r| r.note.clone()).chain([
                "memplan adds what the rules leave out: activations and logits (which grow with batch × sequence), the 16-bit layers QLoRA keeps, quantization constants, cuBLAS workspace, allocator reserve and the CUDA context.".into(),
            ]).collect(),
        }
    })
}
