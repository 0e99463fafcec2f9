//! End-to-end tests of planning: `estimate` with multi-GPU sharding and `--emit`, `memplan fit`
//! and `memplan cost` — the JSON fields scripts rely on, consistency between commands, and one
//! clear error for each kind of bad input.

mod common;

use common::{fails_with, format_json as run_json, memplan, stdout};
use predicates::prelude::*;
use serde_json::Value;
use yaml_rust2::YamlLoader;

fn u(v: &Value) -> u128 {
    v.as_u64().unwrap().into()
}

#[test]
fn estimate_per_gpu_shrinks_with_sharding_and_reports_cpu_offload() {
    let base = ["estimate", "--model", "llama-3.1-8b", "--method", "full"];
    let one = run_json(&base);
    assert_eq!(u(&one["cpu_offload_bytes"]), 0);
    let z3 = run_json(&[&base[..], &["--gpus", "8", "--zero", "3"]].concat());
    assert!(u(&z3["peak_allocated_bytes"]) < u(&one["peak_allocated_bytes"]) / 2);
    assert!(u(&z3["device_bytes"]) < u(&one["device_bytes"]));
    assert_eq!(z3["sharding"]["shard_group"], 8);
    let off = run_json(
        &[
            &base[..],
            &[
                "--gpus",
                "8",
                "--zero",
                "3",
                "--offload",
                "optimizer+params",
            ],
        ]
        .concat(),
    );
    // 8 GPUs on one node: ≈ 20 B per parameter in CPU RAM (16-bit params and gradients, fp32
    // master, Adam moments, fp32 gradients), 8,030,261,248 params.
    let cpu = u(&off["cpu_offload_bytes"]) as f64;
    assert!((cpu / (20.0 * 8_030_261_248.0) - 1.0).abs() < 1e-6, "{cpu}");
    assert!(u(&off["peak_allocated_bytes"]) < u(&z3["peak_allocated_bytes"]));
}

#[test]
fn emit_deepspeed_is_valid_json_consistent_with_the_plan() {
    let text = stdout(&[
        "estimate",
        "--model",
        "llama-3.1-8b",
        "--method",
        "full",
        "--batch",
        "2",
        "--gpus",
        "4",
        "--zero",
        "2",
        "--offload",
        "optimizer",
        "--emit",
        "deepspeed",
        "--global-batch",
        "64",
    ]);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["zero_optimization"]["stage"], 2);
    assert_eq!(v["train_micro_batch_size_per_gpu"], 2);
    assert_eq!(v["gradient_accumulation_steps"], 8); // 64 / (2 × 4)
    assert_eq!(v["train_batch_size"], 64);
    assert_eq!(v["bf16"]["enabled"], true);
    assert_eq!(v["zero_optimization"]["offload_optimizer"]["device"], "cpu");
    fails_with(
        &[
            "estimate",
            "--model",
            "8B",
            "--gpus",
            "4",
            "--zero",
            "2",
            "--emit",
            "deepspeed",
            "--global-batch",
            "30",
        ],
        "not a multiple",
    );
}

#[test]
fn emit_accelerate_is_valid_yaml_consistent_with_the_plan() {
    let text = stdout(&[
        "estimate",
        "--model",
        "70B",
        "--method",
        "qlora",
        "--grad-checkpointing",
        "--gpus",
        "2",
        "--fsdp",
        "full-shard",
        "--offload",
        "optimizer+params",
        "--emit",
        "accelerate",
    ]);
    let docs = YamlLoader::load_from_str(&text).unwrap();
    let y = &docs[0];
    assert_eq!(y["distributed_type"].as_str(), Some("FSDP"));
    assert_eq!(y["num_processes"].as_i64(), Some(2));
    assert_eq!(y["num_machines"].as_i64(), Some(1));
    assert_eq!(y["mixed_precision"].as_str(), Some("bf16"));
    assert_eq!(y["downcast_bf16"].as_str(), Some("no"));
    let f = &y["fsdp_config"];
    assert_eq!(f["fsdp_version"].as_i64(), Some(2));
    assert_eq!(f["fsdp_reshard_after_forward"].as_bool(), Some(true));
    assert_eq!(f["fsdp_offload_params"].as_bool(), Some(true));
    assert_eq!(f["fsdp_activation_checkpointing"].as_bool(), Some(true));
    assert_eq!(
        f["fsdp_transformer_layer_cls_to_wrap"].as_str(),
        Some("LlamaDecoderLayer")
    );
}

#[test]
fn emit_deepspeed_carries_the_planned_optimizer() {
    let base = [
        "estimate",
        "--model",
        "llama-3.1-8b",
        "--method",
        "full",
        "--gpus",
        "8",
        "--zero",
        "3",
        "--emit",
        "deepspeed",
    ];
    let v: Value = serde_json::from_str(&stdout(&base)).unwrap();
    assert_eq!(v["optimizer"]["type"], "AdamW");
    let v: Value = serde_json::from_str(&stdout(
        &[&base[..], &["--optimizer", "adamw-8bit"]].concat(),
    ))
    .unwrap();
    assert!(v.get("optimizer").is_none(), "{v}");
    assert!(v["_memplan"]["optimizer"]
        .as_str()
        .unwrap()
        .contains("--optim adamw_bnb_8bit"));
    fails_with(
        &[
            &base[..],
            &["--optimizer", "paged-adamw-8bit", "--offload", "optimizer"],
        ]
        .concat(),
        "DeepSpeedCPUAdam",
    );
}

#[test]
fn emit_accelerate_fsdp_versions_and_multi_node() {
    let run = |extra: &[&str]| {
        let base = [
            "estimate",
            "--model",
            "llama-3.1-8b",
            "--method",
            "full",
            "--gpus",
            "16",
            "--nodes",
            "2",
            "--emit",
            "accelerate",
        ];
        let text = stdout(&[&base[..], extra].concat());
        YamlLoader::load_from_str(&text).unwrap().remove(0)
    };
    let h = run(&["--fsdp", "hybrid-shard"]);
    assert_eq!(h["fsdp_config"]["fsdp_version"].as_i64(), Some(2));
    assert_eq!(
        h["parallelism_config"]["parallelism_config_dp_replicate_size"].as_i64(),
        Some(2)
    );
    assert_eq!(
        h["parallelism_config"]["parallelism_config_dp_shard_size"].as_i64(),
        Some(8)
    );
    assert_eq!(h["main_process_port"].as_i64(), Some(29500));
    assert!(h["main_process_ip"].as_str().is_some());
    let s = run(&["--fsdp", "shard-grad-op"]);
    assert_eq!(
        s["fsdp_config"]["fsdp_reshard_after_forward"].as_bool(),
        Some(false)
    );
    let v1 = run(&["--fsdp", "shard-grad-op", "--fsdp-version", "1"]);
    assert_eq!(
        v1["fsdp_config"]["fsdp_reshard_after_forward"].as_str(),
        Some("SHARD_GRAD_OP")
    );
    assert_eq!(v1["fsdp_config"]["fsdp_version"].as_i64(), Some(1));
    fails_with(
        &[
            "estimate",
            "--model",
            "8B",
            "--gpus",
            "2",
            "--fsdp",
            "full-shard",
            "--fsdp-version",
            "3",
        ],
        "--fsdp-version 3",
    );
}

#[test]
fn fit_json_has_the_fixed_fields_and_exact_boundaries() {
    let r = run_json(&["fit", "--model", "llama-3.1-8b", "--gpu", "rtx-4090"]);
    let plans = r["plans"].as_array().unwrap();
    assert!(!plans.is_empty());
    for p in plans {
        for key in [
            "method",
            "optimizer",
            "grad_checkpointing",
            "max_batch",
            "max_seq",
            "peak_allocated_bytes",
            "fits",
        ] {
            assert!(p.get(key).is_some(), "{key} missing in {p}");
        }
        assert_eq!(p["fits"], true);
    }
    // The first plan's max batch fits through `estimate`, and one more sample does not.
    let p = &plans[0];
    let gpu = r["gpu"].as_str().unwrap_or("rtx-4090").to_string();
    // `estimate --gpu`'s verdict: the step replayed at the card's capacity.
    let fits = |batch: u128| {
        let mut args: Vec<String> = [
            "estimate",
            "--model",
            "llama-3.1-8b",
            "--method",
            p["method"].as_str().unwrap(),
            "--optimizer",
            &p["optimizer"]
                .as_str()
                .unwrap()
                .replace("adamw8bit", "adamw-8bit"),
            "--batch",
            &batch.to_string(),
            "--gpu",
            &gpu,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if p["grad_checkpointing"] == true {
            args.push("--grad-checkpointing".into());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_json(&refs)["fit"]["fits"].as_bool().unwrap()
    };
    let max = u(&p["max_batch"]);
    assert!(fits(max));
    assert!(!fits(max + 1));

    let r = run_json(&["fit", "--model", "70B", "--gpu", "rtx-4090"]);
    assert!(r["plans"].as_array().unwrap().is_empty());
    let rejected = r["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 18);
    assert!(rejected
        .iter()
        .all(|x| x["fits"] == false && x["reason"].as_str().unwrap().contains("GiB")));
}

#[test]
fn fit_table_names_why_plans_fail() {
    memplan()
        .args(["fit", "--model", "llama-3.1-8b", "--gpu", "rtx-4090"])
        .assert()
        .success()
        .stdout(predicate::str::contains("activations"))
        .stdout(predicate::str::contains("GiB free"))
        .stdout(predicate::str::contains("fits"));
}

#[test]
fn cost_json_is_six_n_d_for_full_fine_tuning() {
    let r = run_json(&[
        "cost",
        "--model",
        "llama-3.1-8b",
        "--method",
        "full",
        "--tokens",
        "50M",
        "--epochs",
        "3",
        "--gpu",
        "h100-80gb",
        "--gpus",
        "8",
        "--price",
        "2.50",
        "--mfu",
        "0.4",
        "--no-attention-flops",
    ]);
    // N = 8,030,261,248 − 525,336,576 (input embedding lookup) = 7,504,924,672.
    let flops = 6.0 * 7_504_924_672.0 * 150e6;
    assert_eq!(r["flops"].as_f64().unwrap(), flops);
    let wall = flops / (8.0 * 989.4e12 * 0.4) / 3600.0;
    assert!((r["wall_hours"].as_f64().unwrap() - wall).abs() < 1e-9);
    assert!((r["gpu_hours"].as_f64().unwrap() - 8.0 * wall).abs() < 1e-9);
    assert!((r["cost"]["amount"].as_f64().unwrap() - 8.0 * wall * 2.5).abs() < 1e-9);
    assert_eq!(r["cost"]["currency"], "USD");
    let names: Vec<&str> = r["assumptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for n in [
        "flops_per_token",
        "peak_flops_per_gpu",
        "mfu",
        "price_per_gpu_hour",
    ] {
        assert!(names.contains(&n), "{names:?}");
    }
}

#[test]
fn cost_table_prints_every_assumption_and_the_buy_view() {
    memplan()
        .args([
            "cost",
            "--model",
            "8B",
            "--method",
            "qlora",
            "--tokens",
            "50M",
            "--epochs",
            "3",
            "--gpu",
            "h100-80gb",
            "--gpus",
            "8",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("assumption mfu = 0.4"))
        .stdout(predicate::str::contains("assumption qlora_dequant"))
        .stdout(predicate::str::contains("break-even"));
}

#[test]
fn gpu_file_overrides_a_preset_price() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("my.toml");
    std::fs::write(&path, "[[gpu]]\nname = \"h100\"\nhourly_price_usd = 1.0\n").unwrap();
    let args = [
        "cost", "--model", "8B", "--method", "full", "--tokens", "10M", "--gpu", "h100",
    ];
    let preset = run_json(&args);
    let cheap = run_json(&[&args[..], &["--gpu-file", path.to_str().unwrap()]].concat());
    let ratio =
        preset["cost"]["amount"].as_f64().unwrap() / cheap["cost"]["amount"].as_f64().unwrap();
    assert!((ratio - 2.99).abs() < 1e-9, "{ratio}");
}

#[test]
fn bad_input_gives_one_clear_error_each() {
    fails_with(
        &["estimate", "--model", "8B", "--gpus", "0", "--zero", "2"],
        "--gpus",
    );
    fails_with(
        &["fit", "--model", "8B", "--gpu", "rtx-4090", "--gpus", "0"],
        "--gpus",
    );
    fails_with(
        &[
            "cost", "--model", "8B", "--tokens", "1M", "--gpu", "h100", "--gpus", "0",
        ],
        "--gpus",
    );
    fails_with(&["estimate", "--model", "8B", "--gpus", "4"], "--zero");
    fails_with(
        &["fit", "--model", "8B", "--gpu", "rtx-4080"],
        "did you mean",
    );
    fails_with(
        &[
            "cost", "--model", "8B", "--tokens", "1M", "--gpu", "h100", "--price", "0",
        ],
        "--price",
    );
    fails_with(
        &[
            "cost", "--model", "8B", "--tokens", "1M", "--gpu", "h100", "--price", "-2",
        ],
        "--price",
    );
    fails_with(
        &["cost", "--model", "8B", "--tokens", "0", "--gpu", "h100"],
        "--tokens",
    );
    fails_with(
        &["cost", "--model", "8B", "--tokens", "-5M", "--gpu", "h100"],
        "--tokens",
    );
    fails_with(
        &[
            "cost", "--model", "8B", "--tokens", "1M", "--gpu", "h100", "--mfu", "1.5",
        ],
        "--mfu",
    );
    fails_with(
        &[
            "estimate",
            "--model",
            "8B",
            "--gpus",
            "2",
            "--fsdp",
            "full-shard",
            "--offload",
            "optimizer",
        ],
        "optimizer+params",
    );
    fails_with(
        &[
            "estimate",
            "--model",
            "8B",
            "--gpus",
            "2",
            "--zero",
            "2",
            "--offload",
            "optimizer+params",
        ],
        "--zero 3",
    );
    fails_with(
        &["estimate", "--model", "8B", "--gpus", "2", "--zero", "5"],
        "0, 1, 2 and 3",
    );
}

#[test]
fn zero3_on_one_gpu_is_allowed_and_explained() {
    memplan()
        .args(["estimate", "--model", "8B", "--zero", "3", "--gpus", "1"])
        .assert()
        .success()
        .stdout(predicate::str::contains("saves nothing"));
}

/// The verdicts of the worked example in book/src/planning.md.
#[test]
fn planning_chapter_claims_hold() {
    // One 48 GB RTX A6000: only QLoRA with checkpointing fits, at micro-batch 1.
    let r = run_json(&["fit", "--model", "llama-3-70b", "--gpu", "rtx-a6000"]);
    let plans = r["plans"].as_array().unwrap();
    assert_eq!(plans.len(), 3);
    assert!(plans
        .iter()
        .all(|p| p["method"] == "qlora" && p["grad_checkpointing"] == true && p["max_batch"] == 1));
    // Two 24 GB RTX 4090s: FSDP full-shard and ZeRO-3 do not fit without offload; FSDP with
    // optimizer+params offload does, with ~40 GiB of host RAM.
    let qlora70 = [
        "estimate",
        "--model",
        "llama-3-70b",
        "--method",
        "qlora",
        "--grad-checkpointing",
        "--gpus",
        "2",
        "--gpu",
        "rtx-4090",
    ];
    let fsdp = run_json(&[&qlora70[..], &["--fsdp", "full-shard"]].concat());
    assert_eq!(fsdp["fits"], false);
    let zero3 = run_json(&[&qlora70[..], &["--zero", "3"]].concat());
    assert_eq!(zero3["fits"], false);
    assert!(u(&zero3["device_bytes"]) < u(&fsdp["device_bytes"]));
    let off = run_json(
        &[
            &qlora70[..],
            &["--fsdp", "full-shard", "--offload", "optimizer+params"],
        ]
        .concat(),
    );
    assert_eq!(off["fits"], true);
    let cpu_gib = u(&off["cpu_offload_bytes"]) as f64 / (1u64 << 30) as f64;
    assert!((35.0..45.0).contains(&cpu_gib), "{cpu_gib}");
}
