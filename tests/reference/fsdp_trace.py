#!/usr/bin/env python3
"""Reference traces of one FSDP2 (`fully_shard`) training step, rank 0 of N, without GPUs.

Runs transformers' own modeling code, peft's LoRA and torch's FSDP2 Python code for the training
step of `groundtruth/measure.py` (forward with labels, backward, AdamW step, zero_grad; two steps,
the second reported) for rank 0 of a world of N ranks in one CPU process:

- `init_process_group("fake", rank=0, world_size=N, store=FakeStore())`
  (`torch.testing._internal.distributed.fake_pg`): collectives return at once; which tensors
  FSDP2 allocates and frees, and when, is decided by its Python code
  (`torch/distributed/fsdp/_fully_shard/*.py`), the same on a CUDA mesh.
- a `"cpu"` device mesh (a `"cuda"` one needs a GPU for streams and events);
- the model is built on meta, each decoder layer and then the root are `fully_shard`-ed (what
  accelerate's `TRANSFORMER_BASED_WRAP` does), then `model.to_empty(device="cpu")` inside
  `FakeTensorMode`: no weights, no compute, every kernel is its meta implementation.
- a `TorchDispatchMode` counts each op's output storages (rounded up to 512 B as the CUDA caching
  allocator does), counting a DTensor's local tensor (its own storage has the global size), and a
  weakref finalizer per storage subtracts it when it dies; `UntypedStorage.resize_` is followed
  (FSDP2 frees and re-allocates the unsharded parameters that way, `_fsdp_param.py`
  `alloc_storage` / `free_storage`); AdamW's 0-dim `step` counters are skipped (they live on
  the CPU under CUDA, `torch/optim/adamw.py` without `capturable`).
- CUDA's kernel choices are forced where the CPU's differ: SDPA is flash attention
  (`aten._scaled_dot_product_flash_attention`, GQA without repeating k/v, no mask), dropout is
  `native_dropout` (1-byte bool mask), AdamW is `foreach`.
- 64 MiB cuBLAS workspace is added to every peak (measured on H200, groundtruth `base_alloc`).

Usage: fsdp_trace.py --out traces.jsonl [--only SUBSTR] [--list] [--check-n1]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import weakref

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 512  # CUDACachingAllocator rounds every request up to 512 B (kMinBlockSize)
WORKSPACE = 64 << 20  # cuBLAS workspaces, measured on H200 (groundtruth base_alloc)

# ----------------------------------------------------------------------------- live bytes
class LiveBytes(TorchDispatchMode):
    """Live tensor-storage bytes and per-phase peaks."""

    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}  # storage _cdata -> counted bytes
        self.live = 0
        self.phase = "load"
        self.peaks: dict[str, int] = {}
        self.skip_scalars = False

    @staticmethod
    def rounded(n: int) -> int:
        return 0 if n == 0 else -(-n // BLOCK) * BLOCK

    def set_phase(self, name: str):
        self.phase = name
        self.peaks[name] = max(self.peaks.get(name, 0), self.live)

    def _bump(self):
        if self.live > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = self.live

    def _release(self, key: int):
        self.live -= self.sizes.pop(key, 0)

    def track(self, t: torch.Tensor):
        if isinstance(t, DTensor):
            t = t._local_tensor
        if self.skip_scalars and t.dim() == 0:
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.sizes:
            return
        n = self.rounded(st.nbytes())
        self.sizes[key] = n
        self.live += n
        weakref.finalize(st, self._release, key)
        self._bump()

    def resized(self, st, nbytes: int):
        key = st._cdata
        if key not in self.sizes:
            return
        n = self.rounded(nbytes)
        self.live += n - self.sizes[key]
        self.sizes[key] = n
        self._bump()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


TRACKER: LiveBytes | None = None
_orig_resize = torch.UntypedStorage.resize_


def _resize(self, nbytes):
    r = _orig_resize(self, nbytes)
    if TRACKER is not None:
        TRACKER.resized(self, nbytes)
    return r


torch.UntypedStorage.resize_ = _resize

# ----------------------------------------------------------------------------- CUDA choices
def _dropout(input, p=0.5, training=True, inplace=False):
    # CUDA: at::dropout -> native_dropout (is_fused_kernel_acceptable), a bool mask.
    if not training or p == 0.0:
        return input
    return torch.ops.aten.native_dropout(input, p, True)[0]


F.dropout = _dropout


def flash_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                            scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa_attention_forward as CUDA runs it: no mask and torch >= 2.5 ->
    enable_gqa, and SDPA picks flash attention (k/v not repeated)."""
    assert attention_mask is None, "a mask would select memory-efficient attention on CUDA"
    out = torch.ops.aten._scaled_dot_product_flash_attention(
        query, key, value, dropout, True, False, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def install_attention():
    from transformers import masking_utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    ALL_ATTENTION_FUNCTIONS["sdpa"] = flash_attention_forward
    # masking_utils treats a FakeTensor as tracing and then always builds the 4-D mask; on CUDA
    # (`_ignore_causal_mask_sdpa`, no padding, q_len == kv_len) the mask is skipped: is_causal.
    masking_utils.is_tracing = lambda tensor=None: False
    # Its packed-sequence check calls .item(); positions are arange, so never packed (None).
    masking_utils.find_packed_sequence_indices = lambda position_ids: None


# ----------------------------------------------------------------------------- models
# Shapes of the real checkpoints' config.json (hub: meta-llama/Llama-3.2-1B, Llama-3.1-8B,
# Qwen/Qwen2.5-1.5B, mistralai/Mistral-7B-v0.1); `layers` is reduced where noted in the README
# (FSDP's per-layer behaviour repeats; the traced config is written into every record).
MODELS = {
    "llama3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                  vocab_size=128256, tie_word_embeddings=True,
                                  max_position_embeddings=8192, rms_norm_eps=1e-5,
                                  rope_theta=500000.0)),
    "llama3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                  vocab_size=128256, tie_word_embeddings=False,
                                  max_position_embeddings=8192, rms_norm_eps=1e-5,
                                  rope_theta=500000.0)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2,
                                   vocab_size=151936, tie_word_embeddings=True,
                                   max_position_embeddings=32768, rms_norm_eps=1e-6,
                                   rope_theta=1000000.0, use_sliding_window=False)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                   vocab_size=32000, tie_word_embeddings=False,
                                   max_position_embeddings=32768, rms_norm_eps=1e-5,
                                   rope_theta=10000.0, sliding_window=None)),
}
COMMON = dict(attention_dropout=0.0, hidden_act="silu", use_cache=False, initializer_range=0.02)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config_of(name, layers=None):
    from transformers import AutoConfig
    mtype, spec = MODELS[name]
    kw = dict(COMMON)
    kw.update(spec)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return AutoConfig.for_model(mtype, **kw)


def decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers)


# ----------------------------------------------------------------------------- one case
def run(case, world_pg_initialized=[False]):
    global TRACKER
    from transformers import AutoModelForCausalLM

    n = case["world_size"]  # 0: no FSDP (the single-GPU step, for the N = 1 check)
    if dist.is_initialized():
        dist.destroy_process_group()
    if n:
        dist.init_process_group("fake", rank=0, world_size=n, store=FakeStore())
        mesh = init_device_mesh("cpu", (n,))

    cfg = config_of(case["model"], case.get("layers"))
    param_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[case["params"]]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=param_dtype, attn_implementation="sdpa")
    model.train()
    if case["grad_ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case["method"] == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules=LORA_TARGETS, bias="none",
                                                 task_type="CAUSAL_LM"))
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if case["mp"] else None,
        reduce_dtype=torch.float32 if case["mp"] else None)
    rafw = case.get("reshard_after_forward", True)
    if n:
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=rafw)
        # The root: torch's default (None) never reshards it after forward; passing the
        # layers' value reshards it too (and re-gathers it at the start of backward).
        root = case.get("root_reshard")
        kw = {} if root is None else {"reshard_after_forward": root}
        fully_shard(model, mesh=mesh, mp_policy=mp, **kw)

    tr = LiveBytes()
    TRACKER = tr
    b, s = case["batch"], case["seq"]
    t0 = time.time()
    with FakeTensorMode(allow_non_fake_inputs=True), tr:
        model.to_empty(device="cpu")
        if not n and cfg.tie_word_embeddings:
            # Module._apply replaces each module's parameter on its own, untying lm_head from
            # the embedding (FSDP2 keeps one FSDPParam for both and re-ties in lazy init).
            model.tie_weights()
        tr.set_phase("load")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, foreach=True)
        ids = torch.zeros((b, s), dtype=torch.long)
        phases = {}
        for step in (1, 2):
            tr.peaks = {}
            tr.set_phase("fwd")
            loss = model(input_ids=ids, labels=ids).loss
            tr.set_phase("bwd")
            loss.backward()
            del loss
            tr.set_phase("opt")
            tr.skip_scalars = True
            opt.step()
            tr.skip_scalars = False
            tr.set_phase("zero")
            opt.zero_grad(set_to_none=True)
            for k in ("fwd", "bwd", "opt"):
                phases[f"{k}{step}"] = tr.peaks[k] + WORKSPACE
            phases[f"after{step}"] = tr.live + WORKSPACE
    TRACKER = None
    dt = time.time() - t0
    rec = dict(case)
    rec["id"] = case_id(case)
    mixed = case["mp"] or case["params"] == "bf16"
    rec["fsdp"] = {"world_size": n, "param_dtype": "bf16" if mixed else "fp32",
                   "reduce_dtype": "fp32" if case["mp"] else case["params"],
                   "reshard_after_forward": rafw,
                   "root_reshard_after_forward": bool(case.get("root_reshard"))}
    rec["config"] = {k: v for k, v in cfg.to_dict().items()
                     if k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "head_dim",
                              "vocab_size", "tie_word_embeddings")}
    rec["workspace_bytes"] = WORKSPACE
    rec["phases"] = phases
    keys = [k for k in phases if k[:3] in ("fwd", "bwd", "opt")]
    pk = max(keys, key=lambda k: phases[k])
    rec["peak_bytes"] = phases[pk]
    rec["peak_phase"] = pk[:3]
    rec["secs"] = round(dt, 2)
    rec["versions"] = versions()
    del model, opt
    if n:
        dist.destroy_process_group()
    return rec


def versions():
    import peft
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def case_id(c):
    parts = [c["model"], c["method"], c["params"] + ("+mp" if c["mp"] else ""), f"n{c['world_size']}",
             f"b{c['batch']}", f"s{c['seq']}", f"gc{int(c['grad_ckpt'])}"]
    if c.get("layers") is not None:
        parts.append(f"L{c['layers']}")
    if not c.get("reshard_after_forward", True):
        parts.append("noreshard")
    if not c.get("root_reshard"):
        parts.append("rootkept")
    return "|".join(parts)


LAYERS = {"llama3.2-1b": None, "qwen2.5-1.5b": None, "llama3.1-8b": 8, "mistral-7b": 8}
# The order later grid runs take (each run skips the ids already in --out).
ORDER = ["mistral-7b", "llama3.1-8b", "qwen2.5-1.5b", "llama3.2-1b"]


def grid(seq):
    """Every traced case, batch 1: 4 models × (bf16 | fp32 + bf16 mixed precision) ×
    checkpointing off/on × full (N ∈ {2, 4, 8, 16, 64}) / LoRA (N ∈ {2, 8, 64}; LoRA's many
    small parameters make a fake-tensor step ~6× slower). Full cases first."""
    cases = []
    for method, ns in (("full", (2, 4, 8, 16, 64)), ("lora", (2, 8, 64))):
        for model in ORDER:
            layers = LAYERS[model]
            for params, mp in (("bf16", False), ("fp32", True)):
                for gc in (False, True):
                    for n in ns:
                        cases.append(dict(model=model, layers=layers, world_size=n, method=method,
                                          params=params, mp=mp, grad_ckpt=gc, batch=1, seq=seq,
                                          root_reshard=True))
    return cases


def grid_root_kept(seq):
    """torch's default for the root (reshard_after_forward=None: never resharded): full,
    N ∈ {2, 8}, and LoRA at N = 8."""
    cases = []
    for method, ns in (("full", (2, 8)), ("lora", (8,))):
        for model in ORDER:
            layers = LAYERS[model]
            for params, mp in (("bf16", False), ("fp32", True)):
                for gc in (False, True):
                    for n in ns:
                        cases.append(dict(model=model, layers=layers, world_size=n, method=method,
                                          params=params, mp=mp, grad_ckpt=gc, batch=1, seq=seq,
                                          root_reshard=None))
    return cases


def grid_no_reshard(seq):
    """reshard_after_forward=False on the layers (SHARD_GRAD_OP), the root at torch's default."""
    return [dict(model=model, layers=LAYERS[model], world_size=n, method="full", params="bf16",
                 mp=False, grad_ckpt=gc, batch=1, seq=seq, root_reshard=None,
                 reshard_after_forward=False)
            for model in ("mistral-7b", "llama3.2-1b") for gc in (False, True) for n in (2, 8)]


def check_n1(seq):
    """N = 1 against the single-GPU step (no FSDP): the difference should be the root's gathered
    parameters (embedding + final norm + lm_head in the gathered dtype) in every phase."""
    ok = True
    for method in ("full", "lora"):
        for gc in (False, True):
            base = dict(model="llama3.2-1b", layers=None, method=method, params="bf16", mp=False,
                        grad_ckpt=gc, batch=1, seq=seq)
            one = run(dict(base, world_size=1))
            ref = run(dict(base, world_size=0))
            diff = {k: one["phases"][k] - ref["phases"][k] for k in one["phases"]}
            ok &= all(v == diff["fwd2"] for k, v in diff.items() if k in ("fwd2", "bwd2"))
            print(method, "gc", int(gc), "N=1 minus single-GPU:", diff, flush=True)
    return ok


def main():
    install_attention()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--grid", action="store_true", help="trace every case of grid() into --out")
    ap.add_argument("--root-kept", action="store_true", help="with --grid: grid_root_kept()")
    ap.add_argument("--no-reshard", action="store_true", help="with --grid: grid_no_reshard()")
    ap.add_argument("--check-n1", action="store_true")
    ap.add_argument("--only", default="", help="with --grid: case ids containing this")
    ap.add_argument("--model", default="llama3.2-1b")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--method", default="full")
    ap.add_argument("--params", default="bf16")
    ap.add_argument("--mp", action="store_true")
    ap.add_argument("--gc", action="store_true")
    ap.add_argument("--seq", type=int, default=2048)
    a = ap.parse_args()
    if a.check_n1:
        check_n1(a.seq)
        return
    if a.grid:
        done = set()
        if a.out and os.path.exists(a.out):
            done = {json.loads(l)["id"] for l in open(a.out) if l.strip()}
        pick = grid_no_reshard if a.no_reshard else grid_root_kept if a.root_kept else grid
        for c in pick(a.seq):
            if a.only not in case_id(c) or case_id(c) in done:
                continue
            r = run(c)
            print(r["id"], r["peak_phase"], r["peak_bytes"], r["secs"], "s", flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(r, sort_keys=False) + "\n")
        return
    c = dict(model=a.model, layers=a.layers, world_size=a.n, method=a.method, params=a.params,
             mp=a.mp, grad_ckpt=a.gc, batch=1, seq=a.seq)
    r = run(c)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
