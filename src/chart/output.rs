//! Output files: the format named by the extension, and the one function that writes them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// What `--out` asks for, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Svg,
    Html,
}

impl OutputFormat {
    /// The format of `path`'s extension (`.png`, `.svg`, `.html`/`.htm`, any case).
    pub fn from_path(path: &Path) -> Result<OutputFormat, Error> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("png") => Ok(OutputFormat::Png),
            Some("svg") => Ok(OutputFormat::Svg),
            Some("html" | "htm") => Ok(OutputFormat::Html),
            _ => Err(Error::InvalidValue {
                flag: "--out",
                value: path.display().to_string(),
                expected: "a file name ending in .png, .svg or .html",
            }),
        }
    }
}

/// Writes `bytes` to `path` whole or not at all: into a temporary file beside it, then renamed
/// over it, so a reader never sees half a chart and a failure leaves no file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let err = |reason: std::io::Error| Error::Write {
        path: path.to_path_buf(),
        reason,
    };
    let name = path
        .file_name()
        .ok_or_else(|| err(std::io::Error::other("the path names no file")))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_comes_from_the_extension() {
        assert_eq!(
            OutputFormat::from_path(Path::new("a/b.PNG")).unwrap(),
            OutputFormat::Png
        );
        assert_eq!(
            OutputFormat::from_path(Path::new("x.svg")).unwrap(),
            OutputFormat::Svg
        );
        assert_eq!(
            OutputFormat::from_path(Path::new("x.htm")).unwrap(),
            OutputFormat::Html
        );
        for bad in ["x.jpg", "x", "x.png.bak"] {
            let e = OutputFormat::from_path(Path::new(bad))
                .unwrap_err()
                .to_string();
            assert!(e.contains(".png, .svg or .html"), "{e}");
        }
    }

    #[test]
    fn writes_whole_files_and_leaves_nothing_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.svg");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let missing = dir.path().join("no/such/dir/c.svg");
        let e = write_atomic(&missing, b"x").unwrap_err().to_string();
        assert!(e.starts_with("cannot write"), "{e}");
        // A directory in the way: the rename fails and the temporary file is removed.
        let blocked = dir.path().join("d.png");
        fs::create_dir(&blocked).unwrap();
        assert!(write_atomic(&blocked, b"x").is_err());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
