//! The one way memplan reads a user's input file (config.json, `--gpu-file`, `--calibration`):
//! a regular file, no larger than a limit, as UTF-8.
//!
//! A FIFO would block the read forever and a device such as `/dev/zero` never ends, so anything
//! that is not a regular file is refused before it is opened for reading; a file that grows past
//! the limit while being read is refused too (the read stops one byte past the limit).

use std::io::Read;
use std::path::Path;

use crate::error::Error;

/// Largest GPU or calibration file memplan reads: the GPU presets file is ~10 KB; 1 MiB leaves
/// room for comments and many `[[gpu]]` entries. (config.json: [`crate::model::config::MAX_CONFIG_BYTES`].)
pub const MAX_INPUT_BYTES: u64 = 1 << 20;

/// Reads `path` as text, at most `limit` bytes. `what` names the kind of file in errors
/// ("config.json", "GPU file").
pub fn read_input(path: &Path, what: &str, limit: u64) -> Result<String, Error> {
    let bad = |problem: String| Error::InputFile {
        path: path.to_path_buf(),
        problem,
    };
    let io = |source: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a pipe, socket or device)"
        };
        return Err(bad(format!("is {kind}; a {what} must be a regular file")));
    }
    let too_big = || {
        bad(format!(
            "is larger than {} KiB; a {what} is a few KiB",
            limit >> 10
        ))
    };
    if meta.len() > limit {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(too_big());
    }
    String::from_utf8(bytes).map_err(|e| {
        bad(format!(
            "is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_small_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(&p, "x = 1\n").unwrap();
        assert_eq!(
            read_input(&p, "GPU file", MAX_INPUT_BYTES).unwrap(),
            "x = 1\n"
        );
    }

    #[test]
    fn refuses_directories_devices_large_and_binary_files() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_input(dir.path(), "config.json", MAX_INPUT_BYTES)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a directory"), "{e}");
        #[cfg(unix)]
        {
            let e = read_input(Path::new("/dev/zero"), "config.json", MAX_INPUT_BYTES)
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; MAX_INPUT_BYTES as usize + 1]).unwrap();
        let e = read_input(&big, "config.json", MAX_INPUT_BYTES)
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than 1024 KiB"), "{e}");
        let bin = dir.path().join("bin.json");
        std::fs::write(&bin, [b'{', 0xff, b'}']).unwrap();
        let e = read_input(&bin, "config.json", MAX_INPUT_BYTES)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not UTF-8"), "{e}");
    }
}
