//! NF4 dequantization throughput on the CPU: the inner loop of the NF4 linear op (forward and
//! backward each dequantize the whole weight once).
//!
//! Throughput is counted in bytes of fp32 output written (4 B per weight); the NF4 input is
//! 0.5 B per weight plus one absmax per 64 weights.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use memplan::probe::nf4::Nf4Matrix;
use memplan::probe::rng::Rng;

fn dequantize(c: &mut Criterion) {
    let (rows, cols) = (2048, 2048);
    let mut rng = Rng::new(1);
    let w = rng.normal_vec(rows * cols, 0.02);
    let mut group = c.benchmark_group("nf4");
    group.throughput(Throughput::Bytes((rows * cols * 4) as u64));
    for double_quant in [false, true] {
        let q = Nf4Matrix::quantize(&w, rows, cols, double_quant).unwrap();
        let mut out = vec![0f32; rows * cols];
        let absmax = q.absmax.values();
        let name = if double_quant {
            "dequantize 2048x2048 (double quant, absmax decoded each call)"
        } else {
            "dequantize 2048x2048"
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                if double_quant {
                    q.dequantize_into(black_box(&mut out));
                } else {
                    q.dequantize_with(black_box(&absmax), black_box(&mut out));
                }
            })
        });
    }
    group.finish();
}

/// The NF4 linear op at llama-3.2-1b's MLP width (128 tokens × 2048 → 8192, the gate/up
/// projections of `memplan probe --model llama-3.2-1b --seq 128`): dequantize into a temporary,
/// then candle's CPU matmul. Throughput in multiply-adds would be 128·2048·8192 = 2.1 G per call;
/// counted here, like the dequantization, in bytes of the fp32 weight (the op's temporary).
fn nf4_linear(c: &mut Criterion) {
    use candle_core::{Device, Tensor};
    use memplan::probe::nf4_linear::Nf4Linear;
    use std::sync::Arc;
    let (tokens, inf, outf) = (128, 2048, 8192);
    let mut rng = Rng::new(2);
    let w = Nf4Matrix::quantize(&rng.normal_vec(outf * inf, 0.02), outf, inf, true).unwrap();
    let op = Nf4Linear::new(Arc::new(w));
    let x = Tensor::from_vec(
        rng.normal_vec(tokens * inf, 1.0),
        (tokens, inf),
        &Device::Cpu,
    )
    .unwrap();
    let mut group = c.benchmark_group("nf4_linear");
    group.throughput(Throughput::Bytes((outf * inf * 4) as u64));
    group.sample_size(10);
    group.bench_function("forward 128x2048 -> 8192 (double quant)", |b| {
        b.iter(|| op.forward(black_box(&x)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, dequantize, nf4_linear);
criterion_main!(benches);
