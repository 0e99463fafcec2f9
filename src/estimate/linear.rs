//! The rules of `nn.Linear`, peft's LoRA around it and bitsandbytes' 4-bit matmul: what each
//! saves, its forward intermediates in order and its backward as autograd runs it
//! (`activations.rs` holds the shared types and the other ops).

use crate::arch::{Proj, T};

use super::activations::{Ctx, Fwd, OpCost, Saved, Script};
use super::backward::{Bwd, BwdScript};
// FSDP-HOOK(m): the adapter dtype is FSDP's param_dtype under mixed precision (sharding.rs).
use super::sharding::adapter_bytes;

/// `nn.Linear` (and peft's LoRA around it; bitsandbytes' 4-bit matmul). `in_rg`: whether the
/// input needs a gradient.
pub(super) fn linear(cx: &Ctx, p: &Proj, x: T, x_bytes: u128, in_rg: bool) -> (OpCost, bool) {
    let mut c = OpCost::default();
    let t = cx.tokens;
    let dt = cx.dt;
    let trains = cx.full;
    let dequant = if cx.quantized(p) {
        p.in_f * p.out_f * dt.compute
    } else {
        0
    };
    c.fwd_transient = dequant;
    if trains {
        if dt.autocast && x_bytes != dt.compute {
            c.saved.push(Saved::Own(t * dt.compute * p.in_f));
        } else {
            c.saved.push(Saved::Shared(x));
        }
        if dt.autocast {
            // Autocast's cached 16-bit weight copy lives until this layer's backward.
            c.autocast_cast = Some(c.saved.len());
            c.saved.push(Saved::Own(p.in_f * p.out_f * dt.compute));
        }
        c.grads
            .push((p.in_f * p.out_f + if p.bias { p.out_f } else { 0 }) * cx.param_bytes());
    }
    let lora = cx.lora(p);
    // The adapter dtype: fp32, or FSDP's gathered param_dtype under mixed precision (FSDP-HOOK(m)).
    let a = adapter_bytes(cx.job);
    if let Some(l) = lora {
        // lora_B (a trainable nn.Linear) saves its input: lora_A's fp32 output, r wide.
        c.saved.push(Saved::Own(t * a * l.rank));
        // lora_A saves its input: the fp32 dropout output (and dropout its bool mask, when the
        // input needs a gradient), or the fp32 copy, or the input itself when already fp32.
        if l.dropout > 0.0 {
            c.saved.push(Saved::Own(t * a * p.in_f));
            if in_rg {
                c.saved.push(Saved::Own(t * p.in_f));
            }
        } else if x_bytes == a {
            c.saved.push(Saved::Shared(x));
        } else {
            c.saved.push(Saved::Own(t * a * p.in_f));
        }
        // fp32 LoRA output and the fp32 sum before the cast back (peft `result + lora_out`).
        c.fwd_transient += t * 2 * a * p.out_f;
        // lora_B's gradient, then lora_A's (the order backward creates them).
        c.grads.push(l.rank * p.out_f * a);
        c.grads.push(l.rank * p.in_f * a);
    }
    // The backward is `linear_bwd_script`'s, buffer by buffer (no one-transient fallback).
    let shape = LinearShape {
        x_bytes,
        dequant,
        trains,
        in_rg,
        lora: lora.map(|l| (l.rank, l.dropout > 0.0)),
        adapter: a,
    };
    c.fwd_script = linear_script(cx, p, &shape, &c.saved, true);
    if lora.is_some_and(|l| l.dropout > 0.0) {
        c.fwd_script_nosave = linear_script(cx, p, &shape, &c.saved, false);
    }
    c.bwd_script = linear_bwd_script(cx, p, &shape);
    (c, trains || lora.is_some())
}

/// What a Linear's scripts depend on.
struct LinearShape {
    x_bytes: u128,
    dequant: u128,
    trains: bool,
    in_rg: bool,
    /// LoRA rank and whether dropout is on.
    lora: Option<(u128, bool)>,
    /// The adapter dtype's bytes.
    adapter: u128,
}

/// The forward of a Linear, intermediate by intermediate. The base layer: bitsandbytes'
/// `MatMul4Bit.forward` dequantizes the weight (`dequant` bytes; bitsandbytes 0.50.2
/// `backends/cuda/ops.py` `_dequant_linear_fallback`, the path above 1,536 rows: the nested
/// absmax dequantized and offset, the weight dequantized, `F.linear`, then its locals freed); autocast's input and weight casts are the
/// saved tensors 0 and 1 (`trains`). With LoRA (peft 0.21 `tuners/lora/layer.py`
/// `Linear.forward`): `result = base_layer(x)`, `x = _cast_input_dtype(x, fp32)` (a local
/// alive until the forward returns), `dropout(x)` (its output saved, its mask saved when the
/// input needs a gradient), `lora_A(...)` (saved: lora_B's input), `lora_B(...)`, `* scaling`,
/// `result + ...` (fp32 by type promotion), `.to(result dtype)`: the op's output.
fn linear_script(cx: &Ctx, p: &Proj, sh: &LinearShape, saved: &[Saved], save: bool) -> Vec<Fwd> {
    let t = cx.tokens;
    let dt = cx.dt;
    let mut s = Script::default();
    let mut j = 0;
    if sh.trains {
        // The autocast input cast (or the shared input) and the weight copy.
        for _ in 0..saved.len().min(if dt.autocast { 2 } else { 1 }) {
            s.save(j);
            j += 1;
        }
    }
    // `MmBackward0` saves the weight for the input gradient (and the input for the weight's,
    // `derivatives.yaml` `mm`) before the matmul runs; bitsandbytes' `MatMul4Bit` keeps its
    // weight in `ctx.tensors`, which no saved-tensor hook sees.
    if (sh.in_rg || sh.trains) && sh.dequant == 0 {
        s.pack();
    }
    // bitsandbytes' `_dequant_linear_fallback` (the path sm90 takes): with double quantization
    // the absmax dequantized and offset first (fp32, one per 64-block each, freed at return).
    let absmax = if sh.dequant > 0 && cx.job.double_quant {
        let n = p.in_f * p.out_f;
        let a = s.temp(4 * n.div_ceil(crate::dtype::NF4_BLOCK));
        let b = s.temp(4 * n.div_ceil(crate::dtype::NF4_BLOCK));
        vec![a, b]
    } else {
        Vec::new()
    };
    let dq = (sh.dequant > 0).then(|| s.temp(sh.dequant));
    // `F.linear`'s output exists before the fallback returns, which frees its locals in frame
    // order: the offset absmax, the dequantized absmax, the dequantized weight.
    let free_dequant = |s: &mut Script| {
        for &k in absmax.iter().rev() {
            s.free(k);
        }
        if let Some(k) = dq {
            s.free(k);
        }
    };
    let Some((rank, dropout)) = sh.lora else {
        if dq.is_some() {
            s.out();
        }
        free_dequant(&mut s);
        // The saved tensors the rule adds after these (none today) at the end.
        while j < saved.len() {
            s.save(j);
            j += 1;
        }
        return s.steps;
    };
    let mut result = s.temp(t * dt.linear_out * p.out_f);
    free_dequant(&mut s);
    // peft's bitsandbytes wrapper (`tuners/lora/bnb.py` `Linear4bit.forward`) clones the base
    // output, casts the LoRA branch back to the output dtype and sums in that dtype.
    let bnb = sh.dequant > 0;
    if bnb {
        let clone = s.temp(t * dt.linear_out * p.out_f);
        s.free(result);
        result = clone;
    }
    let (a_out, x_saved) = (j, j + 1);
    let mut cast = None;
    // Without autograd (`save` false: a checkpointed layer's first forward) the dropout's
    // output dies once lora_A has read it, its mask at once, lora_A's output once lora_B has.
    let mut dropped = None;
    if dropout {
        cast = (sh.x_bytes != sh.adapter).then(|| s.temp(t * sh.adapter * p.in_f));
        dropped = s.saved_or_temp(save.then_some(x_saved), t * sh.adapter * p.in_f);
        if sh.in_rg && save {
            s.save(x_saved + 1);
        } else {
            let mask = s.temp(t * p.in_f);
            s.free(mask);
        }
    } else {
        s.save(x_saved);
    }
    let a = s.saved_or_temp(save.then_some(a_out), t * sh.adapter * rank);
    if let Some(k) = dropped {
        s.free(k);
    }
    let b_out = s.temp(t * sh.adapter * p.out_f);
    if let Some(k) = a {
        s.free(k);
    }
    let scaled = s.temp(t * sh.adapter * p.out_f);
    s.free(b_out);
    if bnb {
        let cast = s.temp(t * dt.linear_out * p.out_f);
        s.free(scaled);
        s.out();
        s.free(result);
        s.free(cast);
    } else {
        let sum = s.temp(t * sh.adapter * p.out_f);
        s.free(scaled);
        s.free(result);
        s.out();
        s.free(sum);
    }
    if let Some(k) = cast {
        s.free(k);
    }
    s.steps
}

/// The backward of a Linear, node by node in the order autograd runs them (the reverse of the
/// forward). LoRA first: `.to(result dtype)` (the gradient cast to fp32), `result + ...` (the
/// base's share cast to its dtype), `* scaling`, lora_B's mm (weight gradient, then input
/// gradient: the order the reference tracer records `MmBackward0`'s two mm calls in), lora_A's,
/// dropout's mask, the cast of x to fp32 (back to the input dtype). Then the base: the weight
/// gradient (under autocast in 16 bits, then cast to the fp32 weight's dtype by the weight
/// cast's node) and the input gradient (bitsandbytes dequantizes the 4-bit weight again for
/// it); autocast's input cast back to the input dtype.
fn linear_bwd_script(cx: &Ctx, p: &Proj, sh: &LinearShape) -> Vec<Bwd> {
    let t = cx.tokens;
    let dt = cx.dt;
    let lo = dt.linear_out;
    let mut s = BwdScript::default();
    let base_saved = if sh.trains {
        if dt.autocast {
            2
        } else {
            1
        }
    } else {
        0
    };
    // The base runs backward only when its input needs a gradient or its weight trains.
    let base_runs = sh.in_rg || sh.trains;
    let mut base_grad = None;
    if let Some((rank, dropout)) = sh.lora {
        let a = sh.adapter;
        let (a_out, x_saved) = (base_saved, base_saved + 1);
        let bnb = sh.dequant > 0;
        let g32 = (lo != a).then(|| s.temp(t * a * p.out_f));
        if g32.is_some() && !bnb {
            s.done_upstream();
        }
        // peft's bnb wrapper sums in the output dtype: the base (through the clone) gets the
        // incoming gradient itself, no cast.
        base_grad = (base_runs && lo != a && !bnb).then(|| s.temp(t * lo * p.out_f));
        let gs = s.temp(t * a * p.out_f);
        if let Some(k) = g32 {
            s.free(k);
        }
        // lora_B's `MmBackward0` is the op's first node that unpacks (`.to`, `+` and `*
        // scaling` save no tensor). Each mm's weight gradient comes before its input gradient
        // (`MmBackward0` as traced).
        s.unpack();
        s.grad(base_saved.min(1));
        let ga = s.temp(t * a * rank);
        s.free(gs);
        s.release(a_out);
        s.grad(base_saved.min(1) + 1);
        let gd = sh.in_rg.then(|| s.temp(t * a * p.in_f));
        s.free(ga);
        s.release(x_saved);
        if let Some(gd) = gd {
            let gx = if dropout {
                let k = s.temp(t * a * p.in_f);
                s.free(gd);
                s.release(x_saved + 1);
                k
            } else {
                gd
            };
            let gn = if sh.x_bytes != a {
                let k = s.temp(t * sh.x_bytes * p.in_f);
                s.free(gx);
                k
            } else {
                gx
            };
            s.give(gn, 0);
        }
    }
    if base_runs {
        let gw16 = (sh.trains && dt.autocast).then(|| s.temp(p.in_f * p.out_f * dt.compute));
        if sh.trains && !dt.autocast {
            s.grad(0);
        }
        let gin = sh.in_rg.then(|| {
            // `F.dequantize_4bit`: the nested absmax dequantized (offset added in place) lives
            // until the function returns, after the dequantized weight exists.
            let absmax = (sh.dequant > 0 && cx.job.double_quant)
                .then(|| s.temp(4 * (p.in_f * p.out_f).div_ceil(crate::dtype::NF4_BLOCK)));
            let dq = (sh.dequant > 0).then(|| s.temp(sh.dequant));
            if let Some(k) = absmax {
                s.free(k);
            }
            let k = s.temp(t * lo * p.in_f);
            if let Some(d) = dq {
                s.free(d);
            }
            k
        });
        if let Some(k) = base_grad {
            s.free(k);
        }
        s.done_upstream();
        for j in 0..base_saved {
            s.release(j);
        }
        if let Some(k) = gw16 {
            s.grad(0);
            s.free(k);
        }
        if let Some(gin) = gin {
            if sh.x_bytes != lo {
                let k = s.temp(t * sh.x_bytes * p.in_f);
                s.free(gin);
                s.give(k, 0);
            } else {
                s.give(gin, 0);
            }
        }
    }
    s.done_upstream();
    s.steps
}

#[cfg(test)]
mod tests {
    use crate::estimate::activations::{inventory, script_peak};
    use crate::method::{Job, Method};
    use crate::model::resolve_model;

    #[test]
    fn without_autograd_the_lora_branch_frees_what_only_backward_would_keep() {
        // Llama-3.2-1B q_proj (2048 → 2048, bf16), r = 16, dropout 0.05, one token. Without
        // autograd: the bf16 base output, x's fp32 copy, then lora_B's fp32 output and its
        // scaled copy at once (the dropout output and its mask are gone by then): 2·2048 +
        // 4·2048 + 2 · 4·2048 bytes.
        let job = Job::new(resolve_model("llama-3.2-1b").unwrap().0, Method::Lora);
        let k = &job.model.recipe.kinds[0];
        let inv = inventory(&job, k, 1, true);
        let q = &inv.ops[1];
        assert!(!q.fwd_script_nosave.is_empty());
        assert_eq!(
            script_peak(&q.fwd_script_nosave, &[]),
            2 * 2048 + 4 * 2048 + 2 * 4 * 2048
        );
        // With autograd the dropout output (fp32), its mask and lora_A's output stay saved.
        let saved: Vec<u128> = q
            .saved
            .iter()
            .map(|s| match s {
                crate::estimate::activations::Saved::Own(b) => *b,
                crate::estimate::activations::Saved::Shared(_) => 0,
            })
            .collect();
        assert_eq!(
            script_peak(&q.fwd_script, &saved),
            2 * 2048 + 4 * 2048 + 4 * 2048 + 2048 + 4 * 16 + 2 * 4 * 2048
        );
    }
}
