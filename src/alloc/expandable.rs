//! `expandable_segments:True`: one segment per pool whose address range is reserved once and
//! backed by physical pages as it grows — 2 MiB pages for the small pool, 20 MiB for the large
//! one — so reserved memory is the live blocks rounded up to pages, not a set of fixed-size
//! segments with unusable slivers.
//!
//! Source: PyTorch 2.11 `c10/cuda/CUDACachingAllocator.cpp`: Note [Expandable Segments],
//! `ExpandableSegment::map` / `unmap` (whole pages: `segmentLeft` / `segmentRight`),
//! `DeviceCachingAllocator::find_expandable_block`, `map_block`,
//! `try_allocate_expandable_block`, `unmap_block`, `release_expandable_segment`. The address
//! space is 1⅛ × the device memory (`prop.totalGlobalMem + prop.totalGlobalMem / 8`).

use super::rules::PoolKind;
use super::state::{Allocator, Block, BlockId, ExpandableSegment};

/// Address space of a segment when no capacity is given: 256 TiB, what the note says CUDA has.
const UNBOUNDED_ADDRESS_SPACE: u64 = 1 << 48;

impl Allocator {
    /// `try_allocate_expandable_block`: map pages until a run of free address space of `size`
    /// bytes is backed, and take it out of the pool.
    pub(super) fn try_allocate_expandable_block(
        &mut self,
        kind: PoolKind,
        size: u64,
    ) -> Option<BlockId> {
        let mut candidate = self.find_expandable_block(kind, size);
        if !self.blocks[candidate].mapped {
            let want = self.blocks[candidate].size.min(size);
            // A merge keeps the absorbing block's id, so `candidate` stays valid.
            if !self.map_block(candidate, want) {
                return None;
            }
        }
        while self.blocks[candidate].size < size {
            // Invariant: free -> unmapped -> …; map part of the unmapped next block, which
            // merges with the free block before it.
            let remaining = size - self.blocks[candidate].size;
            let next = self.blocks[candidate].next?;
            let want = remaining.min(self.blocks[next].size);
            if !self.map_block(next, want) {
                return None;
            }
            candidate = next;
        }
        self.remove_free(candidate);
        Some(candidate)
    }

    /// `find_expandable_block`: the lowest-addressed unmapped range (with the free block just
    /// before it) that offers `size` bytes of free address space; a new segment if none does.
    fn find_expandable_block(&mut self, kind: PoolKind, size: u64) -> BlockId {
        let allocatable = |a: &Allocator, b: Option<BlockId>| b.filter(|&b| !a.blocks[b].allocated);
        let unmapped: Vec<BlockId> = self.pools[kind as usize]
            .unmapped
            .iter()
            .map(|&(_, id)| id)
            .collect();
        for c in unmapped {
            let start = allocatable(self, self.blocks[c].prev).unwrap_or(c);
            let mut bytes = 0u64;
            let mut b = Some(start);
            while bytes < size {
                match allocatable(self, b) {
                    Some(id) => {
                        bytes += self.blocks[id].size;
                        b = self.blocks[id].next;
                    }
                    None => break,
                }
            }
            if bytes >= size {
                return start;
            }
        }
        let page = kind.page();
        let space = self
            .capacity
            .map_or(UNBOUNDED_ADDRESS_SPACE, |c| c + c / 8)
            .div_ceil(page)
            * page;
        let base = self.take_addresses(space, page);
        self.expandable.push(Some(ExpandableSegment {
            base,
            page,
            len: space,
        }));
        self.segments += 1;
        let id = self.new_block(Block {
            addr: base,
            size: space,
            prev: None,
            next: None,
            allocated: false,
            mapped: false,
            pool: kind,
            expandable: Some(self.expandable.len() - 1),
            gc_base: 0,
        });
        self.pools[kind as usize].unmapped.insert((base, id));
        id
    }

    fn segment(&self, id: BlockId) -> &ExpandableSegment {
        let seg = self.blocks[id]
            .expandable
            .expect("block of an expandable segment");
        self.expandable[seg]
            .as_ref()
            .expect("live expandable segment")
    }

    /// `map_block`: back the first `size` bytes of the unmapped block `to_map` with whole pages
    /// (`ExpandableSegment::map` rounds the end up to a page); false when the device is full.
    fn map_block(&mut self, to_map: BlockId, size: u64) -> bool {
        let seg = self.segment(to_map);
        let (base, page) = (seg.base, seg.page);
        let b = self.blocks[to_map].clone();
        debug_assert!(!b.mapped && size <= b.size && (b.addr - base) % page == 0);
        let mapped = (b.addr + size - base).div_ceil(page) * page - (b.addr - base);
        // `cuMemCreate` fails page by page when physical memory runs out; the pages already
        // created for this call are released, so the call maps all or nothing.
        if mapped == 0 || !self.fits(mapped) {
            return false;
        }
        self.pools[b.pool as usize]
            .unmapped
            .remove(&(b.addr, to_map));
        self.blocks[to_map].mapped = true;
        if mapped < b.size {
            let rest = self.new_block(Block {
                addr: b.addr + mapped,
                size: b.size - mapped,
                prev: Some(to_map),
                next: b.next,
                allocated: false,
                mapped: false,
                pool: b.pool,
                expandable: b.expandable,
                gc_base: 0,
            });
            if let Some(n) = b.next {
                self.blocks[n].prev = Some(rest);
            }
            self.blocks[to_map].next = Some(rest);
            self.blocks[to_map].size = mapped;
            self.pools[b.pool as usize]
                .unmapped
                .insert((b.addr + mapped, rest));
        }
        let (prev, next) = (self.blocks[to_map].prev, self.blocks[to_map].next);
        self.try_merge(to_map, prev);
        self.try_merge(to_map, next);
        self.insert_free(to_map);
        self.reserved += mapped;
        true
    }

    /// `unmap_block`: give back the whole pages inside a free block; the partial pages at
    /// either end stay mapped as free blocks of their own.
    pub(super) fn unmap_block(&mut self, id: BlockId) {
        let seg = self.segment(id);
        let (base, page) = (seg.base, seg.page);
        let b = self.blocks[id].clone();
        let begin = (b.addr - base).div_ceil(page) * page + base;
        let end = (b.addr + b.size - base) / page * page + base;
        if begin >= end {
            return;
        }
        self.remove_free(id);
        let before = begin - b.addr;
        if before > 0 {
            let free = self.new_block(Block {
                addr: b.addr,
                size: before,
                prev: b.prev,
                next: Some(id),
                allocated: false,
                mapped: true,
                pool: b.pool,
                expandable: b.expandable,
                gc_base: 0,
            });
            if let Some(p) = b.prev {
                self.blocks[p].next = Some(free);
            }
            self.blocks[id].prev = Some(free);
            self.insert_free(free);
        }
        let after = b.addr + b.size - end;
        if after > 0 {
            let free = self.new_block(Block {
                addr: end,
                size: after,
                prev: Some(id),
                next: b.next,
                allocated: false,
                mapped: true,
                pool: b.pool,
                expandable: b.expandable,
                gc_base: 0,
            });
            if let Some(n) = b.next {
                self.blocks[n].prev = Some(free);
            }
            self.blocks[id].next = Some(free);
            self.insert_free(free);
        }
        let blk = &mut self.blocks[id];
        blk.addr = begin;
        blk.size = end - begin;
        blk.mapped = false;
        let (prev, next) = (blk.prev, blk.next);
        self.try_merge(id, prev);
        self.try_merge(id, next);
        let blk = &self.blocks[id];
        self.pools[blk.pool as usize]
            .unmapped
            .insert((blk.addr, id));
        self.reserved -= end - begin;
    }

    /// `release_expandable_segment`: a segment left entirely unmapped gives back its addresses.
    pub(super) fn release_expandable_segment(&mut self, id: BlockId) {
        let b = self.blocks[id].clone();
        debug_assert!(!b.mapped && !b.is_split());
        self.pools[b.pool as usize].unmapped.remove(&(b.addr, id));
        if let Some(seg) = b.expandable {
            debug_assert_eq!(self.expandable[seg].as_ref().map(|s| s.len), Some(b.size));
            self.expandable[seg] = None;
        }
        self.segments -= 1;
        self.delete_block(id);
    }
}

#[cfg(test)]
mod tests {
    use crate::alloc::conf::AllocConf;
    use crate::alloc::rules::{PoolKind, MIB};
    use crate::alloc::state::Allocator;

    fn expandable(capacity: Option<u64>) -> Allocator {
        Allocator::new(
            "expandable_segments:True".parse::<AllocConf>().unwrap(),
            capacity,
        )
    }

    #[test]
    fn large_pool_maps_20_mib_pages_and_packs_blocks() {
        let mut a = expandable(None);
        // 30 MiB → pages of 20 MiB: 2 pages = 40 MiB mapped; the 10 MiB rest is split off
        // (expandable segments split any rest ≥ 512 B).
        let x = a.malloc(30 * MIB).unwrap();
        assert_eq!((a.reserved, a.allocated), (40 * MIB, 30 * MIB));
        // 10 MiB fits the mapped rest: nothing new mapped.
        let y = a.malloc(10 * MIB).unwrap();
        assert_eq!((a.reserved, a.allocated), (40 * MIB, 40 * MIB));
        // 5 MiB more: one more page (60 MiB), in the same segment.
        let _z = a.malloc(5 * MIB).unwrap();
        assert_eq!(a.reserved, 60 * MIB);
        assert_eq!(a.segments, 1);
        // Freeing x and y leaves a 40 MiB free block at the start; a 35 MiB request is served
        // from it, not by mapping more.
        a.free(x);
        a.free(y);
        let _w = a.malloc(35 * MIB).unwrap();
        assert_eq!(a.reserved, 60 * MIB);
    }

    #[test]
    fn small_pool_maps_2_mib_pages() {
        let mut a = expandable(None);
        // 600 KiB + 600 KiB + 900 KiB: the first page (2 MiB) holds the first two (1200 KiB);
        // the third needs 900 KiB more than the 848 KiB left → a second page: 4 MiB.
        let kib = 1024;
        a.malloc(600 * kib).unwrap();
        a.malloc(600 * kib).unwrap();
        assert_eq!(a.reserved, 2 * MIB);
        a.malloc(900 * kib).unwrap();
        assert_eq!(a.reserved, 4 * MIB);
        // The free tail of page 1 merged with page 2's mapping: one block serves the request
        // across the page boundary, so allocated = 2100 KiB.
        assert_eq!(a.allocated, 2100 * kib);
    }

    #[test]
    fn empty_cache_unmaps_whole_free_pages_only() {
        let mut a = expandable(None);
        let x = a.malloc(50 * MIB).unwrap(); // 3 pages: 60 MiB mapped
        let y = a.malloc(5 * MIB).unwrap(); // fits the 10 MiB tail
        assert_eq!(a.reserved, 60 * MIB);
        a.free(x);
        // x spans [0, 50) MiB: pages [0, 20) and [20, 40) are whole and free; [40, 60) holds y.
        a.release_cached_blocks();
        assert_eq!(a.reserved, 20 * MIB);
        a.free(y);
        a.release_cached_blocks();
        assert_eq!((a.reserved, a.segments), (0, 0));
        assert!(a.pools[PoolKind::Large as usize].unmapped.is_empty());
    }

    #[test]
    fn out_of_pages_fails_then_unmapping_frees_room() {
        // Capacity 100 MiB: 60 MiB + 20 MiB mapped; a 30 MiB request needs 40 MiB more.
        let mut a = expandable(Some(100 * MIB));
        let x = a.malloc(60 * MIB).unwrap();
        let _y = a.malloc(20 * MIB).unwrap();
        assert_eq!(a.reserved, 80 * MIB);
        assert!(a.malloc(30 * MIB).is_err());
        // Free x: the 60 MiB block is reused in place, no mapping needed.
        a.free(x);
        a.malloc(30 * MIB).unwrap();
        assert_eq!(a.reserved, 80 * MIB);
    }
}
