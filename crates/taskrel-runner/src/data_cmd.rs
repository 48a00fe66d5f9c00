//! `taskrel data`: a summary of a dataset on disk, as a table or one JSON object.

use std::path::Path;

use serde::Serialize;
use taskrel_data::{Dataset, DatasetName, Inputs, Modality, SplitName};

#[derive(Debug, Serialize)]
struct Summary {
    name: String,
    root: String,
    modality: Modality,
    classes: Vec<String>,
    splits: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct SplitSummary {
    n: usize,
    class_counts: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<ImageShape>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text_chars: Option<LengthStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text_words: Option<LengthStats>,
}

#[derive(Debug, Serialize)]
struct ImageShape {
    channels: usize,
    height: usize,
    width: usize,
}

#[derive(Debug, Serialize)]
struct LengthStats {
    min: usize,
    mean: f64,
    max: usize,
}

impl LengthStats {
    fn of(lengths: impl Iterator<Item = usize>) -> Self {
        let (mut min, mut max, mut sum, mut n) = (usize::MAX, 0, 0usize, 0usize);
        for len in lengths {
            min = min.min(len);
            max = max.max(len);
            sum += len;
            n += 1;
        }
        if n == 0 {
            min = 0;
        }
        Self {
            min,
            mean: sum as f64 / n.max(1) as f64,
            max,
        }
    }
}

fn summarise(dataset: &Dataset) -> SplitSummary {
    let mut summary = SplitSummary {
        n: dataset.len(),
        class_counts: dataset.class_counts(),
        image: None,
        text_chars: None,
        text_words: None,
    };
    match &dataset.inputs {
        Inputs::Images(images) => {
            summary.image = Some(ImageShape {
                channels: images.channels,
                height: images.height,
                width: images.width,
            });
        }
        Inputs::Texts(texts) => {
            summary.text_chars = Some(LengthStats::of(texts.iter().map(|t| t.chars().count())));
            summary.text_words = Some(LengthStats::of(
                texts.iter().map(|t| t.split_whitespace().count()),
            ));
        }
    }
    summary
}

/// Summarises a named dataset found in `root`.
pub fn run(name: DatasetName, root: &Path, json: bool) -> anyhow::Result<()> {
    let splits = taskrel_data::load(name, root)?;
    let present: Vec<(SplitName, &Dataset)> = splits.iter().collect();
    report(
        name.as_str(),
        &root.display().to_string(),
        name.modality(),
        splits.classes(),
        &present,
        json,
    )
}

/// Summarises a labelled-text CSV (`csv:PATH`) split as `spec` says.
pub fn run_table(
    path: &Path,
    spec: &taskrel_data::table::TableSpec,
    json: bool,
) -> anyhow::Result<()> {
    let table = taskrel_data::table::load(path, spec)?;
    let present = [
        (SplitName::Train, &table.train),
        (SplitName::Test, &table.test),
    ];
    if table.skipped > 0 {
        eprintln!(
            "{}: {} of {} rows dropped for an empty text",
            path.display(),
            table.skipped,
            table.rows
        );
    }
    report(
        &format!("csv:{}", path.display()),
        &path.display().to_string(),
        Modality::Text,
        &table.train.classes,
        &present,
        json,
    )
}

fn report(
    name: &str,
    root: &str,
    modality: Modality,
    classes: &[String],
    splits: &[(SplitName, &Dataset)],
    json: bool,
) -> anyhow::Result<()> {
    let summaries: Vec<(&str, SplitSummary)> = splits
        .iter()
        .map(|(split, dataset)| (split.as_str(), summarise(dataset)))
        .collect();
    if json {
        let mut map = serde_json::Map::new();
        for (split, summary) in &summaries {
            map.insert(split.to_string(), serde_json::to_value(summary)?);
        }
        let summary = Summary {
            name: name.to_string(),
            root: root.to_string(),
            modality,
            classes: classes.to_vec(),
            splits: map,
        };
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!("{name} ({}) from {root}", modality.as_str());
    for (split, summary) in &summaries {
        print!("  {split}: {} samples", summary.n);
        if let Some(shape) = &summary.image {
            print!(
                ", images {}x{}x{} u8",
                shape.channels, shape.height, shape.width
            );
        }
        if let (Some(chars), Some(words)) = (&summary.text_chars, &summary.text_words) {
            print!(
                ", text length chars {}/{:.1}/{} words {}/{:.1}/{} (min/mean/max)",
                chars.min, chars.mean, chars.max, words.min, words.mean, words.max
            );
        }
        println!();
    }
    let width = classes.iter().map(|c| c.len()).max().unwrap_or(5).max(5);
    print!("  {:>3}  {:<width$}", "id", "class");
    for (split, _) in &summaries {
        print!("  {split:>7}");
    }
    println!();
    for (k, class) in classes.iter().enumerate() {
        print!("  {k:>3}  {class:<width$}");
        for (_, summary) in &summaries {
            print!("  {:>7}", summary.class_counts[k]);
        }
        println!();
    }
    Ok(())
}
