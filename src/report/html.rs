//! HTML output: a page around one chart (`memplan chart … --out x.html`) and the capacity-review
//! page of `memplan report`. Pages are self-contained: styles inline, charts as inline SVG,
//! no scripts, fonts or links to fetch, so they open offline from a mail attachment.

use crate::chart::render::thousands;
use crate::chart::values::check_value;
use crate::chart::{breakdown, palette::component_colour, svg, sweep, BreakdownChart, SweepChart};
use crate::error::Error;
use crate::estimate::Estimate;
use crate::gpu::{fit, Gpu};
use crate::method::Job;
use crate::units::Bytes;

/// How the estimator's accuracy was measured; the figures follow.
const VALIDATION_SETUP: &str = "Peak allocated memory (torch.cuda.max_memory_allocated) was compared with 75 training steps measured on one NVIDIA H200 (PyTorch 2.11, transformers 5.17, peft 0.21, bitsandbytes 0.50.2; full bf16 and fp32-AMP, LoRA and QLoRA on Llama 3.2 1B/3B, Llama 3.1 8B and a Mistral-7B-like config; several batch sizes, sequence lengths, optimizers, SDPA and eager attention, with and without checkpointing). The CUDA context was measured on that GPU and driver only. Per-case table: the book's Validation chapter (book/src/validation.md) and tests/data/ in the memplan repository.";

/// What the report says about accuracy: the figures of [`crate::accuracy`], which the book and
/// `--explain` quote too.
pub fn validation_summary() -> String {
    format!(
        "{VALIDATION_SETUP} Result: peak allocated {}; peak reserved (approximate) {}.",
        crate::accuracy::ALLOCATED_SUMMARY,
        crate::accuracy::RESERVED_SUMMARY
    )
}

const CSS: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:0 auto;padding:1rem;color:#111;line-height:1.45}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5rem 0;font-size:.95rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:.9em;height:.9em;margin-right:.4em;vertical-align:-.1em;border:1px solid #555;-webkit-print-color-adjust:exact;print-color-adjust:exact}
.fits{color:#0a6b2b;font-weight:bold}.nofit{color:#b00020;font-weight:bold}
figure{margin:1rem 0}svg{max-width:100%;height:auto}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
.chart{overflow-x:auto}.chart svg{width:100%;min-width:760px;max-width:none}
pre{white-space:pre-wrap;word-break:break-all;font-size:.8rem}
td.num,th.num{white-space:nowrap}#breakdown td:first-child{white-space:nowrap}#breakdown td:last-child{min-width:14rem}#fit td:last-child{min-width:16rem}
@media (max-width:600px){body{padding:.5rem}table{font-size:.85rem}th,td{padding:.2rem .35rem}h1{font-size:1.2rem}.bytes{display:none}}
small,.note{color:#444}
@media print{body{max-width:none;font-size:10pt}h2{break-after:avoid}figure,table{break-inside:avoid}}
";

/// Escapes text for HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<meta name=\"generator\" content=\"memplan {}\">\n<title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n",
        env!("CARGO_PKG_VERSION"),
        escape(title)
    )
}

/// An SVG document as an element inside HTML: without the XML declaration and the namespace
/// attribute (the HTML parser puts `<svg>` in the SVG namespace itself), so the page holds no
/// URL at all.
fn inline_svg(svg: &str) -> String {
    let start = svg.find("<svg").unwrap_or(0);
    svg[start..].replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1)
}

/// A page showing one chart.
pub fn chart_page(title: &str, svg: &str) -> String {
    page(
        title,
        &format!(
            "<h1>{}</h1>\n<figure>{}</figure>\n<p class=\"note\">memplan {}</p>\n",
            escape(title),
            inline_svg(svg),
            env!("CARGO_PKG_VERSION")
        ),
    )
}

/// The capacity-review page of `memplan report` for `job` against `gpus`.
pub fn review(job: &Job, gpus: &[Gpu]) -> Result<String, Error> {
    check_value("--batch", job.batch)?;
    check_value("--seq", job.seq)?;
    let bars: BreakdownChart = breakdown(std::slice::from_ref(job), gpus)?;
    let est = &bars.bars[0].estimate;
    let mut sweep_chart = sweep(
        std::slice::from_ref(job),
        &review_seqs(job.seq),
        &[job.batch],
        gpus,
    )?;
    // A narrower plot, so the chart's text is near its drawn size on a 1,100 px page.
    sweep_chart.plot_width = 560;
    let title = format!(
        "Capacity review: {} {} fine-tuning, batch {} × {} tokens, checkpointing {}",
        est.model.name,
        job.method,
        job.batch,
        job.seq,
        if job.grad_checkpointing { "on" } else { "off" }
    );
    let mut b = String::new();
    b += &format!("<h1>{}</h1>\n", escape(&title));
    b += &format!(
        "<p class=\"note\">memplan {} · peak during the {} phase · all sizes in GiB (2<sup>30</sup> bytes) unless marked as bytes</p>\n",
        env!("CARGO_PKG_VERSION"),
        escape(est.peak_phase)
    );
    b += &verdicts(job, est, gpus)?;
    b += &inputs(job, est)?;
    b += &breakdown_table(est);
    b += "<h2>Charts</h2>\n";
    b += &format!(
        "<figure id=\"breakdown-chart\"><div class=\"chart\">{}</div><figcaption>Where the memory goes at the step's peak; the bar's height is the device total.</figcaption></figure>\n",
        inline_svg(&svg(&bars)?)
    );
    b += &format!(
        "<figure id=\"sweep-chart\"><div class=\"chart\">{}</div><figcaption>Device memory against sequence length at batch {}; ringed: the longest sequence that fits each GPU, found by binary search on the estimator.</figcaption></figure>\n",
        inline_svg(&svg(&sweep_chart)?),
        job.batch
    );
    b += &sweep_summary(&sweep_chart);
    b += &assumptions(est);
    b += &format!(
        "<h2>Accuracy</h2>\n<p id=\"validation\">{}</p>\n",
        escape(&validation_summary())
    );
    b += &format!(
        "<details><summary>The estimate as JSON (<code>memplan estimate --format json</code>)</summary>\n<pre>{}</pre>\n</details>\n",
        escape(&serde_json::to_string_pretty(est).map_err(|e| Error::Unsupported(e.to_string()))?)
    );
    Ok(page(&title, &b))
}

/// Sequence lengths around the job's own: doubling from 256 (or the job's, if shorter) to
/// four times the job's (at least 16k), and the job's.
fn review_seqs(seq: u128) -> Vec<u128> {
    let lo = seq.min(256);
    let hi = (seq * 4).max(16_384);
    let mut v = vec![seq];
    let mut s = lo;
    while s < hi {
        v.push(s);
        s *= 2;
    }
    v.push(hi);
    v.sort_unstable();
    v.dedup();
    v
}

fn gib(b: Bytes) -> String {
    format!("{:.2}", b.gib())
}

fn verdicts(job: &Job, est: &Estimate, gpus: &[Gpu]) -> Result<String, Error> {
    let mut s = String::from("<h2>Fit</h2>\n");
    if gpus.is_empty() {
        s += "<p>No GPU given (<code>--gpu h100-80gb,rtx-4090</code>).</p>\n";
        return Ok(s);
    }
    s += "<div class=\"scroll\"><table id=\"fit\">\n<tr><th>GPU</th><th class=\"num\">memory</th><th class=\"num\">needs GiB</th><th>verdict</th><th class=\"num\">headroom GiB</th><th class=\"num\">used</th><th>what would fit</th></tr>\n";
    for g in gpus {
        let mut f = fit(est, g);
        if !f.fits {
            f.would_fit = crate::plan::suggest(job, g, &crate::estimate::runtime::pytorch_cuda())?;
        }
        s += &format!(
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"{}\">{}</td><td class=\"num\">{:.2}</td><td class=\"num\">{:.1}%</td><td>{}</td></tr>\n",
            escape(&g.name),
            escape(&f.gpu_memory),
            gib(est.device_bytes),
            if f.fits { "fits" } else { "nofit" },
            if f.fits { "fits" } else { "does not fit" },
            f.headroom_bytes as f64 / (1u64 << 30) as f64,
            f.utilization_pct,
            match &f.would_fit {
                Some(w) => format!("<code>{}</code> ({})", escape(&w.flags), escape(&w.device_bytes.to_string())),
                None if f.fits => String::new(),
                None => "no plan at this sequence length".into(),
            }
        );
    }
    s += "</table></div>\n<p class=\"note\">A job fits when the device total (peak reserved by PyTorch's caching allocator + CUDA context + paged optimizer state) is at most the GPU's memory. What would fit: the flags to change, from <code>memplan fit</code>'s best plan (or a smaller batch).</p>\n";
    Ok(s)
}

fn inputs(job: &Job, est: &Estimate) -> Result<String, Error> {
    let mut rows: Vec<(&str, String)> = vec![
        (
            "model",
            format!(
                "{} ({} parameters, {} trainable; {} layers, hidden {}, vocabulary {})",
                est.model.name,
                thousands(est.model.params_total),
                thousands(est.model.params_trainable),
                job.model.layers,
                job.model.hidden,
                job.model.vocab
            ),
        ),
        ("method", job.method.to_string()),
        ("base weights", job.weights.to_string()),
        ("compute (autocast)", job.compute.to_string()),
        (
            "micro-batch × sequence",
            format!("{} × {} tokens", job.batch, thousands(job.seq)),
        ),
        ("attention kernel", job.attention.to_string()),
    ];
    if job.method != crate::method::Method::Inference {
        rows.push(("optimizer", job.optimizer.to_string()));
        rows.push((
            "gradient checkpointing",
            if job.grad_checkpointing { "on" } else { "off" }.into(),
        ));
    }
    if let Some(l) = &job.lora {
        rows.push((
            "LoRA",
            format!(
                "rank {} on {}, dropout {}",
                l.rank,
                if l.targets == crate::method::all_linear() {
                    "all linear layers (all-linear)".to_string()
                } else {
                    l.targets
                        .iter()
                        .map(|t| t.module_name())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                l.dropout
            ),
        ));
    }
    if job.method == crate::method::Method::Qlora {
        rows.push((
            "double quantization",
            if job.double_quant { "on" } else { "off" }.into(),
        ));
        rows.push((
            "prepare_model_for_kbit_training",
            if job.kbit_prep { "yes" } else { "no" }.into(),
        ));
    }
    if let Some(sh) = &job.sharding {
        rows.push((
            "sharding",
            format!(
                "{} over {} GPU(s), offload {}",
                sh.engine, sh.gpus, sh.offload
            ),
        ));
    }
    let mut s = String::from("<h2>Inputs</h2>\n<div class=\"scroll\"><table id=\"inputs\">\n");
    for (k, v) in rows {
        s += &format!("<tr><th>{}</th><td>{}</td></tr>\n", escape(k), escape(&v));
    }
    s += "</table></div>\n";
    Ok(s)
}

fn breakdown_table(est: &Estimate) -> String {
    let peak = est.peak_allocated_bytes.0.max(1) as f64;
    let mut s = String::from("<h2>Breakdown at the peak</h2>\n<div class=\"scroll\"><table id=\"breakdown\">\n<tr><th>component</th><th class=\"num bytes\">bytes</th><th class=\"num\">GiB</th><th class=\"num\">% of peak allocated</th><th>accuracy</th></tr>\n");
    for c in &est.components {
        s += &format!(
            "<tr data-component=\"{n}\"><td><span class=\"swatch\" style=\"background:{col}\"></span>{n}</td><td class=\"num bytes\">{b}</td><td class=\"num\">{g}</td><td class=\"num\">{p}</td><td>{a}</td></tr>\n",
            n = escape(c.name),
            col = component_colour(c.name).hex(),
            b = c.bytes.0,
            g = gib(c.bytes),
            a = escape(c.accuracy),
            p = if c.allocated {
                format!("{:.1}", c.bytes.0 as f64 / peak * 100.0)
            } else {
                "outside the allocator".into()
            }
        );
    }
    for (name, key, b) in [
        (
            "peak allocated",
            "peak_allocated_bytes",
            est.peak_allocated_bytes,
        ),
        (
            "peak reserved",
            "peak_reserved_bytes",
            est.peak_reserved_bytes,
        ),
        ("device total", "device_bytes", est.device_bytes),
    ] {
        s += &format!(
            "<tr data-total=\"{key}\"><th>{name}</th><td class=\"num bytes\">{}</td><td class=\"num\">{}</td><td></td><td></td></tr>\n",
            b.0,
            gib(b)
        );
    }
    s += "</table></div>\n";
    s
}

fn sweep_summary(chart: &SweepChart) -> String {
    let mut s = String::from("<ul id=\"crossings\">\n");
    for line in &chart.lines {
        for c in &line.crossings {
            s += &format!("<li>{}: {}</li>\n", escape(&line.label), escape(&c.text));
        }
    }
    s += "</ul>\n";
    s
}

fn assumptions(est: &Estimate) -> String {
    let mut s = String::from(
        "<h2>Assumptions and formulas</h2>\n<p>Each component as <code>memplan estimate --explain</code> prints it: the formula with this job's numbers, and its source.</p>\n<dl id=\"formulas\">\n",
    );
    for c in &est.components {
        s += &format!(
            "<dt><span class=\"swatch\" style=\"background:{}\"></span>{}</dt><dd>{}<br><small>Accuracy: {}</small></dd>\n",
            component_colour(c.name).hex(),
            escape(c.name),
            escape(&c.explain),
            escape(c.accuracy)
        );
    }
    s += "</dl>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::resolve_gpu;
    use crate::{resolve_model, Method};

    #[test]
    fn the_review_page_is_self_contained_and_complete() {
        let (m, _) = resolve_model("llama-3.1-8b").unwrap();
        let job = Job::new(m, Method::Qlora);
        let gpus = [
            resolve_gpu("rtx-4090").unwrap(),
            resolve_gpu("4GB").unwrap(),
        ];
        let html = review(&job, &gpus).unwrap();
        let lower = html.to_ascii_lowercase();
        for banned in [
            "http:", "https:", "<script", "<link", "url(", "@import", "src=",
        ] {
            assert!(!lower.contains(banned), "page contains {banned}");
        }
        assert_eq!(html.matches("<svg").count(), 2);
        assert!(html.contains("rtx-4090") && html.contains("does not fit"));
        assert!(html.contains(env!("CARGO_PKG_VERSION")));
        assert!(html.contains("Result: peak allocated median"));
    }

    /// The summary quotes the figures of `memplan::accuracy`: allocated and reserved, median
    /// and worst.
    #[test]
    fn validation_summary_quotes_the_accuracy_figures() {
        let s = validation_summary();
        let a = format!("peak allocated {}", crate::accuracy::ALLOCATED_SUMMARY);
        let r = format!(
            "peak reserved (approximate) {}",
            crate::accuracy::RESERVED_SUMMARY
        );
        assert!(s.contains(&a) && s.contains(&r), "{s}");
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
