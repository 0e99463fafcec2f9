//! Helpers shared by the CLI test files: run the `memplan` binary, read its output, and check
//! that bad input fails with one clear error and never a panic.
// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use assert_cmd::Command;
use serde_json::Value;

pub fn memplan() -> Command {
    Command::cargo_bin("memplan").unwrap()
}

/// Stdout of a command that must succeed.
pub fn stdout(args: &[&str]) -> String {
    let out = memplan().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A command's stdout parsed as JSON (the command chooses its format).
pub fn json(args: &[&str]) -> Value {
    serde_json::from_str(&stdout(args)).unwrap()
}

/// The command with `--format json` appended, parsed.
pub fn format_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--format", "json"]);
    json(&all)
}

/// Runs a command that must fail with exactly one `error:` line containing `needle`.
pub fn fails_with(args: &[&str], needle: &str) {
    let out = memplan().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
}
