//! `--method inference`: one forward pass over a prompt of `--seq` tokens with a KV cache
//! (prefill), as `transformers` `generate()` runs it.
//!
//! - KV cache: 2 (k and v) × layers × kv_heads × head_dim × b·s × compute bytes — GQA stores
//!   only the kv heads (DynamicCache).
//! - Nothing is saved for backward (`torch.no_grad`); the working set is one layer's largest
//!   intermediates: q/k/v/attention output, and the MLP's gate, up, activation and product
//!   (4 × b·s·intermediate), or eager attention's b·heads·s² scores (16-bit + fp32 softmax).
//! - Logits only for the last position (`logits_to_keep=1` during prefill), upcast to fp32.

use super::activations::Dtypes;
use super::timeline::{Category, Phase, Timeline};
use super::StepExplain;
use crate::dtype::Precision;
use crate::method::{Attention, Job};

pub(super) fn walk(job: &Job, t: &mut Timeline) -> StepExplain {
    let m = &job.model;
    let tokens = job.tokens();
    let dt = Dtypes::of(job);
    let c = dt.compute;
    let kv = 2 * m.layers * m.kv_dim() * tokens * c;
    let k = m.moe.as_ref().map_or(1, |e| e.experts_per_token);
    let mlp = 4 * tokens * m.intermediate * c * k;
    let attn = match job.attention {
        Attention::Eager => job.batch * m.heads * job.seq * job.seq * (c + 4),
        _ => tokens * (2 * m.q_dim() + 2 * m.kv_dim()) * c,
    };
    let dequant = match job.weights {
        Precision::Nf4 | Precision::Int8 => m.param_counts().largest_linear * c,
        _ => 0,
    };
    let hidden = 2 * tokens * m.hidden * c;
    let logits = job.batch * m.vocab * (c + 4);
    t.phase(Phase::Forward);
    t.alloc(Category::Temporaries, hidden);
    for _ in 0..m.layers {
        t.alloc(Category::KvCache, kv / m.layers);
        t.spike(Category::Activations, mlp.max(attn) + dequant);
    }
    t.spike(Category::Logits, logits);
    t.free(Category::Temporaries, hidden);
    StepExplain {
        activations: format!(
            "no_grad working set of one layer: max(MLP 4 × {tokens} tokens × {} × {c} B, attention {attn} B){}",
            m.intermediate,
            if dequant > 0 { format!(" + dequantized weight {dequant} B") } else { String::new() }
        ),
        logits: format!("last position only: batch × vocab × ({c} + 4) B = {logits} B"),
        temporaries: format!("residual stream and layer output: 2 × {tokens} × {} × {c} B", m.hidden),
        largest_block: logits.max(mlp / 4).max(attn),
        host_bytes: 0,
        kv_cache: format!(
            "2 × {} layers × {} kv heads × {} head_dim × {tokens} tokens × {c} B = {kv} B",
            m.layers, m.kv_heads, m.head_dim
        ),
    }
}
