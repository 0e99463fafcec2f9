//! The caching allocator's size rules, as constants and pure functions.
//!
//! Source: PyTorch 2.11 `c10/cuda/CUDACachingAllocator.cpp` (the constants at the top of
//! `namespace Native`, `DeviceCachingAllocator::round_size`, `roundup_power2_next_division`,
//! `get_allocation_size`, `should_split`, `get_pool`).

use super::conf::AllocConf;

pub const MIB: u64 = 1 << 20;

/// `kMinBlockSize`: all sizes are rounded to at least 512 bytes.
pub const K_MIN_BLOCK_SIZE: u64 = 512;
/// `kSmallSize`: the largest "small" allocation is 1 MiB; larger ones use the large pool.
pub const K_SMALL_SIZE: u64 = MIB;
/// `kSmallBuffer`: small allocations are packed in 2 MiB segments (also the page size of a
/// small expandable segment).
pub const K_SMALL_BUFFER: u64 = 2 * MIB;
/// `kLargeBuffer`: requests between 1 and 10 MiB are packed in 20 MiB segments (also the page
/// size of a large expandable segment).
pub const K_LARGE_BUFFER: u64 = 20 * MIB;
/// `kMinLargeAlloc`: requests from 10 MiB on get a segment of their own size.
pub const K_MIN_LARGE_ALLOC: u64 = 10 * MIB;
/// `kRoundLarge`: such segments are rounded up to 2 MiB.
pub const K_ROUND_LARGE: u64 = 2 * MIB;

/// Which pool a request is served from (`get_pool`: `size <= kSmallSize` is small).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Small = 0,
    Large = 1,
}

impl PoolKind {
    pub fn of(rounded: u64) -> PoolKind {
        if rounded <= K_SMALL_SIZE {
            PoolKind::Small
        } else {
            PoolKind::Large
        }
    }

    /// Page size of this pool's expandable segment (`find_expandable_block`:
    /// `pool->is_small ? kSmallBuffer : kLargeBuffer`).
    pub fn page(self) -> u64 {
        match self {
            PoolKind::Small => K_SMALL_BUFFER,
            PoolKind::Large => K_LARGE_BUFFER,
        }
    }
}

/// `roundup_power2_next_division`: the next of `divisions` equal steps between the power of two
/// below `size` and the one above; powers of two stay as they are.
fn roundup_power2_next_division(size: u64, divisions: u64) -> u64 {
    if size.is_power_of_two() {
        return size;
    }
    let floor = 1u64 << (63 - size.leading_zeros());
    // `power2_floor >> (63 - countLeadingZeros(divisions))` = floor / divisions (a power of two).
    let step = floor >> (63 - divisions.leading_zeros());
    if step == 0 {
        return floor << 1;
    }
    let down = size & !(step - 1);
    if down == size {
        size
    } else {
        down + step
    }
}

/// `round_size`: below 512 bytes → 512; with `roundup_power2_divisions` set for the size's
/// interval (and the size above 512 × divisions) → the next power-of-two division; otherwise
/// up to a multiple of 512.
pub fn round_size(size: u64, conf: &AllocConf) -> u64 {
    if size < K_MIN_BLOCK_SIZE {
        return K_MIN_BLOCK_SIZE;
    }
    let divisions = conf.divisions_for(size);
    if divisions > 1 && size > K_MIN_BLOCK_SIZE * divisions {
        roundup_power2_next_division(size, divisions)
    } else {
        size.div_ceil(K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE
    }
}

// ANCHOR: segment_rules
/// `get_allocation_size`: the segment cudaMalloc'ed when no cached block fits.
pub fn get_allocation_size(rounded: u64) -> u64 {
    if rounded <= K_SMALL_SIZE {
        K_SMALL_BUFFER
    } else if rounded < K_MIN_LARGE_ALLOC {
        K_LARGE_BUFFER
    } else {
        rounded.div_ceil(K_ROUND_LARGE) * K_ROUND_LARGE
    }
}

/// `should_split`: whether the rest of a found block becomes a free block of its own. In the
/// small pool (or with expandable segments) any rest of ≥ 512 bytes is split off; in the large
/// pool only a rest of more than 1 MiB, and never for requests of `max_split_size` or more —
/// otherwise the whole block is handed out and counted as allocated.
pub fn should_split(pool: PoolKind, block_size: u64, rounded: u64, conf: &AllocConf) -> bool {
    let remaining = block_size - rounded;
    if pool == PoolKind::Small || conf.expandable_segments {
        remaining >= K_MIN_BLOCK_SIZE
    } else {
        rounded < conf.max_split() && remaining > K_SMALL_SIZE
    }
}
// ANCHOR_END: segment_rules

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_to_512_bytes() {
        let c = AllocConf::default();
        // 1 byte → kMinBlockSize; 513 → 2 × 512; exact multiples stay.
        assert_eq!(round_size(1, &c), 512);
        assert_eq!(round_size(0, &c), 512);
        assert_eq!(round_size(513, &c), 1024);
        assert_eq!(round_size(4096, &c), 4096);
        // 10 MiB + 1 byte → 10 MiB + 512.
        assert_eq!(round_size(10 * MIB + 1, &c), 10 * MIB + 512);
    }

    #[test]
    fn roundup_power2_divisions_rounds_to_quarter_steps() {
        // The source's own example: 1200 with 4 divisions lies in [1024, 2048), steps of 256:
        // 1024, 1280, … → 1280. But round_size applies it only above 512 × 4 = 2048 bytes, so
        // 1200 stays 512-rounded (1536); 5 MiB + 1 in [4, 8) MiB with steps of 1 MiB → 6 MiB.
        let c: AllocConf = "roundup_power2_divisions:4".parse().unwrap();
        assert_eq!(roundup_power2_next_division(1200, 4), 1280);
        assert_eq!(round_size(1200, &c), 1536);
        assert_eq!(round_size(5 * MIB + 1, &c), 6 * MIB);
        assert_eq!(round_size(8 * MIB, &c), 8 * MIB);
    }

    #[test]
    fn segment_sizes_follow_the_request() {
        // ≤ 1 MiB → a 2 MiB small segment; (1, 10) MiB → 20 MiB; ≥ 10 MiB → rounded up to 2 MiB.
        assert_eq!(get_allocation_size(512), 2 * MIB);
        assert_eq!(get_allocation_size(MIB), 2 * MIB);
        assert_eq!(get_allocation_size(MIB + 512), 20 * MIB);
        assert_eq!(get_allocation_size(10 * MIB - 512), 20 * MIB);
        assert_eq!(get_allocation_size(10 * MIB), 10 * MIB);
        assert_eq!(get_allocation_size(11 * MIB), 12 * MIB);
        assert_eq!(PoolKind::of(MIB), PoolKind::Small);
        assert_eq!(PoolKind::of(MIB + 512), PoolKind::Large);
    }

    #[test]
    fn large_blocks_split_only_above_one_mib_of_rest() {
        let c = AllocConf::default();
        // A 20 MiB block for a 19 MiB request leaves exactly 1 MiB: not > kSmallSize → whole.
        assert!(!should_split(PoolKind::Large, 20 * MIB, 19 * MIB, &c));
        assert!(should_split(PoolKind::Large, 20 * MIB, 19 * MIB - 512, &c));
        // Small pool: any rest of 512 bytes or more.
        assert!(should_split(PoolKind::Small, 2 * MIB, 2 * MIB - 512, &c));
        assert!(!should_split(PoolKind::Small, 1024, 1024, &c));
        // Requests of max_split_size or more are never split.
        let m: AllocConf = "max_split_size_mb:64".parse().unwrap();
        assert!(!should_split(PoolKind::Large, 200 * MIB, 64 * MIB, &m));
        assert!(should_split(PoolKind::Large, 200 * MIB, 63 * MIB, &m));
        // Expandable segments split any rest of 512 bytes.
        let e: AllocConf = "expandable_segments:True".parse().unwrap();
        assert!(should_split(PoolKind::Large, 20 * MIB, 19 * MIB, &e));
    }
}
