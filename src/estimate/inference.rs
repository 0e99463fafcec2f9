//! `--method inference`: one forward pass over a prompt of `--seq` tokens with a KV cache
//! (prefill), as `transformers` `generate()` runs it: `model(input_ids, use_cache=True,
//! past_key_values=DynamicCache(config), logits_to_keep=1)` under `torch.no_grad()`.
//!
//! The same recipe is walked with no-grad rules: nothing is saved for backward, so a tensor
//! lives from the op that makes it to the last op that reads it (the layer input until the
//! residual add). Each op adds its own short-lived intermediates:
//! - RMSNorm: the fp32 copy and the fp32 normalised product alive together (8 B per element);
//! - RoPE: `q·cos + rotate_half(q)·sin` (three q-sized temporaries; likewise k);
//! - the `DynamicCache` keeps a `torch.cat` copy of each layer's k and v for the whole prefill
//!   (sliding-window layers keep every token during prefill too);
//! - SDPA: its output and fp32 log-sum-exp; a masked call (window shorter than the prompt)
//!   repeats k and v to every head; eager attention holds the scores, their sum with the mask,
//!   the fp32 softmax and its 16-bit copy at once (10 B per score);
//! - gated MLP: the activation's output beside gate and up, then the product;
//! - MoE (`grouped_mm`): the gathered rows, the gate_up output and its masked copy, the
//!   activation and product per routed row; the routing-weighted outputs.
//! - Logits for the last position only, and their fp32 copy.
//!
//! Measured against the meta-tensor traces of `tests/data/reference` (inference cases).

use super::activations::{sdpa_masked, Dtypes};
use super::timeline::{Buf, Category, Phase, Timeline};
use super::StepExplain;
use crate::arch::{Act, LayerRecipe, NormKind, OpKind};
use crate::dtype::Precision;
use crate::method::{Attention, Job};

pub(super) fn walk(job: &Job, t: &mut Timeline) -> StepExplain {
    let m = &job.model;
    let r = &m.recipe;
    let tokens = job.tokens();
    let dt = Dtypes::of(job);
    let c = dt.compute;
    t.phase(Phase::Forward);
    let mut x = t.tensor(Category::Activations, tokens * m.hidden * c);
    if r.head.embed_scale {
        let scaled = t.tensor(Category::Activations, tokens * m.hidden * c);
        t.release(x);
        x = scaled;
    }
    // Eager attention's 4-D float masks (one per layer type), built once per forward.
    let masks: Vec<Buf> = super::mask_bytes(job)
        .into_iter()
        .map(|b| t.tensor(Category::Temporaries, b))
        .collect();
    let mut cache: Vec<Buf> = Vec::new();
    let mut kv_total = 0;
    for &k in &r.layer_kind {
        let (out, kv) = layer(job, &r.kinds[k], tokens, x, &mut cache, t);
        x = out;
        kv_total += kv;
    }
    // Final norm over every position, then lm_head on the last one and its fp32 copy.
    t.transient(Category::Temporaries, 8 * tokens * m.hidden);
    let normed = t.tensor(Category::Activations, tokens * m.hidden * c);
    t.release(x);
    let logits = job.batch * m.vocab * (c + 4);
    t.transient(Category::Logits, logits);
    t.release(normed);
    for b in masks {
        t.release(b);
    }
    StepExplain {
        activations: format!(
            "no_grad prefill over the {} recipe: each tensor lives until its last reader; the largest moment is one layer's working set (norm fp32 copies, RoPE temporaries, {} attention, the MLP's gate, up, activation and product)",
            r.class, job.attention
        ),
        logits: format!("last position only: batch × vocab × ({c} + 4) B = {logits} B"),
        temporaries: "op intermediates (fp32 norm copies, RoPE, dequantized weights, eager scores)"
            .into(),
        host_bytes: 0,
        kv_cache: format!(
            "DynamicCache: a copy of every layer's k and v for all {tokens} tokens ({kv_total} B; GQA keeps the kv heads only)"
        ),
    }
}

/// One layer's no-grad forward; returns its output and the bytes it added to the cache.
fn layer(
    job: &Job,
    layer: &LayerRecipe,
    tokens: u128,
    input: Buf,
    cache: &mut Vec<Buf>,
    t: &mut Timeline,
) -> (Buf, u128) {
    let dt = Dtypes::of(job);
    let c = dt.compute;
    let n = layer.tensors.len();
    // The last op reading each tensor.
    let mut last_use = vec![0usize; n];
    for (j, op) in layer.ops.iter().enumerate() {
        for &i in &op.inputs {
            last_use[i] = j;
        }
    }
    // A module's argument (and the attention's `value_states`) lives until the module returns.
    let held = crate::arch::module_argument_until(layer);
    for (i, h) in held.iter().enumerate() {
        if let Some(h) = *h {
            last_use[i] = last_use[i].max(h);
        }
    }
    let mut alive: Vec<Option<Buf>> = vec![None; n];
    alive[0] = Some(input);
    let mut kv_bytes = 0;
    let bytes = |i: usize| tokens * layer.tensors[i].width * dt.of_class(layer.tensors[i].dt);
    let last = layer.ops.len().saturating_sub(1);
    for (j, op) in layer.ops.iter().enumerate() {
        let transient = match &op.kind {
            OpKind::Norm(nm) => match nm.kind {
                NormKind::Layer => 8 * tokens * nm.groups,
                _ => 8 * tokens * nm.width,
            },
            OpKind::Linear(p) => {
                // bitsandbytes' 4-bit matmul dequantizes the whole weight above 1536 rows
                // (`gemm_4bit` dispatch); below, a fused kernel reads it packed.
                if matches!(job.weights, Precision::Nf4 | Precision::Int8)
                    && p.module == crate::arch::Module::Linear
                    && (tokens > 1536 || job.weights == Precision::Int8)
                {
                    p.in_f * p.out_f * c
                } else {
                    0
                }
            }
            OpKind::Attention(a) => {
                let q = a.heads * a.qk_head_dim;
                let kvw = a.kv_heads * a.qk_head_dim;
                let vw = a.kv_heads * a.v_head_dim;
                // The cache's copies of k and v stay for the whole prefill.
                let kv = tokens * (kvw + vw) * c;
                cache.push(t.tensor(Category::KvCache, kv));
                kv_bytes += kv;
                let rope = 3 * tokens * (q + kvw) * c;
                let kernel = match job.attention {
                    // Scores, their sum with the mask, the fp32 softmax and its 16-bit copy
                    // (10 B per score); with sinks the softmax runs in the scores' dtype over
                    // [.., s+1]: the scores, the concatenation and its max-shifted copy (6 B);
                    // beside k and v repeated to every head for GQA.
                    Attention::Eager => {
                        let per_score = if a.sinks { 6 } else { 10 };
                        let repeated = if a.kv_heads != a.heads {
                            tokens * (q + a.heads * a.v_head_dim) * c
                        } else {
                            0
                        };
                        job.batch * a.heads * job.seq * job.seq * per_score + repeated
                    }
                    // A masked call: k and v repeated to every head (no `enable_gqa` with a
                    // mask) and the boolean mask converted to a 16-bit additive bias.
                    _ if sdpa_masked(job, a) => {
                        tokens * (2 * q + 4 * a.heads) * c + job.batch * job.seq * job.seq * c
                    }
                    _ if a.qk_head_dim > 256 => tokens * (2 * q + 4 * a.heads) * c,
                    _ => tokens * 4 * a.heads,
                };
                rope.max(kernel)
            }
            // The activation's output is a tensor of the layer; the product allocates only
            // its output.
            OpKind::Act(_) | OpKind::Mul => 0,
            OpKind::Glu(act) => {
                let i = layer.tensors[op.output].width;
                let own = match act {
                    Act::Silu | Act::GeluTanh => 1,
                    Act::ClampedSwiglu => 4,
                };
                tokens * own * i * dt.linear_out
            }
            OpKind::Router(r) => tokens * 4 * r.experts,
            OpKind::Experts(e) => {
                let rows = if e.dense_all {
                    tokens * e.experts
                } else {
                    tokens * e.top_k
                };
                let w = if e.fp32_weights { 4 } else { dt.linear_out };
                let act_own = match e.act {
                    Act::Silu | Act::GeluTanh => 1,
                    Act::ClampedSwiglu => 4,
                };
                (rows * (e.hidden + 4 * e.inter + (act_own - 1) * e.inter) * dt.linear_out)
                    .max(2 * rows * e.hidden * w)
            }
            OpKind::Add | OpKind::Scale => 0,
        };
        let out = t.tensor(Category::Activations, bytes(op.output));
        t.transient(Category::Temporaries, transient);
        for &i in &op.inputs {
            if last_use[i] == j {
                if let Some(b) = alive[i].take() {
                    t.release(b);
                }
            }
        }
        for (i, h) in held.iter().enumerate() {
            if *h == Some(j) && last_use[i] == j {
                if let Some(b) = alive[i].take() {
                    t.release(b);
                }
            }
        }
        if j == last {
            for b in alive.iter_mut().filter_map(Option::take) {
                t.release(b);
            }
            return (out, kv_bytes);
        }
        alive[op.output] = Some(out);
    }
    // An empty layer passes its input through.
    let out = match alive[0].take() {
        Some(b) => b,
        None => t.tensor(Category::Activations, 0),
    };
    (out, kv_bytes)
}
