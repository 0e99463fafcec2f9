//! The `memplan` binary: parse, run, print. Errors are printed with their causes.

mod cli;

use std::io::Write;

use anyhow::{bail, Result};
use clap::Parser;

use cli::{ChartKind, Cli, Command};
use memplan::chart::{self, Chart, OutputFormat};
use memplan::estimate::runtime::{pytorch_cuda, Calibration};
use memplan::{gpu, model, report};

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`memplan … | head`) is not an error.
            let _ = stdout
                .write_all(out.as_bytes())
                .and_then(|_| stdout.flush());
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> Result<String> {
    match cli.command {
        Command::Estimate(a) => {
            let job = a.job.job()?;
            let profile = match &a.calibration {
                Some(p) => pytorch_cuda().calibrated(&Calibration::load(p)?),
                None => pytorch_cuda(),
            };
            let est = memplan::estimate::estimate_with(&job, &profile)?;
            let fit = a
                .gpu
                .as_deref()
                .map(gpu::resolve_gpu)
                .transpose()?
                .map(|g| gpu::fit(&est, &g));
            Ok(report::render_estimate(
                &job,
                &est,
                fit.as_ref(),
                a.explain,
                a.format.into(),
            )?)
        }
        Command::Models(a) => Ok(report::render_models(
            model::presets::presets(),
            a.format.into(),
        )?),
        Command::Gpus(a) => Ok(report::render_gpus(gpu::gpus(), a.format.into())?),
        Command::Table(a) => {
            if !a.seed {
                bail!("`memplan table` needs --seed (the rule-of-thumb comparison table)");
            }
            Ok(report::render_seed(
                &memplan::seed::seed_table()?,
                a.format.into(),
            )?)
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
            write(&out, &bytes)
        }
        Command::Report(a) => {
            if OutputFormat::from_path(&a.out)? != OutputFormat::Html {
                bail!("--out {}: a report is an HTML page; name it *.html (charts alone: memplan chart)", a.out.display());
            }
            let gpus = cli::gpus(Some(&a.gpu))?;
            let page = report::html::review(&a.job.job()?, &gpus)?;
            write(&a.out, page.as_bytes())
        }
    }
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
