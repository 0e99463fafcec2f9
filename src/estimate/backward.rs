//! The backward of a layer as autograd runs it: op by op in reverse, each op's backward script
//! ([`Bwd`]) allocating its gradient buffers in the order PyTorch's kernels and autograd nodes
//! create them, and the gradient of every tensor of the layer flowing from the op that consumed
//! it to the op that produced it.
//!
//! The engine's rules (PyTorch 2.11 `torch/csrc/autograd/engine.cpp`, `input_buffer.cpp`):
//! - a node's incoming gradient is freed when the node has run (`call_function` takes its
//!   inputs by value), its saved tensors right after (`release_variables`);
//! - a second gradient for the same tensor is summed into the first in place when nobody else
//!   holds the first (`InputBuffer::accumulate`: `old.add_(new)`), else out of place (`old +
//!   new`; `new.add_(old)` is only for a sparse `old`);
//! - `a + b` hands its incoming gradient to both inputs without a copy (`AddBackward0`), so the
//!   residual stream's gradient is one buffer through a layer;
//! - views (`split`, `chunk` of a fused projection) gather their gradients into one gradient of
//!   the whole tensor (`SplitWithSizesBackward0`: a `cat`);
//! - among ready nodes the one created last runs first (the ready queue orders by
//!   `sequence_nr`): an op whose backward is two nodes can let an earlier op's backward run
//!   between them ([`Bwd::Defer`], SwiGLU's `mul` then `up_proj` then `silu`).

use super::activations::{Fwd, LayerInventory};
use super::timeline::{Buf, Category, Timeline};

/// One step of an op's backward script ([`super::activations::OpCost::bwd_script`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bwd {
    /// A gradient buffer or temporary; the k-th `Temp` of a script is temporary k.
    Temp(u128),
    /// Frees temporary k (what is still live when the script ends is freed then).
    Free(usize),
    /// Releases the op's j-th saved tensor (`OpCost::saved[j]`) when the op holds it.
    Release(usize),
    /// Creates the op's j-th parameter gradient (`OpCost::grads[j]`).
    Grad(usize),
    /// The op is done with its incoming gradient (freed unless another op still holds it).
    DoneUpstream,
    /// Temporary `temp` is the gradient of the op's input `input`: handed to the op that
    /// produced it (summed in place into a gradient already there).
    Give { temp: usize, input: usize },
    /// The incoming gradient itself becomes the gradient of input n (no copy: `a + b`).
    Pass(usize),
    /// The op's first node that unpacks a saved tensor runs here: under checkpointing, where a
    /// layer's recompute starts (`torch/utils/checkpoint.py` `unpack_hook`) when this is the
    /// first unpack of the layer's backward. Without it an op that saved anything unpacks at
    /// the start of its script.
    Unpack,
    /// The rest of the script runs once the op producing input n has run its backward.
    Defer(usize),
}

/// Builds a backward script: `temp` returns the temporary's index.
#[derive(Default)]
pub struct BwdScript {
    pub steps: Vec<Bwd>,
    temps: usize,
}

impl BwdScript {
    pub fn temp(&mut self, bytes: u128) -> usize {
        self.steps.push(Bwd::Temp(bytes));
        self.temps += 1;
        self.temps - 1
    }

    pub fn free(&mut self, k: usize) {
        self.steps.push(Bwd::Free(k));
    }

    pub fn release(&mut self, j: usize) {
        self.steps.push(Bwd::Release(j));
    }

    pub fn grad(&mut self, j: usize) {
        self.steps.push(Bwd::Grad(j));
    }

    pub fn done_upstream(&mut self) {
        self.steps.push(Bwd::DoneUpstream);
    }

    pub fn give(&mut self, temp: usize, input: usize) {
        self.steps.push(Bwd::Give { temp, input });
    }

    pub fn defer(&mut self, input: usize) {
        self.steps.push(Bwd::Defer(input));
    }

    pub fn unpack(&mut self) {
        self.steps.push(Bwd::Unpack);
    }
}

/// The tensors a layer's forward saved, per op: kept from the forward, or recomputed from the
/// checkpointed input at the backward's first unpack (non-reentrant checkpointing recomputes
/// inside the first saved-tensor unpack, after the backward of the ops that saved nothing).
pub(super) enum Saves<'a> {
    Kept(Vec<Vec<Option<Buf>>>),
    Recompute(&'a mut dyn FnMut(&mut Timeline) -> Vec<Vec<Option<Buf>>>),
}

impl Saves<'_> {
    /// The saved tensors of every op, recomputing them first if they are not there yet.
    fn all(&mut self, t: &mut Timeline) -> &mut Vec<Vec<Option<Buf>>> {
        if let Saves::Recompute(f) = self {
            *self = Saves::Kept(f(t));
        }
        match self {
            Saves::Kept(v) => v,
            Saves::Recompute(_) => unreachable!("recomputed above"),
        }
    }

    /// Op `i`'s saved tensors when they exist already (nothing when still to be recomputed).
    fn take(&mut self, i: usize) -> Vec<Option<Buf>> {
        match self {
            Saves::Kept(v) => v.get_mut(i).map(std::mem::take).unwrap_or_default(),
            Saves::Recompute(_) => Vec::new(),
        }
    }
}

/// Gradients of the layer's tensors: shared buffers with holder counts.
struct Grads {
    pool: Vec<Option<(Buf, u32)>>,
    /// The gradient of each tensor of the layer (an index into `pool`).
    slot: Vec<Option<usize>>,
    /// Gradients of views of a tensor, gathered into one at the end of the op.
    parts: Vec<Vec<Buf>>,
}

impl Grads {
    fn new_ref(&mut self, b: Buf) -> usize {
        self.pool.push(Some((b, 1)));
        self.pool.len() - 1
    }

    fn holders(&self, g: usize) -> u32 {
        self.pool[g].map_or(0, |(_, n)| n)
    }

    fn drop_ref(&mut self, t: &mut Timeline, g: usize) {
        if let Some((b, n)) = self.pool[g].as_mut() {
            *n -= 1;
            if *n == 0 {
                let b = *b;
                self.pool[g] = None;
                t.release(b);
            }
        }
    }

    /// Hands gradient `g` (one holder moved in) to tensor `x`, summing it with one already there.
    fn accumulate(&mut self, t: &mut Timeline, x: usize, g: usize) {
        let Some(old) = self.slot[x] else {
            self.slot[x] = Some(g);
            return;
        };
        if old == g {
            // The same buffer twice (an add of a tensor to itself): one holder is enough.
            self.drop_ref(t, g);
        } else if self.holders(old) == 1 {
            self.drop_ref(t, g);
        } else {
            let bytes = self.pool[old].map_or(0, |(b, _)| b.bytes);
            let sum = t.tensor(Category::Temporaries, bytes);
            self.drop_ref(t, old);
            self.drop_ref(t, g);
            self.slot[x] = Some(self.new_ref(sum));
        }
    }
}

/// An op's backward in progress (a deferred one waits in `pending`).
struct Run {
    op: usize,
    pc: usize,
    script: Vec<Bwd>,
    temps: Vec<Option<Buf>>,
    upstream: Option<usize>,
    saved: Vec<Option<Buf>>,
    grads_done: Vec<bool>,
}

/// The backward of one layer from `upstream` (the gradient of its output; consumed), with the
/// tensors its forward saved (per op, aligned with each op's `saved`). Parameter gradients go
/// to `grad` as they are created, with the op and the gradient's index in it. Returns the
/// gradient of the layer input, when it needs one.
pub(super) fn backward_layer(
    t: &mut Timeline,
    inv: &LayerInventory,
    mut saved: Saves<'_>,
    grad: &mut impl FnMut(&mut Timeline, u128, (usize, usize)),
    upstream: Option<Buf>,
) -> Option<Buf> {
    let n = inv.tensor_bytes.len();
    let mut g = Grads {
        pool: Vec::new(),
        slot: vec![None; n],
        parts: vec![Vec::new(); n],
    };
    if let (Some(u), Some(&out)) = (upstream, inv.outputs.last()) {
        let id = g.new_ref(u);
        g.slot[out] = Some(id);
    }
    let producer = |x: usize| inv.outputs.iter().position(|&o| o == x);
    let mut pending: Vec<(usize, Run)> = Vec::new();
    for i in (0..inv.ops.len()).rev() {
        let op = &inv.ops[i];
        let out = inv.outputs[i];
        let unpacks = !op.saved.is_empty() || op.fwd_script.contains(&Fwd::Pack);
        if unpacks && inv.requires_grad[out] && !op.bwd_script.contains(&Bwd::Unpack) {
            saved.all(t);
        }
        let mine = saved.take(i);
        if !inv.requires_grad[out] {
            // No gradient reaches the op: autograd never runs it (it saved nothing).
            mine.into_iter().flatten().for_each(|b| t.release(b));
        } else {
            let script = if op.bwd_script.is_empty() {
                fallback_script(inv, i)
            } else {
                // Cloned: a borrowed `Cow` measured 30% slower on the 70B bench.
                op.bwd_script.clone()
            };
            let run = Run {
                op: i,
                pc: 0,
                script,
                temps: Vec::new(),
                upstream: g.slot[out].take(),
                saved: mine,
                grads_done: vec![false; op.grads.len()],
            };
            if let Some((wait, run)) = step(t, inv, &mut g, run, grad, &producer, &mut saved) {
                pending.push((wait, run));
            }
        }
        // Deferred scripts waiting for this op's backward continue now.
        while let Some(k) = pending.iter().position(|(w, _)| *w == i) {
            let (_, run) = pending.remove(k);
            if let Some(p) = step(t, inv, &mut g, run, grad, &producer, &mut saved) {
                pending.push(p);
            }
        }
    }
    // Anything still waiting (its producer is the layer input) finishes now.
    for (_, run) in std::mem::take(&mut pending) {
        let mut run = run;
        run.script.retain(|s| !matches!(s, Bwd::Defer(_)));
        let _ = step(t, inv, &mut g, run, grad, &producer, &mut saved);
    }
    let input = g.slot[0].take();
    // Gradients of the layer's inner tensors left over (none in a well-formed walk).
    for x in 1..n {
        if let Some(id) = g.slot[x].take() {
            g.drop_ref(t, id);
        }
    }
    input.and_then(|id| g.pool[id].take().map(|(b, _)| b))
}

/// Runs `run` until its script ends (None) or defers (the op to wait for, and the run).
fn step(
    t: &mut Timeline,
    inv: &LayerInventory,
    g: &mut Grads,
    run: Run,
    grad: &mut impl FnMut(&mut Timeline, u128, (usize, usize)),
    producer: &impl Fn(usize) -> Option<usize>,
    saved: &mut Saves<'_>,
) -> Option<(usize, Run)> {
    let mut run = run;
    let op = &inv.ops[run.op];
    let ins = &inv.inputs[run.op];
    while run.pc < run.script.len() {
        let s = run.script[run.pc];
        run.pc += 1;
        match s {
            Bwd::Temp(b) => run.temps.push(Some(t.tensor(Category::Temporaries, b))),
            Bwd::Free(k) => {
                if let Some(b) = run.temps.get_mut(k).and_then(Option::take) {
                    t.release(b);
                }
            }
            Bwd::Release(j) => {
                if let Some(b) = run.saved.get_mut(j).and_then(Option::take) {
                    t.release(b);
                }
            }
            Bwd::Grad(j) => {
                if let Some(done) = run.grads_done.get_mut(j).filter(|d| !**d) {
                    *done = true;
                    grad(t, op.grads[j], (run.op, j));
                }
            }
            Bwd::DoneUpstream => {
                if let Some(u) = run.upstream.take() {
                    g.drop_ref(t, u);
                }
            }
            Bwd::Give { temp, input } => {
                let Some(b) = run.temps.get_mut(temp).and_then(Option::take) else {
                    continue;
                };
                match ins.get(input).copied() {
                    Some(x) if inv.requires_grad[x] => {
                        if b.bytes < inv.tensor_bytes[x] {
                            g.parts[x].push(b);
                        } else {
                            let id = g.new_ref(b);
                            g.accumulate(t, x, id);
                        }
                    }
                    _ => t.release(b),
                }
            }
            Bwd::Pass(input) => {
                if let (Some(u), Some(&x)) = (run.upstream, ins.get(input)) {
                    if inv.requires_grad[x] {
                        if let Some((_, holders)) = g.pool[u].as_mut() {
                            *holders += 1;
                        }
                        g.accumulate(t, x, u);
                    }
                }
            }
            Bwd::Unpack => {
                if run.saved.is_empty() {
                    run.saved = saved
                        .all(t)
                        .get_mut(run.op)
                        .map(std::mem::take)
                        .unwrap_or_default();
                }
            }
            Bwd::Defer(input) => {
                let wait = ins.get(input).and_then(|&x| producer(x));
                if let Some(w) = wait.filter(|&w| w < run.op) {
                    return Some((w, run));
                }
            }
        }
    }
    // The script's end: what it left.
    for b in run.temps.drain(..).flatten() {
        t.release(b);
    }
    if let Some(u) = run.upstream.take() {
        g.drop_ref(t, u);
    }
    for b in run.saved.drain(..).flatten() {
        t.release(b);
    }
    for (j, done) in run.grads_done.iter().enumerate() {
        if !done {
            grad(t, op.grads[j], (run.op, j));
        }
    }
    // Views' gradients gathered into one gradient of the whole tensor.
    for &x in ins {
        let parts = std::mem::take(&mut g.parts[x]);
        if parts.is_empty() {
            continue;
        }
        let whole = t.tensor(Category::Temporaries, inv.tensor_bytes[x]);
        for b in parts {
            t.release(b);
        }
        let id = g.new_ref(whole);
        g.accumulate(t, x, id);
    }
    None
}

/// The script of an op without its own: its input gradients (one per distinct input that
/// needs one), then its one backward transient (less those gradients, which it counted) or its
/// stages, the incoming gradient done, its saved tensors and parameter gradients.
fn fallback_script(inv: &LayerInventory, i: usize) -> Vec<Bwd> {
    let op = &inv.ops[i];
    let mut s = BwdScript::default();
    let mut given: Vec<(usize, usize)> = Vec::new();
    let mut seen = Vec::new();
    let mut total = 0;
    for (n, &x) in inv.inputs[i].iter().enumerate() {
        if inv.requires_grad[x] && !seen.contains(&x) {
            seen.push(x);
            total += inv.tensor_bytes[x];
            given.push((s.temp(inv.tensor_bytes[x]), n));
        }
    }
    if op.bwd_stages.is_empty() {
        let k = s.temp(op.bwd_transient.saturating_sub(total));
        s.free(k);
    } else {
        let mut left = op.saved.len();
        for &(bytes, count) in &op.bwd_stages {
            let k = s.temp(bytes);
            s.free(k);
            for j in left.saturating_sub(count)..left {
                s.release(j);
            }
            left = left.saturating_sub(count);
        }
    }
    s.done_upstream();
    for j in 0..op.saved.len() {
        s.release(j);
    }
    for j in 0..op.grads.len() {
        s.grad(j);
    }
    for (k, n) in given {
        s.give(k, n);
    }
    s.steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grads(n: usize) -> Grads {
        Grads {
            pool: Vec::new(),
            slot: vec![None; n],
            parts: vec![Vec::new(); n],
        }
    }

    #[test]
    fn a_second_gradient_is_summed_in_place_only_into_an_unshared_first() {
        // `InputBuffer::accumulate`: `old.add_(new)` when nothing else holds `old` ...
        let mut t = Timeline::new();
        let mut g = grads(1);
        let old = g.new_ref(t.tensor(Category::Temporaries, 64));
        let new = g.new_ref(t.tensor(Category::Temporaries, 64));
        g.accumulate(&mut t, 0, old);
        g.accumulate(&mut t, 0, new);
        assert_eq!((g.slot[0], t.total()), (Some(old), 64));
        // ... else `old + new`, a third buffer, even when `new` is unshared (summing into the
        // new one is only for a sparse `old`).
        let mut t = Timeline::new();
        let mut g = grads(1);
        let old = g.new_ref(t.tensor(Category::Temporaries, 64));
        g.pool[old].as_mut().unwrap().1 += 1; // `a + b` handed it to another input too
        let new = g.new_ref(t.tensor(Category::Temporaries, 64));
        g.accumulate(&mut t, 0, old);
        g.accumulate(&mut t, 0, new);
        assert_ne!(g.slot[0], Some(old));
        assert_ne!(g.slot[0], Some(new));
        // The sum and the still-held first gradient remain.
        assert_eq!(t.total(), 128);
    }
}
