use memplan::alloc::{simulate, AllocConf, Event};
use memplan::estimate::estimate;
use memplan::method::{Job, Method};
use memplan::model::resolve_model;

fn traced(path: &str) -> Vec<Event> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut evs = vec![
        Event::Phase("base"),
        Event::Alloc {
            id: 1 << 40,
            bytes: 32 << 20,
        },
        Event::Alloc {
            id: (1 << 40) + 1,
            bytes: 32 << 20,
        },
        Event::Alloc {
            id: (1 << 40) + 2,
            bytes: 1024,
        },
    ];
    let mut ids = std::collections::HashMap::new();
    let mut next = 0u64;
    let mut phase = String::new();
    for l in text.lines() {
        let r: serde_json::Value = serde_json::from_str(l).unwrap();
        let ph = r["phase"].as_str().unwrap().to_string();
        if ph != phase {
            if phase == "model" {
                evs.push(Event::EmptyCache);
            }
            let name: &'static str = Box::leak(
                if ph == "model" {
                    "load".to_string()
                } else {
                    ph.clone()
                }
                .into_boxed_str(),
            );
            evs.push(Event::Phase(name));
            phase = ph;
        }
        let key = r["storage"].as_u64().unwrap();
        let bytes = r["bytes"].as_u64().unwrap();
        match r["event"].as_str().unwrap() {
            "alloc" => {
                next += 1;
                ids.insert(key, next);
                evs.push(Event::Alloc { id: next, bytes });
            }
            "free" => {
                if let Some(id) = ids.remove(&key) {
                    evs.push(Event::Free { id });
                }
            }
            _ => {}
        }
    }
    evs
}

#[test]
fn cmp() {
    for line in std::fs::read_to_string("/work/scratch/cmp_cases.txt")
        .unwrap()
        .lines()
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (cfg, method, b, s, gc, ev) = (f[0], f[1], f[2], f[3], f[4] == "1", f[5]);
        let (model, _) = resolve_model(cfg).unwrap();
        let mut job = Job::new(
            model,
            if method == "full" {
                Method::Full
            } else {
                Method::Lora
            },
        );
        job.batch = b.parse::<u64>().unwrap().into();
        job.seq = s.parse::<u64>().unwrap().into();
        job.grad_checkpointing = gc;
        let e = estimate(&job).unwrap();
        let mine = simulate(&e.alloc_events, &AllocConf::default(), None)
            .unwrap()
            .groundtruth_peaks()
            .unwrap();
        let tr = simulate(&traced(ev), &AllocConf::default(), None)
            .unwrap()
            .groundtruth_peaks()
            .unwrap();
        let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
        println!("CMP {:40} {method} b{b} s{s} gc{} alloc mine {:.2} traced {:.2} ({:+.1}%) | reserved mine {:.2} traced {:.2} ({:+.1}%)", cfg.rsplit('/').next().unwrap(), gc as u8, gib(mine.0), gib(tr.0), (mine.0 as f64/tr.0 as f64-1.0)*100.0, gib(mine.1), gib(tr.1), (mine.1 as f64/tr.1 as f64-1.0)*100.0);
    }
}
