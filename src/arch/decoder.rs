//! One builder for every decoder layer: a [`LayerSpec`] says which blocks a family has (norm
//! placement, projections, attention features, dense or MoE MLP) and [`build`] turns it into the
//! op list. Families differ in data, not in control flow (llama.cpp's `llama-arch.cpp` table
//! and shared graph builders are the model).

use super::{Act, AttnSpec, Experts, LayerBuilder, LayerRecipe, Norm, NormKind, Proj, Router, T};
use crate::model::LinearKind;

/// Where the norms of a layer sit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norms {
    pub kind: NormKind,
    /// `input_layernorm` before attention (absent in OLMo-2's post-norm layer).
    pub pre_attn: bool,
    /// A norm of the attention output before the residual add (Gemma, OLMo-2).
    pub post_attn: bool,
    /// A norm before the MLP (Llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`).
    pub pre_mlp: bool,
    /// A norm of the MLP output before the residual add (Gemma, OLMo-2).
    pub post_mlp: bool,
}

impl Norms {
    /// Llama-style pre-norm: `input_layernorm`, `post_attention_layernorm`.
    pub fn pre(kind: NormKind) -> Norms {
        Norms {
            kind,
            pre_attn: true,
            post_attn: false,
            pre_mlp: true,
            post_mlp: false,
        }
    }
}

/// How q, k and v are projected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QkvProj {
    /// `q_proj`, `k_proj`, `v_proj` (`bias` on all three).
    Separate { bias: bool },
    /// Phi-3's fused `qkv_proj`.
    Fused { bias: bool },
    /// DeepSeek MLA: q directly (`q_lora_rank` null) or through `q_a_proj` → `q_a_layernorm`
    /// → `q_b_proj`; kv through `kv_a_proj_with_mqa` (kv_lora_rank + rope dim) →
    /// `kv_a_layernorm` → `kv_b_proj` (heads × (nope + v)).
    Mla {
        q_lora_rank: Option<u128>,
        kv_lora_rank: u128,
        rope_dim: u128,
        nope_dim: u128,
    },
}

/// q/k normalisation after the projections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QkNorm {
    None,
    /// Per head, weight head_dim (Qwen3, Gemma 3).
    PerHead(NormKind),
    /// Over the full q and k widths (OLMo-2).
    Full(NormKind),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mlp {
    Dense {
        inter: u128,
        fused_gate_up: bool,
        bias: bool,
        act: Act,
    },
    Moe {
        router: Router,
        experts: Experts,
        /// Shared experts' total intermediate size (a dense MLP beside the routed ones).
        shared_inter: Option<u128>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerSpec {
    pub hidden: u128,
    pub norms: Norms,
    pub qkv: QkvProj,
    pub qk_norm: QkNorm,
    pub attn: AttnSpec,
    pub o_bias: bool,
    pub mlp: Mlp,
    /// Granite: `residual + branch * residual_multiplier` (a scale op per branch).
    pub residual_scale: bool,
}

/// Builds the op list of one layer.
pub fn build(name: &str, s: &LayerSpec) -> LayerRecipe {
    let h = s.hidden;
    let mut b = LayerBuilder::new(h);
    let x = b.input();
    let a = &s.attn;
    let (qd, kvd) = (a.heads * a.qk_head_dim, a.kv_heads * a.qk_head_dim);
    let vd = a.kv_heads * a.v_head_dim;
    let kind = s.norms.kind;

    // ---- attention block
    let n1 = if s.norms.pre_attn {
        b.norm(x, Norm::new(kind, h))
    } else {
        x
    };
    let (q, k, v) = match s.qkv {
        QkvProj::Separate { bias } => (
            b.linear(n1, Proj::linear("q_proj", LinearKind::Q, h, qd, bias)),
            b.linear(n1, Proj::linear("k_proj", LinearKind::K, h, kvd, bias)),
            b.linear(n1, Proj::linear("v_proj", LinearKind::V, h, vd, bias)),
        ),
        QkvProj::Fused { bias } => {
            // q, k and v are views of one output: the attention op sees it three times.
            let qkv = b.linear(
                n1,
                Proj::linear("qkv_proj", LinearKind::Qkv, h, qd + kvd + vd, bias),
            );
            (qkv, qkv, qkv)
        }
        QkvProj::Mla {
            q_lora_rank,
            kv_lora_rank,
            rope_dim,
            nope_dim,
        } => {
            let q = match q_lora_rank {
                None => b.linear(n1, Proj::linear("q_proj", LinearKind::Q, h, qd, false)),
                Some(r) => {
                    let qa = b.linear(n1, Proj::linear("q_a_proj", LinearKind::QA, h, r, false));
                    let qn = b.norm(qa, Norm::new(kind, r));
                    b.linear(qn, Proj::linear("q_b_proj", LinearKind::QB, r, qd, false))
                }
            };
            let kva = b.linear(
                n1,
                Proj::linear(
                    "kv_a_proj_with_mqa",
                    LinearKind::KvA,
                    h,
                    kv_lora_rank + rope_dim,
                    false,
                ),
            );
            let kvn = b.norm(kva, Norm::new(kind, kv_lora_rank));
            let kv = b.linear(
                kvn,
                Proj::linear(
                    "kv_b_proj",
                    LinearKind::KvB,
                    kv_lora_rank,
                    a.heads * (nope_dim + a.v_head_dim),
                    false,
                ),
            );
            (q, kv, kv)
        }
    };
    let (q, k) = match s.qk_norm {
        QkNorm::None => (q, k),
        QkNorm::PerHead(nk) => (
            b.norm(q, Norm::per_head(nk, a.heads, a.qk_head_dim)),
            b.norm(k, Norm::per_head(nk, a.kv_heads, a.qk_head_dim)),
        ),
        QkNorm::Full(nk) => (b.norm(q, Norm::new(nk, qd)), b.norm(k, Norm::new(nk, kvd))),
    };
    let att = b.attention(q, k, v, *a);
    let o = b.linear(
        att,
        Proj::linear("o_proj", LinearKind::O, a.heads * a.v_head_dim, h, s.o_bias),
    );
    let o = post(&mut b, o, s.norms.post_attn, kind, h, s.residual_scale);
    let x2 = b.add(x, o);

    // ---- MLP block
    b.mlp_block();
    let n2 = if s.norms.pre_mlp {
        b.norm(x2, Norm::new(kind, h))
    } else {
        x2
    };
    let out = match s.mlp {
        Mlp::Dense {
            inter,
            fused_gate_up,
            bias,
            act,
        } => dense_mlp(&mut b, n2, h, inter, fused_gate_up, bias, act),
        Mlp::Moe {
            router,
            experts,
            shared_inter,
        } => {
            let r = b.router(n2, router);
            let routed = b.experts(n2, r, experts);
            match shared_inter {
                None => routed,
                Some(i) => {
                    let shared = dense_mlp(&mut b, n2, h, i, false, false, experts.act);
                    b.add(routed, shared)
                }
            }
        }
    };
    let out = post(&mut b, out, s.norms.post_mlp, kind, h, s.residual_scale);
    b.add(x2, out);
    b.build(name)
}

fn post(b: &mut LayerBuilder, t: T, norm: bool, kind: NormKind, h: u128, scale: bool) -> T {
    let t = if norm {
        b.norm(t, Norm::new(kind, h))
    } else {
        t
    };
    if scale {
        b.scale(t)
    } else {
        t
    }
}

fn dense_mlp(
    b: &mut LayerBuilder,
    x: T,
    h: u128,
    inter: u128,
    fused: bool,
    bias: bool,
    act: Act,
) -> T {
    let m = if fused {
        let gu = b.linear(
            x,
            Proj::linear("gate_up_proj", LinearKind::GateUp, h, 2 * inter, bias),
        );
        b.glu(gu, gu, act, inter)
    } else if matches!(act, Act::Silu | Act::GeluTanh) {
        // `act_fn(gate_proj(x)) * up_proj(x)`: the activation runs before up_proj.
        let g = b.linear(
            x,
            Proj::linear("gate_proj", LinearKind::Gate, h, inter, bias),
        );
        let a = b.act(g, act);
        let u = b.linear(x, Proj::linear("up_proj", LinearKind::Up, h, inter, bias));
        b.mul(a, u)
    } else {
        let g = b.linear(
            x,
            Proj::linear("gate_proj", LinearKind::Gate, h, inter, bias),
        );
        let u = b.linear(x, Proj::linear("up_proj", LinearKind::Up, h, inter, bias));
        b.glu(g, u, act, inter)
    };
    b.linear(
        m,
        Proj::linear("down_proj", LinearKind::Down, inter, h, bias),
    )
}
