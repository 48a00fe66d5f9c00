//! Sweep files: the YAML as written ([`Sweep`], unknown keys rejected) and the validated
//! [`Plan`] of cells built from it before any compute.
//!
//! A sweep names source models and targets, crosses them (and seeds) into cells, and says how
//! sources are pre-trained, how targets are fine-tuned to measure accuracy, which scores are
//! computed and which correlations are reported. `configs/smoke.yaml` is a short example;
//! README "Sweeps" documents every key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::bail;
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use taskrel_data::{DatasetName, Modality};
use taskrel_models::train::{Mode, TrainConfig};
use taskrel_score::RelatednessConfig;

/// A sweep file as written. Every struct rejects unknown keys.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    /// Name of the results folder `results/<name>/`.
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: String,
    /// Source models by name.
    pub models: BTreeMap<String, ModelDef>,
    /// Targets by name.
    pub targets: BTreeMap<String, TargetDef>,
    /// Labelled-text CSV datasets by name, usable wherever a dataset is named.
    #[serde(default)]
    pub datasets: BTreeMap<String, CsvDef>,
    pub grid: Grid,
    /// Cells to leave out: every given key must match.
    #[serde(default)]
    pub exclude: Vec<Exclude>,
    /// How sources with `train_on` are trained (the seed is the cell's).
    #[serde(default)]
    pub pretrain: TrainConfig,
    /// How targets are fine-tuned to measure accuracy (the seed is the cell's).
    #[serde(default)]
    pub finetune: TrainConfig,
    #[serde(default)]
    pub measure: MeasureDef,
    #[serde(default)]
    pub score: ScoreDef,
    #[serde(default)]
    pub correlations: Vec<CorrelationDef>,
    /// Longest token sequence for text models.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// The file's text, to place errors in values that carry no position.
    #[serde(skip)]
    pub text: String,
}

fn default_max_len() -> usize {
    128
}

/// A source model.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDef {
    /// `lenet200`, a file or folder (relative paths are looked up under the data root
    /// first), or `hf:org/name`.
    pub from: Spanned<String>,
    /// Train (`lenet200`: from scratch) or fine-tune end to end (anything else) on this
    /// dataset's train split first, with the `pretrain` settings.
    #[serde(default)]
    pub train_on: Option<Spanned<String>>,
    /// The reference task: the dataset the model was trained on (default: `train_on`).
    #[serde(default)]
    pub reference: Option<Spanned<String>>,
    /// BERT models: keep the first this many transformer layers.
    #[serde(default)]
    pub layers: Option<usize>,
    /// BERT models: weights drawn from the seed (the untrained model of the same shape).
    #[serde(default)]
    pub random_init: bool,
    /// Models with `train_on`: this model's own training budget, over the sweep's `pretrain`.
    #[serde(default)]
    pub pretrain: SourceBudget,
}

/// A source's own training budget: each field given replaces the sweep's `pretrain` value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceBudget {
    /// Passes over the training data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    /// Samples per class drawn from the training split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class: Option<usize>,
    /// Train once with this seed, shared by every seed of the grid (a fixed source); absent:
    /// the source is trained once per grid seed with that seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl SourceBudget {
    /// The training settings for a cell of seed `cell_seed`, over the sweep's `base`.
    pub fn config(&self, base: &TrainConfig, cell_seed: u64) -> TrainConfig {
        let mut cfg = base.clone();
        cfg.epochs = self.epochs.unwrap_or(cfg.epochs);
        cfg.per_class = self.per_class.or(cfg.per_class);
        cfg.seed = self.seed.unwrap_or(cell_seed);
        cfg
    }
}

/// A target task.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetDef {
    pub dataset: Spanned<String>,
    /// Keep these classes only (relabelled 0..k in the given order).
    #[serde(default)]
    pub classes: Option<Spanned<Vec<u32>>>,
}

/// A labelled-text CSV defined in a sweep or zoo file (see `taskrel_data::table`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CsvDef {
    /// The file (plain, `.gz` or `.bz2`); a relative path is looked up under the data root
    /// first.
    pub csv: Spanned<String>,
    pub label_column: String,
    pub text_columns: Vec<String>,
    /// Keep only rows with these labels (all when absent).
    #[serde(default)]
    pub classes: Vec<String>,
    /// A column holding `train` or `test`; absent: a seeded split stratified by class.
    #[serde(default)]
    pub split_column: Option<String>,
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    #[serde(default)]
    pub split_seed: u64,
    /// Drop rows whose text is empty instead of failing.
    #[serde(default)]
    pub skip_empty: bool,
}

fn default_test_fraction() -> f64 {
    taskrel_data::table::DEFAULT_TEST_FRACTION
}

/// A dataset a plan names: one of the built-in datasets, or a CSV its file defines.
#[derive(Clone, Debug)]
pub enum DataRef {
    Named(DatasetName),
    Csv(std::sync::Arc<CsvData>),
}

/// A CSV dataset of a plan: where it is and how it is read.
#[derive(Debug)]
pub struct CsvData {
    pub path: PathBuf,
    pub spec: taskrel_data::table::TableSpec,
    /// Everything that determines its rows and split, for display and cache keys.
    key: String,
}

impl DataRef {
    pub fn modality(&self) -> Modality {
        match self {
            Self::Named(d) => d.modality(),
            Self::Csv(_) => Modality::Text,
        }
    }

    /// The train and test splits (a named dataset with one split on disk is split 80/20).
    pub fn load(
        &self,
        data_root: &Path,
    ) -> anyhow::Result<(taskrel_data::Dataset, taskrel_data::Dataset)> {
        match self {
            Self::Named(d) => {
                let both = taskrel_data::load(*d, &data_root.join(d.as_str()))?.train_test()?;
                Ok((both.train, both.test))
            }
            Self::Csv(c) => {
                let table = taskrel_data::table::load(&c.path, &c.spec)?;
                Ok((table.train, table.test))
            }
        }
    }

    /// A name for file names: the dataset's for a built-in one, a digest of the CSV's key.
    pub fn file_key(&self) -> String {
        match self {
            Self::Named(d) => d.as_str().to_string(),
            Self::Csv(c) => format!("csv-{}", &crate::engine::sha256_hex(c.key.as_bytes())[..16]),
        }
    }

    fn key(&self) -> &str {
        match self {
            Self::Named(d) => d.as_str(),
            Self::Csv(c) => &c.key,
        }
    }
}

impl fmt::Display for DataRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

impl PartialEq for DataRef {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for DataRef {}

impl std::hash::Hash for DataRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialOrd for DataRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for DataRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(other.key())
    }
}

/// The Cartesian product of cells.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    pub model: Vec<Spanned<String>>,
    pub target: Vec<Spanned<String>>,
    #[serde(default = "default_seeds")]
    pub seed: Vec<u64>,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

/// A pattern of cells to leave out.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Exclude {
    #[serde(default)]
    pub model: Option<Spanned<String>>,
    #[serde(default)]
    pub target: Option<Spanned<String>>,
    #[serde(default)]
    pub seed: Option<u64>,
}

/// What is measured on each target.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeasureDef {
    /// Fine-tuning modes whose test accuracy is measured.
    pub modes: Vec<Mode>,
    /// Test samples per class (at most; seeded) the accuracy is measured on; all when absent.
    pub test_per_class: Option<usize>,
}

impl Default for MeasureDef {
    fn default() -> Self {
        Self {
            modes: vec![Mode::LinearProbe],
            test_per_class: None,
        }
    }
}

/// What is scored on each cell.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreDef {
    pub scores: Vec<Spanned<String>>,
    /// Reference samples per class (from the reference task's train split).
    pub reference_per_class: usize,
    /// Target samples per class the scores see (from the target's train split).
    pub target_per_class: usize,
    /// Estimator settings (its `seed` and `unlabeled` are set per cell and score).
    pub relatedness: RelatednessConfig,
}

impl Default for ScoreDef {
    fn default() -> Self {
        Self {
            scores: vec![unplaced("relatedness".to_string())],
            reference_per_class: 100,
            target_per_class: 50,
            relatedness: RelatednessConfig::default(),
        }
    }
}

/// One correlation table.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CorrelationDef {
    /// A score column, e.g. `bound` or `bound_unlabeled`.
    pub score: Spanned<String>,
    /// A fine-tuning mode whose accuracy is the ground truth.
    pub measure: Spanned<String>,
    /// `all`, `target`, `model` or `seed`.
    #[serde(default = "default_group")]
    pub group_by: Spanned<String>,
}

/// A value with no place in the file (a default).
pub fn unplaced<T>(value: T) -> Spanned<T> {
    Spanned::new(
        value,
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}

fn default_group() -> Spanned<String> {
    unplaced("all".to_string())
}

pub use taskrel_score::ScoreKind;

/// How a source model is obtained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    /// `lenet200`, a resolved path, or `hf:org/name`.
    pub from: String,
    pub modality: Modality,
    pub train_on: Option<DataRef>,
    pub reference: Option<DataRef>,
    pub layers: Option<usize>,
    pub random_init: bool,
    /// Overrides of the sweep's `pretrain` (models with `train_on` only).
    pub pretrain: SourceBudget,
}

/// A target task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub dataset: DataRef,
    pub classes: Option<Vec<u32>>,
}

/// One unit of work: a source model, a target and a seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    pub id: String,
    pub model: String,
    pub target: String,
    pub seed: u64,
}

/// How cells are grouped for a correlation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    All,
    Target,
    Model,
    Seed,
}

impl GroupBy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Target => "target",
            Self::Model => "model",
            Self::Seed => "seed",
        }
    }
}

/// One correlation to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Correlation {
    pub score: String,
    pub measure: Mode,
    pub group_by: GroupBy,
}

/// A validated sweep.
#[derive(Debug)]
pub struct Plan {
    pub name: String,
    pub sources: BTreeMap<String, Source>,
    pub targets: BTreeMap<String, Target>,
    pub cells: Vec<Cell>,
    pub scores: Vec<ScoreKind>,
    pub correlations: Vec<Correlation>,
    /// The sweep with every default filled in, as parsed.
    pub sweep: Sweep,
}

/// An error at a place in the sweep file.
fn at<T>(
    path: &Path,
    spanned: &Spanned<T>,
    key: &str,
    message: impl fmt::Display,
) -> anyhow::Error {
    let loc = spanned.referenced;
    if loc.line() == 0 {
        anyhow::anyhow!("{}: {key}: {message}", path.display())
    } else {
        anyhow::anyhow!(
            "{}:{}:{}: {key}: {message}",
            path.display(),
            loc.line(),
            loc.column()
        )
    }
}

/// A built-in dataset, or one of `defined` (the file's `datasets:`).
fn dataset(
    path: &Path,
    key: &str,
    name: &Spanned<String>,
    defined: &BTreeMap<String, DataRef>,
) -> anyhow::Result<DataRef> {
    if let Some(d) = defined.get(&name.value) {
        return Ok(d.clone());
    }
    name.value
        .parse::<DatasetName>()
        .map(DataRef::Named)
        .map_err(|e| {
            let extra = if defined.is_empty() {
                String::new()
            } else {
                format!(
                    "; or a dataset defined under datasets: {}",
                    defined.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            at(path, name, key, format!("{e}{extra}"))
        })
}

/// The file's `datasets:`, checked (the files themselves only when `check_files`).
pub fn csv_datasets(
    path: &Path,
    defs: &BTreeMap<String, CsvDef>,
    data_root: &Path,
    check_files: bool,
) -> anyhow::Result<BTreeMap<String, DataRef>> {
    let mut out = BTreeMap::new();
    for (key, def) in defs {
        let place = format!("datasets.{key}");
        if key.parse::<DatasetName>().is_ok() {
            return Err(at(
                path,
                &def.csv,
                &place,
                "this name is a built-in dataset's",
            ));
        }
        if def.text_columns.is_empty() || def.label_column.is_empty() {
            return Err(at(
                path,
                &def.csv,
                &place,
                "expected a label_column and at least one of text_columns",
            ));
        }
        if !(def.test_fraction > 0.0 && def.test_fraction < 1.0) {
            return Err(at(
                path,
                &def.csv,
                &format!("{place}.test_fraction"),
                format!(
                    "expected a fraction strictly between 0 and 1, got {}",
                    def.test_fraction
                ),
            ));
        }
        let given = PathBuf::from(&def.csv.value);
        let under_root = data_root.join(&given);
        let file = if given.is_relative() && under_root.is_file() {
            under_root
        } else {
            given
        };
        if check_files && !file.is_file() {
            return Err(at(
                path,
                &def.csv,
                &format!("{place}.csv"),
                format!(
                    "no file {} (relative paths are looked up under {} first)",
                    file.display(),
                    data_root.display()
                ),
            ));
        }
        let spec = taskrel_data::table::TableSpec {
            label_column: def.label_column.clone(),
            text_columns: def.text_columns.clone(),
            classes: def.classes.clone(),
            split_column: def.split_column.clone(),
            test_fraction: def.test_fraction,
            seed: def.split_seed,
            skip_empty: def.skip_empty,
        };
        let key_text = format!(
            "csv:{} (label {}; text {}; classes {}; {}; skip empty {})",
            file.display(),
            spec.label_column,
            spec.text_columns.join(","),
            if spec.classes.is_empty() {
                "all".to_string()
            } else {
                spec.classes.join(",")
            },
            match &spec.split_column {
                Some(c) => format!("split column {c}"),
                None => format!("test fraction {} seed {}", spec.test_fraction, spec.seed),
            },
            spec.skip_empty
        );
        out.insert(
            key.clone(),
            DataRef::Csv(std::sync::Arc::new(CsvData {
                path: file,
                spec,
                key: key_text,
            })),
        );
    }
    Ok(out)
}

/// Checks that `name` is a key of `map` (models or targets), else names the defined ones.
fn known<V>(
    path: &Path,
    map: &BTreeMap<String, V>,
    name: &Spanned<String>,
    key: &str,
    what: &str,
) -> anyhow::Result<()> {
    if map.contains_key(&name.value) {
        return Ok(());
    }
    let defined = map.keys().cloned().collect::<Vec<_>>().join(", ");
    Err(at(
        path,
        name,
        key,
        format!(
            "unknown {what} {:?}; {what}s defined: {defined}",
            name.value
        ),
    ))
}

/// Resolves a model's `from`, checking that local files exist, and tells its modality
/// ([`taskrel_models::ModelRef::modality`]).
fn resolve_from(
    path: &Path,
    key: &str,
    from: &Spanned<String>,
    data_root: &Path,
    check_files: bool,
) -> anyhow::Result<(String, Modality)> {
    let value = from.value.as_str();
    let modality = |resolved: &str| -> anyhow::Result<Modality> {
        let reference: taskrel_models::ModelRef =
            resolved.parse().map_err(|e| at(path, from, key, e))?;
        reference.modality().map_err(|e| at(path, from, key, e))
    };
    if value == "lenet200" || value.starts_with("hf:") || !check_files {
        return Ok((value.to_string(), modality(value)?));
    }
    let given = PathBuf::from(value);
    let resolved = [data_root.join(&given), given.clone()]
        .into_iter()
        .find(|p| p.exists())
        .ok_or_else(|| {
            at(
                path,
                from,
                key,
                format!(
                    "no such file or folder {value:?} (looked under {} and the working directory)",
                    data_root.display()
                ),
            )
        })?;
    looks_like_a_model(&resolved).map_err(|m| at(path, from, key, m))?;
    let resolved = resolved.display().to_string();
    let modality = modality(&resolved)?;
    Ok((resolved, modality))
}

/// Reads only headers: a `.pth` file must be a zip archive; a folder must hold a model
/// (`config.json` or `taskrel.json`) and a `model.safetensors` whose header parses.
fn looks_like_a_model(resolved: &Path) -> Result<(), String> {
    use std::io::Read;
    let shown = resolved.display();
    if resolved.is_file() {
        if resolved.extension().and_then(|e| e.to_str()) != Some("pth") {
            return Err(format!(
                "{shown} is not a model: expected a PyTorch .pth file or a model folder"
            ));
        }
        let mut magic = [0u8; 4];
        std::fs::File::open(resolved)
            .and_then(|mut f| f.read_exact(&mut magic))
            .map_err(|e| format!("{shown}: {e}"))?;
        if &magic != b"PK\x03\x04" {
            return Err(format!(
                "{shown} is not a PyTorch .pth file (no zip archive header)"
            ));
        }
        return Ok(());
    }
    if !["config.json", "taskrel.json"]
        .iter()
        .any(|f| resolved.join(f).is_file())
    {
        return Err(format!(
            "{shown} is not a model folder: expected config.json (a Hugging Face BERT) or taskrel.json (a taskrel checkpoint)"
        ));
    }
    let weights = resolved.join("model.safetensors");
    let header = || -> std::io::Result<Option<serde_json::Value>> {
        let mut f = std::fs::File::open(&weights)?;
        let len = f.metadata()?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n)?;
        let n = u64::from_le_bytes(n);
        if n > len.saturating_sub(8) || n > 100 << 20 {
            return Ok(None);
        }
        let mut text = vec![0u8; n as usize];
        f.read_exact(&mut text)?;
        Ok(serde_json::from_slice(&text).ok())
    };
    match header() {
        Ok(Some(serde_json::Value::Object(_))) => Ok(()),
        Ok(_) => Err(format!(
            "{}: not a safetensors file (its header does not parse)",
            weights.display()
        )),
        Err(e) => Err(format!("{}: {e}", weights.display())),
    }
}

/// Line and column (1-based) of the nested mapping key `keys` in block-style YAML `text`, or
/// of the deepest parent written there when the key itself is not (a default).
fn locate(text: &str, keys: &[&str]) -> Option<(usize, usize)> {
    let mut found = None;
    let mut parent_indent: Option<usize> = None;
    let mut lines = text.lines().enumerate();
    'keys: for key in keys {
        for (number, line) in lines.by_ref() {
            let body = line.trim_start();
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            let indent = line.len() - body.len();
            if parent_indent.is_some_and(|p| indent <= p) {
                break;
            }
            let written = body
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'));
            if written
                && parent_indent.is_none_or(|p| indent > p)
                && (parent_indent.is_some() || indent == 0)
            {
                found = Some((number + 1, indent + 1));
                parent_indent = Some(indent);
                continue 'keys;
            }
        }
        // Not a block key under its parent: a flow mapping on the parent's line, `{key: ...}`.
        if let Some((line, _)) = found
            && let Some(text_line) = text.lines().nth(line - 1)
        {
            let needle = format!("{key}:");
            let flow = text_line
                .match_indices(&needle)
                .find(|&(at, _)| text_line[..at].trim_end().ends_with(['{', ',']));
            if let Some((at, _)) = flow {
                found = Some((line, at + 1));
                continue;
            }
        }
        break;
    }
    found
}

/// An error at the key `keys` (a path of nested mapping keys) of the file `path` whose text is
/// `text`, placed at its line and column when the file writes it, else at its closest written
/// parent.
pub fn error_at(
    path: &Path,
    text: &str,
    keys: &[&str],
    message: impl fmt::Display,
) -> anyhow::Error {
    let key = keys.join(".");
    match locate(text, keys) {
        Some((line, column)) => {
            anyhow::anyhow!("{}:{line}:{column}: {key}: {message}", path.display())
        }
        None => anyhow::anyhow!("{}: {key}: {message}", path.display()),
    }
}

/// The settings an [`Engine`](crate::engine::Engine) trains, scores and measures with: a
/// sweep's, or a zoo's (which fine-tunes nothing and keeps `finetune` and `measure` at their
/// defaults).
#[derive(Clone, Copy, Debug)]
pub struct Settings<'a> {
    /// Longest token sequence for text models.
    pub max_len: usize,
    /// How sources with `train_on` are trained.
    pub pretrain: &'a TrainConfig,
    /// How targets are fine-tuned to measure accuracy.
    pub finetune: &'a TrainConfig,
    pub measure: &'a MeasureDef,
    pub score: &'a ScoreDef,
}

impl Settings<'_> {
    /// Counts, sizes and rates that cannot work, each placed in the file (`path`, `text`).
    pub fn check(&self, path: &Path, text: &str) -> anyhow::Result<()> {
        for (section, cfg) in [("pretrain", self.pretrain), ("finetune", self.finetune)] {
            if let Some((field, message)) = cfg.problems().into_iter().next() {
                return Err(error_at(path, text, &[section, field], message));
            }
        }
        if self.measure.test_per_class == Some(0) {
            return Err(error_at(
                path,
                text,
                &["measure", "test_per_class"],
                "expected a positive count, got 0",
            ));
        }
        for (field, value) in [
            ("reference_per_class", self.score.reference_per_class),
            ("target_per_class", self.score.target_per_class),
        ] {
            if value < 2 {
                return Err(error_at(
                    path,
                    text,
                    &["score", field],
                    format!("expected at least 2 samples per class, got {value}"),
                ));
            }
        }
        if let Some((field, message)) = self.score.relatedness.problems().into_iter().next() {
            return Err(error_at(
                path,
                text,
                &["score", "relatedness", field],
                message,
            ));
        }
        if self.max_len == 0 {
            return Err(error_at(
                path,
                text,
                &["max_len"],
                "expected a positive length, got 0",
            ));
        }
        Ok(())
    }
}

/// A results-folder name: letters, digits, `_`, `-` or `.`, not starting with `.`.
pub fn check_name(path: &Path, name: &Spanned<String>) -> anyhow::Result<String> {
    let trimmed = name.value.trim();
    if trimmed.is_empty()
        || trimmed.starts_with('.')
        || !trimmed
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        return Err(at(
            path,
            name,
            "name",
            "expected a folder name of letters, digits, '_', '-' or '.', not starting with '.'",
        ));
    }
    Ok(trimmed.to_string())
}

/// The keys of `section` (models, targets, datasets), each placed at `place`: letters,
/// digits, `_` and `-` only.
pub fn check_keys<'k>(
    path: &Path,
    keys: impl IntoIterator<Item = (&'static str, &'k String, &'k Spanned<String>)>,
) -> anyhow::Result<()> {
    for (section, key, place) in keys {
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(at(
                path,
                place,
                &format!("{section}.{key}"),
                "names may hold letters, digits, '_' and '-' only",
            ));
        }
    }
    Ok(())
}

/// The file's `models:` validated into sources: `from` resolved (and its files checked when
/// `check_files`), datasets known, modalities agreeing, budgets sensible.
pub fn sources(
    path: &Path,
    text: &str,
    models: &BTreeMap<String, ModelDef>,
    defined: &BTreeMap<String, DataRef>,
    data_root: &Path,
    check_files: bool,
) -> anyhow::Result<BTreeMap<String, Source>> {
    let mut sources = BTreeMap::new();
    for (key, def) in models {
        let (from, modality) = resolve_from(
            path,
            &format!("models.{key}.from"),
            &def.from,
            data_root,
            check_files,
        )?;
        let train_on = def
            .train_on
            .as_ref()
            .map(|d| dataset(path, &format!("models.{key}.train_on"), d, defined))
            .transpose()?;
        let reference = match &def.reference {
            Some(d) => Some(dataset(
                path,
                &format!("models.{key}.reference"),
                d,
                defined,
            )?),
            None => train_on.clone(),
        };
        if (def.layers.is_some() || def.random_init) && modality != Modality::Text {
            return Err(at(
                path,
                &def.from,
                &format!("models.{key}"),
                "`layers` and `random_init` apply to BERT models only",
            ));
        }
        if from == "lenet200" && train_on.is_none() {
            return Err(at(
                path,
                &def.from,
                &format!("models.{key}"),
                "lenet200 is trained from scratch: give `train_on: <dataset>`",
            ));
        }
        if train_on.is_none() && def.pretrain != SourceBudget::default() {
            return Err(at(
                path,
                &def.from,
                &format!("models.{key}.pretrain"),
                "a training budget applies to models with `train_on` only",
            ));
        }
        if def.pretrain.epochs == Some(0) || def.pretrain.per_class == Some(0) {
            return Err(error_at(
                path,
                text,
                &["models", key.as_str(), "pretrain"],
                "expected positive `epochs` and `per_class`",
            ));
        }
        for (what, d, spanned) in [
            ("train_on", &train_on, &def.train_on),
            ("reference", &reference, &def.reference),
        ] {
            if let (Some(d), Some(spanned)) = (d, spanned)
                && d.modality() != modality
            {
                return Err(at(
                    path,
                    spanned,
                    &format!("models.{key}.{what}"),
                    format!(
                        "{} is a {} model but {d} is a {} dataset",
                        from,
                        modality.as_str(),
                        d.modality().as_str()
                    ),
                ));
            }
        }
        sources.insert(
            key.clone(),
            Source {
                name: key.clone(),
                from,
                modality,
                train_on,
                reference,
                layers: def.layers,
                random_init: def.random_init,
                pretrain: def.pretrain.clone(),
            },
        );
    }
    Ok(sources)
}

/// The file's `score.scores`, each known, without repeats, in the order written.
pub fn scores(path: &Path, names: &[Spanned<String>]) -> anyhow::Result<Vec<ScoreKind>> {
    let mut scores = Vec::new();
    for s in names {
        let kind = ScoreKind::parse(&s.value).ok_or_else(|| {
            at(
                path,
                s,
                "score.scores",
                format!(
                    "unknown score {:?}; expected one of {}",
                    s.value,
                    ScoreKind::names().join(", ")
                ),
            )
        })?;
        if !scores.contains(&kind) {
            scores.push(kind);
        }
    }
    Ok(scores)
}

impl Sweep {
    /// Reads and parses a sweep file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let mut sweep: Self = crate::yaml::parse(&text, path)?;
        sweep.text = text;
        Ok(sweep)
    }

    /// An error at the key `keys` of the file (see [`error_at`]).
    pub fn error_at(
        &self,
        path: &Path,
        keys: &[&str],
        message: impl fmt::Display,
    ) -> anyhow::Error {
        error_at(path, &self.text, keys, message)
    }

    /// The settings sources are trained, scored and measured with.
    pub fn settings(&self) -> Settings<'_> {
        Settings {
            max_len: self.max_len,
            pretrain: &self.pretrain,
            finetune: &self.finetune,
            measure: &self.measure,
            score: &self.score,
        }
    }

    /// Validates everything before any compute: names, datasets, files (when `check_files`),
    /// modalities.
    pub fn plan(self, path: &Path, data_root: &Path, check_files: bool) -> anyhow::Result<Plan> {
        let name = check_name(path, &self.name)?;
        check_keys(
            path,
            self.models
                .iter()
                .map(|(k, d)| ("models", k, &d.from))
                .chain(self.targets.iter().map(|(k, d)| ("targets", k, &d.dataset)))
                .chain(self.datasets.iter().map(|(k, d)| ("datasets", k, &d.csv))),
        )?;
        self.settings().check(path, &self.text)?;
        let defined = csv_datasets(path, &self.datasets, data_root, check_files)?;
        let sources = sources(
            path,
            &self.text,
            &self.models,
            &defined,
            data_root,
            check_files,
        )?;
        let targets = self.targets(path, &defined)?;
        self.check_grid(path, &sources, &targets)?;
        let scores = scores(path, &self.score.scores)?;
        if self.measure.modes.is_empty() {
            bail!(
                "{}: measure.modes: expected linear_probe and/or full",
                path.display()
            );
        }
        let correlations = self.correlations(path, &scores)?;
        let cells = self.cells(path, &sources, &targets, &scores)?;
        Ok(Plan {
            name,
            sources,
            targets,
            cells,
            scores,
            correlations,
            sweep: self,
        })
    }

    /// The file's `targets:`: datasets known, class subsets within them.
    fn targets(
        &self,
        path: &Path,
        defined: &BTreeMap<String, DataRef>,
    ) -> anyhow::Result<BTreeMap<String, Target>> {
        let mut targets = BTreeMap::new();
        for (key, def) in &self.targets {
            let d = dataset(
                path,
                &format!("targets.{key}.dataset"),
                &def.dataset,
                defined,
            )?;
            if let Some(classes) = &def.classes {
                let mut seen = classes.value.clone();
                seen.sort_unstable();
                seen.dedup();
                if seen.len() != classes.value.len() || classes.value.len() < 2 {
                    return Err(at(
                        path,
                        classes,
                        &format!("targets.{key}.classes"),
                        "expected at least two distinct class indices",
                    ));
                }
                // A CSV's classes are known once it is read (checked with the sample sizes).
                let count = match &d {
                    DataRef::Named(named) => Some(named.num_classes()),
                    DataRef::Csv(_) => None,
                };
                if let Some(count) = count
                    && let Some(&bad) = seen.iter().find(|&&c| c as usize >= count)
                {
                    return Err(at(
                        path,
                        classes,
                        &format!("targets.{key}.classes"),
                        format!(
                            "class {bad} is outside {d}, whose classes are 0..{}",
                            count - 1
                        ),
                    ));
                }
            }
            targets.insert(
                key.clone(),
                Target {
                    name: key.clone(),
                    dataset: d,
                    classes: def.classes.as_ref().map(|c| c.value.clone()),
                },
            );
        }
        Ok(targets)
    }

    /// `grid` and `exclude` name defined models and targets; there is a seed; seeds are the
    /// grid's only.
    fn check_grid(
        &self,
        path: &Path,
        sources: &BTreeMap<String, Source>,
        targets: &BTreeMap<String, Target>,
    ) -> anyhow::Result<()> {
        let model_ref = |s: &Spanned<String>, key: &str| known(path, sources, s, key, "model");
        let target_ref = |s: &Spanned<String>, key: &str| known(path, targets, s, key, "target");
        for m in &self.grid.model {
            model_ref(m, "grid.model")?;
        }
        for t in &self.grid.target {
            target_ref(t, "grid.target")?;
        }
        for e in &self.exclude {
            if let Some(m) = &e.model {
                model_ref(m, "exclude.model")?;
            }
            if let Some(t) = &e.target {
                target_ref(t, "exclude.target")?;
            }
        }
        if self.grid.seed.is_empty() {
            bail!("{}: grid.seed: expected at least one seed", path.display());
        }
        if self.pretrain.seed != 0 || self.finetune.seed != 0 {
            bail!(
                "{}: pretrain.seed / finetune.seed: seeds are set per cell by grid.seed",
                path.display()
            );
        }
        Ok(())
    }

    /// The file's `correlations:`, each a column of `scores` against a measured mode.
    fn correlations(&self, path: &Path, scores: &[ScoreKind]) -> anyhow::Result<Vec<Correlation>> {
        let mut correlations = Vec::new();
        for c in &self.correlations {
            // A score, or one of the terms it writes (e.g. `wasserstein` alone).
            let columns: Vec<&str> = scores
                .iter()
                .flat_map(|k| k.columns().iter().map(|c| c.name))
                .collect();
            if !columns.contains(&c.score.value.as_str()) {
                return Err(at(
                    path,
                    &c.score,
                    "correlations.score",
                    format!(
                        "{:?} is not a score column of this sweep; expected one of {}",
                        c.score.value,
                        columns.join(", ")
                    ),
                ));
            }
            let measure = self
                .measure
                .modes
                .iter()
                .copied()
                .find(|m| m.as_str() == c.measure.value)
                .ok_or_else(|| {
                    at(
                        path,
                        &c.measure,
                        "correlations.measure",
                        "expected a mode listed in measure.modes",
                    )
                })?;
            let group_by = [GroupBy::All, GroupBy::Target, GroupBy::Model, GroupBy::Seed]
                .into_iter()
                .find(|g| g.as_str() == c.group_by.value)
                .ok_or_else(|| {
                    at(
                        path,
                        &c.group_by,
                        "correlations.group_by",
                        "expected all, target, model or seed",
                    )
                })?;
            correlations.push(Correlation {
                score: c.score.value.clone(),
                measure,
                group_by,
            });
        }
        Ok(correlations)
    }

    /// The grid's cells in plan order (model, then target, then seed), minus `exclude`; every
    /// pair of one modality, every source with a reference task when a score needs one.
    fn cells(
        &self,
        path: &Path,
        sources: &BTreeMap<String, Source>,
        targets: &BTreeMap<String, Target>,
        scores: &[ScoreKind],
    ) -> anyhow::Result<Vec<Cell>> {
        let mut cells = Vec::new();
        for m in &self.grid.model {
            let source = &sources[&m.value];
            for t in &self.grid.target {
                let target = &targets[&t.value];
                let seeds: Vec<u64> = self
                    .grid
                    .seed
                    .iter()
                    .copied()
                    .filter(|&seed| {
                        !self.exclude.iter().any(|e| {
                            e.model.as_ref().is_none_or(|x| x.value == m.value)
                                && e.target.as_ref().is_none_or(|x| x.value == t.value)
                                && e.seed.is_none_or(|x| x == seed)
                        })
                    })
                    .collect();
                if seeds.is_empty() {
                    // An excluded pair is never checked: exclusion is how a grid mixes
                    // modalities.
                    continue;
                }
                if source.modality != target.dataset.modality() {
                    return Err(at(
                        path,
                        t,
                        "grid.target",
                        format!(
                            "model {} is a {} model but target {} is a {} dataset (exclude the pair or split the grid)",
                            m.value,
                            source.modality.as_str(),
                            t.value,
                            target.dataset.modality().as_str()
                        ),
                    ));
                }
                if source.reference.is_none() && scores.iter().any(|s| s.needs_reference()) {
                    return Err(at(
                        path,
                        m,
                        "grid.model",
                        format!(
                            "model {} has no reference task; give `reference: <dataset>` in its definition",
                            m.value
                        ),
                    ));
                }
                for seed in seeds {
                    let id = format!("{}__{}__s{seed}", m.value, t.value);
                    if !cells.iter().any(|c: &Cell| c.id == id) {
                        cells.push(Cell {
                            id,
                            model: m.value.clone(),
                            target: t.value.clone(),
                            seed,
                        });
                    }
                }
            }
        }
        if cells.is_empty() {
            bail!(
                "{}: the grid minus `exclude` leaves no cells",
                path.display()
            );
        }
        Ok(cells)
    }
}

impl Plan {
    /// The settings sources are trained, scored and measured with.
    pub fn settings(&self) -> Settings<'_> {
        self.sweep.settings()
    }

    /// The target of a cell.
    pub fn target(&self, cell: &Cell) -> anyhow::Result<&Target> {
        self.targets.get(&cell.target).ok_or_else(|| {
            anyhow::anyhow!(
                "cell {}: target {} is not in the plan",
                cell.id,
                cell.target
            )
        })
    }

    /// The cells of shard `index` (1-based) of `count`: every `count`-th cell in plan order.
    pub fn shard(&self, index: usize, count: usize) -> Vec<&Cell> {
        self.cells
            .iter()
            .enumerate()
            .filter(|(i, _)| i % count == index - 1)
            .map(|(_, c)| c)
            .collect()
    }

    /// The `cells.csv` columns, in order.
    pub fn columns(&self) -> Vec<String> {
        let mut cols: Vec<String> = [
            "cell",
            "model",
            "target",
            "seed",
            "reference",
            "source_test_accuracy",
            "n_reference",
            "n_target",
        ]
        .map(String::from)
        .to_vec();
        for s in &self.scores {
            cols.extend(s.columns().iter().map(|c| c.name.to_string()));
        }
        for m in &self.sweep.measure.modes {
            cols.push(format!("accuracy_{}", m.as_str()));
            cols.push(format!("loss_{}", m.as_str()));
        }
        cols.push("seconds_source".into());
        cols.push("seconds_features".into());
        for s in &self.scores {
            cols.push(format!("seconds_{}", s.as_str()));
        }
        for m in &self.sweep.measure.modes {
            cols.push(format!("seconds_{}", m.as_str()));
        }
        cols
    }
}

/// Parses `--shard I/N`.
pub fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("expected I/N, got {s:?}"))?;
    let (i, n): (usize, usize) = (
        i.parse().map_err(|_| format!("bad shard index {i:?}"))?,
        n.parse().map_err(|_| format!("bad shard count {n:?}"))?,
    );
    if n == 0 || i == 0 || i > n {
        return Err(format!("shard {i}/{n}: expected 1 <= I <= N"));
    }
    Ok((i, n))
}
