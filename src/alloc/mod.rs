//! PyTorch's CUDA caching allocator, replayed over a step's tensor allocations and frees.
//!
//! What it models: `c10/cuda/CUDACachingAllocator.cpp` of PyTorch 2.11 (`DeviceCachingAllocator`)
//! on one device and one stream — requests rounded to 512 bytes ([`rules::round_size`]); a small
//! pool (≤ 1 MiB, 2 MiB segments) and a large pool (20 MiB segments below 10 MiB, otherwise the
//! request rounded up to 2 MiB, [`rules::get_allocation_size`]); best-fit reuse of cached blocks,
//! splitting, and the rule that a block is handed out whole when splitting would leave ≤ 1 MiB
//! ([`rules::should_split`]); merging of freed neighbours; freeing cached segments and retrying
//! before an out-of-memory error ([`release`]); and the `PYTORCH_CUDA_ALLOC_CONF` options
//! ([`AllocConf`]) including expandable segments ([`expandable`]).
//!
//! What it counts, as `torch.cuda.memory_stats` does: **allocated** = the sizes of the blocks
//! handed out (`allocated_bytes`, what `max_memory_allocated` reports — whole blocks, so above
//! the sum of requests), **reserved** = the sizes of all segments cudaMalloc'ed and not yet
//! freed, plus the mapped pages of expandable segments (`reserved_bytes`,
//! `max_memory_reserved`). nvidia-smi shows reserved plus the CUDA context and libraries.
//!
//! Not modelled: several streams (blocks are reused across streams only after events), CUDA
//! graph pools, `recordStream`, free-memory callbacks, IPC, and the real addresses cudaMalloc
//! returns (virtual addresses here only break ties between free blocks of equal size).

pub mod conf;
pub mod expandable;
pub mod release;
pub mod rules;
pub mod state;

use std::collections::HashMap;

use serde::Serialize;

pub use conf::AllocConf;
use state::{Allocator, BlockId};

/// One step of the replayed program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A tensor storage of `bytes` is allocated (`bytes` as requested, before rounding).
    Alloc { id: u64, bytes: u64 },
    /// The storage allocated under `id` is freed.
    Free { id: u64 },
    /// A phase boundary: peaks are reset here and kept per phase, as `reset_peak_memory_stats`
    /// before each phase does in the groundtruth script.
    Phase(&'static str),
    /// `torch.cuda.empty_cache()`: every cached whole segment goes back to the device.
    EmptyCache,
}

/// Peaks of one phase (from its [`Event::Phase`] to the next).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PhasePeak {
    pub name: &'static str,
    pub peak_allocated: u64,
    pub peak_reserved: u64,
}

/// Where the replay ran out of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OomAt {
    /// Index into the event list of the allocation that failed.
    pub event: usize,
    /// The tensor's request in bytes.
    pub request_bytes: u64,
    /// The segment size PyTorch's error names ("Tried to allocate …").
    pub alloc_size: u64,
    /// Reserved and allocated bytes after the cache was freed, as the error message reports.
    pub reserved: u64,
    pub allocated: u64,
}

/// The outcome of a replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimResult {
    /// Largest `allocated_bytes` (`torch.cuda.max_memory_allocated`).
    pub peak_allocated: u64,
    /// Largest `reserved_bytes` (`torch.cuda.max_memory_reserved`).
    pub peak_reserved: u64,
    /// Peaks per phase, in order.
    pub phase_peaks: Vec<PhasePeak>,
    /// The first allocation that failed; the replay stops there.
    pub oom: Option<OomAt>,
    /// With a capacity: the smallest `capacity − reserved` at any moment, the margin at the
    /// tightest moment (0 after an out-of-memory error).
    pub min_headroom: Option<u64>,
    /// Segments alive at the end (an expandable segment counts once) and at most at once.
    pub num_segments: usize,
    pub peak_segments: usize,
    /// Requests that succeeded only after every cached segment was freed (`num_alloc_retries`).
    pub alloc_retries: u64,
    /// Allocated and reserved bytes after the last event.
    pub final_allocated: u64,
    pub final_reserved: u64,
}

impl SimResult {
    /// The peaks over the phases named `fwd{step}`, `bwd{step}`, `opt{step}` — what the
    /// groundtruth summary calls `peak_alloc_step{step}` / `peak_reserved_step{step}`.
    pub fn step_peaks(&self, step: u32) -> Option<(u64, u64)> {
        let names = [
            format!("fwd{step}"),
            format!("bwd{step}"),
            format!("opt{step}"),
        ];
        self.phase_peaks
            .iter()
            .filter(|p| names.iter().any(|n| n == p.name))
            .fold(None, |acc, p| {
                let (a, r) = acc.unwrap_or((0, 0));
                Some((a.max(p.peak_allocated), r.max(p.peak_reserved)))
            })
    }

    /// What the groundtruth compares: max over steps 1 and 2 of (peak allocated, peak reserved).
    pub fn groundtruth_peaks(&self) -> Option<(u64, u64)> {
        match (self.step_peaks(1), self.step_peaks(2)) {
            (Some(a), Some(b)) => Some((a.0.max(b.0), a.1.max(b.1))),
            (one, other) => one.or(other),
        }
    }
}

/// A malformed event list (a bug in whatever produced it, not a user error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("event {event}: tensor {id} is allocated twice")]
    DuplicateId { event: usize, id: u64 },
    #[error("event {event}: tensor {id} is freed but not alive")]
    UnknownId { event: usize, id: u64 },
    #[error("event {event}: a request of {bytes} bytes is beyond any device (limit 2^56)")]
    TooLarge { event: usize, bytes: u64 },
}

/// Requests above this are refused as malformed: no device has 64 PiB, and every size sum in
/// the simulation stays far from `u64::MAX`.
const MAX_REQUEST: u64 = 1 << 56;

struct Peaks {
    result: SimResult,
    capacity: Option<u64>,
}

impl Peaks {
    fn observe(&mut self, a: &Allocator) {
        let r = &mut self.result;
        r.peak_allocated = r.peak_allocated.max(a.allocated);
        r.peak_reserved = r.peak_reserved.max(a.reserved);
        r.peak_segments = r.peak_segments.max(a.segments);
        if let Some(p) = r.phase_peaks.last_mut() {
            p.peak_allocated = p.peak_allocated.max(a.allocated);
            p.peak_reserved = p.peak_reserved.max(a.reserved);
        }
        if let Some(cap) = self.capacity {
            let headroom = cap.saturating_sub(a.reserved);
            r.min_headroom = Some(r.min_headroom.map_or(headroom, |h| h.min(headroom)));
        }
    }
}

/// The live tensors' blocks by event id: a vector for the dense ids the estimator hands out, a
/// map for the rest.
#[derive(Default)]
struct Live {
    dense: Vec<Option<Option<BlockId>>>,
    sparse: HashMap<u64, Option<BlockId>>,
}

impl Live {
    const DENSE: u64 = 1 << 24;

    fn contains_key(&self, id: &u64) -> bool {
        match usize::try_from(*id).ok().filter(|_| *id < Self::DENSE) {
            Some(i) => self.dense.get(i).is_some_and(Option::is_some),
            None => self.sparse.contains_key(id),
        }
    }

    fn insert(&mut self, id: u64, block: Option<BlockId>) {
        match usize::try_from(id).ok().filter(|_| id < Self::DENSE) {
            Some(i) => {
                if self.dense.len() <= i {
                    self.dense.resize(i + 1, None);
                }
                self.dense[i] = Some(block);
            }
            None => {
                self.sparse.insert(id, block);
            }
        }
    }

    fn remove(&mut self, id: &u64) -> Option<Option<BlockId>> {
        match usize::try_from(*id).ok().filter(|_| *id < Self::DENSE) {
            Some(i) => self.dense.get_mut(i).and_then(Option::take),
            None => self.sparse.remove(id),
        }
    }
}

/// Replays `events` through the caching allocator configured by `conf`. With a `capacity`
/// (bytes the allocator may reserve: device memory less the CUDA context and other users), a
/// segment that does not fit after the cache is freed is an out-of-memory error and the replay
/// stops there.
pub fn simulate(
    events: &[Event],
    conf: &AllocConf,
    capacity: Option<u64>,
) -> Result<SimResult, EventError> {
    let mut a = Allocator::new(conf.clone(), capacity);
    // Zero-byte tensors get no block (`allocate(0)` returns a null pointer).
    let mut live = Live::default();
    let mut peaks = Peaks {
        result: SimResult {
            peak_allocated: 0,
            peak_reserved: 0,
            phase_peaks: Vec::new(),
            oom: None,
            min_headroom: capacity,
            num_segments: 0,
            peak_segments: 0,
            alloc_retries: 0,
            final_allocated: 0,
            final_reserved: 0,
        },
        capacity,
    };
    for (event, e) in events.iter().enumerate() {
        match *e {
            Event::Alloc { id, bytes } => {
                if bytes > MAX_REQUEST {
                    return Err(EventError::TooLarge { event, bytes });
                }
                if live.contains_key(&id) {
                    return Err(EventError::DuplicateId { event, id });
                }
                if bytes == 0 {
                    live.insert(id, None);
                    continue;
                }
                match a.malloc(bytes) {
                    Ok(block) => {
                        live.insert(id, Some(block));
                    }
                    Err(oom) => {
                        peaks.observe(&a);
                        peaks.result.oom = Some(OomAt {
                            event,
                            request_bytes: bytes,
                            alloc_size: oom.alloc_size,
                            reserved: a.reserved,
                            allocated: a.allocated,
                        });
                        peaks.result.min_headroom = capacity.map(|_| 0);
                        break;
                    }
                }
            }
            Event::Free { id } => match live.remove(&id) {
                Some(Some(block)) => a.free(block),
                Some(None) => {}
                None => return Err(EventError::UnknownId { event, id }),
            },
            Event::Phase(name) => peaks.result.phase_peaks.push(PhasePeak {
                name,
                peak_allocated: a.allocated,
                peak_reserved: a.reserved,
            }),
            Event::EmptyCache => a.release_cached_blocks(),
        }
        peaks.observe(&a);
    }
    let mut result = peaks.result;
    result.num_segments = a.segments;
    result.alloc_retries = a.alloc_retries;
    result.final_allocated = a.allocated;
    result.final_reserved = a.reserved;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::rules::MIB;
    use super::*;

    fn alloc(id: u64, bytes: u64) -> Event {
        Event::Alloc { id, bytes }
    }

    fn free(id: u64) -> Event {
        Event::Free { id }
    }

    fn run(events: &[Event]) -> SimResult {
        simulate(events, &AllocConf::default(), None).unwrap()
    }

    #[test]
    fn small_requests_share_a_2_mib_segment() {
        // 1000 B → 1024 B block; 3000 → 3072; both from one 2 MiB small segment.
        let r = run(&[alloc(1, 1000), alloc(2, 3000)]);
        assert_eq!(
            (r.peak_allocated, r.peak_reserved, r.num_segments),
            (4096, 2 * MIB, 1)
        );
    }

    #[test]
    fn mid_size_requests_share_a_20_mib_segment() {
        // Three 6 MiB requests: the first opens a 20 MiB segment (rest 14 MiB split off), the
        // second takes 6 of the 14 (rest 8), the third 6 of 8 leaves 2 > 1 MiB → split: all three
        // in one segment. A fourth 6 MiB finds only 2 MiB → a second 20 MiB segment.
        let r = run(&[alloc(1, 6 * MIB), alloc(2, 6 * MIB), alloc(3, 6 * MIB)]);
        assert_eq!((r.peak_allocated, r.peak_reserved), (18 * MIB, 20 * MIB));
        let r = run(&[
            alloc(1, 6 * MIB),
            alloc(2, 6 * MIB),
            alloc(3, 6 * MIB),
            alloc(4, 6 * MIB),
        ]);
        assert_eq!((r.peak_reserved, r.num_segments), (40 * MIB, 2));
    }

    #[test]
    fn a_block_is_handed_out_whole_when_the_rest_would_be_one_mib_or_less() {
        // 19 MiB + 1 B rounds to 19 MiB + 512; being ≥ 10 MiB it gets a segment rounded up to
        // 2 MiB, 20 MiB; the rest, 1 MiB − 512, is not > 1 MiB → the whole 20 MiB block is
        // allocated: allocated counts 20 MiB, not the 19 MiB asked for.
        let r = run(&[alloc(1, 19 * MIB + 1)]);
        assert_eq!(r.peak_allocated, 20 * MIB);
        // A cached 12 MiB block serves an 11 MiB request whole (rest 1 MiB): 12 MiB allocated.
        let r = run(&[alloc(1, 12 * MIB), free(1), alloc(2, 11 * MIB)]);
        assert_eq!((r.final_allocated, r.peak_reserved), (12 * MIB, 12 * MIB));
    }

    #[test]
    fn best_fit_takes_the_smallest_sufficient_block() {
        // Cached 40 MiB and 30 MiB segments (live 10 MiB keeps the second from merging — each
        // is its own segment anyway). A 25 MiB request takes the 30 MiB block (split: 5 MiB
        // rest > 1 MiB), leaving the 40 MiB block whole.
        let r = run(&[
            alloc(1, 40 * MIB),
            alloc(2, 30 * MIB),
            free(1),
            free(2),
            alloc(3, 25 * MIB),
        ]);
        assert_eq!((r.final_allocated, r.final_reserved), (25 * MIB, 70 * MIB));
        // Then 40 MiB fits the cached 40 MiB segment exactly: no new segment.
        let r = run(&[
            alloc(1, 40 * MIB),
            alloc(2, 30 * MIB),
            free(1),
            free(2),
            alloc(3, 25 * MIB),
            alloc(4, 40 * MIB),
        ]);
        assert_eq!((r.final_allocated, r.final_reserved), (65 * MIB, 70 * MIB));
    }

    #[test]
    fn freed_neighbours_merge_within_a_segment() {
        // One 20 MiB segment split into 6 + 6 + 8 MiB (the 8 MiB rest is cached). Free the first
        // two: they merge into 12 MiB, and with the free 8 MiB rest into the whole 20 MiB, so a
        // 19 MiB request fits without a new segment.
        let r = run(&[
            alloc(1, 6 * MIB),
            alloc(2, 6 * MIB),
            free(1),
            free(2),
            alloc(3, 19 * MIB),
        ]);
        assert_eq!((r.peak_reserved, r.num_segments), (20 * MIB, 1));
    }

    #[test]
    fn oversize_blocks_serve_only_large_requests_within_the_rounding_limit() {
        // max_split_size 100 MiB. A cached 120 MiB block is oversize: a 50 MiB request may not
        // take it (new 50 MiB segment); a 110 MiB request may (120 < 110 + 20); a 90 MiB one not.
        let conf: AllocConf = "max_split_size_mb:100".parse().unwrap();
        let sim = |evs: &[Event]| simulate(evs, &conf, None).unwrap();
        let r = sim(&[alloc(1, 120 * MIB), free(1), alloc(2, 50 * MIB)]);
        assert_eq!(r.final_reserved, 170 * MIB);
        let r = sim(&[alloc(1, 120 * MIB), free(1), alloc(2, 110 * MIB)]);
        assert_eq!(
            (r.final_reserved, r.final_allocated),
            (120 * MIB, 120 * MIB)
        );
        let r = sim(&[alloc(1, 130 * MIB), free(1), alloc(2, 110 * MIB)]);
        assert_eq!(r.final_reserved, 240 * MIB);
        // Without max_split_size the 120 MiB block is split for 50 MiB: no new segment.
        let r = run(&[alloc(1, 120 * MIB), free(1), alloc(2, 50 * MIB)]);
        assert_eq!((r.final_reserved, r.final_allocated), (120 * MIB, 50 * MIB));
    }

    #[test]
    fn phases_keep_their_own_peaks() {
        let r = run(&[
            Event::Phase("fwd1"),
            alloc(1, 30 * MIB),
            free(1),
            Event::Phase("bwd1"),
            alloc(2, 10 * MIB),
            Event::Phase("opt1"),
        ]);
        let p: Vec<_> = r
            .phase_peaks
            .iter()
            .map(|p| (p.name, p.peak_allocated / MIB, p.peak_reserved / MIB))
            .collect();
        // bwd1 reuses the cached 30 MiB segment (split 10 + 20): reserved stays 30 throughout.
        assert_eq!(
            p,
            vec![("fwd1", 30, 30), ("bwd1", 10, 30), ("opt1", 10, 30)]
        );
        assert_eq!(r.step_peaks(1), Some((30 * MIB, 30 * MIB)));
        assert_eq!(r.step_peaks(2), None);
    }

    #[test]
    fn empty_cache_event_and_out_of_memory() {
        // Capacity 64 MiB: 40 MiB live, a cached 20 MiB segment; empty_cache drops it.
        let evs = [
            alloc(1, 40 * MIB),
            alloc(2, 20 * MIB),
            free(2),
            Event::EmptyCache,
            alloc(3, 30 * MIB),
        ];
        let r = simulate(&evs, &AllocConf::default(), Some(64 * MIB)).unwrap();
        // 40 + 30 = 70 > 64 → out of memory at event 4; the tightest margin before was 4 MiB.
        let oom = r.oom.unwrap();
        assert_eq!(
            (oom.event, oom.reserved, oom.alloc_size),
            (4, 40 * MIB, 30 * MIB)
        );
        assert_eq!(r.min_headroom, Some(0));
        let r = simulate(&evs[..4], &AllocConf::default(), Some(64 * MIB)).unwrap();
        assert_eq!(
            (r.min_headroom, r.final_reserved),
            (Some(4 * MIB), 40 * MIB)
        );
    }

    #[test]
    fn malformed_events_are_errors_not_panics() {
        let c = AllocConf::default();
        assert!(simulate(&[free(7)], &c, None).is_err());
        assert!(simulate(&[alloc(1, 512), alloc(1, 512)], &c, None).is_err());
        assert!(simulate(&[alloc(1, u64::MAX)], &c, None).is_err());
        // Zero-byte tensors take no memory and free cleanly.
        let r = simulate(&[alloc(1, 0), free(1)], &c, None).unwrap();
        assert_eq!(r.peak_reserved, 0);
    }

    /// A deterministic pseudo-random mix of sizes and lifetimes (64-bit LCG, Knuth MMIX).
    fn churn(n: u64) -> Vec<Event> {
        let mut x = 12345u64;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 33
        };
        let mut events = Vec::new();
        let mut live = Vec::new();
        for id in 0..n {
            // Sizes from 1 B to ~64 MiB on a log scale.
            let bytes = 1 + (next() % (1 << (next() % 27)));
            events.push(alloc(id, bytes));
            live.push(id);
            while live.len() > 40 || (!live.is_empty() && next() % 3 == 0) {
                let k = (next() as usize) % live.len();
                events.push(free(live.swap_remove(k)));
            }
        }
        events.extend(live.into_iter().map(free));
        events.push(Event::EmptyCache);
        events
    }

    #[test]
    fn everything_freed_and_emptied_returns_to_zero() {
        // Whatever the interleaving, once every tensor is freed all blocks merge back into
        // whole segments, and empty_cache gives every byte back.
        for conf in [
            "",
            "expandable_segments:True",
            "max_split_size_mb:32",
            "roundup_power2_divisions:4",
        ] {
            let c: AllocConf = conf.parse().unwrap();
            let r = simulate(&churn(3000), &c, None).unwrap();
            assert_eq!(
                (r.final_allocated, r.final_reserved, r.num_segments),
                (0, 0, 0),
                "{conf}"
            );
            assert!(
                r.peak_reserved >= r.peak_allocated && r.peak_allocated > 0,
                "{conf}"
            );
        }
    }
}
