//! Helpers shared by the workspace's integration tests (a dev-dependency only).

use std::path::{Path, PathBuf};

/// The workspace's root folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The fetched `data/` folder. Tests over real data call this first: when the folder is
/// missing they fail at once with one line saying how to fetch it.
pub fn data_root() -> PathBuf {
    let root = workspace_root().join("data");
    assert!(
        root.is_dir(),
        "{} missing: run scripts/fetch-data.sh (or scripts/fetch-data.sh --mirror DIR)",
        root.display()
    );
    root
}
pub mod fixtures;
