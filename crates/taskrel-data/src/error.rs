//! The one error type of the data crate: every message names the file, the place in it
//! (line, record, byte offset or header field) and what was expected against what was found.

use std::path::{Path, PathBuf};

/// Result alias for the data crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading or reshaping a dataset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the loader needs does not exist.
    #[error("{}: file not found (looked for {}){hint}", dir.display(), tried.join(", "))]
    Missing {
        /// Folder that was searched.
        dir: PathBuf,
        /// File names tried, in order.
        tried: Vec<String>,
        /// How to get the file, with a leading separator, or empty.
        hint: String,
    },
    /// The operating system refused to read a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// File being read.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file exists but its contents are not what the format requires.
    #[error("{}: {place}: {message}", path.display())]
    Format {
        /// File being read.
        path: PathBuf,
        /// Where in the file: `line 17`, `record 3`, `header`, `byte 16`.
        place: String,
        /// What was expected and what was found.
        message: String,
    },
    /// A request on an in-memory dataset that cannot be honoured (unknown class, too few samples).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn format(
        path: &Path,
        place: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Format {
            path: path.to_path_buf(),
            place: place.into(),
            message: message.into(),
        }
    }
}
