//! Task-relatedness and baseline transferability scores, computed on plain feature matrices.
//!
//! This crate knows nothing of datasets or models: it takes `(n, d)` features (and labels,
//! when available) and returns numbers, so it can be used on any features.

pub mod baselines;
pub mod classifier;
mod dense;
pub mod features;
pub mod ot;
pub mod relatedness;
pub mod scores;

pub use features::FeatureSet;
pub use relatedness::{RelatednessConfig, Report, Samples, Solver, Variant, relatedness};
pub use scores::{Column, ScoreInputs, ScoreKind, larger_is_better};

/// Errors of the score crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    /// A feature file could not be used.
    #[error("{}: {message}", path.display())]
    File {
        /// File concerned.
        path: std::path::PathBuf,
        /// What was expected and what was found.
        message: String,
    },
    /// Inputs that the computation cannot use.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias for the score crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
