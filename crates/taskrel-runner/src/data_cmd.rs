//! `taskrel data`: a summary of a dataset on disk, as a table or one JSON object.

use std::path::Path;

use serde::Serialize;
use taskrel_data::{Dataset, DatasetName, Inputs, Modality};

#[derive(Debug, Serialize)]
struct Summary {
    name: DatasetName,
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

pub fn run(name: DatasetName, root: &Path, json: bool) -> anyhow::Result<()> {
    let splits = taskrel_data::load(name, root)?;
    let mut summaries = Vec::new();
    for (split, dataset) in splits.iter() {
        summaries.push((split.as_str(), summarise(dataset)));
    }
    if json {
        let mut map = serde_json::Map::new();
        for (split, summary) in &summaries {
            map.insert(split.to_string(), serde_json::to_value(summary)?);
        }
        let summary = Summary {
            name,
            root: root.display().to_string(),
            modality: name.modality(),
            classes: splits.classes().to_vec(),
            splits: map,
        };
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!(
        "{name} ({}) from {}",
        name.modality().as_str(),
        root.display()
    );
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
    let width = splits
        .classes()
        .iter()
        .map(|c| c.len())
        .max()
        .unwrap_or(5)
        .max(5);
    print!("  {:>3}  {:<width$}", "id", "class");
    for (split, _) in &summaries {
        print!("  {split:>7}");
    }
    println!();
    for (k, class) in splits.classes().iter().enumerate() {
        print!("  {k:>3}  {class:<width$}");
        for (_, summary) in &summaries {
            print!("  {:>7}", summary.class_counts[k]);
        }
        println!();
    }
    Ok(())
}
