//! `memplan probe` end to end on this machine's CPU (no NVIDIA driver is required; with one, the
//! NVML line lists the GPUs instead).

mod common;

use common::memplan;
use predicates::prelude::*;

#[test]
fn cpu_probe_prints_the_nvml_line_and_the_comparison() {
    memplan()
        .args(["probe", "--device", "cpu", "--steps", "3"])
        .assert()
        .success()
        .stdout(predicate::str::contains("NVML"))
        .stdout(predicate::str::contains("backend cpu"))
        .stdout(predicate::str::contains("peak of the step"))
        .stdout(predicate::str::contains("losses: "));
}

#[test]
fn json_has_the_fixed_fields() {
    let out = memplan()
        .args([
            "probe", "--device", "cpu", "--steps", "3", "--format", "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for f in ["name", "total_bytes", "free_bytes", "driver"] {
        assert!(v["device"].get(f).is_some(), "device.{f}");
    }
    assert_eq!(v["backend"], "cpu");
    assert!(v["config"]["hidden"].as_u64().unwrap() > 0);
    let measured = v["measured_peak_bytes"].as_u64().unwrap();
    let estimated = v["estimated_peak_bytes"].as_u64().unwrap();
    assert!(measured > 0 && estimated > 0);
    let err = v["error_pct"].as_f64().unwrap();
    let recomputed = (estimated as f64 - measured as f64) / measured as f64 * 100.0;
    assert!((err - recomputed).abs() < 1e-9);
    let losses = v["losses"].as_array().unwrap();
    assert_eq!(losses.len(), 3);
    assert!(losses[2].as_f64().unwrap() < losses[0].as_f64().unwrap());
}

#[test]
fn refuses_a_step_larger_than_80_percent_of_free_memory_with_the_numbers() {
    memplan()
        .args([
            "probe",
            "--device",
            "cpu",
            "--hidden",
            "8192",
            "--heads",
            "64",
            "--kv-heads",
            "8",
            "--intermediate",
            "28672",
            "--layers",
            "80",
            "--vocab",
            "128256",
            "--seq",
            "8192",
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("refusing to run"))
        .stderr(predicate::str::contains("80%"))
        .stderr(predicate::str::contains("panicked").not());
}

#[test]
fn cuda_without_the_feature_says_so() {
    if cfg!(feature = "cuda") {
        return;
    }
    memplan()
        .args(["probe", "--device", "cuda"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("panicked").not())
        .stderr(predicate::str::contains("without CUDA support"))
        .stderr(predicate::str::contains("--features cuda"));
}

#[test]
fn bad_shapes_and_cpu_calibration_are_clear_errors() {
    memplan()
        .args(["probe", "--device", "cpu", "--heads", "3"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("--heads"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cal.toml");
    memplan()
        .args([
            "probe",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--save-calibration",
        ])
        .arg(&path)
        .assert()
        .failure()
        .stderr(predicate::str::contains("--device cuda"));
}
