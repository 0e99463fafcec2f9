//! `--from FILE` (axolotl, LLaMA-Factory, TRL, torchtune), models from the local Hugging Face
//! cache, and the loss / offload switches those files turn on.

mod common;

use std::path::Path;

use common::{fails_with, memplan};
use serde_json::Value;

/// Runs with an empty Hugging Face cache, so presets (not whatever this machine has cached)
/// resolve the examples' Hub ids.
fn run(args: &[&str]) -> Value {
    let cache = tempfile::tempdir().unwrap();
    run_in(cache.path(), args)
}

fn run_in(hf_home: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--format", "json"]);
    let out = memplan()
        .args(&all)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env("HF_HOME", hf_home)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn peak(v: &Value) -> u64 {
    v["peak_allocated_bytes"].as_u64().unwrap()
}

fn component(v: &Value, name: &str) -> u64 {
    v["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .map_or(0, |c| c["bytes"].as_u64().unwrap())
}

/// The keys the provenance rows name.
fn keys_used(v: &Value) -> String {
    v["from"]["provenance"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["source"]["detail"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

#[test]
fn axolotl_example_equals_its_flags_and_names_every_key() {
    let file = run(&["estimate", "--from", "examples/axolotl-qlora.yml"]);
    let flags = run(&[
        "estimate",
        "--model",
        "meta-llama/Llama-3.1-8B",
        "--method",
        "qlora",
        "--batch",
        "2",
        "--seq",
        "4096",
        "--rank",
        "32",
        "--lora-dropout",
        "0.05",
        "--lora-targets",
        "all-linear",
        "--optimizer",
        "paged-adamw-8bit",
        "--grad-checkpointing",
        "--attention",
        "flash",
        "--packing",
    ]);
    assert_eq!(peak(&file), peak(&flags));
    assert_eq!(file["job"], flags["job"]);
    let used = keys_used(&file);
    for key in [
        "base_model",
        "adapter",
        "load_in_4bit",
        "micro_batch_size",
        "sequence_len",
        "bf16",
        "lora_r",
        "lora_dropout",
        "lora_target_linear",
        "optimizer",
        "gradient_checkpointing",
        "flash_attention",
        "sample_packing",
    ] {
        assert!(used.contains(key), "{key} missing from {used}");
    }
    assert_eq!(file["from"]["format"], "axolotl");
}

#[test]
fn llamafactory_example_equals_its_flags() {
    let file = run(&["estimate", "--from", "examples/llamafactory-lora.yaml"]);
    // LLaMA-Factory defaults: checkpointing on (disable_gradient_checkpointing false),
    // lora_dropout 0.0, transformers' adamw_torch_fused.
    let flags = run(&[
        "estimate",
        "--model",
        "Qwen/Qwen2.5-7B",
        "--method",
        "lora",
        "--batch",
        "2",
        "--seq",
        "2048",
        "--rank",
        "16",
        "--lora-dropout",
        "0",
        "--optimizer",
        "adamw-fused",
        "--grad-checkpointing",
    ]);
    assert_eq!(peak(&file), peak(&flags));
    assert_eq!(file["job"], flags["job"]);
    let used = keys_used(&file);
    for key in [
        "model_name_or_path",
        "finetuning_type",
        "lora_rank",
        "lora_target",
        "cutoff_len",
        "per_device_train_batch_size",
        "bf16",
    ] {
        assert!(used.contains(key), "{key} missing from {used}");
    }
}

#[test]
fn trl_example_equals_its_flags_and_gets_trls_defaults() {
    let file = run(&["estimate", "--from", "examples/trl-sft.yaml"]);
    let flags = run(&[
        "estimate",
        "--model",
        "meta-llama/Llama-3.1-8B",
        "--method",
        "lora",
        "--batch",
        "4",
        "--seq",
        "4096",
        "--rank",
        "16",
        "--lora-dropout",
        "0.05",
        "--optimizer",
        "adamw-fused",
        "--grad-checkpointing",
        "--loss",
        "chunked-nll",
    ]);
    assert_eq!(peak(&file), peak(&flags));
    // No loss key, no gradient_checkpointing, no bf16 in the file: TRL's defaults.
    assert_eq!(file["job"]["loss"], "chunked-nll");
    assert_eq!(file["job"]["grad_checkpointing"], true);
    assert_eq!(file["job"]["compute"], "bf16");
    let used = keys_used(&file);
    for key in [
        "model_name_or_path",
        "use_peft",
        "lora_r",
        "lora_target_modules",
        "max_length",
        "per_device_train_batch_size",
        "dtype",
        "sft_config.py",
        "base_config.py",
    ] {
        assert!(used.contains(key), "{key} missing from {used}");
    }
}

#[test]
fn trl_model_config_defaults_load_float32_under_bf16_autocast() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sft.json");
    std::fs::write(
        &path,
        r#"{"model_name_or_path": "llama-3.2-1b", "output_dir": "out", "use_peft": true,
            "load_in_4bit": true, "per_device_train_batch_size": 2}"#,
    )
    .unwrap();
    let v = run(&["estimate", "--from", path.to_str().unwrap()]);
    // ModelConfig: dtype float32 (→ fp32 non-quantized parameters), use_bnb_nested_quant false;
    // peft's default targets q_proj, v_proj; SFTConfig max_length 1024.
    assert_eq!(v["job"]["method"], "qlora");
    assert_eq!(v["job"]["kbit_prep"], true);
    assert_eq!(v["job"]["double_quant"], false);
    assert_eq!(v["job"]["seq"], 1024);
    assert_eq!(v["job"]["lora"]["targets"], serde_json::json!(["q", "v"]));
}

#[test]
fn explicit_flags_override_the_file() {
    let v = run(&[
        "estimate",
        "--from",
        "examples/axolotl-qlora.yml",
        "--batch",
        "1",
        "--no-grad-checkpointing",
    ]);
    assert_eq!(v["job"]["batch"], 1);
    assert_eq!(v["job"]["grad_checkpointing"], false);
    let rows = v["from"]["provenance"].as_array().unwrap();
    let batch = rows.iter().find(|r| r["setting"] == "batch").unwrap();
    assert_eq!(batch["source"]["kind"], "flag");
    assert_eq!(batch["source"]["detail"], "--batch 1");
}

#[test]
fn provenance_table_and_warnings_print() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ax.yml");
    std::fs::write(
        &path,
        "base_model: llama-3.2-1b\nadapter: lora\nlora_r: 8\nlora_target_modules: [q_proj, v_proj]\npeft_use_dora: true\n",
    )
    .unwrap();
    let out = common::stdout(&["estimate", "--from", path.to_str().unwrap()]);
    assert!(out.contains("← lora_r"), "{out}");
    assert!(out.contains("default: sequence_len 512"), "{out}");
    assert!(out.contains("warning: peft_use_dora"), "{out}");
}

#[test]
fn llamafactory_v1_and_torchtune_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("v1.yaml");
    std::fs::write(
        &v1,
        "model: llama-3.2-1b\npeft_config:\n  name: lora\n  r: 16\nquant_config:\n  name: bnb\n  quantization_bit: 4\nmicro_batch_size: 2\ncutoff_len: 1024\n",
    )
    .unwrap();
    let v = run(&["estimate", "--from", v1.to_str().unwrap()]);
    assert_eq!(v["from"]["format"], "llama-factory-v1");
    assert_eq!(v["job"]["method"], "qlora");
    // quantization.py BnbParams: compute_dtype float16.
    assert_eq!(v["job"]["compute"], "fp16");
    assert_eq!(v["job"]["grad_checkpointing"], true);

    let tt = dir.path().join("tt.yaml");
    std::fs::write(
        &tt,
        "model:\n  _component_: torchtune.models.llama3_1.qlora_llama3_1_8b\n  lora_attn_modules: ['q_proj', 'v_proj', 'output_proj']\n  apply_lora_to_mlp: True\n  lora_rank: 8\ntokenizer:\n  _component_: torchtune.models.llama3.llama3_tokenizer\n  max_seq_len: 2048\nbatch_size: 2\noptimizer:\n  _component_: torch.optim.AdamW\n  fused: True\ndtype: bf16\nenable_activation_checkpointing: True\n",
    )
    .unwrap();
    let v = run(&["estimate", "--from", tt.to_str().unwrap()]);
    assert_eq!(v["from"]["format"], "torchtune");
    assert_eq!(v["model"]["name"], "llama-3.1-8b");
    assert_eq!(v["job"]["optimizer"], "adamw-fused");
    assert_eq!(
        v["job"]["lora"]["targets"],
        serde_json::json!(["q", "v", "o", "gate", "up", "down"])
    );
}

#[test]
fn every_command_takes_from() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("b.svg");
    let html = dir.path().join("r.html");
    let f = "examples/llamafactory-lora.yaml";
    common::stdout(&["cost", "--from", f, "--gpu", "h100-80gb", "--tokens", "10M"]);
    common::stdout(&["fit", "--from", f, "--gpu", "a100-80gb"]);
    common::stdout(&[
        "chart",
        "breakdown",
        "--from",
        f,
        "--out",
        svg.to_str().unwrap(),
    ]);
    common::stdout(&["report", "--from", f, "--out", html.to_str().unwrap()]);
    assert!(svg.exists() && html.exists());
}

#[test]
fn bad_job_files_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.yml");
    std::fs::write(&p, "learning_rate: 1.0\n").unwrap();
    fails_with(
        &["estimate", "--from", p.to_str().unwrap()],
        "does not look like",
    );
    std::fs::write(&p, "base_model: llama-3.2-1b\nadapter: lora\n").unwrap();
    fails_with(&["estimate", "--from", p.to_str().unwrap()], "lora_r");
    fails_with(&["estimate", "--from", "/no/such/file.yml"], "cannot read");
}

/// Writes a Hugging Face cache entry `models--org--name` with `config.json` (and optionally a
/// safetensors file) in the snapshot `refs/main` names.
fn cache_entry(hf_home: &Path, repo: &str, config: Option<&str>) -> std::path::PathBuf {
    let repo_dir = hf_home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo_dir.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs").join("main"), rev).unwrap();
    if let Some(c) = config {
        std::fs::write(snap.join("config.json"), c).unwrap();
    }
    snap
}

/// A safetensors file with one BF16 [2, 3] tensor and one U8 [4] tensor (16 data bytes).
fn tiny_safetensors(path: &Path) {
    let header = r#"{"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"U8","shape":[4],"data_offsets":[12,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend([0u8; 16]);
    std::fs::write(path, bytes).unwrap();
}

const QWEN3_8B: &str = r#"{"architectures":["Qwen3ForCausalLM"],"model_type":"qwen3",
  "vocab_size":151936,"hidden_size":4096,"intermediate_size":12288,"num_hidden_layers":36,
  "num_attention_heads":32,"num_key_value_heads":8,"head_dim":128,
  "tie_word_embeddings":false,"torch_dtype":"bfloat16"}"#;

#[test]
fn hub_id_resolves_from_the_local_cache() {
    let home = tempfile::tempdir().unwrap();
    cache_entry(home.path(), "Qwen/Qwen3-8B", Some(QWEN3_8B));
    let v = run_in(
        home.path(),
        &["estimate", "--model", "Qwen/Qwen3-8B", "--method", "lora"],
    );
    assert_eq!(v["model"]["name"], "Qwen/Qwen3-8B");
    // By hand: 2 × 151936·4096 (embedding, lm_head) + 36 × (q, o 4096² each, k, v 4096·1024
    // each, MLP 3·4096·12288, norms 2·4096 + q/k norms 2·128) + final norm 4096.
    assert_eq!(v["model"]["params_total"], 8_190_735_360u64);
    let table = {
        let out = memplan()
            .args(["estimate", "--model", "Qwen/Qwen3-8B"])
            .env_remove("HF_HUB_CACHE")
            .env("HF_HOME", home.path())
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(table.starts_with("Qwen/Qwen3-8B:"), "{table}");
}

#[test]
fn cached_folder_without_config_names_what_is_missing_and_the_header_totals() {
    let home = tempfile::tempdir().unwrap();
    let snap = cache_entry(home.path(), "acme/headless", None);
    tiny_safetensors(&snap.join("model.safetensors"));
    let out = memplan()
        .args(["estimate", "--model", "acme/headless"])
        .env_remove("HF_HUB_CACHE")
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no config.json"), "{err}");
    // 2 tensors, 6 BF16 + 4 U8 elements, 16 data bytes.
    assert!(
        err.contains("2 tensors, 10 elements (BF16 6, U8 4), 16 bytes"),
        "{err}"
    );
    assert_eq!(err.matches("error:").count(), 1, "{err}");
}

#[test]
fn prequantized_checkpoints_follow_what_transformers_trains() {
    let home = tempfile::tempdir().unwrap();
    let bnb = QWEN3_8B.replace(
        r#""torch_dtype":"bfloat16""#,
        r#""quantization_config":{"quant_method":"bitsandbytes","load_in_4bit":true,"bnb_4bit_use_double_quant":false,"bnb_4bit_compute_dtype":"bfloat16"}"#,
    );
    cache_entry(home.path(), "acme/qwen3-bnb", Some(&bnb));
    let v = run_in(home.path(), &["estimate", "--model", "acme/qwen3-bnb"]);
    assert_eq!(v["job"]["method"], "qlora");
    assert_eq!(v["job"]["double_quant"], false);
    let gptq = QWEN3_8B.replace(
        r#""torch_dtype":"bfloat16""#,
        r#""quantization_config":{"quant_method":"gptq","bits":4,"group_size":128}"#,
    );
    cache_entry(home.path(), "acme/qwen3-gptq", Some(&gptq));
    let out = memplan()
        .args(["estimate", "--model", "acme/qwen3-gptq", "--method", "lora"])
        .env_remove("HF_HUB_CACHE")
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gptq (4-bit, group 128)"), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
}

#[test]
fn chunked_and_fused_losses_cut_the_logits_to_a_quarter() {
    // Llama-3.1-8B (vocab 128,256), batch 4 × 4096, QLoRA.
    let base = [
        "estimate",
        "--model",
        "llama-3.1-8b",
        "--method",
        "qlora",
        "--batch",
        "4",
        "--seq",
        "4096",
    ];
    let with = |loss: &str| {
        let mut a = base.to_vec();
        a.extend(["--loss", loss]);
        run(&a)
    };
    let ce = with("ce");
    // ce: log-softmax + two fp32 gradients at the spike, 12 B × 16384 × 128256.
    assert_eq!(component(&ce, "logits"), 12 * 16_384 * 128_256);
    for loss in ["chunked-nll", "liger", "cce"] {
        let v = with(loss);
        assert!(
            component(&v, "logits") * 4 <= component(&ce, "logits"),
            "{loss}: {} vs ce {}",
            component(&v, "logits"),
            component(&ce, "logits")
        );
        assert!(peak(&v) < peak(&ce), "{loss}");
        assert_eq!(v["job"]["loss"], loss);
    }
}

#[test]
fn activation_offload_with_checkpointing_moves_layer_inputs_to_the_host() {
    let args = [
        "estimate",
        "--model",
        "llama-3.1-8b",
        "--method",
        "qlora",
        "--batch",
        "4",
        "--seq",
        "4096",
        "--grad-checkpointing",
        "--loss",
        "liger",
    ];
    let on_gpu = run(&args);
    let mut a = args.to_vec();
    a.push("--activation-offload");
    let offloaded = run(&a);
    assert!(peak(&offloaded) < peak(&on_gpu));
    assert_eq!(on_gpu["host_bytes"], 0);
    // 32 layers × 16384 tokens × 4096 hidden × 2 B (each checkpointed bf16 layer input).
    assert_eq!(offloaded["host_bytes"], 32u64 * 16_384 * 4096 * 2);
    let mut t = a.clone();
    t.retain(|x| *x != "--format");
    let table = common::stdout(&t);
    assert!(table.contains("host RAM: 4.00 GiB"), "{table}");
}

#[test]
fn checkpoint_headers_are_checked_against_the_architecture() {
    let home = tempfile::tempdir().unwrap();
    // V=10, h=4, 1 layer, 2 heads of 2, 1 kv head, i=6, untied: 212 parameters by hand
    // (embedding 40 + lm_head 40 + q 16 + k 8 + v 8 + o 16 + MLP 72 + norms 8 + final norm 4).
    let tiny = r#"{"model_type":"llama","vocab_size":10,"hidden_size":4,"intermediate_size":6,
        "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1}"#;
    let snap = cache_entry(home.path(), "acme/tiny", Some(tiny));
    let header = r#"{"all":{"dtype":"F32","shape":[212],"data_offsets":[0,848]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(vec![0u8; 848]);
    std::fs::write(snap.join("model.safetensors"), bytes).unwrap();
    let v = run_in(home.path(), &["estimate", "--model", "acme/tiny"]);
    assert_eq!(v["model"]["params_total"], 212);
    assert_eq!(v["checkpoint"]["headers"]["elements_by_dtype"]["F32"], 212);
    let out = memplan()
        .args(["estimate", "--model", "acme/tiny"])
        .env_remove("HF_HUB_CACHE")
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("212 elements (F32 212), 848 bytes of data; = the 212 parameters"),
        "{table}"
    );
}

#[test]
fn mxfp4_and_fp8_checkpoints_train_dequantized_to_bf16() {
    // gpt-oss-20b's config.json carries quantization_config mxfp4 (quantizer_mxfp4.py:
    // is_trainable False → trained after dequantize=True, in bf16).
    let cfg = "tests/data/reference/configs/gpt-oss-20b.json";
    let v = run(&["estimate", "--model", cfg, "--method", "lora"]);
    assert_eq!(v["job"]["weights"], "bf16");
    fails_with(
        &["estimate", "--model", cfg, "--method", "qlora"],
        "bf16 copy",
    );
}
