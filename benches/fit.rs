//! Speed of `memplan fit`: the full search (3 methods × 3 optimizers × checkpointing, each with
//! exact max-batch and max-sequence searches) for one model and GPU. Target: well under a second.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use memplan::estimate::runtime::pytorch_cuda;
use memplan::gpu::resolve_gpu;
use memplan::plan::{fit, FitRequest};
use memplan::{resolve_model, Job, Method};

fn search(c: &mut Criterion, model: &str, gpu: &str) {
    let (shape, _) = resolve_model(model).unwrap();
    let base = Job::new(shape, Method::Lora);
    let req = FitRequest::new(base, resolve_gpu(gpu).unwrap(), pytorch_cuda());
    let n = fit(&req).unwrap().estimates_evaluated;
    c.bench_function(&format!("fit {model} on {gpu} ({n} estimates)"), |b| {
        b.iter(|| fit(black_box(&req)).unwrap())
    });
}

fn fit_searches(c: &mut Criterion) {
    search(c, "llama-3.1-8b", "rtx-4090");
    search(c, "llama-3-70b", "h100");
    search(c, "llama-3.2-1b", "h200");
}

criterion_group!(benches, fit_searches);
criterion_main!(benches);
