//! AG News and DBpedia-14 in the CSV layout of Zhang, Zhao and LeCun (2015): a `classes.txt`
//! with one class name per line, and `train.csv` / `test.csv` with records
//! `class,title,text`, the class 1-based in `classes.txt` order, fields quoted with `""`
//! escaping a quote.
//!
//! Text of a sample = title + " " + text (just the text when the title is empty), each part
//! normalised as follows, and nothing else is changed (case and punctuation stay):
//!
//! 1. a backslash is the files' line-break marker (`second\team`, `social\network`) and becomes
//!    a space. `\n` is not treated as an escape: the files show the backslash alone marks the
//!    break, so reading `\n` as one would eat the first letter of `\network`;
//! 2. HTML entity remnants, whose `&` the original crawl replaced by a space, are decoded and
//!    that space removed: `doesn #39;t` -> `doesn't`, `In  quot;helping` -> `In "helping`,
//!    ` #36;10` -> `$10`, `J amp;J` -> `J&J`. Numeric entities in the Windows-1252 range
//!    (`#145;`-`#151;`) become the quotes and dashes they stand for; named ones recognised are
//!    `quot amp lt gt hellip nbsp`;
//! 3. runs of whitespace become one space; leading and trailing whitespace is dropped.

use std::path::Path;

use crate::dataset::{Dataset, Inputs};
use crate::error::{Error, Result};
use crate::files;

/// Reads `classes.txt`: one non-empty name per line.
pub fn read_classes(path: &Path) -> Result<Vec<String>> {
    let text = files::read_text(path)?;
    let classes: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    Ok(classes)
}

/// Loads `{split}.csv` from `dir` with the given classes, or `None` when the file is absent.
pub(crate) fn load_split(dir: &Path, split: &str, classes: &[String]) -> Result<Option<Dataset>> {
    match files::find_optional(dir, &[format!("{split}.csv"), format!("{split}.csv.gz")]) {
        Some(path) => read(&path, classes).map(Some),
        None => Ok(None),
    }
}

/// Reads one CSV file of `class,title,text` records.
pub fn read(path: &Path, classes: &[String]) -> Result<Dataset> {
    let text = files::read_text(path)?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut texts = Vec::new();
    let mut labels = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        let more = reader.read_record(&mut record).map_err(|e| {
            let place = e
                .position()
                .map_or_else(|| "record".to_string(), |p| format!("line {}", p.line()));
            Error::format(path, place, format!("malformed CSV: {e}"))
        })?;
        if !more {
            break;
        }
        let line = record.position().map_or(0, |p| p.line());
        let place = format!("line {line}");
        if record.len() != 3 {
            return Err(Error::format(
                path,
                place,
                format!(
                    "expected 3 fields (class, title, text), found {}",
                    record.len()
                ),
            ));
        }
        let class = record[0].trim();
        let label = match class.parse::<usize>() {
            Ok(c) if (1..=classes.len()).contains(&c) => c - 1,
            _ => {
                return Err(Error::format(
                    path,
                    place,
                    format!(
                        "expected a class index 1-{} (classes.txt), found {class:?}",
                        classes.len()
                    ),
                ));
            }
        };
        labels.push(label as u32);
        texts.push(join_title_body(&record[1], &record[2]));
    }
    Ok(Dataset {
        inputs: Inputs::Texts(texts),
        labels,
        classes: classes.to_vec(),
    })
}

/// The sample text: normalised title and body joined by a space.
pub fn join_title_body(title: &str, body: &str) -> String {
    let (title, body) = (normalize(title), normalize(body));
    match (title.is_empty(), body.is_empty()) {
        (true, _) => body,
        (false, true) => title,
        (false, false) => format!("{title} {body}"),
    }
}

const NAMED: [(&str, char); 6] = [
    ("quot;", '"'),
    ("amp;", '&'),
    ("lt;", '<'),
    ("gt;", '>'),
    ("hellip;", '…'),
    ("nbsp;", ' '),
];

/// Decodes `#NNN;` at the start of `s`, returning the character and the bytes consumed.
fn numeric_entity(s: &str) -> Option<(char, usize)> {
    let digits = s.strip_prefix('#')?;
    let end = digits.find(';')?;
    if end == 0 || end > 7 || !digits[..end].bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code: u32 = digits[..end].parse().ok()?;
    let c = match code {
        145 => '\u{2018}',
        146 => '\u{2019}',
        147 => '\u{201c}',
        148 => '\u{201d}',
        150 => '\u{2013}',
        151 => '\u{2014}',
        _ => char::from_u32(code)?,
    };
    Some((c, end + 2))
}

fn entity(s: &str) -> Option<(char, usize)> {
    numeric_entity(s).or_else(|| {
        NAMED
            .iter()
            .find(|(name, _)| s.starts_with(name))
            .map(|&(n, c)| (c, n.len()))
    })
}

/// Applies the normalisation described in the module documentation.
pub fn normalize(raw: &str) -> String {
    // Pass 1: decode entity remnants, dropping the one space that replaced their `&`.
    let mut decoded = String::with_capacity(raw.len());
    let mut rest = raw;
    let mut at_boundary = true;
    while let Some(c) = rest.chars().next() {
        if at_boundary && let Some((entity, used)) = entity(rest) {
            if decoded.ends_with(' ') {
                decoded.pop();
            }
            decoded.push(entity);
            rest = &rest[used..];
            at_boundary = false;
            continue;
        }
        decoded.push(c);
        at_boundary = c == '\\' || c.is_whitespace();
        rest = &rest[c.len_utf8()..];
    }
    // Pass 2: line-break markers and whitespace runs become single spaces.
    let mut out = String::with_capacity(decoded.len());
    for word in decoded
        .split(|c: char| c == '\\' || c.is_whitespace())
        .filter(|w| !w.is_empty())
    {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}
