//! One test per case the hardening review (issue 11) found: each gives a one-line error or the
//! corrected behaviour. Grouped as the review listed them.

mod common;

use common::{fails_with, format_json, json, memplan, stdout};
use std::path::Path;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn llama_config(extra: &str) -> String {
    format!(
        r#"{{"model_type":"llama","vocab_size":32000,"hidden_size":256,"intermediate_size":512,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2{extra}}}"#
    )
}

// --- config.json bounds and overflow ---------------------------------------------------------

#[test]
fn config_fields_beyond_real_models_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (field, value) in [
        ("num_hidden_layers", "10000000"),
        ("num_hidden_layers", "1000000000"),
        ("vocab_size", "18446744073709551615"),
        ("hidden_size", "18446744073709551615"),
    ] {
        let text = llama_config("").replace(
            &format!("\"{field}\":"),
            &format!("\"{field}\":{value},\"_was\":"),
        );
        let p = write(dir.path(), "c.json", &text);
        fails_with(
            &["estimate", "--model", &p],
            &format!("`{field}` is {value}, beyond the"),
        );
    }
    let moe = r#"{"model_type":"mixtral","vocab_size":32000,"hidden_size":256,"intermediate_size":512,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "num_local_experts":1000000,"num_experts_per_tok":2}"#;
    let p = write(dir.path(), "moe.json", moe);
    fails_with(
        &["estimate", "--model", &p],
        "`num_local_experts` is 1000000, beyond the",
    );
}

#[test]
fn the_largest_bounded_model_estimates_without_overflow() {
    // Every field at its bound: the estimate is a number, reserved ≥ allocated.
    let dir = tempfile::tempdir().unwrap();
    let text = r#"{"model_type":"llama","vocab_size":1048576,"hidden_size":65536,
        "intermediate_size":262144,"num_hidden_layers":1024,"num_attention_heads":1024,
        "num_key_value_heads":1024,"head_dim":64}"#;
    let p = write(dir.path(), "huge.json", text);
    let v = format_json(&["estimate", "--model", &p, "--seq", "1M", "--batch", "64"]);
    let allocated = v["peak_allocated_bytes"].as_f64().unwrap();
    assert!(v["peak_reserved_bytes"].as_f64().unwrap() >= allocated);
    // 65536² × 4 projections alone are 1.7e10 params per layer × 1024 layers.
    assert!(v["model"]["params_total"].as_f64().unwrap() > 1e13);
}

// --- only regular files ----------------------------------------------------------------------

#[cfg(unix)]
#[test]
fn fifos_and_devices_are_refused_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    let fifo = fifo.to_str().unwrap();
    if made {
        fails_with(&["estimate", "--model", fifo], "not a regular file");
        fails_with(
            &[
                "estimate",
                "--model",
                "8B",
                "--gpu-file",
                fifo,
                "--gpu",
                "h100",
            ],
            "not a regular file",
        );
        fails_with(
            &["estimate", "--model", "8B", "--calibration", fifo],
            "not a regular file",
        );
    }
    fails_with(&["estimate", "--model", "/dev/zero"], "not a regular file");
}

// --- GPU sizes -------------------------------------------------------------------------------

#[test]
fn gpu_sizes_need_a_unit_and_are_bounded() {
    fails_with(
        &["estimate", "--model", "8B", "--gpu", "24"],
        "such as 24GB (10^9 bytes) or 24GiB (2^30 bytes)",
    );
    fails_with(&["estimate", "--model", "8B", "--gpu", "1B"], "24GB");
    fails_with(
        &["estimate", "--model", "8B", "--gpu", "19342813113834067TB"],
        "between 256MiB and 64TiB",
    );
    let gb = format_json(&["estimate", "--model", "1B", "--gpu", "24GB"]);
    assert_eq!(gb["fit"]["gpu_bytes"], 24_000_000_000u64);
    assert_eq!(gb["fit"]["gpu_memory"], "24.00 GB");
    let gib = format_json(&["estimate", "--model", "1B", "--gpu", "24GiB"]);
    assert_eq!(gib["fit"]["gpu_bytes"], 24u64 << 30);
    assert_eq!(gib["fit"]["gpu_memory"], "24.00 GiB");
    let text = stdout(&["estimate", "--model", "1B", "--gpu", "24GB"]);
    assert!(text.contains("FITS on 24GB (24.00 GB)"), "{text}");
}

// --- cost ------------------------------------------------------------------------------------

#[test]
fn cost_inputs_are_bounded_and_results_finite() {
    let base = [
        "cost", "--model", "8B", "--method", "qlora", "--gpu", "h100", "--tokens", "50M",
    ];
    for (flag, value, needle) in [
        ("--mfu", "5e-324", "between 0.01 and 1"),
        ("--peak-tflops", "1e300", "between 0.001 and 100000"),
        ("--epochs", "1e-300", "between 0.001 and 1000"),
    ] {
        let mut args = base.to_vec();
        args.extend([flag, value]);
        fails_with(&args, needle);
    }
    fails_with(
        &[
            "cost", "--model", "8B", "--gpu", "h100", "--tokens", "1e300",
        ],
        "at most 1e15",
    );
    let v = json(&[
        "cost", "--model", "8B", "--method", "qlora", "--gpu", "h100", "--tokens", "1e15",
        "--epochs", "1000", "--format", "json",
    ]);
    for k in ["flops", "wall_hours", "gpu_hours"] {
        assert!(v[k].as_f64().is_some_and(f64::is_finite), "{k}: {}", v[k]);
    }
}

#[test]
fn cost_says_when_the_plan_does_not_fit_its_gpu() {
    let args = [
        "cost", "--model", "70B", "--method", "full", "--gpu", "rtx-4090", "--tokens", "50M",
    ];
    let text = stdout(&args);
    // 70B full fine-tuning needs ~660 GiB.
    assert!(
        text.contains("DOES NOT FIT: 65") || text.contains("DOES NOT FIT: 66"),
        "{text}"
    );
    assert!(
        text.contains("the cost below is for a run that cannot start"),
        "{text}"
    );
    let v = format_json(&args);
    assert_eq!(v["fits"], false);
    let ok = format_json(&[
        "cost", "--model", "8B", "--method", "qlora", "--gpu", "h100", "--tokens", "50M",
    ]);
    assert_eq!(ok["fits"], true);
}

// --- calibration files -----------------------------------------------------------------------

#[test]
fn calibration_files_are_strict_and_errors_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = |p: &str| ["estimate", "--model", "8B", "--calibration", p].map(String::from);
    let check = |text: &str, needle: &str| {
        let p = write(dir.path(), "cal.toml", text);
        let args = run(&p);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&args, needle);
        let out = memplan().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(!err.contains("config.json"), "{err}");
    };
    check("", "sets neither cuda_context_bytes nor workspace_bytes");
    check(
        "cuda_context_byte = 500000000\n",
        "not a valid calibration file: unknown field `cuda_context_byte`",
    );
    check("cuda_context_bytes = \n", "(line 1, column 22)");
    let p = write(dir.path(), "ok.toml", "cuda_context_bytes = 500000000\n");
    let v = format_json(&["estimate", "--model", "8B", "--calibration", &p]);
    let context = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "cuda_context")
        .unwrap()["bytes"]
        .clone();
    assert_eq!(context, 500_000_000u64);
}

// --- bare sizes ------------------------------------------------------------------------------

fn device(model: &str, method: &str) -> u64 {
    format_json(&["estimate", "--model", model, "--method", method])["device_bytes"]
        .as_u64()
        .unwrap()
}

#[test]
fn bare_sizes_are_monotone_one_model_per_size_and_take_t() {
    for (small, large) in [
        ("4B", "5B"),
        ("20B", "30B"),
        ("40B", "47B"),
        ("150B", "200B"),
    ] {
        for method in ["full", "lora", "qlora"] {
            assert!(
                device(small, method) <= device(large, method),
                "{method}: {small} needs more than {large}"
            );
        }
    }
    let name = |m: &str| format_json(&["estimate", "--model", m])["model"]["name"].clone();
    assert_eq!(name("7B"), name("7.0B"));
    assert_eq!(name("7B"), name("7000M"));
    assert_eq!(name("7B"), "synthetic-7B");
    assert_eq!(name("1T"), "synthetic-1T");
    stdout(&["estimate", "--model", "100T"]);
    fails_with(&["estimate", "--model", "101T"], "between 10M and 100T");
}

// --- flag values -----------------------------------------------------------------------------

#[test]
fn negative_numbers_and_zero_stages_say_what_is_expected() {
    for flag in ["--batch", "--seq", "--rank"] {
        fails_with(
            &["estimate", "--model", "8B", "--method", "lora", flag, "-1"],
            "expects a positive",
        );
    }
    fails_with(
        &["estimate", "--model", "8B", "--gpus", "2", "--zero", "256"],
        "expects a ZeRO stage 0–3",
    );
    // --seq takes 4k as --tokens takes 50M.
    let v = format_json(&["estimate", "--model", "1B", "--seq", "4k"]);
    assert_eq!(v["job"]["seq"], 4096);
}

// --- defaults and verdicts -------------------------------------------------------------------

#[test]
fn the_headline_qlora_70b_step_is_checkpointed_by_default() {
    let text = stdout(&[
        "estimate", "--model", "70B", "--method", "qlora", "--rank", "16",
    ]);
    assert!(text.contains("· checkpointing on"), "{text}");
    let v = format_json(&[
        "estimate", "--model", "70B", "--method", "qlora", "--rank", "16",
    ]);
    assert_eq!(v["job"]["grad_checkpointing"], true);
    let gib = v["device_bytes"].as_f64().unwrap() / (1u64 << 30) as f64;
    // The 'QLoRA 70B on a 48 GB card' step: ~47 GiB on the device, not 146.
    assert!((45.0..48.0).contains(&gib), "{gib}");
    let off = format_json(&[
        "estimate",
        "--model",
        "70B",
        "--method",
        "qlora",
        "--no-grad-checkpointing",
    ]);
    assert_eq!(off["job"]["grad_checkpointing"], false);
    assert!(off["device_bytes"].as_f64().unwrap() / (1u64 << 30) as f64 > 100.0);
    let text = stdout(&[
        "estimate",
        "--model",
        "70B",
        "--method",
        "qlora",
        "--no-grad-checkpointing",
    ]);
    assert!(text.contains("· checkpointing off"), "{text}");
}

#[test]
fn a_plan_that_does_not_fit_says_what_would_and_check_exits_3() {
    let args = [
        "estimate", "--model", "8B", "--method", "full", "--gpu", "rtx-4090",
    ];
    let text = stdout(&args);
    assert!(
        text.contains("DOES NOT FIT on rtx-4090 (23.99 GiB)"),
        "{text}"
    );
    assert!(text.contains("would fit: --method "), "{text}");
    let v = format_json(&args);
    assert_eq!(v["fits"], false);
    // 8B full fine-tuning needs ~77 GiB: only an adapter method fits 24 GB.
    let method = v["fit"]["would_fit"]["method"].as_str().unwrap();
    assert!(method == "lora" || method == "qlora", "{method}");
    // The suggestion fits when run.
    let flags: Vec<String> = v["fit"]["would_fit"]["flags"]
        .as_str()
        .unwrap()
        .split(' ')
        .map(String::from)
        .collect();
    let mut again: Vec<&str> = vec![
        "estimate", "--model", "8B", "--method", "full", "--gpu", "rtx-4090",
    ];
    again.extend(flags.iter().map(String::as_str));
    assert_eq!(format_json(&again)["fits"], true);

    let mut check = args.to_vec();
    check.push("--check");
    let out = memplan().args(&check).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("DOES NOT FIT"));
    let out = memplan()
        .args([
            "estimate", "--model", "1B", "--method", "qlora", "--gpu", "h100", "--check",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    fails_with(&["estimate", "--model", "1B", "--check"], "--gpu");
}

#[test]
fn csv_keeps_the_verdict() {
    let csv = stdout(&[
        "estimate", "--model", "8B", "--method", "full", "--gpu", "rtx-4090", "--format", "csv",
    ]);
    let last = csv.lines().last().unwrap();
    assert!(
        last.starts_with("headroom on rtx-4090,-") && last.ends_with(",does not fit"),
        "{csv}"
    );
}

// --- seed table ------------------------------------------------------------------------------

#[test]
fn seed_table_shows_the_source_as_it_stands() {
    let text = stdout(&["table", "--seed"]);
    let row = |size: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("│ {size} ")))
            .unwrap_or_else(|| panic!("no {size} row in\n{text}"))
            .to_string()
    };
    let r7 = row("7B");
    for figure in ["28", "112–168", "28–42"] {
        assert!(r7.contains(&format!(" {figure} ")), "{figure}: {r7}");
    }
    assert!(row("140B").contains(" 2240–3360 "));
    assert!(text.contains("GB (10^9 bytes)"));
    assert!(text.lines().any(|l| l.starts_with("7B: load fp32")));
}

// --- completions, man page, help -------------------------------------------------------------

#[test]
fn completions_and_man_page() {
    let bash = stdout(&["completions", "bash"]);
    assert!(bash.contains("_memplan()") && bash.contains("--grad-checkpointing"));
    for shell in ["zsh", "fish", "powershell"] {
        assert!(stdout(&["completions", shell]).contains("memplan"));
    }
    let man = stdout(&["man"]);
    assert!(
        man.starts_with(".ie") || man.contains(".TH memplan"),
        "{}",
        &man[..200]
    );
}

#[test]
fn cost_help_offers_only_training_methods() {
    let help = stdout(&["cost", "--help"]);
    let method = help
        .lines()
        .skip_while(|l| !l.contains("--method"))
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(method.contains("full, lora or qlora"), "{method}");
    fails_with(
        &[
            "cost",
            "--model",
            "8B",
            "--method",
            "inference",
            "--gpu",
            "h100",
            "--tokens",
            "1M",
        ],
        "prices training",
    );
}

#[test]
fn the_readme_headline_shows_a_plan_that_fits() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let cmd = "estimate --model 70B --method qlora --rank 16 --gpu rtx-a6000";
    assert!(readme.contains(&format!("cargo run --release -- {cmd}")));
    let args: Vec<&str> = cmd.split(' ').collect();
    let text = stdout(&args);
    assert!(text.contains("FITS on rtx-a6000"), "{text}");
    // The README shows this command's output as it is.
    assert!(
        readme.contains(&text),
        "README's example output is out of date:\n{text}"
    );
}

#[test]
fn sweep_legend_says_one_sample() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sweep.svg");
    stdout(&[
        "chart",
        "sweep",
        "--model",
        "8B",
        "--method",
        "lora",
        "--seq",
        "4096",
        "--batch",
        "1..8",
        "--gpu",
        "rtx-4090",
        "--out",
        out.to_str().unwrap(),
    ]);
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.contains("fits up to 1 sample on rtx-4090"), "{svg}");
    assert!(!svg.contains("1 samples"));
}

#[test]
fn fit_reports_every_column_at_one_plan_point_and_states_its_ranking() {
    let text = stdout(&["fit", "--model", "8B", "--gpu", "rtx-4090"]);
    assert!(text.contains("Ranked by estimated tokens/s"), "{text}");
    assert!(text.contains("at max batch × that seq"), "{text}");
    let v = format_json(&["fit", "--model", "8B", "--gpu", "rtx-4090"]);
    // The device column is the estimate at the plan's max batch, the point of every column.
    for p in v["plans"].as_array().unwrap().iter().take(3) {
        let batch = p["max_batch"].to_string();
        let ckpt = if p["grad_checkpointing"] == true {
            "--grad-checkpointing"
        } else {
            "--no-grad-checkpointing"
        };
        let args = [
            "estimate",
            "--model",
            "8B",
            "--gpu",
            "rtx-4090",
            "--batch",
            &batch,
            "--method",
            p["method"].as_str().unwrap(),
            "--optimizer",
            p["optimizer"].as_str().unwrap(),
            ckpt,
        ];
        let e = format_json(&args);
        assert_eq!(e["device_bytes"], p["device_bytes"], "{args:?}");
        assert_eq!(e["fits"], true, "{args:?}");
    }
    for r in v["rejected"].as_array().unwrap() {
        let reason = r["reason"].as_str().unwrap();
        assert!(!reason.contains("24.0 GiB"), "{reason}");
    }
}

#[test]
fn check_exits_3_for_a_job_file_that_does_not_fit() {
    let file = format!("{}/examples/trl-sft.yaml", env!("CARGO_MANIFEST_DIR"));
    let out = memplan()
        .args(["estimate", "--from", &file, "--gpu", "8GB", "--check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let out = memplan()
        .args(["estimate", "--from", &file, "--gpu", "h200", "--check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}
