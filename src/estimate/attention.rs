//! The rules of attention: which kernel SDPA runs (cuDNN, flash, memory-efficient, math), eager
//! attention, RoPE — what each saves, its forward intermediates and its backward in the order
//! autograd creates them (`activations.rs` holds the shared types and the other ops).

use crate::arch::{AttnSpec, T};
use crate::method::{Attention, Job};

use super::activations::{Ctx, Fwd, OpCost, Saved, Script};
use super::backward::{Bwd, BwdScript};

/// Whether SDPA needs a mask for this layer (and so runs memory-efficient attention): a sliding
/// window no longer than the sequence (transformers `sdpa_mask` skips the mask when
/// `kv_length < local_attention_size` and nothing is padded).
pub fn sdpa_masked(job: &Job, a: &AttnSpec) -> bool {
    a.window.is_some_and(|w| job.seq >= w)
}

pub(super) fn attention_fwd_transient(cx: &Ctx, a: &AttnSpec) -> u128 {
    match cx.job.attention {
        Attention::Eager => cx.tokens * 2 * cx.dt.compute * a.heads * cx.job.seq,
        _ => 0,
    }
}

pub(super) fn attention(
    cx: &Ctx,
    a: &AttnSpec,
    (inputs, separate): (&[T], bool),
    out: T,
    c: &mut OpCost,
) {
    let v = inputs[2];
    let t = cx.tokens;
    let s_b = cx.dt.attention;
    let (q, kv) = (a.heads * a.qk_head_dim, a.kv_heads * a.qk_head_dim);
    let vq = a.heads * a.v_head_dim;
    let seq = cx.job.seq;
    c.fwd_transient = attention_fwd_transient(cx, a);
    // With a DynamicCache (use_cache, no checkpointing) the attention gets `torch.cat` copies of
    // k and v: v is then its own tensor, not a view of the projection's output.
    let cached = cx.job.model.recipe.use_cache && !cx.job.grad_checkpointing;
    let v_saved = if cached {
        Saved::Own(t * s_b * a.kv_heads * a.v_head_dim)
    } else {
        Saved::Shared(v)
    };
    // SDPA on 32-bit q, k, v with grouped kv heads runs the math backend (PyTorch 2.11
    // `sdp_utils.cpp`: cuDNN and flash take 16-bit inputs only, memory-efficient attention no
    // GQA); fp32 norm weights (`prepare_model_for_kbit_training`) or fp32 training get there.
    let plain = inputs[1] != inputs[2] || inputs[0] == inputs[1];
    if cx.job.attention == Attention::Sdpa
        && s_b == 4
        && a.heads != a.kv_heads
        && !sdpa_masked(cx.job, a)
        && plain
        && a.qk_head_dim == a.v_head_dim
    {
        let scores = t * a.heads * seq;
        c.saved.push(Saved::Own(t * 4 * q));
        c.saved.push(Saved::Own(t * 4 * q));
        c.saved.push(Saved::Own(4 * scores));
        c.saved.push(Saved::Own(t * 4 * vq));
        let widths = (q, kv, a.kv_heads * a.v_head_dim, vq);
        let shapes = (scores, t * a.heads);
        c.fwd_script = math_sdpa_script(t, widths, shapes, seq * seq, cached, true);
        c.fwd_script_nosave = math_sdpa_script(t, widths, shapes, seq * seq, cached, false);
        c.bwd_script = math_sdpa_bwd_script(t, widths, scores, separate);
        return;
    }
    match cx.job.attention {
        Attention::Sdpa | Attention::Flash
            if !(cx.job.attention == Attention::Sdpa && sdpa_masked(cx.job, a)) =>
        {
            // Flash attention: roped q and k, v (a view of its projection's output), the output
            // (o_proj's input) and the fp32 log-sum-exp per head.
            c.saved.push(Saved::Own(t * s_b * q));
            c.saved.push(Saved::Own(t * s_b * kv));
            c.saved.push(v_saved);
            c.saved.push(Saved::Shared(out));
            c.saved.push(Saved::Own(t * 4 * a.heads));
            c.bwd_transient = t * (s_b * (2 * q + 2 * kv) + 4 * a.heads);
            // Separate q, k, v (or one fused qkv); not MLA, whose k and v come from one
            // projection and whose rope covers part of the head.
            let plain = inputs[1] != inputs[2] || inputs[0] == inputs[1];
            if plain {
                let vkv = a.kv_heads * a.v_head_dim;
                c.fwd_script = flash_script(t * s_b * q, t * s_b * kv, cached);
                // `query_states, key_states = apply_rotary_pos_emb(...)`: locals of the
                // attention's forward until it returns (after o_proj).
                c.held_by_module = vec![0, 1];
                let fa2 = cx.job.attention == Attention::Flash;
                c.bwd_script = flash_bwd_script(
                    t,
                    s_b,
                    (q, kv, vkv, vq),
                    a.heads,
                    (a.kv_heads != a.heads, fa2, separate),
                );
            }
        }
        Attention::Sdpa | Attention::Flash => {
            // Memory-efficient attention with the window mask: k and v repeated to every head,
            // the mask converted to a 16-bit additive bias (b·s·s per layer).
            c.saved.push(Saved::Own(t * s_b * (2 * q + vq)));
            c.saved.push(Saved::Shared(out));
            c.saved.push(Saved::Own(t * 4 * a.heads));
            c.saved.push(Saved::Own(t * seq * cx.dt.compute));
            c.bwd_transient = t * (s_b * (3 * q + vq) + 4 * a.heads);
        }
        Attention::Eager => {
            let repeated = a.kv_heads != a.heads;
            let plain =
                (inputs[1] != inputs[2] || inputs[0] == inputs[1]) && !a.sinks && !a.softcap;
            let scores = t * a.heads * seq;
            if plain {
                // q (roped), k (roped; repeated for GQA), the fp32 softmax, its 16-bit cast, v
                // (repeated, or its projection's output).
                c.saved.push(Saved::Own(t * s_b * q));
                c.saved
                    .push(Saved::Own(t * s_b * if repeated { q } else { kv }));
                c.saved.push(Saved::Own(4 * scores));
                c.saved.push(Saved::Own(s_b * scores));
                c.saved.push(if repeated {
                    Saved::Own(t * s_b * vq)
                } else {
                    v_saved
                });
                let widths = (q, kv, a.kv_heads * a.v_head_dim, vq);
                c.fwd_script = eager_script(t, s_b, widths, scores, cached, repeated);
                c.held_by_layer = Some(3);
                c.bwd_script = eager_bwd_script(t, s_b, widths, scores, (repeated, separate));
                return;
            }
            // q, k (roped; repeated for GQA), v (repeated, or its projection's output).
            c.saved
                .push(Saved::Own(t * s_b * (q + if repeated { q } else { kv })));
            if repeated {
                c.saved.push(Saved::Own(t * s_b * vq));
            } else {
                c.saved.push(v_saved);
            }
            let per_score = if a.sinks {
                s_b
            } else {
                4 + s_b + if a.softcap { s_b } else { 0 }
            };
            c.saved.push(Saved::Own(t * per_score * a.heads * seq));
            // Per score in backward: the softmax output's gradient chain — the matmul's gradient
            // (2 B), its fp32 cast and `_softmax_backward_data` (4 + 4 B). With sinks the
            // softmax ran in bf16: the scores' gradient, its zero-padded [.., s+1] copy for the
            // slice, the softmax and max-subtraction gradients (2 B each, at most 3 alive).
            let per_score = if a.sinks { 6 } else { 10 };
            c.bwd_transient = t * (per_score * a.heads * seq + 3 * s_b * q);
        }
    }
}

/// RoPE's forward on one projection (`q * cos + rotate_half(q) * sin`): saved as `j`, or left
/// as a temporary (returned) for a copy that is saved instead.
fn rope_fwd(s: &mut Script, n: u128, j: Option<usize>) -> Option<usize> {
    let t1 = s.temp(n);
    let neg = s.temp(n / 2);
    let cat = s.temp(n);
    s.free(neg);
    let t2 = s.temp(n);
    s.free(cat);
    let out = s.saved_or_temp(j, n);
    s.free(t1);
    s.free(t2);
    out
}

/// RoPE's backward from `grad` (freed): `grad * sin` for `rotate_half(x) * sin`, the cat's
/// views, `-x2`, the two slices' zero-filled full-size gradients (`slice_backward`) summed in
/// place, `grad * cos` summed in too; returns the temporary holding the result.
fn rope_bwd(s: &mut BwdScript, grad: usize, n: u128) -> usize {
    let by_sin = s.temp(n);
    let neg = s.temp(n / 2);
    let second = s.temp(n);
    s.free(neg);
    let first = s.temp(n);
    s.free(by_sin);
    s.free(first);
    let by_cos = s.temp(n);
    s.free(grad);
    s.free(by_cos);
    second
}

/// q's, k's and v's gradients back to their projections: each copied to its projection's layout
/// (they reached the attention as transposed views; `ViewBackward0`'s reshape, as traced) just
/// before that projection's backward — v's first, v_proj runs first. A fused qkv takes them as
/// they are (its views' gradients gathered).
fn views_back(
    s: &mut BwdScript,
    (gq, gk, gv): (usize, usize, usize),
    (nq, nk, nv): (u128, u128, u128),
    (separate, copy_v): (bool, bool),
) {
    if !separate {
        s.give(gv, 2);
        s.give(gk, 1);
        s.give(gq, 0);
        return;
    }
    if copy_v {
        let cv = s.temp(nv);
        s.free(gv);
        s.give(cv, 2);
    } else {
        s.give(gv, 2);
    }
    reshape_back(s, gk, nk, 1, 2);
    reshape_back(s, gq, nq, 0, 1);
}

/// A transposed view's gradient copied to its producer's layout once the op producing input
/// `after` has run its backward, then handed to `input`.
fn reshape_back(s: &mut BwdScript, grad: usize, n: u128, input: usize, after: usize) {
    s.defer(after);
    let copy = s.temp(n);
    s.free(grad);
    s.give(copy, input);
}

/// PyTorch 2.11's math SDPA (`attention.cpp` `_scaled_dot_product_attention_math`) on fp32 q, k,
/// v with GQA, after RoPE (the roped q and k alive until the attention module returns), in the
/// order the 2.11 binary allocates and frees (read off `torch.profiler`'s memory events of the
/// wheel on CPU; the op is device-independent): `q * √scale` (saved 0); the causal mask
/// `ones(L, S).tril()` made additive (`convert_boolean_attn_mask`: one `where`); k and v
/// `repeat_interleave`d to every head (v saved 3; k's copy a local until the op returns);
/// `kᵀ * √scale` (saved 1; without autograd a temporary freed after the scores); the scores,
/// the mask added in place; `_safe_softmax` (`softmax`, its result saved 2; `isneginf`, `all`,
/// then `where(rows, 0, out, out=out)` in place, so no fourth score-sized tensor); the scores
/// freed; `matmul(·, v)`; the op's locals (k's copy, without autograd q and v too, then the
/// mask) freed; transformers' `.transpose(1, 2).contiguous()` (the op's output).
fn math_sdpa_script(
    t: u128,
    (q, kv, vkv, vq): (u128, u128, u128, u128),
    (scores, rows): (u128, u128),
    mask: u128,
    cached: bool,
    save: bool,
) -> Vec<Fwd> {
    let mut s = Script::default();
    let rq = rope_fwd(&mut s, t * 4 * q, None);
    let rk = rope_fwd(&mut s, t * 4 * kv, None);
    let copies: Vec<usize> = if cached {
        vec![s.temp(t * 4 * kv), s.temp(t * 4 * vkv)]
    } else {
        Vec::new()
    };
    s.drop_input(0);
    s.drop_input(1);
    let q_s = s.saved_or_temp(save.then_some(0), t * 4 * q);
    let ones = s.temp(mask);
    let tril = s.temp(mask);
    s.free(ones);
    let additive = s.temp(4 * mask);
    s.free(tril);
    let k_rep = s.temp(t * 4 * q);
    let v_rep = s.saved_or_temp(save.then_some(3), t * 4 * q);
    let k_s = s.saved_or_temp(save.then_some(1), t * 4 * q);
    let attn = s.temp(4 * scores);
    if let Some(k_s) = k_s {
        s.free(k_s);
    }
    let out = s.saved_or_temp(save.then_some(2), 4 * scores);
    let masked = s.temp(scores);
    let rows = s.temp(rows);
    s.free(rows);
    s.free(masked);
    s.free(attn);
    let pv = s.temp(t * 4 * vq);
    for k in [v_rep, Some(k_rep), q_s].into_iter().flatten() {
        s.free(k);
    }
    s.free(additive);
    if let Some(out) = out {
        s.free(out);
    }
    s.out();
    s.free(pv);
    for k in [rq, rk].into_iter().flatten().chain(copies) {
        s.free(k);
    }
    s.steps
}

/// Its backward: the output gradient reshaped (a copy of the transposed view), `matmul(·, v)`
/// (the probabilities' and the repeated v's gradients; v's summed over the group),
/// `_softmax_backward_data`, `matmul(q, kᵀ)` (both gradients), `* √scale` for k (then summed over
/// the group) and for q, then RoPE's, k's first.
fn math_sdpa_bwd_script(
    t: u128,
    (q, kv, vkv, vq): (u128, u128, u128, u128),
    scores: u128,
    separate: bool,
) -> Vec<Bwd> {
    let mut s = BwdScript::default();
    let copy = s.temp(t * 4 * q);
    s.done_upstream();
    let gw = s.temp(4 * scores);
    let gv = s.temp(t * 4 * vq);
    s.free(copy);
    s.release(3);
    let gvk = s.temp(t * 4 * vkv);
    s.free(gv);
    let gs = s.temp(4 * scores);
    s.free(gw);
    s.release(2);
    let gqs = s.temp(t * 4 * q);
    let gks = s.temp(t * 4 * q);
    s.free(gs);
    s.release(0);
    s.release(1);
    let gk_rep = s.temp(t * 4 * q);
    s.free(gks);
    let gk = s.temp(t * 4 * kv);
    s.free(gk_rep);
    let gq = s.temp(t * 4 * q);
    s.free(gqs);
    let gk = rope_bwd(&mut s, gk, t * 4 * kv);
    let gq = rope_bwd(&mut s, gq, t * 4 * q);
    views_back(
        &mut s,
        (gq, gk, gvk),
        (t * 4 * q, t * 4 * kv, t * 4 * vkv),
        (separate, true),
    );
    s.steps
}

/// transformers' `eager_attention_forward` (5.17 `models/llama/modeling_llama.py`) after RoPE:
/// `repeat_kv` copies of k (saved 1) and v (saved 4) for GQA, `matmul(q, kᵀ)`, `* scaling`,
/// `+ causal_mask`, `softmax(dtype=float32)` (the fp32 copy of its input, then the saved fp32
/// output 2), `.to(q.dtype)` (saved 3), `matmul(·, v)`, `.transpose(1, 2).contiguous()` (the op's
/// output, o_proj's input).
fn eager_script(
    t: u128,
    s_b: u128,
    (q, kv, vkv, vq): (u128, u128, u128, u128),
    scores: u128,
    cached: bool,
    repeated: bool,
) -> Vec<Fwd> {
    let mut s = Script::default();
    rope_fwd(&mut s, t * s_b * q, Some(0));
    let copy_k = repeated || cached;
    let roped = rope_fwd(&mut s, t * s_b * kv, (!copy_k).then_some(1));
    let cat = (cached && repeated).then(|| s.temp(t * s_b * kv));
    if copy_k {
        s.save(1);
    }
    for k in [roped, cat].into_iter().flatten() {
        s.free(k);
    }
    let v_cat = (cached && repeated).then(|| s.temp(t * s_b * vkv));
    s.save(4);
    if let Some(k) = v_cat {
        s.free(k);
    }
    s.drop_input(0);
    s.drop_input(1);
    let mm = s.temp(s_b * scores);
    let scaled = s.temp(s_b * scores);
    s.free(mm);
    let masked = s.temp(s_b * scores);
    s.free(scaled);
    let up = s.temp(4 * scores);
    s.save(2);
    s.free(up);
    s.save(3);
    s.free(masked);
    let pv = s.temp(t * s_b * vq);
    s.out();
    s.free(pv);
    s.steps
}

/// Its backward: the output gradient reshaped (a copy: it is a transposed view), `matmul(·, v)`
/// (the probabilities' and v's gradients; v's summed over the GQA group), `.to` (fp32),
/// `_softmax_backward_data`, the fp32 input cast back, `* scaling`, `matmul(q, kᵀ)` (q's and
/// k's gradients; k's summed over the group), then RoPE's, k's first.
fn eager_bwd_script(
    t: u128,
    s_b: u128,
    (q, kv, vkv, vq): (u128, u128, u128, u128),
    scores: u128,
    (repeated, separate): (bool, bool),
) -> Vec<Bwd> {
    let mut s = BwdScript::default();
    let copy = s.temp(t * s_b * q);
    s.done_upstream();
    let gw = s.temp(s_b * scores);
    let gv = s.temp(t * s_b * vq);
    s.free(copy);
    s.release(3);
    s.release(4);
    let gv = if repeated {
        let k = s.temp(t * s_b * vkv);
        s.free(gv);
        k
    } else {
        gv
    };
    let g32 = s.temp(4 * scores);
    s.free(gw);
    let gs = s.temp(4 * scores);
    s.free(g32);
    s.release(2);
    let g16 = s.temp(s_b * scores);
    s.free(gs);
    let gm = s.temp(s_b * scores);
    s.free(g16);
    let gq = s.temp(t * s_b * q);
    let gk_rep = s.temp(t * s_b * if repeated { q } else { kv });
    s.free(gm);
    s.release(0);
    s.release(1);
    let gk = if repeated {
        let k = s.temp(t * s_b * kv);
        s.free(gk_rep);
        k
    } else {
        gk_rep
    };
    let gk = rope_bwd(&mut s, gk, t * s_b * kv);
    let gq = rope_bwd(&mut s, gq, t * s_b * q);
    views_back(
        &mut s,
        (gq, gk, gv),
        (t * s_b * q, t * s_b * kv, t * s_b * vkv),
        (separate, true),
    );
    s.steps
}

/// RoPE (`apply_rotary_pos_emb`: `q * cos + rotate_half(q) * sin`, `rotate_half` = `cat(-x2,
/// x1)`) on q and k, then flash attention (PyTorch 2.11 `_flash_attention_forward`): the roped q
/// (saved 0) and k (saved 1; with a DynamicCache its `torch.cat` copy, 2 the v copy), the
/// projections' outputs freed once roped, the output (3) and the fp32 log-sum-exp (4).
fn flash_script(nq: u128, nk: u128, cached: bool) -> Vec<Fwd> {
    let mut s = Script::default();
    rope_fwd(&mut s, nq, Some(0));
    let roped = rope_fwd(&mut s, nk, (!cached).then_some(1));
    if let Some(k) = roped {
        s.save(1);
        s.free(k);
    }
    s.save(2);
    s.drop_input(0);
    s.drop_input(1);
    s.save(3);
    s.save(4);
    s.steps
}

/// The fused attention's backward. SDPA on Hopper and Blackwell runs cuDNN attention
/// (PyTorch 2.11 `sdp_utils.cpp` `check_prefer_cudnn_attention`; the H200 measurements ran it):
/// dq, dk, dv (GQA handled by the kernel; its workspace is not seen in the reference traces and
/// does not show in the measured reserved memory). `flash_attention_2` (`mha_bwd`) adds the
/// fp32 softmax_d (per head and token) and dq accumulator, and with GQA dk and dv expanded to
/// every head, then summed. Then RoPE's backward, k's then q's (the ready queue runs the
/// later-created first), v's gradient handed to v_proj (its layout is v's), and q's and k's —
/// RoPE's gradients come out contiguous in the transposed layout — copied back to their
/// projections' layout just before each projection's backward.
fn flash_bwd_script(
    t: u128,
    s_b: u128,
    (q, kv, vkv, vq): (u128, u128, u128, u128),
    heads: u128,
    (gqa, fa2, separate): (bool, bool, bool),
) -> Vec<Bwd> {
    let mut s = BwdScript::default();
    let dq = s.temp(t * s_b * q);
    let dk = s.temp(t * s_b * kv);
    let dv = s.temp(t * s_b * vkv);
    if fa2 {
        let softmax_d = s.temp(t * 4 * heads);
        let accum = s.temp(t * 4 * q);
        if gqa {
            let ek = s.temp(t * s_b * q);
            let ev = s.temp(t * s_b * vq);
            s.free(ek);
            s.free(ev);
        }
        s.free(accum);
        s.free(softmax_d);
    }
    s.done_upstream();
    for j in 0..5 {
        s.release(j);
    }
    let gk = rope_bwd(&mut s, dk, t * s_b * kv);
    let gq = rope_bwd(&mut s, dq, t * s_b * q);
    views_back(
        &mut s,
        (gq, gk, dv),
        (t * s_b * q, t * s_b * kv, t * s_b * vkv),
        (separate && !fa2, false),
    );
    s.steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::activations::script_peak;

    #[test]
    fn math_sdpa_holds_scores_softmax_and_mask_not_a_where_copy() {
        // 1 × 2048 tokens, 32 heads, widths of 1 so that the score-sized tensors dominate:
        // S = 32 · 2048 · 2048 scores. PyTorch 2.11's `_safe_softmax` keeps the fp32 scores,
        // the fp32 softmax and the bool `isneginf` mask (4S + 4S + S bytes) and writes `where`
        // into the softmax: no fourth tensor of 4S.
        let (t, s) = (2048, 2048);
        let scores = t * 32 * s;
        // Besides: the causal mask (4 · s² fp32), `all`'s rows and the width-1 q, k, v copies.
        let small = 4 * s * s + t * 32 + 8 * 4 * t;
        for save in [true, false] {
            let script = math_sdpa_script(t, (1, 1, 1, 1), (scores, t * 32), s * s, false, save);
            let saved = [4 * t, 4 * t, 4 * scores, 4 * t];
            let p = script_peak(&script, &saved);
            assert!(
                p >= 9 * scores && p < 9 * scores + 4 * s * s + small,
                "{save}: {p}"
            );
        }
    }
}
