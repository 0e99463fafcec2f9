//! Every architecture of `tests/data/reference/configs` (real Hugging Face config.json files of
//! models people fine-tune): accepted by `estimate` for full, LoRA and QLoRA, with
//! `params_total` equal to the meta-device parameter count of transformers 5.17 in `params.tsv`
//! (for multimodal wrappers, the whole model). GPT-2 and Falcon are refused with a one-line
//! reason.

mod common;

use std::path::Path;

use memplan::{estimate, resolve_model, Job, Method};

fn configs() -> Vec<(String, u128)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/reference/configs");
    let tsv = std::fs::read_to_string(dir.join("params.tsv")).unwrap();
    tsv.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (
                dir.join(f[0]).to_str().unwrap().to_string(),
                f[3].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_config_resolves_to_its_exact_parameter_count() {
    let mut checked = 0;
    for (path, params) in configs() {
        let name = Path::new(&path)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        if name.starts_with("gpt2") || name.starts_with("falcon-7b") {
            let e = resolve_model(&path).unwrap_err().to_string();
            assert!(
                !e.contains('\n') && e.contains("does not model"),
                "{name}: {e}"
            );
            continue;
        }
        let (shape, _) = resolve_model(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(shape.param_counts().total, params, "{name}");
        for method in [Method::Full, Method::Lora, Method::Qlora] {
            let mut job = Job::new(shape.clone(), method);
            if shape.recipe.eager_only.is_some() {
                job.attention = memplan::Attention::Eager;
            }
            let e = estimate(&job).unwrap_or_else(|e| panic!("{name} {method}: {e}"));
            assert_eq!(e.model.params_total, params, "{name} {method}");
            assert!(e.peak_allocated_bytes.0 > 0);
        }
        checked += 1;
    }
    assert_eq!(checked, 36);
}

#[test]
fn cli_refuses_gpt2_in_one_line() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/reference/configs");
    common::fails_with(
        &[
            "estimate",
            "--model",
            dir.join("gpt2.json").to_str().unwrap(),
            "--method",
            "lora",
        ],
        "Conv1D",
    );
}
