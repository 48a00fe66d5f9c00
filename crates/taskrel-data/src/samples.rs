//! A user's own small target sample, and how a scored sample is drawn from it and divided into
//! fitting and evaluation parts.
//!
//! | form | what it is read as |
//! |---|---|
//! | a folder with one sub-folder per class | labelled images, classes named by the sub-folders (sorted) |
//! | a folder with images directly inside | one unlabeled image sample |
//! | a CSV of `label,text` rows (an optional `label,text` header) | labelled texts, classes in order of first appearance |
//! | a CSV of `text` rows (an optional `text` header) | unlabeled texts |
//!
//! Images are `.png`, `.jpg` or `.jpeg`, all of one size and colour type. Errors name the file,
//! the line for CSVs, and what was expected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::dataset::{Dataset, Images, Inputs};
use crate::error::{Error, Result};

/// A sample as read from the user's files.
#[derive(Clone, Debug)]
pub struct UserSample {
    /// The samples; an unlabeled sample has one class, `unlabeled`.
    pub data: Dataset,
    /// Whether the files gave labels.
    pub labelled: bool,
}

/// Reads a folder of images or a CSV of texts (see the module documentation).
pub fn read(path: &Path) -> Result<UserSample> {
    if path.is_file() {
        return read_text_csv(path);
    }
    if !path.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: no such file or folder",
            path.display()
        )));
    }
    read_image_folder(path)
}

fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        found.push(entry.map_err(|e| Error::io(dir, e))?.path());
    }
    found.sort();
    Ok(found)
}

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

fn read_image_folder(path: &Path) -> Result<UserSample> {
    let entries = list(path)?;
    let subdirs: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
    let labelled = !subdirs.is_empty();
    let root = path.canonicalize().map_err(|e| Error::io(path, e))?;
    let mut files: Vec<(PathBuf, u32)> = Vec::new();
    let mut classes = Vec::new();
    if labelled {
        for (c, dir) in subdirs.into_iter().enumerate() {
            classes.push(
                dir.file_name()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default(),
            );
            let resolved = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
            if !resolved.starts_with(&root) {
                return Err(Error::Invalid(format!(
                    "{}: the class folder points outside the sample folder (to {})",
                    dir.display(),
                    resolved.display()
                )));
            }
            let inner: Vec<PathBuf> = list(dir)?.into_iter().filter(|p| is_image(p)).collect();
            if inner.is_empty() {
                return Err(Error::Invalid(format!(
                    "{}: the class folder holds no .png/.jpg/.jpeg images",
                    dir.display()
                )));
            }
            files.extend(inner.into_iter().map(|p| (p, c as u32)));
        }
    } else {
        classes.push("unlabeled".to_string());
        files.extend(
            entries
                .into_iter()
                .filter(|p| !p.is_dir() && is_image(p))
                .map(|p| (p, 0)),
        );
    }
    if files.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no .png/.jpg/.jpeg images found (expected one sub-folder per class, or images directly inside)",
            path.display()
        )));
    }
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let mut shape: Option<(u32, u32, usize)> = None;
    for (file, label) in &files {
        let img = image::open(file)
            .map_err(|e| Error::format(file, "image", format!("cannot decode: {e}")))?;
        let channels = if img.color().has_color() { 3 } else { 1 };
        let (w, h) = (img.width(), img.height());
        match shape {
            None => shape = Some((w, h, channels)),
            Some(s) if s != (w, h, channels) => {
                return Err(Error::format(
                    file,
                    "image size",
                    format!(
                        "{w}x{h} with {channels} channel(s), but the first image is {}x{} with {} channel(s); \
                         resize the sample to one size",
                        s.0, s.1, s.2
                    ),
                ));
            }
            Some(_) => {}
        }
        if channels == 3 {
            // Channel-first (C, H, W), as the datasets store images.
            let rgb = img.to_rgb8();
            for c in 0..3 {
                pixels.extend(rgb.pixels().map(|p| p.0[c]));
            }
        } else {
            pixels.extend(img.to_luma8().into_raw());
        }
        labels.push(*label);
    }
    let Some((w, h, channels)) = shape else {
        return Err(Error::Invalid(format!("{}: no images", path.display())));
    };
    let images = Images {
        pixels,
        n: labels.len(),
        channels,
        height: h as usize,
        width: w as usize,
    };
    Ok(UserSample {
        data: Dataset {
            inputs: Inputs::Images(images),
            labels,
            classes,
        },
        labelled,
    })
}

fn read_text_csv(path: &Path) -> Result<UserSample> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(raw.as_slice());
    let mut texts = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut labels = Vec::new();
    let mut labelled: Option<bool> = None;
    let (mut last_line, mut last_start) = (1, 0);
    for rec in reader.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map_or(last_line, |p| p.line());
            Error::format(path, format!("line {line}"), e.to_string())
        })?;
        let line = rec.position().map_or(last_line, |p| p.line());
        last_line = line;
        last_start = rec.position().map_or(last_start, |p| p.byte() as usize);
        let bad = |message: String| Error::format(path, format!("line {line}"), message);
        // A header row names the columns; it is not a sample.
        let fields: Vec<String> = rec.iter().map(|f| f.trim().to_ascii_lowercase()).collect();
        if texts.is_empty() && (fields == ["label", "text"] || fields == ["text"]) {
            continue;
        }
        if rec.len() > 2 {
            return Err(bad(format!(
                "expected `label,text` or `text`, got {} fields (quote a text that holds commas)",
                rec.len()
            )));
        }
        let this_labelled = rec.len() == 2;
        if *labelled.get_or_insert(this_labelled) != this_labelled {
            return Err(bad(format!(
                "expected {} field(s) like the first row (`label,text` or `text`)",
                if this_labelled { 1 } else { 2 }
            )));
        }
        let text = rec[rec.len() - 1].to_string();
        if text.trim().is_empty() {
            return Err(bad("the text is empty".into()));
        }
        if this_labelled {
            let name = rec[0].trim().to_string();
            if name.is_empty() {
                return Err(bad("the label is empty".into()));
            }
            let id = match names.iter().position(|n| *n == name) {
                Some(id) => id,
                None => {
                    names.push(name);
                    names.len() - 1
                }
            };
            labels.push(id as u32);
        } else {
            labels.push(0);
        }
        texts.push(text);
    }
    // A quoted field left open swallows the rest of the file into the last record.
    if crate::table::quote_left_open(&raw[last_start.min(raw.len())..]) {
        return Err(Error::format(
            path,
            format!("line {last_line}"),
            "a quoted field is not closed before the end of the file",
        ));
    }
    if texts.is_empty() {
        return Err(Error::Invalid(format!("{}: no rows", path.display())));
    }
    let labelled = labelled.unwrap_or(false);
    Ok(UserSample {
        data: Dataset {
            inputs: Inputs::Texts(texts),
            labels,
            classes: if labelled {
                names
            } else {
                vec!["unlabeled".into()]
            },
        },
        labelled,
    })
}

/// The scored sample: `budget` samples, stratified when labels are used (`budget / classes`
/// per class, at least 2, at most what a class has), else a seeded random draw; sorted.
pub fn draw(data: &Dataset, labelled: bool, budget: usize, seed: u64) -> Vec<usize> {
    if labelled {
        let per_class = (budget / data.num_classes().max(1)).max(2);
        data.sample_at_most_per_class(per_class, seed)
    } else {
        let mut all: Vec<usize> = (0..data.len()).collect();
        all.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        all.truncate(budget);
        all.sort_unstable();
        all
    }
}

/// Divides `drawn` into fitting and evaluation parts (seeded; per class when labels are used):
/// `eval_fraction` of each group, rounded, at least one and leaving at least one to fit on.
/// Returns `(fit, eval)`, each sorted.
pub fn hold_out(
    data: &Dataset,
    drawn: &[usize],
    labelled: bool,
    eval_fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for &i in drawn {
        groups
            .entry(if labelled { data.labels[i] } else { 0 })
            .or_default()
            .push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(0xe7a1));
    let (mut fit, mut eval) = (Vec::new(), Vec::new());
    for (class, mut members) in groups {
        if members.len() < 2 {
            return Err(Error::Invalid(if labelled {
                format!(
                    "class {class} ({}) has {} sample(s) in the drawn sample: at least two are needed, one to fit on and one to evaluate on",
                    data.classes
                        .get(class as usize)
                        .map_or("unnamed", String::as_str),
                    members.len()
                )
            } else {
                format!(
                    "the sample holds {} item(s): at least two are needed, one to fit on and one to evaluate on",
                    members.len()
                )
            }));
        }
        members.shuffle(&mut rng);
        let n_eval =
            ((members.len() as f64 * eval_fraction).round() as usize).clamp(1, members.len() - 1);
        eval.extend_from_slice(&members[..n_eval]);
        fit.extend_from_slice(&members[n_eval..]);
    }
    fit.sort_unstable();
    eval.sort_unstable();
    Ok((fit, eval))
}
