//! The PyTorch rules of each op kind of a [`LayerRecipe`]: what autograd saves for backward,
//! what the op allocates transiently forward and backward, which parameter gradients its
//! backward creates. Walking a layer's ops with these rules gives its tensor inventory
//! ([`inventory`]); `super::train_step` replays it as tensor-level events.
//!
//! The rules follow PyTorch 2.11's derivatives (`tools/autograd/derivatives.yaml`: an op saves an
//! input only when another input's gradient needs it), transformers 5.17's modules, peft 0.21
//! and bitsandbytes 0.50.2, and were checked tensor by tensor against the H200 measurements in
//! `tests/data` and the meta-tensor traces in `tests/data/reference`:
//! - RMSNorm (`LlamaRMSNorm`) upcasts its input to fp32 (`pow` and `mul` save that 4·w copy and
//!   the 4-byte rsqrt per group); `weight * x.to(dtype)` saves the normalized copy only when the
//!   weight trains. Gemma's norm multiplies by `1 + weight.float()` in fp32 (a 4·w normalized
//!   copy when the weight trains); OLMo-2's multiplies `weight * x` in fp32. `nn.LayerNorm`
//!   (`native_layer_norm`) saves its input and fp32 mean and rstd.
//! - `nn.Linear` saves its input only when its weight trains; a frozen (or bitsandbytes 4-bit,
//!   `MatMul4Bit`) base saves nothing. Under autocast each Linear casts its input itself (its own
//!   16-bit copy) and keeps a 16-bit copy of its weight until its backward.
//! - peft LoRA casts the input to the adapter dtype (fp32) per module, then dropout: saved are the
//!   fp32 dropout output and its bool mask (5 B/element), or the fp32 copy (4 B) without dropout,
//!   or the shared input itself when it already is fp32; lora_B saves lora_A's fp32 output
//!   (4·r B/token per module).
//! - RoPE saves only cos/sin. SDPA without a mask runs flash attention, which saves q, k, v, its
//!   output and an fp32 log-sum-exp per head, without repeating k/v (`enable_gqa`); its output,
//!   transposed back, is o_proj's input. With a sliding-window mask (sequence ≥ window) SDPA runs
//!   memory-efficient attention: k and v repeated to all heads (`repeat_kv`) and the boolean mask
//!   converted to a 16-bit additive bias, saved per layer. A view saved for backward keeps its
//!   whole storage alive: a fused `qkv_proj` or `gate_up_proj` output stays whole.
//! - Eager attention repeats k and v to all heads (unless heads == kv heads) and saves the fp32
//!   softmax (4 B) and its 16-bit cast (2 B) per score; Gemma 2's soft-capping adds the saved tanh
//!   output (2 B); gpt-oss's sinks run the softmax in the scores' dtype (2 B per score, instead of
//!   6).
//! - Gated MLPs: `act(gate)` saves gate, `mul` saves both factors (SwiGLU, GeGLU); gpt-oss's
//!   clamped SwiGLU saves the fused output, the clamped gate, sigmoid, `up + 1` and the product.
//! - MoE (transformers 5 fused experts): per expert, the routed tokens are gathered (saved when
//!   the expert weights train), `gate_up` output, activation and product as above, the down
//!   output (saved by the routing-weight multiply) and the index; the router's fp32 softmax and
//!   top-k weights and indices. Tokens are split evenly over the experts (k of E per token):
//!   real routing is data-dependent, and the balanced split is what the load-balancing loss aims
//!   at; expect the activations of a skewed batch to differ by a few percent.
//!
//! Backward transients (gradient buffers of each module) follow the same rules; the backward of
//! a block runs op by op in reverse, each op freeing what it saved once it has run.

use crate::arch::{Act, AttnSpec, Dt, Experts, LayerRecipe, NormKind, OpKind, Proj, T};
use crate::dtype::Precision;
use crate::method::{Attention, Job, Method};

use super::backward::{Bwd, BwdScript};
use super::resident::{dense_param_bytes, ADAPTER_BYTES};
// FSDP-HOOK(m): the adapter dtype is FSDP's param_dtype under mixed precision (sharding.rs).
use super::sharding::adapter_bytes;

/// Dtypes of the tensors flowing through the model, in bytes per element.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dtypes {
    /// Compute (autocast) dtype.
    pub compute: u128,
    /// Residual stream and norm outputs (the embedding / norm weight dtype).
    pub residual: u128,
    /// Outputs of Linear layers.
    pub linear_out: u128,
    /// q, k, v and the attention output as SDPA sees them.
    pub attention: u128,
    /// Logits as lm_head returns them.
    pub logits: u128,
    /// fp32 weights under a 16-bit autocast: matmuls run on cached 16-bit weight copies.
    pub autocast: bool,
}

impl Dtypes {
    pub fn of(job: &Job) -> Dtypes {
        let compute = job.compute.float_bytes();
        let dense = dense_param_bytes(job);
        let autocast = job.weights.is_float()
            && job.weights.float_bytes() > compute
            && job.method != Method::Inference;
        let linear_out = if autocast { compute } else { dense };
        Dtypes {
            compute,
            residual: dense,
            linear_out,
            attention: linear_out,
            logits: if autocast { compute } else { dense },
            autocast,
        }
    }

    pub fn of_class(&self, dt: Dt) -> u128 {
        match dt {
            Dt::Residual => self.residual,
            Dt::LinearOut => self.linear_out,
            Dt::Fp32 => 4,
        }
    }
}

/// A tensor saved for backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// A tensor of the layer (an op's output or the layer input), counted once however many ops
    /// save it; freed after the backward of the first op (in forward order) that saves it.
    Shared(T),
    /// A tensor the op creates for itself (a cast, a mask, statistics): bytes.
    Own(u128),
}

/// What one op costs, for a given number of tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpCost {
    pub saved: Vec<Saved>,
    /// Extra bytes alive while the op's forward runs (dequantized weights, fp32 LoRA sums,
    /// eager scores).
    pub fwd_transient: u128,
    /// Bytes the op would save that, under checkpointing, only live until their consumer ran.
    pub ckpt_transient: u128,
    /// Extra bytes alive while the op's backward runs (input and adapter gradients).
    pub bwd_transient: u128,
    /// A backward in stages (the experts: down projection, then gate_up): each stage's transient
    /// bytes and how many of the op's saved tensors, from the end of `saved`, it releases. Empty:
    /// one stage of `bwd_transient` releasing everything.
    pub bwd_stages: Vec<(u128, usize)>,
    /// Parameter gradients the op's backward creates (bytes each).
    pub grads: Vec<u128>,
    /// The op's forward, intermediate by intermediate in the order PyTorch allocates them
    /// (temporaries freed where the op frees them, saved tensors allocated where they are
    /// created). Empty: `fwd_transient` once, then the saved tensors.
    pub fwd_script: Vec<Fwd>,
    /// The same forward when autograd keeps nothing (a checkpointed layer's first forward): its
    /// would-be saved tensors die where the code drops them. Empty: `fwd_script`, with the
    /// saved tensors freed when the op ends.
    pub fwd_script_nosave: Vec<Fwd>,
    /// The op's backward, buffer by buffer in the order autograd creates them (`backward.rs`).
    /// Empty: its input gradients, then `bwd_transient` (or `bwd_stages`) once.
    pub bwd_script: Vec<Bwd>,
    /// The saved tensor that is autocast's cached 16-bit copy of a weight (`cached_cast` keeps
    /// it until the autocast region ends, even when autograd saves nothing).
    pub autocast_cast: Option<usize>,
    /// A saved tensor the op also returns to its module, which keeps it until the layer's
    /// forward returns even when autograd saves nothing (eager attention's probabilities:
    /// `hidden_states, _ = self.self_attn(...)` holds them in `_`).
    pub held_by_layer: Option<usize>,
}

/// One step of an op's forward script ([`OpCost::fwd_script`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fwd {
    /// A temporary of this many bytes; the k-th `Temp` of a script is temporary k.
    Temp(u128),
    /// Frees temporary k (what is still live when the script ends is freed then).
    Free(usize),
    /// Allocates the op's j-th saved tensor (`OpCost::saved[j]`) here.
    Save(usize),
    /// Allocates the op's output here (without it: when the script ends).
    Out,
    /// Frees the op's input n here when this op is its last reader and nobody saved it.
    DropInput(usize),
}

/// Builds a forward script: `temp` returns the temporary's index for a later `free`.
#[derive(Default)]
struct Script {
    steps: Vec<Fwd>,
    temps: usize,
}

impl Script {
    fn temp(&mut self, bytes: u128) -> usize {
        self.steps.push(Fwd::Temp(bytes));
        self.temps += 1;
        self.temps - 1
    }

    fn free(&mut self, k: usize) {
        self.steps.push(Fwd::Free(k));
    }

    fn save(&mut self, j: usize) {
        self.steps.push(Fwd::Save(j));
    }

    fn out(&mut self) {
        self.steps.push(Fwd::Out);
    }

    fn drop_input(&mut self, n: usize) {
        self.steps.push(Fwd::DropInput(n));
    }

    /// A tensor that is saved (`Some(j)`) or else a temporary: returns the temporary.
    fn saved_or_temp(&mut self, j: Option<usize>, bytes: u128) -> Option<usize> {
        match j {
            Some(j) => {
                self.save(j);
                None
            }
            None => Some(self.temp(bytes)),
        }
    }
}

/// A layer's inventory for `tokens` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerInventory {
    pub ops: Vec<OpCost>,
    /// Bytes of each tensor of the layer (what a `Saved::Shared` costs).
    pub tensor_bytes: Vec<u128>,
    /// The residual block of each op.
    pub blocks: Vec<u8>,
    /// The layer input (what checkpointing keeps).
    pub input: u128,
    /// Peak of extra buffers while the layer's forward runs.
    pub fwd_transient: u128,
    /// The two residual-stream gradients alive through each block's backward (incoming and
    /// outgoing), bytes each.
    pub residual_grad: u128,
    /// Each op's input tensors and output tensor (the forward walk keeps a tensor alive from
    /// its op until its last consumer, or until backward when saved).
    pub inputs: Vec<Vec<T>>,
    pub outputs: Vec<T>,
    /// Whether each tensor requires a gradient (autograd runs an op's backward only then).
    pub requires_grad: Vec<bool>,
    /// Whether each op is one of the decoder layer's own norms (registered after its attention
    /// and MLP modules: `Recipe::registration_order`).
    pub layer_norm: Vec<bool>,
}

impl LayerInventory {
    /// All saved bytes (shared tensors once).
    pub fn saved(&self) -> u128 {
        let mut seen = vec![false; self.tensor_bytes.len()];
        let mut total = 0;
        for op in &self.ops {
            for s in &op.saved {
                match *s {
                    Saved::Own(b) => total += b,
                    Saved::Shared(t) if !seen[t] => {
                        seen[t] = true;
                        total += self.tensor_bytes[t];
                    }
                    Saved::Shared(_) => {}
                }
            }
        }
        total
    }

    pub fn grads(&self) -> u128 {
        self.ops.iter().flat_map(|o| o.grads.iter()).sum()
    }
}

/// The context an op's rule sees.
struct Ctx<'a> {
    job: &'a Job,
    dt: Dtypes,
    tokens: u128,
    full: bool,
}

impl Ctx<'_> {
    fn lora(&self, p: &Proj) -> Option<&crate::method::LoraSettings> {
        self.job
            .lora
            .as_ref()
            .filter(|_| super::resident::adapts_linear(self.job, p))
    }

    fn quantized(&self, p: &Proj) -> bool {
        matches!(self.job.weights, Precision::Nf4 | Precision::Int8)
            && p.module == crate::arch::Module::Linear
    }

    fn param_bytes(&self) -> u128 {
        dense_param_bytes(self.job)
    }
}

/// The inventory of `layer` for `tokens` tokens. `input_grad`: whether the layer input requires
/// a gradient (false for the first layer of a frozen base, whose embedding output needs none —
/// unless peft's `enable_input_require_grads` hook is on).
pub fn inventory(job: &Job, layer: &LayerRecipe, tokens: u128, input_grad: bool) -> LayerInventory {
    let cx = Ctx {
        job,
        dt: Dtypes::of(job),
        tokens,
        full: job.method == Method::Full,
    };
    let n = layer.tensors.len();
    let mut rg = vec![false; n];
    rg[0] = input_grad;
    let tensor_bytes: Vec<u128> = layer
        .tensors
        .iter()
        .map(|t| tokens * t.width * cx.dt.of_class(t.dt))
        .collect();
    let mut ops = Vec::with_capacity(layer.ops.len());
    for op in &layer.ops {
        let in_rg = op.inputs.iter().any(|&i| rg[i]);
        let (cost, trains) = op_cost(&cx, layer, &op.kind, &op.inputs, in_rg);
        rg[op.output] = in_rg || trains;
        ops.push(cost);
    }
    let max_fwd = ops.iter().map(|o| o.fwd_transient).max().unwrap_or(0);
    let ckpt: u128 = ops.iter().map(|o| o.ckpt_transient).sum();
    LayerInventory {
        input: tensor_bytes[0],
        fwd_transient: max_fwd + if job.grad_checkpointing { ckpt } else { 0 },
        residual_grad: tokens * cx.dt.residual * layer.tensors[0].width,
        blocks: layer.ops.iter().map(|o| o.block).collect(),
        inputs: layer.ops.iter().map(|o| o.inputs.clone()).collect(),
        outputs: layer.ops.iter().map(|o| o.output).collect(),
        requires_grad: rg,
        layer_norm: (0..layer.ops.len())
            .map(|i| crate::arch::is_layer_norm(layer, i))
            .collect(),
        tensor_bytes,
        ops,
    }
}

/// One op's cost and whether it owns a trainable parameter.
fn op_cost(
    cx: &Ctx,
    layer: &LayerRecipe,
    op: &OpKind,
    inputs: &[T],
    in_rg: bool,
) -> (OpCost, bool) {
    let t = cx.tokens;
    let width = |i: T| layer.tensors[i].width;
    let bytes_of = |i: T| cx.dt.of_class(layer.tensors[i].dt);
    let mut c = OpCost::default();
    match op {
        OpKind::Norm(n) => {
            let trains = cx.full && n.weight > 0;
            let x = inputs[0];
            let w = n.width;
            if in_rg {
                match n.kind {
                    // native_layer_norm saves its input, fp32 mean and rstd.
                    NormKind::Layer => {
                        c.saved.push(Saved::Shared(x));
                        c.saved.push(Saved::Own(t * 8 * n.groups));
                    }
                    // fp32 input copy and rsqrt.
                    _ => {
                        c.saved.push(Saved::Own(t * 4 * w));
                        c.saved.push(Saved::Own(t * 4 * n.groups));
                    }
                }
            }
            let normed = match n.kind {
                NormKind::Rms => bytes_of(x),
                NormKind::RmsGemma | NormKind::RmsFp32Weight => 4,
                NormKind::Layer | NormKind::L2 => 0,
            };
            if trains {
                if normed > 0 {
                    c.saved.push(Saved::Own(t * normed * w));
                }
                c.grads.push(n.param_count() * cx.param_bytes());
            }
            if n.kind == NormKind::Rms {
                c.fwd_script = rms_script(t, w, n.groups, bytes_of(x), in_rg, trains);
                c.fwd_script_nosave = rms_script(t, w, n.groups, bytes_of(x), false, false);
                c.bwd_script = rms_bwd_script(t, w, n.groups, bytes_of(x), in_rg, trains);
            }
            (c, trains)
        }
        OpKind::Linear(p) => linear(cx, p, inputs[0], bytes_of(inputs[0]), in_rg),
        OpKind::Router(r) => {
            let (mut c, trains) = linear(cx, &r.proj, inputs[0], bytes_of(inputs[0]), in_rg);
            if in_rg || trains {
                // fp32 softmax over the experts, top-k weights (fp32) and int64 indices.
                c.saved.push(Saved::Own(t * (4 * r.experts + 12 * r.top_k)));
            }
            let (_, _, wrapped) = super::resident::adapted_expert_params(cx.job);
            if wrapped && r.proj.module == crate::arch::Module::Param {
                // ParamWrapper materialises W + ΔW in the weight's dtype; F.linear saves it.
                let rank = cx.job.lora.as_ref().map_or(0, |l| l.rank);
                c.saved
                    .push(Saved::Own(r.proj.in_f * r.proj.out_f * cx.param_bytes()));
                c.saved.push(Saved::Shared(inputs[0]));
                c.grads
                    .push(rank * (r.proj.in_f + r.proj.out_f) * ADAPTER_BYTES);
                return (c, true);
            }
            (c, trains)
        }
        OpKind::Attention(a) => {
            let trains = cx.full && a.sinks;
            if in_rg || trains {
                attention(cx, a, inputs, op_output_of(layer, inputs), &mut c);
            } else {
                c.fwd_transient = attention_fwd_transient(cx, a);
            }
            if trains {
                c.grads.push(a.heads * cx.param_bytes());
            }
            (c, trains)
        }
        OpKind::Glu(act) => {
            let (g, u) = (inputs[0], inputs[1]);
            let a = bytes_of(g);
            let i = match act {
                _ if g == u => width(g) / 2,
                _ => width(g),
            };
            let mut saved = vec![Saved::Shared(g)];
            if u != g {
                saved.push(Saved::Shared(u));
            }
            let own_factor = match act {
                Act::Silu | Act::GeluTanh => 1,
                Act::ClampedSwiglu => 4,
            };
            saved.push(Saved::Own(t * own_factor * a * i));
            let bytes = |s: &Saved| match *s {
                Saved::Own(b) => b,
                Saved::Shared(x) => t * width(x) * bytes_of(x),
            };
            c.ckpt_transient = saved.iter().map(bytes).sum();
            if in_rg {
                c.saved = saved;
                if matches!(act, Act::Silu | Act::GeluTanh) {
                    c.bwd_script = glu_bwd_script(t * a * i, g == u);
                }
            }
            (c, false)
        }
        OpKind::Experts(e) => experts(cx, e, in_rg),
        OpKind::Add => {
            // `AddBackward0` hands its incoming gradient to both inputs.
            c.bwd_script = vec![Bwd::Pass(0), Bwd::Pass(1)];
            (c, false)
        }
        OpKind::Scale => {
            // `x * constant`: one new gradient.
            let mut s = BwdScript::default();
            let k = s.temp(t * width(inputs[0]) * bytes_of(inputs[0]));
            s.done_upstream();
            s.give(k, 0);
            c.bwd_script = s.steps;
            (c, false)
        }
    }
}

/// `act(gate) * up` backward: the product's node (`grad * up` for the activation, `grad * act`
/// for up; then it releases up and the activation output), up's gradient handed on — autograd
/// runs up_proj's backward next (created after the activation, it is the later ready node) —
/// then the activation's (`silu_backward(grad, gate)`). Saved: 0 the gate (1 up when separate),
/// then the activation output. A fused gate_up's two gradients are gathered into one.
fn glu_bwd_script(each: u128, fused: bool) -> Vec<Bwd> {
    let mut s = BwdScript::default();
    let act_saved = if fused { 1 } else { 2 };
    let gs = s.temp(each);
    let gu = s.temp(each);
    s.done_upstream();
    s.release(act_saved);
    if !fused {
        s.release(1);
    }
    s.give(gu, 1);
    if !fused {
        s.defer(1);
    }
    let gg = s.temp(each);
    s.free(gs);
    s.release(0);
    s.give(gg, 0);
    s.steps
}

/// `LlamaRMSNorm.forward` (transformers 5.17 `models/llama/modeling_llama.py`), intermediate by
/// intermediate: `hidden_states.to(float32)` (saved: index 0), `pow(2)`, `.mean(-1)`,
/// `+ eps`, `rsqrt` (saved: 1), `hidden_states * rsqrt`, `.to(input_dtype)` (saved by
/// `weight *` when the weight trains: 2), the output `weight * ...`.
fn rms_script(
    t: u128,
    w: u128,
    groups: u128,
    x_bytes: u128,
    in_rg: bool,
    trains: bool,
) -> Vec<Fwd> {
    let mut s = Script::default();
    let upcast = s.saved_or_temp(in_rg.then_some(0), t * 4 * w);
    let pow = s.temp(t * 4 * w);
    let mean = s.temp(t * 4 * groups);
    s.free(pow);
    let eps = s.temp(t * 4 * groups);
    let rsqrt = s.saved_or_temp(in_rg.then_some(1), t * 4 * groups);
    s.free(eps);
    let prod = s.temp(t * 4 * w);
    if let Some(k) = rsqrt {
        s.free(k);
    }
    if let Some(k) = upcast {
        s.free(k);
    }
    let cast_idx = if in_rg { 2 } else { 0 };
    let cast = s.saved_or_temp(trains.then_some(cast_idx), t * x_bytes * w);
    s.out();
    s.free(prod);
    s.free(mean);
    if let Some(k) = cast {
        s.free(k);
    }
    s.steps
}

/// `LlamaRMSNorm`'s backward (the reverse of [`rms_script`], PyTorch 2.11 `derivatives.yaml`):
/// `weight * c` gives the weight's gradient (`grad * c`, summed over tokens) and c's
/// (`grad * weight`); the cast back to fp32; `x * rsqrt` the input's (`grad * r`) and the
/// rsqrt's (`grad * x` summed per row); `rsqrt` (`-0.5 * grad * r³`); `mean` (`expand / n`);
/// `pow(2)` (`grad * (2 * x.pow(1))`: four fp32 b·s·w tensors alive at once, as traced in
/// tests/reference/fsdp_trace.py), summed into the input's gradient in place; the cast to the
/// input dtype. Saved: 0 the fp32 input, 1 the rsqrt, and the normalized copy (2, or 0 when
/// the input needs no gradient) when the weight trains.
fn rms_bwd_script(
    t: u128,
    w: u128,
    groups: u128,
    x_bytes: u128,
    in_rg: bool,
    trains: bool,
) -> Vec<Bwd> {
    let mut s = BwdScript::default();
    let gw = trains.then(|| s.temp(t * x_bytes * w));
    let gc = in_rg.then(|| s.temp(t * x_bytes * w));
    if let Some(k) = gw {
        s.grad(0);
        s.free(k);
    }
    s.done_upstream();
    if trains {
        s.release(if in_rg { 2 } else { 0 });
    }
    let Some(gc) = gc else {
        return s.steps;
    };
    let (wide, row) = (t * 4 * w, t * 4 * groups);
    let gy = s.temp(wide);
    s.free(gc);
    let ga = s.temp(wide);
    let tmp = s.temp(wide);
    let gr = s.temp(row);
    s.free(tmp);
    s.free(gy);
    let half = s.temp(row);
    let cube = s.temp(row);
    let ge = s.temp(row);
    s.free(cube);
    s.free(half);
    s.free(gr);
    s.release(1);
    let gmean = s.temp(wide);
    s.free(ge);
    let pow1 = s.temp(wide);
    let twice = s.temp(wide);
    s.free(pow1);
    let gpow = s.temp(wide);
    s.free(twice);
    s.free(gmean);
    s.free(gpow);
    s.release(0);
    if x_bytes == 4 {
        s.give(ga, 0);
    } else {
        let gx = s.temp(t * x_bytes * w);
        s.free(ga);
        s.give(gx, 0);
    }
    s.steps
}

/// The op whose inputs are `inputs` (to find the attention output tensor).
fn op_output_of(layer: &LayerRecipe, inputs: &[T]) -> T {
    layer
        .ops
        .iter()
        .find(|o| o.inputs == inputs && matches!(o.kind, OpKind::Attention(_)))
        .map_or(0, |o| o.output)
}

/// `nn.Linear` (and peft's LoRA around it; bitsandbytes' 4-bit matmul). `in_rg`: whether the
/// input needs a gradient.
fn linear(cx: &Ctx, p: &Proj, x: T, x_bytes: u128, in_rg: bool) -> (OpCost, bool) {
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
    // Backward: the input gradient; with LoRA the fp32 gradient of the sum, its 16-bit cast for
    // the base (when the output is not fp32), the scaled copy for lora_B, and lora_A's fp32 input
    // gradient; the dequantized weight again.
    let mut bwd = t * dt.linear_out * p.in_f + dequant;
    if lora.is_some() {
        if a != ADAPTER_BYTES && a == dt.linear_out {
            // FSDP mixed precision (FSDP-HOOK(m)): adapters in the output's dtype, so no
            // promoted sum and no cast: the scaled copy for lora_B and lora_A's input gradient.
            bwd += t * a * (p.out_f + p.in_f);
        } else {
            let cast = if dt.linear_out == a { 0 } else { dt.linear_out };
            bwd += t * ((a + cast + a) * p.out_f + a * p.in_f);
        }
    }
    c.bwd_transient = bwd;
    let shape = LinearShape {
        x_bytes,
        dequant,
        trains,
        in_rg,
        lora: lora.map(|l| (l.rank, l.dropout > 0.0)),
        adapter: a,
    };
    c.fwd_script = linear_script(cx, p, &shape, &c.saved);
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
/// `MatMul4Bit.forward` dequantizes the weight (`dequant` bytes, freed after the matmul;
/// bitsandbytes 0.50.2 `autograd/_functions.py`); autocast's input and weight casts are the
/// saved tensors 0 and 1 (`trains`). With LoRA (peft 0.21 `tuners/lora/layer.py`
/// `Linear.forward`): `result = base_layer(x)`, `x = _cast_input_dtype(x, fp32)` (a local
/// alive until the forward returns), `dropout(x)` (its output saved, its mask saved when the
/// input needs a gradient), `lora_A(...)` (saved: lora_B's input), `lora_B(...)`, `* scaling`,
/// `result + ...` (fp32 by type promotion), `.to(result dtype)`: the op's output.
fn linear_script(cx: &Ctx, p: &Proj, sh: &LinearShape, saved: &[Saved]) -> Vec<Fwd> {
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
    for k in absmax {
        s.free(k);
    }
    let Some((_, dropout)) = sh.lora else {
        if let Some(k) = dq {
            s.free(k);
        }
        // The saved tensors the rule adds after these (none today) at the end.
        while j < saved.len() {
            s.save(j);
            j += 1;
        }
        return s.steps;
    };
    let mut result = s.temp(t * dt.linear_out * p.out_f);
    if let Some(k) = dq {
        s.free(k);
    }
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
    if dropout {
        cast = (sh.x_bytes != sh.adapter).then(|| s.temp(t * sh.adapter * p.in_f));
        s.save(x_saved);
        if sh.in_rg {
            s.save(x_saved + 1);
        } else {
            let mask = s.temp(t * p.in_f);
            s.free(mask);
        }
    } else {
        s.save(x_saved);
    }
    s.save(a_out);
    let b_out = s.temp(t * sh.adapter * p.out_f);
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
        // Each mm's weight gradient comes before its input gradient (`MmBackward0` as traced).
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
            if sh.dequant > 0 && cx.job.double_quant {
                let k = s.temp(4 * (p.in_f * p.out_f).div_ceil(crate::dtype::NF4_BLOCK));
                s.free(k);
            }
            let dq = (sh.dequant > 0).then(|| s.temp(sh.dequant));
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

/// Whether SDPA needs a mask for this layer (and so runs memory-efficient attention): a sliding
/// window no longer than the sequence (transformers `sdpa_mask` skips the mask when
/// `kv_length < local_attention_size` and nothing is padded).
pub fn sdpa_masked(job: &Job, a: &AttnSpec) -> bool {
    a.window.is_some_and(|w| job.seq >= w)
}

fn attention_fwd_transient(cx: &Ctx, a: &AttnSpec) -> u128 {
    match cx.job.attention {
        Attention::Eager => cx.tokens * 2 * cx.dt.compute * a.heads * cx.job.seq,
        _ => 0,
    }
}

fn attention(cx: &Ctx, a: &AttnSpec, inputs: &[T], out: T, c: &mut OpCost) {
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
        c.fwd_script = math_sdpa_script(t, widths, (scores, t * a.heads), seq * seq, cached);
        c.bwd_script = math_sdpa_bwd_script(t, widths, scores);
        c.bwd_transient = t * (12 * a.heads * seq + 12 * q);
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
                let fa2 = cx.job.attention == Attention::Flash;
                c.bwd_script = flash_bwd_script(
                    t,
                    s_b,
                    (q, kv, vkv, vq),
                    a.heads,
                    (
                        a.kv_heads != a.heads,
                        fa2,
                        inputs[0] != inputs[1] && inputs[1] != inputs[2],
                    ),
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
                let separate = inputs[0] != inputs[1] && inputs[1] != inputs[2];
                c.bwd_script = eager_bwd_script(t, s_b, widths, scores, (repeated, separate));
                c.bwd_transient = t * (10 * a.heads * seq + 3 * s_b * q);
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
/// v with GQA, after RoPE (the roped q and k alive until the attention module returns): `q *
/// √scale` (saved 0); the causal mask `ones(L, S).tril()` made additive
/// (`convert_boolean_attn_mask`: `logical_not`, `where`); k and v `repeat_interleave`d to every
/// head (v saved 3); `kᵀ * √scale` (saved 1); the scores, the mask added in place;
/// `_safe_softmax` (`softmax`, `eq(-inf)`, `all`, `where`: its result saved 2); `matmul(·, v)`;
/// transformers' `.transpose(1, 2).contiguous()` (the op's output).
fn math_sdpa_script(
    t: u128,
    (q, kv, vkv, vq): (u128, u128, u128, u128),
    (scores, rows): (u128, u128),
    mask: u128,
    cached: bool,
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
    s.save(0);
    let ones = s.temp(mask);
    let tril = s.temp(mask);
    s.free(ones);
    let not = s.temp(mask);
    let additive = s.temp(4 * mask);
    s.free(not);
    s.free(tril);
    let k_rep = s.temp(t * 4 * q);
    s.save(3);
    s.save(1);
    s.free(k_rep);
    let attn = s.temp(4 * scores);
    let out = s.temp(4 * scores);
    let masked = s.temp(scores);
    let rows = s.temp(rows);
    s.save(2);
    s.free(rows);
    s.free(masked);
    s.free(out);
    s.free(attn);
    let pv = s.temp(t * 4 * vq);
    s.free(additive);
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
        (true, true),
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

/// transformers 5 fused experts under the default `grouped_mm` implementation
/// (`integrations/moe.py` `grouped_mm_experts_forward`): the S = tokens·k routed rows are
/// gathered and sorted by expert into single tensors, so each intermediate is one tensor of S
/// rows whatever the routing. Llama 4 runs every token through every expert (S = tokens·E).
fn experts(cx: &Ctx, e: &Experts, in_rg: bool) -> (OpCost, bool) {
    let mut c = OpCost::default();
    let t = cx.tokens;
    let dt = cx.dt;
    let a = dt.linear_out;
    let pb = cx.param_bytes();
    let trains = cx.full;
    let (h, i) = (e.hidden, e.inter);
    let rows = if e.dense_all {
        t * e.experts
    } else {
        t * e.top_k
    };
    let (gu_mult, down_wrapped, _) = super::resident::adapted_expert_params(cx.job);
    let act_own = match e.act {
        Act::Silu | Act::GeluTanh => 1,
        Act::ClampedSwiglu => 4,
    };
    let weights_bytes = if e.fp32_weights { 4 } else { a };
    // Saved, in the order the backward releases them (from the end): the gate_up output (the
    // activation's input and up's view), the activation's own outputs, the gathered input (for
    // gate_up's weight gradient), W + ΔW of gate_up — released by the gate_up stage; then the
    // down output (saved by the routing-weight multiply; Llama 4: the repeated input), routing
    // weights and int64 indices, the product (for down's weight gradient), W + ΔW of down —
    // released by the down stage, which runs first.
    // ParamWrapper (peft) materialises W + ΔW of each adapted fused parameter in its dtype every
    // forward (`torch.baddbmm`); grouped_mm saves it for backward.
    // Beside W + ΔW, baddbmm saves the LoRA factors cast to the weight's dtype
    // (`get_delta_factors`): r_eff · E · (d1 + d2) elements.
    let rank = cx.job.lora.as_ref().map_or(0, |l| l.rank);
    let gu_factors = gu_mult * rank * e.experts * (2 * i + h);
    let down_factors = if down_wrapped {
        rank * e.experts * (h + i)
    } else {
        0
    };
    let gu_w = if gu_mult > 0 {
        (e.gate_up_params() + gu_factors) * pb
    } else {
        0
    };
    let down_w = if down_wrapped {
        (e.down_params() + down_factors) * pb
    } else {
        0
    };
    let gate_up_stage = [
        rows * 2 * i * a,
        rows * act_own * i * a,
        if trains || gu_mult > 0 {
            rows * h * dt.residual
        } else {
            0
        },
        gu_w,
    ];
    let mut down_stage = vec![
        rows * h * a,
        rows * (8 + weights_bytes),
        if trains || down_wrapped {
            rows * i * a
        } else {
            0
        },
        down_w,
    ];
    // transformers 4.x layout (`--quantize-experts`): one Linear4bit + LoRA per expert, each
    // saving its fp32 input copy (+ dropout mask) and lora_A's output for its routed rows.
    if cx.job.quantize_experts {
        if let Some(l) = cx.job.lora.as_ref().filter(|_| !cx.full) {
            let copy = |w: u128| if l.dropout > 0.0 { 5 * w } else { 4 * w };
            for (kind, w) in [
                (crate::model::LinearKind::Gate, h),
                (crate::model::LinearKind::Up, h),
                (crate::model::LinearKind::Down, i),
            ] {
                if l.targets.contains(&kind) {
                    down_stage.push(rows * (copy(w) + 4 * l.rank));
                    c.grads.push(e.experts * l.rank * (h + i) * ADAPTER_BYTES);
                }
            }
        }
    }
    let saved: Vec<u128> = gate_up_stage
        .iter()
        .chain(&down_stage)
        .copied()
        .filter(|&b| b > 0)
        .collect();
    c.ckpt_transient = saved.iter().sum();
    let wrapped = gu_w + down_w;
    let saves = in_rg || trains || wrapped > 0;
    if saves {
        c.saved = saved.into_iter().map(Saved::Own).collect();
    }
    // Forward: the weighted outputs and their un-permuted gather (fp32 for fp32 routing
    // weights), and with per-expert 4-bit layers one dequantized expert weight.
    let quantized =
        cx.job.quantize_experts && matches!(cx.job.weights, Precision::Nf4 | Precision::Int8);
    let dequant = if quantized { i * h * dt.compute } else { 0 };
    c.fwd_transient = 2 * rows * h * weights_bytes + dequant;
    // Backward, down first: gradients of the down output and the product, and of the
    // materialised W + ΔW of down before it flows to the LoRA factors; then gate_up's: the
    // gradient of its output and of its W + ΔW.
    let down_count = down_stage.iter().filter(|&&b| b > 0).count();
    let gu_count = gate_up_stage.iter().filter(|&&b| b > 0).count();
    let down_t = rows * a * (h + i) + dequant + down_w;
    let gu_t = rows * a * 2 * i + dequant + gu_w;
    c.bwd_transient = down_t.max(gu_t);
    if saves {
        c.bwd_stages = vec![(down_t, down_count), (gu_t, gu_count)];
    }
    if trains {
        c.grads.push(e.gate_up_params() * pb);
        c.grads.push(e.down_params() * pb);
        if e.bias {
            c.grads.push(e.bias_params() * pb);
        }
    }
    let rank = cx.job.lora.as_ref().map_or(0, |l| l.rank);
    if gu_mult > 0 {
        c.grads
            .push(gu_mult * rank * e.experts * (2 * i + h) * ADAPTER_BYTES);
    }
    if down_wrapped {
        c.grads.push(rank * e.experts * (h + i) * ADAPTER_BYTES);
    }
    let adapted = wrapped > 0 || !c.grads.is_empty();
    (c, trains || adapted)
}

/// `n` items split as evenly as possible into `k` parts.
pub fn split(n: u128, k: u128) -> Vec<u128> {
    let k = k.max(1);
    let (q, r) = (n / k, n % k);
    (0..k).map(|j| q + u128::from(j < r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::resolve_model;

    fn job(method: Method) -> Job {
        Job::new(resolve_model("llama-3.2-1b").unwrap().0, method)
    }

    /// Saved bytes per token of one (non-first) layer.
    fn per_token(j: &Job) -> u128 {
        let k = &j.model.recipe.kinds[0];
        inventory(j, k, 2, true).saved() - inventory(j, k, 1, true).saved()
    }

    // Llama-3.2-1B: h = 2048, q = 32·64 = 2048, kv = 8·64 = 512, i = 8192, bf16.

    #[test]
    fn full_bf16_sdpa_layer_by_hand() {
        // 2 norms × (4h fp32 copy + 4 rsqrt + 2h normed) + 2 shared norm outputs 2h
        // + SDPA q,k,v,out 2·(2q + 2kv) + lse 4·32 + MLP 4 × 2i (gate, silu, up, product).
        let norms = 2 * (4 * 2048 + 4 + 2 * 2048) + 2 * 2 * 2048;
        let attn = 2 * (2 * 2048 + 2 * 512) + 4 * 32;
        let mlp = 4 * 2 * 8192;
        assert_eq!(per_token(&job(Method::Full)), norms + attn + mlp);
        // Measured (groundtruth, 1B b4 s2048 minus logits and final norm): 108,688 B.
        let err = (per_token(&job(Method::Full)) as f64 - 108_688.0) / 108_688.0;
        assert!(err.abs() < 0.002, "{err}");
    }

    #[test]
    fn lora_layer_by_hand_with_and_without_dropout() {
        let mut j = job(Method::Lora);
        j.lora.as_mut().unwrap().dropout = 0.0;
        // Frozen norms 2 × (4h + 4); per-module fp32 input copies q,k,v,o,gate,up (6 × 4h) and
        // down (4i); SDPA as above; MLP silu/mul 3 × 2i.
        let by_hand = 2 * (4 * 2048 + 4)
            + 6 * 4 * 2048
            + 4 * 8192
            + 7 * 4 * 16 // lora_B inputs: 7 modules × r = 16 fp32
            + (2 * (2 * 2048 + 2 * 512) + 4 * 32)
            + 3 * 2 * 8192;
        assert_eq!(per_token(&j), by_hand);
        // Dropout keeps fp32 output + bool mask instead of the fp32 copy: +1 B per element.
        j.lora.as_mut().unwrap().dropout = 0.05;
        assert_eq!(per_token(&j), by_hand + 6 * 2048 + 8192);
    }

    #[test]
    fn qlora_saves_what_lora_saves_and_adds_dequantization_transients() {
        let (l, q) = (job(Method::Lora), job(Method::Qlora));
        let k = &l.model.recipe.kinds[0];
        let lora = inventory(&l, k, 512, true);
        let qlora = inventory(&q, k, 512, true);
        assert_eq!(lora.saved(), qlora.saved());
        // Largest 1B Linear: 2048 × 8192 bf16 = 32 MiB dequantized per matmul.
        assert_eq!(qlora.fwd_transient - lora.fwd_transient, 2048 * 8192 * 2);
    }

    #[test]
    fn eager_attention_adds_six_bytes_per_score() {
        let mut j = job(Method::Full);
        j.seq = 1024;
        let sdpa = per_token(&j);
        j.attention = Attention::Eager;
        let eager = per_token(&j);
        // 6 B × 32 heads × 1024 keys per token; k,v repeated to 32 heads (2·2·(2048−512)); no
        // lse. (o_proj saves eager's transposed copy, 2q, where SDPA's saved output served.)
        let expected = 6 * 32 * 1024 + 2 * 2 * (2048 - 512) - 4 * 32;
        assert_eq!(eager - sdpa, expected);
    }

    #[test]
    fn autocast_keeps_per_linear_input_casts_and_fp32_norm_outputs() {
        let mut j = job(Method::Full);
        let bf16 = per_token(&j);
        j.weights = Precision::Fp32;
        // fp32 normed copies (+2h each) and separate bf16 casts for q,k,v (+2 × 2h) and
        // gate,up (+2h): +10h; measured +10.1h on the 1B autocast cases.
        assert_eq!(per_token(&j) - bf16, 10 * 2048);
    }

    #[test]
    fn a_fused_projection_keeps_its_whole_output_alive() {
        // Phi-3-style fused gate_up: SwiGLU saves gate and up as views of one 2i output (the
        // storage stays whole): the same 3 × i as separate gate and up projections.
        let cfg = serde_json::json!({"model_type": "phi3", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4});
        let m = crate::model::HfConfig::from_value(cfg)
            .resolve("phi", std::path::Path::new("t"))
            .unwrap();
        let mut j = Job::new(m, Method::Lora);
        j.lora.as_mut().unwrap().dropout = 0.0;
        let k = &j.model.recipe.kinds[0];
        let glu: Vec<&OpCost> = j.model.recipe.kinds[0]
            .ops
            .iter()
            .zip(&inventory(&j, k, 1, true).ops)
            .filter(|(o, _)| matches!(o.kind, OpKind::Glu(_)))
            .map(|(_, c)| c)
            .collect::<Vec<_>>()
            .into_iter()
            .cloned()
            .collect::<Vec<_>>()
            .leak()
            .iter()
            .collect();
        let inv = inventory(&j, k, 1, true);
        let gu = j.model.recipe.kinds[0]
            .ops
            .iter()
            .position(|o| matches!(&o.kind, OpKind::Linear(p) if p.name == "gate_up_proj"))
            .unwrap();
        let out = j.model.recipe.kinds[0].ops[gu].output;
        assert_eq!(inv.tensor_bytes[out], 2 * 256 * 2);
        assert_eq!(glu[0].saved, vec![Saved::Shared(out), Saved::Own(256 * 2)]);
    }
}
