//! Logits and the loss: the largest single spike for large vocabularies, and how each loss
//! implementation changes it.
//!
//! - `ce`: transformers' `ForCausalLMLoss` (loss_utils.py, 5.17) upcasts the logits with
//!   `logits.float()` and calls `cross_entropy` = `log_softmax` + `nll_loss` over all b·s
//!   positions (labels are shifted by padding, not by slicing the logits). Alive at once in the
//!   forward: 16-bit logits, their fp32 copy and the fp32 log-softmax, which is saved for
//!   backward. In the backward, `nll_loss_backward` and `_log_softmax_backward_data` each allocate
//!   a b·s·V fp32 gradient while the saved log-softmax is still alive: 12 B per logit, the peak of
//!   most LoRA and QLoRA steps. The caller drops the model output, so the 16-bit logits do not
//!   outlive the forward.
//! - `chunked-nll`: TRL 1.10.0.dev0 `trl/trainer/sft_trainer.py` `_chunked_cross_entropy_loss`
//!   (`_CHUNKED_LM_HEAD_CHUNK_SIZE = 256`): the decoder output is flattened (a copy when b > 1,
//!   the `[..., :-1, :]` slice is not contiguous), re-ordered so supervised tokens come first
//!   (`hidden[order]`, a second copy that the checkpointed chunks keep until backward), then each
//!   256-token chunk runs `_chunk` under `torch.utils.checkpoint(use_reentrant=False)`:
//!   `h.float() @ w.float().t()` (an fp32 copy of the whole lm_head weight, and under the
//!   Trainer's bf16 autocast its bf16 cast beside it), `log_softmax`, `nll_loss`, and for the
//!   logged entropy `log_p.exp() * log_p`. Nothing of a chunk is saved in the forward; the
//!   backward recomputes one chunk at a time (early stop after the log-softmax), keeping the
//!   matmul's weight copy and the log-softmax, plus two fp32 chunk gradients. The gradient of the
//!   re-ordered hidden states accumulates in a b·s·h buffer, with one more from each chunk's
//!   `slice_backward`, and `index` backward scatters it into a fresh one.
//! - `liger`: Liger-Kernel 0.8.2 `ops/fused_linear_cross_entropy.py`: chunks of
//!   `next_power_of_2(ceil(BT / ceil(V / H)))` tokens, logits of a chunk in the input dtype,
//!   the gradient computed in place by the Triton kernel during the forward; `grad_input`
//!   (b·s·h) and, when lm_head trains, `grad_weight` (V·h) are allocated in the forward and are
//!   the backward's result (grad_output = 1 skips the rescale).
//! - `cce`: cut-cross-entropy 25.6.4 `cce.py` / `cce_backward.py`: blockwise log-sum-exp in
//!   SRAM; saved are the hidden states `e` (b·s·h) and the fp32 `lse` (b·s); the backward
//!   allocates `de` = zeros_like(e) and, when lm_head trains, `dc` = zeros_like(c).
//!
//! Expected error: `ce` is exact on the H200 measurements. `chunked-nll` is plain PyTorch derived
//! from the source, not yet traced: ±5% of this component (small buffers — labels, masks,
//! per-chunk scalars — are left out). `liger` and `cce` are Triton kernels: the buffers above
//! are exact allocations of their Python wrappers; SRAM tiles are not device memory; ±5%.

use crate::method::Loss;

use super::activations::Dtypes;

/// Logit bytes by stage for `tokens` positions over `vocab` classes (the `ce` loss).
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

/// TRL's `_CHUNKED_LM_HEAD_CHUNK_SIZE` (trl/trainer/sft_trainer.py, 1.10.0.dev0).
pub const TRL_CHUNK_TOKENS: u128 = 256;

/// One step of the loss's buffer walk (all in the `logits` category).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossEvent {
    Alloc(u128),
    Free(u128),
    /// Allocated and freed again (a transient inside one op or one chunk).
    Spike(u128),
}

/// What the loss allocates and frees, in step order. The step walk replays `forward` after the
/// final norm, `backward` at the start of the backward pass (before lm_head's own backward,
/// which allocates the b·s·h hidden-state gradient), and `after_head` once that gradient exists.
#[derive(Debug, Clone, PartialEq)]
pub struct LossWalk {
    pub forward: Vec<LossEvent>,
    pub backward: Vec<LossEvent>,
    pub after_head: Vec<LossEvent>,
    /// The largest single buffer (sets the allocator reserve).
    pub largest_block: u128,
    /// The highest live total of the walk itself (the loss "spike").
    pub peak: u128,
    pub explain: String,
}

/// The shapes and dtypes the loss sees.
#[derive(Debug, Clone, Copy)]
pub struct LossInput {
    pub tokens: u128,
    pub batch: u128,
    pub vocab: u128,
    pub hidden: u128,
    /// Whether lm_head's weight trains (full fine-tuning).
    pub head_trains: bool,
    /// Bytes per element of the lm_head weight.
    pub head_weight_bytes: u128,
    pub supervised_fraction: f64,
    /// Whether the loss runs under a 16-bit autocast (the Trainer's bf16/fp16 mixed precision).
    pub autocast: bool,
}

// ANCHOR: loss_walk
pub fn loss_walk(dt: &Dtypes, input: &LossInput, loss: Loss) -> LossWalk {
    use LossEvent::{Alloc, Free, Spike};
    let LossInput {
        tokens: t,
        vocab: v,
        hidden: h,
        ..
    } = *input;
    let d = dt.residual; // the decoder output (final norm) dtype
    let w = input.head_weight_bytes;
    let grad_w = if input.head_trains { v * h * w } else { 0 };
    let (forward, backward, after_head, largest, explain) = match loss {
        Loss::Ce => {
            let lg = logits(dt, t, v);
            (
                vec![
                    Alloc(lg.raw),
                    Alloc(lg.upcast),
                    Alloc(lg.log_softmax),
                    Free(lg.raw + lg.upcast),
                ],
                vec![
                    Alloc(2 * lg.grad_fp32),
                    Free(lg.grad_fp32 + lg.log_softmax),
                    Alloc(lg.grad_raw),
                    Free(lg.grad_fp32),
                ],
                vec![Free(lg.grad_raw)],
                lg.grad_fp32.max(lg.raw),
                format!(
                    "{t} tokens × vocab {v} = {} logits: {}-bit logits + fp32 upcast + fp32 log-softmax (saved) in the forward; 2 fp32 gradients beside the saved log-softmax in the backward (transformers ForCausalLMLoss; 12 B/logit at the backward spike)",
                    t * v,
                    dt.logits * 8
                ),
            )
        }
        Loss::ChunkedNll => {
            let c = TRL_CHUNK_TOKENS.min(t);
            let flat = if input.batch > 1 { t * h * d } else { 0 };
            let packed = t * h * d;
            // int64 argsort indices (saved by `index`) and the re-ordered int64 labels.
            let order = 2 * 8 * t;
            // Under the Trainer's 16-bit autocast the matmul casts its fp32 operands back to
            // 16 bit: both copies of the weight exist while it runs.
            let autocast = input.autocast && dt.compute < 4;
            let w_fp32 = if w == 4 { 0 } else { 4 * v * h };
            let (w_cast, h_cast, lg_bytes) = if autocast {
                (dt.compute * v * h, dt.compute * c * h, dt.compute)
            } else {
                (0, 0, 4)
            };
            let matmul = w_fp32 + w_cast + 4 * c * h + h_cast + lg_bytes * c * v;
            // logits + log_softmax + exp + exp·log_p (the entropy metric), fp32 after the
            // autocast policy's upcast for log_softmax.
            let tail = lg_bytes * c * v + 3 * 4 * c * v;
            let chunk_fwd = matmul.max(tail);
            // Backward of one chunk: the recompute keeps the weight copy the matmul saved, the
            // chunk's logits and its log-softmax (traced: tests/data/reference/chunked_nll.json);
            // nll and log_softmax backward add two fp32 chunk gradients. A trained head also
            // keeps the fp32 chunk input, and its weight gradient exists from the first chunk on.
            let saved_w = if autocast { w_cast } else { w_fp32 };
            let saved_h = if input.head_trains { 4 * c * h } else { 0 };
            let recompute = matmul;
            let grads = saved_w + saved_h + lg_bytes * c * v + 4 * c * v + 2 * 4 * c * v;
            let chunk_bwd = recompute.max(grads);
            let index_bwd = packed;
            (
                vec![
                    Alloc(flat),
                    Alloc(order),
                    Alloc(packed),
                    Free(flat),
                    Spike(chunk_fwd),
                ],
                vec![
                    Alloc(packed), // accumulated gradient of `hidden[order]`
                    Alloc(grad_w),
                    Spike(chunk_bwd),
                    Alloc(index_bwd),
                    // lm_head's weight gradient is handed to the step walk, which allocates it.
                    Free(packed + packed + order + grad_w),
                ],
                vec![Free(index_bwd)],
                [w_fp32, w_cast, packed, 4 * c * v].into_iter().max().unwrap_or(0),
                format!(
                    "TRL chunked_nll: {t} tokens ({:.0}% supervised: {} chunks of {c}) never form b·s·V logits; re-ordered hidden copy {packed} B kept to backward; a chunk's forward peaks at {chunk_fwd} B (fp32 lm_head copy {w_fp32} B{}, chunk logits {} B), its backward at {chunk_bwd} B (trl/trainer/sft_trainer.py 1.10.0.dev0; traced without autocast to within 16 KiB, tests/data/reference/chunked_nll.json; the autocast casts are derived: ±5%)",
                    input.supervised_fraction * 100.0,
                    chunks(t, input.supervised_fraction, c),
                    if autocast { format!(" + its {}-bit autocast cast {w_cast} B", dt.compute * 8) } else { String::new() },
                    lg_bytes * c * v,
                ),
            )
        }
        Loss::Liger => {
            let inc = v.div_ceil(h.max(1));
            let chunk = t.div_ceil(inc.max(1)).next_power_of_two().min(t);
            let grad_input = t * h * d;
            let loss_1d = 4 * t;
            let chunk_logits = chunk * v * d;
            // grad_input[chunk] = grad_logits @ weight (a chunk·h temporary); a trained head
            // also adds `torch.mm(grad_logits.t(), input).float()` (V·h in the input dtype, then
            // fp32) unless addmm's out_dtype path applies (fp32 grad_weight, torch >= 2.8).
            let head_mm = if input.head_trains && w != 4 {
                v * h * d + v * h * 4
            } else {
                0
            };
            let chunk_peak = chunk_logits + (chunk * h * d).max(head_mm);
            (
                vec![
                    Alloc(grad_input),
                    Alloc(grad_w),
                    Alloc(loss_1d),
                    Spike(chunk_peak),
                    Free(loss_1d),
                ],
                // The backward returns the saved gradients; lm_head's backward in the step walk
                // allocates the same b·s·h (and V·h) again, so they are handed over here.
                vec![Free(grad_input + grad_w)],
                vec![],
                chunk_logits.max(grad_input).max(grad_w),
                format!(
                    "Liger fused linear cross-entropy: chunks of {chunk} tokens (next_power_of_2(⌈{t} / ⌈{v}/{h}⌉⌉)), chunk logits {chunk_logits} B in the input dtype, gradient written in place; grad_input {grad_input} B{} allocated in the forward (Liger-Kernel 0.8.2 ops/fused_linear_cross_entropy.py; Triton, derived from source: ±5%)",
                    if grad_w > 0 { format!(" + grad_weight {grad_w} B") } else { String::new() }
                ),
            )
        }
        Loss::Cce => {
            let e = t * h * d;
            let lse = 4 * t;
            let neg_dot = 4 * t;
            (
                vec![Alloc(e), Alloc(lse), Spike(neg_dot)],
                vec![Alloc(e + grad_w), Free(e + lse), Free(e + grad_w)],
                vec![],
                e.max(grad_w),
                format!(
                    "Cut Cross-Entropy: no logits in memory; saved hidden states {e} B + fp32 log-sum-exp {lse} B; backward de {e} B{} (cut-cross-entropy 25.6.4 cce.py / cce_backward.py; Triton, derived from source: ±5%)",
                    if grad_w > 0 { format!(" + dc {grad_w} B") } else { String::new() }
                ),
            )
        }
    };
    let peak = walk_peak(&forward, &backward, &after_head);
    LossWalk {
        forward,
        backward,
        after_head,
        largest_block: largest,
        peak,
        explain,
    }
}
// ANCHOR_END: loss_walk

/// Chunks TRL runs: ⌈supervised tokens / chunk⌉ (padded up to whole chunks).
fn chunks(tokens: u128, fraction: f64, chunk: u128) -> u128 {
    let supervised = ((tokens as f64) * fraction).ceil() as u128;
    supervised.max(1).div_ceil(chunk.max(1))
}

/// The highest live total of the events alone (starting from zero).
fn walk_peak(forward: &[LossEvent], backward: &[LossEvent], after: &[LossEvent]) -> u128 {
    let (mut live, mut peak) = (0u128, 0u128);
    for e in forward.iter().chain(backward).chain(after) {
        match *e {
            LossEvent::Alloc(b) => {
                live += b;
                peak = peak.max(live);
            }
            LossEvent::Free(b) => live = live.saturating_sub(b),
            LossEvent::Spike(b) => peak = peak.max(live + b),
        }
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16() -> Dtypes {
        Dtypes {
            compute: 2,
            residual: 2,
            linear_out: 2,
            attention: 2,
            logits: 2,
            autocast: false,
        }
    }

    /// Llama-3.1-8B's head at batch 4 × 4096.
    fn input() -> LossInput {
        LossInput {
            tokens: 4 * 4096,
            batch: 4,
            vocab: 128_256,
            hidden: 4096,
            head_trains: false,
            head_weight_bytes: 2,
            supervised_fraction: 1.0,
            autocast: true,
        }
    }

    fn balanced(w: &LossWalk) -> bool {
        let sum = |evs: &[LossEvent]| -> i128 {
            evs.iter()
                .map(|e| match *e {
                    LossEvent::Alloc(b) => b as i128,
                    LossEvent::Free(b) => -(b as i128),
                    LossEvent::Spike(_) => 0,
                })
                .sum()
        };
        sum(&w.forward) + sum(&w.backward) + sum(&w.after_head) == 0
    }

    #[test]
    fn ce_spike_is_twelve_bytes_per_logit_plus_the_16_bit_gradient() {
        let w = loss_walk(&bf16(), &input(), Loss::Ce);
        let n = 16_384 * 128_256;
        // Backward: log-softmax + two fp32 gradients = 12 B per logit.
        assert_eq!(w.peak, 12 * n);
        assert!(balanced(&w));
    }

    #[test]
    fn chunked_and_fused_losses_stay_under_a_quarter_of_ce() {
        let ce = loss_walk(&bf16(), &input(), Loss::Ce).peak;
        for loss in [Loss::ChunkedNll, Loss::Liger, Loss::Cce] {
            let w = loss_walk(&bf16(), &input(), loss);
            assert!(balanced(&w), "{loss}");
            assert!(w.peak * 4 <= ce, "{loss}: {} vs ce {ce}", w.peak);
        }
    }

    #[test]
    fn chunked_nll_by_hand() {
        // Forward chunk under bf16 autocast: fp32 weight copy 4·V·h + its bf16 cast 2·V·h +
        // h.float() 4·256·h + its cast 2·256·h + bf16 logits 2·256·V.
        let (v, h, c) = (128_256u128, 4096u128, 256u128);
        let fwd = 6 * v * h + 6 * c * h + 2 * c * v;
        let w = loss_walk(&bf16(), &input(), Loss::ChunkedNll);
        assert_eq!(w.forward[4], LossEvent::Spike(fwd));
        // Live beside it: the re-ordered copy (t·h·2), the int64 order and labels (16·t), and
        // in the backward the accumulated gradient of the copy (t·h·2); at this shape the
        // recompute's weight copies outweigh the chunk's gradients (2·V·h + 14·256·V).
        let t = 16_384u128;
        let packed = t * h * 2;
        assert_eq!(w.peak, packed + 16 * t + packed + fwd);
    }

    #[test]
    fn liger_chunk_size_follows_the_source_example() {
        // The source's own example: BT = 4096·4, V = 32000, H = 4096 → chunk_size 2048.
        let mut i = input();
        i.vocab = 32_000;
        let w = loss_walk(&bf16(), &i, Loss::Liger);
        assert!(w.explain.contains("chunks of 2048 tokens"), "{}", w.explain);
    }
}

#[cfg(test)]
mod traced {
    //! TRL's `_chunked_cross_entropy_loss` traced by tests/reference/trace_chunked_nll.py (CPU
    //! tensors, no autocast; numbers in tests/data/reference/chunked_nll.json).
    use super::*;

    const TRACE: &str = include_str!("../../tests/data/reference/chunked_nll.json");

    /// Live bytes and peak after replaying `events` from `live`.
    fn replay<'a>(events: impl IntoIterator<Item = &'a LossEvent>, live: &mut i128) -> i128 {
        let mut peak = *live;
        for e in events {
            match *e {
                LossEvent::Alloc(x) => {
                    *live += x as i128;
                    peak = peak.max(*live);
                }
                LossEvent::Free(x) => *live -= x as i128,
                LossEvent::Spike(x) => peak = peak.max(*live + x as i128),
            }
        }
        peak
    }

    #[test]
    fn chunked_nll_matches_the_trace() {
        let doc: serde_json::Value = serde_json::from_str(TRACE).unwrap();
        let dt = Dtypes {
            compute: 2,
            residual: 2,
            linear_out: 2,
            attention: 2,
            logits: 2,
            autocast: false,
        };
        let cases = doc["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 4);
        for case in cases {
            let n = |k: &str| u128::from(case[k].as_u64().unwrap());
            let (b, s, h, v) = (n("batch"), n("seq"), n("hidden"), n("vocab"));
            let input = LossInput {
                // the loss sees b·(s − 1) positions after the shift
                tokens: b * (s - 1),
                batch: b,
                vocab: v,
                hidden: h,
                head_trains: case["head_trains"].as_bool().unwrap(),
                head_weight_bytes: 2,
                supervised_fraction: case["supervised_fraction"].as_f64().unwrap(),
                autocast: false,
            };
            let w = loss_walk(&dt, &input, Loss::ChunkedNll);
            // As the trace measured: forward; then backward including the gradient of the b·s·h
            // decoder output, which the step walk allocates before `after_head`.
            let mut live = 0i128;
            let fwd_peak = replay(&w.forward, &mut live);
            let after_fwd = live;
            let hidden_grad = [LossEvent::Alloc(b * s * h * 2)];
            let bwd_peak = replay(
                w.backward.iter().chain(&hidden_grad).chain(&w.after_head),
                &mut live,
            );
            let close = |model: i128, key: &str| {
                let traced = case[key].as_u64().unwrap() as i128;
                // The scalars, masks and 512-B rounding the model leaves out: < 16 KiB.
                assert!(
                    (model - traced).abs() < 16 * 1024,
                    "{key}: model {model} vs traced {traced} ({case})"
                );
            };
            close(fwd_peak, "forward_peak");
            close(after_fwd, "after_forward");
            close(bwd_peak, "backward_peak");
        }
    }
}
