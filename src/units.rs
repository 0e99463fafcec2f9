//! Byte quantities and their display/parsing.
//!
//! Bytes are integers end to end (`u128`, so a 1T-parameter model at a million tokens cannot
//! overflow); GiB/GB exist only for display and for parsing user input such as `24GB`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;

pub const KIB: u128 = 1 << 10;
pub const MIB: u128 = 1 << 20;
pub const GIB: u128 = 1 << 30;

/// A number of bytes.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Bytes(pub u128);

impl Bytes {
    pub const ZERO: Bytes = Bytes(0);

    pub fn gib(self) -> f64 {
        self.0 as f64 / GIB as f64
    }

    pub fn saturating_sub(self, other: Bytes) -> Bytes {
        Bytes(self.0.saturating_sub(other.0))
    }
}

impl std::ops::Add for Bytes {
    type Output = Bytes;
    fn add(self, rhs: Bytes) -> Bytes {
        Bytes(self.0 + rhs.0)
    }
}

impl std::ops::AddAssign for Bytes {
    fn add_assign(&mut self, rhs: Bytes) {
        self.0 += rhs.0;
    }
}

impl std::iter::Sum for Bytes {
    fn sum<I: Iterator<Item = Bytes>>(iter: I) -> Bytes {
        Bytes(iter.map(|b| b.0).sum())
    }
}

/// Displays in binary units with two decimals: `1.50 GiB`, `512.00 MiB`.
impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0 as f64;
        let (unit, div) = if self.0 >= 1 << 40 {
            ("TiB", (1u128 << 40) as f64)
        } else if self.0 >= GIB {
            ("GiB", GIB as f64)
        } else if self.0 >= MIB {
            ("MiB", MIB as f64)
        } else if self.0 >= KIB {
            ("KiB", KIB as f64)
        } else {
            return write!(f, "{} B", self.0);
        };
        write!(f, "{:.2} {unit}", v / div)
    }
}

/// Parses a memory size: `24GB`, `24 GiB`, `80G`, `512MiB`, `1.5TB`, or a plain byte count.
///
/// `GB`/`G` are read as GiB-sized marketing units are not: GPU vendors quote `80GB` for 80 GiB-ish
/// cards inconsistently, so `GB` and `GiB` are both taken as 2^30 here — the convention of
/// `nvidia-smi` and of every GPU preset in `presets/gpus.toml`. `1e9`-based units: write `bytes`.
pub fn parse_size(text: &str) -> Result<Bytes, Error> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| Error::InvalidSize(text.to_string()))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" | "bytes" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(Error::InvalidSize(text.to_string())),
    };
    if !value.is_finite() || value <= 0.0 {
        return Err(Error::InvalidSize(text.to_string()));
    }
    Ok(Bytes((value * mult as f64).round() as u128))
}

/// Parses a count with an optional SI suffix: `1.5B`, `70B`, `50M`, `2048`, `16k`.
pub fn parse_count(text: &str) -> Option<f64> {
    let t = text.trim();
    let (num, mult) = match t.chars().last()?.to_ascii_uppercase() {
        'K' => (&t[..t.len() - 1], 1e3),
        'M' => (&t[..t.len() - 1], 1e6),
        'B' | 'G' => (&t[..t.len() - 1], 1e9),
        'T' => (&t[..t.len() - 1], 1e12),
        _ => (t, 1.0),
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v > 0.0).then_some(v * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_picks_binary_units() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(3 * MIB / 2).to_string(), "1.50 MiB");
        assert_eq!(Bytes(80 * GIB).to_string(), "80.00 GiB");
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("24GB").unwrap(), Bytes(24 * GIB));
        assert_eq!(parse_size("24 GiB").unwrap(), Bytes(24 * GIB));
        assert_eq!(parse_size("512MiB").unwrap(), Bytes(512 * MIB));
        assert_eq!(parse_size("1.5G").unwrap(), Bytes(3 * GIB / 2));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0GB").is_err());
        assert!(parse_size("24XB").is_err());
    }

    #[test]
    fn counts_parse_with_suffixes() {
        assert_eq!(parse_count("70B"), Some(70e9));
        assert_eq!(parse_count("1.5B"), Some(1.5e9));
        assert_eq!(parse_count("16k"), Some(16e3));
        assert_eq!(parse_count("2048"), Some(2048.0));
        assert_eq!(parse_count("-1"), None);
        assert_eq!(parse_count("x"), None);
    }
}
