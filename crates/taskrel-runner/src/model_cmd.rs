//! `taskrel train | finetune | eval | features | embed`: models on datasets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use taskrel_data::{Dataset, DatasetName, SplitName};
use taskrel_models::train::{self, Mode, OptimizerKind, Schedule, TrainConfig};
use taskrel_models::{LoadOptions, Model, ModelRef};
use taskrel_score::FeatureSet;

/// Where a dataset is read from.
#[derive(Debug, clap::Args)]
pub struct DataArgs {
    /// mnist, fashion_mnist, usps, ag_news or dbpedia.
    #[arg(long)]
    pub dataset: DatasetName,
    /// Folder holding the dataset's files (default: <data-root>/<dataset>).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Folder of fetched datasets and weights.
    #[arg(long, default_value = "data")]
    pub data_root: PathBuf,
}

/// How a model is loaded and run.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Longest token sequence for text models.
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub hub: HubArgs,
}

/// Whether `hf:org/name` models missing from the Hub cache are downloaded.
#[derive(Debug, Default, clap::Args)]
pub struct HubArgs {
    /// Never download: `hf:` models must be in the Hugging Face cache (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
}

impl HubArgs {
    /// Downloads from `HF_ENDPOINT` (default the Hub), with progress bars unless `quiet`;
    /// `None` when `--offline` or `HF_HUB_OFFLINE` forbids them.
    pub fn download(&self, quiet: bool) -> Option<taskrel_models::hub::Download> {
        (!self.offline && !taskrel_models::hub::offline_from_env())
            .then(|| taskrel_models::hub::Download::from_env(!quiet))
    }
}

/// A command-line value of any enum whose serde derive names its values (snake_case); the
/// error lists the accepted ones.
pub fn parse_enum<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|e| e.to_string())
}

/// Training hyper-parameters.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Learning rate of the new head, in both modes (default: --lr).
    #[arg(long)]
    pub head_lr: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// adamw or sgd.
    #[arg(long, default_value = "adamw", value_parser = parse_enum::<OptimizerKind>)]
    pub optimizer: OptimizerKind,
    /// constant or cosine.
    #[arg(long, default_value = "constant", value_parser = parse_enum::<Schedule>)]
    pub schedule: Schedule,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Train on this many samples per class (seeded, stratified).
    #[arg(long)]
    pub per_class: Option<usize>,
}

impl TrainArgs {
    fn config(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            head_lr: self.head_lr,
            weight_decay: self.weight_decay,
            momentum: self.momentum,
            optimizer: self.optimizer,
            schedule: self.schedule,
            seed: self.seed,
            per_class: self.per_class,
        }
    }
}

/// Loads one split (see [`taskrel_data::Splits::train_test`]), with a label saying where it
/// comes from.
pub fn load_split(args: &DataArgs, split: SplitName) -> anyhow::Result<(Dataset, String)> {
    let root = args
        .root
        .clone()
        .unwrap_or_else(|| args.data_root.join(args.dataset.as_str()));
    let both = taskrel_data::load(args.dataset, &root)?.train_test()?;
    Ok(if split == SplitName::Train {
        (both.train, both.train_label)
    } else {
        (both.test, both.test_label)
    })
}

fn load_model(reference: &str, run: &RunArgs, seed: u64) -> anyhow::Result<Model> {
    let reference: ModelRef = reference.parse()?;
    let options = LoadOptions {
        device: taskrel_models::device(&run.device)?,
        seed,
        max_len: run.max_len,
        hub_download: run.hub.download(run.quiet),
        ..Default::default()
    };
    taskrel_models::load(&reference, &options).with_context(|| format!("loading model {reference}"))
}

fn emit<T: Serialize>(json: bool, value: &T, human: impl FnOnce()) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human();
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct TrainReport {
    model: String,
    dataset: String,
    mode: Mode,
    config: TrainConfig,
    history: train::History,
    test: Option<train::Evaluation>,
    accuracy: Option<f64>,
    loss: Option<f64>,
    out: Option<String>,
}

/// `taskrel train` and `taskrel finetune`.
pub fn train_or_finetune(
    model_ref: &str,
    mode: Option<Mode>,
    data: &DataArgs,
    hp: &TrainArgs,
    run: &RunArgs,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let (train_set, train_label) = load_split(data, SplitName::Train)?;
    let test_set = load_split(data, SplitName::Test).ok();
    let mut model = load_model(model_ref, run, hp.seed)?;
    let cfg = hp.config();
    let history = match mode {
        None => train::train(&mut model, &train_set, &cfg, run.quiet)?,
        Some(mode) => train::fine_tune(&mut model, &train_set, mode, &cfg, run.quiet)?,
    };
    let test = match &test_set {
        Some((test_set, _)) => Some(train::evaluate(&model, test_set, 256, run.quiet)?),
        None => None,
    };
    if let Some(out) = out {
        model.spec.origin = format!(
            "{} {model_ref} on {train_label}",
            if mode.is_none() {
                "trained"
            } else {
                "fine-tuned"
            }
        );
        model
            .save(out)
            .with_context(|| format!("saving checkpoint to {}", out.display()))?;
    }
    let report = TrainReport {
        model: model_ref.to_string(),
        dataset: train_label,
        mode: history.mode,
        config: cfg,
        accuracy: test.as_ref().map(|t| t.accuracy),
        loss: test.as_ref().map(|t| t.loss),
        history,
        test,
        out: out.map(|p| p.display().to_string()),
    };
    emit(run.json, &report, || {
        println!(
            "{} {} on {} ({} samples; {})",
            report.mode.as_str(),
            report.model,
            report.dataset,
            report.history.n_train,
            report.history.preprocessing
        );
        for e in &report.history.epochs {
            println!(
                "  epoch {:>3}  loss {:.4}  train acc {:.4}  {:.1} s  {:.0} samples/s",
                e.epoch, e.loss, e.accuracy, e.seconds, e.samples_per_second
            );
        }
        if let Some(t) = &report.test {
            println!(
                "  test: accuracy {:.4}  loss {:.4}  ({} samples)",
                t.accuracy, t.loss, t.n
            );
        }
        if let Some(out) = &report.out {
            println!("  saved to {out}");
        }
    })
}

#[derive(Debug, Serialize)]
struct EvalReport {
    model: String,
    dataset: String,
    accuracy: f64,
    loss: f64,
    n: usize,
    preprocessing: String,
    seconds: f64,
}

/// `taskrel eval`.
pub fn eval(
    model_ref: &str,
    data: &DataArgs,
    split: SplitName,
    run: &RunArgs,
) -> anyhow::Result<()> {
    let (set, label) = load_split(data, split)?;
    let model = load_model(model_ref, run, 0)?;
    let e = train::evaluate(&model, &set, 256, run.quiet)?;
    let report = EvalReport {
        model: model_ref.to_string(),
        dataset: label,
        accuracy: e.accuracy,
        loss: e.loss,
        n: e.n,
        preprocessing: e.preprocessing,
        seconds: e.seconds,
    };
    emit(run.json, &report, || {
        println!(
            "{} on {}: accuracy {:.4}, loss {:.4} ({} samples)",
            report.model, report.dataset, report.accuracy, report.loss, report.n
        );
        println!("  preprocessing: {}", report.preprocessing);
    })
}

/// `taskrel features`.
pub fn features(
    model_ref: &str,
    data: &DataArgs,
    split: SplitName,
    per_class: Option<usize>,
    seed: u64,
    run: &RunArgs,
    out: &Path,
) -> anyhow::Result<()> {
    let (set, label) = load_split(data, split)?;
    let indices: Vec<usize> = match per_class {
        Some(n) => set.sample_per_class(n, seed)?,
        None => (0..set.len()).collect(),
    };
    let model = load_model(model_ref, run, seed)?;
    let preprocessing = model.preprocessing(&set)?;
    let tensor = train::features(&model, &set, &indices, 256, run.quiet)?;
    let (n, d) = tensor.dims2()?;
    let values = tensor.flatten_all()?.to_vec1::<f32>()?;
    let labels: Vec<u32> = indices.iter().map(|&i| set.labels[i]).collect();
    let metadata = BTreeMap::from([
        ("model".to_string(), model_ref.to_string()),
        ("model_origin".to_string(), model.spec.origin.clone()),
        ("dataset".to_string(), label.clone()),
        (
            "per_class".to_string(),
            per_class.map_or("all".into(), |n| n.to_string()),
        ),
        ("seed".to_string(), seed.to_string()),
        ("preprocessing".to_string(), preprocessing.clone()),
        ("indices".to_string(), serde_json::to_string(&indices)?),
    ]);
    let set = FeatureSet::new(values, n, d, Some(labels), set.classes.clone(), metadata)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    set.save(out)?;
    let report = serde_json::json!({
        "model": model_ref, "dataset": label, "n": n, "d": d, "preprocessing": preprocessing,
        "out": out.display().to_string(),
    });
    emit(run.json, &report, || {
        println!(
            "{n} x {d} features of {label} from {model_ref} -> {} ({preprocessing})",
            out.display()
        )
    })
}

/// `taskrel embed`.
pub fn embed(model_ref: &str, text: &str, run: &RunArgs) -> anyhow::Result<()> {
    let model = load_model(model_ref, run, 0)?;
    let data = Dataset {
        inputs: taskrel_data::Inputs::Texts(vec![text.to_string()]),
        labels: vec![0],
        classes: vec!["text".into()],
    };
    let v = train::features(&model, &data, &[0], 1, true)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let report =
        serde_json::json!({ "model": model_ref, "text": text, "dim": v.len(), "embedding": v });
    emit(run.json, &report, || {
        let head: Vec<String> = v.iter().take(8).map(|x| format!("{x:.4}")).collect();
        println!("{}-d embedding: [{}, ...]", v.len(), head.join(", "));
    })
}
