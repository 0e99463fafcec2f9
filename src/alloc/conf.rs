//! `PYTORCH_CUDA_ALLOC_CONF` settings, parsed as PyTorch 2.11 parses them.
//!
//! Source: `c10/core/AllocatorConfig.cpp` (PyTorch 2.9–2.11; before that
//! `c10/cuda/CUDAAllocatorConfig.cpp`): `lexArgs` splits on `,` `:` `[` `]` and drops spaces;
//! `parseArgs` walks `key:value` pairs separated by commas. The options that change how much
//! memory is reserved are kept; the ones that only change locking or pinned host memory
//! (`release_lock_on_cudamalloc`, `pinned_*`) are accepted and ignored, as they do not change
//! a single block. `backend:cudaMallocAsync` replaces this allocator altogether, which is not
//! modelled, so it is refused.

use std::str::FromStr;

use serde::Serialize;

use crate::error::Error;

use super::rules::{K_LARGE_BUFFER, MIB};

/// Number of power-of-two size intervals for `roundup_power2_divisions`, from 1 MiB to 64 GiB
/// (`kRoundUpPowerOfTwoIntervals = 16`, `kRoundUpPowerOfTwoStart = 1 MiB` in
/// `AllocatorConfig.cpp`).
pub const ROUNDUP_INTERVALS: usize = 16;

/// The caching allocator's settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AllocConf {
    /// `expandable_segments:True`: one growing segment per pool, mapped page by page.
    pub expandable_segments: bool,
    /// `max_split_size_mb`: blocks this large or larger are never split (bytes; default none,
    /// i.e. `SIZE_MAX` in PyTorch).
    pub max_split_size: Option<u64>,
    /// `max_non_split_rounding_mb`: how much larger than the request an oversize block may be
    /// (bytes; default `kLargeBuffer` = 20 MiB).
    pub max_non_split_rounding: u64,
    /// `garbage_collection_threshold`: fraction of the memory cap above which unused cached
    /// segments are freed before a new one is reserved. PyTorch applies it only under a cap
    /// (`set_per_process_memory_fraction`); the simulation applies it when a capacity is given.
    pub garbage_collection_threshold: Option<f64>,
    /// `roundup_power2_divisions`: divisions per power-of-two interval (index 0 = below 2 MiB,
    /// index i = [2^i MiB, 2^(i+1) MiB), the last one open); 0 or 1 means plain 512-byte rounding.
    pub roundup_power2_divisions: [u64; ROUNDUP_INTERVALS],
}

impl Default for AllocConf {
    /// PyTorch's defaults (`AllocatorConfig::AllocatorConfig`): nothing set.
    fn default() -> Self {
        AllocConf {
            expandable_segments: false,
            max_split_size: None,
            max_non_split_rounding: K_LARGE_BUFFER,
            garbage_collection_threshold: None,
            roundup_power2_divisions: [0; ROUNDUP_INTERVALS],
        }
    }
}

impl AllocConf {
    /// Nothing set (PyTorch's defaults).
    pub fn is_default(&self) -> bool {
        *self == AllocConf::default()
    }

    /// `max_split_size` as PyTorch compares it: `SIZE_MAX` when unset.
    pub fn max_split(&self) -> u64 {
        self.max_split_size.unwrap_or(u64::MAX)
    }

    /// `AllocatorConfig::roundup_power2_divisions(size)`: the interval is log2(size) − 20,
    /// clamped to 0..=15.
    pub fn divisions_for(&self, size: u64) -> u64 {
        let log_size = 63 - u64::from(size.max(1).leading_zeros());
        let index = log_size
            .saturating_sub(20)
            .min(ROUNDUP_INTERVALS as u64 - 1);
        self.roundup_power2_divisions[index as usize]
    }
}

const EXPECTED: &str = "comma-separated key:value pairs such as expandable_segments:True,max_split_size_mb:128 (keys: expandable_segments, max_split_size_mb, max_non_split_rounding_mb, garbage_collection_threshold, roundup_power2_divisions)";

fn bad(value: &str, expected: &'static str) -> Error {
    Error::InvalidValue {
        flag: "--alloc-conf",
        value: value.to_string(),
        expected,
    }
}

/// `lexArgs`: separators are tokens of their own; spaces vanish.
fn lex(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut buf = String::new();
    for c in text.chars() {
        if matches!(c, ',' | ':' | '[' | ']') {
            if !buf.is_empty() {
                tokens.push(std::mem::take(&mut buf));
            }
            tokens.push(c.to_string());
        } else if c != ' ' {
            buf.push(c);
        }
    }
    if !buf.is_empty() {
        tokens.push(buf);
    }
    tokens
}

/// A cursor over the tokens, so each parse step reads like `parseArgs`.
struct Tokens<'a> {
    tokens: &'a [String],
    at: usize,
    text: &'a str,
}

impl<'a> Tokens<'a> {
    fn next(&mut self) -> Option<&'a str> {
        let t = self.tokens.get(self.at).map(String::as_str);
        self.at += 1;
        t
    }

    fn peek(&self) -> Option<&'a str> {
        self.tokens.get(self.at).map(String::as_str)
    }

    /// `consumeToken`.
    fn expect(&mut self, sep: &str) -> Result<(), Error> {
        match self.next() {
            Some(t) if t == sep => Ok(()),
            _ => Err(bad(self.text, EXPECTED)),
        }
    }

    fn value(&mut self, expected: &'static str) -> Result<&'a str, Error> {
        self.expect(":")?;
        match self.next() {
            Some(v) if !matches!(v, "," | ":" | "[" | "]") => Ok(v),
            _ => Err(bad(self.text, expected)),
        }
    }
}

fn parse_bool(v: &str, expected: &'static str) -> Result<bool, Error> {
    // PyTorch accepts exactly "True" or "False".
    match v {
        "True" => Ok(true),
        "False" => Ok(false),
        _ => Err(bad(v, expected)),
    }
}

/// `parseMaxSplitSize` / `parseMaxNonSplitRoundingSize`: whole MiB, at least kLargeBuffer/MiB = 20.
fn parse_mb(v: &str, expected: &'static str) -> Result<u64, Error> {
    let mb: u64 = v.parse().map_err(|_| bad(v, expected))?;
    if mb < K_LARGE_BUFFER / MIB {
        return Err(bad(v, expected));
    }
    // PyTorch clamps to SIZE_MAX / MiB.
    Ok(mb.min(u64::MAX / MIB) * MIB)
}

fn parse_divisions(v: &str) -> Result<u64, Error> {
    const E: &str = "a power of two (or 0) for roundup_power2_divisions, e.g. roundup_power2_divisions:4 or roundup_power2_divisions:[256:1,512:2,>:8]";
    let d: u64 = v.parse().map_err(|_| bad(v, E))?;
    if d != 0 && !d.is_power_of_two() {
        return Err(bad(v, E));
    }
    Ok(d)
}

/// `parseRoundUpPower2Divisions`: either one number for every interval, or a list
/// `[size_mb:divisions,…,>:divisions]` where sizes are powers of two in MiB; the first entry
/// also fills the intervals below it, `>` fills the rest.
fn parse_roundup(t: &mut Tokens, conf: &mut AllocConf) -> Result<(), Error> {
    const E: &str = "roundup_power2_divisions:N or roundup_power2_divisions:[256:1,512:2,>:8] (sizes in MiB, powers of two)";
    t.expect(":")?;
    let first = t.next().ok_or_else(|| bad(t.text, E))?;
    let table = &mut conf.roundup_power2_divisions;
    if first != "[" {
        let d = parse_divisions(first)?;
        if d == 0 {
            return Err(bad(first, E));
        }
        *table = [d; ROUNDUP_INTERVALS];
        return Ok(());
    }
    let mut first_value = true;
    let mut last_index = 0usize;
    loop {
        let key = t.next().ok_or_else(|| bad(t.text, E))?;
        if key == "]" {
            return Ok(());
        }
        t.expect(":")?;
        let d = parse_divisions(t.next().ok_or_else(|| bad(t.text, E))?)?;
        if key == ">" {
            for slot in table.iter_mut().skip(last_index) {
                *slot = d;
            }
        } else {
            let mb: u64 = key.parse().map_err(|_| bad(key, E))?;
            if !mb.is_power_of_two() {
                return Err(bad(key, E));
            }
            let index = (63 - mb.leading_zeros() as usize).min(ROUNDUP_INTERVALS - 1);
            if first_value {
                for slot in table.iter_mut().take(index) {
                    *slot = d;
                }
                first_value = false;
            }
            table[index] = d;
            last_index = index;
        }
        match t.next() {
            Some(",") => {}
            Some("]") => return Ok(()),
            _ => return Err(bad(t.text, E)),
        }
    }
}

impl FromStr for AllocConf {
    type Err = Error;

    /// Parses `PYTORCH_CUDA_ALLOC_CONF` syntax, e.g. `expandable_segments:True,max_split_size_mb:128`.
    fn from_str(text: &str) -> Result<Self, Error> {
        let tokens = lex(text);
        let mut t = Tokens {
            tokens: &tokens,
            at: 0,
            text,
        };
        let mut conf = AllocConf::default();
        while let Some(key) = t.next() {
            match key {
                "expandable_segments" => {
                    const E: &str = "expandable_segments:True or expandable_segments:False";
                    conf.expandable_segments = parse_bool(t.value(E)?, E)?;
                }
                "max_split_size_mb" => {
                    const E: &str = "max_split_size_mb:N with N ≥ 20 (MiB)";
                    conf.max_split_size = Some(parse_mb(t.value(E)?, E)?);
                }
                "max_non_split_rounding_mb" => {
                    const E: &str = "max_non_split_rounding_mb:N with N ≥ 20 (MiB)";
                    conf.max_non_split_rounding = parse_mb(t.value(E)?, E)?;
                }
                "garbage_collection_threshold" => {
                    const E: &str = "garbage_collection_threshold:X with 0 < X < 1";
                    let v = t.value(E)?;
                    let x: f64 = v.parse().map_err(|_| bad(v, E))?;
                    if !(x > 0.0 && x < 1.0) {
                        return Err(bad(v, E));
                    }
                    conf.garbage_collection_threshold = Some(x);
                }
                "roundup_power2_divisions" => parse_roundup(&mut t, &mut conf)?,
                "backend" => {
                    const E: &str = "backend:native (backend:cudaMallocAsync is a different allocator, not modelled)";
                    let v = t.value(E)?;
                    if v != "native" {
                        return Err(bad(v, E));
                    }
                }
                // Locking and pinned host memory: no effect on device blocks.
                "release_lock_on_cudamalloc"
                | "pinned_use_cuda_host_register"
                | "pinned_use_background_threads" => {
                    const E: &str = "True or False";
                    parse_bool(t.value(E)?, E)?;
                }
                "pinned_num_register_threads" => {
                    const E: &str = "a power of two";
                    let v = t.value(E)?;
                    let n: u64 = v.parse().map_err(|_| bad(v, E))?;
                    if !n.is_power_of_two() {
                        return Err(bad(v, E));
                    }
                }
                other => return Err(bad(other, EXPECTED)),
            }
            if t.peek().is_some() {
                t.expect(",")?;
            }
        }
        Ok(conf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_the_default() {
        assert_eq!("".parse::<AllocConf>().unwrap(), AllocConf::default());
    }

    #[test]
    fn the_documented_example_parses() {
        let c: AllocConf = "expandable_segments:True, max_split_size_mb:128"
            .parse()
            .unwrap();
        assert!(c.expandable_segments);
        assert_eq!(c.max_split_size, Some(128 << 20));
        assert_eq!(c.max_non_split_rounding, 20 << 20);
        let c: AllocConf = "garbage_collection_threshold:0.6,max_non_split_rounding_mb:64"
            .parse()
            .unwrap();
        assert_eq!(c.garbage_collection_threshold, Some(0.6));
        assert_eq!(c.max_non_split_rounding, 64 << 20);
    }

    #[test]
    fn roundup_table_fills_like_pytorch() {
        // [256:1,512:2,>:8]: 256 MiB is interval log2(256) = 8; the first entry also fills 0..8,
        // 512 → index 9, '>' fills from the last index (9) on.
        let c: AllocConf = "roundup_power2_divisions:[256:1,512:2,>:8]"
            .parse()
            .unwrap();
        let mut want = [1; ROUNDUP_INTERVALS];
        want[9..].fill(8);
        assert_eq!(c.roundup_power2_divisions, want);
        let c: AllocConf = "roundup_power2_divisions:4".parse().unwrap();
        assert_eq!(c.roundup_power2_divisions, [4; ROUNDUP_INTERVALS]);
        // A 300 MiB request: log2 = 28 → interval 8.
        assert_eq!(c.divisions_for(300 << 20), 4);
    }

    #[test]
    fn errors_are_one_line_and_name_the_flag() {
        for bad in [
            "expandable_segments:true",
            "max_split_size_mb:10",
            "max_split_size_mb:x",
            "garbage_collection_threshold:1.5",
            "roundup_power2_divisions:3",
            "backend:cudaMallocAsync",
            "colour:blue",
            "expandable_segments",
            "expandable_segments:True max_split_size_mb:128",
        ] {
            let e = bad.parse::<AllocConf>().unwrap_err().to_string();
            assert!(
                e.contains("--alloc-conf") && !e.contains('\n'),
                "{bad}: {e}"
            );
        }
    }
}
