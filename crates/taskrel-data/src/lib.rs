//! Datasets for taskrel, read from their standard files on local paths into memory.
//!
//! Five named sources, each read from the folder that holds its files (nothing is downloaded
//! here; `scripts/fetch-data.sh` fills `data/`), and any labelled-text CSV:
//!
//! | name | files | module |
//! |---|---|---|
//! | `mnist`, `fashion_mnist` | IDX, plain or `.gz` | [`mnist`] |
//! | `usps` | ESL `zip.{train,test}.gz` or LIBSVM `usps{,.t}.bz2` | [`usps`] |
//! | `ag_news`, `dbpedia` | Zhang et al. 2015 CSV + `classes.txt` | [`csv_text`] |
//! | `csv:PATH` | a CSV with a header, a label column and text columns | [`table`] |
//!
//! A [`Dataset`] keeps images as u8 `(n, c, h, w)` or texts as strings, with labels and class
//! names, and offers class subsets, stratified sampling and seeded splits.

mod dataset;
mod error;
mod files;

pub mod csv_text;
pub mod mnist;
pub mod samples;
pub mod table;
pub mod usps;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

pub use dataset::{Dataset, Images, Inputs, Modality};
pub use error::{Error, Result};

/// The datasets taskrel knows by name, spelled as on the command line and in configs.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum DatasetName {
    /// MNIST handwritten digits, 28x28 grey.
    Mnist,
    /// Fashion-MNIST clothing images, 28x28 grey.
    FashionMnist,
    /// USPS handwritten digits, 16x16 grey.
    Usps,
    /// AG News topic classification, 4 classes.
    AgNews,
    /// DBpedia-14 ontology classification, 14 classes.
    Dbpedia,
}

impl DatasetName {
    /// Every dataset, in documentation order.
    pub const ALL: [DatasetName; 5] = [
        Self::Mnist,
        Self::FashionMnist,
        Self::Usps,
        Self::AgNews,
        Self::Dbpedia,
    ];

    /// The name as written in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mnist => "mnist",
            Self::FashionMnist => "fashion_mnist",
            Self::Usps => "usps",
            Self::AgNews => "ag_news",
            Self::Dbpedia => "dbpedia",
        }
    }

    /// Image or text.
    pub fn modality(self) -> Modality {
        match self {
            Self::Mnist | Self::FashionMnist | Self::Usps => Modality::Image,
            Self::AgNews | Self::Dbpedia => Modality::Text,
        }
    }

    /// Number of classes the loader gives the dataset.
    pub fn num_classes(self) -> usize {
        match self {
            Self::Mnist | Self::FashionMnist | Self::Usps => 10,
            Self::AgNews => 4,
            Self::Dbpedia => 14,
        }
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DatasetName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| {
                let valid: Vec<&str> = Self::ALL.iter().map(|d| d.as_str()).collect();
                Error::Invalid(format!(
                    "unknown dataset {s:?}, expected one of: {}",
                    valid.join(", ")
                ))
            })
    }
}

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitName {
    /// The training split.
    Train,
    /// The test split.
    Test,
}

impl SplitName {
    /// `train` or `test`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Test => "test",
        }
    }
}

/// The splits of a dataset found on disk; at least one is present.
#[derive(Clone, Debug)]
pub struct Splits {
    /// The dataset these splits belong to.
    pub name: DatasetName,
    /// Training split, when its files exist.
    pub train: Option<Dataset>,
    /// Test split, when its files exist.
    pub test: Option<Dataset>,
}

impl Splits {
    /// The present splits, train first.
    pub fn iter(&self) -> impl Iterator<Item = (SplitName, &Dataset)> {
        [
            (SplitName::Train, &self.train),
            (SplitName::Test, &self.test),
        ]
        .into_iter()
        .filter_map(|(name, d)| d.as_ref().map(|d| (name, d)))
    }

    /// One split, or an error naming what exists when it is absent.
    pub fn get(&self, split: SplitName) -> Result<&Dataset> {
        let found = match split {
            SplitName::Train => self.train.as_ref(),
            SplitName::Test => self.test.as_ref(),
        };
        found.ok_or_else(|| {
            let present: Vec<&str> = self.iter().map(|(s, _)| s.as_str()).collect();
            Error::Invalid(format!(
                "{}: no {} split on disk (present: {})",
                self.name,
                split.as_str(),
                present.join(", ")
            ))
        })
    }

    /// The train and test splits, each with a label saying where it comes from.
    ///
    /// A dataset with one split on disk (the mirrored AG News test file) is divided
    /// deterministically: a stratified split with [`DERIVED_TEST_FRACTION`] for test and seed
    /// [`DERIVED_SPLIT_SEED`], so the two never overlap, and the labels say so.
    /// Consumes the splits, so the datasets are moved, not copied.
    pub fn train_test(self) -> Result<TrainTest> {
        let name = self.name;
        if let Splits {
            train: Some(train),
            test: Some(test),
            ..
        } = self
        {
            return Ok(TrainTest {
                train,
                test,
                train_label: format!("{name}/train"),
                test_label: format!("{name}/test"),
            });
        }
        let Some((only_name, only)) = self.iter().next() else {
            return Err(Error::Invalid(format!("{name}: no split on disk")));
        };
        let (train, test) = only.split(DERIVED_TEST_FRACTION, DERIVED_SPLIT_SEED)?;
        let derived = |split: &str| {
            format!(
                "{name}/{split} (derived: stratified {}/{} split of the {} split, the only one on disk, seed {DERIVED_SPLIT_SEED})",
                100 - (DERIVED_TEST_FRACTION * 100.0).round() as u32,
                (DERIVED_TEST_FRACTION * 100.0).round() as u32,
                only_name.as_str()
            )
        };
        Ok(TrainTest {
            train,
            test,
            train_label: derived("train"),
            test_label: derived("test"),
        })
    }

    /// Class names (shared by all splits).
    pub fn classes(&self) -> &[String] {
        self.iter()
            .next()
            .map_or(&[], |(_, d)| d.classes.as_slice())
    }
}

/// Share of the test split made when a dataset ships one split only.
pub const DERIVED_TEST_FRACTION: f64 = 0.2;
/// Seed of the split made when a dataset ships one split only.
pub const DERIVED_SPLIT_SEED: u64 = 0;

/// A dataset's train and test splits ([`Splits::train_test`]), each with a label for outputs
/// and cache keys.
#[derive(Clone, Debug)]
pub struct TrainTest {
    /// The training split.
    pub train: Dataset,
    /// The test split.
    pub test: Dataset,
    /// `name/train`, or how the split was derived.
    pub train_label: String,
    /// `name/test`, or how the split was derived.
    pub test_label: String,
}

/// Loads every split of `name` found in `dir` (the folder holding that dataset's files).
///
/// Fails when no split exists, naming the files looked for, or when any file is malformed.
pub fn load(name: DatasetName, dir: &Path) -> Result<Splits> {
    if !dir.is_dir() {
        return Err(Error::Missing {
            dir: dir.to_path_buf(),
            tried: vec![format!("the {name} folder")],
            hint: files::FETCH_HINT.to_string(),
        });
    }
    let (train, test) = match name {
        DatasetName::Mnist | DatasetName::FashionMnist => {
            let classes: &[&str] = if name == DatasetName::Mnist {
                &mnist::MNIST_CLASSES
            } else {
                &mnist::FASHION_CLASSES
            };
            (
                mnist::load_split(dir, "train", classes)?,
                mnist::load_split(dir, "t10k", classes)?,
            )
        }
        DatasetName::Usps => (
            usps::load_split(dir, "train")?,
            usps::load_split(dir, "test")?,
        ),
        DatasetName::AgNews | DatasetName::Dbpedia => {
            let classes = csv_text::read_classes(&files::find(dir, &["classes.txt".to_string()])?)?;
            (
                csv_text::load_split(dir, "train", &classes)?,
                csv_text::load_split(dir, "test", &classes)?,
            )
        }
    };
    if train.is_none() && test.is_none() {
        let tried = match name {
            DatasetName::Mnist | DatasetName::FashionMnist => {
                vec![
                    "train-images-idx3-ubyte.gz".into(),
                    "t10k-images-idx3-ubyte.gz".into(),
                ]
            }
            DatasetName::Usps => [usps::names("train"), usps::names("test")].concat(),
            DatasetName::AgNews | DatasetName::Dbpedia => {
                vec!["train.csv".into(), "test.csv".into()]
            }
        };
        return Err(Error::Missing {
            dir: dir.to_path_buf(),
            tried,
            hint: files::FETCH_HINT.to_string(),
        });
    }
    Ok(Splits { name, train, test })
}
