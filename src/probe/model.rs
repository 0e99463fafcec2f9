//! A small Llama-style decoder (transformers `LlamaForCausalLM` layout): token embedding,
//! per layer RMSNorm → q/k/v (grouped-query) → RoPE → causal softmax attention → o, residual,
//! RMSNorm → SwiGLU MLP (gate, up, down), residual; final RMSNorm; lm_head (tied to the embedding
//! or separate). Every decoder Linear is frozen (NF4, or fp32 for the control) and may carry a
//! LoRA adapter; embedding, norms and lm_head are frozen fp32. Loss: mean cross-entropy of the
//! next token.
//!
//! Choices that shape memory (the estimate walks the same code, see [`super::expected`]):
//! - GQA without `repeat_kv`: the `n_rep` query heads that share a key/value head are stacked
//!   along the sequence (`(b, kv_heads, n_rep·s, hd)`), so keys and values are never copied.
//! - RoPE as `x·cos + rotate_half(x)·sin`, with `rotate_half` a fixed `hd × hd` matrix product.
//! - Softmax and log-softmax from elementary ops with the max shift detached.

use std::num::NonZeroU64;

use candle_core::Tensor;

use crate::model::LinearKind;

use super::graph::Graph;
use super::lora::{Adapter, Base, LoraLinear};
use super::rng::Rng;

/// RMSNorm epsilon (Llama 3 `rms_norm_eps`).
pub const RMS_EPS: f64 = 1e-5;
/// RoPE base (Llama 2 `rope_theta`).
pub const ROPE_THETA: f32 = 10_000.0;
/// Std of the frozen random weights (transformers `initializer_range` default).
pub const INIT_STD: f32 = 0.02;
/// Largest vocabulary: token ids are u32 tensors.
pub const MAX_VOCAB: usize = u32::MAX as usize;
/// Largest depth the probe builds (a bound on user input; real models have at most a few hundred).
pub const MAX_LAYERS: usize = 1 << 12;
/// Largest element count of one tensor of the step: 2^48 (1 PiB of fp32).
pub const MAX_TENSOR_ELEMENTS: u128 = 1 << 48;

/// Shape and training settings of the probe model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Width of one attention head (`head_dim` in config.json; `hidden / heads` when absent).
    pub head_dim: usize,
    pub intermediate: usize,
    pub tie_embeddings: bool,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: Vec<LinearKind>,
    pub double_quant: bool,
    /// false: frozen Linear weights in fp32 instead of NF4 (the memory comparison's control).
    pub nf4: bool,
    pub batch: usize,
    pub seq: usize,
    pub seed: u64,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// Checks the shape, naming the flag to fix. Every bound is a one-line error; nothing here
    /// allocates.
    pub fn validate(&self) -> Result<(), crate::Error> {
        let bad = |m: String| Err(crate::Error::Unsupported(m));
        let pos = [
            ("--vocab", self.vocab),
            ("--hidden", self.hidden),
            ("--layers", self.layers),
            ("--heads", self.heads),
            ("--kv-heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("--intermediate", self.intermediate),
            ("--rank", self.rank),
            ("--batch", self.batch),
            ("--seq", self.seq),
        ];
        for (flag, v) in pos {
            if v == 0 {
                return bad(format!("{flag} must be at least 1"));
            }
        }
        // Token ids are u32 tensors (candle's index ops take u32).
        if self.vocab > MAX_VOCAB {
            return bad(format!(
                "--vocab {}: token ids are u32, so at most {MAX_VOCAB}",
                self.vocab
            ));
        }
        if self.layers > MAX_LAYERS {
            return bad(format!(
                "--layers {}: at most {MAX_LAYERS} decoder layers",
                self.layers
            ));
        }
        // Every tensor's element count must fit comfortably in usize arithmetic; 2^48 elements
        // (1 PiB of fp32) is far beyond any device and keeps all products below 2^64.
        let (b, s, v, h, i) = (
            self.batch as u128,
            self.seq as u128,
            self.vocab as u128,
            self.hidden as u128,
            self.intermediate as u128,
        );
        let q = self.heads as u128 * self.head_dim as u128;
        let largest = [
            b * s * v,
            b * s * i,
            b * s * q,
            v * h,
            h * i,
            h * q,
            b * self.heads as u128 * s * s,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        if largest > MAX_TENSOR_ELEMENTS {
            return bad(format!(
                "a tensor of this step would hold {largest} elements (at most 2^48): lower --batch, --seq, --vocab, --hidden, --intermediate or --heads"
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!(
                "head dimension {} must be even (RoPE rotates pairs): choose --hidden a multiple of 2 × --heads",
                self.head_dim
            ));
        }
        if self.heads % self.kv_heads != 0 {
            return bad(format!(
                "--heads {} must be a multiple of --kv-heads {} (grouped-query attention)",
                self.heads, self.kv_heads
            ));
        }
        if self.nf4 {
            // Every Linear's in·out must fill whole 64-weight blocks.
            let b = super::nf4::BLOCK;
            if self.linears().iter().any(|(_, i, o)| (i * o) % b != 0) {
                return bad(format!(
                    "NF4 stores weights in blocks of {b}: choose --hidden, --intermediate and --kv-heads so every Linear has a multiple of {b} weights"
                ));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("--lora-dropout {} must be in [0, 1)", self.dropout));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!(
                "--alpha {}: LoRA alpha must be a positive finite number",
                self.alpha
            ));
        }
        if self.targets.contains(&LinearKind::Router) {
            return bad("the probe model is dense: no router to adapt".into());
        }
        let min_dim = self
            .linears()
            .iter()
            .filter(|(k, _, _)| self.targets.contains(k))
            .map(|(_, i, o)| *i.min(o))
            .min()
            .unwrap_or(usize::MAX);
        if self.rank > min_dim {
            return bad(format!(
                "--rank {} exceeds the smallest adapted Linear dimension ({min_dim})",
                self.rank
            ));
        }
        Ok(())
    }

    /// `(kind, in, out)` of the Linear layers of one decoder layer, in forward order.
    pub fn linears(&self) -> [(LinearKind, usize, usize); 7] {
        let (h, i, q, kv) = (
            self.hidden,
            self.intermediate,
            self.heads * self.head_dim(),
            self.kv_heads * self.head_dim(),
        );
        [
            (LinearKind::Q, h, q),
            (LinearKind::K, h, kv),
            (LinearKind::V, h, kv),
            (LinearKind::O, q, h),
            (LinearKind::Gate, h, i),
            (LinearKind::Up, h, i),
            (LinearKind::Down, i, h),
        ]
    }
}

/// One decoder layer's parameters.
#[derive(Debug, Clone)]
pub struct Layer<G: Graph> {
    pub attn_norm: G::T,
    pub mlp_norm: G::T,
    /// q, k, v, o, gate, up, down.
    pub linears: Vec<LoraLinear<G>>,
}

/// The model, built on a backend.
#[derive(Debug, Clone)]
pub struct Decoder<G: Graph> {
    pub cfg: ModelConfig,
    pub embed: G::T,
    pub layers: Vec<Layer<G>>,
    pub final_norm: G::T,
    /// None when tied to the embedding.
    pub lm_head: Option<G::T>,
    /// `(tokens, 1, head_dim)` cos and sin of each token's position.
    pub cos: G::T,
    pub sin: G::T,
    /// `rotate_half` as a matrix: `x · R = [-x₂, x₁]`.
    pub rotate: G::T,
    /// `(n_rep·s, s)` causal mask, 0 or -∞, tiled for the stacked query heads.
    pub mask: G::T,
}

/// Token ids and next-token targets of one fixed synthetic batch.
#[derive(Debug, Clone)]
pub struct Batch<G: Graph> {
    pub ids: G::T,
    pub targets: G::T,
}

impl<G: Graph> Decoder<G> {
    pub fn new(g: &G, cfg: &ModelConfig) -> Result<Decoder<G>, G::Error> {
        let mut rng = Rng::new(cfg.seed);
        let (v, h, hd) = (cfg.vocab, cfg.hidden, cfg.head_dim());
        let embed = g.constant(&[v, h], || rng.normal_vec(v * h, INIT_STD))?;
        let ones = |n: usize| g.constant(&[n], || vec![1.0; n]);
        let mut layers = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            let mut linears = Vec::with_capacity(7);
            for (kind, inf, outf) in cfg.linears() {
                let values = |rng: &mut Rng| rng.normal_vec(inf * outf, INIT_STD);
                let base = if cfg.nf4 {
                    Base::Nf4(g.nf4(outf, inf, cfg.double_quant, || values(&mut rng))?)
                } else {
                    Base::Dense(g.constant(&[outf, inf], || values(&mut rng))?)
                };
                let adapter = if cfg.targets.contains(&kind) {
                    Some(Adapter::new(
                        g,
                        inf,
                        outf,
                        cfg.rank,
                        cfg.alpha,
                        cfg.dropout,
                        &mut rng,
                    )?)
                } else {
                    None
                };
                linears.push(LoraLinear {
                    base,
                    adapter,
                    in_features: inf,
                    out_features: outf,
                });
            }
            layers.push(Layer {
                attn_norm: ones(h)?,
                mlp_norm: ones(h)?,
                linears,
            });
        }
        let final_norm = ones(h)?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(g.constant(&[v, h], || rng.normal_vec(v * h, INIT_STD))?)
        };
        let t = cfg.tokens();
        let angle = |tok: usize, j: usize| {
            let pos = (tok % cfg.seq) as f32;
            let freq = ROPE_THETA.powf(-2.0 * (j % (hd / 2)) as f32 / hd as f32);
            pos * freq
        };
        let table = |f: fn(f32) -> f32| {
            (0..t)
                .flat_map(|tok| (0..hd).map(move |j| f(angle(tok, j))))
                .collect::<Vec<f32>>()
        };
        let cos = g.constant(&[t, 1, hd], || table(f32::cos))?;
        let sin = g.constant(&[t, 1, hd], || table(f32::sin))?;
        let rotate = g.constant(&[hd, hd], || {
            // out[j] = -x[j + hd/2] for j < hd/2, x[j - hd/2] otherwise; R[row=in][col=out].
            let half = hd / 2;
            let mut r = vec![0f32; hd * hd];
            for j in 0..half {
                r[(j + half) * hd + j] = -1.0;
                r[j * hd + j + half] = 1.0;
            }
            r
        })?;
        let (s, rep) = (cfg.seq, cfg.heads / cfg.kv_heads);
        let mask = g.constant(&[rep * s, s], || {
            (0..rep * s)
                .flat_map(|row| {
                    (0..s).map(move |col| {
                        if col <= row % s {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect()
        })?;
        Ok(Decoder {
            cfg: cfg.clone(),
            embed,
            layers,
            final_norm,
            lm_head,
            cos,
            sin,
            rotate,
            mask,
        })
    }

    /// A fixed batch of random tokens; the targets are the ids shifted by one. The ids are only
    /// generated by backends that hold data (the shadow never calls the closures).
    pub fn batch(&self, g: &G) -> Result<Batch<G>, G::Error> {
        let (b, s) = (self.cfg.batch, self.cfg.seq);
        let (seed, vocab) = (self.cfg.seed ^ 0xBA7C, self.cfg.vocab);
        // Sequence i is tokens i·(s+1) .. (i+1)·(s+1) of one random stream; ids are its first s
        // tokens, targets its last s.
        let stream = move |shift: usize| {
            let n = NonZeroU64::new(vocab as u64).unwrap_or(NonZeroU64::MIN);
            let mut rng = Rng::new(seed);
            let mut out = Vec::with_capacity(b * s);
            for _ in 0..b {
                let row: Vec<u32> = (0..=s).map(|_| rng.below(n) as u32).collect();
                out.extend_from_slice(&row[shift..shift + s]);
            }
            out
        };
        Ok(Batch {
            ids: g.indices(&[b * s], || stream(0))?,
            targets: g.indices(&[b * s, 1], || stream(1))?,
        })
    }

    fn rms_norm(&self, g: &G, x: &G::T, w: &G::T) -> Result<G::T, G::Error> {
        let h = self.cfg.hidden as f64;
        let ms = g.affine(&g.sum_last_keepdim(&g.sqr(x)?)?, 1.0 / h, RMS_EPS)?;
        let xn = g.broadcast_div(x, &g.sqrt(&ms)?)?;
        g.broadcast_mul(&xn, w)
    }

    /// `(tokens, n·hd)` → rotated `(b, n, s, hd)`, contiguous.
    fn rope(&self, g: &G, x: &G::T, n: usize) -> Result<G::T, G::Error> {
        let (t, hd) = (self.cfg.tokens(), self.cfg.head_dim());
        let rot = g.matmul(&g.reshape(x, &[t * n, hd])?, &self.rotate)?;
        let x3 = g.reshape(x, &[t, n, hd])?;
        let rot3 = g.reshape(&rot, &[t, n, hd])?;
        let y = g.add(
            &g.broadcast_mul(&x3, &self.cos)?,
            &g.broadcast_mul(&rot3, &self.sin)?,
        )?;
        self.heads_first(g, &y, n)
    }

    /// `(tokens, n·hd)` → `(b, n, s, hd)`, contiguous.
    fn heads_first(&self, g: &G, x: &G::T, n: usize) -> Result<G::T, G::Error> {
        let (b, s, hd) = (self.cfg.batch, self.cfg.seq, self.cfg.head_dim());
        let x = g.reshape(x, &[b, s, n, hd])?;
        g.contiguous(&g.transpose(&x, 1, 2)?)
    }

    fn softmax_last(&self, g: &G, x: &G::T) -> Result<G::T, G::Error> {
        let z = g.broadcast_sub(x, &g.max_last_keepdim_detached(x)?)?;
        let e = g.exp(&z)?;
        g.broadcast_div(&e, &g.sum_last_keepdim(&e)?)
    }

    fn attention(
        &self,
        g: &G,
        layer: &Layer<G>,
        x: &G::T,
        rng: &mut Rng,
    ) -> Result<G::T, G::Error> {
        let c = &self.cfg;
        let (b, s, hd, nh, nkv) = (c.batch, c.seq, c.head_dim(), c.heads, c.kv_heads);
        let rep = nh / nkv;
        let l = &layer.linears;
        let q = l[0].forward(g, x, rng)?;
        let k = l[1].forward(g, x, rng)?;
        let v = l[2].forward(g, x, rng)?;
        // (b, nh, s, hd) → (b, nkv, rep·s, hd): query heads sharing a kv head stacked (a view).
        let q = g.affine(&self.rope(g, &q, nh)?, 1.0 / (hd as f64).sqrt(), 0.0)?;
        let q = g.reshape(&q, &[b, nkv, rep * s, hd])?;
        let k = self.rope(g, &k, nkv)?;
        let v = self.heads_first(g, &v, nkv)?;
        let scores = g.matmul(&q, &g.transpose(&k, 2, 3)?)?;
        let p = self.softmax_last(g, &g.broadcast_add(&scores, &self.mask)?)?;
        let o = g.matmul(&p, &v)?; // (b, nkv, rep·s, hd) = (b, nh, s, hd)
        let o = g.reshape(&o, &[b, nh, s, hd])?;
        let o = g.reshape(&g.transpose(&o, 1, 2)?, &[b * s, nh * hd])?;
        l[3].forward(g, &o, rng)
    }

    fn mlp(&self, g: &G, layer: &Layer<G>, x: &G::T, rng: &mut Rng) -> Result<G::T, G::Error> {
        let l = &layer.linears;
        let gate = l[4].forward(g, x, rng)?;
        let up = l[5].forward(g, x, rng)?;
        let act = g.mul(&g.silu(&gate)?, &up)?;
        l[6].forward(g, &act, rng)
    }

    /// Forward pass and mean cross-entropy loss (a scalar).
    pub fn loss(&self, g: &G, batch: &Batch<G>, rng: &mut Rng) -> Result<G::T, G::Error> {
        let mut x = g.index_select_rows(&self.embed, &batch.ids)?;
        for layer in &self.layers {
            let a = self.attention(g, layer, &self.rms_norm(g, &x, &layer.attn_norm)?, rng)?;
            x = g.add(&x, &a)?;
            let m = self.mlp(g, layer, &self.rms_norm(g, &x, &layer.mlp_norm)?, rng)?;
            x = g.add(&x, &m)?;
        }
        let xn = self.rms_norm(g, &x, &self.final_norm)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = g.matmul(&xn, &g.transpose(head, 0, 1)?)?;
        cross_entropy(g, &logits, &batch.targets)
    }
}

/// Mean over rows of `-log softmax(logits)[target]`.
pub fn cross_entropy<G: Graph>(g: &G, logits: &G::T, targets: &G::T) -> Result<G::T, G::Error> {
    let z = g.broadcast_sub(logits, &g.max_last_keepdim_detached(logits)?)?;
    let lse = g.log(&g.sum_last_keepdim(&g.exp(&z)?)?)?;
    let logp = g.broadcast_sub(&z, &lse)?;
    let picked = g.gather_last(&logp, targets)?;
    g.affine(&g.mean_all(&picked)?, -1.0, 0.0)
}

/// The scalar value of a real loss tensor.
pub fn scalar(t: &Tensor) -> candle_core::Result<f32> {
    t.to_scalar::<f32>()
}
