//! FSDP2 as it runs (`torch/distributed/fsdp/_fully_shard/`, torch 2.11): its units, the
//! step walk's all-gather, reshard and reduce-scatter buffers (`FsdpWalk`), and the job a
//! mixed-precision policy walks.

use super::*;

/// What FSDP gathers and reduces, unit by unit: the root (embedding, final norm, lm_head) and
/// one decoder layer (all layers have the same shape), in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct FsdpUnits {
    /// 1 (`FullyShardedDataParallel`, flat parameters) or 2 (`fully_shard`, per-parameter).
    pub version: u8,
    /// The root unit's unsharded parameters, in the gathered dtype (`param_dtype`).
    pub root: u128,
    /// One decoder layer's unsharded parameters (incl. LoRA adapters), in the gathered dtype.
    pub layer: u128,
    /// Decoder layers (units besides the root).
    pub layers: u128,
    /// `reshard_after_forward` (FSDP2) / not `SHARD_GRAD_OP` (FSDP1).
    pub reshard_after_forward: bool,
    /// The root unit is resharded after forward too (FSDP2 when `reshard_after_forward=True`
    /// is passed to the root's `fully_shard`; torch's default `None` keeps it).
    pub root_reshard_after_forward: bool,
    /// Bytes of an unsharded gradient element (the gathered dtype) and of a reduce-scatter
    /// element (`reduce_dtype`, default the gathered dtype), and of the kept sharded gradient
    /// (the stored parameter dtype).
    pub grad_elem: u128,
    pub reduce_elem: u128,
    pub shard_elem: u128,
    /// Ranks the gradients are reduce-scattered over.
    pub shards: u128,
    /// Sharded gradients stay on the GPU (not with `CPUOffloadPolicy`).
    pub grads_on_gpu: bool,
}

impl FsdpUnits {
    /// The most gathered parameters alive at once: the root plus two layers' worth (FSDP2: a
    /// layer's copy and its held all-gather buffer in forward, or the prefetched next layer in
    /// backward; FSDP1: the current and the prefetched unit); without resharding after forward
    /// every layer stays gathered until its backward.
    pub fn largest_gathered(&self) -> u128 {
        let layers = if self.reshard_after_forward {
            2
        } else {
            self.layers + u128::from(self.version == 2 && self.shards > 1)
        };
        self.root + layers * self.layer
    }
}

/// FSDP's buffers as the step runs, from torch 2.11's FSDP2 code
/// (`torch/distributed/fsdp/_fully_shard/`; FSDP1 where it differs,
/// `torch/distributed/fsdp/_runtime_utils.py`):
///
/// - all-gather (`_fsdp_collectives.py` `foreach_all_gather`): one flat output buffer of the
///   unit's unsharded size; `foreach_all_gather_copy_out` then copies it into each parameter's
///   own unsharded storage (`_fsdp_param.py` `alloc_storage`). In forward the buffer is kept
///   until the next unit's all-gather (`_fsdp_param_group.py` `wait_for_unshard`:
///   `comm_ctx.all_gather_state`), so a layer's forward has two copies of it alive; in backward
///   it is freed right after the copy-out. FSDP1 gathers straight into the flat parameter.
/// - root: never resharded after forward (`_fsdp_state.py` `_lazy_init`); its pre-backward
///   prefetches the last layer (`_backward_prefetch`), so root + one layer buffer are alive at
///   the end of forward and the start of backward.
/// - backward: each layer's pre-backward copies its parameters out and prefetches the previous
///   layer's all-gather: two layers' worth alive during a layer's backward (one for layer 0).
/// - post-backward (`post_backward`, `foreach_reduce`): reshard, drop the previous unit's
///   reduce-scatter input (`comm_ctx.reduce_scatter_state`), allocate this unit's
///   reduce-scatter input in `reduce_dtype`, copy the unsharded gradients in and free them, then
///   the reduce-scatter output (1/N), cast to the parameter dtype when it differs. The input is
///   held until the next unit's reduce. FSDP1 frees its reduce input at once.
/// - root gradients: the root's post-backward runs only in the final callback
///   (`_root_post_backward_final_callback`: its forward input, the token ids, needs no
///   gradient), so lm_head's (and the embedding's) full gradient lives through the whole
///   backward and is reduce-scattered last.
#[derive(Debug)]
pub struct FsdpWalk {
    u: FsdpUnits,
    /// The root's unsharded parameters.
    root: Cell<Option<Buf>>,
    /// The all-gather buffer held from forward (`all_gather_state`) or a prefetched gather.
    pending_gather: Cell<Option<Buf>>,
    /// The previous unit's reduce-scatter input (`reduce_scatter_state`).
    pending_reduce: Cell<Option<Buf>>,
    /// Unsharded parameters of the layers gathered now (one, or all without resharding).
    layers: RefCell<Vec<Buf>>,
    /// The current layer's unsharded gradients, and the root's.
    layer_grads: RefCell<Vec<Buf>>,
    root_grads: RefCell<Vec<Buf>>,
    /// Sharded gradients kept for the optimizer step.
    kept: RefCell<Vec<Buf>>,
}

use std::cell::{Cell, RefCell};

use crate::estimate::timeline::{Buf, Category, Timeline};

impl FsdpWalk {
    pub fn new(u: &FsdpUnits) -> FsdpWalk {
        FsdpWalk {
            u: u.clone(),
            root: Cell::new(None),
            pending_gather: Cell::new(None),
            pending_reduce: Cell::new(None),
            layers: RefCell::new(Vec::new()),
            layer_grads: RefCell::new(Vec::new()),
            root_grads: RefCell::new(Vec::new()),
            kept: RefCell::new(Vec::new()),
        }
    }

    fn release(t: &mut Timeline, b: Option<Buf>) {
        if let Some(b) = b {
            t.release(b);
        }
    }

    /// `unshard()` + `wait_for_unshard()` in forward: the new all-gather buffer, then the one
    /// held from the previous unit is freed, then the copy-out into the parameters; the new
    /// buffer is held (`all_gather_state`). At N = 1 there is no buffer (the copy-out is made
    /// from the shard directly). FSDP1 gathers into the flat parameter: one copy.
    fn unshard_forward(&self, t: &mut Timeline, bytes: u128) -> Buf {
        if self.u.version == 2 && self.u.shards > 1 {
            let buffer = t.tensor(Category::GatheredParams, bytes);
            Self::release(t, self.pending_gather.replace(Some(buffer)));
        }
        t.tensor(Category::GatheredParams, bytes)
    }

    /// Root pre-forward: the root's parameters (kept to the end of backward unless resharded).
    pub fn forward_start(&self, t: &mut Timeline) {
        let r = self.unshard_forward(t, self.u.root);
        self.root.set(Some(r));
    }

    /// A decoder layer's pre-forward.
    pub fn layer_forward_pre(&self, t: &mut Timeline) {
        let l = self.unshard_forward(t, self.u.layer);
        self.layers.borrow_mut().push(l);
    }

    /// A decoder layer's post-forward: reshard (or keep it, reshard_after_forward = false).
    pub fn layer_forward_post(&self, t: &mut Timeline) {
        if self.u.reshard_after_forward {
            if let Some(l) = self.layers.borrow_mut().pop() {
                t.release(l);
            }
        }
    }

    /// The root's post-forward, after the loss (`_fsdp_state.py` `_post_forward`, the
    /// iteration's root): the root is resharded if asked to, then the last all-gather buffer
    /// held from forward is freed.
    pub fn forward_end(&self, t: &mut Timeline) {
        if self.u.root_reshard_after_forward {
            Self::release(t, self.root.take());
        }
        Self::release(t, self.pending_gather.take());
    }

    /// The root's pre-backward (at the loss): re-gather a resharded root (buffer, copy-out,
    /// buffer freed), then prefetch the last layer's all-gather.
    pub fn backward_start(&self, t: &mut Timeline) {
        if self.u.root_reshard_after_forward {
            let buffer =
                (self.u.shards > 1).then(|| t.tensor(Category::GatheredParams, self.u.root));
            self.root
                .set(Some(t.tensor(Category::GatheredParams, self.u.root)));
            Self::release(t, buffer);
        }
        if self.u.reshard_after_forward && self.u.shards > 1 {
            let b = t.tensor(Category::GatheredParams, self.u.layer);
            self.pending_gather.set(Some(b));
        }
    }

    /// A decoder layer's pre-backward: copy out its parameters (the prefetched buffer is then
    /// freed), and prefetch the previous layer's all-gather (none before layer 0: the root is
    /// still unsharded).
    pub fn layer_backward_pre(&self, t: &mut Timeline, first_layer: bool) {
        if !self.u.reshard_after_forward {
            return; // still unsharded from forward: nothing is gathered
        }
        let prefetched = self.pending_gather.take();
        if self.u.version == 2 || prefetched.is_none() {
            // FSDP2 copies out of the buffer; FSDP1 (and N = 1) use it (or the shard) directly.
            let l = t.tensor(Category::GatheredParams, self.u.layer);
            self.layers.borrow_mut().push(l);
            Self::release(t, prefetched);
        } else if let Some(p) = prefetched {
            self.layers.borrow_mut().push(p);
        }
        if !first_layer && self.u.shards > 1 {
            let b = t.tensor(Category::GatheredParams, self.u.layer);
            self.pending_gather.set(Some(b));
        }
    }

    /// An unsharded gradient of `bytes` (in the gathered dtype) of the current layer.
    pub fn layer_grad(&self, t: &mut Timeline, bytes: u128) {
        let g = t.tensor(Category::Gradients, bytes);
        self.layer_grads.borrow_mut().push(g);
    }

    /// An unsharded gradient of the root unit (lm_head, final norm, embedding).
    pub fn root_grad(&self, t: &mut Timeline, bytes: u128) {
        let g = t.tensor(Category::Gradients, bytes);
        self.root_grads.borrow_mut().push(g);
    }

    fn reduce(&self, t: &mut Timeline, grads: Vec<Buf>) {
        let total: u128 = grads.iter().map(|g| g.bytes).sum();
        if total == 0 {
            for g in grads {
                t.release(g);
            }
            return;
        }
        let u = &self.u;
        let input = total * u.reduce_elem / u.grad_elem.max(1);
        let output = input.div_ceil(u.shards);
        let kept = (total * u.shard_elem / u.grad_elem.max(1)).div_ceil(u.shards);
        // FSDP2 always copies into a reduce-scatter input; FSDP1 reduces the flat gradient in
        // place unless it must be cast to reduce_dtype first.
        let separate_input = u.version == 2 || u.reduce_elem != u.grad_elem;
        Self::release(t, self.pending_reduce.take());
        let mut grads = Some(grads);
        let input_buf = separate_input.then(|| {
            let b = t.tensor(Category::CommBuckets, input);
            for g in grads.take().into_iter().flatten() {
                t.release(g);
            }
            b
        });
        // The output is the sharded gradient itself when its dtype is the parameters'
        // (`foreach_reduce`: `as_strided` views); otherwise it is cast into a new tensor.
        if u.reduce_elem == u.shard_elem && u.grads_on_gpu {
            let k = t.tensor(Category::Gradients, kept);
            self.kept.borrow_mut().push(k);
        } else {
            let out = t.tensor(Category::CommBuckets, output);
            if u.grads_on_gpu {
                let k = t.tensor(Category::Gradients, kept);
                self.kept.borrow_mut().push(k);
            }
            t.release(out);
        }
        for g in grads.take().into_iter().flatten() {
            t.release(g);
        }
        if u.version == 2 {
            self.pending_reduce.set(input_buf); // held until the next unit's reduce
        } else {
            Self::release(t, input_buf);
        }
    }

    /// A decoder layer's post-backward: reshard, reduce-scatter its gradients.
    pub fn layer_backward_post(&self, t: &mut Timeline) {
        if let Some(l) = self.layers.borrow_mut().pop() {
            t.release(l);
        }
        let grads = std::mem::take(&mut *self.layer_grads.borrow_mut());
        self.reduce(t, grads);
    }

    /// The final callback: the root's post-backward (reshard, reduce-scatter), then the last
    /// reduce-scatter input is released.
    pub fn backward_end(&self, t: &mut Timeline) {
        Self::release(t, self.root.take());
        Self::release(t, self.pending_gather.take());
        for l in std::mem::take(&mut *self.layers.borrow_mut()) {
            t.release(l);
        }
        let grads = std::mem::take(&mut *self.root_grads.borrow_mut());
        self.reduce(t, grads);
        Self::release(t, self.pending_reduce.take());
    }

    /// `zero_grad(set_to_none=True)`: the sharded gradients go.
    pub fn zero_grad(&self, t: &mut Timeline) {
        for k in std::mem::take(&mut *self.kept.borrow_mut()) {
            t.release(k);
        }
    }
}

/// The job whose forward and backward FSDP runs: with `MixedPrecisionPolicy(param_dtype)`
/// narrower than the stored parameters, every module computes on the gathered 16-bit copies,
/// so activations, logits and unsharded gradients are those of the pure 16-bit job (not
/// autocast: nothing is kept in fp32 but what the 16-bit run keeps).
pub fn walk_job(job: &Job) -> std::borrow::Cow<'_, Job> {
    let fsdp = job
        .sharding
        .as_ref()
        .is_some_and(|s| matches!(s.engine, Engine::Fsdp(_)));
    if fsdp
        && job.method != Method::Inference
        && job.weights.is_float()
        && job.compute.float_bytes() < job.weights.float_bytes()
    {
        let mut j = job.clone();
        j.weights = job.compute;
        if let Some(s) = j.sharding.as_mut() {
            s.mixed_param_dtype = Some(job.compute);
        }
        std::borrow::Cow::Owned(j)
    } else {
        std::borrow::Cow::Borrowed(job)
    }
}

/// Bytes per LoRA adapter element as the step computes with it: fp32 as peft stores it
/// (`ADAPTER_BYTES`), or FSDP's gathered `param_dtype` under mixed precision (peft then casts
/// the input to that dtype, i.e. not at all).
pub fn adapter_bytes(job: &Job) -> u128 {
    job.sharding
        .as_ref()
        .and_then(|s| s.mixed_param_dtype)
        .map_or(ADAPTER_BYTES, |d| d.float_bytes())
}
