//! Giving cached segments back to the device: what happens when a new segment does not fit,
//! on `torch.cuda.empty_cache()`, and under `garbage_collection_threshold`.
//!
//! Source: PyTorch 2.11 `c10/cuda/CUDACachingAllocator.cpp`, `DeviceCachingAllocator`:
//! `release_block` (cudaFree of one whole segment), `release_blocks` / `release_cached_blocks`
//! (every cached block that is a whole segment — `!prev && !next` — is freed; free pages of
//! expandable segments are unmapped), `release_available_cached_blocks` (with
//! `max_split_size`: free oversize segments, the smallest sufficient one or several from the
//! largest down), `garbage_collect_cached_blocks` (free whole cached large segments not reused
//! for longer than average until below the threshold). `malloc` calls them in that order
//! after `get_free_block` fails: gc, `alloc_block`, release available + retry, release all +
//! retry, then out of memory.

use super::rules::PoolKind;
use super::state::{Allocator, BlockId};

impl Allocator {
    /// `release_block`: cudaFree a cached block that is a whole segment.
    fn release_block(&mut self, id: BlockId) {
        debug_assert!(!self.blocks[id].is_split() && self.blocks[id].expandable.is_none());
        self.remove_free(id);
        self.reserved -= self.blocks[id].size;
        self.segments -= 1;
        self.delete_block(id);
    }

    /// `release_cached_blocks` (also `emptyCache`): free every cached whole segment of both
    /// pools, large first; unmap the free pages of expandable segments.
    pub fn release_cached_blocks(&mut self) {
        for kind in [PoolKind::Large, PoolKind::Small] {
            let cached: Vec<BlockId> = self.pools[kind as usize]
                .free
                .iter()
                .map(|&(_, _, id)| id)
                .collect();
            let mut to_unmap = Vec::new();
            for id in cached {
                let b = &self.blocks[id];
                if b.expandable.is_some() {
                    to_unmap.push(id);
                } else if !b.is_split() {
                    self.release_block(id);
                }
            }
            for id in to_unmap {
                self.unmap_block(id);
                if !self.blocks[id].is_split() && !self.blocks[id].mapped {
                    self.release_expandable_segment(id);
                }
            }
        }
    }

    /// `release_available_cached_blocks`: only with `max_split_size` set. Free the smallest
    /// cached oversize segment of at least max(size, max_split_size); failing that, oversize
    /// segments from the largest down until that many bytes are freed.
    pub(super) fn release_available_cached_blocks(&mut self, kind: PoolKind, size: u64) -> bool {
        let Some(max_split) = self.conf.max_split_size else {
            return false;
        };
        let key = size.max(max_split);
        let pool = &self.pools[kind as usize];
        let sufficient = pool
            .free
            .range((key, 0, 0)..)
            .next()
            .map(|&(_, _, id)| id)
            .filter(|&id| self.blocks[id].expandable.is_none());
        if let Some(id) = sufficient {
            // Oversize blocks are never split, so a cached one is a whole segment.
            if self.blocks[id].is_split() {
                return false;
            }
            self.release_block(id);
            return true;
        }
        let below: Vec<(u64, BlockId)> = pool
            .free
            .range(..(key, 0, 0))
            .rev()
            .map(|&(s, _, id)| (s, id))
            .collect();
        let mut released = 0u64;
        for (s, id) in below {
            if released >= key || s < max_split {
                break;
            }
            let b = &self.blocks[id];
            if b.expandable.is_none() && !b.is_split() {
                self.release_block(id);
                released += s;
            }
        }
        released >= key
    }

    /// `garbage_collect_cached_blocks`: once reserved memory is above
    /// `garbage_collection_threshold` × the cap, free whole cached large segments whose age
    /// (`get_free_block` calls since they were cached) is at least the average, repeating with
    /// the new average until enough is reclaimed or nothing more can be freed.
    pub(super) fn garbage_collect_cached_blocks(&mut self) {
        let (Some(threshold), Some(cap)) = (self.conf.garbage_collection_threshold, self.capacity)
        else {
            return;
        };
        let gc_threshold = (threshold * cap as f64) as u64;
        if self.reserved <= gc_threshold {
            return;
        }
        let target = self.reserved - gc_threshold;
        let large = PoolKind::Large as usize;
        let now = self.pools[large].get_free_calls;
        let age = |a: &Allocator, id: BlockId| now - a.blocks[id].gc_base;
        let cached = |a: &Allocator| -> Vec<BlockId> {
            a.pools[large]
                .free
                .iter()
                .map(|&(_, _, id)| id)
                .filter(|&id| !a.blocks[id].is_split())
                .collect()
        };
        let first = cached(self);
        let mut total_age: u64 = first.iter().map(|&id| age(self, id)).sum();
        let mut freeable = first.len() as u64;
        let mut reclaimed = 0u64;
        let mut freed = true;
        while reclaimed < target && freed && freeable > 0 {
            let age_threshold = total_age as f64 / freeable as f64;
            freed = false;
            // Free everything above the average age in one sweep, without stopping at the
            // target, so that gc does not run again soon.
            for id in cached(self) {
                let a = age(self, id);
                if self.blocks[id].expandable.is_none() && a as f64 >= age_threshold {
                    freed = true;
                    reclaimed += self.blocks[id].size;
                    total_age -= a;
                    freeable -= 1;
                    self.release_block(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::alloc::conf::AllocConf;
    use crate::alloc::rules::{PoolKind, MIB};
    use crate::alloc::state::Allocator;

    #[test]
    fn a_full_device_frees_the_cache_and_retries() {
        // Capacity 100 MiB. Two 40 MiB segments; free one; a 50 MiB request finds no cached
        // block ≥ 50 MiB, cannot add 50 MiB to 80 reserved, frees the cached 40 MiB segment
        // (release_cached_blocks) and then fits: reserved 40 + 50 = 90.
        let mut a = Allocator::new(AllocConf::default(), Some(100 * MIB));
        let x = a.malloc(40 * MIB).unwrap();
        let _y = a.malloc(40 * MIB).unwrap();
        a.free(x);
        assert_eq!(a.reserved, 80 * MIB);
        a.malloc(50 * MIB).unwrap();
        assert_eq!(
            (a.reserved, a.allocated, a.alloc_retries),
            (90 * MIB, 90 * MIB, 1)
        );
        // 20 MiB more: 110 > 100 even after the flush (nothing cached) → out of memory, and
        // PyTorch's message names the segment size (20 MiB).
        assert_eq!(a.malloc(20 * MIB).unwrap_err().alloc_size, 20 * MIB);
    }

    #[test]
    fn a_split_segment_cannot_be_given_back() {
        // A 20 MiB segment holding one live 4 MiB block and a free 16 MiB rest: empty_cache
        // keeps all 20 MiB; once the block is freed the segment merges whole and goes.
        let mut a = Allocator::new(AllocConf::default(), None);
        let x = a.malloc(4 * MIB).unwrap();
        a.release_cached_blocks();
        assert_eq!(a.reserved, 20 * MIB);
        a.free(x);
        assert_eq!(a.free_sizes(PoolKind::Large), vec![20 * MIB]);
        a.release_cached_blocks();
        assert_eq!((a.reserved, a.segments), (0, 0));
    }

    #[test]
    fn max_split_size_releases_oversize_segments_first() {
        // max_split_size 64 MiB, capacity 300 MiB. Cached: a 100 MiB and a 150 MiB oversize
        // segment (both freed). A 200 MiB request: no cached block within 200 + 20 MiB fits the
        // size rule (150 < 200); 250 + 200 > 300 → release_available_cached_blocks: no single
        // block ≥ 200, so free from the largest down: 150 (< 200 released), then 100 → 250 ≥ 200.
        // Reserved 0 + 200.
        let conf: AllocConf = "max_split_size_mb:64".parse().unwrap();
        let mut a = Allocator::new(conf, Some(300 * MIB));
        let x = a.malloc(100 * MIB).unwrap();
        let y = a.malloc(150 * MIB).unwrap();
        a.free(x);
        a.free(y);
        a.malloc(200 * MIB).unwrap();
        assert_eq!((a.reserved, a.segments, a.alloc_retries), (200 * MIB, 1, 0));
    }

    #[test]
    fn garbage_collection_frees_old_cached_segments_above_the_threshold() {
        // gc threshold 0.3 of a 200 MiB cap = 60 MiB. Segments A (30 MiB) and B (40 MiB) are
        // cached at get_free_block call 2; B is reused by call 3 and cached again (base 3).
        // Call 4, a 50 MiB request, finds no fit → gc: 70 > 60, target 10; ages A = 4 − 2 = 2,
        // B = 4 − 3 = 1, average 1.5 → A is freed (30 ≥ 10 reclaimed), B stays. Then cudaMalloc
        // of 50: reserved 40 + 50 = 90 (without gc: 120, which would still fit the cap).
        let conf: AllocConf = "garbage_collection_threshold:0.3".parse().unwrap();
        let mut a = Allocator::new(conf, Some(200 * MIB));
        let x = a.malloc(30 * MIB).unwrap(); // call 1
        let y = a.malloc(40 * MIB).unwrap(); // call 2
        a.free(x);
        a.free(y);
        let w = a.malloc(40 * MIB).unwrap(); // call 3: B
        a.free(w);
        a.malloc(50 * MIB).unwrap(); // call 4
        assert_eq!((a.reserved, a.segments), (90 * MIB, 2));
        assert_eq!(a.free_sizes(PoolKind::Large), vec![40 * MIB]);
        // Without a threshold the same sequence keeps both cached segments.
        let mut b = Allocator::new(AllocConf::default(), Some(200 * MIB));
        let x = b.malloc(30 * MIB).unwrap();
        let y = b.malloc(40 * MIB).unwrap();
        b.free(x);
        b.free(y);
        let w = b.malloc(40 * MIB).unwrap();
        b.free(w);
        b.malloc(50 * MIB).unwrap();
        assert_eq!(b.reserved, 120 * MIB);
    }
}
