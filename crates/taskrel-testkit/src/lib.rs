//! Helpers shared by the workspace's integration tests (a dev-dependency only).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace's root folder.
pub fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
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

/// Runs the program `bin` (a test's `env!("CARGO_BIN_EXE_...")`) with `args` and returns its
/// output, whatever its exit status.
pub fn run(bin: &str, args: &[&str]) -> Output {
    match Command::new(bin).args(args).output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run {bin}: {e}"),
    }
}

/// Runs `bin` with `args`, which must succeed (else the test fails showing its standard
/// error), and parses its standard output as JSON.
pub fn json(bin: &str, args: &[&str]) -> serde_json::Value {
    let out = run(bin, args);
    assert!(
        out.status.success(),
        "{bin} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout) {
        Ok(value) => value,
        Err(e) => panic!("{bin} {args:?}: the output is not JSON ({e})"),
    }
}

/// Asserts that `got` is within relative error `tolerance` of the reference value `want`.
pub fn assert_close(got: f64, want: f64, tolerance: f64) {
    let rel = (got - want).abs() / want.abs().max(1e-12);
    assert!(
        rel <= tolerance,
        "got {got}, reference {want} (relative error {rel:.2e})"
    );
}
