//! Liger's decoder-layer kernels (`apply_liger_kernel_to_llama(rms_norm=True, swiglu=True,
//! rope=True)`): what they save for backward instead of the PyTorch ops.
//!
//! Sources, Liger-Kernel 0.8.2:
//! - `ops/rms_norm.py` `LigerRMSNormFunction`: saves `X` (the norm's input in its own dtype), `W`
//!   and `RSTD` (one fp32 per row in the "llama" casting mode). PyTorch's `LlamaRMSNorm` saves an
//!   fp32 copy of the input and the rsqrt (and the normalized copy when the weight trains), so a
//!   norm saves `d·h + 4` B/token instead of `4·h + 4 (+ d·h)`.
//! - `ops/swiglu.py` `LigerSiLUMulFunction`: saves the gate and up projections `a`, `b` and
//!   recomputes `silu(a)` in backward: `2·d·i` B/token instead of silu's input, silu's output and
//!   the up output (`3·d·i`).
//! - `ops/rope.py` `LigerRopeFunction`: saves `cos` and `sin`, as transformers' RoPE does: no
//!   change.
//!
//! Only dense MLPs use `LigerSwiGLUMLP`; MoE experts keep the PyTorch ops. The kernels are Triton;
//! their saved tensors are exact, their in-kernel tiles are not device memory. Forward
//! transients (the fp32 intermediates of PyTorch's RMSNorm) are left as modelled: ±5% of the
//! activations.

use crate::method::{Job, Method};

use super::activations::{norm_saved_per_token, Dtypes, LayerProfile};

/// Per-token bytes one RMSNorm over `width` saves less under Liger.
fn norm_saving(job: &Job, dt: &Dtypes, width: u128) -> u128 {
    norm_saved_per_token(job, dt, width).saturating_sub(dt.residual * width + 4)
}

// ANCHOR: liger_kernels
/// `profile` with Liger's kernels; `norms` says which of the layer's two RMSNorms save anything
/// (the first layer of a frozen base may save nothing at its norms).
pub fn apply(job: &Job, profile: &LayerProfile, tokens: u128, norms: [bool; 2]) -> LayerProfile {
    let mut p = profile.clone();
    if !job.liger_kernels || job.method == Method::Inference {
        return p;
    }
    let dt = Dtypes::of(job);
    let m = &job.model;
    let norm = norm_saving(job, &dt, m.hidden);
    if norms[0] && p.attn_saved > 0 {
        p.attn_saved -= tokens * norm;
        p.attn_saved_per_token -= norm;
    }
    if norms[1] {
        p.mlp_saved -= tokens * norm;
        p.mlp_saved_per_token -= norm;
    }
    if m.moe.is_none() && p.mlp_saved > 0 {
        let swiglu = dt.linear_out * m.intermediate;
        p.mlp_saved -= tokens * swiglu;
        p.mlp_saved_per_token -= swiglu;
    }
    p
}
// ANCHOR_END: liger_kernels

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::activations::layer_profile;
    use crate::model::resolve_model;

    #[test]
    fn lora_bf16_layer_saves_two_norm_copies_and_one_swiglu_tensor_less() {
        let (model, _) = resolve_model("llama-3.1-8b").unwrap();
        let mut job = Job::new(model, Method::Lora);
        let base = layer_profile(&job, 10);
        job.liger_kernels = true;
        let liger = apply(&job, &base, 10, [true, true]);
        // Per norm: (4·h + 4) − (2·h + 4) = 2·4096; SwiGLU: 2 B × 14336.
        let per_token = 2 * (2 * 4096) + 2 * 14_336;
        assert_eq!(base.saved() - liger.saved(), 10 * per_token);
    }

    #[test]
    fn off_changes_nothing() {
        let (model, _) = resolve_model("llama-3.2-1b").unwrap();
        let job = Job::new(model, Method::Full);
        let base = layer_profile(&job, 7);
        assert_eq!(apply(&job, &base, 7, [true, true]), base);
    }
}
