//! Finding a dataset's files under a root folder and opening them, decompressing `.gz` and
//! `.bz2` on the fly.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// How to get missing files, appended to "file not found" errors.
pub(crate) const FETCH_HINT: &str =
    "; run scripts/fetch-data.sh (or --mirror DIR) to fetch the datasets";

/// The first of `names` that exists in `dir`.
pub(crate) fn find(dir: &Path, names: &[String]) -> Result<PathBuf> {
    names
        .iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| Error::Missing {
            dir: dir.to_path_buf(),
            tried: names.to_vec(),
            hint: FETCH_HINT.to_string(),
        })
}

/// The first of `names` that exists in `dir`, or `None` when none does.
pub(crate) fn find_optional(dir: &Path, names: &[String]) -> Option<PathBuf> {
    names
        .iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
}

/// A buffered reader over the file's decompressed bytes (`.gz` and `.bz2` by extension).
pub(crate) fn open(path: &Path) -> Result<Box<dyn Read>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Err(Error::format(path, "byte 0", "empty file"));
    }
    let reader = BufReader::with_capacity(1 << 16, file);
    Ok(match path.extension().and_then(|e| e.to_str()) {
        Some("gz") => Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::read::GzDecoder::new(reader),
        )),
        Some("bz2") => Box::new(BufReader::with_capacity(
            1 << 16,
            bzip2::read::BzDecoder::new(reader),
        )),
        _ => Box::new(reader),
    })
}

/// The whole decompressed file as text; an empty file is an error.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let mut text = String::new();
    open(path)?
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    if text.trim().is_empty() {
        return Err(Error::format(
            path,
            "line 1",
            "empty file, expected at least one record",
        ));
    }
    Ok(text)
}
