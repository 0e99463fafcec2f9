//! The step as a timeline of live buffers.
//!
//! A training step's peak is the most memory alive at one moment, not the sum of everything
//! ever allocated. [`Timeline`] replays the step's allocations and frees in order, by
//! [`Category`], and keeps the largest total together with what was alive then — the breakdown
//! the report prints. This is how PyTorch's memory snapshots read.

use serde::Serialize;

/// What a live buffer is, for the breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Weights,
    QuantConstants,
    Adapters,
    Gradients,
    OptimizerState,
    Activations,
    KvCache,
    Logits,
    Temporaries,
    Workspace,
    /// Parameters all-gathered from their shards (ZeRO-3 / FSDP full shard).
    GatheredParams,
    /// Gradient reduction buckets (DeepSpeed `reduce_bucket_size`).
    CommBuckets,
}

impl Category {
    pub const ALL: [Category; 12] = [
        Category::Weights,
        Category::QuantConstants,
        Category::Adapters,
        Category::Gradients,
        Category::OptimizerState,
        Category::Activations,
        Category::KvCache,
        Category::Logits,
        Category::Temporaries,
        Category::Workspace,
        Category::GatheredParams,
        Category::CommBuckets,
    ];

    /// The component name used in tables, JSON and charts.
    pub fn name(self) -> &'static str {
        match self {
            Category::Weights => "weights",
            Category::QuantConstants => "quant_constants",
            Category::Adapters => "lora_adapters",
            Category::Gradients => "gradients",
            Category::OptimizerState => "optimizer_state",
            Category::Activations => "activations",
            Category::KvCache => "kv_cache",
            Category::Logits => "logits",
            Category::Temporaries => "temporaries",
            Category::Workspace => "cublas_workspace",
            Category::GatheredParams => "gathered_params",
            Category::CommBuckets => "comm_buckets",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Phases of a step, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Load,
    Forward,
    Backward,
    Optimizer,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Load => "load",
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Optimizer => "optimizer",
        }
    }
}

/// One tensor on the timeline: freed with [`Timeline::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a tensor allocated on the timeline must be released (or kept to the end on purpose)"]
pub struct Buf {
    pub id: usize,
    pub cat: Category,
    pub bytes: u128,
}

/// A tensor-level event of the step, in order: what the caching allocator replays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Alloc {
        id: usize,
        bytes: u128,
        cat: Category,
    },
    Free {
        id: usize,
    },
    Phase(Phase),
    /// `torch.cuda.empty_cache()` (the measurement script calls it after loading).
    EmptyCache,
}

/// Live bytes by category, replayed event by event.
#[derive(Debug, Clone)]
pub struct Timeline {
    events: Vec<Event>,
    next_id: usize,
    live: [u128; Category::ALL.len()],
    total: u128,
    phase: Phase,
    peak: u128,
    peak_phase: Phase,
    at_peak: [u128; Category::ALL.len()],
    /// The largest total within each phase, in phase order.
    phase_peaks: Vec<(Phase, u128)>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Timeline {
    pub fn new() -> Timeline {
        Timeline {
            events: Vec::new(),
            next_id: 0,
            live: [0; Category::ALL.len()],
            total: 0,
            phase: Phase::Load,
            peak: 0,
            peak_phase: Phase::Load,
            at_peak: [0; Category::ALL.len()],
            phase_peaks: vec![(Phase::Load, 0)],
        }
    }

    /// Starts a phase; its peak starts from what is live now.
    pub fn phase(&mut self, phase: Phase) {
        self.events.push(Event::Phase(phase));
        self.phase = phase;
        self.phase_peaks.push((phase, self.total));
    }

    pub fn alloc(&mut self, cat: Category, bytes: u128) {
        self.live[cat.index()] += bytes;
        self.total += bytes;
        if let Some(last) = self.phase_peaks.last_mut() {
            last.1 = last.1.max(self.total);
        }
        // The step's peak: loading the model is its own phase (its own peak is kept per phase).
        if self.total > self.peak && self.phase != Phase::Load {
            self.peak = self.total;
            self.peak_phase = self.phase;
            self.at_peak = self.live;
        }
    }

    /// Frees bytes of a category. Freeing more than is live is a modelling bug; it is clamped
    /// in release builds and caught by a debug assertion in tests.
    pub fn free(&mut self, cat: Category, bytes: u128) {
        let live = &mut self.live[cat.index()];
        debug_assert!(
            *live >= bytes,
            "freeing {bytes} of {cat:?} with {live} live"
        );
        let b = bytes.min(*live);
        *live -= b;
        self.total -= b;
    }

    /// Allocates one tensor.
    pub fn tensor(&mut self, cat: Category, bytes: u128) -> Buf {
        let id = self.next_id;
        self.next_id += 1;
        if bytes > 0 {
            self.events.push(Event::Alloc { id, bytes, cat });
        }
        self.alloc(cat, bytes);
        Buf { id, cat, bytes }
    }

    /// Frees a tensor allocated with [`Timeline::tensor`].
    pub fn release(&mut self, b: Buf) {
        if b.bytes > 0 {
            self.events.push(Event::Free { id: b.id });
        }
        self.free(b.cat, b.bytes);
    }

    /// A tensor that lives for one operation only.
    pub fn transient(&mut self, cat: Category, bytes: u128) {
        let b = self.tensor(cat, bytes);
        self.release(b);
    }

    /// Records `torch.cuda.empty_cache()`.
    pub fn empty_cache(&mut self) {
        self.events.push(Event::EmptyCache);
    }

    /// The tensor-level events so far, in order.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// A buffer that lives only for one operation.
    pub fn spike(&mut self, cat: Category, bytes: u128) {
        self.alloc(cat, bytes);
        self.free(cat, bytes);
    }

    pub fn live(&self, cat: Category) -> u128 {
        self.live[cat.index()]
    }

    pub fn total(&self) -> u128 {
        self.total
    }

    pub fn peak(&self) -> u128 {
        self.peak
    }

    pub fn peak_phase(&self) -> Phase {
        self.peak_phase
    }

    /// Live bytes per category at the peak.
    pub fn at_peak(&self) -> impl Iterator<Item = (Category, u128)> + '_ {
        Category::ALL.iter().map(|&c| (c, self.at_peak[c.index()]))
    }

    /// The highest total reached in each phase (a phase entered twice is merged).
    pub fn phase_peaks(&self) -> Vec<(Phase, u128)> {
        let mut out: Vec<(Phase, u128)> = Vec::new();
        for &(p, b) in &self.phase_peaks {
            match out.iter_mut().find(|(q, _)| *q == p) {
                Some(e) => e.1 = e.1.max(b),
                None => out.push((p, b)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_the_largest_simultaneous_total_not_the_sum() {
        let mut t = Timeline::new();
        t.alloc(Category::Weights, 100);
        t.phase(Phase::Forward);
        t.alloc(Category::Activations, 50);
        t.phase(Phase::Backward);
        t.free(Category::Activations, 50);
        t.alloc(Category::Gradients, 30);
        t.spike(Category::Temporaries, 10);
        assert_eq!(t.peak(), 150);
        assert_eq!(t.peak_phase(), Phase::Forward);
        let at: Vec<_> = t.at_peak().filter(|(_, b)| *b > 0).collect();
        assert_eq!(
            at,
            vec![(Category::Weights, 100), (Category::Activations, 50)]
        );
        assert_eq!(
            t.phase_peaks(),
            vec![
                (Phase::Load, 100),
                (Phase::Forward, 150),
                (Phase::Backward, 150)
            ]
        );
        assert_eq!(t.total(), 130);
    }
}
