//! Feature files: `(n, d)` f32 features, optional labels, and metadata, in one safetensors
//! file (tensors `features` and `labels`; metadata keys `classes` (JSON list), `model`,
//! `dataset`, `split`, `preprocessing`, `indices_sha256`, ...).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::{Error, Result};

/// Features of `n` samples, with their labels when known.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureSet {
    /// Row-major `(n, d)` values.
    pub values: Vec<f32>,
    /// Rows.
    pub n: usize,
    /// Columns.
    pub d: usize,
    /// Class per row, when labelled.
    pub labels: Option<Vec<u32>>,
    /// Class names (may be empty when unlabelled).
    pub classes: Vec<String>,
    /// Free-form provenance (model, dataset, split, preprocessing, ...).
    pub metadata: BTreeMap<String, String>,
}

impl FeatureSet {
    /// Checks shapes and labels once; later code trusts them.
    pub fn new(
        values: Vec<f32>,
        n: usize,
        d: usize,
        labels: Option<Vec<u32>>,
        classes: Vec<String>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Self> {
        if values.len() != n * d {
            return Err(Error::Invalid(format!(
                "features: expected {n} x {d} = {} values, got {}",
                n * d,
                values.len()
            )));
        }
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!(
                "features: non-finite value at row {}, column {}",
                bad / d.max(1),
                bad % d.max(1)
            )));
        }
        if let Some(labels) = &labels {
            if labels.len() != n {
                return Err(Error::Invalid(format!(
                    "features: {n} rows but {} labels",
                    labels.len()
                )));
            }
            if let Some(&bad) = labels.iter().find(|&&y| y as usize >= classes.len()) {
                return Err(Error::Invalid(format!(
                    "features: label {bad} but only {} classes",
                    classes.len()
                )));
            }
        }
        Ok(Self {
            values,
            n,
            d,
            labels,
            classes,
            metadata,
        })
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.d..(i + 1) * self.d]
    }

    /// The rows at `indices`, in that order, with their labels; classes and metadata kept.
    ///
    /// Fails when an index is out of range.
    pub fn select(&self, indices: &[usize]) -> Result<Self> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.n) {
            return Err(Error::Invalid(format!(
                "features: row {bad} out of range for {} rows",
                self.n
            )));
        }
        let mut values = Vec::with_capacity(indices.len() * self.d);
        for &i in indices {
            values.extend_from_slice(self.row(i));
        }
        Ok(Self {
            values,
            n: indices.len(),
            d: self.d,
            labels: self
                .labels
                .as_ref()
                .map(|l| indices.iter().map(|&i| l[i]).collect()),
            classes: self.classes.clone(),
            metadata: self.metadata.clone(),
        })
    }

    /// A seeded split into `(fit, eval)` parts, disjoint and together the whole set: each
    /// class (the whole set when unlabelled) puts `round(count * eval_fraction)` rows, at least
    /// one and at most `count - 1`, into the evaluation part. Both parts keep the row order.
    ///
    /// Fails when `eval_fraction` is not strictly between 0 and 1 or a class has fewer than
    /// two rows (it could not appear on both sides).
    pub fn split(&self, eval_fraction: f64, seed: u64) -> Result<(Self, Self)> {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        if !(eval_fraction > 0.0 && eval_fraction < 1.0) {
            return Err(Error::Invalid(format!(
                "features: evaluation fraction must lie strictly between 0 and 1, got {eval_fraction}"
            )));
        }
        let groups: Vec<Vec<usize>> = match &self.labels {
            Some(labels) => {
                let k = self.classes.len();
                let mut m = vec![Vec::new(); k];
                for (i, &y) in labels.iter().enumerate() {
                    m[y as usize].push(i);
                }
                m.retain(|g| !g.is_empty());
                m
            }
            None => vec![(0..self.n).collect()],
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut is_eval = vec![false; self.n];
        for mut group in groups {
            if group.len() < 2 {
                let class = self
                    .labels
                    .as_ref()
                    .and_then(|l| group.first().map(|&i| l[i]));
                return Err(Error::Invalid(format!(
                    "features: {} has {} row(s); splitting into fitting and evaluation samples needs at least two",
                    class.map_or("the set".to_string(), |c| format!("class {c}")),
                    group.len()
                )));
            }
            group.shuffle(&mut rng);
            let n_eval =
                ((group.len() as f64 * eval_fraction).round() as usize).clamp(1, group.len() - 1);
            for &i in &group[..n_eval] {
                is_eval[i] = true;
            }
        }
        let (eval, fit): (Vec<usize>, Vec<usize>) = (0..self.n).partition(|&i| is_eval[i]);
        Ok((self.select(&fit)?, self.select(&eval)?))
    }

    /// Writes the set to `path` (via a temporary file renamed into place).
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |e: &dyn std::fmt::Display| Error::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let value_bytes: Vec<u8> = self.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut tensors = vec![(
            "features".to_string(),
            TensorView::new(Dtype::F32, vec![self.n, self.d], &value_bytes).map_err(|e| io(&e))?,
        )];
        let label_bytes: Vec<u8> = self
            .labels
            .iter()
            .flatten()
            .flat_map(|y| y.to_le_bytes())
            .collect();
        if self.labels.is_some() {
            tensors.push((
                "labels".to_string(),
                TensorView::new(Dtype::U32, vec![self.n], &label_bytes).map_err(|e| io(&e))?,
            ));
        }
        let mut metadata: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        metadata.insert(
            "classes".into(),
            serde_json::to_string(&self.classes).map_err(|e| io(&e))?,
        );
        // Written with `fs::write` (the user's umask; safetensors' own writer creates files
        // mode 0600) under a name of this process, then renamed into place.
        let bytes = safetensors::serialize(tensors, Some(metadata)).map_err(|e| io(&e))?;
        let tmp = path.with_extension(format!("safetensors.tmp-{}", std::process::id()));
        if let Err(e) = std::fs::write(&tmp, bytes) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&e));
        }
        std::fs::rename(&tmp, path).map_err(|e| io(&e))
    }

    /// Reads a set written by [`FeatureSet::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let err = |message: String| Error::File {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let features = tensors.tensor("features").map_err(|_| {
            err("no `features` tensor: expected a file written by `taskrel features`".into())
        })?;
        let (n, d) = match (features.dtype(), features.shape()) {
            (Dtype::F32, [n, d]) => (*n, *d),
            (dtype, shape) => {
                return Err(err(format!(
                    "`features` must be f32 (n, d), found {dtype:?} {shape:?}"
                )));
            }
        };
        let values = features
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let labels = match tensors.tensor("labels") {
            Ok(t) if t.dtype() == Dtype::U32 && t.shape() == [n] => Some(
                t.data()
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            Ok(t) => {
                return Err(err(format!(
                    "`labels` must be u32 ({n}), found {:?} {:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Err(_) => None,
        };
        let mut metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let classes = match metadata.remove("classes") {
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| err(format!("metadata `classes` is not a JSON list: {e}")))?,
            None => Vec::new(),
        };
        Self::new(values, n, d, labels, classes, metadata).map_err(|e| err(e.to_string()))
    }
}
