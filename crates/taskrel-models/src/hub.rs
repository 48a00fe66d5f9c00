//! Downloads of Hugging Face Hub model files into the standard Hub cache, only when a caller
//! asks for them ([`crate::LoadOptions::hub_download`]).
//!
//! The cache layout is the one `huggingface_hub` writes and reads, so either tool finds the
//! other's files: `models--{org}--{name}/blobs/{etag}` holds each file once,
//! `snapshots/{commit}/{file}` links to it, and `refs/{revision}` names the commit a branch or
//! tag pointed to. For each file, a `HEAD` request on `{endpoint}/{repo}/resolve/{revision}/
//! {file}` (redirects not followed, so that the Hub's own headers are read) gives the commit
//! (`X-Repo-Commit`), the etag (`X-Linked-Etag` for large files, else `ETag`) and the size
//! (`X-Linked-Size`, else `Content-Length`); a file whose blob is present is not fetched
//! again. `refs/{revision}` is written for a commit hash too, so that lookups by it resolve. The body goes to `blobs/{etag}.incomplete`; a download cut short resumes from what
//! that file holds (`Range`), within the same call (a few attempts) or the next one. A finished
//! file must have the announced size and, when the etag is a SHA-256 (large files), that
//! digest; then it is renamed into place.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Where and how to download from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Download {
    /// The Hub's base URL (`https://huggingface.co`, or `HF_ENDPOINT`).
    pub endpoint: String,
    /// A token sent as `Authorization: Bearer` (gated or private models), from `HF_TOKEN`.
    pub token: Option<String>,
    /// Show a progress bar per file on stderr.
    pub progress: bool,
}

impl Download {
    /// The endpoint and token from `HF_ENDPOINT` and `HF_TOKEN`, as Hugging Face's tools read
    /// them.
    pub fn from_env(progress: bool) -> Self {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".to_string());
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
            progress,
        }
    }
}

/// Whether `HF_HUB_OFFLINE` forbids downloads (`1`, `true`, `yes` or `on`).
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// Attempts per file before a download that keeps being cut short is given up.
const ATTEMPTS: usize = 4;

/// Makes sure `files` of model `repo` at `revision` are in `cache`, downloading what is
/// missing. `files` are `(name, required)`; a file the server does not have (404) is an
/// error when required and skipped otherwise.
pub fn fetch(
    cache: &Path,
    repo: &str,
    revision: &str,
    files: &[(&str, bool)],
    how: &Download,
) -> Result<()> {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let head_agent: ureq::Agent = ureq::Agent::config_builder()
        .max_redirects(0)
        .max_redirects_will_error(false)
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(20)))
        .build()
        .into();
    let get_agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_body(Some(Duration::from_secs(60)))
        .build()
        .into();
    for &(file, required) in files {
        let url = format!("{}/{repo}/resolve/{revision}/{file}", how.endpoint);
        let fail = |what: String| Error::Invalid(format!("hf:{repo}@{revision}: {file}: {what}"));
        let mut head = head_agent.head(&url);
        if let Some(t) = &how.token {
            head = head.header("Authorization", format!("Bearer {t}"));
        }
        let response = head
            .call()
            .map_err(|e| fail(format!("cannot reach {url}: {e}")))?;
        let status = response.status().as_u16();
        match status {
            404 if !required => continue,
            404 => return Err(fail(format!("not found at {url} (HTTP 404)"))),
            401 | 403 => {
                return Err(fail(format!(
                    "{url} answered HTTP {status}: a gated or private model needs HF_TOKEN"
                )));
            }
            s if s >= 400 => return Err(fail(format!("{url} answered HTTP {s}"))),
            _ => {}
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let commit = header("x-repo-commit")
            .or_else(|| is_commit(revision).then(|| revision.to_string()))
            .ok_or_else(|| fail(format!("{url} sent no X-Repo-Commit header")))?;
        let etag = header("x-linked-etag")
            .or_else(|| header("etag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
            .filter(|e| !e.is_empty() && !e.contains(['/', '\\']))
            .ok_or_else(|| fail(format!("{url} sent no usable ETag")))?;
        let size: u64 = header("x-linked-size")
            .or_else(|| header("content-length"))
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| fail(format!("{url} sent no file size")))?;
        let blob = dir.join("blobs").join(&etag);
        let pointer = dir.join("snapshots").join(&commit).join(file);
        let have = |p: &Path| fs::metadata(p).is_ok_and(|m| m.len() == size);
        if !have(&blob) {
            download(&get_agent, &url, &blob, size, &etag, how, file)
                .map_err(|e| fail(e.to_string()))?;
        }
        if !have(&pointer) {
            link(&blob, &pointer).map_err(|e| fail(e.to_string()))?;
        }
        // Also for a revision that is a commit, so that cache lookups by it resolve.
        let path = dir.join("refs").join(revision);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
        }
        fs::write(&path, &commit).map_err(|e| io_error(&path, e))?;
    }
    Ok(())
}

/// A 40-digit hexadecimal commit hash.
fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Downloads `url` into `blob` through `blob.incomplete`, resuming what is there.
fn download(
    agent: &ureq::Agent,
    url: &str,
    blob: &Path,
    size: u64,
    etag: &str,
    how: &Download,
    file: &str,
) -> Result<()> {
    let parent = blob
        .parent()
        .ok_or_else(|| Error::Invalid(format!("{} has no folder", blob.display())))?;
    fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    let partial = {
        let mut p = blob.as_os_str().to_owned();
        p.push(".incomplete");
        PathBuf::from(p)
    };
    let bar = if how.progress {
        let bar = indicatif::ProgressBar::new(size);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style);
        }
        bar.set_message(file.to_string());
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut last_error = String::new();
    for _ in 0..ATTEMPTS {
        let have = fs::metadata(&partial).map_or(0, |m| m.len());
        if have >= size {
            break;
        }
        bar.set_position(have);
        let mut request = agent.get(url);
        if let Some(t) = &how.token {
            request = request.header("Authorization", format!("Bearer {t}"));
        }
        if have > 0 {
            request = request.header("Range", format!("bytes={have}-"));
        }
        let response = match request.call() {
            Ok(r) => r,
            Err(e) => {
                last_error = format!("cannot reach {url}: {e}");
                continue;
            }
        };
        let status = response.status().as_u16();
        let append = match status {
            206 => true,
            200 => false,
            s => {
                // A server error is not retried: the message says what the server said.
                return Err(Error::Invalid(format!(
                    "{url} answered HTTP {s} to the download"
                )));
            }
        };
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&partial)
            .map_err(|e| io_error(&partial, e))?;
        let mut reader = response.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut written = if append { have } else { 0 };
        let cut = loop {
            match reader.read(&mut buf) {
                Ok(0) => break None,
                Ok(k) => {
                    out.write_all(&buf[..k])
                        .map_err(|e| io_error(&partial, e))?;
                    written += k as u64;
                    bar.set_position(written);
                }
                Err(e) => break Some(e),
            }
        };
        out.flush().map_err(|e| io_error(&partial, e))?;
        if let Some(e) = cut {
            last_error = format!("download cut short after {written} of {size} bytes: {e}");
        } else if written < size {
            last_error = format!("download cut short after {written} of {size} bytes");
        }
    }
    bar.finish_and_clear();
    let have = fs::metadata(&partial).map_or(0, |m| m.len());
    if have != size {
        if have > size {
            // Not the file announced: start over next time.
            let _ = fs::remove_file(&partial);
            return Err(Error::Invalid(format!(
                "{url}: {have} bytes received, {size} announced; the partial file was removed"
            )));
        }
        return Err(Error::Invalid(format!(
            "{last_error}; {have} bytes kept in {}, the next attempt resumes there",
            partial.display()
        )));
    }
    if etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        let digest = sha256_file(&partial)?;
        if !digest.eq_ignore_ascii_case(etag) {
            let _ = fs::remove_file(&partial);
            return Err(Error::Invalid(format!(
                "{url}: the file's SHA-256 is {digest}, its etag says {etag}; the download was removed"
            )));
        }
    }
    fs::rename(&partial, blob).map_err(|e| io_error(blob, e))
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::file(path, e.to_string())
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| io_error(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let k = f.read(&mut buf).map_err(|e| io_error(path, e))?;
        if k == 0 {
            break;
        }
        hasher.update(&buf[..k]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Points `pointer` at `blob`: a relative symbolic link where the system has them, a copy
/// elsewhere.
fn link(blob: &Path, pointer: &Path) -> Result<()> {
    let folder = pointer
        .parent()
        .ok_or_else(|| Error::Invalid(format!("{} has no folder", pointer.display())))?;
    fs::create_dir_all(folder).map_err(|e| io_error(folder, e))?;
    if pointer.symlink_metadata().is_ok() {
        fs::remove_file(pointer).map_err(|e| io_error(pointer, e))?;
    }
    #[cfg(unix)]
    {
        // From snapshots/{commit}/{dirs...}/{file} up to the repository folder, then blobs/.
        let depth = pointer
            .strip_prefix(
                blob.parent()
                    .and_then(Path::parent)
                    .unwrap_or(Path::new("")),
            )
            .map_or(2, |p| p.components().count() - 1);
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(blob.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(&target, pointer).map_err(|e| io_error(pointer, e))
    }
    #[cfg(not(unix))]
    {
        fs::copy(blob, pointer)
            .map(|_| ())
            .map_err(|e| io_error(pointer, e))
    }
}
