//! One typed entry point for every score: [`ScoreKind`] names a score, lists the columns it
//! reports with their orientation, and computes their values on a cell's features.
//!
//! Adding a score: a variant here, its name in [`ScoreKind::ALL`] and [`ScoreKind::as_str`],
//! its [`ScoreKind::columns`], and its arm in [`ScoreKind::compute`] (which names every value
//! it returns; [`ScoreKind::compute`] fails if a name is missing or extra, and a test runs every
//! kind). Sweeps, zoos and `rank` pick it up by name.

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::baselines::{self, Matrix};
use crate::features::FeatureSet;
use crate::relatedness::{RelatednessConfig, Samples, relatedness};
use crate::{Error, Result};

/// Neighbours of the k-NN baseline.
pub const KNN_K: usize = 5;

/// A score a sweep, a zoo or `rank` can compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
pub enum ScoreKind {
    /// Task-relatedness with target labels.
    Relatedness,
    /// Task-relatedness without target labels.
    RelatednessUnlabeled,
    /// LogME of the target features and labels.
    Logme,
    /// LEEP of the source head's probabilities on the target.
    Leep,
    /// NCE of the source head's predictions on the target.
    Nce,
    /// H-score.
    Hscore,
    /// Shrinkage (Ledoit-Wolf) H-score.
    HscoreShrinkage,
    /// OTCE's conditional-entropy part between reference and target.
    Otce,
    /// Leave-one-out 5-NN accuracy on the target features.
    Knn,
}

/// One value a score reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Column {
    /// Its name (a `cells.csv` column).
    pub name: &'static str,
    /// Whether a larger value predicts better transfer (the bound and its terms: smaller).
    pub larger_is_better: bool,
}

const fn larger(name: &'static str) -> Column {
    Column {
        name,
        larger_is_better: true,
    }
}

const fn smaller(name: &'static str) -> Column {
    Column {
        name,
        larger_is_better: false,
    }
}

const RELATEDNESS: [Column; 11] = [
    smaller("bound"),
    smaller("reference_loss"),
    smaller("label_entropy"),
    smaller("wasserstein"),
    smaller("distribution_term"),
    larger("tau"),
    larger("tau_reference"),
    larger("lipschitz_holds"),
    larger("reference_accuracy"),
    larger("transformed_accuracy"),
    smaller("target_loss"),
];

const RELATEDNESS_UNLABELED: [Column; 9] = [
    smaller("bound_unlabeled"),
    smaller("reference_loss_unlabeled"),
    smaller("label_entropy_unlabeled"),
    smaller("wasserstein_unlabeled"),
    smaller("distribution_term_unlabeled"),
    larger("tau_unlabeled"),
    larger("tau_reference_unlabeled"),
    larger("lipschitz_holds_unlabeled"),
    larger("pseudo_label_accuracy"),
];

/// What a score is computed on: one cell's features.
#[derive(Clone, Copy, Debug)]
pub struct ScoreInputs<'a> {
    /// Target features: baselines use `fit`; task-relatedness fits on `fit` and reports on
    /// `eval`.
    pub target: Samples<'a>,
    /// The model's reference task (task-relatedness and OTCE), when it has one.
    pub reference: Option<Samples<'a>>,
    /// The source head's class probabilities on the target fitting sample, row-major with
    /// the given number of columns (LEEP and NCE), when the model has a head.
    pub head_probabilities: Option<(&'a [f64], usize)>,
    /// Task-relatedness settings; its `seed` and `unlabeled` are set from the call.
    pub relatedness: &'a RelatednessConfig,
    /// Seed of the estimator.
    pub seed: u64,
    /// Device of the Sinkhorn solver.
    pub device: &'a Device,
}

impl ScoreKind {
    /// Every score, in the order of `cells.csv`.
    pub const ALL: [ScoreKind; 9] = [
        Self::Relatedness,
        Self::RelatednessUnlabeled,
        Self::Logme,
        Self::Leep,
        Self::Nce,
        Self::Hscore,
        Self::HscoreShrinkage,
        Self::Otce,
        Self::Knn,
    ];

    /// The name used in sweep and zoo files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Relatedness => "relatedness",
            Self::RelatednessUnlabeled => "relatedness_unlabeled",
            Self::Logme => "logme",
            Self::Leep => "leep",
            Self::Nce => "nce",
            Self::Hscore => "hscore",
            Self::HscoreShrinkage => "hscore_shrinkage",
            Self::Otce => "otce",
            Self::Knn => "knn",
        }
    }

    /// The score of this name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Every name, for error messages.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|k| k.as_str()).collect()
    }

    /// Whether the score needs the source model's reference task.
    pub fn needs_reference(self) -> bool {
        matches!(
            self,
            Self::Relatedness | Self::RelatednessUnlabeled | Self::Otce
        )
    }

    /// Whether the score needs the source head's probabilities on the target.
    pub fn needs_head(self) -> bool {
        matches!(self, Self::Leep | Self::Nce)
    }

    /// The columns this score reports, the first one being the score itself.
    pub fn columns(self) -> &'static [Column] {
        const LOGME: [Column; 1] = [larger("logme")];
        const LEEP: [Column; 1] = [larger("leep")];
        const NCE: [Column; 1] = [larger("nce")];
        const HSCORE: [Column; 1] = [larger("hscore")];
        const HSCORE_SHRINKAGE: [Column; 1] = [larger("hscore_shrinkage")];
        const OTCE: [Column; 1] = [larger("otce")];
        const KNN: [Column; 1] = [larger("knn")];
        match self {
            Self::Relatedness => &RELATEDNESS,
            Self::RelatednessUnlabeled => &RELATEDNESS_UNLABELED,
            Self::Logme => &LOGME,
            Self::Leep => &LEEP,
            Self::Nce => &NCE,
            Self::Hscore => &HSCORE,
            Self::HscoreShrinkage => &HSCORE_SHRINKAGE,
            Self::Otce => &OTCE,
            Self::Knn => &KNN,
        }
    }

    /// The values of [`Self::columns`], in that order (NaN where the score does not apply:
    /// LEEP and NCE for a model without a head).
    pub fn compute(self, inputs: &ScoreInputs) -> Result<Vec<f64>> {
        let named = self.named_values(inputs)?;
        let columns = self.columns();
        let names: Vec<&str> = named.iter().map(|&(name, _)| name).collect();
        let expected: Vec<&str> = columns.iter().map(|c| c.name).collect();
        if names != expected {
            return Err(Error::Invalid(format!(
                "{} computed columns {names:?}, but declares {expected:?}",
                self.as_str()
            )));
        }
        Ok(named.into_iter().map(|(_, v)| v).collect())
    }

    fn named_values(self, inputs: &ScoreInputs) -> Result<Vec<(&'static str, f64)>> {
        let target = inputs.target.fit;
        let labels = || {
            target
                .labels
                .as_deref()
                .ok_or_else(|| Error::Invalid(format!("{} needs target labels", self.as_str())))
        };
        let reference = || {
            inputs.reference.ok_or_else(|| {
                Error::Invalid(format!(
                    "{} needs the model's reference task",
                    self.as_str()
                ))
            })
        };
        let x = as_f64(target);
        let m = Matrix::new(&x, target.n, target.d)?;
        let one = |v: f64| vec![(self.columns()[0].name, v)];
        Ok(match self {
            Self::Relatedness | Self::RelatednessUnlabeled => {
                let mut cfg = inputs.relatedness.clone();
                cfg.seed = inputs.seed;
                cfg.unlabeled = self == Self::RelatednessUnlabeled;
                let r = relatedness(reference()?, inputs.target, &cfg, inputs.device)?;
                let mut v = vec![
                    r.bound,
                    r.reference_loss,
                    r.label_entropy,
                    r.wasserstein,
                    r.distribution_term,
                    r.tau,
                    r.tau_reference,
                    f64::from(u8::from(r.lipschitz_holds)),
                ];
                if self == Self::Relatedness {
                    v.push(r.reference_accuracy);
                    v.push(r.target_accuracy.unwrap_or(f64::NAN));
                    v.push(r.target_loss.unwrap_or(f64::NAN));
                } else {
                    v.push(r.pseudo_label_accuracy.unwrap_or(f64::NAN));
                }
                self.columns().iter().map(|c| c.name).zip(v).collect()
            }
            Self::Logme => one(baselines::logme(m, labels()?)?),
            Self::Hscore => one(baselines::h_score(m, labels()?)?),
            Self::HscoreShrinkage => one(baselines::shrinkage_h_score(m, labels()?)?),
            Self::Knn => one(baselines::knn_accuracy(m, labels()?, KNN_K)?),
            Self::Leep | Self::Nce => {
                let Some((p, c)) = inputs.head_probabilities else {
                    return Ok(one(f64::NAN));
                };
                if self == Self::Leep {
                    one(baselines::leep(Matrix::new(p, target.n, c)?, labels()?)?)
                } else {
                    one(baselines::nce(&argmax_rows(p, c), labels()?)?)
                }
            }
            Self::Otce => {
                let r = reference()?.fit;
                let rx = as_f64(r);
                let rl = r.labels.as_deref().ok_or_else(|| {
                    Error::Invalid("OTCE: reference features without labels".into())
                })?;
                one(baselines::otce(Matrix::new(&rx, r.n, r.d)?, rl, m, labels()?)?.0)
            }
        })
    }
}

/// Whether a larger value of the score column `name` predicts better transfer; `None` for a
/// column no score reports.
pub fn larger_is_better(name: &str) -> Option<bool> {
    ScoreKind::ALL
        .iter()
        .flat_map(|k| k.columns())
        .find(|c| c.name == name)
        .map(|c| c.larger_is_better)
}

/// The most probable class of each row of a row-major `(n, c)` matrix (the first on ties):
/// the source head's predictions that NCE takes.
pub fn argmax_rows(p: &[f64], c: usize) -> Vec<u32> {
    p.chunks(c.max(1))
        .map(|r| {
            (0..r.len())
                .rev()
                .max_by(|&a, &b| r[a].total_cmp(&r[b]))
                .map_or(0, |z| z as u32)
        })
        .collect()
}

fn as_f64(set: &FeatureSet) -> Vec<f64> {
    set.values.iter().map(|&v| f64::from(v)).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Two well-separated classes in 3 dimensions, `n` per class.
    fn blobs(n: usize, shift: f32, seed: u64) -> FeatureSet {
        let mut rng = taskrel_testkit::fixtures::Lcg(seed);
        let mut noise = || rng.symmetric() as f32 / 2.0;
        let mut values = Vec::new();
        let mut labels = Vec::new();
        for class in 0..2u32 {
            for _ in 0..n {
                let centre = if class == 0 { -2.0 } else { 2.0 } + shift;
                values.extend([centre + noise(), noise(), -centre + noise()]);
                labels.push(class);
            }
        }
        FeatureSet {
            values,
            n: 2 * n,
            d: 3,
            labels: Some(labels),
            classes: vec!["a".into(), "b".into()],
            metadata: Default::default(),
        }
    }

    #[test]
    fn every_score_returns_the_columns_it_declares() {
        let (rf, re) = (blobs(20, 0.0, 1), blobs(10, 0.0, 2));
        let (tf, te) = (blobs(20, 0.5, 3), blobs(10, 0.5, 4));
        let probabilities: Vec<f64> = tf
            .labels
            .iter()
            .flatten()
            .flat_map(|&y| if y == 0 { [0.8, 0.2] } else { [0.3, 0.7] })
            .collect();
        let cfg = RelatednessConfig {
            iterations: 5,
            batch_size: 20,
            head_epochs: 5,
            ..Default::default()
        };
        let device = Device::Cpu;
        let inputs = ScoreInputs {
            target: Samples::new(&tf, &te),
            reference: Some(Samples::new(&rf, &re)),
            head_probabilities: Some((&probabilities, 2)),
            relatedness: &cfg,
            seed: 0,
            device: &device,
        };
        for kind in ScoreKind::ALL {
            let values = kind.compute(&inputs).unwrap();
            assert_eq!(values.len(), kind.columns().len(), "{}", kind.as_str());
            assert!(values[0].is_finite(), "{}: {}", kind.as_str(), values[0]);
            assert_eq!(ScoreKind::parse(kind.as_str()), Some(kind));
        }
        // Without a head, LEEP and NCE do not apply; without a reference, relatedness fails.
        let headless = ScoreInputs {
            head_probabilities: None,
            reference: None,
            ..inputs
        };
        assert!(ScoreKind::Leep.compute(&headless).unwrap()[0].is_nan());
        let err = ScoreKind::Otce.compute(&headless).unwrap_err().to_string();
        assert!(
            err.contains("otce needs the model's reference task"),
            "{err}"
        );
        // NCE's predictions: the head's argmax, the first class on ties.
        assert_eq!(argmax_rows(&[0.2, 0.8, 0.5, 0.5, 0.9, 0.1], 2), [1, 0, 0]);
    }

    #[test]
    fn orientation_is_declared_for_every_column() {
        assert_eq!(larger_is_better("bound"), Some(false));
        assert_eq!(larger_is_better("wasserstein_unlabeled"), Some(false));
        assert_eq!(larger_is_better("leep"), Some(true));
        assert_eq!(larger_is_better("accuracy_full"), None);
        let mut names: Vec<&str> = ScoreKind::ALL
            .iter()
            .flat_map(|k| k.columns())
            .map(|c| c.name)
            .collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "a column name is reported by two scores");
    }
}
