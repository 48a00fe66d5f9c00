//! Errors of the models crate.

use std::path::PathBuf;

/// Result alias for the models crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong loading, running or training a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    /// A weights, config or tokenizer file could not be used.
    #[error("{}: {message}", path.display())]
    File {
        /// File or folder concerned.
        path: PathBuf,
        /// What was expected and what was found.
        message: String,
    },
    /// An argument or combination of arguments that cannot work.
    #[error("{0}")]
    Invalid(String),
    /// The data crate refused a request.
    #[error(transparent)]
    Data(#[from] taskrel_data::Error),
}

impl Error {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::File {
            path: path.into(),
            message: message.into(),
        }
    }
}
