//! Per-GPU peak of FSDP2 (`fully_shard`) training steps against reference traces: rank 0 of N
//! traced with torch 2.11's FSDP2 code on a fake process group (`tests/reference/fsdp_trace.py`,
//! data and method in `tests/data/reference-fsdp/README.md`). Asserts |estimate − trace| / trace
//! of the step peak: median ≤ 1% and every case ≤ 3%, for bf16 parameters and for fp32
//! parameters under `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`. Prints the
//! per-case table (run with `--nocapture`).

use std::path::Path;

use memplan::estimate::sharding::{Engine, FsdpStrategy, Sharding};
use memplan::{estimate, resolve_model, Job, Method, Precision};
use serde_json::Value;

struct Case {
    id: String,
    job: Job,
    traced: u128,
    phase: String,
    mixed: bool,
}

fn load_cases() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/reference-fsdp");
    let text = std::fs::read_to_string(dir.join("traces.jsonl")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|r| {
            let name = match r["layers"].as_u64() {
                Some(l) => format!("{}-L{l}", r["model"].as_str().unwrap()),
                None => r["model"].as_str().unwrap().to_string(),
            };
            let cfg = dir.join(format!("configs/{name}.json"));
            let (model, _) = resolve_model(cfg.to_str().unwrap()).unwrap();
            let method = match r["method"].as_str().unwrap() {
                "full" => Method::Full,
                "lora" => Method::Lora,
                m => panic!("unknown method {m}"),
            };
            let mut job = Job::new(model, method);
            let mixed = r["mp"].as_bool().unwrap();
            if r["params"] == "fp32" {
                job.weights = Precision::Fp32;
                job.compute = if mixed {
                    Precision::Bf16
                } else {
                    Precision::Fp32
                };
            }
            job.batch = r["batch"].as_u64().unwrap().into();
            job.seq = r["seq"].as_u64().unwrap().into();
            job.grad_checkpointing = r["grad_ckpt"].as_bool().unwrap();
            let n: u128 = r["world_size"].as_u64().unwrap().into();
            // reshard_after_forward=False on the layers is SHARD_GRAD_OP.
            let strategy = if r["fsdp"]["reshard_after_forward"].as_bool().unwrap() {
                FsdpStrategy::FullShard
            } else {
                FsdpStrategy::ShardGradOp
            };
            let mut sh = Sharding::new(n, Engine::Fsdp(strategy));
            // Without a reduce dtype FSDP2 reduces in the gathered dtype (bf16 here).
            if r["fsdp"]["reduce_dtype"] == "fp32" && r["fsdp"]["param_dtype"] == "bf16" {
                sh.reduce_dtype = Some(Precision::Fp32);
            }
            // Traced both ways: the root given reshard_after_forward=True, or torch's None.
            sh.root_reshard_after_forward = r["fsdp"]
                .get("root_reshard_after_forward")
                .map_or(true, |v| v.as_bool().unwrap());
            job.sharding = Some(sh);
            Case {
                id: r["id"].as_str().unwrap().to_string(),
                job,
                traced: r["peak_bytes"].as_u64().unwrap().into(),
                phase: r["peak_phase"].as_str().unwrap().to_string(),
                mixed,
            }
        })
        .collect()
}

#[test]
fn fsdp2_per_gpu_peak_matches_the_traces() {
    let cases = load_cases();
    assert!(cases.len() >= 180, "{} traced cases", cases.len());
    let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
    println!(
        "{:<52} {:>9} {:>9} {:>7}  phase(trace/est)",
        "case", "traced", "estimate", "error"
    );
    let mut by_kind: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for c in &cases {
        let est = estimate(&c.job).unwrap();
        // The tracer counts each storage rounded to 512 B, not the allocator's blocks: compare
        // what memplan's step requests (its peak without block rounding), as tests/reference.rs.
        let e =
            est.peak_allocated_bytes.0 - est.component("block_rounding").map_or(0, |c| c.bytes.0);
        let err = (e as f64 - c.traced as f64) / c.traced as f64;
        by_kind[usize::from(c.mixed)].push(err.abs());
        println!(
            "{:<52} {:>9.3} {:>9.3} {:>+6.2}%  {}/{}",
            c.id,
            gib(c.traced),
            gib(e),
            err * 100.0,
            c.phase,
            est.peak_phase
        );
    }
    for (kind, errors) in ["bf16 parameters", "fp32 + bf16 mixed precision"]
        .iter()
        .zip(by_kind.iter_mut())
    {
        assert!(!errors.is_empty(), "{kind}: no cases");
        errors.sort_by(f64::total_cmp);
        let median = errors[errors.len() / 2];
        let worst = errors[errors.len() - 1];
        println!(
            "{kind}: {} cases, median |error| {:.2}%, worst {:.2}%",
            errors.len(),
            median * 100.0,
            worst * 100.0
        );
        assert!(median <= 0.01, "{kind}: median {:.2}% > 1%", median * 100.0);
        assert!(worst <= 0.03, "{kind}: worst {:.2}% > 3%", worst * 100.0);
    }
}
