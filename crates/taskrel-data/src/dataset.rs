//! The in-memory dataset: compact inputs (u8 images or texts), labels and class names, with
//! the reshaping every experiment needs: class subsets with relabelling, stratified per-class
//! sampling and seeded shuffles and splits.
//!
//! Every random choice takes an explicit `seed` and uses ChaCha8, whose stream is fixed by its
//! specification, so the same seed selects the same samples on every platform and release.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Images stored as u8, row-major `(n, channels, height, width)`.
///
/// Pixel convention: 0 is background, 255 is full ink, as in the MNIST IDX files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Images {
    /// `n * channels * height * width` bytes.
    pub pixels: Vec<u8>,
    /// Number of images.
    pub n: usize,
    /// Channels per image (1 for grey).
    pub channels: usize,
    /// Rows per image.
    pub height: usize,
    /// Columns per image.
    pub width: usize,
}

impl Images {
    /// Bytes per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The bytes of image `i`, `(channels, height, width)` row-major.
    pub fn image(&self, i: usize) -> &[u8] {
        let len = self.image_len();
        &self.pixels[i * len..(i + 1) * len]
    }

    fn select(&self, indices: &[usize]) -> Images {
        let mut pixels = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
        }
        Images {
            pixels,
            n: indices.len(),
            ..*self
        }
    }
}

/// The inputs of a dataset: one of the two modalities taskrel handles.
#[derive(Clone, Debug, PartialEq)]
pub enum Inputs {
    /// u8 images of one shape.
    Images(Images),
    /// Normalised texts (see [`crate::csv_text`]).
    Texts(Vec<String>),
}

/// Modality of a dataset or a model, spelled as in configs and JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    /// Images.
    Image,
    /// Texts.
    Text,
}

impl Modality {
    /// `image` or `text`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Text => "text",
        }
    }
}

/// One split of one dataset in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Inputs, `len()` of them.
    pub inputs: Inputs,
    /// Class index per input, each `< classes.len()`.
    pub labels: Vec<u32>,
    /// Class names, indexed by label.
    pub classes: Vec<String>,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the dataset holds no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of classes (including classes with no sample here).
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Image or text.
    pub fn modality(&self) -> Modality {
        match self.inputs {
            Inputs::Images(_) => Modality::Image,
            Inputs::Texts(_) => Modality::Text,
        }
    }

    /// The images, when this is an image dataset.
    pub fn images(&self) -> Option<&Images> {
        match &self.inputs {
            Inputs::Images(images) => Some(images),
            Inputs::Texts(_) => None,
        }
    }

    /// The texts, when this is a text dataset.
    pub fn texts(&self) -> Option<&[String]> {
        match &self.inputs {
            Inputs::Texts(texts) => Some(texts),
            Inputs::Images(_) => None,
        }
    }

    /// Samples per class, in class order.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for &y in &self.labels {
            counts[y as usize] += 1;
        }
        counts
    }

    /// A new dataset holding the samples at `indices`, in that order (repeats allowed).
    ///
    /// Fails when an index is out of range.
    pub fn select(&self, indices: &[usize]) -> Result<Dataset> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::Invalid(format!(
                "sample index {bad} out of range for a dataset of {} samples",
                self.len()
            )));
        }
        let inputs = match &self.inputs {
            Inputs::Images(images) => Inputs::Images(images.select(indices)),
            Inputs::Texts(texts) => {
                Inputs::Texts(indices.iter().map(|&i| texts[i].clone()).collect())
            }
        };
        let labels = indices.iter().map(|&i| self.labels[i]).collect();
        Ok(Dataset {
            inputs,
            labels,
            classes: self.classes.clone(),
        })
    }

    /// The samples at positions `start, start + 2, start + 4, ...` (`start` 0 or 1): the two
    /// values give two disjoint halves of a split, so that a reference sample and a target
    /// sample drawn from the same dataset never share a sample, whatever their seeds.
    pub fn every_other(&self, start: usize) -> Result<Dataset> {
        if start > 1 {
            return Err(Error::Invalid(format!(
                "every_other takes start 0 or 1, got {start}"
            )));
        }
        let indices: Vec<usize> = (start..self.len()).step_by(2).collect();
        self.select(&indices)
    }

    /// Keeps only the samples of `classes` and relabels them `0..classes.len()` in the order
    /// given, so `subset_classes(&[3, 8])` maps class 3 to 0 and class 8 to 1.
    pub fn subset_classes(&self, classes: &[u32]) -> Result<Dataset> {
        let mut new_label = vec![None; self.classes.len()];
        for (new, &old) in classes.iter().enumerate() {
            let slot = new_label.get_mut(old as usize).ok_or_else(|| {
                Error::Invalid(format!(
                    "class {old} does not exist: the dataset has classes 0..{}",
                    self.classes.len()
                ))
            })?;
            if slot.is_some() {
                return Err(Error::Invalid(format!(
                    "class {old} listed twice in a class subset"
                )));
            }
            *slot = Some(new as u32);
        }
        let (indices, labels): (Vec<usize>, Vec<u32>) = self
            .labels
            .iter()
            .enumerate()
            .filter_map(|(i, &y)| new_label[y as usize].map(|new| (i, new)))
            .unzip();
        let mut subset = self.select(&indices)?;
        subset.labels = labels;
        subset.classes = classes
            .iter()
            .map(|&c| self.classes[c as usize].clone())
            .collect();
        Ok(subset)
    }

    /// Indices of `n` samples of every class, drawn without replacement with `seed`, grouped
    /// by class in class order. Fails naming the class when one has fewer than `n` samples.
    pub fn sample_per_class(&self, n: usize, seed: u64) -> Result<Vec<usize>> {
        if n == 0 {
            return Err(Error::Invalid(
                "samples per class must be positive, got 0".into(),
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut indices = Vec::with_capacity(n * self.num_classes());
        for (class, mut members) in self.members_by_class().into_iter().enumerate() {
            if members.len() < n {
                return Err(Error::Invalid(format!(
                    "class {class} ({}) has {} samples, {n} per class were asked for",
                    self.classes[class],
                    members.len()
                )));
            }
            members.shuffle(&mut rng);
            members.truncate(n);
            members.sort_unstable();
            indices.extend(members);
        }
        Ok(indices)
    }

    /// Like [`Dataset::sample_per_class`], but a class with fewer than `n` samples gives all
    /// of them.
    pub fn sample_at_most_per_class(&self, n: usize, seed: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut indices = Vec::with_capacity(n * self.num_classes());
        for mut members in self.members_by_class() {
            members.shuffle(&mut rng);
            members.truncate(n);
            members.sort_unstable();
            indices.extend(members);
        }
        indices
    }

    /// A stratified sample with `n` samples per class (see [`Dataset::sample_per_class`]).
    pub fn take_per_class(&self, n: usize, seed: u64) -> Result<Dataset> {
        self.select(&self.sample_per_class(n, seed)?)
    }

    /// The samples in a seeded random order.
    pub fn shuffled(&self, seed: u64) -> Result<Dataset> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        self.select(&order)
    }

    /// Splits into `(train, test)` with a seeded, per-class stratified draw: each class puts
    /// `round(count * test_fraction)` samples into the test part. Both parts keep the original
    /// sample order. Used for datasets that ship one split only (the mirrored AG News).
    pub fn split(&self, test_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(Error::Invalid(format!(
                "test fraction must lie strictly between 0 and 1, got {test_fraction}"
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut is_test = vec![false; self.len()];
        for mut members in self.members_by_class() {
            members.shuffle(&mut rng);
            let n_test = (members.len() as f64 * test_fraction).round() as usize;
            for &i in &members[..n_test] {
                is_test[i] = true;
            }
        }
        let (test, train): (Vec<usize>, Vec<usize>) = (0..self.len()).partition(|&i| is_test[i]);
        Ok((self.select(&train)?, self.select(&test)?))
    }

    fn members_by_class(&self) -> Vec<Vec<usize>> {
        let mut members = vec![Vec::new(); self.num_classes()];
        for (i, &y) in self.labels.iter().enumerate() {
            members[y as usize].push(i);
        }
        members
    }
}
