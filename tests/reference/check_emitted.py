#!/usr/bin/env python3
"""Loads every config `memplan estimate --emit` writes with the real engines (outside CI).

- DeepSpeed 0.19.8: `deepspeed.runtime.config.DeepSpeedConfig` (the parser `deepspeed.initialize`
  uses; world size 1 here, so each plan is emitted for its own GPU count and the batch check is
  made against that count by hand), and transformers' `HfTrainerDeepSpeedConfig` with
  `trainer_config_process`, which fills the "auto" values as the HF Trainer does.
- accelerate 1.15: `load_config_from_file` (what `accelerate launch --config_file` reads) and
  a `FullyShardedDataParallelPlugin` built from the file's fsdp_config the way `accelerate launch`
  passes it (FSDP_* environment variables), checking the strategy it resolves.

Usage: check_emitted.py [path/to/memplan]   (default: target/debug/memplan)
"""
import json
import os
import subprocess
import sys
import tempfile

MEMPLAN = sys.argv[1] if len(sys.argv) > 1 else "target/debug/memplan"
BASE = ["estimate", "--model", "llama-3.1-8b"]


def emit(args):
    return subprocess.run([MEMPLAN, *BASE, *args], check=True, capture_output=True, text=True).stdout


def check_deepspeed():
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    cases = []
    for stage in (1, 2, 3):
        for opt in ("adamw", "adamw-8bit"):
            for off in ("none", "optimizer") + (("optimizer+params",) if stage == 3 else ()):
                if opt != "adamw" and off != "none":
                    continue
                cases.append(["--method", "full", "--gpus", "8", "--zero", str(stage),
                              "--optimizer", opt, "--offload", off, "--emit", "deepspeed"])
    for a in cases:
        cfg = json.loads(emit(a))
        assert cfg["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] * \
            cfg["gradient_accumulation_steps"] * 8
        one = dict(cfg, train_batch_size=cfg["train_micro_batch_size_per_gpu"] *
                   cfg["gradient_accumulation_steps"])
        ds = DeepSpeedConfig(one)
        assert ds.zero_optimization_stage == int(a[a.index("--zero") + 1])
        has_block = "optimizer" in cfg
        assert has_block == (a[a.index("--optimizer") + 1] == "adamw"), a
        hf = HfTrainerDeepSpeedConfig(one)
        with tempfile.TemporaryDirectory() as d:
            args = TrainingArguments(output_dir=d, per_device_train_batch_size=1,
                                     gradient_accumulation_steps=1, use_cpu=True, report_to=[])
            hf.trainer_config_process(args)
        filled = {k: v for k, v in hf.config.items() if k != "_memplan"}
        assert "\"auto\"" not in json.dumps(filled), filled
        print("deepspeed ok:", " ".join(a[2:-2]), "| optimizer block" if has_block else "| Trainer --optim")


def check_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin
    cases = [
        (["--gpus", "8", "--fsdp", "full-shard"], True),
        (["--gpus", "8", "--fsdp", "shard-grad-op"], False),
        (["--gpus", "16", "--nodes", "2", "--fsdp", "hybrid-shard"], True),
        (["--gpus", "8", "--fsdp", "full-shard", "--offload", "optimizer+params",
          "--grad-checkpointing"], True),
        (["--gpus", "8", "--fsdp", "shard-grad-op", "--fsdp-version", "1"], "SHARD_GRAD_OP"),
    ]
    for a, want in cases:
        text = emit(["--method", "full", *a, "--emit", "accelerate"])
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(text)
        cfg = load_config_from_file(f.name)
        os.unlink(f.name)
        fc = cfg.fsdp_config
        # What `accelerate launch` exports (utils/launch.py): FSDP_SHARDING_STRATEGY always,
        # from fsdp_sharding_strategy or its FULL_SHARD default.
        env = {"FSDP_VERSION": str(fc["fsdp_version"]),
               "FSDP_SHARDING_STRATEGY": str(fc.get("fsdp_sharding_strategy", "FULL_SHARD")),
               "FSDP_RESHARD_AFTER_FORWARD": str(fc["fsdp_reshard_after_forward"]).lower()
               if isinstance(fc["fsdp_reshard_after_forward"], bool)
               else fc["fsdp_reshard_after_forward"]}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            plugin = FullyShardedDataParallelPlugin()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        got = plugin.reshard_after_forward if plugin.fsdp_version == 2 else plugin.sharding_strategy
        got = got.name if hasattr(got, "name") else got
        assert got == want, (a, got, want)
        if "--nodes" in a:
            assert cfg.num_machines == 2 and cfg.main_process_port == 29500
            assert cfg.parallelism_config["parallelism_config_dp_replicate_size"] == 2
        print("accelerate ok:", " ".join(a), "| fsdp_version", plugin.fsdp_version,
              "reshard_after_forward", got)


if __name__ == "__main__":
    import accelerate
    import deepspeed
    import transformers
    print("deepspeed", deepspeed.__version__, "accelerate", accelerate.__version__,
          "transformers", transformers.__version__)
    check_deepspeed()
    check_accelerate()
