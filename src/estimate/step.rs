//! The training step as tensor events: the recipe's layers walked forward (each op's saved
//! tensors and intermediates, `activations::OpCost`), the logits and loss, the backward layer by
//! layer (recompute under checkpointing, each op in reverse releasing what it saved and creating
//! its gradients), the optimizer step and `zero_grad` — on a [`Timeline`] that the caching
//! allocator replays (`super::finish`).

use super::*;

/// Formula text for the step-dependent components.
#[derive(Debug, Default)]
pub(super) struct StepExplain {
    pub(super) activations: String,
    pub(super) logits: String,
    pub(super) temporaries: String,
    pub(super) kv_cache: String,
    /// Host RAM holding offloaded activations (`--activation-offload`).
    pub(super) host_bytes: u128,
}

/// A parameter's place in `model.parameters()` order: section (0 embedding, 1 decoder layers,
/// 2 final norm, 3 lm_head), layer, the layer's own norms after its modules, op, index.
type ParamKey = (u8, usize, u8, usize, usize);

pub(super) fn train_step(
    job: &Job,
    sh: &PerGpu,
    t: &mut Timeline,
    step: u32,
    state: &[u128],
    step_temps: &[u128],
) -> StepExplain {
    // FSDP-HOOK(a): under FSDP mixed precision the step computes on the gathered 16-bit
    // copies: walk the 16-bit job (sharding.rs `walk_job`); resident state stays the job's.
    let walk = sharding::walk_job(job);
    let job: &Job = &walk;
    // FSDP-HOOK(b): FSDP's per-unit buffers (sharding.rs `FsdpWalk`), None otherwise.
    let fsdp = sh.fsdp.as_ref().map(sharding::FsdpWalk::new);
    let m = &job.model;
    let r = &m.recipe;
    let tokens = job.tokens();
    let dt = Dtypes::of(job);
    let lg = logits::logits(&dt, tokens, m.vocab);
    let full = job.method == Method::Full;

    // The layer inventories: one per layer kind, and the first layer's own when its input needs
    // no gradient (a frozen base's embedding output) — an op saves tensors only when one of its
    // inputs needs a gradient or it owns a trained parameter.
    let first_input_grad = !(matches!(job.method, Method::Lora | Method::Qlora)
        && !(job.kbit_prep && job.grad_checkpointing));
    // HOOK(configs, liger kernels): Liger's RMSNorm/SwiGLU save less (liger.rs); identity
    // without --liger-kernels.
    let kinds: Vec<LayerInventory> = r
        .kinds
        .iter()
        .map(|k| liger::apply(job, k, inventory(job, k, tokens, true), tokens))
        .collect();
    let first_kind = r.layer_kind.first().copied().unwrap_or(0);
    let first = liger::apply(
        job,
        &r.kinds[first_kind],
        inventory(job, &r.kinds[first_kind], tokens, first_input_grad),
        tokens,
    );
    let layer_inv = |l: usize| -> &LayerInventory {
        if l == 0 {
            &first
        } else {
            &kinds[r.layer_kind[l]]
        }
    };
    let mut head = head_inventory(job, tokens);
    // HOOK(configs, loss): the loss's buffers come from logits::loss_walk for chunked-nll, liger
    // and cce (`ce` keeps the walk below); those losses run lm_head themselves and save what
    // they need, so lm_head's own saved input goes.
    let fused_loss = job.loss != crate::method::Loss::Ce;
    let lw = logits::loss_walk(
        &dt,
        &logits::LossInput {
            tokens,
            batch: job.batch,
            vocab: m.vocab,
            hidden: m.hidden,
            head_trains: full,
            head_weight_bytes: resident::dense_param_bytes(job),
            supervised_fraction: job.supervised_fraction,
            // The Trainer's bf16/fp16 mixed precision runs the model under autocast.
            autocast: dt.compute < 4,
        },
        job.loss,
    );
    if fused_loss {
        if let Some(op) = head.ops.last_mut() {
            op.saved.clear();
            // The loss computes lm_head's gradients itself: the hidden states' gradient (and
            // the weight's) without the Linear's own backward.
            op.bwd_script.clear();
        }
    }
    // The loss walk frees by size: each free releases the latest live loss tensor of that size.
    let mut loss_live: Vec<Buf> = Vec::new();
    let mut loss_events = |t: &mut Timeline, evs: &[logits::LossEvent]| {
        for e in evs {
            match *e {
                logits::LossEvent::Alloc(b) => loss_live.push(t.tensor(Category::Logits, b)),
                logits::LossEvent::Free(b) => {
                    let mut left = b;
                    while left > 0 {
                        let i = loss_live
                            .iter()
                            .rposition(|x| x.bytes == left)
                            .or_else(|| loss_live.len().checked_sub(1));
                        let Some(i) = i else { break };
                        let x = loss_live.remove(i);
                        left = left.saturating_sub(x.bytes);
                        t.release(x);
                    }
                }
                logits::LossEvent::Spike(b) => t.transient(Category::Logits, b),
            }
        }
    };
    // HOOK(configs, activation offload): what each layer keeps leaves the GPU after its forward
    // and comes back just before its backward; `host` counts what is held in host RAM.
    let offload = job.activation_offload;
    let mut host: u128 = 0;

    // Masks built once per forward: eager attention's 4-D float masks (causal, and sliding when
    // some layer has a window), SDPA's boolean window mask when a window is shorter than the
    // sequence. Checkpointing passes them to every layer's recompute, so they then live through
    // backward.
    let masks = mask_bytes(job);

    // A layer's parameter gradient: kept whole on one GPU; with sharding, reduced to this rank's
    // shard (FSDP: the unit's full gradient exists until its reduce-scatter).
    // FSDP-HOOK(c): FSDP keeps a layer's (or the root's: lm_head, final norm, embedding)
    // unsharded gradients until that unit's post-backward (sharding.rs `FsdpWalk`).
    // Each kept gradient with its place in `model.parameters()` order, which `zero_grad`
    // frees them in (`p.grad = None` parameter by parameter).
    let grads: std::cell::RefCell<Vec<(ParamKey, Buf)>> = std::cell::RefCell::new(Vec::new());
    let grad = |t: &mut Timeline, bytes: u128, root: bool, key: ParamKey| {
        if let Some(f) = &fsdp {
            if root {
                f.root_grad(t, bytes);
            } else {
                f.layer_grad(t, bytes);
            }
            return;
        }
        let spike = sh
            .unsharded_grad_spike
            .then(|| t.tensor(Category::Temporaries, bytes));
        grads
            .borrow_mut()
            .push((key, t.tensor(Category::Gradients, sh.kept_grad(bytes))));
        if let Some(b) = spike {
            t.release(b);
        }
    };

    // ---------------- forward
    t.phase(Phase::Forward);
    let gathered = (sh.gathered > 0).then(|| t.tensor(Category::GatheredParams, sh.gathered));
    if let Some(f) = &fsdp {
        f.forward_start(t); // FSDP-HOOK(d)
    }
    let mask_bufs: Vec<Buf> = masks
        .iter()
        .map(|&b| t.tensor(Category::Temporaries, b))
        .collect();
    let mut layer_saved: Vec<Vec<Vec<Option<Buf>>>> = Vec::with_capacity(m.layers as usize);
    let mut kept_inputs: Vec<Option<Buf>> = Vec::with_capacity(m.layers as usize);
    // The residual stream between layers: the embedding output, then each layer's output is the
    // next one's input.
    let mut stream: Option<Buf> = None;
    // Autocast's cached weight casts of the layers whose forward saves nothing (checkpointing):
    // alive until the autocast region ends with the loss (`torch.clear_autocast_cache`).
    let mut autocast_cache: Vec<Buf> = Vec::new();
    for l in 0..r.layer_kind.len() {
        let inv = layer_inv(l);
        if let Some(f) = &fsdp {
            f.layer_forward_pre(t); // FSDP-HOOK(e)
        }
        if job.grad_checkpointing {
            // Checkpointing keeps the layer input for the recompute and nothing else.
            let input = if offload {
                let b = stream
                    .take()
                    .unwrap_or_else(|| t.tensor(Category::Activations, inv.input));
                host += inv.input;
                kept_inputs.push(None);
                Some(b)
            } else {
                let b = stream
                    .take()
                    .unwrap_or_else(|| t.tensor(Category::Activations, inv.input));
                kept_inputs.push(Some(b));
                Some(b)
            };
            let (_, out) = forward_layer(
                t,
                inv,
                input,
                offload,
                false,
                End::Keep,
                &mut autocast_cache,
            );
            stream = out;
            layer_saved.push(Vec::new());
        } else {
            kept_inputs.push(None);
            // The embedding output (the first layer's input), then each layer's output.
            let input = stream
                .take()
                .unwrap_or_else(|| t.tensor(Category::Activations, inv.input));
            let (saved, out) = forward_layer(
                t,
                inv,
                Some(input),
                true,
                true,
                End::Keep,
                &mut autocast_cache,
            );
            stream = out;
            if offload {
                saved
                    .into_iter()
                    .flatten()
                    .flatten()
                    .for_each(|b| t.release(b));
                host += inv.saved();
                layer_saved.push(Vec::new());
            } else {
                layer_saved.push(saved);
            }
        }
        if let Some(f) = &fsdp {
            f.layer_forward_post(t); // FSDP-HOOK(f)
        }
    }
    let (head_saved, _) = forward_layer(
        t,
        &head,
        stream.take(),
        true,
        true,
        End::Caller,
        &mut autocast_cache,
    );
    if fused_loss {
        loss_events(t, &lw.forward);
    }
    // Logits: lm_head output, the ops transformers applies before the loss (Granite's scaling,
    // Gemma 2's soft-capping: its tanh output is saved), the fp32 upcast and log-softmax.
    let mut raw = t.tensor(Category::Logits, if fused_loss { 0 } else { lg.raw });
    if r.head.scaling && !fused_loss {
        let scaled = t.tensor(Category::Logits, lg.raw);
        t.release(raw);
        raw = scaled;
    }
    let tanh_saved = if r.head.softcap && !fused_loss {
        let divided = t.tensor(Category::Logits, lg.raw);
        t.release(raw);
        let y = t.tensor(Category::Logits, lg.raw);
        t.release(divided);
        raw = t.tensor(Category::Logits, lg.raw);
        Some(y)
    } else {
        None
    };
    let ce = |b: u128| if fused_loss { 0 } else { b };
    let upcast = t.tensor(Category::Logits, ce(lg.upcast));
    let log_softmax = t.tensor(Category::Logits, ce(lg.log_softmax));
    t.release(raw);
    t.release(upcast);
    let mut mask_bufs = mask_bufs;
    if !job.grad_checkpointing {
        for b in mask_bufs.drain(..) {
            t.release(b);
        }
    }

    for b in autocast_cache {
        t.release(b);
    }
    if let Some(f) = &fsdp {
        f.forward_end(t); // FSDP-HOOK(g): the root's post-forward, after the loss
    }

    // ---------------- backward
    t.phase(Phase::Backward);
    if let Some(f) = &fsdp {
        f.backward_start(t); // FSDP-HOOK(h): the root's pre-backward
    }
    let bucket = (sh.bucket > 0).then(|| t.tensor(Category::CommBuckets, sh.bucket));
    // nll_loss and log_softmax backward: two fp32 gradients beside the saved log-softmax.
    if fused_loss {
        loss_events(t, &lw.backward);
    }
    let g1 = t.tensor(Category::Logits, ce(lg.grad_fp32));
    let g2 = t.tensor(Category::Logits, ce(lg.grad_fp32));
    t.release(g1);
    t.release(log_softmax);
    let mut g_raw = t.tensor(Category::Logits, ce(lg.grad_raw));
    t.release(g2);
    if let Some(y) = tanh_saved {
        // `* cap`, `tanh` (needs its output) and `/ cap` backward, one logits-sized gradient each.
        for _ in 0..3 {
            let next = t.tensor(Category::Logits, lg.grad_raw.max(lg.raw));
            t.release(g_raw);
            g_raw = next;
        }
        t.release(y);
    }
    if r.head.scaling {
        let next = t.tensor(Category::Logits, lg.grad_raw.max(lg.raw));
        t.release(g_raw);
        g_raw = next;
    }
    // lm_head and the final norm backward (the input gradient, and the weight gradient when it
    // trains): their input's gradient flows into the decoder, layer by layer.
    let mut flow = backward::backward_layer(
        t,
        &head,
        backward::Saves::Kept(head_saved),
        &mut |t: &mut Timeline, b, (op, j)| {
            // The final norm, then lm_head (its weight: the embedding's when tied).
            let section = if op + 1 == head.ops.len() { 3 } else { 2 };
            grad(t, b, true, (section, 0, 0, op, j))
        },
        Some(g_raw),
    );
    if fused_loss {
        loss_events(t, &lw.after_head);
    }
    for l in (0..r.layer_kind.len()).rev() {
        let inv = layer_inv(l);
        if let Some(f) = &fsdp {
            f.layer_backward_pre(t, l == 0); // FSDP-HOOK(i)
        }
        // Offloaded: the checkpointed input (or the saved tensors) come back for this layer.
        let back =
            (offload && job.grad_checkpointing).then(|| t.tensor(Category::Activations, inv.input));
        // The recompute (or the saved tensors brought back), from the kept input, at the
        // backward's first unpack.
        let mut recompute = |t: &mut Timeline| {
            forward_layer(t, inv, None, false, true, End::Recompute, &mut Vec::new()).0
        };
        let saved = if job.grad_checkpointing || offload {
            backward::Saves::Recompute(&mut recompute)
        } else {
            backward::Saves::Kept(std::mem::take(&mut layer_saved[l]))
        };
        flow = backward::backward_layer(
            t,
            inv,
            saved,
            &mut |t: &mut Timeline, b, (op, j)| {
                grad(t, b, false, (1, l, u8::from(inv.layer_norm[op]), op, j))
            },
            flow,
        );
        if let Some(b) = kept_inputs[l].take().or(back) {
            t.release(b);
        }
        if let Some(f) = &fsdp {
            f.layer_backward_post(t); // FSDP-HOOK(j)
        }
    }
    if full {
        let emb = m.param_counts().embedding * resident::dense_param_bytes(job);
        if m.tie_embeddings {
            // The embedding's dense gradient, then its out-of-place sum with lm_head's gradient,
            // which replaces it (measured: +2 × V·h on the 1B and 3B tied models).
            let dense = t.tensor(Category::Temporaries, emb);
            // lm_head's kept gradient (section 3), when whole on this GPU.
            let head_grad = grads
                .borrow()
                .iter()
                .position(|(k, g)| k.0 == 3 && g.bytes == emb);
            match head_grad {
                Some(i) => {
                    // The tied weight is the embedding: first in parameter order.
                    let sum = ((0, 0, 0, 0, 0), t.tensor(Category::Gradients, emb));
                    let old = std::mem::replace(&mut grads.borrow_mut()[i], sum);
                    t.release(old.1);
                }
                None => t.transient(Category::Temporaries, emb),
            }
            t.release(dense);
        } else {
            grad(t, emb, true, (0, 0, 0, 0, 0));
        }
    }
    if let Some(b) = flow {
        t.release(b);
    }
    for b in mask_bufs {
        t.release(b);
    }
    if let Some(b) = bucket {
        t.release(b);
    }
    if let Some(b) = gathered {
        t.release(b);
    }
    if let Some(f) = &fsdp {
        f.backward_end(t); // FSDP-HOOK(k): the root's post-backward in the final callback
    }

    // ---------------- optimizer
    t.phase(Phase::Optimizer);
    if step == 1 {
        // `_init_group`: the state is created at the first step and kept.
        for &b in state {
            let _ = t.tensor(Category::OptimizerState, b);
        }
    }
    let temps: Vec<Buf> = step_temps
        .iter()
        .map(|&b| t.tensor(Category::Temporaries, b))
        .collect();
    // The foreach result is a Python list: CPython frees its items last to first.
    for b in temps.into_iter().rev() {
        t.release(b);
    }
    // zero_grad(set_to_none=True)
    let mut grads = grads.into_inner();
    grads.sort_by_key(|g| g.0);
    for (_, g) in grads {
        t.release(g);
    }
    if let Some(f) = &fsdp {
        f.zero_grad(t); // FSDP-HOOK(l)
    }

    let head_bytes = head.saved();
    // HOOK(configs): what the loss, offload and Liger switches changed.
    let activations = format!(
        "{}{}{}",
        explain_activations(job, &kinds, &first, head_bytes),
        if offload {
            format!("; offloaded to host RAM after each layer's forward and brought back for its backward: {host} B on the host (TRL activation_offloading / axolotl offloaded checkpointing; their in-flight copies, e.g. TRL's max_fwd_stash_size 5 tensors, are not counted: expect up to a few layers' worth more)")
        } else {
            String::new()
        },
        if job.liger_kernels {
            "; Liger RMSNorm saves its input and fp32 rstd, Liger SwiGLU its two inputs (Liger-Kernel 0.8.2; Triton, derived from source)"
        } else {
            ""
        }
    );
    let ce_explain = format!(
            "{tokens} tokens × vocab {} = {} logits: {}-bit logits + fp32 upcast + fp32 log-softmax (saved) in the forward; 2 fp32 gradients beside the saved log-softmax in the backward (transformers ForCausalLMLoss; 12 B/logit at the backward spike){}",
            m.vocab,
            tokens * m.vocab,
            dt.logits * 8,
            match (r.head.softcap, r.head.scaling) {
                (true, _) => "; final-logit soft-capping (/ cap, tanh, × cap) adds a saved 16-bit tanh output and one logits-sized copy per op",
                (_, true) => "; logits scaling (/ logits_scaling) adds one logits-sized copy",
                _ => "",
            }
        );
    StepExplain {
        activations,
        logits: if fused_loss {
            format!(
                "{}{}",
                lw.explain,
                if r.head.softcap || r.head.scaling {
                    "; the model's logit soft-capping / scaling runs inside the loss's chunks (not modelled separately)"
                } else {
                    ""
                }
            )
        } else {
            ce_explain
        },
        temporaries: format!(
            "per-layer forward transients up to {} B (dequantized weights, fp32 LoRA sums, eager scores), backward gradient buffers of each module, the residual-stream gradients{}; optimizer step {} B",
            kinds.iter().map(|k| k.fwd_transient).max().unwrap_or(0),
            if masks.is_empty() { String::new() } else { format!("; attention masks {:?} B", masks) },
            sh.optimizer_step_temp
        ),
        kv_cache: String::new(),
        host_bytes: host,
    }
}

/// Runs a layer's forward op by op, as autograd does: each op's script (its temporaries,
/// freed where the op frees them; its saved tensors, allocated where they are created) or, for
/// an op without one, its one forward transient; each op's output, alive until its last
/// consumer has run, or until backward when an op saves it (`save`: autograd records; false
/// under checkpointing, where nothing is kept). In op order, so the caching allocator sees each
/// op's temporaries freed before later tensors are carved out of them.
///
/// `input`: the layer input's buffer (the previous layer's output), freed after its last
/// consumer when `free_input`; `None`: not tracked (a saved input is then allocated where it
/// is saved). Returns the tensors saved per op and the layer's output (the last op's), which
/// `end` says what becomes of.
pub(super) fn forward_layer(
    t: &mut Timeline,
    inv: &LayerInventory,
    input: Option<Buf>,
    free_input: bool,
    save: bool,
    end: End,
    autocast_cache: &mut Vec<Buf>,
) -> (Vec<Vec<Option<Buf>>>, Option<Buf>) {
    let n = inv.tensor_bytes.len();
    let n_ops = inv.ops.len();
    let keep_output = end == End::Keep;
    let stop = (end == End::Recompute)
        .then(|| recompute_stop(inv))
        .flatten();
    // The last op reading each tensor; whether some op saves it (first saver holds it).
    let mut last_use: Vec<Option<usize>> = vec![None; n];
    for (i, ins) in inv.inputs.iter().enumerate() {
        for &x in ins {
            last_use[x] = Some(i);
        }
    }
    // A module's argument lives until the module returns: after its last reader, it goes
    // after the op `goes_after` names (the module's own locals first, produced last first,
    // then its argument).
    let mut goes_after: Vec<Vec<usize>> = vec![Vec::new(); n_ops];
    for (x, until) in inv.held_until.iter().enumerate() {
        if let Some(u) = until.filter(|&u| u < n_ops) {
            last_use[x] = last_use[x].max(Some(u));
            goes_after[u].push(x);
        }
    }
    for list in &mut goes_after {
        list.sort_unstable_by(|a, b| b.cmp(a));
    }
    let mut will_save = vec![false; n];
    if save {
        for op in &inv.ops {
            for s in &op.saved {
                if let Saved::Shared(x) = *s {
                    will_save[x] = true;
                }
            }
        }
    }
    let mut bufs: Vec<Option<Buf>> = vec![None; n];
    bufs[0] = input;
    let mut seen = vec![false; n];
    let mut layer_out = None;
    let mut per_op = Vec::with_capacity(n_ops);
    // Tensors the layer's module code keeps until its forward returns (`held_by_layer`), and
    // until a module returns (`held_by_module`: the op after which they go).
    let mut held: Vec<Buf> = Vec::new();
    let mut held_module: Vec<(usize, Buf)> = Vec::new();
    for (i, op) in inv.ops.iter().enumerate() {
        // A recompute that stopped runs nothing after its last saved tensor.
        if stop.is_some_and(|(si, _)| i > si) {
            per_op.push(vec![None; op.saved.len()]);
            continue;
        }
        // At the stop: the op's script up to its last save, and no output.
        let steps = match stop {
            Some((si, steps)) if si == i => steps,
            _ => usize::MAX,
        };
        let o = inv.outputs.get(i).copied().filter(|_| steps == usize::MAX);
        let is_last = i + 1 == n_ops;
        let alloc_out = |t: &mut Timeline, bufs: &mut Vec<Option<Buf>>, seen: &[bool]| {
            if let Some(o) = o {
                // An output its own op saved is held by that op (`seen`) and not allocated twice.
                if bufs[o].is_none() && !seen[o] && (!is_last || keep_output) {
                    let cat = if will_save[o] || is_last {
                        Category::Activations
                    } else {
                        Category::Temporaries
                    };
                    bufs[o] = Some(t.tensor(cat, inv.tensor_bytes[o]));
                }
            }
        };
        let save_one =
            |t: &mut Timeline,
             bufs: &mut Vec<Option<Buf>>,
             seen: &mut Vec<bool>,
             s: Saved|
             -> Option<Buf> {
                match s {
                    Saved::Own(b) => Some(t.tensor(
                        if save {
                            Category::Activations
                        } else {
                            Category::Temporaries
                        },
                        b,
                    )),
                    Saved::Shared(x) if save && !seen[x] => {
                        seen[x] = true;
                        Some(bufs[x].take().unwrap_or_else(|| {
                            t.tensor(Category::Activations, inv.tensor_bytes[x])
                        }))
                    }
                    Saved::Shared(_) => None,
                }
            };
        // A script that does not save each saved tensor exactly once (a rule changed the saved
        // list after it, e.g. Liger's) falls back to the op's one transient.
        let scripted = !op.fwd_script.is_empty() && saves_each_once(&op.fwd_script, op.saved.len());
        let mut out: Vec<Option<Buf>> = vec![None; op.saved.len()];
        let mut temps: Vec<Option<Buf>> = Vec::new();
        // Nothing kept for backward: the op's own no-save script where it has one (a rule that
        // rewrote the saved list, e.g. Liger's, dropped the scripts with it).
        let script = if !save && scripted && !op.fwd_script_nosave.is_empty() {
            &op.fwd_script_nosave
        } else {
            &op.fwd_script
        };
        if scripted {
            for e in script.iter().take(steps) {
                match *e {
                    Fwd::Temp(b) => temps.push(Some(t.tensor(Category::Temporaries, b))),
                    Fwd::Free(k) => {
                        if let Some(b) = temps.get_mut(k).and_then(Option::take) {
                            t.release(b);
                        }
                    }
                    // Not saving, the op's own output still comes into being where the op
                    // would save it (flash attention's output before its log-sum-exp).
                    Fwd::Save(j)
                        if !save && matches!(op.saved[j], Saved::Shared(x) if Some(x) == o) =>
                    {
                        alloc_out(t, &mut bufs, &seen)
                    }
                    Fwd::Save(j) => out[j] = save_one(t, &mut bufs, &mut seen, op.saved[j]),
                    Fwd::Out => alloc_out(t, &mut bufs, &seen),
                    Fwd::Pack => {}
                    Fwd::DropInput(n) => {
                        let x = inv.inputs[i].get(n).copied();
                        if let Some(x) =
                            x.filter(|&x| last_use[x] == Some(i) && (x != 0 || free_input))
                        {
                            if let Some(b) = bufs[x].take() {
                                t.release(b);
                            }
                        }
                    }
                }
            }
        } else if steps > 0 || !op.saved.is_empty() {
            temps.push(Some(t.tensor(Category::Temporaries, op.fwd_transient)));
            for (j, &s) in op.saved.iter().enumerate() {
                out[j] = save_one(t, &mut bufs, &mut seen, s);
            }
        }
        alloc_out(t, &mut bufs, &seen);
        for b in temps.into_iter().flatten() {
            t.release(b);
        }
        // Not saving: what the op "saved" was only its own intermediate (autocast's weight
        // cast stays in its cache).
        if !save {
            if let Some(b) = op
                .autocast_cast
                .and_then(|j| out.get_mut(j))
                .and_then(Option::take)
            {
                autocast_cache.push(b);
            }
            if let Some(b) = op
                .held_by_layer
                .and_then(|j| out.get_mut(j))
                .and_then(Option::take)
            {
                held.push(b);
            }
            let until = inv.module_end[i].unwrap_or(i);
            for &j in &op.held_by_module {
                if let Some(b) = out.get_mut(j).and_then(Option::take) {
                    held_module.push((until, b));
                }
            }
            for b in out.drain(..).flatten() {
                t.release(b);
            }
        }
        per_op.push(out);
        // Inputs whose last consumer this was (the layer input only when the caller lets go).
        let mut dead: Vec<crate::arch::T> = inv.inputs[i]
            .iter()
            .copied()
            .filter(|&x| last_use[x] == Some(i) && (x != 0 || free_input))
            .collect();
        dead.sort_unstable();
        dead.dedup();
        if let Some(o) = o {
            if last_use[o].is_none() && !is_last {
                dead.push(o);
            }
        }
        for x in dead {
            if let Some(b) = bufs[x].take() {
                t.release(b);
            }
        }
        // The module returns after this op: its locals and its argument go.
        while let Some(k) = held_module.iter().position(|(u, _)| *u == i) {
            t.release(held_module.remove(k).1);
        }
        for &x in &goes_after[i] {
            if x != 0 || free_input {
                if let Some(b) = bufs[x].take() {
                    t.release(b);
                }
            }
        }
        if is_last {
            layer_out = o.and_then(|o| bufs[o].take());
        }
    }
    for b in held
        .into_iter()
        .chain(held_module.into_iter().map(|(_, b)| b))
    {
        t.release(b);
    }
    // Tensors nobody consumed inside the layer (none in a well-formed recipe) go now, except
    // the caller's input.
    for (x, b) in bufs.into_iter().enumerate() {
        if let Some(b) = b {
            if x != 0 || free_input {
                t.release(b);
            }
        }
    }
    (per_op, layer_out)
}

/// What [`forward_layer`] does with the layer's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// Allocated and returned (the next layer's input).
    Keep,
    /// Not allocated: the caller walks it (lm_head's logits).
    Caller,
    /// A checkpointed layer's recompute in backward: PyTorch 2.11's non-reentrant checkpoint
    /// (transformers 5.17 passes `use_reentrant=False`) stops recomputing once the last tensor
    /// the first forward saved has been saved again (`torch/utils/checkpoint.py`:
    /// `_checkpoint_early_stop` defaults to true; the pack hook raises
    /// `_StopRecomputationError`), so the ops after it never run and neither does the rest of
    /// that op: a Linear saves its weight or input before its matmul, so the last Linear's
    /// output is never recomputed.
    Recompute,
}

/// Where a recompute stops: the op of the layer's last saved tensor, and how many steps of its
/// script run (up to that save or [`Fwd::Pack`]; 0 for an unscripted op, whose transient and
/// saved tensors then run). `None` when nothing in the layer saves.
fn recompute_stop(inv: &LayerInventory) -> Option<(usize, usize)> {
    inv.ops.iter().enumerate().rev().find_map(|(i, op)| {
        let last_save = op
            .fwd_script
            .iter()
            .rposition(|e| matches!(e, Fwd::Save(_) | Fwd::Pack))
            .filter(|_| saves_each_once(&op.fwd_script, op.saved.len()));
        match last_save {
            Some(k) => Some((i, k + 1)),
            // Unscripted: its one transient and its saved tensors run, then the stop.
            None => (!op.saved.is_empty()).then_some((i, 0)),
        }
    })
}

/// Whether `script` allocates each of `n` saved tensors exactly once.
fn saves_each_once(script: &[Fwd], n: usize) -> bool {
    let mut seen = vec![false; n];
    for e in script {
        if let Fwd::Save(j) = *e {
            match seen.get_mut(j) {
                Some(s) if !*s => *s = true,
                _ => return false,
            }
        }
    }
    seen.iter().all(|&s| s)
}

/// The final norm and lm_head as a one-block layer under the same op rules (lm_head is never a
/// LoRA target and never quantized: transformers skips it). Its backward has no residual
/// gradients of its own.
pub(super) fn head_inventory(job: &Job, tokens: u128) -> LayerInventory {
    use crate::arch::{LayerBuilder, Module, Proj};
    let m = &job.model;
    let mut b = LayerBuilder::new(m.hidden);
    let x = b.input();
    let n = b.norm(x, m.recipe.final_norm);
    b.linear(
        n,
        Proj {
            name: "lm_head",
            kind: crate::model::LinearKind::Router,
            in_f: m.hidden,
            out_f: m.vocab,
            bias: false,
            module: Module::Param,
        },
    );
    let mut inv = inventory(job, &b.build("head"), tokens, true);
    // lm_head never dequantizes or adds a LoRA sum: no one-buffer forward transient. Its weight
    // gradient is V·h (tied: the embedding's, summed at the end).
    for op in &mut inv.ops {
        op.fwd_transient = 0;
    }
    inv
}

/// Attention masks built once per forward (bytes each).
pub(crate) fn mask_bytes(job: &Job) -> Vec<u128> {
    use crate::arch::OpKind;
    let r = &job.model.recipe;
    let (mut causal, mut window) = (false, false);
    for (k, n) in r.kind_counts().into_iter().enumerate() {
        if n == 0 {
            continue;
        }
        for op in &r.kinds[k].ops {
            if let OpKind::Attention(a) = &op.kind {
                match job.attention {
                    crate::method::Attention::Eager => {
                        if a.window.is_some() {
                            window = true;
                        } else {
                            causal = true;
                        }
                    }
                    _ => window |= activations::sdpa_masked(job, a),
                }
            }
        }
    }
    let bs2 = job.batch * job.seq * job.seq;
    let c = job.compute.float_bytes();
    let mut out = Vec::new();
    match job.attention {
        crate::method::Attention::Eager => {
            if causal {
                out.push(bs2 * c);
            }
            if window {
                out.push(bs2 * c);
            }
        }
        _ => {
            if window {
                out.push(bs2);
            }
        }
    }
    out
}

pub(super) fn explain_activations(
    job: &Job,
    kinds: &[LayerInventory],
    first: &LayerInventory,
    head_saved: u128,
) -> String {
    let r = &job.model.recipe;
    let counts = r.kind_counts();
    let tokens = job.tokens().max(1);
    let per_kind: Vec<String> = r
        .kinds
        .iter()
        .zip(kinds)
        .zip(&counts)
        .filter(|(_, n)| **n > 0)
        .map(|((k, inv), n)| format!("{n} × {} layer {} B/token", k.name, inv.saved() / tokens))
        .collect();
    let base = format!(
        "tensors autograd saves for backward, op by op over the {} recipe (PyTorch derivatives of its transformers modules, peft LoRA, {} attention): {} × {} tokens; first layer {} B (frozen input saves less){} + final norm/lm_head {} B",
        r.class,
        job.attention,
        per_kind.join(", "),
        job.tokens(),
        first.saved(),
        match job.attention {
            crate::method::Attention::Eager => " (eager: incl. the scores of every head, 6 B each)",
            _ => "",
        },
        head_saved
    );
    let base = if r.notes.is_empty() {
        base
    } else {
        format!("{base}; {}", r.notes.join("; "))
    };
    if job.grad_checkpointing {
        format!(
            "{base}; with checkpointing only each layer's input ({} B) is kept and one layer is recomputed at a time in backward",
            first.input
        )
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::activations::inventory;
    use crate::estimate::timeline::Event;
    use crate::model::resolve_model;

    /// Bytes a layer's forward allocates in all (every `Alloc`, freed or not).
    fn allocated(job: &Job, end: End) -> u128 {
        let k = &job.model.recipe.kinds[0];
        let inv = inventory(job, k, 2048, true);
        let mut t = Timeline::new();
        let _ = forward_layer(&mut t, &inv, None, false, true, end, &mut Vec::new());
        t.events()
            .iter()
            .map(|e| match e {
                Event::Alloc { bytes, .. } => *bytes,
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn a_recompute_stops_before_the_last_linear_runs() {
        // Full fine-tuning, Llama-3.2-1B (h = 2048, bf16): down_proj saves its input before its
        // matmul, the last save of the layer, so its 2048 × 2048 × 2 B output never exists.
        let job = Job::new(resolve_model("llama-3.2-1b").unwrap().0, Method::Full);
        let whole = allocated(&job, End::Caller);
        assert_eq!(whole - allocated(&job, End::Recompute), 2048 * 2048 * 2);
    }

    #[test]
    fn a_lora_recompute_stops_once_lora_b_has_saved_its_input() {
        let job = Job::new(resolve_model("llama-3.2-1b").unwrap().0, Method::Lora);
        let k = &job.model.recipe.kinds[0];
        let inv = inventory(&job, k, 2048, true);
        let (op, steps) = recompute_stop(&inv).unwrap();
        // down_proj, the last op that saves: its script up to lora_B's saved input (lora_A's
        // output, saved tensor 0 of a frozen base); `* scaling` saves no tensor (a Python float).
        let script = &inv.ops[op].fwd_script;
        assert_eq!(script[steps - 1], Fwd::Save(0));
        assert!(!script[steps..].iter().any(|e| matches!(e, Fwd::Save(_))));
        assert!(inv.ops[op + 1..].iter().all(|o| o.saved.is_empty()));
    }
}
