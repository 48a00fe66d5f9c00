//! Any labelled-text CSV (`csv:PATH`): a header row, one column holding the label and one or
//! more holding the text, plain or `.gz`/`.bz2`.
//!
//! Class names are the distinct labels in sorted order (so a file's class indices do not
//! depend on the order of its rows). When the file has no split of its own (no
//! `split_column`), a seeded split stratified by class makes one. Every problem is reported
//! with the file, the line and the column: a column the header lacks, a row with another
//! number of fields than the header, an empty label or text (or such rows are dropped and
//! counted, when asked), a quoted field left open at the
//! end of the file, and a label with a single example (it cannot be both fitted and tested).

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Dataset, Error, Inputs, Result, files};

/// The share of each class held out as the test split by default.
pub const DEFAULT_TEST_FRACTION: f64 = 0.3;

/// Which columns of a labelled-text CSV hold what, and how to split it.
#[derive(Clone, Debug, PartialEq)]
pub struct TableSpec {
    /// Header name of the label column.
    pub label_column: String,
    /// Header names of the text columns, joined in this order with a blank line between
    /// non-empty parts.
    pub text_columns: Vec<String>,
    /// Only rows with these labels are kept (all when empty); a listed label missing from the
    /// file is an error, and the other rows are not checked beyond their field count.
    pub classes: Vec<String>,
    /// Header name of a column holding `train` or `test` per row; `None` splits by `seed`.
    pub split_column: Option<String>,
    /// Share of each class held out as the test split when the file has no split column.
    pub test_fraction: f64,
    /// Seed of that split.
    pub seed: u64,
    /// Drops rows whose text is empty (counted in [`Table::skipped`]) instead of failing.
    pub skip_empty: bool,
}

impl TableSpec {
    /// A spec with the default split: 30 % of each class held out, seed 0.
    pub fn new(label_column: impl Into<String>, text_columns: Vec<String>) -> Self {
        Self {
            label_column: label_column.into(),
            text_columns,
            classes: Vec::new(),
            split_column: None,
            test_fraction: DEFAULT_TEST_FRACTION,
            seed: 0,
            skip_empty: false,
        }
    }
}

/// A labelled-text CSV read into its two splits.
#[derive(Clone, Debug)]
pub struct Table {
    pub train: Dataset,
    pub test: Dataset,
    /// Rows read, those of labels not asked for included.
    pub rows: usize,
    /// Rows of the labels asked for dropped for an empty text (`skip_empty`).
    pub skipped: usize,
}

/// Reads `path` as described by `spec` and splits it.
pub fn load(path: &Path, spec: &TableSpec) -> Result<Table> {
    if spec.text_columns.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no text column named, expected at least one",
            path.display()
        )));
    }
    let raw = files::read_text(path)?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(raw.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| Error::format(path, "line 1", format!("malformed CSV header: {e}")))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let column = |name: &str| -> Result<usize> {
        header.iter().position(|h| h == name).ok_or_else(|| {
            Error::format(
                path,
                "line 1 (header)",
                format!("no column {name:?}; the columns are {}", header.join(", ")),
            )
        })
    };
    let label_at = column(&spec.label_column)?;
    let text_at: Vec<usize> = spec
        .text_columns
        .iter()
        .map(|c| column(c))
        .collect::<Result<_>>()?;
    let split_at = spec.split_column.as_deref().map(column).transpose()?;
    let mut rows: Vec<(String, String, Option<bool>, u64)> = Vec::new();
    let (mut read, mut skipped, mut others) = (0, 0, std::collections::BTreeSet::new());
    let mut record = csv::StringRecord::new();
    let mut last_start = 0;
    loop {
        let more = reader.read_record(&mut record).map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            Error::format(path, format!("line {line}"), format!("malformed CSV: {e}"))
        })?;
        if !more {
            break;
        }
        let (line, start) = record
            .position()
            .map_or((0, last_start), |p| (p.line(), p.byte() as usize));
        last_start = start;
        if record.len() != header.len() {
            return Err(Error::format(
                path,
                format!("line {line}"),
                format!(
                    "{} fields, expected {} as in the header (quote a field that holds commas)",
                    record.len(),
                    header.len()
                ),
            ));
        }
        let at = |column: &str| format!("line {line}, column {column:?}");
        let label = record[label_at].trim().to_string();
        if label.is_empty() {
            return Err(Error::format(path, at(&spec.label_column), "empty label"));
        }
        read += 1;
        // Rows of labels not asked for are not checked further.
        let kept = spec.classes.is_empty() || spec.classes.contains(&label);
        if !kept {
            others.insert(label);
            continue;
        }
        let text = text_at
            .iter()
            .map(|&c| record[c].trim())
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join("\n\n");
        if text.is_empty() && spec.skip_empty {
            skipped += 1;
            continue;
        }
        if text.is_empty() {
            return Err(Error::format(
                path,
                at(&spec.text_columns.join(", ")),
                "empty text (skip such rows with skip_empty / --skip-empty)",
            ));
        }
        let is_test = match (split_at, &spec.split_column) {
            (Some(c), Some(name)) => match record[c].trim() {
                "train" => Some(false),
                "test" => Some(true),
                other => {
                    return Err(Error::format(
                        path,
                        at(name),
                        format!("expected train or test, found {other:?}"),
                    ));
                }
            },
            _ => None,
        };
        rows.push((label, text, is_test, line));
    }
    // A quoted field left open swallows the rest of the file into the last record.
    if quote_left_open(&raw.as_bytes()[last_start.min(raw.len())..]) {
        let line = rows.last().map_or(2, |r| r.3);
        return Err(Error::format(
            path,
            format!("line {line}"),
            "a quoted field is not closed before the end of the file",
        ));
    }
    if read == 0 {
        return Err(Error::format(path, "line 2", "no rows after the header"));
    }
    // Per label: its rows' count and first line.
    let mut seen: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for (label, _, _, line) in &rows {
        seen.entry(label.as_str()).or_insert((0, *line)).0 += 1;
    }
    if let Some(missing) = spec.classes.iter().find(|c| !seen.contains_key(c.as_str())) {
        let mut labels: Vec<&str> = seen.keys().copied().collect();
        labels.extend(others.iter().map(String::as_str));
        labels.sort_unstable();
        return Err(Error::format(
            path,
            format!("column {:?}", spec.label_column),
            format!(
                "no row has the label {missing:?}; the labels are {}",
                labels.join(", ")
            ),
        ));
    }
    let classes: Vec<String> = seen.keys().map(|l| l.to_string()).collect();
    if let Some((label, (_, line))) = seen.iter().find(|(_, (n, _))| *n < 2) {
        return Err(Error::format(
            path,
            format!("line {line}, column {:?}", spec.label_column),
            format!("the label {label:?} has one example; every class needs at least two"),
        ));
    }
    if classes.len() < 2 {
        return Err(Error::format(
            path,
            format!("column {:?}", spec.label_column),
            format!("{} class(es) kept, expected at least two", classes.len()),
        ));
    }
    let (mut texts, mut labels, mut is_test) = (Vec::new(), Vec::new(), Vec::new());
    for (label, text, test, _) in rows {
        if let Ok(id) = classes.binary_search(&label) {
            texts.push(text);
            labels.push(id as u32);
            is_test.push(test);
        }
    }
    let all = Dataset {
        inputs: Inputs::Texts(texts),
        labels,
        classes,
    };
    let (train, test) = if spec.split_column.is_some() {
        let (test, train): (Vec<usize>, Vec<usize>) =
            (0..all.len()).partition(|&i| is_test[i] == Some(true));
        (all.select(&train)?, all.select(&test)?)
    } else {
        all.split(spec.test_fraction, spec.seed)?
    };
    Ok(Table {
        train,
        test,
        rows: read,
        skipped,
    })
}

/// Whether CSV `text` ends inside a quoted field (a quote opens one only at a field's start;
/// inside, a doubled quote is a literal quote).
pub fn quote_left_open(text: &[u8]) -> bool {
    let (mut quoted, mut field_start) = (false, true);
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        if quoted {
            if b == b'"' {
                if text.get(i + 1) == Some(&b'"') {
                    i += 1;
                } else {
                    quoted = false;
                }
            }
        } else if field_start && b == b'"' {
            quoted = true;
        }
        field_start = !quoted && (b == b',' || b == b'\n');
        i += 1;
    }
    quoted
}
