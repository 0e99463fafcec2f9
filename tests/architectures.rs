//! Every architecture of `tests/data/reference/configs` (real Hugging Face config.json files of
//! models people fine-tune): accepted by `estimate` for full, LoRA and QLoRA, with
//! `params_total` equal to the meta-device parameter count of transformers 5.17 in `params.tsv`
//! (for multimodal wrappers, the whole model). GPT-2 and Falcon are refused with a one-line
//! reason.

mod common;

use std::path::Path;

use memplan::method::parse_targets;
use memplan::{estimate, resolve_model, Job, Method};

fn config(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/reference/configs")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

/// LoRA r16 on `target_modules="all-linear"`, dropout 0: trainable parameters as peft 0.21
/// reports them for transformers 5.17 (`get_peft_model` on the meta device): ParamWrapper on
/// Mixtral's, Qwen3-MoE's and DeepSeek's fused experts (2r on gate_up_proj) and router; no
/// adapter on DeepSeek's dense MLP and shared experts; SigLIP's Linear layers in Gemma 3; only
/// attention in gpt-oss.
#[test]
fn all_linear_reaches_what_peft_reaches() {
    for (file, peft) in [
        ("mixtral-8x7b-instruct-v0.1.json", 359_665_664u128),
        ("qwen3-30b-a3b.json", 996_507_648),
        ("deepseek-v2-lite.json", 358_994_944),
        ("gemma-3-4b-it.json", 38_497_792),
        ("gpt-oss-20b.json", 7_962_624),
    ] {
        let (shape, _) = resolve_model(&config(file)).unwrap();
        let mut job = Job::new(shape, Method::Lora);
        job.lora.as_mut().unwrap().dropout = 0.0;
        let e = estimate(&job).unwrap();
        assert_eq!(e.model.params_trainable, peft, "{file}");
    }
}

/// Where peft 0.21 itself fails, memplan says so in one line.
#[test]
fn peft_refusals_are_one_line_errors() {
    let mixtral = config("mixtral-8x7b-instruct-v0.1.json");
    common::fails_with(
        &["estimate", "--model", &mixtral, "--method", "qlora"],
        "lora.ParamWrapper does not work with lora_dropout != 0",
    );
    let phimoe = config("phi-3.5-moe-instruct.json");
    common::fails_with(
        &["estimate", "--model", &phimoe, "--method", "lora"],
        "nn.Linear subclass",
    );
    let v3 = config("deepseek-v3.json");
    common::fails_with(
        &[
            "estimate",
            "--model",
            &v3,
            "--method",
            "lora",
            "--lora-targets",
            "q_proj,v_proj",
        ],
        "selects no module",
    );
}

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
            if let Some(l) = job.lora.as_mut() {
                // What peft itself requires (each refusal is tested below).
                if shape.recipe.peft_moe_conversion {
                    l.dropout = 0.0;
                }
                if shape.recipe.subclass_router().is_some() {
                    l.targets = parse_targets("attention,mlp").unwrap();
                }
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
