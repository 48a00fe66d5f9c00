//! Running the cells of a [`Plan`]: source models trained or loaded, features extracted, scores
//! computed and targets fine-tuned, with models and features cached by content.
//!
//! Cache layout (under `--cache`, default `<results>/.cache`):
//! - `models/<key>/`: a trained source checkpoint, key = sha256 of the base model's weights
//!   hash, the training dataset and the training settings (seed included), plus
//!   `source.json` with its test accuracy;
//! - `features/<key>.safetensors`: key = sha256 of the weights hash, dataset, split, class
//!   subset, sample indices and the preprocessing description.
//!
//! Everything is written beside its final name under a name holding the process id and
//! renamed into place, so a killed run never leaves a half-written entry, and temporary files
//! of processes that no longer run are removed by the next run ([`clean_stale_temps`]). Each
//! entry carries a checksum of its content (features: `content_sha256` in the file's metadata;
//! models: `weights_sha256` in `source.json`), checked on every read: an entry that is
//! missing, unreadable or does not match is recomputed, with a line on stderr saying so, and
//! replaced by a rename (never removed first), so processes sharing one cache always find
//! either the old entry or the new one.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use taskrel_data::Dataset;
use taskrel_models::train::{self, TrainConfig};
use taskrel_models::{LoadOptions, Model, ModelRef};
use taskrel_score::{FeatureSet, Samples};

use crate::sweep::{Cell, DataRef, Settings, Source, Target};
use taskrel_score::{ScoreInputs, ScoreKind};

/// Bump when cached content would change for the same key (2: end-to-end fine-tuning of
/// BERT models trains the encoder, which version 1 left untouched).
const CACHE_VERSION: &str = "taskrel-cache-2";

/// One row of `cells.csv`: column -> number or text.
pub type Row = BTreeMap<String, Value>;

/// Hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn hash_file(path: &Path, hasher: &mut Sha256) -> anyhow::Result<()> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

/// Content hash of a model's weights: the file, or a folder's weight and config files.
fn weights_hash(from: &str) -> anyhow::Result<String> {
    let mut hasher = Sha256::new();
    let path = Path::new(from);
    if path.is_file() {
        hash_file(path, &mut hasher)?;
    } else if path.is_dir() {
        for name in ["model.safetensors", "config.json", "taskrel.json"] {
            let p = path.join(name);
            if p.is_file() {
                hasher.update(name.as_bytes());
                hash_file(&p, &mut hasher)?;
            }
        }
    } else {
        // `lenet200` (weights drawn from the seed) or a hub id.
        hasher.update(from.as_bytes());
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    {
        use std::io::Write;
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// A source model ready to use for one seed.
#[derive(Clone, Debug)]
pub struct ReadySource {
    pub reference: ModelRef,
    pub weights: String,
    pub test_accuracy: Option<f64>,
    /// BERT truncation and random initialisation, applied when `reference` is loaded.
    pub layers: Option<usize>,
    pub random_init: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct SourceRecord {
    test_accuracy: Option<f64>,
    seconds: f64,
    /// [`weights_hash`] of the checkpoint folder when it was written (trained sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weights_sha256: Option<String>,
}

/// The record of the trained source in `dir` when the entry is whole: `source.json` parses
/// and the checkpoint's content matches the checksum it holds.
fn cached_source(dir: &Path) -> Option<SourceRecord> {
    let path = dir.join("source.json");
    let bytes = std::fs::read(&path).ok()?;
    let record: SourceRecord = match serde_json::from_slice(&bytes) {
        Ok(record) => record,
        Err(e) => {
            damaged(&path, format!("not a source record ({e})"));
            return None;
        }
    };
    match weights_hash(&dir.display().to_string()) {
        Ok(hash) if record.weights_sha256.as_deref() == Some(hash.as_str()) => Some(record),
        Ok(_) => {
            damaged(dir, "the checkpoint does not match its checksum");
            None
        }
        Err(e) => {
            damaged(dir, e);
            None
        }
    }
}

/// Says on stderr that a cache entry cannot be used and is being recomputed.
fn damaged(path: &Path, why: impl std::fmt::Display) {
    eprintln!("cache: {}: {why}; recomputing it", path.display());
}

/// Checksum of a feature set's content: values, labels and class names.
fn content_sha256(set: &FeatureSet) -> String {
    let mut hasher = Sha256::new();
    for v in &set.values {
        hasher.update(v.to_le_bytes());
    }
    hasher.update(format!("{} {} {:?} {:?}", set.n, set.d, set.labels, set.classes).as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Puts the complete folder `tmp` at `dir`, replacing what is there by renames only: the old
/// entry is renamed aside, the new one renamed in, then the old one removed.
fn publish_dir(tmp: &Path, dir: &Path) -> anyhow::Result<()> {
    if std::fs::rename(tmp, dir).is_ok() {
        return Ok(());
    }
    let aside = dir.with_extension(format!("stale-{}", std::process::id()));
    std::fs::rename(dir, &aside).with_context(|| format!("moving {} aside", dir.display()))?;
    std::fs::rename(tmp, dir).with_context(|| format!("renaming to {}", dir.display()))?;
    std::fs::remove_dir_all(&aside).with_context(|| format!("removing {}", aside.display()))
}

/// Whether process `pid` runs on this machine (`None` where that cannot be told).
pub fn process_alive(pid: u32) -> Option<bool> {
    let proc = Path::new("/proc");
    proc.join("self")
        .exists()
        .then(|| proc.join(pid.to_string()).exists())
}

/// Removes the temporary files and folders (`*.tmp-<pid>*`, `*.stale-<pid>*`) in `dir` left by
/// processes that no longer run (where that cannot be told: older than a day). Returns how
/// many were removed.
pub fn clean_stale_temps(dir: &Path) -> anyhow::Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = ["tmp-", "stale-"].iter().find_map(|mark| {
            let at = name.find(&format!(".{mark}"))? + mark.len() + 1;
            let digits: String = name[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse::<u32>().ok()
        });
        let Some(pid) = pid else { continue };
        if pid == std::process::id() {
            continue;
        }
        let stale = match process_alive(pid) {
            Some(alive) => !alive,
            None => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 86_400),
        };
        if stale {
            let path = entry.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            }
            .with_context(|| format!("removing {}", path.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Runs cells, holding loaded datasets and cache locations.
#[derive(Debug)]
pub struct Engine<'a> {
    sources: &'a BTreeMap<String, Source>,
    settings: Settings<'a>,
    data_root: PathBuf,
    cache: PathBuf,
    device: Device,
    /// Where `hf:` models missing from the cache are downloaded from; `None`: never.
    hub: Option<taskrel_models::hub::Download>,
    datasets: HashMap<DataRef, (Dataset, Dataset)>,
    /// Sources made ready, by name and training seed.
    ready: HashMap<(String, u64), ReadySource>,
    /// Seconds spent per stage in this process.
    pub stage_seconds: BTreeMap<String, f64>,
}

impl<'a> Engine<'a> {
    /// An engine for validated `sources` ([`crate::sweep::sources`]) with `settings`.
    pub fn new(
        sources: &'a BTreeMap<String, Source>,
        settings: Settings<'a>,
        data_root: &Path,
        cache: &Path,
        device: Device,
        hub: Option<taskrel_models::hub::Download>,
    ) -> Self {
        for sub in ["models", "features", "source-eval"] {
            // Best effort: a temporary file that cannot be removed now is tried again later.
            let _ = clean_stale_temps(&cache.join(sub));
        }
        Self {
            sources,
            settings,
            data_root: data_root.to_path_buf(),
            cache: cache.to_path_buf(),
            device,
            hub,
            datasets: HashMap::new(),
            ready: HashMap::new(),
            stage_seconds: BTreeMap::new(),
        }
    }

    fn options(&self, seed: u64, layers: Option<usize>, random_init: bool) -> LoadOptions {
        LoadOptions {
            device: self.device.clone(),
            seed,
            max_len: self.settings.max_len,
            hub_cache: None,
            hub_download: self.hub.clone(),
            layers,
            random_init,
        }
    }

    fn load_with(
        &self,
        reference: &ModelRef,
        seed: u64,
        layers: Option<usize>,
        random_init: bool,
    ) -> anyhow::Result<Model> {
        taskrel_models::load(reference, &self.options(seed, layers, random_init))
            .with_context(|| format!("loading model {reference}"))
    }

    fn load_ready(&self, ready: &ReadySource, seed: u64) -> anyhow::Result<Model> {
        self.load_with(&ready.reference, seed, ready.layers, ready.random_init)
    }

    /// Train and test splits of a dataset, loaded once.
    fn dataset(&mut self, name: &DataRef) -> anyhow::Result<&(Dataset, Dataset)> {
        if !self.datasets.contains_key(name) {
            let splits = name.load(&self.data_root)?;
            self.datasets.insert(name.clone(), splits);
        }
        self.datasets
            .get(name)
            .context("dataset vanished from the engine's table")
    }

    fn add_time(&mut self, stage: &str, since: Instant) -> f64 {
        let s = since.elapsed().as_secs_f64();
        *self.stage_seconds.entry(stage.to_string()).or_default() += s;
        s
    }

    /// The source model of `source` for `seed`: trained (or fine-tuned) and cached when it has
    /// `train_on`, else the given weights.
    fn source(&mut self, source: &Source, cell_seed: u64) -> anyhow::Result<ReadySource> {
        // A fixed source is the same model for every cell.
        let seed = source.pretrain.seed.unwrap_or(cell_seed);
        if let Some(ready) = self.ready.get(&(source.name.clone(), seed)) {
            return Ok(ready.clone());
        }
        let base: ModelRef = source.from.parse()?;
        let mut base_hash = weights_hash(&source.from)?;
        if source.layers.is_some() || source.random_init {
            base_hash = sha256_hex(
                format!(
                    "{base_hash} layers {:?} random {}",
                    source.layers, source.random_init
                )
                .as_bytes(),
            );
        }
        let ready = match &source.train_on {
            None => {
                let mut ready = ReadySource {
                    reference: base,
                    weights: base_hash,
                    test_accuracy: None,
                    layers: source.layers,
                    random_init: source.random_init,
                };
                if let Some(d) = &source.reference {
                    ready.test_accuracy = self.source_accuracy(&ready, seed, d)?;
                }
                ready
            }
            Some(train_on) => {
                let cfg: TrainConfig = source.pretrain.config(self.settings.pretrain, seed);
                let key = sha256_hex(
                    serde_json::to_string(&json!({
                        "version": CACHE_VERSION, "base": base_hash, "train_on": train_on.to_string(),
                        "config": cfg, "max_len": self.settings.max_len,
                    }))?
                    .as_bytes(),
                );
                let dir = self.cache.join("models").join(&key);
                let record = match cached_source(&dir) {
                    Some(record) => record,
                    None => {
                        let model =
                            self.load_with(&base, seed, source.layers, source.random_init)?;
                        self.train_source(model, &base, &source.from, train_on, &cfg, &dir)?
                    }
                };
                ReadySource {
                    weights: record.weights_sha256.unwrap_or_default(),
                    reference: ModelRef::Path(dir),
                    test_accuracy: record.test_accuracy,
                    layers: None,
                    random_init: false,
                }
            }
        };
        self.ready
            .insert((source.name.clone(), seed), ready.clone());
        Ok(ready)
    }

    fn train_source(
        &mut self,
        mut model: Model,
        base: &ModelRef,
        from: &str,
        train_on: &DataRef,
        cfg: &TrainConfig,
        dir: &Path,
    ) -> anyhow::Result<SourceRecord> {
        let start = Instant::now();
        let train_set = self.dataset(train_on)?.0.clone();
        if *base == ModelRef::Lenet200 {
            train::train(&mut model, &train_set, cfg, true)?;
        } else {
            train::fine_tune(&mut model, &train_set, train::Mode::Full, cfg, true)?;
        }
        // The whole test split, so that sweeps and zoos with other budgets share the entry.
        let test_set = self.dataset(train_on)?.1.clone();
        let test = train::evaluate(&model, &test_set, 256, true)?;
        model.spec.origin = format!("{from} trained on {train_on}/train (seed {})", cfg.seed);
        let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        model.save(&tmp)?;
        let record = SourceRecord {
            test_accuracy: Some(test.accuracy),
            seconds: start.elapsed().as_secs_f64(),
            weights_sha256: Some(weights_hash(&tmp.display().to_string())?),
        };
        write_atomic(
            &tmp.join("source.json"),
            serde_json::to_string_pretty(&record)?.as_bytes(),
        )?;
        publish_dir(&tmp, dir)?;
        self.add_time("source", start);
        Ok(record)
    }

    /// The test split a source is evaluated on: `measure.test_per_class` per class (seed 0)
    /// when set, else all of it.
    fn source_test_set(&mut self, name: &DataRef) -> anyhow::Result<Dataset> {
        let per_class = self.settings.measure.test_per_class;
        let test = &self.dataset(name)?.1;
        Ok(match per_class {
            Some(n) => test.select(&test.sample_at_most_per_class(n, 0))?,
            None => test.clone(),
        })
    }

    /// Test accuracy of a given model's own head on its reference task, when the head fits.
    fn source_accuracy(
        &mut self,
        ready: &ReadySource,
        seed: u64,
        reference: &DataRef,
    ) -> anyhow::Result<Option<f64>> {
        let hash = &ready.weights;
        let path = self.cache.join("source-eval").join(format!(
            "{hash}-{}-{}.json",
            reference.file_key(),
            self.settings
                .measure
                .test_per_class
                .map_or("all".to_string(), |n| n.to_string())
        ));
        if let Ok(bytes) = std::fs::read(&path) {
            match serde_json::from_slice::<SourceRecord>(&bytes) {
                Ok(record) => return Ok(record.test_accuracy),
                Err(e) => damaged(&path, format!("not a source record ({e})")),
            }
        }
        let start = Instant::now();
        let model = self.load_ready(ready, seed)?;
        let test_set = self.source_test_set(reference)?;
        let accuracy = if model.has_head() && model.spec.num_classes() == test_set.num_classes() {
            Some(train::evaluate(&model, &test_set, 256, true)?.accuracy)
        } else {
            None
        };
        let record = SourceRecord {
            test_accuracy: accuracy,
            seconds: start.elapsed().as_secs_f64(),
            weights_sha256: None,
        };
        write_atomic(&path, serde_json::to_string_pretty(&record)?.as_bytes())?;
        self.add_time("source", start);
        Ok(accuracy)
    }

    /// Features of `data[indices]`, from the cache when present.
    fn features(
        &mut self,
        model: &Model,
        weights: &str,
        label: &str,
        data: &Dataset,
        indices: &[usize],
    ) -> anyhow::Result<FeatureSet> {
        let preprocessing = model.preprocessing(data)?;
        let key = sha256_hex(
            serde_json::to_string(&json!({
                "version": CACHE_VERSION, "weights": weights, "data": label,
                "indices": indices, "preprocessing": preprocessing,
            }))?
            .as_bytes(),
        );
        let path = self
            .cache
            .join("features")
            .join(format!("{key}.safetensors"));
        if path.is_file() {
            match FeatureSet::load(&path) {
                Ok(set) if set.metadata.get("content_sha256") == Some(&content_sha256(&set)) => {
                    return Ok(set);
                }
                Ok(_) => damaged(&path, "its content does not match its checksum"),
                Err(e) => damaged(&path, e),
            }
        }
        let start = Instant::now();
        let tensor = train::features(model, data, indices, 256, true)?;
        let (n, d) = tensor.dims2()?;
        let values = tensor.flatten_all()?.to_vec1::<f32>()?;
        let labels: Vec<u32> = indices.iter().map(|&i| data.labels[i]).collect();
        let metadata = BTreeMap::from([
            ("dataset".to_string(), label.to_string()),
            ("preprocessing".to_string(), preprocessing),
            ("weights_sha256".to_string(), weights.to_string()),
        ]);
        let mut set = FeatureSet::new(values, n, d, Some(labels), data.classes.clone(), metadata)?;
        let checksum = content_sha256(&set);
        set.metadata.insert("content_sha256".into(), checksum);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        set.save(&tmp)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        self.add_time("features", start);
        Ok(set)
    }

    /// Runs one cell of a plan: `scores` on the target's train split, then fine-tuning
    /// measured on its test split; `stage` is told what is happening.
    pub fn run_cell(
        &mut self,
        cell: &Cell,
        target: &Target,
        scores: &[ScoreKind],
        stage: &dyn Fn(&str),
    ) -> anyhow::Result<Row> {
        let settings = self.settings;
        let (sample, target_train, target_test) = self.target_sample(cell, target)?;
        let (mut row, ready) = self.score_cell(cell, scores, &sample, stage)?;
        let test_set = match settings.measure.test_per_class {
            Some(n) => target_test.select(&target_test.sample_at_most_per_class(n, cell.seed))?,
            None => target_test,
        };
        for &mode in &settings.measure.modes {
            stage(&format!("fine-tune {}", mode.as_str()));
            let t = Instant::now();
            let mut model = self.load_ready(&ready, cell.seed)?;
            let mut cfg = settings.finetune.clone();
            cfg.seed = cell.seed;
            train::fine_tune(&mut model, &target_train, mode, &cfg, true)?;
            let eval = train::evaluate(&model, &test_set, 256, true)?;
            row.insert(format!("accuracy_{}", mode.as_str()), json!(eval.accuracy));
            row.insert(format!("loss_{}", mode.as_str()), num(Some(eval.loss)));
            let secs = self.add_time(mode.as_str(), t);
            row.insert(format!("seconds_{}", mode.as_str()), json!(secs));
        }
        Ok(row)
    }

    /// Recomputes `scores` of a finished cell (same samples, same seed) into its row, leaving
    /// every other column as it was: for a score added to a sweep or fixed after a run,
    /// without fine-tuning again.
    pub fn rescore_cell(
        &mut self,
        cell: &Cell,
        target: &Target,
        scores: &[ScoreKind],
        row: &mut Row,
        stage: &dyn Fn(&str),
    ) -> anyhow::Result<()> {
        let (sample, _, _) = self.target_sample(cell, target)?;
        let (fresh, _) = self.score_cell(cell, scores, &sample, stage)?;
        for kind in scores {
            for col in kind.columns() {
                row.insert(
                    col.name.to_string(),
                    fresh.get(col.name).cloned().unwrap_or(Value::Null),
                );
            }
            let secs = format!("seconds_{}", kind.as_str());
            row.insert(
                secs.clone(),
                fresh.get(&secs).cloned().unwrap_or(Value::Null),
            );
        }
        Ok(())
    }

    /// A cell's scored target samples, and its whole train and test splits (fine-tuning
    /// draws from the first, accuracy is measured on the second).
    ///
    /// Scored samples come from the odd positions of each split (`Dataset::every_other(1)`),
    /// reference samples from the even ones, so that a target scored against a source whose
    /// reference task is the same dataset never shares a sample with the reference sample.
    /// The fitting sample is `target_per_class` per class of the train split's half, the
    /// evaluation sample at most as many of the test split's half.
    fn target_sample(
        &mut self,
        cell: &Cell,
        target: &Target,
    ) -> anyhow::Result<(TargetSample, Dataset, Dataset)> {
        let (target_train, target_test) = {
            let (train_set, test_set) = self.dataset(&target.dataset)?;
            match &target.classes {
                Some(c) => (train_set.subset_classes(c)?, test_set.subset_classes(c)?),
                None => (train_set.clone(), test_set.clone()),
            }
        };
        let subset = target
            .classes
            .as_ref()
            .map(|c| format!("{c:?}"))
            .unwrap_or_else(|| "all".into());
        let (fit_pool, eval_pool) = {
            let classes = target.classes.as_deref();
            let (train_set, test_set) = self.dataset(&target.dataset)?;
            (
                target_pool(train_set, classes)?,
                target_pool(test_set, classes)?,
            )
        };
        let per_class = self.settings.score.target_per_class;
        let sample = TargetSample {
            indices: fit_pool.sample_per_class(per_class, cell.seed)?,
            label: format!("{}/train odd half, classes {subset}", target.dataset),
            data: fit_pool,
            eval_indices: eval_pool.sample_at_most_per_class(per_class, cell.seed),
            eval_label: format!("{}/test odd half, classes {subset}", target.dataset),
            eval_data: eval_pool,
            labelled: true,
        };
        Ok((sample, target_train, target_test))
    }

    /// Features of the reference task of a source: fitting samples from the even half of the
    /// reference dataset's train split, evaluation samples from the even half of its test
    /// split, `reference_per_class` per class (at most, for the evaluation samples).
    fn reference_features(
        &mut self,
        model: &Model,
        weights: &str,
        reference: &DataRef,
        seed: u64,
    ) -> anyhow::Result<(FeatureSet, FeatureSet)> {
        let per_class = self.settings.score.reference_per_class;
        let (train_half, test_half) = {
            let (train, test) = self.dataset(reference)?;
            (reference_pool(train)?, reference_pool(test)?)
        };
        let fit_idx = train_half.sample_per_class(per_class, seed)?;
        let eval_idx = test_half.sample_at_most_per_class(per_class, seed);
        let fit = self.features(
            model,
            weights,
            &format!("{reference}/train even half"),
            &train_half,
            &fit_idx,
        )?;
        let eval = self.features(
            model,
            weights,
            &format!("{reference}/test even half"),
            &test_half,
            &eval_idx,
        )?;
        Ok((fit, eval))
    }

    /// The source model of a cell and `scores` on a target sample (no fine-tuning).
    pub fn score_cell(
        &mut self,
        cell: &Cell,
        scores: &[ScoreKind],
        sample: &TargetSample,
        stage: &dyn Fn(&str),
    ) -> anyhow::Result<(Row, ReadySource)> {
        let settings = self.settings;
        let source = self.sources.get(&cell.model).with_context(|| {
            format!(
                "cell {}: model {} is not one of the engine's sources",
                cell.id, cell.model
            )
        })?;
        let mut row = Row::new();
        row.insert("cell".into(), json!(cell.id));
        row.insert("model".into(), json!(cell.model));
        row.insert("target".into(), json!(cell.target));
        row.insert("seed".into(), json!(cell.seed));

        stage("source model");
        let t = Instant::now();
        let ready = self.source(source, cell.seed)?;
        row.insert("seconds_source".into(), json!(t.elapsed().as_secs_f64()));
        row.insert("source_test_accuracy".into(), num(ready.test_accuracy));
        if scores.is_empty() {
            return Ok((row, ready));
        }

        stage("features");
        let t = Instant::now();
        let model = self.load_ready(&ready, cell.seed)?;
        let ref_feats = match &source.reference {
            Some(reference) => {
                row.insert("reference".into(), json!(reference.to_string()));
                let (fit, eval) =
                    self.reference_features(&model, &ready.weights, reference, cell.seed)?;
                row.insert("n_reference".into(), json!(fit.n));
                Some((fit, eval))
            }
            None => None,
        };
        let mut tgt_fit = self.features(
            &model,
            &ready.weights,
            &sample.label,
            &sample.data,
            &sample.indices,
        )?;
        let mut tgt_eval = self.features(
            &model,
            &ready.weights,
            &sample.eval_label,
            &sample.eval_data,
            &sample.eval_indices,
        )?;
        if !sample.labelled {
            tgt_fit.labels = None;
            tgt_eval.labels = None;
        }
        row.insert("n_target".into(), json!(tgt_fit.n));
        row.insert("seconds_features".into(), json!(t.elapsed().as_secs_f64()));

        // The source head's probabilities on the target, computed once for LEEP and NCE.
        let mut head: Option<Option<Vec<f64>>> = None;
        for &kind in scores {
            stage(kind.as_str());
            let t = Instant::now();
            let values = if kind.needs_reference() && ref_feats.is_none() {
                vec![f64::NAN; kind.columns().len()]
            } else {
                if kind.needs_head() && head.is_none() {
                    head = Some(model.head_probabilities(&tgt_fit.values, tgt_fit.n, tgt_fit.d)?);
                }
                let inputs = ScoreInputs {
                    target: Samples::new(&tgt_fit, &tgt_eval),
                    reference: ref_feats
                        .as_ref()
                        .map(|(fit, eval)| Samples::new(fit, eval)),
                    head_probabilities: head
                        .as_ref()
                        .and_then(|p| p.as_deref())
                        .map(|p| (p, p.len() / tgt_fit.n.max(1))),
                    relatedness: &settings.score.relatedness,
                    seed: cell.seed,
                    device: &self.device,
                };
                kind.compute(&inputs)?
            };
            for (col, v) in kind.columns().iter().zip(values) {
                row.insert(col.name.to_string(), num(Some(v)));
            }
            let secs = self.add_time(kind.as_str(), t);
            row.insert(format!("seconds_{}", kind.as_str()), json!(secs));
        }
        Ok((row, ready))
    }
}

/// The part of a split reference samples are drawn from: its even positions.
pub fn reference_pool(split: &Dataset) -> anyhow::Result<Dataset> {
    Ok(split.every_other(0)?)
}

/// The part of a split target samples are drawn from: its odd positions (disjoint from
/// [`reference_pool`]), restricted to `classes` when the target is a class subset.
pub fn target_pool(split: &Dataset, classes: Option<&[u32]>) -> anyhow::Result<Dataset> {
    let half = split.every_other(1)?;
    Ok(match classes {
        Some(c) => half.subset_classes(c)?,
        None => half,
    })
}

/// The target samples a cell is scored on: the fitting sample (`data[indices]`, also what
/// the baselines score) and the evaluation sample task-relatedness reports on
/// (`eval_data[eval_indices]`, disjoint from the fitting sample).
#[derive(Debug)]
pub struct TargetSample {
    pub data: Dataset,
    pub indices: Vec<usize>,
    /// Describes the data in cache keys (dataset, split, classes, or a folder).
    pub label: String,
    pub eval_data: Dataset,
    pub eval_indices: Vec<usize>,
    /// Describes the evaluation data in cache keys.
    pub eval_label: String,
    /// Whether the labels of `data` may be used.
    pub labelled: bool,
}

/// A number, or null when absent or not finite (JSON has no NaN).
fn num(v: Option<f64>) -> Value {
    match v {
        Some(v) if v.is_finite() => json!(v),
        _ => Value::Null,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
mod tests {
    use std::collections::HashSet;

    use taskrel_data::Dataset;

    use super::{reference_pool, target_pool};

    fn images(data: &Dataset, indices: &[usize]) -> HashSet<Vec<u8>> {
        let images = data.images().expect("an image dataset");
        indices.iter().map(|&i| images.image(i).to_vec()).collect()
    }

    /// A reference sample and a target sample of the same dataset share no sample, for any
    /// pair of seeds and for class-subset targets (generated digits, every image distinct).
    #[test]
    fn reference_and_target_samples_of_one_dataset_are_disjoint() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mnist");
        taskrel_testkit::fixtures::digits(
            &root,
            taskrel_testkit::fixtures::Layout::Digits,
            10,
            100,
            0,
        )
        .unwrap();
        let splits = taskrel_data::load(taskrel_data::DatasetName::Mnist, &root).unwrap();
        let test = splits.test.expect("mnist has a test split");
        let reference = reference_pool(&test).unwrap();
        let drawn = reference.sample_per_class(30, 0).unwrap();
        let ref_images = images(&reference, &drawn);
        assert_eq!(ref_images.len(), 300, "the generated images are distinct");
        for (classes, seed) in [(None, 0), (None, 1), (Some(&[3u32, 8][..]), 0)] {
            let target = target_pool(&test, classes).unwrap();
            let drawn = target.sample_per_class(30, seed).unwrap();
            let shared = images(&target, &drawn).intersection(&ref_images).count();
            assert_eq!(shared, 0, "classes {classes:?}, seed {seed}");
        }
        // The same draw from one pool for both would overlap heavily: the check bites.
        let same = reference.sample_per_class(30, 1).unwrap();
        assert!(images(&reference, &same).intersection(&ref_images).count() > 100);
    }
}
