//! Speed of the estimator: one estimate, and a 1,000-configuration sweep (the work `fit` and
//! chart sweeps do). Every estimate replays its step's tensor events — each op's forward
//! intermediates and backward buffers, two steps — through the caching-allocator simulation,
//! which is most of the cost. Targets: a 70B (80-layer) QLoRA step under 20 ms (measured
//! 15 ms on a 2-core machine); the sweep under 10 s (measured 1.05 s).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use memplan::{estimate, resolve_model, Job, Method};

fn one_estimate(c: &mut Criterion) {
    let (model, _) = resolve_model("llama-3-70b").unwrap();
    let mut job = Job::new(model, Method::Qlora);
    job.batch = 4;
    job.grad_checkpointing = true;
    c.bench_function("estimate 70B qlora", |b| {
        b.iter(|| estimate(black_box(&job)).unwrap())
    });
}

fn sweep(c: &mut Criterion) {
    let models: Vec<_> = [
        "llama-3.2-1b",
        "llama-3.1-8b",
        "mistral-7b",
        "llama-3-70b",
        "mixtral-8x7b",
    ]
    .iter()
    .map(|m| resolve_model(m).unwrap().0)
    .collect();
    let mut jobs = Vec::with_capacity(1_000);
    'fill: for model in &models {
        for method in [Method::Full, Method::Lora, Method::Qlora, Method::Inference] {
            for batch in 1..=25u128 {
                for seq in [
                    256u128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072,
                ] {
                    for gc in [false, true] {
                        if jobs.len() == 1_000 {
                            break 'fill;
                        }
                        let mut j = Job::new(model.clone(), method);
                        j.batch = batch;
                        j.seq = seq;
                        j.grad_checkpointing = gc;
                        jobs.push(j);
                    }
                }
            }
        }
    }
    assert_eq!(jobs.len(), 1_000);
    let mut group = c.benchmark_group("sweep");
    group.sample_size(10);
    group.bench_function("1,000 configurations", |b| {
        b.iter(|| {
            jobs.iter()
                .map(|j| estimate(black_box(j)).unwrap().peak_allocated_bytes.0)
                .max()
        })
    });
    group.finish();
}

criterion_group!(benches, one_estimate, sweep);
criterion_main!(benches);
