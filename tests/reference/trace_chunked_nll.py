#!/usr/bin/env python3
"""Trace TRL's chunked NLL loss: live bytes of its forward and backward, as memplan's
`estimate::logits::loss_walk(.., Loss::ChunkedNll)` models them.

TRL's code is not copied here: `_chunk` and `_chunked_cross_entropy_loss` are read from the
`trl/trainer/sft_trainer.py` you point at (`--trl-sft-trainer`, e.g. an installed TRL's, or a
checkout at the version the model cites, 1.10.0.dev0 / f2cd5771) and run as they are, with
`maybe_gather_lm_head_ctx` (an FSDP helper) replaced by a no-op.

Live bytes are counted with the reference tracer's `LiveBytes` + `CountOutputs` (trace.py in
this folder: every op output's storage, 512-B blocks, freed when the storage dies) on real CPU
tensors: the loss has data-dependent control flow (`if n_valid == 0`, `range(0, n_padded, ...)`)
that meta tensors cannot run. The ops involved (mm, log_softmax, nll_loss, argsort, index, exp,
mul, sum, non-reentrant checkpoint) save the same tensors on CPU and CUDA
(tools/autograd/derivatives.yaml). No autocast: CPU autocast's cast policy is not CUDA's, so the
traced path is the plain bf16 one (memplan's `LossInput { autocast: false }`).

Usage: trace_chunked_nll.py --trl-sft-trainer PATH [--out tests/data/reference/chunked_nll.json]
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from trace import CountOutputs, LiveBytes  # noqa: E402

CHUNK = 256  # trl/trainer/sft_trainer.py _CHUNKED_LM_HEAD_CHUNK_SIZE

#: (batch, seq, hidden, vocab, head_trains, supervised fraction)
CASES = [
    (2, 1025, 256, 8192, False, 1.0),
    (1, 2049, 256, 8192, False, 1.0),
    (4, 513, 128, 16384, False, 0.5),
    (2, 1025, 256, 8192, True, 1.0),
]


def load_trl(path):
    tree = ast.parse(open(path).read(), path)
    wanted = {"_chunk", "_chunked_cross_entropy_loss"}
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    if {n.name for n in body} != wanted:
        raise SystemExit(f"{path}: no {sorted(wanted)} (a TRL without chunked_nll?)")
    ns = {
        "torch": torch,
        "F": torch.nn.functional,
        "maybe_gather_lm_head_ctx": lambda w, b: contextlib.nullcontext(),
    }
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), ns)
    return ns["_chunked_cross_entropy_loss"]


def run(fn, b, s, h, v, head_trains, supervised):
    tracker = LiveBytes(device_types=("cpu",))
    torch.manual_seed(0)
    with CountOutputs(tracker):
        hidden = torch.randn(b, s, h, dtype=torch.bfloat16).requires_grad_()
        weight = torch.randn(v, h, dtype=torch.bfloat16).requires_grad_(head_trains)
        labels = torch.randint(0, v, (b, s))
        masked = int(round(s * (1 - supervised)))
        if masked:
            labels[:, :masked] = -100
        base = tracker.live
        tracker.reset_peak()
        # SFTTrainer.compute_loss logs the entropy and accuracy, then drops the model output:
        # only the loss reaches backward (its graph keeps the checkpoint frames, the entropy's
        # would keep their recomputed tensors too).
        loss = fn(hidden, weight, CHUNK, labels=labels)[0]
        fwd_peak, fwd_live = tracker.peak - base, tracker.live - base
        tracker.reset_peak()
        loss.backward()
        bwd_peak, bwd_live = tracker.peak - base, tracker.live - base
        del loss
    return dict(batch=b, seq=s, hidden=h, vocab=v, head_trains=head_trains,
                supervised_fraction=supervised, forward_peak=fwd_peak, after_forward=fwd_live,
                backward_peak=bwd_peak, after_backward=bwd_live)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trl-sft-trainer", required=True)
    ap.add_argument("--out")
    a = ap.parse_args()
    fn = load_trl(a.trl_sft_trainer)
    rows = [run(fn, *c) for c in CASES]
    doc = {"source": "trl/trainer/sft_trainer.py _chunked_cross_entropy_loss",
           "torch": torch.__version__, "tracer": "tests/reference/trace_chunked_nll.py",
           "cases": rows}
    text = json.dumps(doc, indent=1)
    if a.out:
        open(a.out, "w").write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
