//! The `memplan` binary: parse, run, print. Errors are printed with their causes.

mod cli;

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser};

use cli::{ChartKind, Cli, Command};
use memplan::chart::{self, Chart, OutputFormat};
use memplan::estimate::runtime::{pytorch_cuda, Calibration};
use memplan::gpu::Catalogue;
use memplan::plan::emit;
use memplan::{cost, gpu, model, plan, report};

/// Counts heap bytes so `memplan probe` can measure a step's peak on the CPU.
#[global_allocator]
static ALLOC: memplan::probe::alloc::CountingAlloc = memplan::probe::alloc::CountingAlloc;

/// Exit status of `estimate --check` when the plan does not fit (1 is an error, 2 a usage error).
const EXIT_DOES_NOT_FIT: i32 = 3;

/// What a command prints, and whether `--check` failed.
struct Outcome {
    text: String,
    does_not_fit: bool,
}

impl From<String> for Outcome {
    fn from(text: String) -> Outcome {
        Outcome {
            text,
            does_not_fit: false,
        }
    }
}

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`memplan … | head`) is not an error.
            let _ = stdout
                .write_all(out.text.as_bytes())
                .and_then(|_| stdout.flush());
            if out.does_not_fit {
                std::process::exit(EXIT_DOES_NOT_FIT);
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> Result<Outcome> {
    let text = match cli.command {
        Command::Estimate(a) => {
            let resolved = a.job.resolve()?;
            let mut job = resolved.job;
            job.sharding = a.shard.sharding()?;
            job.validate()?;
            match a.emit {
                Some(cli::Emit::Deepspeed) => {
                    return Ok(emit::deepspeed_config(&job, a.global_batch.map(u128::from))?.into())
                }
                Some(cli::Emit::Accelerate) => {
                    return Ok(
                        emit::accelerate_config(&job, a.global_batch.map(u128::from))?.into(),
                    )
                }
                None => {}
            }
            let profile = match &a.calibration {
                Some(p) => pytorch_cuda().calibrated(&Calibration::load(p)?),
                None => pytorch_cuda(),
            };
            let est = memplan::estimate::estimate_with(&job, &profile)?;
            let catalogue = Catalogue::load(a.gpu_file.as_deref())?;
            let fit = a
                .gpu
                .as_deref()
                .map(|g| catalogue.resolve(g))
                .transpose()?
                .map(|g| {
                    let mut f = gpu::fit(&est, &g);
                    if !f.fits {
                        f.would_fit = plan::suggest(&job, &g, &profile)?;
                    }
                    Ok::<_, memplan::Error>(f)
                })
                .transpose()?;
            let text = report::render_estimate(
                &job,
                &est,
                fit.as_ref(),
                resolved.from.as_ref(),
                resolved.checkpoint.as_ref(),
                a.explain,
                a.format.into(),
            )?;
            return Ok(Outcome {
                text,
                does_not_fit: a.check && fit.is_some_and(|f| !f.fits),
            });
        }
        Command::Models(a) => report::render_models(model::presets::presets(), a.format.into())?,
        Command::Gpus(a) => report::render_gpus(gpu::gpus(), a.format.into())?,
        Command::Probe(a) => {
            let report = memplan::probe::probe(&a.options()?)?;
            if let Some(path) = &a.save_calibration {
                let Some(cal) = &report.calibration else {
                    bail!("--save-calibration needs a CUDA run (--device cuda): the calibration holds the measured CUDA context size, and the CPU has none");
                };
                std::fs::write(path, cal.to_toml())
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            let format = match a.format {
                cli::ProbeFormat::Table => report::Format::Table,
                cli::ProbeFormat::Json => report::Format::Json,
            };
            report::render_probe(&report, format)?
        }
        Command::Table(a) => {
            if !a.seed {
                bail!("`memplan table` needs --seed (the rule-of-thumb comparison table)");
            }
            report::render_seed(&memplan::seed::seed_table()?, a.format.into())?
        }
        Command::Chart(a) => {
            let (out, bytes) = match a.kind {
                ChartKind::Breakdown(b) => {
                    let format = OutputFormat::from_path(&b.out)?;
                    let gpus = cli::gpus(b.gpu.as_deref())?;
                    let c = chart::breakdown(&b.jobs()?, &gpus)?;
                    (b.out, c.render(format)?)
                }
                ChartKind::Sweep(s) => {
                    let format = OutputFormat::from_path(&s.out)?;
                    let gpus = cli::gpus(s.gpu.as_deref())?;
                    let i = s.input()?;
                    let c = chart::sweep(&i.jobs, &i.seqs, &i.batches, &gpus)?;
                    (s.out, c.render(format)?)
                }
            };
            write(&out, &bytes)?
        }
        Command::Report(a) => {
            if OutputFormat::from_path(&a.out)? != OutputFormat::Html {
                bail!("--out {}: a report is an HTML page; name it *.html (charts alone: memplan chart)", a.out.display());
            }
            let gpus = cli::gpus(Some(&a.gpu))?;
            let page = report::html::review(&a.job.job()?, &gpus)?;
            write(&a.out, page.as_bytes())?
        }
        Command::Fit(a) => {
            let gpu = Catalogue::load(a.gpu_file.as_deref())?.resolve(&a.gpu)?;
            let mut req = plan::FitRequest::new(a.base()?, gpu, pytorch_cuda());
            req.mfu = a.mfu;
            report::render_fit(&plan::fit(&req)?, a.format.into())?
        }
        Command::Cost(a) => {
            let gpu = Catalogue::load(a.gpu_file.as_deref())?.resolve(&a.gpu)?;
            let req = cost::CostRequest {
                job: a.job.job()?,
                gpu,
                gpus: a.gpus()?,
                tokens: a.tokens()?,
                epochs: a.epochs,
                mfu: a.mfu,
                price: a.price,
                purchase_price: a.purchase_price,
                currency: a.currency.clone(),
                peak_tflops: a.peak_tflops,
                attention_flops: !a.no_attention_flops,
                dequant_overhead: !a.no_dequant_overhead,
            };
            report::render_cost(&cost::cost(&req)?, a.format.into())?
        }
        Command::Completions(a) => {
            let mut buf = Vec::new();
            clap_complete::generate(a.shell, &mut cli::Cli::command(), "memplan", &mut buf);
            String::from_utf8(buf).context("completion script is UTF-8")?
        }
        Command::Man => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(cli::Cli::command())
                .render(&mut buf)
                .context("cannot render the man page")?;
            String::from_utf8(buf).context("man page is UTF-8")?
        }
    };
    Ok(text.into())
}

/// The one place a command writes a file; it prints where.
fn write(path: &std::path::Path, bytes: &[u8]) -> Result<String> {
    chart::write_atomic(path, bytes)?;
    Ok(format!(
        "wrote {} ({} bytes)\n",
        path.display(),
        bytes.len()
    ))
}
