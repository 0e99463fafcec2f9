//! Lists and ranges of sequence lengths and batch sizes, as `--seq` and `--batch` take them in
//! `memplan chart`:
//!
//! - `2048` or `1,2,4,8`: the values given;
//! - `512..16384`: doubling from the start, with the end itself as the last point;
//! - `512..16384:512`: every 512th value from the start, and the end;
//! - `512..65536*4`: multiplying by 4 from the start, and the end.
//!
//! Items combine with commas; the result is sorted, without repeats. A range whose start is
//! above its end is an error, and so is one of more than [`MAX_POINTS`] points: a chart of more
//! points draws nothing a reader can see and costs seconds of estimates.

use crate::error::Error;

/// The most values one flag may expand to.
pub const MAX_POINTS: usize = 10_000;

/// The largest batch size or sequence length a chart takes (2^32): far beyond any real run,
/// and small enough that every product the estimator forms (batch × seq² × heads × bytes for
/// eager attention) stays inside `u128`.
pub const MAX_VALUE: u128 = 1 << 32;

/// Rejects a value above [`MAX_VALUE`].
pub fn check_value(flag: &'static str, value: u128) -> Result<u128, Error> {
    if value > MAX_VALUE {
        Err(Error::Unsupported(format!(
            "{flag} {value} is beyond the largest value charts take ({MAX_VALUE})"
        )))
    } else {
        Ok(value)
    }
}

/// Parses `text` (the value of `flag`) into sorted, distinct positive integers.
pub fn parse_values(flag: &'static str, text: &str) -> Result<Vec<u128>, Error> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(invalid(flag, text));
        }
        match item.split_once("..") {
            None => out.push(number(flag, text, item)?),
            Some((start, rest)) => {
                let start = number(flag, text, start)?;
                let (end, step) = if let Some((end, step)) = rest.split_once(':') {
                    (end, Step::Add(number(flag, text, step)?))
                } else if let Some((end, factor)) = rest.split_once('*') {
                    (end, Step::Multiply(number(flag, text, factor)?))
                } else {
                    (rest, Step::Multiply(2))
                };
                let end = number(flag, text, end)?;
                expand(flag, item, start, end, step, &mut out)?;
            }
        }
        if out.len() > MAX_POINTS {
            return Err(too_many(flag, text, out.len() as u128));
        }
    }
    out.sort_unstable();
    out.dedup();
    if let Some(&last) = out.last() {
        check_value(flag, last)?;
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Add(u128),
    Multiply(u128),
}

fn expand(
    flag: &'static str,
    item: &str,
    start: u128,
    end: u128,
    step: Step,
    out: &mut Vec<u128>,
) -> Result<(), Error> {
    if start > end {
        return Err(Error::Unsupported(format!(
            "{flag} {item} is empty: the range starts above its end (write {end}..{start})"
        )));
    }
    // Count before expanding, so an absurd range allocates nothing.
    let count = match step {
        Step::Add(s) => (end - start) / s + 1 + u128::from((end - start) % s != 0),
        Step::Multiply(f) if f < 2 => {
            return Err(Error::Unsupported(format!(
                "{flag} {item}: the factor after '*' must be at least 2"
            )))
        }
        Step::Multiply(f) => {
            let mut n = 1;
            let mut v = start;
            while let Some(next) = v.checked_mul(f).filter(|&n| n < end) {
                v = next;
                n += 1;
            }
            n + u128::from(start != end)
        }
    };
    if count > MAX_POINTS as u128 {
        return Err(too_many(flag, item, count));
    }
    let mut v = start;
    while v < end {
        out.push(v);
        v = match step {
            Step::Add(s) => v + s,
            Step::Multiply(f) => v.saturating_mul(f),
        };
    }
    out.push(end);
    Ok(())
}

fn number(flag: &'static str, whole: &str, s: &str) -> Result<u128, Error> {
    match s.trim().replace('_', "").parse::<u128>() {
        Ok(0) | Err(_) => Err(invalid(flag, whole)),
        Ok(v) => Ok(v),
    }
}

fn invalid(flag: &'static str, value: &str) -> Error {
    Error::InvalidValue {
        flag,
        value: value.to_string(),
        expected: "positive integers: a list (1,2,4), a doubling range (512..16384), a stepped range (512..16384:512) or a geometric one (512..65536*4)",
    }
}

fn too_many(flag: &'static str, item: &str, count: u128) -> Error {
    Error::Unsupported(format!(
        "{flag} {item} gives {count} points, more than {MAX_POINTS}: take a larger step (A..B:STEP) or a doubling range (A..B)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_ranges_expand_as_documented() {
        assert_eq!(
            parse_values("--batch", "8,1, 2,4,2").unwrap(),
            vec![1, 2, 4, 8]
        );
        assert_eq!(
            parse_values("--seq", "512..4096").unwrap(),
            vec![512, 1024, 2048, 4096]
        );
        assert_eq!(
            parse_values("--seq", "500..2000").unwrap(),
            vec![500, 1000, 2000]
        );
        assert_eq!(
            parse_values("--seq", "500..1500").unwrap(),
            vec![500, 1000, 1500]
        );
        assert_eq!(
            parse_values("--seq", "100..350:100").unwrap(),
            vec![100, 200, 300, 350]
        );
        assert_eq!(
            parse_values("--seq", "1..64*4").unwrap(),
            vec![1, 4, 16, 64]
        );
        assert_eq!(parse_values("--seq", "7..7").unwrap(), vec![7]);
        assert_eq!(parse_values("--seq", "1..10000:1").unwrap().len(), 10_000);
    }

    #[test]
    fn bad_ranges_are_one_clear_error() {
        let e = parse_values("--seq", "4096..512").unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("512..4096"), "{e}");
        let e = parse_values("--seq", "1..10001:1").unwrap_err().to_string();
        assert!(e.contains("10001 points"), "{e}");
        let e = parse_values("--seq", "1..340282366920938463463374607431768211455:1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 10000"), "{e}");
        let e = parse_values("--seq", "1..8589934592")
            .unwrap_err()
            .to_string();
        assert!(e.contains("beyond"), "{e}");
        assert_eq!(parse_values("--seq", "4294967296").unwrap(), vec![1 << 32]);
        for bad in ["", "0", "a", "1..", "1..8:0", "1..8*1", "1,,2", "-4"] {
            assert!(parse_values("--batch", bad).is_err(), "{bad:?}");
        }
    }
}
