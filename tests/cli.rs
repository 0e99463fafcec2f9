//! End-to-end tests of the `memplan` binary: the commands the README shows, JSON fields other
//! tools rely on, and one clear error (never a panic) for each kind of bad input.

mod common;

use common::{fails_with, format_json as json, memplan};
use predicates::prelude::*;

fn config(name: &str) -> String {
    format!(
        "{}/tests/data/configs/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn readme_command_prints_a_breakdown() {
    memplan()
        .args([
            "estimate", "--model", "70B", "--method", "qlora", "--rank", "16",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("llama-3-70b"))
        .stdout(predicate::str::contains("quant_constants"))
        .stdout(predicate::str::contains("peak allocated"));
}

#[test]
fn json_has_the_fixed_fields_as_integers() {
    let v = json(&[
        "estimate",
        "--model",
        "8B",
        "--method",
        "lora",
        "--gpu",
        "h100-80gb",
    ]);
    assert_eq!(v["model"]["name"], "llama-3.1-8b");
    assert_eq!(v["model"]["params_total"], 8_030_261_248u64);
    assert!(v["model"]["params_trainable"].as_u64().unwrap() > 0);
    for k in [
        "peak_allocated_bytes",
        "peak_reserved_bytes",
        "device_bytes",
    ] {
        assert!(v[k].is_u64(), "{k} is an integer");
    }
    let comps = v["components"].as_array().unwrap();
    assert!(comps
        .iter()
        .all(|c| c["name"].is_string() && c["bytes"].is_u64() && c["explain"].is_string()));
    let allocated: u64 = comps
        .iter()
        .filter(|c| c["allocated"] == true)
        .map(|c| c["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(allocated, v["peak_allocated_bytes"].as_u64().unwrap());
    assert_eq!(v["fits"], true);
}

#[test]
fn config_json_file_and_folder_are_accepted() {
    let file = config("llama3.2-1b");
    let v = json(&["estimate", "--model", &file]);
    assert_eq!(v["model"]["params_total"], 1_235_814_400u64);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&file, dir.path().join("config.json")).unwrap();
    let v = json(&["estimate", "--model", dir.path().to_str().unwrap()]);
    assert_eq!(v["model"]["params_total"], 1_235_814_400u64);
}

#[test]
fn explain_shows_formulas_and_sources() {
    memplan()
        .args([
            "estimate",
            "--model",
            "1B",
            "--method",
            "qlora",
            "--explain",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("ForCausalLMLoss"))
        .stdout(predicate::str::contains("double quantization"))
        .stdout(predicate::str::contains("approximate"));
}

#[test]
fn csv_and_markdown_render() {
    memplan()
        .args(["estimate", "--model", "1B", "--format", "csv"])
        .assert()
        .success()
        .stdout(predicate::str::starts_with("component,GiB,% of peak\n"));
    memplan()
        .args(["estimate", "--model", "1B", "--format", "markdown"])
        .assert()
        .success()
        .stdout(predicate::str::contains("| component | GiB |"));
}

#[test]
fn models_gpus_and_seed_table_list() {
    memplan()
        .args(["models"])
        .assert()
        .success()
        .stdout(predicate::str::contains("405853388800"));
    memplan()
        .args(["gpus"])
        .assert()
        .success()
        .stdout(predicate::str::contains("rtx-4090"));
    let v = json(&["table", "--seed"]);
    assert_eq!(v.as_array().unwrap().len(), 5);
}

#[test]
fn bad_input_gets_one_clear_error() {
    fails_with(
        &["estimate", "--model", "lama-3.1-8b"],
        "did you mean 'llama-3.1-8b'",
    );
    fails_with(
        &[
            "estimate",
            "--model",
            "8B",
            "--method",
            "qlora",
            "--weights",
            "fp32",
        ],
        "--weights fp32",
    );
    fails_with(
        &[
            "estimate", "--model", "8B", "--method", "lora", "--rank", "0",
        ],
        "--rank",
    );
    fails_with(&["estimate", "--model", "8B", "--batch", "0"], "--batch");
    fails_with(
        &["estimate", "--model", "8B", "--method", "sft"],
        "--method",
    );
    fails_with(
        &["estimate", "--model", "8B", "--gpu", "rtx-4080"],
        "did you mean",
    );
    fails_with(
        &["estimate", "--model", "8B", "--optimizer", "adam"],
        "--optimizer",
    );
    fails_with(
        &[
            "estimate",
            "--model",
            "8B",
            "--method",
            "full",
            "--weights",
            "nf4",
        ],
        "qlora",
    );
    fails_with(&["table"], "--seed");
    fails_with(
        &[
            "estimate",
            "--model",
            "8B",
            "--alloc-conf",
            "max_split_size_mb:8",
        ],
        "--alloc-conf",
    );
    fails_with(
        &[
            "estimate",
            "--model",
            "8B",
            "--alloc-conf",
            "expandable_segments:yes",
        ],
        "expandable_segments:True",
    );
    fails_with(
        &[
            "estimate",
            "--model",
            "8B",
            "--batch",
            "18446744073709551615",
            "--seq",
            "18446744073709551615",
        ],
        "2^32",
    );
    fails_with(
        &[
            "estimate",
            "--model",
            "8B",
            "--batch",
            "4294967296",
            "--seq",
            "4294967296",
        ],
        "2^40",
    );
}

#[test]
fn malformed_or_unsupported_configs_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{ not json").unwrap();
    fails_with(&["estimate", "--model", bad.to_str().unwrap()], "bad.json");
    let gpt2 = dir.path().join("gpt2.json");
    std::fs::write(&gpt2, r#"{"model_type": "gpt2", "n_embd": 768}"#).unwrap();
    fails_with(
        &["estimate", "--model", gpt2.to_str().unwrap()],
        "model_type",
    );
    let missing = dir.path().join("missing.json");
    std::fs::write(&missing, r#"{"model_type": "llama", "hidden_size": 64}"#).unwrap();
    fails_with(
        &["estimate", "--model", missing.to_str().unwrap()],
        "num_attention_heads",
    );
    fails_with(
        &["estimate", "--model", "/nonexistent/config.json"],
        "cannot read",
    );
}
