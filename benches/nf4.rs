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

criterion_group!(benches, dequantize);
criterion_main!(benches);
