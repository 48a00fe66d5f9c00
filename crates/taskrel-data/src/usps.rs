//! USPS handwritten digits (Hull 1994), 16x16 grey, in either of its two common text formats:
//!
//! - ESL "zipcode" (`zip.train.gz`, `zip.test.gz`): one image per line, the digit written as a
//!   float (`6.0000`) then 256 pixel values in [-1, 1], row-major;
//! - LIBSVM (`usps.bz2`, `usps.t.bz2`): `label idx:value ...` with labels 1-10 for digits 0-9,
//!   1-based sparse indices, omitted entries meaning 0.0.
//!
//! Pixels are converted to the MNIST convention (u8, 0 = background, 255 = ink) by
//! `u8 = floor((x + 1) / 2 * 255)`, so -1 -> 0, 0 -> 127, 1 -> 255. This is torchvision's
//! `USPS` conversion (`astype(np.uint8)` truncates), which the pretrained USPS CNN was trained
//! on. Both files use -1 for background, so USPS and MNIST digits are both bright-on-dark.

use std::path::Path;

use crate::dataset::{Dataset, Images, Inputs};
use crate::error::{Error, Result};
use crate::files;
use crate::mnist::MNIST_CLASSES;

/// Side of a USPS image.
pub const SIDE: usize = 16;
const PIXELS: usize = SIDE * SIDE;

/// File names tried for a split, ESL first.
pub(crate) fn names(split: &str) -> Vec<String> {
    let (esl, libsvm) = match split {
        "train" => ("zip.train", "usps"),
        _ => ("zip.test", "usps.t"),
    };
    vec![
        format!("{esl}.gz"),
        esl.to_string(),
        format!("{libsvm}.bz2"),
        libsvm.to_string(),
    ]
}

/// Loads one split from `dir`, or `None` when none of its files exists.
pub(crate) fn load_split(dir: &Path, split: &str) -> Result<Option<Dataset>> {
    match files::find_optional(dir, &names(split)) {
        Some(path) => read(&path).map(Some),
        None => Ok(None),
    }
}

/// Reads a USPS file, choosing the format from its name (`zip.*` is ESL, anything else LIBSVM).
pub fn read(path: &Path) -> Result<Dataset> {
    let esl = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("zip"));
    let text = files::read_text(path)?;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let place = format!("line {}", i + 1);
        let label = if esl {
            parse_esl_line(path, &place, line, &mut pixels)?
        } else {
            parse_libsvm_line(path, &place, line, &mut pixels)?
        };
        labels.push(label);
    }
    let n = labels.len();
    let images = Images {
        pixels,
        n,
        channels: 1,
        height: SIDE,
        width: SIDE,
    };
    let classes = MNIST_CLASSES.iter().map(|c| c.to_string()).collect();
    Ok(Dataset {
        inputs: Inputs::Images(images),
        labels,
        classes,
    })
}

/// Maps a value in [-1, 1] to the u8 MNIST convention; values outside (beyond rounding) fail.
fn to_u8(path: &Path, place: &str, x: f32) -> Result<u8> {
    if !(-1.001..=1.001).contains(&x) {
        return Err(Error::format(
            path,
            place,
            format!("pixel value {x} outside [-1, 1]"),
        ));
    }
    Ok(((f64::from(x.clamp(-1.0, 1.0)) + 1.0) / 2.0 * 255.0) as u8)
}

fn parse_f32(path: &Path, place: &str, token: &str) -> Result<f32> {
    token
        .parse::<f32>()
        .map_err(|_| Error::format(path, place, format!("expected a number, found {token:?}")))
}

fn parse_esl_line(path: &Path, place: &str, line: &str, pixels: &mut Vec<u8>) -> Result<u32> {
    let tokens: Vec<&str> = line.split_ascii_whitespace().collect();
    if tokens.len() != PIXELS + 1 {
        return Err(Error::format(
            path,
            place,
            format!(
                "expected {} values (label + {PIXELS} pixels), got {}",
                PIXELS + 1,
                tokens.len()
            ),
        ));
    }
    let label = parse_f32(path, place, tokens[0])?;
    if label.fract() != 0.0 || !(0.0..=9.0).contains(&label) {
        return Err(Error::format(
            path,
            place,
            format!("expected a digit label 0-9, found {}", tokens[0]),
        ));
    }
    for token in &tokens[1..] {
        pixels.push(to_u8(path, place, parse_f32(path, place, token)?)?);
    }
    Ok(label as u32)
}

fn parse_libsvm_line(path: &Path, place: &str, line: &str, pixels: &mut Vec<u8>) -> Result<u32> {
    let mut tokens = line.split_ascii_whitespace();
    let first = tokens.next().unwrap_or_default();
    let label = match first.parse::<u32>() {
        Ok(y @ 1..=10) => y - 1,
        _ => {
            return Err(Error::format(
                path,
                place,
                format!("expected a label 1-10, found {first:?}"),
            ));
        }
    };
    let start = pixels.len();
    pixels.resize(start + PIXELS, to_u8(path, place, 0.0)?);
    for token in tokens {
        let (index, value) = token.split_once(':').ok_or_else(|| {
            Error::format(
                path,
                place,
                format!("expected index:value, found {token:?}"),
            )
        })?;
        let index = match index.parse::<usize>() {
            Ok(k @ 1..=PIXELS) => k - 1,
            _ => {
                return Err(Error::format(
                    path,
                    place,
                    format!("expected a feature index 1-{PIXELS}, found {index:?}"),
                ));
            }
        };
        pixels[start + index] = to_u8(path, place, parse_f32(path, place, value)?)?;
    }
    Ok(label)
}
