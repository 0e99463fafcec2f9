//! Liger's decoder-layer kernels (`apply_liger_kernel_to_llama(rms_norm=True, swiglu=True,
//! rope=True)`): what they save for backward instead of the PyTorch ops.
//!
//! Sources, Liger-Kernel 0.8.2:
//! - `ops/rms_norm.py` `LigerRMSNormFunction`: saves `X` (the norm's input in its own dtype), `W`
//!   and `RSTD` (one fp32 per row in the "llama" casting mode). PyTorch's `LlamaRMSNorm` saves an
//!   fp32 copy of the input and the rsqrt (and the normalized copy when the weight trains); Liger
//!   saves `d·h + 4` B/token instead of `4·h + 4 (+ d·h)`.
//! - `ops/swiglu.py` `LigerSiLUMulFunction`: saves the gate and up projections `a`, `b` and
//!   recomputes `silu(a)` in backward: no SiLU output is kept (`2·d·i` B/token instead of `3·d·i`).
//! - `ops/rope.py` `LigerRopeFunction`: saves `cos` and `sin`, as transformers' RoPE does: no
//!   change.
//!
//! Applied to `LlamaRMSNorm`-style norms (`NormKind::Rms`, q/k norms included: Liger patches the
//! class) and to SwiGLU with separate gate and up projections; MoE experts and fused gate_up
//! projections keep the PyTorch ops. The kernels are Triton; their saved tensors are exact, their
//! in-kernel tiles are not device memory. Forward transients (the fp32 intermediates of PyTorch's
//! RMSNorm) are left as modelled: ±5% of the activations.

use crate::arch::{Act, LayerRecipe, NormKind, OpKind};
use crate::method::{Job, Method};

use super::activations::{LayerInventory, Saved};

// ANCHOR: liger_kernels
/// `inv` (the inventory of `layer`) with Liger's kernels in place of the PyTorch ops.
pub fn apply(job: &Job, layer: &LayerRecipe, inv: LayerInventory, tokens: u128) -> LayerInventory {
    if !job.liger_kernels || job.method == Method::Inference {
        return inv;
    }
    let mut inv = inv;
    for (op, cost) in layer.ops.iter().zip(inv.ops.iter_mut()) {
        match &op.kind {
            // A norm that saves anything saves its input and one fp32 rstd per row (group).
            OpKind::Norm(n) if n.kind == NormKind::Rms && !cost.saved.is_empty() => {
                cost.saved = vec![
                    Saved::Shared(op.inputs[0]),
                    Saved::Own(tokens * 4 * n.groups),
                ];
                cost.bwd_script.clear();
                cost.fwd_script_nosave.clear();
            }
            // SwiGLU keeps gate and up, not the SiLU output (the op's own tensor).
            OpKind::Glu(Act::Silu) if op.inputs[0] != op.inputs[1] => {
                cost.saved.retain(|s| matches!(s, Saved::Shared(_)));
                cost.bwd_script.clear();
                cost.fwd_script_nosave.clear();
            }
            _ => {}
        }
    }
    // `silu(gate) * up` as one kernel (`LigerSiLUMulFunction`): no SiLU output; the product
    // saves gate and up.
    for (i, op) in layer.ops.iter().enumerate() {
        let OpKind::Act(Act::Silu) = op.kind else {
            continue;
        };
        let Some(m) = layer
            .ops
            .iter()
            .position(|o| o.kind == OpKind::Mul && o.inputs[0] == op.output)
        else {
            continue;
        };
        inv.tensor_bytes[op.output] = 0;
        inv.ops[i].saved.clear();
        inv.ops[i].bwd_script.clear();
        let up = layer.ops[m].inputs[1];
        inv.ops[m].saved = vec![Saved::Shared(op.inputs[0]), Saved::Shared(up)];
        inv.ops[m].bwd_script.clear();
    }
    inv
}
// ANCHOR_END: liger_kernels

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::activations::inventory;
    use crate::model::resolve_model;

    #[test]
    fn lora_bf16_layer_saves_two_norm_copies_and_one_swiglu_tensor_less() {
        let (model, _) = resolve_model("llama-3.1-8b").unwrap();
        let mut job = Job::new(model, Method::Lora);
        let layer = job.model.recipe.kinds[0].clone();
        let base = inventory(&job, &layer, 10, true);
        job.liger_kernels = true;
        let liger = apply(&job, &layer, inventory(&job, &layer, 10, true), 10);
        // Per norm: (4·h + 4) − (2·h + 4) = 2·4096 (the bf16 input is a new saved tensor, the
        // fp32 copy goes); SwiGLU: 2 B × 14336.
        let per_token = 2 * (2 * 4096) + 2 * 14_336;
        assert_eq!(base.saved() - liger.saved(), 10 * per_token);
    }

    #[test]
    fn off_changes_nothing() {
        let (model, _) = resolve_model("llama-3.2-1b").unwrap();
        let job = Job::new(model, Method::Full);
        let layer = job.model.recipe.kinds[0].clone();
        let base = inventory(&job, &layer, 7, true);
        assert_eq!(apply(&job, &layer, base.clone(), 7), base);
    }
}
