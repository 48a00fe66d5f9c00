//! `taskrel rank`: score every model of a zoo on a user's small target sample and rank them.
//!
//! A zoo file (`configs/zoos/*.yaml`) lists models as a sweep does (`from`, `train_on`,
//! `reference`) with the pre-training and scoring settings. Sources are trained once and
//! cached; features are cached by content, so ranking a second sample only extracts features.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use serde_saphyr::Spanned;
use taskrel_data::{Dataset, DatasetName, Images, Inputs, Modality};
use taskrel_models::train::TrainConfig;

use crate::engine::{Engine, Row, TargetSample, sha256_hex, write_atomic};
use crate::sweep::{
    Cell, CsvDef, Grid, MeasureDef, ModelDef, ScoreDef, ScoreKind, Sweep, TargetDef, unplaced,
};

/// A zoo file as written.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Zoo {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: String,
    pub models: BTreeMap<String, ModelDef>,
    /// Labelled-text CSVs by name, usable as `train_on` or `reference`.
    #[serde(default)]
    pub datasets: BTreeMap<String, CsvDef>,
    #[serde(default)]
    pub pretrain: TrainConfig,
    #[serde(default)]
    pub score: ScoreDef,
    #[serde(default = "default_max_len")]
    pub max_len: usize,
}

fn default_max_len() -> usize {
    128
}

/// Options of `taskrel rank`.
#[derive(Debug, clap::Args)]
pub struct RankOptions {
    /// Zoo file (configs/zoos/*.yaml).
    #[arg(long)]
    pub zoo: PathBuf,
    /// A fetched dataset as the target (its train split).
    #[arg(long, conflicts_with = "samples", required_unless_present = "samples")]
    pub target: Option<DatasetName>,
    /// Folder holding the target dataset's files (default: <data-root>/<target>).
    #[arg(long, requires = "target")]
    pub root: Option<PathBuf>,
    /// Your own sample: a folder of images (one sub-folder per class, or none for an
    /// unlabeled sample) or a CSV of texts (`label,text` or `text` rows).
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// Do not use target labels even when present (label-free task-relatedness only).
    #[arg(long)]
    pub unlabeled: bool,
    /// Target samples scored.
    #[arg(long, default_value_t = 300)]
    pub budget: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder of fetched datasets and weights.
    #[arg(long, default_value = "data")]
    pub data_root: PathBuf,
    /// Cache of trained sources and features.
    #[arg(long, default_value = "results/.cache")]
    pub cache: PathBuf,
    /// Also write rank.md and rank.json to this folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print JSON instead of the markdown table.
    #[arg(long, conflicts_with = "markdown")]
    pub json: bool,
    /// Print the markdown table only.
    #[arg(long)]
    pub markdown: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub hub: crate::model_cmd::HubArgs,
}

/// Verdict thresholds on the task-relatedness bound, derived from `results/digits` (96 digit
/// cells: eight fixed sources, four targets, three seeds; full fine-tuning on 100 images per
/// class; the bound at the authors' settings) by `scripts/calibrate_verdicts.py`: the largest
/// bound, rounded down to a multiple of 0.05, at or below which every cell reached at least
/// 90 % test accuracy. The 3 cells with a labelled bound at most 2.55 (6 cells label-free, at
/// most 2.95) reached 96.1 % or more; the next cells by bound are Fashion-MNIST cells at 83 %,
/// and above the thresholds every quarter of the cells by bound spans at least 77.6-95.8 %
/// accuracy, so no second threshold is supported: a larger bound gives no assurance either
/// way. README "Ranking a model zoo" explains them.
const WELL_LABELLED: f64 = 2.55;
const WELL_UNLABELED: f64 = 2.95;

/// `calibrated` is false for text models: the thresholds come from digit CNNs, and a text zoo's
/// bounds sit on another scale (3.5-7.2 in the text study, where 83 % and 28 % accuracy got
/// bounds 0.1 apart).
fn verdict(bound: f64, labelled: bool, calibrated: bool) -> &'static str {
    let well = if labelled {
        WELL_LABELLED
    } else {
        WELL_UNLABELED
    };
    if !bound.is_finite() {
        "no estimate (no reference task)"
    } else if !calibrated {
        "not calibrated for text (compare within the zoo)"
    } else if bound <= well {
        "likely to transfer well"
    } else {
        "no assurance (compare within the zoo)"
    }
}

/// Reads a user's own samples: a folder of images (one sub-folder per class, or images
/// directly inside for an unlabeled sample) or a CSV of texts (`text` or `label,text` rows).
fn read_samples(path: &Path) -> anyhow::Result<(Dataset, bool)> {
    if path.is_file() {
        return read_text_csv(path);
    }
    if !path.is_dir() {
        bail!("{}: no such file or folder", path.display());
    }
    let mut subdirs: Vec<PathBuf> = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
        let p = entry?.path();
        if p.is_dir() {
            subdirs.push(p);
        } else if is_image(&p) {
            files.push(p);
        }
    }
    subdirs.sort();
    files.sort();
    let labelled = !subdirs.is_empty();
    let root = path
        .canonicalize()
        .with_context(|| format!("resolving {}", path.display()))?;
    let mut labelled_files: Vec<(PathBuf, u32)> = Vec::new();
    let mut classes = Vec::new();
    if labelled {
        for (c, dir) in subdirs.iter().enumerate() {
            classes.push(
                dir.file_name()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default(),
            );
            let resolved = dir
                .canonicalize()
                .with_context(|| format!("resolving {}", dir.display()))?;
            if !resolved.starts_with(&root) {
                bail!(
                    "{}: the class folder points outside the sample folder (to {})",
                    dir.display(),
                    resolved.display()
                );
            }
            let mut inner: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("listing {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_image(p))
                .collect();
            if inner.is_empty() {
                bail!(
                    "{}: the class folder holds no .png/.jpg/.jpeg images",
                    dir.display()
                );
            }
            inner.sort();
            labelled_files.extend(inner.into_iter().map(|p| (p, c as u32)));
        }
    } else {
        classes.push("unlabeled".to_string());
        labelled_files.extend(files.into_iter().map(|p| (p, 0)));
    }
    if labelled_files.is_empty() {
        bail!(
            "{}: no .png/.jpg/.jpeg images found (expected one sub-folder per class, or images directly inside)",
            path.display()
        );
    }
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let mut shape: Option<(u32, u32, usize)> = None;
    for (file, label) in &labelled_files {
        let img = image::open(file).with_context(|| format!("decoding {}", file.display()))?;
        let channels = if img.color().has_color() { 3 } else { 1 };
        let (w, h) = (img.width(), img.height());
        match shape {
            None => shape = Some((w, h, channels)),
            Some(s) if s != (w, h, channels) => bail!(
                "{}: {w}x{h} with {channels} channel(s), but the first image is {}x{} with {} channel(s); \
                 resize the sample to one size",
                file.display(),
                s.0,
                s.1,
                s.2
            ),
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
    let (w, h, channels) = shape.context("no images")?;
    let images = Images {
        pixels,
        n: labels.len(),
        channels,
        height: h as usize,
        width: w as usize,
    };
    Ok((
        Dataset {
            inputs: Inputs::Images(images),
            labels,
            classes,
        },
        labelled,
    ))
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

fn read_text_csv(path: &Path) -> anyhow::Result<(Dataset, bool)> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
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
            anyhow::anyhow!("{}: line {line}: {e}", path.display())
        })?;
        let line = rec.position().map_or(last_line, |p| p.line());
        last_line = line;
        last_start = rec.position().map_or(last_start, |p| p.byte() as usize);
        let place = || format!("{}: line {line}", path.display());
        // A header row names the columns; it is not a sample.
        let fields: Vec<String> = rec.iter().map(|f| f.trim().to_ascii_lowercase()).collect();
        if texts.is_empty() && (fields == ["label", "text"] || fields == ["text"]) {
            continue;
        }
        if rec.len() > 2 {
            bail!(
                "{}: expected `label,text` or `text`, got {} fields (quote a text that holds commas)",
                place(),
                rec.len()
            );
        }
        let this_labelled = rec.len() == 2;
        if *labelled.get_or_insert(this_labelled) != this_labelled {
            bail!(
                "{}: expected {} field(s) like the first row (`label,text` or `text`)",
                place(),
                if this_labelled { 1 } else { 2 }
            );
        }
        let text = rec[rec.len() - 1].to_string();
        if text.trim().is_empty() {
            bail!("{}: the text is empty", place());
        }
        if this_labelled {
            let name = rec[0].trim().to_string();
            if name.is_empty() {
                bail!("{}: the label is empty", place());
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
    if taskrel_data::table::quote_left_open(&raw[last_start.min(raw.len())..]) {
        bail!(
            "{}: line {last_line}: a quoted field is not closed before the end of the file",
            path.display()
        );
    }
    if texts.is_empty() {
        bail!("{}: no rows", path.display());
    }
    let labelled = labelled.unwrap_or(false);
    Ok((
        Dataset {
            inputs: Inputs::Texts(texts),
            labels,
            classes: if labelled {
                names
            } else {
                vec!["unlabeled".into()]
            },
        },
        labelled,
    ))
}

/// The target sample: `budget` samples (stratified when labels are used, a seeded random
/// draw otherwise).
fn draw(data: &Dataset, labelled: bool, budget: usize, seed: u64) -> anyhow::Result<Vec<usize>> {
    if labelled {
        let per_class = (budget / data.num_classes().max(1)).max(2);
        Ok(data.sample_at_most_per_class(per_class, seed))
    } else {
        let mut all: Vec<usize> = (0..data.len()).collect();
        all.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        all.truncate(budget);
        all.sort_unstable();
        Ok(all)
    }
}

/// Splits the drawn sample into fitting and evaluation parts (seeded; per class when labels
/// are used): task-relatedness is fitted on the first and reported on the second.
fn hold_out(
    data: &Dataset,
    drawn: &[usize],
    labelled: bool,
    seed: u64,
) -> anyhow::Result<(Vec<usize>, Vec<usize>)> {
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
        if members.len() < 2 && !labelled {
            bail!(
                "the sample holds {} item(s): at least two are needed, one to fit on and one to evaluate on",
                members.len()
            );
        }
        if members.len() < 2 {
            bail!(
                "class {class} ({}) has {} sample(s) in the drawn sample: at least two are needed, one to fit on and one to evaluate on",
                data.classes
                    .get(class as usize)
                    .map_or("unnamed", String::as_str),
                members.len()
            );
        }
        members.shuffle(&mut rng);
        let n_eval = ((members.len() as f64 * crate::relatedness_cmd::EVAL_FRACTION).round()
            as usize)
            .clamp(1, members.len() - 1);
        eval.extend_from_slice(&members[..n_eval]);
        fit.extend_from_slice(&members[n_eval..]);
    }
    fit.sort_unstable();
    eval.sort_unstable();
    Ok((fit, eval))
}

/// `taskrel rank`.
pub fn rank(opts: &RankOptions) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&opts.zoo)
        .with_context(|| format!("reading {}", opts.zoo.display()))?;
    let zoo: Zoo = crate::yaml::parse(&text, &opts.zoo)?;
    let (data, labelled_data, what, modality) = match (&opts.target, &opts.samples) {
        (Some(name), None) => {
            let root = opts
                .root
                .clone()
                .unwrap_or_else(|| opts.data_root.join(name.as_str()));
            // The odd half of the train split, as sweeps score targets, so that the sample
            // never overlaps a reference sample of the same dataset (the even half).
            let ((train, label), _) = crate::model_cmd::train_test(*name, &root)?;
            (
                crate::engine::target_pool(&train, None)?,
                true,
                format!("{label}, odd half"),
                name.modality(),
            )
        }
        (None, Some(path)) => {
            let (data, labelled) = read_samples(path)?;
            let modality = data.modality();
            (
                data,
                labelled,
                format!("samples {}", path.display()),
                modality,
            )
        }
        _ => bail!("give either --target <dataset> or --samples <folder or csv>"),
    };
    let labelled = labelled_data && !opts.unlabeled;
    // A stand-in target of the right modality makes the zoo a one-target sweep; its data are
    // never read, the sample above is scored instead.
    let stand_in = match modality {
        Modality::Image => "mnist",
        Modality::Text => "ag_news",
    };
    let requested: Vec<ScoreKind> = zoo
        .score
        .scores
        .iter()
        .map(|s| {
            ScoreKind::parse(&s.value).ok_or_else(|| {
                let loc = s.referenced;
                anyhow::anyhow!(
                    "{}:{}:{}: score.scores: unknown score {:?}; expected one of {}",
                    opts.zoo.display(),
                    loc.line(),
                    loc.column(),
                    s.value,
                    ScoreKind::names().join(", ")
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let scores: Vec<ScoreKind> = if labelled {
        requested
            .iter()
            .copied()
            .filter(|k| *k != ScoreKind::RelatednessUnlabeled)
            .collect()
    } else {
        vec![ScoreKind::RelatednessUnlabeled]
    };
    // The plan validates models and targets only: models without a reference task are
    // allowed here and get no task-relatedness.
    let mut score_def = zoo.score;
    score_def.scores.clear();
    let sweep = Sweep {
        name: zoo.name,
        description: zoo.description,
        targets: BTreeMap::from([(
            "target".to_string(),
            TargetDef {
                dataset: unplaced(stand_in.to_string()),
                classes: None,
            },
        )]),
        grid: Grid {
            model: zoo.models.keys().map(|k| unplaced(k.clone())).collect(),
            target: vec![unplaced("target".to_string())],
            seed: vec![opts.seed],
        },
        models: zoo.models,
        datasets: zoo.datasets,
        exclude: Vec::new(),
        pretrain: zoo.pretrain,
        finetune: TrainConfig::default(),
        measure: MeasureDef::default(),
        score: score_def,
        correlations: Vec::new(),
        max_len: zoo.max_len,
        text: text.clone(),
    };
    let plan = sweep.plan(&opts.zoo, &opts.data_root, true)?;
    let drawn = draw(&data, labelled, opts.budget, opts.seed)?;
    let (indices, eval_indices) =
        hold_out(&data, &drawn, labelled, opts.seed).with_context(|| what.clone())?;
    let content = &sha256_hex(format!("{:?}", data.labels).as_bytes())[..16];
    let sample = TargetSample {
        label: format!(
            "{what} ({} fitting samples, content {content})",
            indices.len()
        ),
        eval_label: format!(
            "{what} ({} evaluation samples, content {content})",
            eval_indices.len()
        ),
        indices,
        eval_indices,
        eval_data: data.clone(),
        data,
        labelled,
    };
    let device = taskrel_models::device(&opts.device)?;
    let mut engine = Engine::new(
        &plan,
        &opts.data_root,
        &opts.cache,
        device,
        opts.hub.download(opts.quiet),
    );
    let bar = ProgressBar::new(plan.cells.len() as u64);
    if opts.quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("rank [{elapsed_precise}] {bar:30} {pos}/{len} models  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows: Vec<Row> = Vec::new();
    for cell in &plan.cells {
        let stage = |s: &str| bar.set_message(format!("{}: {s}", cell.model));
        let cell = Cell {
            id: cell.model.clone(),
            ..cell.clone()
        };
        let (row, _) = engine
            .score_cell(&cell, &scores, &sample, &stage)
            .with_context(|| format!("{what}: model {}", cell.model))?;
        rows.push(row);
        bar.inc(1);
    }
    bar.finish_and_clear();

    let key = if labelled { "bound" } else { "bound_unlabeled" };
    let value = |r: &Row, c: &str| r.get(c).and_then(Value::as_f64).unwrap_or(f64::NAN);
    rows.sort_by(|a, b| {
        let (x, y) = (value(a, key), value(b, key));
        // Finite bounds first, smallest first.
        x.is_nan().cmp(&y.is_nan()).then(x.total_cmp(&y))
    });
    let mut columns: Vec<String> = vec![key.to_string()];
    for s in &scores {
        for c in s.columns().iter().map(|c| c.name) {
            // The label-free terms other than tau are in the bound; the Lipschitz flag is in
            // the verdict.
            let shown = c != key
                && !c.starts_with("lipschitz_holds")
                && (!c.ends_with("_unlabeled") || c.starts_with("tau"));
            if shown {
                columns.push(c.to_string());
            }
        }
    }
    // Columns no model has a value for (e.g. pseudo-label agreement without labels) are left out.
    columns.retain(|c| rows.iter().any(|r| value(r, c).is_finite()));
    let calibrated = modality == Modality::Image;
    let flag = if labelled {
        "lipschitz_holds"
    } else {
        "lipschitz_holds_unlabeled"
    };
    // A bound whose Lipschitz constraint failed is not the paper's bound: say so first.
    let verdict_of = |r: &Row| -> String {
        let v = verdict(value(r, key), labelled, calibrated);
        if value(r, flag) == 0.0 {
            format!("{v}; h_R's Lipschitz constraint does not hold (bound not assured)")
        } else {
            v.to_string()
        }
    };
    let ranked: Vec<Value> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut o = serde_json::Map::new();
            o.insert("rank".into(), json!(i + 1));
            o.insert(
                "model".into(),
                r.get("model").cloned().unwrap_or(Value::Null),
            );
            for c in &columns {
                o.insert(c.clone(), r.get(c).cloned().unwrap_or(Value::Null));
            }
            o.insert("verdict".into(), json!(verdict_of(r)));
            Value::Object(o)
        })
        .collect();
    let report = json!({
        "zoo": plan.name,
        "target": what,
        "n_target": sample.indices.len(),
        "n_target_eval": sample.eval_indices.len(),
        "labels_used": labelled,
        "ranked_by": format!("{key} (smaller is better)"),
        "models": ranked,
    });
    let mut md = format!(
        "Ranking of zoo `{}` for {} ({} samples fitted on, {} held out for task-relatedness's reported terms; target labels {}), by {key} (smaller predicts better transfer)\n\n",
        plan.name,
        what,
        sample.indices.len(),
        sample.eval_indices.len(),
        if labelled { "used" } else { "not used" }
    );
    md.push_str(&format!(
        "| rank | model | {} | verdict |\n",
        columns.join(" | ")
    ));
    md.push_str(&format!(
        "|---:|---|{}---|\n",
        "---:|".repeat(columns.len())
    ));
    for (i, r) in rows.iter().enumerate() {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| {
                let v = value(r, c);
                if v.is_finite() {
                    format!("{v:.4}")
                } else {
                    "-".into()
                }
            })
            .collect();
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            i + 1,
            r.get("model").and_then(Value::as_str).unwrap_or("?"),
            cells.join(" | "),
            verdict_of(r)
        ));
    }
    let other: Vec<&String> = columns
        .iter()
        .skip(1)
        .filter(|c| {
            ScoreKind::ALL
                .iter()
                .any(|k| k.columns()[0].name == c.as_str() && k.columns()[0].larger_is_better)
        })
        .collect();
    if !other.is_empty() {
        md.push_str(&format!(
            "\nBaselines ({}) are larger-is-better. Verdicts follow README \"Ranking a model zoo\".\n",
            other.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    if let Some(out) = &opts.out {
        write_atomic(
            &out.join("rank.json"),
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
        write_atomic(&out.join("rank.md"), md.as_bytes())?;
    }
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{md}");
        if !opts.markdown
            && let Some(out) = &opts.out
        {
            println!("\nwritten to {}", out.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_thresholds_derived_from_the_digits_study() {
        assert_eq!(verdict(2.55, true, true), "likely to transfer well");
        assert_eq!(
            verdict(2.56, true, true),
            "no assurance (compare within the zoo)"
        );
        assert_eq!(verdict(2.95, false, true), "likely to transfer well");
        assert_eq!(
            verdict(2.96, false, true),
            "no assurance (compare within the zoo)"
        );
        assert_eq!(
            verdict(f64::NAN, true, true),
            "no estimate (no reference task)"
        );
        assert_eq!(
            verdict(1.0, true, false),
            "not calibrated for text (compare within the zoo)"
        );
    }

    #[test]
    fn a_header_row_is_not_a_class_and_quoted_commas_stay_in_the_text() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let csv = dir.path().join("s.csv");
        std::fs::write(
            &csv,
            "label,text\nA,\"one, two\"\nB,say \"\"hi\"\"\nA,\"two\nlines\"\n",
        )?;
        let (data, labelled) = read_text_csv(&csv)?;
        assert!(labelled);
        assert_eq!(data.classes, ["A", "B"]);
        assert_eq!(data.labels, [0, 1, 0]);
        let Inputs::Texts(texts) = &data.inputs else {
            anyhow::bail!("texts expected");
        };
        assert_eq!(texts[0], "one, two");
        assert_eq!(texts[2], "two\nlines");
        Ok(())
    }
}
