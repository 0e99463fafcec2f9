//! The library's errors. Each message says which flag or field to fix.

use std::path::PathBuf;

/// Everything that can go wrong between user input and an estimate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown model '{name}'{suggestion}; `memplan models` lists the presets, or pass a size like 7B or a path to a Hugging Face config.json")]
    UnknownModel { name: String, suggestion: String },

    #[error("unknown GPU '{name}'{suggestion}; `memplan gpus` lists the presets, or pass a size like 24GB")]
    UnknownGpu { name: String, suggestion: String },

    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// The reason is part of the message, not a `source`, so `{:#}` does not print it twice.
    #[error("cannot write {path}: {reason}")]
    Write {
        path: PathBuf,
        reason: std::io::Error,
    },

    #[error("{path} {problem}")]
    InputFile { path: PathBuf, problem: String },

    #[error("{path}: not a valid config.json: {message}")]
    BadConfig { path: PathBuf, message: String },

    #[error("{path}: field `{field}` {problem}")]
    ConfigField {
        path: PathBuf,
        field: String,
        problem: String,
    },

    #[error("invalid {flag} '{value}': expected {expected}")]
    InvalidValue {
        flag: &'static str,
        value: String,
        expected: &'static str,
    },

    #[error("invalid size '{0}': expected a positive amount such as 24GB, 80GiB or 512MiB")]
    InvalidSize(String),

    #[error("{0}")]
    Unsupported(String),

    /// A `--from` file that is not a training config memplan reads.
    #[error("{path}: {problem}")]
    JobFileFormat { path: PathBuf, problem: String },

    /// A training-framework job file (`--from`) with a key memplan cannot use.
    #[error("{path}: `{key}` {problem}")]
    JobFile {
        path: PathBuf,
        key: String,
        problem: String,
    },

    #[error("invalid preset file {path}: {message}")]
    Preset { path: String, message: String },

    #[error("{path}: not a valid calibration file: {message}")]
    BadCalibration { path: PathBuf, message: String },
}

/// A TOML error as one line, reason first: `expected '=' (line 2, column 5)`. The toml crate's
/// `Display` is several lines (the source line and a caret) with the reason last.
pub fn toml_error_line(e: &toml::de::Error, text: &str) -> String {
    let reason = e.message().trim().replace('\n', "; ");
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before[before.rfind('\n').map_or(0, |i| i + 1)..]
                .chars()
                .count()
                + 1;
            format!("{reason} (line {line}, column {column})")
        }
        None => reason,
    }
}

/// A preset found by its name or one of its aliases, case-insensitively.
pub trait Named {
    fn name(&self) -> &str;
    fn aliases(&self) -> &[String];

    fn answers_to(&self, query: &str) -> bool {
        self.name().eq_ignore_ascii_case(query)
            || self.aliases().iter().any(|a| a.eq_ignore_ascii_case(query))
    }
}

/// The first item answering to `query`, or the `"; did you mean 'x'?"` suggestion for an error.
pub fn find_named<'a, T: Named>(items: &'a [T], query: &str) -> Result<&'a T, String> {
    items.iter().find(|i| i.answers_to(query)).ok_or_else(|| {
        let names = items
            .iter()
            .flat_map(|i| std::iter::once(i.name()).chain(i.aliases().iter().map(String::as_str)));
        did_you_mean(query, names)
    })
}

/// Suggests the closest candidate to `name` (edit distance ≤ a third of its length), formatted as
/// `"; did you mean 'x'?"`, or an empty string.
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let lower = name.to_ascii_lowercase();
    let best = candidates
        .into_iter()
        .map(|c| (levenshtein(&lower, &c.to_ascii_lowercase()), c))
        .min();
    match best {
        Some((d, c)) if d <= lower.len().max(3) / 3 + 1 => format!("; did you mean '{c}'?"),
        _ => String::new(),
    }
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let names = ["llama-3.1-8b", "mistral-7b", "llama-3-70b"];
        assert_eq!(
            did_you_mean("lama-3.1-8b", names),
            "; did you mean 'llama-3.1-8b'?"
        );
        assert_eq!(
            did_you_mean("mistral-7", names),
            "; did you mean 'mistral-7b'?"
        );
        assert_eq!(did_you_mean("gpt-neox-20b", names), "");
    }
}
