//! The allocator's state: segments split into blocks, two pools of free blocks, and
//! `malloc` / `free` as `DeviceCachingAllocator` runs them on one device and one stream.
//!
//! Source: PyTorch 2.11 `c10/cuda/CUDACachingAllocator.cpp`, `DeviceCachingAllocator`:
//! `malloc`, `get_free_block`, `alloc_block`, `alloc_found_block`, `free`, `free_block`,
//! `try_merge_blocks`. Blocks of one segment form a doubly linked list by address; a pool's
//! free blocks are a `std::set` ordered by `BlockComparatorSize` — (stream, size, address), and
//! with one stream (size, address) — so `lower_bound` is best fit, lowest address first.
//! Addresses here are virtual: each new segment starts above the last one, which only
//! decides ties between free blocks of equal size.

use std::collections::BTreeSet;

use super::conf::AllocConf;
use super::rules::{get_allocation_size, round_size, should_split, PoolKind};

pub type BlockId = usize;

#[derive(Debug, Clone)]
pub struct Block {
    pub addr: u64,
    pub size: u64,
    pub prev: Option<BlockId>,
    pub next: Option<BlockId>,
    pub allocated: bool,
    /// Backed by physical pages; always true outside expandable segments.
    pub mapped: bool,
    pub pool: PoolKind,
    /// Index into `Allocator::expandable` when the block lies in an expandable segment.
    pub expandable: Option<usize>,
    /// `gc_count_base`: the pool's `get_free_blocks_call_count` when the block was cached.
    pub gc_base: u64,
}

impl Block {
    pub fn is_split(&self) -> bool {
        self.prev.is_some() || self.next.is_some()
    }
}

/// `BlockPool`: the cached free blocks, and (expandable segments) the unmapped ranges.
#[derive(Debug, Default)]
pub struct Pool {
    /// (size, address, id): `BlockComparatorSize` with one stream.
    pub free: BTreeSet<(u64, u64, BlockId)>,
    /// (address, id): `BlockComparatorAddress`.
    pub unmapped: BTreeSet<(u64, BlockId)>,
    /// `get_free_blocks_call_count` (counted only when garbage collection is on).
    pub get_free_calls: u64,
}

/// One expandable segment: a reserved address range mapped page by page.
#[derive(Debug, Clone)]
pub struct ExpandableSegment {
    pub base: u64,
    pub page: u64,
    pub len: u64,
}

/// Why a request could not be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfMemory {
    /// The segment size PyTorch reports ("Tried to allocate …" prints `alloc_size`).
    pub alloc_size: u64,
}

pub struct Allocator {
    pub conf: AllocConf,
    /// Bytes the allocator may reserve (device memory less the CUDA context and other users).
    pub capacity: Option<u64>,
    pub blocks: Vec<Block>,
    spare: Vec<BlockId>,
    pub pools: [Pool; 2],
    pub expandable: Vec<Option<ExpandableSegment>>,
    next_addr: u64,
    /// `stats.reserved_bytes` (= `total_allocated_memory`): bytes of cudaMalloc'ed segments
    /// plus mapped pages of expandable segments.
    pub reserved: u64,
    /// `stats.allocated_bytes`: sizes of the blocks handed out (whole blocks, not requests).
    pub allocated: u64,
    /// cudaMalloc'ed segments alive (an expandable segment counts once).
    pub segments: usize,
    /// `stats.num_alloc_retries`: requests that needed every cached segment freed.
    pub alloc_retries: u64,
}

impl Allocator {
    pub fn new(conf: AllocConf, capacity: Option<u64>) -> Allocator {
        Allocator {
            conf,
            capacity,
            blocks: Vec::new(),
            spare: Vec::new(),
            pools: [Pool::default(), Pool::default()],
            expandable: Vec::new(),
            // Start above 0 so no block has address 0; 2^40 is page-aligned for both pools.
            next_addr: 1 << 40,
            reserved: 0,
            allocated: 0,
            segments: 0,
            alloc_retries: 0,
        }
    }

    pub fn pool(&mut self, kind: PoolKind) -> &mut Pool {
        &mut self.pools[kind as usize]
    }

    pub fn new_block(&mut self, block: Block) -> BlockId {
        match self.spare.pop() {
            Some(id) => {
                self.blocks[id] = block;
                id
            }
            None => {
                self.blocks.push(block);
                self.blocks.len() - 1
            }
        }
    }

    pub fn delete_block(&mut self, id: BlockId) {
        self.spare.push(id);
    }

    /// A fresh range of virtual addresses of `len` bytes, aligned to `align`.
    pub fn take_addresses(&mut self, len: u64, align: u64) -> u64 {
        let base = self.next_addr.div_ceil(align) * align;
        // Leave one page between ranges so neighbours never look adjacent.
        self.next_addr = base + len + align;
        base
    }

    /// Whether `bytes` more may be reserved.
    pub fn fits(&self, bytes: u64) -> bool {
        match self.capacity {
            Some(cap) => self.reserved.checked_add(bytes).is_some_and(|r| r <= cap),
            None => true,
        }
    }

    fn gc_on(&self) -> bool {
        self.conf.garbage_collection_threshold.is_some() && self.capacity.is_some()
    }

    /// `BlockPool::insert_into_blocks`: cache a free block, stamping its age base.
    pub fn insert_free(&mut self, id: BlockId) {
        let b = &mut self.blocks[id];
        let pool = &mut self.pools[b.pool as usize];
        b.gc_base = pool.get_free_calls;
        pool.free.insert((b.size, b.addr, id));
    }

    pub fn remove_free(&mut self, id: BlockId) {
        let b = &self.blocks[id];
        let removed = self.pools[b.pool as usize]
            .free
            .remove(&(b.size, b.addr, id));
        debug_assert!(removed, "block {id} was not cached");
    }

    /// `DeviceCachingAllocator::malloc`: the block handed out for a request of `bytes`.
    pub fn malloc(&mut self, bytes: u64) -> Result<BlockId, OutOfMemory> {
        let size = round_size(bytes, &self.conf);
        let kind = PoolKind::of(size);
        let alloc_size = get_allocation_size(size);
        // First, try to get a block from the existing pool (no free-memory callbacks here).
        let mut found = self.get_free_block(kind, size);
        if found.is_none() {
            // `garbage_collect_cached_blocks` runs only under a memory cap (`set_fraction`).
            if self.gc_on() {
                self.garbage_collect_cached_blocks();
            }
            found = self.alloc_block(kind, size, alloc_size);
            if found.is_none() && self.release_available_cached_blocks(kind, size) {
                found = self.alloc_block(kind, size, alloc_size);
            }
            if found.is_none() {
                // Free all non-split cached blocks and retry (`isRetry` counts a retry).
                self.release_cached_blocks();
                self.alloc_retries += 1;
                found = self.alloc_block(kind, size, alloc_size);
            }
        }
        let id = found.ok_or(OutOfMemory { alloc_size })?;
        let split = should_split(kind, self.blocks[id].size, size, &self.conf);
        Ok(self.alloc_found_block(id, size, split))
    }

    /// `get_free_block`: the smallest cached block of at least `size` bytes (lowest address
    /// among equals), unless it is oversize for this request.
    fn get_free_block(&mut self, kind: PoolKind, size: u64) -> Option<BlockId> {
        let gc_on = self.gc_on();
        let pool = &mut self.pools[kind as usize];
        if gc_on {
            pool.get_free_calls += 1;
        }
        let mut iter = pool.free.range((size, 0, 0)..);
        let &(mut found_size, _, mut id) = iter.next()?;
        if self.blocks[id].expandable.is_some() && self.conf.expandable_segments {
            // For best fit, a block at the mapped end of an expandable segment counts as the
            // size it can grow to; skip ahead while the next candidate can grow less.
            let grows_to = |b: BlockId| -> u64 {
                let blk = &self.blocks[b];
                blk.size
                    + blk
                        .next
                        .filter(|&n| !self.blocks[n].mapped)
                        .map_or(0, |n| self.blocks[n].size)
            };
            for &(next_size, _, next) in iter {
                if self.blocks[id].expandable.is_none() || grows_to(next) >= grows_to(id) {
                    break;
                }
                id = next;
                found_size = next_size;
            }
        }
        let max_split = self.conf.max_split();
        // Do not return an oversized block for a small request.
        if size < max_split && found_size >= max_split {
            return None;
        }
        // Allow an oversized block to be rounded up, but only within max_non_split_rounding.
        if size >= max_split
            && size
                .checked_add(self.conf.max_non_split_rounding)
                .is_some_and(|limit| found_size >= limit)
        {
            return None;
        }
        self.remove_free(id);
        Some(id)
    }

    /// `alloc_block`: a new segment of `alloc_size` bytes (or, with expandable segments, more
    /// pages mapped for `size` bytes); `None` when the device has no room.
    fn alloc_block(&mut self, kind: PoolKind, size: u64, alloc_size: u64) -> Option<BlockId> {
        if self.conf.expandable_segments {
            return self.try_allocate_expandable_block(kind, size);
        }
        if !self.fits(alloc_size) {
            return None;
        }
        let addr = self.take_addresses(alloc_size, kind.page());
        self.reserved += alloc_size;
        self.segments += 1;
        Some(self.new_block(Block {
            addr,
            size: alloc_size,
            prev: None,
            next: None,
            allocated: false,
            mapped: true,
            pool: kind,
            expandable: None,
            gc_base: 0,
        }))
    }

    /// `alloc_found_block`: split the found block when `should_split` says so (the rest stays
    /// cached), mark it allocated, and count its whole size as allocated.
    fn alloc_found_block(&mut self, id: BlockId, size: u64, split: bool) -> BlockId {
        let block = if split {
            let rest = self.blocks[id].clone();
            let new = self.new_block(Block {
                addr: rest.addr,
                size,
                prev: rest.prev,
                next: Some(id),
                allocated: false,
                mapped: true,
                pool: rest.pool,
                expandable: rest.expandable,
                gc_base: 0,
            });
            if let Some(p) = rest.prev {
                self.blocks[p].next = Some(new);
            }
            let r = &mut self.blocks[id];
            r.prev = Some(new);
            r.addr += size;
            r.size -= size;
            self.insert_free(id);
            new
        } else {
            id
        };
        self.blocks[block].allocated = true;
        self.allocated += self.blocks[block].size;
        block
    }

    /// `free` + `free_block`: the block goes back to its pool, merged with free neighbours of
    /// its segment.
    pub fn free(&mut self, id: BlockId) {
        let b = &mut self.blocks[id];
        debug_assert!(b.allocated);
        b.allocated = false;
        self.allocated -= b.size;
        for candidate in [self.blocks[id].prev, self.blocks[id].next] {
            self.try_merge(id, candidate);
        }
        self.insert_free(id);
    }

    /// `try_merge_blocks`: absorb the neighbour `src` into `dst` when it is free and in the same
    /// mapped state; returns the bytes absorbed. `dst` must not be in a pool set.
    pub fn try_merge(&mut self, dst: BlockId, src: Option<BlockId>) -> u64 {
        let Some(src) = src else { return 0 };
        let s = self.blocks[src].clone();
        if s.allocated || s.mapped != self.blocks[dst].mapped {
            return 0;
        }
        if s.mapped {
            self.remove_free(src);
        } else {
            self.pools[s.pool as usize].unmapped.remove(&(s.addr, src));
        }
        if self.blocks[dst].prev == Some(src) {
            // [src dst]
            self.blocks[dst].addr = s.addr;
            self.blocks[dst].prev = s.prev;
            if let Some(p) = s.prev {
                self.blocks[p].next = Some(dst);
            }
        } else {
            // [dst src]
            self.blocks[dst].next = s.next;
            if let Some(n) = s.next {
                self.blocks[n].prev = Some(dst);
            }
        }
        self.blocks[dst].size += s.size;
        self.delete_block(src);
        s.size
    }

    /// Sizes of the live blocks and the cached blocks, for tests.
    #[cfg(test)]
    pub fn free_sizes(&self, kind: PoolKind) -> Vec<u64> {
        self.pools[kind as usize]
            .free
            .iter()
            .map(|&(s, _, _)| s)
            .collect()
    }
}
