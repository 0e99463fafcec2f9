//! The `memplan` binary: parse, run, print. Errors are printed with their causes.

mod cli;

use std::io::Write;

use anyhow::{bail, Result};
use clap::Parser;

use cli::{Cli, Command};
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
    }
}
