//! What stays resident through the step: base weights (by storage format), quantization
//! constants, LoRA adapters, and optimizer state.
//!
//! Sources:
//! - Weights: parameter counts from [`crate::model`], bytes per element from
//!   [`crate::dtype::Precision::storage_bytes`] (NF4: QLoRA paper §3; INT8: LLM.int8()).
//! - QLoRA quantizes the decoder's Linear weights only; embeddings, norms, biases and lm_head
//!   stay in the 16-bit load dtype (transformers `get_keys_to_not_convert` skips lm_head;
//!   bitsandbytes replaces `nn.Linear` only). `prepare_model_for_kbit_training` (peft) casts every
//!   non-quantized fp16/bf16 parameter to fp32.
//! - Adapters: A (r×in) and B (out×r) per targeted module; peft keeps them in fp32 when the base
//!   is fp16/bf16 (`autocast_adapter_dtype=True`, the default since peft 0.12).
//! - Optimizer state: torch AdamW keeps `exp_avg` and `exp_avg_sq` in the parameter's dtype;
//!   bitsandbytes 8-bit optimizers keep uint8 states with one fp32 absmax per 256-block for
//!   tensors of at least 4096 elements (`min_8bit_size`) and fp32 states below that; SGD with
//!   momentum keeps one buffer; transformers' Adafactor keeps factored row/column second moments
//!   (fp32) for matrices and a full one for vectors.

use crate::arch::{Module, OpKind, Param, ParamRole, Proj};
use crate::dtype::Precision;
use crate::estimate::Category;
use crate::method::{Job, Method, Optimizer};
use crate::model::LinearKind;

/// Bytes of the resident state, by kind, plus element counts the rest of the model needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resident {
    pub weights: u128,
    pub quant_constants: u128,
    pub adapters: u128,
    /// Adapter elements, including adapters that get no gradient (a vision tower's).
    pub adapter_params: u128,
    /// Trainable parameters (elements).
    pub trainable_params: u128,
    /// Bytes of one copy of the trainable parameters in their own dtype (= gradient bytes).
    pub trainable_bytes: u128,
    /// Optimizer state on the device, in the allocator.
    pub optimizer_state: u128,
    /// Optimizer state in CUDA managed memory (paged optimizers), outside the allocator.
    pub optimizer_paged: u128,
    /// Transient bytes of one optimizer step (foreach AdamW's sqrt buffer, Adafactor's fp32
    /// copies).
    pub optimizer_step_temp: u128,
    /// The resident tensors in the order the model is built: each weight (quantized ones as
    /// packed data and constants), then the adapters.
    pub load_tensors: Vec<(crate::estimate::Category, u128)>,
    /// Optimizer state on the device, tensor by tensor (created at the first step).
    pub state_tensors: Vec<u128>,
    /// The optimizer step's temporaries, tensor by tensor (alive together).
    pub step_temp_tensors: Vec<u128>,
    pub explain: ResidentExplain,
}

/// Formula text for each resident component.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResidentExplain {
    pub weights: String,
    pub quant_constants: String,
    pub adapters: String,
    pub gradients: String,
    pub optimizer: String,
}

/// A trainable tensor: shape (a batch of rows × cols matrices; vectors have one row) and bytes
/// per element.
#[derive(Debug, Clone, Copy)]
struct Tensor {
    numel: u128,
    /// Matrices stacked in the tensor (E for fused experts, else 1).
    batch: u128,
    rows: u128,
    bytes: u128,
}

impl Tensor {
    fn matrix(rows: u128, cols: u128, bytes: u128) -> Tensor {
        Tensor {
            numel: rows * cols,
            batch: 1,
            rows,
            bytes,
        }
    }

    fn cols(&self) -> u128 {
        self.numel / (self.rows * self.batch).max(1)
    }
}

/// Bytes of each float element of the 16/32-bit parameters of a model whose Linear weights
/// are stored in `job.weights`.
pub fn dense_param_bytes(job: &Job) -> u128 {
    match job.weights {
        Precision::Int8 | Precision::Nf4 if job.kbit_prep => 4,
        // bitsandbytes models load the non-quantized parameters in the compute dtype.
        Precision::Int8 | Precision::Nf4 => job.compute.float_bytes(),
        w => w.float_bytes(),
    }
}

/// Bytes per adapter element: fp32 unless the base itself is fp32 (also fp32).
pub const ADAPTER_BYTES: u128 = 4;

/// One adapted weight: LoRA A and B, in how many layers, and whether it gets gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraModule {
    pub name: &'static str,
    pub in_f: u128,
    pub out_f: u128,
    /// Elements of A and B per layer.
    pub a_params: u128,
    pub b_params: u128,
    /// Layers (or modules) holding it.
    pub count: u128,
    /// peft `lora.ParamWrapper` on a fused parameter (refuses dropout).
    pub param_wrapper: bool,
    /// In the graph of a text-only step (a vision tower's adapters are not).
    pub trains: bool,
}

impl LoraModule {
    fn linear(name: &'static str, in_f: u128, out_f: u128, r: u128, count: u128) -> LoraModule {
        LoraModule {
            name,
            in_f,
            out_f,
            a_params: r * in_f,
            b_params: out_f * r,
            count,
            param_wrapper: false,
            trains: true,
        }
    }
}

/// Whether peft puts a `lora.Linear` on a decoder projection: its kind is targeted and it is an
/// `nn.Linear` (or subclass); in model types whose MoE names peft converts, gate/up/down_proj
/// names go to the experts' `target_parameters` instead, so no Linear of those names keeps one.
pub fn adapts_linear(job: &Job, p: &Proj) -> bool {
    let Some(l) = &job.lora else {
        return false;
    };
    if !matches!(job.method, Method::Lora | Method::Qlora) || !l.targets.contains(&p.kind) {
        return false;
    }
    match p.module {
        Module::Param => false,
        Module::Linear | Module::LinearSubclass => {
            !(job.model.recipe.peft_moe_conversion
                && matches!(p.kind, LinearKind::Gate | LinearKind::Up | LinearKind::Down))
        }
    }
}

/// The fused expert parameters (and router weight) peft adapts through `target_parameters`
/// in model types it converts: (gate_up rank multiplier, down, router).
pub fn adapted_expert_params(job: &Job) -> (u128, bool, bool) {
    let Some(l) = &job.lora else {
        return (0, false, false);
    };
    if !job.model.recipe.peft_moe_conversion || job.quantize_experts {
        return (0, false, false);
    }
    let t = |k| l.targets.contains(&k);
    // Both halves named: `rank_pattern[".*\\.gate_up_proj"] = 2r`.
    let gate_up = match (
        t(LinearKind::Gate),
        t(LinearKind::Up),
        t(LinearKind::GateUp),
    ) {
        (true, true, _) => 2,
        (true, false, _) | (false, true, _) | (_, _, true) => 1,
        _ => 0,
    };
    (gate_up, t(LinearKind::Down), t(LinearKind::Router))
}

/// Every adapted weight of the model (peft 0.21 with transformers 5.17: `lora.Linear` on
/// targeted `nn.Linear` modules except the output layer, vision towers included; `ParamWrapper`
/// on fused experts and routers where peft converts MoE names). With `--quantize-experts` the
/// experts are per-expert Linear4bit modules (transformers 4.x layout), each adapted like any
/// Linear.
pub fn lora_modules(job: &Job) -> Vec<LoraModule> {
    let Some(l) = &job.lora else {
        return Vec::new();
    };
    let r = l.rank;
    let recipe = &job.model.recipe;
    let (gate_up_mult, down, router) = adapted_expert_params(job);
    let mut out = Vec::new();
    for (k, n) in recipe.kind_counts().into_iter().enumerate() {
        if n == 0 {
            continue;
        }
        for op in &recipe.kinds[k].ops {
            match &op.kind {
                OpKind::Linear(p) if adapts_linear(job, p) => {
                    out.push(LoraModule::linear(p.name, p.in_f, p.out_f, r, n))
                }
                OpKind::Router(rt) if adapts_linear(job, &rt.proj) => out.push(LoraModule::linear(
                    "router",
                    rt.proj.in_f,
                    rt.proj.out_f,
                    r,
                    n,
                )),
                OpKind::Router(rt) if router && rt.proj.module == Module::Param => {
                    // A 2-D ParamWrapper: A [r, h], B [E, r].
                    let mut m = LoraModule::linear("router", rt.proj.in_f, rt.proj.out_f, r, n);
                    m.param_wrapper = true;
                    out.push(m);
                }
                OpKind::Experts(e) => {
                    let (h, i, ex) = (e.hidden, e.inter, e.experts);
                    if job.quantize_experts {
                        // One Linear per expert and projection (gate, up: h → i; down: i → h).
                        for (kind, name, inf, outf) in [
                            (LinearKind::Gate, "experts.gate_proj", h, i),
                            (LinearKind::Up, "experts.up_proj", h, i),
                            (LinearKind::Down, "experts.down_proj", i, h),
                        ] {
                            if l.targets.contains(&kind) {
                                out.push(LoraModule::linear(name, inf, outf, r, n * ex));
                            }
                        }
                        continue;
                    }
                    // ParamWrapper on a 3-D [E, d1, d2] parameter: A (in → r·E), B (r·E → out):
                    // r_eff · E · (d1 + d2) elements.
                    for (mult, name, d1, d2) in [
                        (gate_up_mult, "experts.gate_up_proj", 2 * i, h),
                        (u128::from(down), "experts.down_proj", h, i),
                    ] {
                        if mult > 0 {
                            let re = mult * r;
                            out.push(LoraModule {
                                name,
                                in_f: d2,
                                out_f: d1,
                                a_params: re * ex * d2,
                                b_params: re * ex * d1,
                                count: n,
                                param_wrapper: true,
                                trains: true,
                            });
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let all_linear = l.targets == crate::method::all_linear();
    for (p, n) in &recipe.vision {
        if let ParamRole::VisionLinear(kind) = p.role {
            // all-linear reaches the vision tower's nn.Linear layers too, and a target list
            // reaches those of the same name; they never run on a text-only batch, so their
            // adapters get no gradient (and no optimizer state).
            if all_linear || kind.is_some_and(|k| l.targets.contains(&k)) {
                let mut m = LoraModule::linear(p.name, p.cols, p.rows, r, *n);
                m.trains = false;
                out.push(m);
            }
        }
    }
    out
}

/// Whether a parameter is stored quantized under `job` (bitsandbytes replaces `nn.Linear`
/// only; fused experts only with `--quantize-experts`, one expert at a time).
pub(super) fn quantized(job: &Job, p: &Param) -> bool {
    if !matches!(job.weights, Precision::Nf4 | Precision::Int8) {
        return false;
    }
    match p.role {
        ParamRole::LinearWeight(_) | ParamRole::VisionLinear(_) => true,
        ParamRole::ParamWeight(k) => {
            job.quantize_experts && k != LinearKind::Router && p.copies > 1
        }
        _ => false,
    }
}

pub fn resident(job: &Job) -> Resident {
    let m = &job.model;
    let counts = m.param_counts();
    let dense_bytes = dense_param_bytes(job);
    let mut r = Resident::default();
    let mut trainable: Vec<Tensor> = Vec::new();
    let params = m.recipe.params();

    // Base weights.
    let (mut q_data, mut q_consts, mut q_params, mut dense_params) = (0, 0, 0, 0);
    for (p, n) in &params {
        if quantized(job, p) {
            let (d, c) = job.weights.storage_bytes(p.rows, p.cols, job.double_quant);
            q_data += d * p.copies * n;
            q_consts += c * p.copies * n;
            q_params += p.numel() * n;
        } else {
            dense_params += p.numel() * n;
        }
    }
    // Module order: the embedding, each layer's parameters, then the final norm, lm_head and a
    // vision tower (what `from_config` / `from_pretrained` allocate one by one).
    let tensors_of = |p: &Param| -> Vec<(Category, u128)> {
        if quantized(job, p) {
            let (d, c) = job.weights.storage_bytes(p.rows, p.cols, job.double_quant);
            (0..p.copies)
                .flat_map(|_| [(Category::Weights, d), (Category::QuantConstants, c)])
                .collect()
        } else {
            vec![(Category::Weights, p.numel() * dense_bytes)]
        }
    };
    r.load_tensors = m.recipe.build_order().iter().flat_map(tensors_of).collect();
    r.weights = q_data + dense_params * dense_bytes;
    r.quant_constants = q_consts;
    r.explain.weights = match job.weights {
        Precision::Nf4 | Precision::Int8 => format!(
            "{q_params} decoder weights in {} = {q_data} B; embeddings, norms, biases{}{} ({dense_params} params) in {}-bit = {} B (bitsandbytes replaces nn.Linear only; transformers skips lm_head){}",
            job.weights,
            if counts.lm_head > 0 { ", lm_head" } else { "" },
            if m.moe.is_some() && !job.quantize_experts { ", fused experts and routers" } else { "" },
            dense_bytes * 8,
            dense_params * dense_bytes,
            if m.moe.is_some() {
                if job.quantize_experts {
                    "; experts quantized one by one (--quantize-experts, as transformers 4.x did)"
                } else {
                    "; transformers 5 holds the experts as fused 3-D nn.Parameters, which bitsandbytes leaves in 16 bit (--quantize-experts quantizes them per expert)"
                }
            } else {
                ""
            }
        ),
        w => format!(
            "{} params × {} B ({w}); counts from the {} recipe (every parameter of its transformers module layout)",
            counts.total,
            w.float_bytes(),
            m.recipe.class
        ),
    };
    r.explain.quant_constants = match job.weights {
        Precision::Nf4 if job.double_quant => format!(
            "NF4 absmax per 64-block as uint8 + fp32 per 256 absmax blocks (double quantization): {q_consts} B ≈ 0.127 bit/param"
        ),
        Precision::Nf4 => format!("NF4 fp32 absmax per 64-block: {q_consts} B = 0.5 bit/param"),
        Precision::Int8 => format!("LLM.int8 fp32 scale per output row: {q_consts} B"),
        _ => "none (float storage)".into(),
    };

    // Trainable parameters.
    match job.method {
        Method::Full => {
            // Per-tensor sizes matter only for 8-bit optimizer blocks and Adafactor; list them.
            // In `model.parameters()` order: AdamW creates its state and foreach temporaries
            // tensor by tensor in that order.
            for p in m.recipe.build_order() {
                // A vision tower is never in a text-only step's graph: no gradient, no state.
                if matches!(p.role, ParamRole::VisionLinear(_) | ParamRole::VisionOther) {
                    continue;
                }
                trainable.push(Tensor {
                    numel: p.numel(),
                    batch: p.copies,
                    rows: p.rows,
                    bytes: dense_bytes,
                });
            }
        }
        Method::Lora | Method::Qlora => {
            let rank = job.lora.as_ref().map_or(0, |l| l.rank);
            let modules = lora_modules(job);
            let all: u128 = modules
                .iter()
                .map(|m| (m.a_params + m.b_params) * m.count)
                .sum();
            // Layer by layer, module by module (lora_A, then lora_B): the order get_peft_model
            // creates them and `model.parameters()` lists them.
            let layers = modules.iter().map(|m| m.count).max().unwrap_or(0);
            for l in 0..layers {
                for m in modules.iter().filter(|m| l < m.count) {
                    r.load_tensors
                        .push((Category::Adapters, m.a_params * ADAPTER_BYTES));
                    r.load_tensors
                        .push((Category::Adapters, m.b_params * ADAPTER_BYTES));
                    if m.trains {
                        trainable.push(Tensor::matrix(
                            rank,
                            m.a_params / rank.max(1),
                            ADAPTER_BYTES,
                        ));
                        trainable.push(Tensor::matrix(
                            m.b_params / rank.max(1),
                            rank,
                            ADAPTER_BYTES,
                        ));
                    }
                }
            }
            r.adapters = all * ADAPTER_BYTES;
            r.adapter_params = all;
            r.explain.adapters = format!(
                "rank {rank} × (in + out) per targeted module × {} layers = {all} params × 4 B (Hu et al. 2021; peft LoraLayer keeps adapters in fp32: autocast_adapter_dtype){}",
                m.layers,
                if m.moe.is_some() && adapted_expert_params(job) != (0, false, false) {
                    "; peft's ParamWrapper adapts the fused experts (rank r per expert, 2r on gate_up_proj when gate and up are both named) and the router"
                } else {
                    ""
                }
            );
        }
        Method::Inference => {}
    }
    r.trainable_params = trainable
        .iter()
        .map(|t| t.numel)
        .sum::<u128>()
        .max(r.adapter_params);
    r.trainable_bytes = trainable.iter().map(|t| t.numel * t.bytes).sum();
    r.explain.gradients = if job.method == Method::Inference {
        "none (no backward pass)".into()
    } else {
        format!(
            "one gradient per trainable parameter in its dtype (torch autograd AccumulateGrad): {} params = {} B, created layer by layer during backward, freed by zero_grad(set_to_none=True)",
            r.trainable_params, r.trainable_bytes
        )
    };
    if job.method != Method::Inference {
        optimizer(job, &trainable, &mut r);
    }
    r
}

fn optimizer(job: &Job, trainable: &[Tensor], r: &mut Resident) {
    let param_bytes: u128 = trainable.iter().map(|t| t.numel * t.bytes).sum();
    // bitsandbytes Optimizer2State: tensors below min_8bit_size (4096) keep fp32 states.
    let eight_bit = || -> u128 {
        trainable
            .iter()
            .map(|t| {
                if t.numel >= 4096 {
                    2 * t.numel + 2 * t.numel.div_ceil(256) * 4
                } else {
                    2 * t.numel * 4
                }
            })
            .sum()
    };
    let (state, paged, temp, text) = match job.optimizer {
        Optimizer::Adamw => (
            2 * param_bytes,
            0,
            param_bytes,
            "torch AdamW (foreach): exp_avg + exp_avg_sq in the parameter dtype = 2 × parameter bytes; step() allocates one more parameter-sized buffer (_foreach_sqrt of exp_avg_sq)",
        ),
        Optimizer::AdamwFused => (
            2 * param_bytes,
            0,
            0,
            "torch AdamW (fused=True): 2 × parameter bytes; the fused kernel needs no temporaries",
        ),
        Optimizer::Adamw8bit => (
            eight_bit(),
            0,
            0,
            "bitsandbytes AdamW8bit: 2 uint8 states + fp32 absmax per 256-block (tensors < 4096 elements keep 2 fp32 states)",
        ),
        Optimizer::PagedAdamw => (
            0,
            trainable.iter().map(|t| 8 * t.numel).sum(),
            0,
            "bitsandbytes PagedAdamW32bit: 2 fp32 states in CUDA managed memory (outside the allocator; on the device unless evicted)",
        ),
        Optimizer::PagedAdamw8bit => (
            0,
            eight_bit(),
            0,
            "bitsandbytes PagedAdamW8bit: 8-bit states in CUDA managed memory (outside the allocator; on the device unless evicted)",
        ),
        Optimizer::Sgd => (0, 0, 0, "SGD without momentum keeps no state"),
        Optimizer::SgdMomentum => (
            param_bytes,
            0,
            0,
            "SGD with momentum: one momentum buffer per parameter, in its dtype",
        ),
        Optimizer::Adafactor => {
            let state = trainable
                .iter()
                .map(|t| {
                    // Matrices: factored row + column second moments; vectors: a full one.
                    if t.rows > 1 && t.cols() > 1 {
                        t.batch * (t.rows + t.cols()) * 4
                    } else {
                        t.numel * 4
                    }
                })
                .sum();
            let largest = trainable.iter().map(|t| t.numel).max().unwrap_or(0);
            (
                state,
                0,
                3 * largest * 4,
                "transformers Adafactor: factored fp32 second moments (row + column) per matrix; step() works on one tensor at a time in fp32 (gradient, update and parameter copies of the largest tensor)",
            )
        }
    };
    r.optimizer_state = state;
    r.optimizer_paged = paged;
    r.optimizer_step_temp = temp;
    // The same, tensor by tensor (what the caching allocator sees): AdamW's `_init_group`
    // creates exp_avg and exp_avg_sq per parameter; foreach's `_foreach_sqrt` one temporary per
    // parameter, all alive at once.
    let each = |t: &Tensor| t.numel * t.bytes;
    r.state_tensors = match job.optimizer {
        Optimizer::Adamw | Optimizer::AdamwFused => {
            trainable.iter().flat_map(|t| [each(t), each(t)]).collect()
        }
        Optimizer::Adamw8bit => trainable
            .iter()
            .flat_map(|t| {
                if t.numel >= 4096 {
                    vec![
                        t.numel,
                        t.numel,
                        t.numel.div_ceil(256) * 4,
                        t.numel.div_ceil(256) * 4,
                    ]
                } else {
                    vec![4 * t.numel, 4 * t.numel]
                }
            })
            .collect(),
        Optimizer::SgdMomentum => trainable.iter().map(each).collect(),
        Optimizer::Adafactor => trainable
            .iter()
            .map(|t| {
                if t.rows > 1 && t.cols() > 1 {
                    t.batch * (t.rows + t.cols()) * 4
                } else {
                    t.numel * 4
                }
            })
            .collect(),
        Optimizer::PagedAdamw | Optimizer::PagedAdamw8bit | Optimizer::Sgd => Vec::new(),
    };
    r.step_temp_tensors = match job.optimizer {
        Optimizer::Adamw => trainable.iter().map(each).collect(),
        _ if temp > 0 => vec![temp],
        _ => Vec::new(),
    };
    r.explain.optimizer = format!(
        "{text}: state {state} B{}, step temporaries {temp} B",
        if paged > 0 {
            format!(", managed {paged} B")
        } else {
            String::new()
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::resolve_model;

    fn job(model: &str, method: Method) -> Job {
        Job::new(resolve_model(model).unwrap().0, method)
    }

    // Llama-3.2-1B by hand: 16 layers × (q 2048² + k,v 2·2048·512 + o 2048² + mlp 3·2048·8192)
    // = 973,078,528 Linear weights; embedding 128,256·2048 = 262,668,288 (tied); norms 33·2048.
    const LIN_1B: u128 = 973_078_528;
    const NONLIN_1B: u128 = 262_668_288 + 33 * 2048;

    #[test]
    fn full_bf16_weights_and_adamw_states() {
        let r = resident(&job("llama-3.2-1b", Method::Full));
        assert_eq!(r.weights, 2 * 1_235_814_400);
        assert_eq!(r.trainable_bytes, 2 * 1_235_814_400);
        assert_eq!(r.optimizer_state, 4 * 1_235_814_400); // measured: 4,943,257,600 bf16
        assert_eq!(r.optimizer_step_temp, 2 * 1_235_814_400);
    }

    #[test]
    fn qlora_storage_matches_measured_bytes() {
        let r = resident(&job("llama-3.2-1b", Method::Qlora));
        // Packed NF4 + 16-bit embeddings/norms + fp32 adapters = measured stored_bytes.
        assert_eq!(r.weights, LIN_1B / 2 + NONLIN_1B * 2);
        assert_eq!(r.weights + r.adapters, 1_057_099_776);
        // 16 layers × (2·16·(2048+2048) + 2·16·(2048+512) + 3·16·(2048+8192)) = 11,272,192.
        assert_eq!(r.trainable_params, 11_272_192);
        assert_eq!(r.quant_constants, 15_564_224); // measured quant_state_bytes
        let mut j = job("llama-3.2-1b", Method::Qlora);
        j.double_quant = false;
        assert_eq!(resident(&j).quant_constants, 60_824_576);
        assert_eq!(
            resident(&job("llama-3.1-8b", Method::Qlora)).quant_constants,
            111_000_448
        );
    }

    #[test]
    fn kbit_prep_casts_unquantized_parameters_to_fp32() {
        let mut j = job("llama-3.2-1b", Method::Qlora);
        j.kbit_prep = true;
        assert_eq!(resident(&j).weights, LIN_1B / 2 + NONLIN_1B * 4);
    }

    #[test]
    fn eight_bit_adamw_blocks_and_small_tensors() {
        let mut j = job("llama-3.2-1b", Method::Full);
        j.optimizer = Optimizer::Adamw8bit;
        let r = resident(&j);
        // 33 norm vectors of 2048 (< 4096 elements) keep two fp32 states; the rest are two
        // uint8 states + two fp32 absmax per 256 elements. Measured: uint8 2,471,493,632 +
        // fp32 39,389,184 − 113 tensors × 2 shared 256-entry qmaps counted per tensor.
        let small = 33 * 2048;
        let big = 1_235_814_400 - small;
        assert_eq!(r.optimizer_state, 2 * big + 2 * (big / 256) * 4 + 8 * small);
        assert_eq!(
            r.optimizer_state,
            2_471_493_632 + 39_389_184 - 113 * 2 * 256 * 4
        );
        assert_eq!(r.optimizer_step_temp, 0);
    }

    #[test]
    fn paged_state_is_outside_the_allocator() {
        let mut j = job("llama-3.2-1b", Method::Qlora);
        j.optimizer = Optimizer::PagedAdamw;
        let r = resident(&j);
        assert_eq!(r.optimizer_state, 0);
        assert_eq!(r.optimizer_paged, 8 * 11_272_192);
    }

    #[test]
    fn sgd_and_adafactor_states() {
        let mut j = job("llama-3.2-1b", Method::Lora);
        j.optimizer = Optimizer::Sgd;
        assert_eq!(resident(&j).optimizer_state, 0);
        j.optimizer = Optimizer::SgdMomentum;
        assert_eq!(resident(&j).optimizer_state, 4 * 11_272_192);
        j.optimizer = Optimizer::Adafactor;
        // LoRA A (16×in) and B (out×16) are matrices: (rows + cols) fp32 each.
        let per_layer: u128 = [
            (2048, 2048),
            (2048, 512),
            (2048, 512),
            (2048, 2048),
            (2048, 8192),
            (2048, 8192),
            (8192, 2048),
        ]
        .iter()
        .map(|&(i, o)| (16 + i) + (o + 16))
        .sum();
        assert_eq!(resident(&j).optimizer_state, 16 * per_layer * 4);
    }

    #[test]
    fn int8_weights_carry_row_scales() {
        let mut j = job("llama-3.2-1b", Method::Lora);
        j.weights = Precision::Int8;
        j.compute = Precision::Bf16;
        let r = resident(&j);
        assert_eq!(r.weights, LIN_1B + NONLIN_1B * 2);
        // One fp32 scale per output row: 16 × (2048 + 512 + 512 + 2048 + 8192 + 8192 + 2048).
        assert_eq!(r.quant_constants, 16 * 23_552 * 4);
    }
}
