//! Draws the sweep chart of the book's Charts chapter from Rust and prints the exact crossings.
//! `cargo run --example sweep_chart [OUT.png]`

use memplan::chart::{sweep, write_atomic, Chart, OutputFormat};
use memplan::gpu::resolve_gpu;
use memplan::{resolve_model, Job, Method};

fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "sweep.png".to_string());
    // ANCHOR: sweep
    let (model, _) = resolve_model("llama-3.1-8b")?;
    let jobs: Vec<Job> = [Method::Lora, Method::Qlora]
        .into_iter()
        .map(|m| {
            let mut job = Job::new(model.clone(), m);
            job.grad_checkpointing = true;
            job
        })
        .collect();
    let gpus = vec![resolve_gpu("rtx-4090")?, resolve_gpu("a100-40gb")?];
    let seqs: Vec<u128> = (9..=15).map(|p| 1 << p).collect(); // 512 … 32,768 tokens
    let chart = sweep(&jobs, &seqs, &[1], &gpus)?;
    for line in &chart.lines {
        for c in &line.crossings {
            println!("{}: {}", line.label, c.text); // "qlora: fits up to 8,027 tokens on rtx-4090"
        }
    }
    let format = OutputFormat::from_path(out.as_ref())?;
    write_atomic(out.as_ref(), &chart.render(format)?)?;
    // ANCHOR_END: sweep
    Ok(())
}
