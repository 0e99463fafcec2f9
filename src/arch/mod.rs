//! The decoder layer as data.
//!
//! An architecture is a [`Recipe`]: the token embedding, an ordered list of decoder layers (each
//! one of a few distinct [`LayerRecipe`]s: dense and MoE layers, sliding-window and global
//! ones), the final norm and the lm_head. A layer is an ordered list of [`Op`]s over the layer's
//! tensors (named by index; tensor 0 is the layer input, the residual stream). Each op kind has
//! its PyTorch rules — what autograd saves, what it allocates transiently, which parameter
//! gradients it creates — in `crate::estimate::ops`; this module only says *what runs*.
//!
//! Everything else derives from the one recipe: parameter counts ([`Recipe::params`]), the set
//! bitsandbytes quantizes (`nn.Linear` modules only: [`Module::Linear`]), the LoRA target shapes
//! (peft's `all-linear` reaches `nn.Linear` modules and, for some model types, fused expert
//! parameters through `target_parameters`), and the activation inventory.
//!
//! The families (config.json → recipe) are in [`families`]; each cites the transformers 5.17
//! modeling file it follows.

pub mod decoder;
pub mod families;

use serde::Serialize;

use crate::model::LinearKind;

/// Index of a tensor within a layer.
pub type T = usize;

/// The dtype class of an activation tensor; resolved to bytes per element for a job by
/// `estimate::activations::Dtypes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dt {
    /// The residual stream and norm outputs (the dtype of embeddings and norm weights).
    Residual,
    /// Outputs of matmuls (the autocast dtype under autocast).
    LinearOut,
    /// Always fp32 (norm statistics, router probabilities).
    Fp32,
}

/// How a norm computes (what it saves differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// `LlamaRMSNorm`: fp32 copy, rsqrt, `weight * x.to(input_dtype)`.
    Rms,
    /// `Gemma*RMSNorm`: everything in fp32, `x * (1 + weight.float())`, cast at the end.
    RmsGemma,
    /// `Olmo2RMSNorm`: fp32 copy, rsqrt, `(weight * x).to(input_dtype)` (the product in fp32).
    RmsFp32Weight,
    /// `nn.LayerNorm` with weight and bias (`native_layer_norm` saves its input, mean, rstd).
    Layer,
    /// A norm without weight (Llama 4's `L2Norm` on q and k).
    L2,
}

/// A normalization over `width` elements per token, in `groups` independent groups (per-head
/// q/k norms normalise each head: `groups` = heads, weight = head_dim).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Norm {
    pub kind: NormKind,
    pub width: u128,
    pub groups: u128,
    /// Elements of the weight (0 for `L2`); LayerNorm has a bias of the same size too.
    pub weight: u128,
}

impl Norm {
    pub fn new(kind: NormKind, width: u128) -> Norm {
        Norm {
            kind,
            width,
            groups: 1,
            weight: if kind == NormKind::L2 { 0 } else { width },
        }
    }

    /// A norm applied to each of `groups` heads of `head_dim` (shared weight of head_dim).
    pub fn per_head(kind: NormKind, groups: u128, head_dim: u128) -> Norm {
        Norm {
            kind,
            width: groups * head_dim,
            groups,
            weight: if kind == NormKind::L2 { 0 } else { head_dim },
        }
    }

    pub fn param_count(&self) -> u128 {
        match self.kind {
            NormKind::Layer => 2 * self.weight,
            _ => self.weight,
        }
    }
}

/// How a weight is held: what bitsandbytes quantizes and what peft's `all-linear` adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Module {
    /// An `nn.Linear` (bitsandbytes `replace_with_bnb_linear` converts it; peft `all-linear`
    /// adapts it).
    Linear,
    /// A plain `nn.Parameter` used as a linear map (transformers 5 fused experts, routers):
    /// bitsandbytes leaves it in 16 bit; peft adapts it only through `target_parameters`.
    Param,
    /// A subclass of `nn.Linear` (Llama 4's and Phi-3.5-MoE's routers): bitsandbytes converts
    /// only `type(module) is nn.Linear`, so it stays 16-bit, but peft's `all-linear` matches it
    /// (`isinstance`).
    LinearSubclass,
}

/// A projection `in_f → out_f` (one per layer, or `copies` stacked experts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Proj {
    /// The parameter's name in the transformers module (`q_proj`, `qkv_proj`, `gate_up_proj` …).
    pub name: &'static str,
    pub kind: LinearKind,
    pub in_f: u128,
    pub out_f: u128,
    pub bias: bool,
    pub module: Module,
}

impl Proj {
    pub fn linear(
        name: &'static str,
        kind: LinearKind,
        in_f: u128,
        out_f: u128,
        bias: bool,
    ) -> Proj {
        Proj {
            name,
            kind,
            in_f,
            out_f,
            bias,
            module: Module::Linear,
        }
    }
}

/// Gated activations of the MLP (`act(gate) * up`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Act {
    /// SwiGLU: `silu(gate) * up` (Llama, Mistral, Qwen, Phi-3, OLMo-2, DeepSeek, Llama 4).
    Silu,
    /// GeGLU with the tanh GELU (`gelu_pytorch_tanh`): Gemma 2 and 3.
    GeluTanh,
    /// gpt-oss: `gate.clamp(max=limit)`, `up.clamp(-limit, limit)`,
    /// `(up + 1) * gate * sigmoid(alpha * gate)`.
    ClampedSwiglu,
}

/// The attention kernel's view of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AttnSpec {
    pub heads: u128,
    pub kv_heads: u128,
    /// q and k width per head (DeepSeek MLA: nope + rope dims).
    pub qk_head_dim: u128,
    /// v and output width per head.
    pub v_head_dim: u128,
    /// Sliding window (tokens), when this layer attends locally.
    pub window: Option<u128>,
    /// gpt-oss attention sinks: one learned logit per head joins the softmax.
    pub sinks: bool,
    /// Gemma 2: `tanh` soft-capping of the attention scores (eager only).
    pub softcap: bool,
}

/// Fused MoE experts as transformers 5 holds them: `gate_up_proj` [E, 2·I, h] (or [E, h, 2·I])
/// and `down_proj` [E, h, I] as 3-D `nn.Parameter`s, applied per expert to the tokens routed to
/// it (`MixtralExperts.forward`: index, linear, act, linear, weight, `index_add_`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Experts {
    pub experts: u128,
    pub top_k: u128,
    pub hidden: u128,
    pub inter: u128,
    /// Biases on both expert projections (gpt-oss).
    pub bias: bool,
    pub act: Act,
    /// The routing weights are fp32 (Mixtral, DeepSeek routers): the weighted expert outputs are
    /// fp32 too.
    pub fp32_weights: bool,
    /// Every token runs through every expert, weighted by its (mostly zero) score (Llama 4's
    /// `Llama4TextMoe`: `hidden.repeat(E, 1) * scores`, then `bmm`), instead of the top-k.
    pub dense_all: bool,
}

impl Experts {
    pub fn gate_up_params(&self) -> u128 {
        self.experts * 2 * self.inter * self.hidden
    }

    pub fn down_params(&self) -> u128 {
        self.experts * self.hidden * self.inter
    }

    pub fn bias_params(&self) -> u128 {
        if self.bias {
            self.experts * (2 * self.inter + self.hidden)
        } else {
            0
        }
    }
}

/// The router of an MoE layer: logits over `experts`, top-k.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Router {
    pub proj: Proj,
    pub experts: u128,
    pub top_k: u128,
}

/// An operation of a decoder layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum OpKind {
    Norm(Norm),
    Linear(Proj),
    /// q, k, v → attention output.
    Attention(AttnSpec),
    /// gate, up → `act(gate) * up` (a fused `gate_up` output is passed twice).
    Glu(Act),
    /// gate → `act(gate)`: a GLU's activation on its own projection, which Python evaluates
    /// before the up projection (`down_proj(act_fn(gate_proj(x)) * up_proj(x))`).
    Act(Act),
    /// a, b → `a * b` (the GLU's product after [`OpKind::Act`]): saves both.
    Mul,
    Router(Router),
    /// x (routed) → the weighted sum of the experts' outputs.
    Experts(Experts),
    /// a + b (the residual add): saves nothing.
    Add,
    /// Multiplication by a constant (Granite's residual multiplier, embedding scales): saves
    /// nothing, allocates its output.
    Scale,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Op {
    pub kind: OpKind,
    pub inputs: Vec<T>,
    pub output: T,
    /// The residual block the op belongs to (0 attention, 1 MLP): backward walks blocks in
    /// reverse, each with the incoming and outgoing residual gradients alive.
    pub block: u8,
}

/// An activation tensor of a layer: elements per token and dtype class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tensor {
    pub width: u128,
    pub dt: Dt,
}

/// One kind of decoder layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerRecipe {
    /// e.g. "dense", "moe", "sliding", "global".
    pub name: String,
    pub tensors: Vec<Tensor>,
    pub ops: Vec<Op>,
}

/// A parameter tensor, for counts, quantization, LoRA and optimizer state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Param {
    pub name: &'static str,
    pub rows: u128,
    pub cols: u128,
    /// Stacked copies in one tensor (E for fused experts).
    pub copies: u128,
    pub role: ParamRole,
}

impl Param {
    pub fn numel(&self) -> u128 {
        self.rows * self.cols * self.copies
    }
}

/// What a parameter is, for quantization and adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamRole {
    /// An `nn.Linear` weight of a decoder layer: bitsandbytes quantizes it.
    LinearWeight(LinearKind),
    /// A 2-D/3-D `nn.Parameter` used as a weight (fused experts, routers): stays 16-bit.
    ParamWeight(LinearKind),
    /// Biases, norm weights, sinks: stay 16-bit.
    Vector,
    Embedding,
    LmHead,
    /// An `nn.Linear` of a vision tower: quantized by bitsandbytes, adapted by `all-linear` (and
    /// by a target list naming it: peft matches module-name suffixes), but never in the graph
    /// of a text-only batch.
    VisionLinear(Option<LinearKind>),
    /// Other vision-tower parameters (embeddings, norms, a plain projection parameter).
    VisionOther,
}

/// Embedding and lm_head.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Head {
    pub tied: bool,
    pub bias: bool,
    /// Ops transformers applies to the logits before the loss, each allocating a b·s·V copy:
    /// Gemma 2's final soft-capping (`/ cap`, `tanh`, `* cap`: tanh saves its output) and
    /// Granite's `/ logits_scaling`.
    pub softcap: bool,
    pub scaling: bool,
    /// The embedding output is multiplied by a constant (Gemma's `sqrt(hidden)`, Granite).
    pub embed_scale: bool,
}

/// A whole architecture.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recipe {
    /// The transformers class modelled, e.g. `Gemma2ForCausalLM`.
    pub class: String,
    pub vocab: u128,
    pub hidden: u128,
    pub kinds: Vec<LayerRecipe>,
    /// The kind of each decoder layer, in order.
    pub layer_kind: Vec<usize>,
    pub final_norm: Norm,
    pub head: Head,
    /// Frozen resident parameters outside the decoder (a multimodal wrapper's vision tower and
    /// projector), with their multiplicity.
    pub vision: Vec<(Param, u128)>,
    /// peft 0.21 converts MoE target names for this model type (`transformers_weight_conversion`
    /// `_MODEL_TO_CONVERSION_PATTERN`: mixtral, qwen2_moe): `gate_proj`/`up_proj`/`w1`/`w3` become
    /// `target_parameters` on the fused `gate_up_proj` (rank 2r when both are named),
    /// `down_proj`/`w2` on `down_proj`, `gate` on the router weight — and no `nn.Linear` named
    /// gate/up/down_proj (dense layers, shared experts) keeps an adapter.
    pub peft_moe_conversion: bool,
    /// Assumptions stated in `--explain`.
    pub notes: Vec<String>,
    /// When transformers allows only eager attention for this model: the reason.
    pub eager_only: Option<String>,
    /// `use_cache` of the config (transformers' default: true). A training forward without
    /// gradient checkpointing then fills a `DynamicCache`, whose `torch.cat` hands the attention
    /// copies of k and v.
    pub use_cache: bool,
}

impl Recipe {
    pub fn layers(&self) -> u128 {
        self.layer_kind.len() as u128
    }

    /// Number of layers of each kind.
    pub fn kind_counts(&self) -> Vec<u128> {
        let mut n = vec![0u128; self.kinds.len()];
        for &k in &self.layer_kind {
            n[k] += 1;
        }
        n
    }

    /// Parameters of one layer of `kind`, from its ops.
    pub fn layer_params(&self, kind: usize) -> Vec<Param> {
        let mut out = Vec::new();
        for op in &self.kinds[kind].ops {
            op_params(&op.kind, &mut out);
        }
        out
    }

    /// A layer's parameters in `nn.Module` registration order: the attention and MLP modules'
    /// parameters first (q/k norms and MLA's norms inside attention, in op order), then the
    /// decoder layer's own norms (transformers' decoder layers register `self_attn`, `mlp`, then
    /// `input_layernorm`, `post_attention_layernorm`, …). A norm is the layer's own unless it
    /// normalizes a projection's output for another op than the residual add.
    pub fn registration_order(&self, kind: usize) -> Vec<Param> {
        let layer = &self.kinds[kind];
        let (mut modules, mut norms) = (Vec::new(), Vec::new());
        for (i, op) in layer.ops.iter().enumerate() {
            let mut ps = Vec::new();
            op_params(&op.kind, &mut ps);
            if is_layer_norm(layer, i) {
                norms.extend(ps);
            } else {
                modules.extend(ps);
            }
        }
        modules.extend(norms);
        modules
    }

    /// All parameters with their multiplicity (number of layers holding them).
    pub fn params(&self) -> Vec<(Param, u128)> {
        let mut out = vec![(
            Param {
                name: "embed_tokens",
                rows: self.vocab,
                cols: self.hidden,
                copies: 1,
                role: ParamRole::Embedding,
            },
            1,
        )];
        for (k, n) in self.kind_counts().into_iter().enumerate() {
            if n > 0 {
                out.extend(self.layer_params(k).into_iter().map(|p| (p, n)));
            }
        }
        out.push((vector("norm", self.final_norm.param_count()), 1));
        if !self.head.tied {
            out.push((
                Param {
                    name: "lm_head",
                    rows: self.vocab,
                    cols: self.hidden,
                    copies: 1,
                    role: ParamRole::LmHead,
                },
                1,
            ));
        }
        if self.head.bias {
            out.push((vector("lm_head.bias", self.vocab), 1));
        }
        out.extend(self.vision.iter().copied());
        out.retain(|(p, _)| p.numel() > 0);
        out
    }

    /// Every parameter tensor in the order the model is built (module order): the embedding,
    /// each layer's parameters, the final norm, lm_head, a vision tower.
    pub fn build_order(&self) -> Vec<Param> {
        let all = self.params();
        let layer_kinds: Vec<Vec<Param>> = (0..self.kinds.len())
            .map(|k| {
                let mut ps = self.registration_order(k);
                ps.retain(|p| p.numel() > 0);
                ps
            })
            .collect();
        let in_layers: usize = self
            .kind_counts()
            .iter()
            .zip(&layer_kinds)
            .filter(|(n, _)| **n > 0)
            .map(|(_, ps)| ps.len())
            .sum();
        let mut out = vec![all[0].0];
        for &k in &self.layer_kind {
            out.extend(layer_kinds[k].iter().copied());
        }
        for (p, n) in all.iter().skip(1 + in_layers) {
            out.extend(std::iter::repeat(*p).take(*n as usize));
        }
        out
    }

    pub fn param_total(&self) -> u128 {
        self.params().iter().map(|(p, n)| p.numel() * n).sum()
    }

    /// The module names of the decoder's projections (for error messages).
    pub fn projection_names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Vec::new();
        for k in &self.kinds {
            for op in &k.ops {
                let n = match &op.kind {
                    OpKind::Linear(p) => p.name,
                    OpKind::Router(r) => r.proj.name,
                    OpKind::Experts(_) => "experts",
                    _ => continue,
                };
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        names
    }

    /// The class of a router that subclasses `nn.Linear`, if the model has one.
    pub fn subclass_router(&self) -> Option<String> {
        self.kinds
            .iter()
            .flat_map(|k| &k.ops)
            .find_map(|op| match &op.kind {
                OpKind::Router(r) if r.proj.module == Module::LinearSubclass => {
                    Some(format!("{}'s router", self.class))
                }
                _ => None,
            })
    }

    pub fn vision_params(&self) -> u128 {
        self.vision.iter().map(|(p, n)| p.numel() * n).sum()
    }
}

fn vector(name: &'static str, n: u128) -> Param {
    Param {
        name,
        rows: 1,
        cols: n,
        copies: 1,
        role: ParamRole::Vector,
    }
}

/// Whether op `i` of `layer` is one of the decoder layer's own norms (`input_layernorm`,
/// `post_attention_layernorm`, …), not a norm inside the attention or MLP module (q/k norms,
/// MLA's): a norm is the layer's own unless it normalizes a projection's output for another op
/// than the residual add.
pub fn is_layer_norm(layer: &LayerRecipe, i: usize) -> bool {
    let op = &layer.ops[i];
    if !matches!(op.kind, OpKind::Norm(_)) {
        return false;
    }
    let produced_by_linear = layer.ops.iter().any(|o| {
        o.output == op.inputs[0] && matches!(o.kind, OpKind::Linear(_) | OpKind::Router(_))
    });
    let feeds_residual = layer
        .ops
        .iter()
        .filter(|o| o.inputs.contains(&op.output))
        .all(|o| matches!(o.kind, OpKind::Add | OpKind::Scale));
    !produced_by_linear || feeds_residual
}

/// Per op: the last op of the transformers module it runs in (the attention or the MLP module),
/// `None` for the decoder layer's own ops (its norms, residual adds and scales). A module's ops
/// are the run between two of those; it returns after its last op.
pub fn module_ends(layer: &LayerRecipe) -> Vec<Option<usize>> {
    let n = layer.ops.len();
    let own = |i: usize| {
        matches!(layer.ops[i].kind, OpKind::Add | OpKind::Scale) || is_layer_norm(layer, i)
    };
    let mut ends = vec![None; n];
    let mut i = 0;
    while i < n {
        if own(i) {
            i += 1;
            continue;
        }
        let end = (i..n).take_while(|&j| !own(j)).last().unwrap_or(i);
        for e in &mut ends[i..=end] {
            *e = Some(end);
        }
        i = end + 1;
    }
    ends
}

/// Per tensor: the op until which Python keeps it alive after its last reader. A decoder
/// layer's own pre-norm output is the argument of the module after it (`hidden_states =
/// self.input_layernorm(hidden_states)`, then `self.self_attn(hidden_states)`; the same for
/// `self.mlp`), and the attention module's `value_states` is a local of its forward: both live
/// until the module returns, i.e. until the module's last op.
pub fn module_argument_until(layer: &LayerRecipe) -> Vec<Option<usize>> {
    let ends = module_ends(layer);
    let mut held = vec![None; layer.tensors.len()];
    for (i, op) in layer.ops.iter().enumerate() {
        if is_layer_norm(layer, i) {
            let first =
                (i + 1..layer.ops.len()).find(|&j| layer.ops[j].inputs.contains(&op.output));
            if let Some(end) = first.and_then(|j| ends[j]) {
                held[op.output] = Some(end);
            }
        }
        if let (OpKind::Attention(_), Some(end)) = (&op.kind, ends[i]) {
            if let Some(&v) = op.inputs.get(2) {
                held[v] = held[v].max(Some(end));
            }
        }
    }
    held
}

fn op_params(op: &OpKind, out: &mut Vec<Param>) {
    match op {
        OpKind::Norm(n) => {
            if n.param_count() > 0 {
                out.push(vector("norm", n.param_count()));
            }
        }
        OpKind::Linear(p) => proj_params(p, 1, out),
        OpKind::Router(r) => proj_params(&r.proj, 1, out),
        OpKind::Attention(a) => {
            if a.sinks {
                out.push(vector("sinks", a.heads));
            }
        }
        OpKind::Experts(e) => {
            out.push(Param {
                name: "experts.gate_up_proj",
                rows: 2 * e.inter,
                cols: e.hidden,
                copies: e.experts,
                role: ParamRole::ParamWeight(LinearKind::GateUp),
            });
            out.push(Param {
                name: "experts.down_proj",
                rows: e.hidden,
                cols: e.inter,
                copies: e.experts,
                role: ParamRole::ParamWeight(LinearKind::Down),
            });
            if e.bias {
                out.push(Param {
                    name: "experts.biases",
                    rows: 1,
                    cols: 2 * e.inter + e.hidden,
                    copies: e.experts,
                    role: ParamRole::Vector,
                });
            }
        }
        OpKind::Glu(_) | OpKind::Act(_) | OpKind::Mul | OpKind::Add | OpKind::Scale => {}
    }
}

fn proj_params(p: &Proj, copies: u128, out: &mut Vec<Param>) {
    out.push(Param {
        name: p.name,
        rows: p.out_f,
        cols: p.in_f,
        copies,
        role: match p.module {
            Module::Linear => ParamRole::LinearWeight(p.kind),
            Module::Param | Module::LinearSubclass => ParamRole::ParamWeight(p.kind),
        },
    });
    if p.bias {
        out.push(vector("bias", p.out_f * copies));
    }
}

/// Builds a layer's op list over named tensors.
#[derive(Debug)]
pub struct LayerBuilder {
    tensors: Vec<Tensor>,
    ops: Vec<Op>,
    block: u8,
}

impl LayerBuilder {
    /// A layer whose input (tensor 0) is the residual stream of `hidden` elements per token.
    pub fn new(hidden: u128) -> LayerBuilder {
        LayerBuilder {
            tensors: vec![Tensor {
                width: hidden,
                dt: Dt::Residual,
            }],
            ops: Vec::new(),
            block: 0,
        }
    }

    pub fn input(&self) -> T {
        0
    }

    /// Starts the MLP block.
    pub fn mlp_block(&mut self) {
        self.block = 1;
    }

    fn push(&mut self, kind: OpKind, inputs: Vec<T>, width: u128, dt: Dt) -> T {
        self.tensors.push(Tensor { width, dt });
        let output = self.tensors.len() - 1;
        self.ops.push(Op {
            kind,
            inputs,
            output,
            block: self.block,
        });
        output
    }

    pub fn width(&self, t: T) -> u128 {
        self.tensors[t].width
    }

    pub fn norm(&mut self, x: T, n: Norm) -> T {
        let dt = self.tensors[x].dt;
        self.push(OpKind::Norm(n), vec![x], n.width, dt)
    }

    pub fn linear(&mut self, x: T, p: Proj) -> T {
        self.push(OpKind::Linear(p), vec![x], p.out_f, Dt::LinearOut)
    }

    pub fn attention(&mut self, q: T, k: T, v: T, a: AttnSpec) -> T {
        self.push(
            OpKind::Attention(a),
            vec![q, k, v],
            a.heads * a.v_head_dim,
            Dt::LinearOut,
        )
    }

    pub fn act(&mut self, gate: T, act: Act) -> T {
        let w = self.tensors[gate].width;
        self.push(OpKind::Act(act), vec![gate], w, Dt::LinearOut)
    }

    pub fn mul(&mut self, a: T, b: T) -> T {
        let w = self.tensors[a].width;
        self.push(OpKind::Mul, vec![a, b], w, Dt::LinearOut)
    }

    pub fn glu(&mut self, gate: T, up: T, act: Act, width: u128) -> T {
        self.push(OpKind::Glu(act), vec![gate, up], width, Dt::LinearOut)
    }

    pub fn router(&mut self, x: T, r: Router) -> T {
        self.push(OpKind::Router(r), vec![x], r.experts, Dt::Fp32)
    }

    pub fn experts(&mut self, x: T, routing: T, e: Experts) -> T {
        self.push(
            OpKind::Experts(e),
            vec![x, routing],
            e.hidden,
            Dt::LinearOut,
        )
    }

    pub fn add(&mut self, a: T, b: T) -> T {
        let w = self.tensors[a].width;
        self.push(OpKind::Add, vec![a, b], w, Dt::Residual)
    }

    pub fn scale(&mut self, x: T) -> T {
        let t = self.tensors[x];
        self.push(OpKind::Scale, vec![x], t.width, t.dt)
    }

    pub fn build(self, name: &str) -> LayerRecipe {
        LayerRecipe {
            name: name.to_string(),
            tensors: self.tensors,
            ops: self.ops,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_arguments_and_locals_live_until_the_module_returns() {
        let (m, _) = crate::model::resolve_model("llama-3.2-1b").unwrap();
        let layer = &m.recipe.kinds[0];
        let index = |name: &str| {
            layer
                .ops
                .iter()
                .position(|o| matches!(&o.kind, OpKind::Linear(p) if p.name == name))
                .unwrap()
        };
        // `act_fn(gate_proj(x)) * up_proj(x)`: the activation runs between the projections.
        let (gate, up) = (index("gate_proj"), index("up_proj"));
        assert_eq!(layer.ops[gate + 1].kind, OpKind::Act(Act::Silu));
        assert_eq!(gate + 2, up);
        assert_eq!(layer.ops[up + 1].kind, OpKind::Mul);
        let held = module_argument_until(layer);
        let ends = module_ends(layer);
        let (o, down) = (index("o_proj"), index("down_proj"));
        // input_layernorm's output and v_proj's (value_states) until o_proj has run;
        // post_attention_layernorm's until down_proj has.
        let norm_out = |i: usize| layer.ops[i].output;
        assert_eq!(held[norm_out(0)], Some(o));
        assert_eq!(held[layer.ops[index("v_proj")].output], Some(o));
        assert_eq!(held[norm_out(o + 2)], Some(down));
        // The decoder layer's own ops belong to no module.
        assert_eq!(ends[0], None);
        assert_eq!(ends[o + 1], None);
        assert_eq!(ends[gate], Some(down));
    }
}
