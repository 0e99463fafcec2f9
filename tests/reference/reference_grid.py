"""The reference grid: which configs, reduced to how many layers, traced under which settings.

`python3 trace.py generate` writes tests/data/reference/configs/traced/<case-config>.json (the
exact config each case ran, layers reduced) and tests/data/reference/traces.jsonl.
"""
from __future__ import annotations

import copy
import json
import os
import time
import traceback

tr = None  # the tracer module (trace.py, run as __main__), set by trace.py before generate()

# (name of the traced config, source config in tests/data/reference/configs, layers kept, edits)
# Layers: enough for every per-layer pattern to appear once at least (gemma sliding/global
# period, deepseek leading dense layers + 2 MoE layers, llama4's no-RoPE period of 4).
ARCHS = [
    ("llama-3.1-8b-L4", "llama-3.1-8b.json", 4, {}),
    ("llama-3.2-1b-instruct", "llama-3.2-1b-instruct.json", None, {}),
    ("mistral-7b-v0.3-L4", "mistral-7b-v0.3.json", 4, {}),
    ("mistral-7b-v0.3-L4-sw512", "mistral-7b-v0.3.json", 4, {"sliding_window": 512}),
    ("mixtral-8x7b-instruct-v0.1-L4", "mixtral-8x7b-instruct-v0.1.json", 4, {}),
    ("qwen2.5-7b-L4", "qwen2.5-7b.json", 4, {}),
    ("qwen3-8b-L4", "qwen3-8b.json", 4, {}),
    ("qwen3-30b-a3b-L4", "qwen3-30b-a3b.json", 4, {}),
    ("gemma-2-2b-it-L4", "gemma-2-2b-it.json", 4, {}),
    ("gemma-2-2b-it-L4-sw512", "gemma-2-2b-it.json", 4, {"sliding_window": 512}),
    ("gemma-3-1b-it-L6", "gemma-3-1b-it.json", 6, {}),
    ("gemma-3-4b-it-L6", "gemma-3-4b-it.json", 6, {}),
    ("gpt-oss-20b-L4", "gpt-oss-20b.json", 4, {}),
    ("phi-3-mini-4k-instruct-L4", "phi-3-mini-4k-instruct.json", 4, {}),
    ("phi-3.5-moe-instruct-L4", "phi-3.5-moe-instruct.json", 4, {}),
    ("olmo-2-7b-instruct-L4", "olmo-2-7b-instruct.json", 4, {}),
    ("granite-3.3-8b-instruct-L4", "granite-3.3-8b-instruct.json", 4, {}),
    ("deepseek-v2-lite-L3", "deepseek-v2-lite.json", 3, {}),
    ("deepseek-v3-L5", "deepseek-v3.json", 5, {}),
    ("llama-4-scout-17b-16e-L4", "llama-4-scout-17b-16e.json", 4, {}),
    ("falcon-7b-L4", "falcon-7b.json", 4, {}),
    ("gpt2", "gpt2.json", None, {}),
]

QV = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "falcon": ["query_key_value"],
      "phi3": ["qkv_proj"], "deepseek_v2": ["q_proj", "kv_b_proj"],
      "deepseek_v3": ["q_b_proj", "kv_b_proj"]}


def text_cfg(cfg: dict) -> dict:
    return cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg


def reduce_layers(cfg: dict, n: int | None, edits: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    t = text_cfg(cfg)
    layer_key = "n_layer" if "n_layer" in t else "num_hidden_layers"
    L = t[layer_key]
    if n is not None and n < L:
        t[layer_key] = n
        for k, v in list(t.items()):
            if isinstance(v, list) and len(v) == L:  # per-layer lists: layer_types, no_rope_layers
                t[k] = v[:n]
        for k in ("mlp_only_layers", "moe_layers"):
            if isinstance(t.get(k), list):
                t[k] = [i for i in t[k] if i < n]
    t.update(edits)
    return cfg


def qv_targets(model_type: str) -> list[str]:
    if model_type in QV:
        return QV[model_type]
    return ["q_proj", "v_proj"]


def cases_for(name: str, cfg: dict):
    """~15 settings per architecture: full, LoRA (all-linear and q,v), inference, one fp32."""
    mt = cfg["model_type"]
    lin = "all-linear"
    qv = qv_targets(mt if mt != "gemma3" else "gemma3")
    out = []

    def add(method, b, s, gc=False, attn="sdpa", r=16, drop=0.05, targets=lin, weights="bf16"):
        c = dict(method=method, weights=weights, batch=b, seq=s, grad_ckpt=gc, attn=attn)
        if method == "lora":
            c["lora"] = dict(r=r, alpha=2 * r, dropout=drop, targets=targets)
        out.append(c)

    # full: enough tokens that activations, not only the optimizer step, set some peaks
    add("full", 1, 2048)
    add("full", 2, 2048, gc=True)
    add("full", 4, 2048)
    add("full", 2, 4096)
    add("full", 4, 1024, gc=True)
    add("full", 2, 1024, attn="eager")
    add("lora", 1, 1024)
    add("lora", 2, 2048, gc=True)
    add("lora", 1, 2048, r=64, drop=0.0)
    add("lora", 1, 256, attn="eager", r=8)
    add("lora", 1, 1024, targets=qv)
    add("lora", 2, 1024, gc=True, r=8, drop=0.0, targets=qv)
    add("inference", 1, 1024)
    add("inference", 1, 2048)
    add("inference", 2, 2048, attn="eager")
    add("full", 1, 512, weights="fp32")
    # no sequence longer than the model's positions (GPT-2's learned table has 1024)
    t = text_cfg(cfg)
    maxpos = t.get("n_positions") or t.get("max_position_embeddings")
    if maxpos:
        out = [c for c in out if c["seq"] <= maxpos]
    return out


def case_id(name, c):
    parts = [name, c["method"], c["weights"], f"b{c['batch']}", f"s{c['seq']}",
             f"gc{int(c['grad_ckpt'])}", c["attn"]]
    if c["method"] == "lora":
        lc = c["lora"]
        tg = lc["targets"] if isinstance(lc["targets"], str) else ",".join(lc["targets"])
        parts += [f"r{lc['r']}", f"d{lc['dropout']:g}", tg]
    return "|".join(parts)


def generate(args):
    CONFIGS = os.path.join(tr.DATA, "configs")
    TRACED = os.path.join(CONFIGS, "traced")
    os.makedirs(TRACED, exist_ok=True)
    mode = "a" if args.append else "w"
    t0 = time.time()
    n_ok = n_err = 0
    seen = set()
    if args.append and os.path.exists(args.out):
        for line in open(args.out):
            try:
                seen.add(json.loads(line)["id"])
            except ValueError:
                pass
    refused = os.path.join(os.path.dirname(args.out), "refused.jsonl")
    with open(args.out, mode) as fh, open(refused, mode) as rf:
        for name, src, n, edits in ARCHS:
            if args.only and not any(o in name for o in args.only):
                continue
            base = json.load(open(os.path.join(CONFIGS, src)))
            cfg = reduce_layers(base, n, edits)
            rel = f"configs/traced/{name}.json"
            with open(os.path.join(tr.DATA, rel), "w") as f:
                json.dump(cfg, f, indent=2, sort_keys=True)
                f.write("\n")
            todo = list(cases_for(name, cfg))
            while todo:
                c = todo.pop(0)
                t = time.time()
                try:
                    rec = tr.run_case(c, cfg)
                except Exception as e:  # noqa: BLE001
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    print(f"REFUSED {case_id(name, c)}: {msg}", flush=True)
                    rf.write(json.dumps({"id": case_id(name, c), "config": rel,
                                         "model_type": cfg["model_type"], "case": c,
                                         "error": msg}) + "\n")
                    rf.flush()
                    n_err += 1
                    if args.verbose:
                        traceback.print_exc()
                    # peft 0.21: adapters on fused expert parameters (lora.ParamWrapper) refuse
                    # dropout; trace the same setting without it
                    if c["method"] == "lora" and "lora_dropout" in msg and c["lora"]["dropout"]:
                        c2 = copy.deepcopy(c)
                        c2["lora"]["dropout"] = 0.0
                        todo.insert(0, c2)
                    continue
                c = dict(c)
                c["attn"] = rec["attn"]  # what transformers actually ran
                cid = case_id(name, c)
                if cid in seen:
                    continue
                seen.add(cid)
                lora = None
                if c["method"] == "lora":
                    lc = c["lora"]
                    lr = rec["lora_resolved"]
                    lora = {"r": lc["r"], "alpha": lc["alpha"], "dropout": lc["dropout"],
                            "target_modules": lr["target_modules"],
                            "target_parameters": lr["target_parameters"],
                            "requested": lc["targets"],
                            "adapted_modules": lr["adapted_modules"]}
                line = {
                    "id": cid, "config": rel, "model_type": cfg["model_type"],
                    "method": c["method"], "weights": c["weights"],
                    "compute": "bf16" if c["weights"] == "bf16" else "fp32",
                    "batch": c["batch"], "seq": c["seq"], "grad_ckpt": c["grad_ckpt"],
                    "attn": rec["attn"], "lora": lora, "optim": "adamw",
                    "workspace_bytes": tr.WORKSPACE_BYTES, "peak_bytes": rec["peak_bytes"],
                    "peak_phase": rec["peak_phase"],
                    "phases": {k: v for k, v in rec["phases"].items()},
                    "params_total": rec["params_total"],
                    "params_trainable": rec["params_trainable"],
                    "kv_cache_bytes": rec["kv_cache_bytes"],
                    "model_bytes": rec["model_bytes"],
                    "sdpa_kernels": rec["sdpa_kernels"],
                    "experts_implementation": rec["experts_implementation"],
                    "versions": tr._versions(),
                }
                fh.write(json.dumps(line) + "\n")
                fh.flush()
                n_ok += 1
                print(f"{time.time() - t:5.1f}s {rec['peak_bytes'] / tr.GiB:9.3f} GiB "
                      f"{rec['peak_phase']} {cid}", flush=True)
    print(f"{n_ok} traced, {n_err} errors, {time.time() - t0:.0f}s")
    return 0
