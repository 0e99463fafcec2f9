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

/// Whether a size was written in decimal (GB = 10^9 B, as vendors label boards) or binary
/// (GiB = 2^30 B, as nvidia-smi and PyTorch report) units; it is displayed in the same kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SizeUnit {
    Decimal,
    #[default]
    Binary,
}

impl Bytes {
    /// `24.00 GB` (decimal) or `22.35 GiB` (binary), two decimals.
    pub fn display_in(self, unit: SizeUnit) -> String {
        match unit {
            SizeUnit::Decimal => format!("{:.2} GB", self.0 as f64 / 1e9),
            SizeUnit::Binary => format!("{:.2} GiB", self.gib()),
        }
    }
}

/// Smallest and largest GPU memory `--gpu SIZE` accepts: 256 MiB (below any GPU that trains) to
/// 64 TiB (over a hundred times the largest board, a 288 GB MI355X).
pub const GPU_SIZE_MIN: u128 = 256 * MIB;
pub const GPU_SIZE_MAX: u128 = 64 << 40;

/// Parses a GPU memory size, which must carry its unit: `24GB`, `24 GB` (10^9 B), `80GiB`,
/// `512MiB` (2^20 B), `1.5TB`, `2TiB`. A bare number (`24`) or bytes (`24B`, which `--model`
/// reads as 24 billion parameters) is refused with a suggestion.
pub fn parse_size(text: &str) -> Result<(Bytes, SizeUnit), Error> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let invalid = || Error::InvalidSize(text.to_string());
    let value: f64 = num.parse().map_err(|_| invalid())?;
    let (mult, kind) = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" | "bytes" => {
            return Err(Error::InvalidValue {
                flag: "--gpu",
                value: text.to_string(),
                expected: "a size with its unit, such as 24GB (10^9 bytes) or 24GiB (2^30 bytes)",
            })
        }
        "mb" => (1e6, SizeUnit::Decimal),
        "gb" | "g" => (1e9, SizeUnit::Decimal),
        "tb" | "t" => (1e12, SizeUnit::Decimal),
        "mib" => (MIB as f64, SizeUnit::Binary),
        "gib" => (GIB as f64, SizeUnit::Binary),
        "tib" => ((1u128 << 40) as f64, SizeUnit::Binary),
        _ => return Err(invalid()),
    };
    let bytes = value * mult;
    if !(bytes.is_finite() && bytes >= GPU_SIZE_MIN as f64 && bytes <= GPU_SIZE_MAX as f64) {
        return Err(Error::InvalidValue {
            flag: "--gpu",
            value: text.to_string(),
            expected: "a GPU memory between 256MiB and 64TiB",
        });
    }
    Ok((Bytes(bytes.round() as u128), kind))
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
    fn sizes_parse_in_the_units_written() {
        let d = SizeUnit::Decimal;
        let b = SizeUnit::Binary;
        assert_eq!(parse_size("24GB").unwrap(), (Bytes(24_000_000_000), d));
        assert_eq!(parse_size("24 GiB").unwrap(), (Bytes(24 * GIB), b));
        assert_eq!(parse_size("512MiB").unwrap(), (Bytes(512 * MIB), b));
        assert_eq!(parse_size("1.5TB").unwrap(), (Bytes(1_500_000_000_000), d));
        assert_eq!(Bytes(24_000_000_000).display_in(d), "24.00 GB");
        assert_eq!(Bytes(24_000_000_000).display_in(b), "22.35 GiB");
        for bad in [
            "lots", "0GB", "24XB", "24", "24B", "1e30GB", "100MB", "65TiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("24").unwrap_err().to_string().contains("24GB"));
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
