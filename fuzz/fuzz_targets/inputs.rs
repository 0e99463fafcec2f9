//! Fuzzes the three user files memplan parses: a `config.json` (parsed, resolved through the
//! architecture recipes, and estimated when it resolves), a `--gpu-file` TOML (merged over the
//! presets and resolved) and a `--calibration` TOML. The first byte picks the parser. Any panic,
//! overflow (debug assertions are on) or hang is a finding; an `Err` is the expected answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memplan::estimate::runtime::Calibration;
use memplan::gpu::Catalogue;
use memplan::model::HfConfig;
use memplan::{estimate, Job, Method};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 3 {
        0 => {
            let Ok(raw) = serde_json::from_str::<serde_json::Value>(text) else {
                return;
            };
            let cfg = HfConfig::from_value(raw);
            if let Ok(shape) = cfg.resolve("fuzz", std::path::Path::new("fuzz.json")) {
                for method in [Method::Full, Method::Lora, Method::Qlora, Method::Inference] {
                    let mut job = Job::new(shape.clone(), method);
                    job.grad_checkpointing = method != Method::Inference;
                    if job.validate().is_ok() {
                        if let Ok(e) = estimate(&job) {
                            assert!(e.peak_reserved_bytes >= e.peak_allocated_bytes);
                            assert!(e.device_bytes >= e.peak_reserved_bytes);
                        }
                    }
                }
            }
        }
        1 => {
            let mut c = Catalogue::default();
            if c.with_file(text, "fuzz.toml").is_ok() {
                for g in c.gpus.clone() {
                    let _ = c.resolve(&g.name);
                    assert!(g.memory().0 > 0);
                }
            }
        }
        _ => {
            let _ = Calibration::parse(text);
        }
    }
});
