//! The one place YAML is read and written (serde-saphyr).

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Parses `text` (read from `path`); errors name the file, line and column.
pub fn parse<T: DeserializeOwned>(text: &str, path: &Path) -> anyhow::Result<T> {
    serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// YAML text of `value`.
pub fn to_string<T: Serialize>(value: &T) -> anyhow::Result<String> {
    serde_saphyr::to_string(value).map_err(|e| anyhow::anyhow!("writing YAML: {e}"))
}
