#!/usr/bin/env python3
"""memplan's reference tracer: the live GPU bytes of one fine-tuning step, traced on meta tensors.

Runs transformers' own modeling code (torch 2.11.0, transformers 5.17.0, peft 0.21.0) for the
training step of the project's ground-truth script (two steps of forward with labels=input_ids,
loss.backward(), optimizer.step(), zero_grad(set_to_none=True); the output object and its
logits dropped before backward) on META tensors: no GPU, no weights, seconds per case.

Live bytes are counted by a TorchDispatchMode: every op output's untyped storage is added once
(rounded up to 512 B, as the CUDA caching allocator rounds every block), and a weakref finalizer
on that storage subtracts it when the storage dies.  Parameters, buffers and optimizer state are
meta tensors too and are counted the same way.

Meta tensors do not make CUDA's kernel choices; this file makes them (see `cuda_choices`):
  (a) SDPA: the H200's order (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp with
      cuDNN 9.19): cuDNN attention where it applies (bf16/fp16, head dims <= 256, with or
      without a mask), flash attention without a mask, memory-efficient attention with one,
      the math path where none applies; a boolean mask is converted to an additive mask of the
      query dtype first (attention.cpp), and the fused kernels save it for backward.  Flash and
      cuDNN keep the same bytes (q, k, v, output, fp32 [b, heads, s] log-sum-exp, RNG state);
  (b) dropout as aten::native_dropout with a 1-byte bool mask (aten/src/ATen/native/Dropout.cpp
      is_fused_kernel_acceptable: CUDA inputs with 0 < p < 1);
  (c) AdamW with foreach=True (torch/optim/optimizer.py _default_to_fused_or_foreach picks it
      for CUDA parameters); its step counters are CPU tensors and are not counted;
  (d) 512-B rounding of every block (c10/cuda/CUDACachingAllocator.cpp round_size);
  (e) transformers' packed-sequence check (masking_utils.find_packed_sequence_indices) calls
      .all() on a device tensor: its tensors are still computed, the answer is "not packed"
      (positions are arange);
  (f) one weakref finalizer per storage.
The 64 MiB cuBLAS workspace is not a tensor: it is the constant WORKSPACE_BYTES, added to every
figure reported (measured as `base_alloc` in the ground truth).

What the tracer cannot see: allocations made inside CUDA kernels that are not op outputs
(flash/efficient-attention backward accumulators, cuBLAS-Lt workspaces beyond the constant,
embedding-backward sort buffers) and the caching allocator's block rules (a block whose split
would leave <= 1 MiB is handed out whole).

Usage:
  trace.py validate [--out FILE]       # the traceable H200 ground-truth cases
  trace.py generate [--only SUBSTR]    # the reference grid -> tests/data/reference/traces.jsonl
  trace.py one --config CFG.json [--method full|lora|inference] [--batch B] [--seq S] ...
                [--events EVENTS.jsonl]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import time
import warnings
import weakref

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
DATA = os.path.join(REPO, "tests", "data", "reference")

#: CUDA caching allocator: every block is a multiple of 512 B (kMinBlockSize, round_size).
BLOCK = 512
#: cuBLAS workspaces torch keeps for the forward and the autograd thread on an H200:
#: measured `base_alloc` of the ground truth is 67,109,888 B = 64 MiB + 1,024 B.
WORKSPACE_BYTES = 67_108_864
GiB = float(1 << 30)


def round_block(nbytes: int) -> int:
    """Bytes the caching allocator books for a request (0 stays 0: no block for empty tensors)."""
    if nbytes <= 0:
        return 0
    return (nbytes + BLOCK - 1) // BLOCK * BLOCK


# --------------------------------------------------------------------------------------------
# live-bytes tracker (reusable: the FSDP2 tracer counts DTensor locals and storage resizes here)
# --------------------------------------------------------------------------------------------
class LiveBytes:
    """Live bytes of distinct untyped storages on the counted devices.

    A storage is keyed by its StorageImpl address (`_cdata`) and counted once, however many tensors
    view it.  PyTorch preserves a storage's Python object while the StorageImpl lives, so a weakref
    finalizer on that object runs exactly when the storage is freed.

    Extension points for other tracers: `device_types` (e.g. ("cpu",) under FakeTensorMode),
    `skip` (a predicate on tensors, e.g. 0-dim optimizer step counters), `resize(storage, nbytes)`
    for `UntypedStorage.resize_` (FSDP2 frees and re-allocates gathered parameters that way), and
    `on_event` (called with ("alloc"|"free"|"resize", key, bytes, live) for an allocator replay).
    """

    def __init__(self, device_types=("meta",), skip=None, on_event=None):
        self.device_types = tuple(device_types)
        self.skip = skip
        self.on_event = on_event
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        #: the aten op whose outputs are being counted (CountOutputs sets it), for event logs
        self.current_op = ""

    def _add(self, key, nb):
        self.live += nb
        if self.live > self.peak:
            self.peak = self.live
        if self.on_event:
            self.on_event("alloc", key, nb, self.live)

    def track_storage(self, st) -> bool:
        key = st._cdata
        if key in self._sizes:
            return False
        nb = round_block(st.nbytes())
        self._sizes[key] = nb
        self._add(key, nb)
        weakref.finalize(st, self._free, key)
        return True

    def track(self, t) -> bool:
        if not isinstance(t, torch.Tensor) or t.device.type not in self.device_types:
            return False
        if self.skip is not None and self.skip(t):
            return False
        return self.track_storage(t.untyped_storage())

    def _free(self, key):
        nb = self._sizes.pop(key, 0)
        self.live -= nb
        if self.on_event:
            self.on_event("free", key, nb, self.live)

    def resize(self, st, nbytes: int):
        key = st._cdata
        old = self._sizes.get(key)
        if old is None:
            self.track_storage(st)
            return
        new = round_block(nbytes)
        self._sizes[key] = new
        self.live += new - old
        self.peak = max(self.peak, self.live)
        if self.on_event:
            self.on_event("resize", key, new, self.live)

    def transient(self, nbytes: int):
        """A kernel-internal buffer alive only during one op: raises the peak, not the live bytes."""
        self.peak = max(self.peak, self.live + round_block(nbytes))

    def reset_peak(self):
        self.peak = self.live


# `one --events` with TRACE_ACC_KEYS=1 tags gradient accumulations (see CountOutputs).
ACC_KEYS = bool(__import__("os").environ.get("TRACE_ACC_KEYS"))


class CountOutputs(TorchDispatchMode):
    """Counts the storage of every tensor an aten op returns (views and in-place ops share one)."""

    def __init__(self, tracker: LiveBytes):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tracker.current_op = str(func)
        if (ACC_KEYS and func is torch.ops.aten.add.Tensor and not torch.is_grad_enabled()
                and torch._C._current_graph_task_id() != -1
                and all(isinstance(a, torch.Tensor) for a in args[:2])):
            # autograd's `InputBuffer::accumulate` (out of place under a dispatch mode): name
            # the two summed storages so a replay can sum in place as the engine does on a GPU.
            k0, k1 = (a.untyped_storage()._cdata for a in args[:2])
            self.tracker.current_op += f"[acc:{k0},{k1}]"
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self.tracker.track(t)
        return out


# --------------------------------------------------------------------------------------------
# CUDA's kernel choices on meta tensors
# --------------------------------------------------------------------------------------------
_ORIG_SDPA = torch.nn.functional.scaled_dot_product_attention
_ORIG_DROPOUT = torch.nn.functional.dropout
SDPA_CHOICES: dict[str, int] = {}


#: PyTorch 2.11's sdp_utils.cpp check_prefer_cudnn_attention(): on sm90/sm100 with a runtime
#: cuDNN newer than 9.15.0 (torch 2.11's wheel brings cuDNN 9.19; the H200 run reports 91900) the
#: SDPA order is cuDNN, flash, memory-efficient, math. TORCH_CUDNN_SDPA_DEPRIORITIZED=1 restores
#: flash first; False here traces that order.
PREFER_CUDNN_SDPA = True


def _sdpa_cuda(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention as it dispatches on an H200 (sm90).

    sdp_utils.cpp: cuDNN needs fp16/bf16, q/k and v head dims <= 256 (Hopper, cuDNN >= 9.10) and
    multiples of 8, equal head counts unless enable_gqa, a key length > 1, and accepts a mask;
    flash needs no mask, fp16/bf16, equal head dims <= 256, equal heads unless enable_gqa;
    memory-efficient needs q/k head dims equal and 8-aligned, equal head counts (no GQA), accepts
    a mask; otherwise the math path (which meta runs as CUDA would). The mask conversions are
    attention.cpp's (convert_boolean_attn_mask_cudnn / convert_boolean_attn_mask, preprocess_mask).
    """
    qd, kd, vd = query.shape[-1], key.shape[-1], value.shape[-1]
    lowp = query.dtype in (torch.float16, torch.bfloat16)
    hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
    same_heads = hq == hk == hv
    gqa_ok = same_heads or (enable_gqa and hk == hv and hq % hk == 0)
    cudnn_ok = (PREFER_CUDNN_SDPA and lowp and qd == kd and qd <= 256 and vd <= 256
                and qd % 8 == 0 and vd % 8 == 0 and gqa_ok and key.shape[-2] > 1)
    flash_ok = (attn_mask is None and lowp and qd == kd == vd and qd <= 256 and gqa_ok)
    eff_ok = (qd == kd and qd % 8 == 0 and vd % 8 == 0 and same_heads
              and query.dtype in (torch.float16, torch.bfloat16, torch.float32))
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                        or value.requires_grad)
    if cudnn_ok:
        SDPA_CHOICES["cudnn"] = SDPA_CHOICES.get("cudnn", 0) + 1
        bias = attn_mask
        if bias is not None and bias.dtype == torch.bool:
            bias = torch.where(bias.logical_not(), -65504.0, torch.scalar_tensor(
                0.0, dtype=query.dtype, device=bias.device))
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, bias, grad, dropout_p, is_causal, False, scale=scale)[0]
    if flash_ok:
        SDPA_CHOICES["flash"] = SDPA_CHOICES.get("flash", 0) + 1
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if eff_ok:
        SDPA_CHOICES["efficient"] = SDPA_CHOICES.get("efficient", 0) + 1
        bias = attn_mask
        if bias is not None and bias.dtype == torch.bool:
            bias = torch.where(bias, 0.0, torch.scalar_tensor(
                float("-inf"), dtype=query.dtype, device=bias.device))
        if bias is not None:
            # preprocess_mask: pad to 8-aligned strides, then expand (a view)
            if any(bias.stride(i) % 8 != 0 for i in range(bias.dim() - 1)):
                last = bias.shape[-1]
                bias = torch.nn.functional.pad(bias, (0, 8 - last % 8))[..., :last]
            bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, grad, dropout_p, is_causal, scale=scale)[0]
    SDPA_CHOICES["math"] = SDPA_CHOICES.get("math", 0) + 1
    return _ORIG_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                      is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _dropout_cuda(input, p=0.5, training=True, inplace=False):
    """F.dropout as aten::dropout runs on CUDA: native_dropout (bool mask) for 0 < p < 1."""
    if training and 0.0 < p < 1.0 and input.numel() > 0:
        out, _mask = torch.ops.aten.native_dropout(input, p, True)
        if inplace:
            return input.copy_(out)
        return out
    if not training or p == 0.0:
        return input
    return _ORIG_DROPOUT(input, p, training, inplace)


def _packed_cuda(position_ids):
    """masking_utils.find_packed_sequence_indices with its tensors computed and the answer None."""
    first_dummy_value = position_ids[:, :1] - 1
    position_diff = torch.diff(position_ids, prepend=first_dummy_value, dim=-1)
    packed_sequence_mask = (position_diff != 1).cumsum(-1)
    del packed_sequence_mask
    return None


_ORIG_AUTOCAST = torch.autocast


class _AutocastNoMeta(_ORIG_AUTOCAST):
    """torch.autocast(device_type="meta") raises; peft's lora.ParamWrapper opens a *disabled*
    autocast on its weight's device: the same no-op on CPU."""

    def __init__(self, device_type, *args, **kwargs):
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)


@contextlib.contextmanager
def cuda_choices():
    import transformers.masking_utils as mu
    saved = (torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.dropout,
             mu.find_packed_sequence_indices)
    torch.nn.functional.scaled_dot_product_attention = _sdpa_cuda
    torch.nn.functional.dropout = _dropout_cuda
    mu.find_packed_sequence_indices = _packed_cuda
    torch.autocast = _AutocastNoMeta
    try:
        yield
    finally:
        (torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.dropout,
         mu.find_packed_sequence_indices) = saved
        torch.autocast = _ORIG_AUTOCAST


# --------------------------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------------------------
def load_config(cfg: dict):
    from transformers import AutoConfig
    d = dict(cfg)
    mt = d.pop("model_type")
    for k in ("architectures", "auto_map", "_name_or_path", "transformers_version",
              "quantization_config", "torch_dtype", "dtype"):
        d.pop(k, None)
    return AutoConfig.for_model(mt, **d)


def build_model(cfg_dict: dict, dtype, attn: str):
    """AutoModelForCausalLM's class; for a config with a vision tower (Gemma 3, Llama 4) the
    multimodal wrapper (AutoModelForImageTextToText), so the vision weights are resident as in
    the published checkpoint (AutoModelForCausalLM already picks it for gemma3, and the
    text-only Llama4ForCausalLM for llama4)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    config = load_config(cfg_dict)
    if "vision_config" in cfg_dict:
        AutoModelForCausalLM = AutoModelForImageTextToText  # noqa: N806
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        except ValueError as e:
            # e.g. gpt-oss: "does not support ... scaled_dot_product_attention": what a user gets
            # after dropping attn_implementation is transformers' eager path
            if attn != "sdpa" or "scaled_dot_product_attention" not in str(e):
                raise
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     attn_implementation="eager")
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model.to(dtype)
    return model


def frozen_prefixes(model) -> list[str]:
    """Multimodal wrappers: the vision tower and projector stay frozen (text-only training)."""
    out = []
    for name, _m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("vision_tower", "multi_modal_projector", "vision_model", "audio_tower"):
            if not any(name.startswith(p + ".") for p in out):
                out.append(name)
    return out


def attn_effective(model) -> str:
    impl = getattr(model.config, "_attn_implementation", None)
    tc = getattr(model.config, "text_config", None)
    if tc is not None and getattr(tc, "_attn_implementation", None):
        impl = tc._attn_implementation
    return impl


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
def _versions():
    import peft
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "tracer": "tests/reference/trace.py"}


def run_case(case: dict, cfg_dict: dict, events: list | None = None) -> dict:
    """case: method, weights, batch, seq, grad_ckpt, attn, lora{r,alpha,dropout,targets,
    target_parameters} -> record with phases (bytes, workspace included)."""
    warnings.simplefilter("ignore")
    import transformers
    transformers.logging.set_verbosity_error()
    dtype = torch.bfloat16 if case.get("weights", "bf16") == "bf16" else torch.float32
    cur = ["model"]
    tracker = LiveBytes()
    if events is not None:
        # (phase, "alloc"|"free"|"resize", storage key, bytes, live bytes after), in order
        tracker.on_event = lambda kind, key, nb, live: events.append(
            (cur[0], kind, key, nb, live, tracker.current_op if kind == "alloc" else ""))
    SDPA_CHOICES.clear()
    rec = {}
    with cuda_choices():
        model = build_model(cfg_dict, dtype, case["attn"])
        rec["attn"] = attn_effective(model)
        rec["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
        method = case["method"]
        frozen = frozen_prefixes(model)
        if method == "full":
            for n, p in model.named_parameters():
                if any(n.startswith(f + ".") for f in frozen):
                    p.requires_grad_(False)
        if method in ("full", "lora") and case.get("grad_ckpt"):
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "lora":
            from peft import LoraConfig, get_peft_model
            lc = case["lora"]
            kw = dict(r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"], bias="none",
                      task_type="CAUSAL_LM")
            tm = lc.get("targets", "all-linear")
            kw["target_modules"] = tm if isinstance(tm, str) else list(tm)
            if lc.get("target_parameters"):
                kw["target_parameters"] = list(lc["target_parameters"])
            model = get_peft_model(model, LoraConfig(**kw))
            pc = model.peft_config["default"]
            # peft resolves "all-linear" to full module names: keep their last component
            names = {str(n).rsplit(".", 1)[-1] for n in (pc.target_modules or [])}
            rec["lora_resolved"] = {
                "target_modules": sorted(names),
                "target_parameters": sorted(pc.target_parameters or []),
                "adapted_modules": sum(1 for _n, m in model.named_modules()
                                       if hasattr(m, "lora_A") and len(m.lora_A) > 0),
            }
        if method == "inference":
            model.eval()
        else:
            model.train()
        rec["params_total"] = sum(p.numel() for p in model.parameters())
        rec["params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # resident state: every parameter and buffer storage, once
        for p in model.parameters():
            tracker.track(p)
        for b in model.buffers():
            tracker.track(b)
        rec["model_bytes"] = tracker.live
        b, s = case["batch"], case["seq"]
        vocab = getattr(model.config, "vocab_size", None) or model.config.get_text_config().vocab_size
        phases = {}
        with CountOutputs(tracker):
            ids = torch.randint(0, vocab, (b, s), device="meta")
            if method == "inference":
                from transformers import DynamicCache
                cur[0] = "fwd"
                tracker.reset_peak()
                with torch.no_grad():
                    cache = DynamicCache(config=model.config)
                    # generate()'s prefill: logits for the last position only
                    # (GenerationMixin sets logits_to_keep=1), then its fp32 copy of them
                    out = model(input_ids=ids, use_cache=True, past_key_values=cache,
                                logits_to_keep=1)
                    next_logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32)
                    del next_logits
                phases["fwd"] = tracker.peak + WORKSPACE_BYTES
                kv = 0
                seen = set()
                for layer in getattr(cache, "layers", []):
                    for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                        if isinstance(t, torch.Tensor) and t.numel() > 0:
                            k = t.untyped_storage()._cdata
                            if k not in seen:
                                seen.add(k)
                                kv += round_block(t.untyped_storage().nbytes())
                rec["kv_cache_bytes"] = kv
                rec["after_bytes"] = tracker.live + WORKSPACE_BYTES
                del out, cache
            else:
                params = [p for p in model.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, foreach=True)
                for step in (1, 2):
                    cur[0] = f"fwd{step}"
                    tracker.reset_peak()
                    loss = model(input_ids=ids, labels=ids).loss
                    phases[f"fwd{step}"] = tracker.peak + WORKSPACE_BYTES
                    cur[0] = f"bwd{step}"
                    tracker.reset_peak()
                    loss.backward()
                    phases[f"bwd{step}"] = tracker.peak + WORKSPACE_BYTES
                    del loss
                    cur[0] = f"opt{step}"
                    tracker.reset_peak()
                    opt.step()
                    phases[f"opt{step}"] = tracker.peak + WORKSPACE_BYTES
                    cur[0] = f"zero{step}"
                    opt.zero_grad(set_to_none=True)
                    phases[f"after{step}"] = tracker.live + WORKSPACE_BYTES
                rec["kv_cache_bytes"] = None
                del opt
            del ids
    rec["phases"] = phases
    keys = [k for k in phases if k[:3] in ("fwd", "bwd", "opt")]
    pk = max(keys, key=lambda k: phases[k])
    rec["peak_bytes"] = phases[pk]
    rec["peak_phase"] = pk[:3]
    rec["sdpa_kernels"] = dict(SDPA_CHOICES)
    del model
    return rec


# --------------------------------------------------------------------------------------------
# validation against the H200 ground truth
# --------------------------------------------------------------------------------------------
GT_DIR_CANDIDATES = [os.path.join(REPO, "..", "..", "shared", "groundtruth"),
                     "/work/shared/groundtruth"]


def gt_dir(arg=None):
    for d in ([arg] if arg else []) + GT_DIR_CANDIDATES:
        if d and os.path.isfile(os.path.join(d, "h200-pytorch.jsonl")):
            return d
    raise SystemExit("ground truth not found: pass --groundtruth DIR")


def validate(args):
    d = gt_dir(args.groundtruth)
    rows, skipped = [], []
    t0 = time.time()
    for line in open(os.path.join(d, "h200-pytorch.jsonl")):
        r = json.loads(line)
        if r.get("type") != "case":
            continue
        c = r["case"]
        why = None
        if c["method"] == "qlora_nf4":
            why = "QLoRA: bitsandbytes NF4 kernels have no meta implementation"
        elif c["method"] == "full_fp32_amp":
            why = "autocast: meta tensors do not run CUDA autocast's cast policy"
        elif c["optim"] != "adamw":
            why = f"optimizer {c['optim']}: fused/bitsandbytes kernels not traced"
        if r["status"] != "ok":
            why = f"status {r['status']}"
        if why:
            skipped.append((r["id"], why))
            continue
        cfg = r["config"]
        method = "full" if c["method"] == "full_bf16" else "lora"
        case = dict(method=method, weights="bf16", batch=c["batch"], seq=c["seq"],
                    grad_ckpt=c["grad_ckpt"], attn=c["attn"])
        if method == "lora":
            case["lora"] = dict(r=c["lora_r"], alpha=c["lora_alpha"], dropout=c["lora_dropout"],
                                targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                         "up_proj", "down_proj"])
        t = time.time()
        tr = run_case(case, cfg)
        sm = r["summary"]
        meas = max(sm["peak_alloc_step1"], sm["peak_alloc_step2"])
        err = (tr["peak_bytes"] - meas) / meas
        ph = r["phases"]
        rows.append(dict(id=r["id"], measured=meas, traced=tr["peak_bytes"], err=err,
                         phase=tr["peak_phase"], secs=time.time() - t,
                         meas_phases={k: ph[k]["peak_alloc"] for k in ph if k[:3] in ("fwd", "bwd", "opt")},
                         trace_phases=tr["phases"]))
        print(f"{err * 100:+8.4f}%  {meas / GiB:8.3f} {tr['peak_bytes'] / GiB:8.3f} GiB  "
              f"{time.time() - t:5.1f}s  {r['id']}", flush=True)
    errs = [abs(x["err"]) for x in rows]
    print(f"{len(rows)} traced, {len(skipped)} skipped, median |err| "
          f"{statistics.median(errs) * 100:.4f}%, max {max(errs) * 100:.4f}%, "
          f"{time.time() - t0:.0f}s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "skipped": skipped, "versions": _versions()}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("| case | measured GiB | trace GiB | error | peak phase (trace) |\n")
            f.write("|---|---:|---:|---:|---|\n")
            for x in rows:
                f.write(f"| {x['id'].replace('|', ' · ')} | {x['measured'] / GiB:.3f} | "
                        f"{x['traced'] / GiB:.3f} | {x['err'] * 100:+.4f}% | {x['phase']} |\n")
            f.write("\n| skipped case | why |\n|---|---|\n")
            for cid, why in skipped:
                f.write(f"| {cid.replace('|', ' · ')} | {why} |\n")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="trace the traceable H200 ground-truth cases")
    v.add_argument("--groundtruth", help="folder holding h200-pytorch.jsonl")
    v.add_argument("--out", help="write the per-case figures as JSON")
    v.add_argument("--markdown", help="write the per-case table as Markdown")
    g = sub.add_parser("generate", help="trace the reference grid into tests/data/reference")
    g.add_argument("--only", action="append", default=[])
    g.add_argument("--out", default=os.path.join(DATA, "traces.jsonl"))
    g.add_argument("--append", action="store_true")
    g.add_argument("--verbose", action="store_true")
    o = sub.add_parser("one", help="trace one case")
    o.add_argument("--config", required=True)
    o.add_argument("--method", default="full", choices=["full", "lora", "inference"])
    o.add_argument("--weights", default="bf16", choices=["bf16", "fp32"])
    o.add_argument("--batch", type=int, default=1)
    o.add_argument("--seq", type=int, default=512)
    o.add_argument("--grad-ckpt", action="store_true")
    o.add_argument("--attn", default="sdpa")
    o.add_argument("--lora-r", type=int, default=16)
    o.add_argument("--lora-alpha", type=int, default=32)
    o.add_argument("--lora-dropout", type=float, default=0.05)
    o.add_argument("--targets", default="all-linear")
    o.add_argument("--events", help="write every storage alloc/free in order as JSON lines "
                   "(phase, event, storage, bytes, live incl. workspace), e.g. for an allocator replay")
    args = ap.parse_args(argv)
    if args.cmd == "validate":
        return validate(args)
    if args.cmd == "generate":
        import reference_grid
        reference_grid.tr = sys.modules[__name__]
        return reference_grid.generate(args)
    cfg = json.load(open(args.config))
    case = dict(method=args.method, weights=args.weights, batch=args.batch, seq=args.seq,
                grad_ckpt=args.grad_ckpt, attn=args.attn)
    if args.method == "lora":
        tg = args.targets if args.targets == "all-linear" else args.targets.split(",")
        case["lora"] = dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                            targets=tg)
    t = time.time()
    events = [] if args.events else None
    rec = run_case(case, cfg, events)
    rec["secs"] = round(time.time() - t, 2)
    if args.events:
        with open(args.events, "w") as f:
            for ph, kind, key, nb, live, op in events:
                f.write(json.dumps({"phase": ph, "event": kind, "storage": key, "bytes": nb,
                                    "live": live + WORKSPACE_BYTES, "op": op}) + "\n")
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
