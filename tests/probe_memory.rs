//! Memory measurements of the probe step on the CPU, with the counting allocator installed in
//! this test binary. The tests share one process-wide counter, so they run one at a time.

use std::sync::Mutex;

use memplan::model::LinearKind;
use memplan::probe::alloc::CountingAlloc;
use memplan::probe::model::ModelConfig;
use memplan::probe::{probe, Backend, ProbeOptions};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

static SERIAL: Mutex<()> = Mutex::new(());

fn tiny(nf4: bool) -> ModelConfig {
    ModelConfig {
        vocab: 256,
        hidden: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        intermediate: 256,
        tie_embeddings: false,
        rank: 8,
        alpha: 16.0,
        dropout: 0.05,
        targets: vec![
            LinearKind::Q,
            LinearKind::K,
            LinearKind::V,
            LinearKind::O,
            LinearKind::Gate,
            LinearKind::Up,
            LinearKind::Down,
        ],
        double_quant: true,
        nf4,
        batch: 2,
        seq: 32,
        seed: 42,
    }
}

fn run(model: ModelConfig, steps: usize) -> memplan::probe::ProbeReport {
    probe(&ProbeOptions {
        model,
        steps,
        lr: 1e-2,
        backend: Backend::Cpu,
    })
    .unwrap()
}

#[test]
fn explore() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for nf4 in [true, false] {
        let r = run(tiny(nf4), 4);
        eprintln!("nf4={nf4} losses {:?}", r.losses);
        eprintln!(
            "runtime {} meas {} est {} err {:.2}% steps {:?} res meas {} est {}",
            r.runtime_bytes,
            r.measured_peak_bytes,
            r.estimated_peak_bytes,
            r.error_pct,
            r.step_peak_bytes,
            r.measured_resident_bytes,
            r.estimated_resident_bytes
        );
        eprintln!("{:?}", r.estimate);
    }
}

#[test]
fn explore_phases() {
    use memplan::probe::alloc;
    use memplan::probe::graph::Candle;
    use memplan::probe::model::Decoder;
    use memplan::probe::rng::Rng;
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for nf4 in [true, false] {
        let cfg = tiny(nf4);
        let base = alloc::current();
        let g = Candle::new(candle_core::Device::Cpu);
        let model = Decoder::new(&g, &cfg).unwrap();
        let batch = model.batch(&g).unwrap();
        let mut rng = Rng::new(1);
        for _ in 0..2 {
            alloc::reset_peak();
            let r0 = alloc::current() - base;
            let loss = model.loss(&g, &batch, &mut rng).unwrap();
            let f = (alloc::current() - base, alloc::peak() - base);
            let grads = loss.backward().unwrap();
            let b = (alloc::current() - base, alloc::peak() - base);
            drop(loss);
            let d = alloc::current() - base;
            drop(grads);
            eprintln!("nf4={nf4} resident {r0} fwd(cur,peak) {f:?} bwd {b:?} after drop loss {d} after grads {}", alloc::current() - base);
        }
        let est = memplan::probe::expected::estimate_step(&cfg).unwrap();
        eprintln!("est {:?}", est);
    }
}

#[test]
fn explore_store() {
    use memplan::probe::graph::Candle;
    use memplan::probe::model::Decoder;
    use memplan::probe::rng::Rng;
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = tiny(true);
    let g = Candle::new(candle_core::Device::Cpu);
    let model = Decoder::new(&g, &cfg).unwrap();
    let batch = model.batch(&g).unwrap();
    let mut rng = Rng::new(1);
    let loss = model.loss(&g, &batch, &mut rng).unwrap();
    let grads = loss.backward().unwrap();
    let mut sizes: std::collections::BTreeMap<Vec<usize>, (usize, bool)> = Default::default();
    let mut total = 0;
    for id in grads.get_ids() {
        let t = grads.get_id(*id).unwrap();
        let e = sizes.entry(t.dims().to_vec()).or_default();
        e.0 += 1;
        e.1 = t.is_contiguous();
        total += t.elem_count() * 4;
    }
    eprintln!(
        "entries {} total {} {:?}",
        grads.get_ids().count(),
        total,
        sizes
    );
}
