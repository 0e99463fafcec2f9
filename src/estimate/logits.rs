//! Logits and the loss: the largest single spike for large vocabularies.
//!
//! transformers' `ForCausalLMLoss` (loss_utils.py) upcasts the logits with `logits.float()` and
//! calls `cross_entropy` = `log_softmax` + `nll_loss` over all b·s positions (labels are shifted
//! by padding, not by slicing the logits). Alive at once in the forward: 16-bit logits, their
//! fp32 copy and the fp32 log-softmax, which is saved for backward. In the backward,
//! `nll_loss_backward` and `_log_softmax_backward_data` each allocate a b·s·V fp32 gradient
//! while the saved log-softmax is still alive: 12 B per logit, the peak of most LoRA and QLoRA
//! steps. The caller drops the model output, so the 16-bit logits do not outlive the forward.

use super::activations::Dtypes;

/// Logit bytes by stage for `tokens` positions over `vocab` classes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Logits {
    /// lm_head output in its dtype.
    pub raw: u128,
    /// The fp32 copy made by `.float()` (0 when the logits already are fp32).
    pub upcast: u128,
    /// fp32 log-softmax, saved for backward.
    pub log_softmax: u128,
    /// fp32 gradient buffers of nll_loss and log_softmax backward (each).
    pub grad_fp32: u128,
    /// The gradient cast back to the logits' dtype for lm_head's backward.
    pub grad_raw: u128,
}

// ANCHOR: logits
pub fn logits(dt: &Dtypes, tokens: u128, vocab: u128) -> Logits {
    let n = tokens * vocab;
    let raw = dt.logits * n;
    let upcast = if dt.logits == 4 { 0 } else { 4 * n };
    Logits {
        raw,
        upcast,
        log_softmax: 4 * n,
        grad_fp32: 4 * n,
        grad_raw: if dt.logits == 4 { 0 } else { raw },
    }
}
// ANCHOR_END: logits
