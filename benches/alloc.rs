//! Speed of the caching-allocator replay (`memplan::alloc::simulate`) over ~10^5 events shaped
//! like training steps: per-parameter weights, then steps of forward (saved activations and
//! short-lived temporaries per layer) and backward (activations freed, gradients created).
//! Target: under 50 ms per 10^5 events (measured 25 ms default, 14 ms expandable, on a loaded
//! 2-core machine), so `fit` can replay the candidates it evaluates.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use memplan::alloc::{simulate, AllocConf, Event};

const MIB: u64 = 1 << 20;

/// A Llama-like step: `layers` decoder layers of 9 weights, 24 saved tensors and 12
/// temporaries per layer in forward; backward frees them and allocates gradients.
fn step_events(layers: u64, steps: u64) -> Vec<Event> {
    let mut events = Vec::new();
    let mut id = 0u64;
    let mut next_id = || {
        id += 1;
        id
    };
    let weights: Vec<(u64, u64)> = (0..layers * 9)
        .map(|i| {
            (
                next_id(),
                [8, 2, 2, 8, 28, 28, 28, 1, 1][(i % 9) as usize] * MIB / 2,
            )
        })
        .collect();
    events.extend(
        weights
            .iter()
            .map(|&(id, bytes)| Event::Alloc { id, bytes }),
    );
    for _ in 0..steps {
        events.push(Event::Phase("fwd"));
        let mut saved = Vec::new();
        for layer in 0..layers {
            for k in 0..24u64 {
                let bytes = (1 + (k * 7 + layer) % 13) * 3 * MIB + k * 512;
                let s = next_id();
                events.push(Event::Alloc { id: s, bytes });
                saved.push(s);
                if k % 2 == 0 {
                    let t = next_id();
                    events.push(Event::Alloc {
                        id: t,
                        bytes: bytes / 3 + 100,
                    });
                    events.push(Event::Free { id: t });
                }
            }
        }
        events.push(Event::Phase("bwd"));
        let mut grads = Vec::new();
        for chunk in saved.chunks(24).rev() {
            for &s in chunk.iter().rev() {
                let t = next_id();
                events.push(Event::Alloc {
                    id: t,
                    bytes: 5 * MIB + 4096,
                });
                events.push(Event::Free { id: s });
                events.push(Event::Free { id: t });
            }
            for &(_, bytes) in weights.iter().take(9) {
                let g = next_id();
                events.push(Event::Alloc { id: g, bytes });
                grads.push(g);
            }
        }
        events.push(Event::Phase("opt"));
        events.extend(grads.into_iter().map(|id| Event::Free { id }));
    }
    events
}

fn replay(c: &mut Criterion) {
    let events = step_events(32, 20);
    for conf in ["", "expandable_segments:True"] {
        let conf_parsed: AllocConf = conf.parse().unwrap();
        c.bench_function(
            &format!("simulate {} events alloc_conf='{conf}'", events.len()),
            |b| b.iter(|| simulate(black_box(&events), &conf_parsed, None).unwrap()),
        );
    }
}

criterion_group!(benches, replay);
criterion_main!(benches);
