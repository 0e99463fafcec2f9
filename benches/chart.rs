//! A 2,000-point sweep chart end to end: 2,000 estimates (plus the exact crossings of three GPUs)
//! and the PNG render and encode.

use criterion::{criterion_group, criterion_main, Criterion};

use memplan::chart::{png, sweep};
use memplan::gpu::resolve_gpu;
use memplan::{resolve_model, Job, Method};

fn sweep_2000_points_png(c: &mut Criterion) {
    let (model, _) = resolve_model("llama-3.1-8b").unwrap();
    let mut job = Job::new(model, Method::Qlora);
    job.grad_checkpointing = true;
    let jobs = [job];
    // 16, 32, …, 32,000 tokens: 2,000 points.
    let seqs: Vec<u128> = (1..=2000).map(|i| 16 * i).collect();
    let gpus: Vec<_> = ["rtx-4090", "a100-40gb", "h100-80gb"]
        .iter()
        .map(|g| resolve_gpu(g).unwrap())
        .collect();
    let mut g = c.benchmark_group("chart");
    g.sample_size(10);
    g.bench_function("sweep_2000_points_png", |b| {
        b.iter(|| {
            let chart = sweep(&jobs, &seqs, &[1], &gpus).unwrap();
            png(&chart).unwrap()
        })
    });
    g.bench_function("sweep_2000_points_estimates_only", |b| {
        b.iter(|| sweep(&jobs, &seqs, &[1], &gpus).unwrap())
    });
    g.finish();
}

criterion_group!(benches, sweep_2000_points_png);
criterion_main!(benches);
