//! The results folder of a sweep: finished cells, `cells.csv`, `correlation.csv`,
//! `summary.md` and `plots/`.
//!
//! Each finished cell is one file `cells/<cell>.json`, written beside and renamed into place:
//! a run killed at any moment leaves whole cells only, and a rerun skips them. `cells.csv` is
//! rebuilt from those files in plan order after every cell (again through a rename), so it
//! never holds a partial or duplicated row. Tables and plots are rendered from `cells.csv`
//! alone, which is what `taskrel report` does.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

use crate::engine::{Row, write_atomic};
use crate::stats::{self, Estimate};
use crate::sweep::{Correlation, GroupBy, Plan};

/// Whether a larger value of `column` predicts better transfer (a column no score declares,
/// such as an accuracy: yes).
fn higher_is_better(column: &str) -> bool {
    taskrel_score::larger_is_better(column) != Some(false)
}

/// Bootstrap resamples and seed of every confidence interval.
const BOOTSTRAP_RESAMPLES: usize = 1000;
const BOOTSTRAP_SEED: u64 = 0;

/// The finished cells of a results folder.
/// `manifest.json` of a results folder: one entry per invocation that wrote the folder
/// (`run`, `merge`), appended, so that a later `--rescore` keeps the first run's timings.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub sweep: String,
    pub invocations: Vec<Invocation>,
}

/// One invocation that wrote a results folder. Fields that do not apply to a command are
/// absent.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Invocation {
    /// `run` or `merge`.
    pub command: String,
    pub taskrel_version: String,
    pub git_revision: Option<String>,
    pub git_dirty: Option<bool>,
    pub started: String,
    pub finished: String,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    pub cells_planned: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cells_selected: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cells_run: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cells_already_done: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cells_run_by_another_process: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cells_rescored: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rescored_scores: Vec<String>,
    pub cells_finished: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<String>,
    /// Seconds per stage in this invocation.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub stage_seconds: BTreeMap<String, f64>,
}

impl Manifest {
    /// Appends `invocation` to `dir/manifest.json` (written through a rename). A manifest of
    /// the earlier one-invocation form becomes the first entry; one that does not parse is
    /// kept beside as `manifest.json.damaged`.
    pub fn append(dir: &Path, sweep: &str, invocation: Invocation) -> anyhow::Result<()> {
        let path = dir.join("manifest.json");
        let mut manifest = match std::fs::read(&path) {
            Err(_) => Manifest::default(),
            Ok(bytes) => match serde_json::from_slice::<Manifest>(&bytes) {
                Ok(m) => m,
                Err(_) => match serde_json::from_slice::<Invocation>(&bytes) {
                    Ok(mut earlier) if !earlier.started.is_empty() => {
                        if earlier.command.is_empty() {
                            earlier.command = if earlier.merged_from.is_empty() {
                                "run".into()
                            } else {
                                "merge".into()
                            };
                        }
                        Manifest {
                            sweep: sweep.to_string(),
                            invocations: vec![earlier],
                        }
                    }
                    _ => {
                        let aside = path.with_extension("json.damaged");
                        eprintln!(
                            "results: {} does not parse; kept as {} and started again",
                            path.display(),
                            aside.display()
                        );
                        std::fs::rename(&path, &aside)
                            .with_context(|| format!("moving {} aside", path.display()))?;
                        Manifest::default()
                    }
                },
            },
        };
        manifest.sweep = sweep.to_string();
        manifest.invocations.push(invocation);
        write_atomic(&path, serde_json::to_string_pretty(&manifest)?.as_bytes())
    }
}

/// The key of a cell record holding the checksum of the rest of its row.
const ROW_CHECKSUM: &str = "row_sha256";

/// sha256 of a row's JSON (keys in order; numbers read back exactly, serde_json's
/// `float_roundtrip`).
fn row_checksum(row: &Row) -> anyhow::Result<String> {
    Ok(crate::engine::sha256_hex(
        serde_json::to_string(row)?.as_bytes(),
    ))
}

/// A cell record, checked against its checksum (records written before rows carried one are
/// taken as they are); the checksum key is removed from the returned row.
fn read_row(path: &Path) -> Result<Row, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut row: Row =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a cell record ({e})"))?;
    if let Some(stored) = row.remove(ROW_CHECKSUM) {
        let actual = row_checksum(&row).map_err(|e| e.to_string())?;
        if stored.as_str() != Some(actual.as_str()) {
            return Err("the row does not match its checksum".into());
        }
    }
    Ok(row)
}

/// A cell being computed by this process; the claim file goes when it is dropped.
#[derive(Debug)]
pub struct Claim {
    path: PathBuf,
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Best effort: a claim left behind is taken over as stale by the next run.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// This machine's name, as claims record it.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Whether a claim (`"<pid> <host>"`) was left by a process that no longer runs.
fn claim_is_stale(path: &Path, holder: &str) -> bool {
    let mut parts = holder.split_whitespace();
    let pid = parts.next().and_then(|p| p.parse::<u32>().ok());
    let same_host = parts.next() == Some(host().as_str());
    match (pid, same_host) {
        (Some(pid), true) => crate::engine::process_alive(pid) == Some(false),
        // Another host, or a claim cut short by a kill while it was written.
        _ => std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() > if pid.is_none() { 60 } else { 86_400 }),
    }
}

#[derive(Debug)]
pub struct Store {
    pub dir: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn cells_dir(&self) -> PathBuf {
        self.dir.join("cells")
    }

    fn cell_path(&self, id: &str) -> PathBuf {
        self.cells_dir().join(format!("{id}.json"))
    }

    /// Whether the cell has a record (checked by [`Store::set_aside_damaged`] at the start of
    /// a run).
    pub fn is_done(&self, id: &str) -> bool {
        self.cell_path(id).is_file()
    }

    /// Claims cell `id` for this process (`cells/<id>.claim`, created only if absent, holding
    /// the process id and host), so that runs sharing this folder compute each cell once.
    /// `None` while another live process holds the claim; a claim left by a process that no
    /// longer runs on this host (or, from another host, older than a day) is taken over.
    pub fn claim(&self, id: &str) -> anyhow::Result<Option<Claim>> {
        let dir = self.cells_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{id}.claim"));
        let me = format!("{} {}", std::process::id(), host());
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(me.as_bytes())
                        .with_context(|| format!("writing {}", path.display()))?;
                    return Ok(Some(Claim { path }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    if !claim_is_stale(&path, &holder) {
                        return Ok(None);
                    }
                    // Taken over: removed, then created again above (a racing process that
                    // also found it stale loses the `create_new`).
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(e).with_context(|| format!("removing {}", path.display()));
                        }
                    }
                }
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        Ok(None)
    }

    /// Records a finished cell, with a checksum of its row.
    pub fn put(&self, id: &str, row: &Row) -> anyhow::Result<()> {
        let mut row = row.clone();
        row.remove(ROW_CHECKSUM);
        let checksum = row_checksum(&row)?;
        row.insert(ROW_CHECKSUM.into(), Value::String(checksum));
        write_atomic(
            &self.cell_path(id),
            serde_json::to_string_pretty(&row)?.as_bytes(),
        )
    }

    /// One finished cell's row.
    pub fn get(&self, id: &str) -> anyhow::Result<Row> {
        let path = self.cell_path(id);
        read_row(&path).map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))
    }

    /// Moves aside (`<cell>.json.damaged`) every cell record that does not parse or does not
    /// match its checksum, saying so on stderr, so that the cell is computed again. Returns
    /// how many.
    pub fn set_aside_damaged(&self) -> anyhow::Result<usize> {
        let dir = self.cells_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(0);
        };
        let mut moved = 0;
        for entry in entries {
            let path = entry
                .with_context(|| format!("listing {}", dir.display()))?
                .path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            if let Err(why) = read_row(&path) {
                eprintln!(
                    "results: {}: {why}; the cell is computed again",
                    path.display()
                );
                let aside = path.with_extension("json.damaged");
                std::fs::rename(&path, &aside)
                    .with_context(|| format!("moving {} aside", path.display()))?;
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Records the rows of a `cells.csv` whose cells have no record yet (a results folder as
    /// committed keeps `cells.csv` only), so that `--rescore` can update them instead of
    /// running them again. Returns how many were restored.
    pub fn restore_from_csv(&self, csv_path: &Path) -> anyhow::Result<usize> {
        if !csv_path.is_file() {
            return Ok(0);
        }
        let table = Table::read(csv_path)?;
        let id_col = table
            .column("cell")
            .with_context(|| format!("{}: no `cell` column", csv_path.display()))?;
        let mut restored = 0;
        for record in &table.rows {
            let Some(id) = record.get(id_col).filter(|id| !id.is_empty()) else {
                continue;
            };
            if self.is_done(id) {
                continue;
            }
            let row: Row = table
                .columns
                .iter()
                .zip(record)
                .map(|(name, text)| {
                    let value = if text.is_empty() {
                        Value::Null
                    } else if let Ok(i) = text.parse::<i64>() {
                        Value::from(i)
                    } else if let Some(f) = text.parse::<f64>().ok().filter(|f| f.is_finite()) {
                        Value::from(f)
                    } else {
                        Value::String(text.clone())
                    };
                    (name.clone(), value)
                })
                .collect();
            self.put(id, &row)?;
            restored += 1;
        }
        Ok(restored)
    }

    /// All finished cells by id.
    pub fn rows(&self) -> anyhow::Result<BTreeMap<String, Row>> {
        let mut rows = BTreeMap::new();
        let dir = self.cells_dir();
        if !dir.is_dir() {
            return Ok(rows);
        }
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let row = read_row(&path).map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?;
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            rows.insert(id, row);
        }
        Ok(rows)
    }
}

fn format_value(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f}"),
            _ => n.to_string(),
        },
        Some(other) => other.to_string(),
    }
}

/// Writes `cells.csv` with `columns`, one row per id of `order` that has finished.
pub fn write_cells_csv(
    path: &Path,
    columns: &[String],
    order: &[String],
    rows: &BTreeMap<String, Row>,
) -> anyhow::Result<usize> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(columns)?;
    let mut written = 0;
    for id in order {
        if let Some(row) = rows.get(id) {
            w.write_record(columns.iter().map(|c| format_value(row.get(c))))?;
            written += 1;
        }
    }
    let bytes = w.into_inner().context("writing cells.csv")?;
    write_atomic(path, &bytes)?;
    Ok(written)
}

/// `cells.csv` read back: column names and rows of text.
#[derive(Debug)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let mut r =
            csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
        let columns: Vec<String> = r
            .headers()
            .with_context(|| format!("reading {}", path.display()))?
            .iter()
            .map(String::from)
            .collect();
        let mut rows = Vec::new();
        for (i, record) in r.records().enumerate() {
            let record = record.with_context(|| format!("{}: line {}", path.display(), i + 2))?;
            rows.push(record.iter().map(String::from).collect());
        }
        Ok(Self { columns, rows })
    }

    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }

    fn text(&self, row: usize, name: &str) -> &str {
        self.column(name)
            .and_then(|c| self.rows[row].get(c))
            .map_or("", |s| s.as_str())
    }

    fn number(&self, row: usize, name: &str) -> f64 {
        self.text(row, name).parse().unwrap_or(f64::NAN)
    }
}

/// The cells averaged over seeds: one row per (target, model) in order of first appearance,
/// each column the mean of its numeric values over the seeds (empty when none is finite; text
/// columns keep the first seed's), `seed` set to `mean`.
pub fn seed_mean_table(table: &Table) -> Table {
    let mut order: Vec<(String, String)> = Vec::new();
    let mut members: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for i in 0..table.rows.len() {
        let key = (
            table.text(i, "target").to_string(),
            table.text(i, "model").to_string(),
        );
        if !members.contains_key(&key) {
            order.push(key.clone());
        }
        members.entry(key).or_default().push(i);
    }
    let rows = order
        .iter()
        .map(|key| {
            let group = &members[key];
            table
                .columns
                .iter()
                .enumerate()
                .map(|(c, name)| {
                    if name == "seed" {
                        return "mean".to_string();
                    }
                    let first = &table.rows[group[0]][c];
                    if first.parse::<f64>().is_err() && !first.is_empty() {
                        return first.clone();
                    }
                    let values: Vec<f64> = group
                        .iter()
                        .filter_map(|&i| table.rows[i].get(c)?.parse::<f64>().ok())
                        .filter(|v| v.is_finite())
                        .collect();
                    if values.is_empty() {
                        String::new()
                    } else {
                        (values.iter().sum::<f64>() / values.len() as f64).to_string()
                    }
                })
                .collect()
        })
        .collect();
    Table {
        columns: table.columns.clone(),
        rows,
    }
}

/// One line of `correlation.csv`.
#[derive(Debug)]
pub struct CorrelationRow {
    pub score: String,
    pub measure: String,
    pub group_by: String,
    pub group: String,
    pub n: usize,
    pub pearson: Estimate,
    pub spearman: Estimate,
    pub kendall: Estimate,
    pub weighted_tau: f64,
    pub top1_relative: f64,
    /// Points for the plot: raw score, accuracy.
    pub points: Vec<(f64, f64)>,
}

/// Task-relatedness against one baseline on the same cells: per (target, seed) group, the
/// difference of their weighted tau (and Spearman) with the measured accuracy across models,
/// averaged over groups, with a bootstrap interval resampling the groups (the differences are
/// paired: both scores rank the same models on the same samples).
#[derive(Debug)]
pub struct PairedRow {
    /// `bound` or `bound_unlabeled`.
    pub estimator: String,
    pub baseline: String,
    pub measure: String,
    /// (target, seed) groups with at least three models scored by both.
    pub groups: usize,
    pub estimator_weighted_tau: f64,
    pub baseline_weighted_tau: f64,
    /// Mean over groups of the estimator's weighted tau minus the baseline's.
    pub weighted_tau_difference: Estimate,
    /// The same for Spearman's rho.
    pub spearman_difference: Estimate,
}

/// Score columns compared in [`paired_comparisons`].
const ESTIMATORS: [&str; 2] = ["bound", "bound_unlabeled"];
const BASELINES: [&str; 7] = [
    "logme",
    "leep",
    "nce",
    "hscore",
    "hscore_shrinkage",
    "otce",
    "knn",
];

/// Every task-relatedness column against every baseline column present in `table`, for each
/// measured accuracy among `measures` (e.g. `linear_probe`, `full`).
pub fn paired_comparisons(table: &Table, measures: &[String]) -> Vec<PairedRow> {
    let mut groups: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for i in 0..table.rows.len() {
        groups
            .entry((
                table.text(i, "target").to_string(),
                table.text(i, "seed").to_string(),
            ))
            .or_default()
            .push(i);
    }
    let present = |c: &str| (0..table.rows.len()).any(|i| table.number(i, c).is_finite());
    let mut out = Vec::new();
    for measure in measures {
        let acc = format!("accuracy_{measure}");
        for estimator in ESTIMATORS.iter().filter(|c| present(c)) {
            for baseline in BASELINES.iter().filter(|c| present(c)) {
                let (mut wtau, mut rho) = (Vec::new(), Vec::new());
                let (mut wtau_e, mut wtau_b) = (Vec::new(), Vec::new());
                for members in groups.values() {
                    let rows: Vec<usize> = members
                        .iter()
                        .copied()
                        .filter(|&i| {
                            [*estimator, *baseline, acc.as_str()]
                                .iter()
                                .all(|c| table.number(i, c).is_finite())
                        })
                        .collect();
                    if rows.len() < 3 {
                        continue;
                    }
                    let oriented = |c: &str| -> Vec<f64> {
                        let sign = if higher_is_better(c) { 1.0 } else { -1.0 };
                        rows.iter().map(|&i| sign * table.number(i, c)).collect()
                    };
                    let (e, b) = (oriented(estimator), oriented(baseline));
                    let y: Vec<f64> = rows.iter().map(|&i| table.number(i, &acc)).collect();
                    let (we, wb) = (stats::weighted_tau(&e, &y), stats::weighted_tau(&b, &y));
                    if we.is_finite() && wb.is_finite() {
                        wtau.push(we - wb);
                        wtau_e.push(we);
                        wtau_b.push(wb);
                    }
                    let d = stats::spearman(&e, &y) - stats::spearman(&b, &y);
                    if d.is_finite() {
                        rho.push(d);
                    }
                }
                if wtau.is_empty() && rho.is_empty() {
                    continue;
                }
                let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
                out.push(PairedRow {
                    estimator: estimator.to_string(),
                    baseline: baseline.to_string(),
                    measure: measure.clone(),
                    groups: wtau.len().max(rho.len()),
                    estimator_weighted_tau: mean(&wtau_e),
                    baseline_weighted_tau: mean(&wtau_b),
                    weighted_tau_difference: stats::bootstrap_mean(
                        &wtau,
                        BOOTSTRAP_RESAMPLES,
                        BOOTSTRAP_SEED,
                    ),
                    spearman_difference: stats::bootstrap_mean(
                        &rho,
                        BOOTSTRAP_RESAMPLES,
                        BOOTSTRAP_SEED,
                    ),
                });
            }
        }
    }
    out
}

/// Writes `paired.csv`.
pub fn write_paired_csv(path: &Path, rows: &[PairedRow]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "estimator",
        "baseline",
        "measure",
        "groups",
        "estimator_weighted_tau",
        "baseline_weighted_tau",
        "weighted_tau_difference",
        "weighted_tau_difference_low",
        "weighted_tau_difference_high",
        "spearman_difference",
        "spearman_difference_low",
        "spearman_difference_high",
    ])?;
    for r in rows {
        let d = &r.weighted_tau_difference;
        let s = &r.spearman_difference;
        let mut record = vec![
            r.estimator.clone(),
            r.baseline.clone(),
            r.measure.clone(),
            r.groups.to_string(),
        ];
        record.extend(
            [
                r.estimator_weighted_tau,
                r.baseline_weighted_tau,
                d.value,
                d.low,
                d.high,
                s.value,
                s.low,
                s.high,
            ]
            .map(|v| v.to_string()),
        );
        w.write_record(&record)?;
    }
    let bytes = w.into_inner().context("writing paired.csv")?;
    write_atomic(path, &bytes)
}

/// [`PairedRow`]s as a markdown table.
pub fn paired_markdown(rows: &[PairedRow]) -> String {
    let mut md = String::from(
        "| task-relatedness | baseline | accuracy after | groups | mean weighted tau (task-relatedness / baseline) | difference [95 % CI] | Spearman difference [95 % CI] |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.3} / {:.3} | {:+.3} [{:+.3}, {:+.3}] | {:+.3} [{:+.3}, {:+.3}] |",
            r.estimator,
            r.baseline,
            r.measure,
            r.groups,
            r.estimator_weighted_tau,
            r.baseline_weighted_tau,
            r.weighted_tau_difference.value,
            r.weighted_tau_difference.low,
            r.weighted_tau_difference.high,
            r.spearman_difference.value,
            r.spearman_difference.low,
            r.spearman_difference.high,
        );
    }
    md
}

/// Correlations of each configured score with its measured accuracy, per group. Scores are
/// oriented so that larger predicts better (the bound is negated): a good score correlates
/// positively.
pub fn correlations(table: &Table, specs: &[Correlation]) -> Vec<CorrelationRow> {
    let mut out = Vec::new();
    for spec in specs {
        let measure = format!("accuracy_{}", spec.measure.as_str());
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for i in 0..table.rows.len() {
            let key = match spec.group_by {
                GroupBy::All => "all".to_string(),
                GroupBy::Target => table.text(i, "target").to_string(),
                GroupBy::Model => table.text(i, "model").to_string(),
                GroupBy::Seed => table.text(i, "seed").to_string(),
            };
            groups.entry(key).or_default().push(i);
        }
        let sign = if higher_is_better(&spec.score) {
            1.0
        } else {
            -1.0
        };
        let mut per_group = Vec::new();
        for (group, members) in groups {
            let mut points = Vec::new();
            for &i in &members {
                let (s, a) = (table.number(i, &spec.score), table.number(i, &measure));
                if s.is_finite() && a.is_finite() {
                    points.push((s, a));
                }
            }
            let x: Vec<f64> = points.iter().map(|p| sign * p.0).collect();
            let y: Vec<f64> = points.iter().map(|p| p.1).collect();
            let boot = |f| stats::bootstrap(&x, &y, f, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED);
            per_group.push(CorrelationRow {
                score: spec.score.clone(),
                measure: spec.measure.as_str().to_string(),
                group_by: spec.group_by.as_str().to_string(),
                group,
                n: points.len(),
                pearson: boot(stats::pearson),
                spearman: boot(stats::spearman),
                kendall: boot(stats::kendall_tau_b),
                weighted_tau: stats::weighted_tau(&x, &y),
                top1_relative: stats::top1_relative(&x, &y),
                points,
            });
        }
        if per_group.len() > 1 {
            let mean = |f: &dyn Fn(&CorrelationRow) -> f64| {
                let v: Vec<f64> = per_group.iter().map(f).filter(|v| v.is_finite()).collect();
                if v.is_empty() {
                    f64::NAN
                } else {
                    v.iter().sum::<f64>() / v.len() as f64
                }
            };
            let point = |value: f64| Estimate {
                value,
                low: f64::NAN,
                high: f64::NAN,
            };
            let row = CorrelationRow {
                score: spec.score.clone(),
                measure: spec.measure.as_str().to_string(),
                group_by: spec.group_by.as_str().to_string(),
                group: "mean".to_string(),
                n: per_group.iter().map(|r| r.n).sum(),
                pearson: point(mean(&|r| r.pearson.value)),
                spearman: point(mean(&|r| r.spearman.value)),
                kendall: point(mean(&|r| r.kendall.value)),
                weighted_tau: mean(&|r| r.weighted_tau),
                top1_relative: mean(&|r| r.top1_relative),
                points: Vec::new(),
            };
            per_group.push(row);
        }
        out.extend(per_group);
    }
    out
}

fn f(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        String::new()
    }
}

pub fn write_correlation_csv(path: &Path, rows: &[CorrelationRow]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "score",
        "measure",
        "group_by",
        "group",
        "n",
        "pearson",
        "pearson_low",
        "pearson_high",
        "spearman",
        "spearman_low",
        "spearman_high",
        "kendall_tau_b",
        "kendall_low",
        "kendall_high",
        "weighted_tau",
        "top1_relative_accuracy",
    ])?;
    for r in rows {
        w.write_record([
            r.score.clone(),
            r.measure.clone(),
            r.group_by.clone(),
            r.group.clone(),
            r.n.to_string(),
            f(r.pearson.value),
            f(r.pearson.low),
            f(r.pearson.high),
            f(r.spearman.value),
            f(r.spearman.low),
            f(r.spearman.high),
            f(r.kendall.value),
            f(r.kendall.low),
            f(r.kendall.high),
            f(r.weighted_tau),
            f(r.top1_relative),
        ])?;
    }
    write_atomic(path, &w.into_inner().context("writing correlation.csv")?)
}

fn with_interval(e: &Estimate) -> String {
    if e.low.is_finite() && e.high.is_finite() {
        format!("{} [{}, {}]", f(e.value), f(e.low), f(e.high))
    } else {
        f(e.value)
    }
}

/// The markdown table of correlations.
pub fn correlation_markdown(rows: &[CorrelationRow]) -> String {
    let mut md = String::from(
        "| score | accuracy after | group | n | Pearson [95 % CI] | Spearman [95 % CI] | Kendall tau-b [95 % CI] | weighted tau | top-1 rel. acc. |\n|---|---|---|---:|---|---|---|---:|---:|\n",
    );
    for r in rows {
        let group = if r.group_by == "all" {
            "all".to_string()
        } else {
            format!("{} = {}", r.group_by, r.group)
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.score,
            r.measure,
            group,
            r.n,
            with_interval(&r.pearson),
            with_interval(&r.spearman),
            with_interval(&r.kendall),
            f(r.weighted_tau),
            f(r.top1_relative)
        );
    }
    md
}

/// Columns of the per-cell table in `summary.md`: ids, score columns, accuracies.
fn summary_columns(table: &Table) -> Vec<String> {
    table
        .columns
        .iter()
        .filter(|c| {
            !c.starts_with("seconds_")
                && !matches!(c.as_str(), "cell" | "n_reference" | "n_target")
                && !c.starts_with("loss_")
        })
        .cloned()
        .collect()
}

/// How often each bound is an upper bound of the losses it bounds, and how often h_R's
/// Lipschitz constraint held: counted over the cells where both numbers exist.
pub fn validity_markdown(table: &Table) -> String {
    let mut lines = Vec::new();
    let losses: Vec<&String> = table
        .columns
        .iter()
        .filter(|c| c.starts_with("loss_"))
        .collect();
    for (bound, suffix) in [("bound", ""), ("bound_unlabeled", "_unlabeled")] {
        if table.column(bound).is_none() {
            continue;
        }
        let mut compared: Vec<(String, &str)> = Vec::new();
        if suffix.is_empty() && table.column("target_loss").is_some() {
            compared.push((
                "the transformed classifier's loss on the target evaluation sample (`target_loss`)"
                    .into(),
                "target_loss",
            ));
        }
        for loss in &losses {
            compared.push((
                format!("the fine-tuned model's test loss (`{loss}`)"),
                loss.as_str(),
            ));
        }
        for (what, column) in compared {
            let (mut held, mut n) = (0, 0);
            for i in 0..table.rows.len() {
                let (b, l) = (table.number(i, bound), table.number(i, column));
                if b.is_finite() && l.is_finite() {
                    n += 1;
                    held += usize::from(b >= l);
                }
            }
            if n > 0 {
                lines.push(format!("- `{bound}` >= {what}: {held} of {n} cells"));
            }
        }
        let flag = format!("lipschitz_holds{suffix}");
        if table.column(&flag).is_some() {
            let values: Vec<f64> = (0..table.rows.len())
                .map(|i| table.number(i, &flag))
                .filter(|v| v.is_finite())
                .collect();
            let broken = values.iter().filter(|&&v| v == 0.0).count();
            lines.push(format!(
                "- h_R's two-label gradient norm above 1.2 x the tau target (held-out reference or transformed target points) for `{bound}`: {broken} of {} cells (each such cell's report carries a warning)",
                values.len()
            ));
        }
    }
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "## Validity of the bound\n\nAn upper bound that fails is a finding, not an error: the counts say how often the \
         bound is above the losses it bounds.\n\n{}\n\n",
        lines.join("\n")
    )
}

/// How the linear probe and full fine-tuning compare, when a sweep measures both: over the cells
/// with both accuracies, and per target, the Pearson and Spearman correlation of the two
/// accuracies and the gain of full fine-tuning over the probe in points (mean, range, how often
/// positive). Whether a score is judged against one or the other matters only where they
/// disagree.
pub fn modes_markdown(table: &Table) -> String {
    let (probe, full) = ("accuracy_linear_probe", "accuracy_full");
    if table.column(probe).is_none() || table.column(full).is_none() {
        return String::new();
    }
    let mut groups: Vec<(String, Vec<usize>)> = vec![("all".to_string(), Vec::new())];
    for i in 0..table.rows.len() {
        if !(table.number(i, probe).is_finite() && table.number(i, full).is_finite()) {
            continue;
        }
        groups[0].1.push(i);
        let target = format!("target = {}", table.text(i, "target"));
        match groups.iter_mut().find(|(name, _)| *name == target) {
            Some((_, members)) => members.push(i),
            None => groups.push((target, vec![i])),
        }
    }
    if groups[0].1.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "## Linear probe against full fine-tuning\n\n\
         Accuracy after the linear probe against accuracy after full fine-tuning, on the same \
         cells; gain: full minus probe, in points.\n\n\
         | cells | n | Pearson | Spearman | mean gain | gain range | full above probe |\n\
         |---|---:|---:|---:|---:|---|---:|\n",
    );
    for (name, members) in &groups {
        let p: Vec<f64> = members.iter().map(|&i| table.number(i, probe)).collect();
        let f: Vec<f64> = members.iter().map(|&i| table.number(i, full)).collect();
        let gains: Vec<f64> = p.iter().zip(&f).map(|(p, f)| 100.0 * (f - p)).collect();
        let mean = gains.iter().sum::<f64>() / gains.len() as f64;
        let (lo, hi) = gains
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &g| {
                (lo.min(g), hi.max(g))
            });
        let _ = writeln!(
            md,
            "| {name} | {} | {:.3} | {:.3} | {mean:+.1} | {lo:+.1} to {hi:+.1} | {} |",
            members.len(),
            stats::pearson(&p, &f),
            stats::spearman(&p, &f),
            gains.iter().filter(|&&g| g > 0.0).count()
        );
    }
    md.push('\n');
    md
}

/// The sweep file as run, in every results folder.
pub const CONFIG_FILE: &str = "config.yaml";
/// Every finished cell's row, in plan order.
pub const CELLS_CSV: &str = "cells.csv";

/// Writes the sweep file as run (`config.yaml`) into a results folder.
pub fn write_config(out: &Path, config: &str) -> anyhow::Result<()> {
    write_atomic(&out.join(CONFIG_FILE), config.as_bytes())
}

/// The reports of a results folder, from its `cells.csv`: `correlation.csv`,
/// `seed_mean/correlation.csv` (several seeds), `paired.csv`, `summary.md` and `plots/`.
/// Returns the correlations.
pub fn render(out: &Path, plan: &Plan) -> anyhow::Result<Vec<CorrelationRow>> {
    let table = Table::read(&out.join(CELLS_CSV))?;
    let corr = correlations(&table, &plan.correlations);
    write_correlation_csv(&out.join("correlation.csv"), &corr)?;
    let measures: Vec<String> = plan
        .sweep
        .measure
        .modes
        .iter()
        .map(|m| m.as_str().to_string())
        .collect();
    // With several seeds, the per-target correlations again on seed means.
    let seeds: std::collections::BTreeSet<&str> = table
        .column("seed")
        .map(|c| {
            table
                .rows
                .iter()
                .filter_map(|r| r.get(c))
                .map(String::as_str)
                .collect()
        })
        .unwrap_or_default();
    let by_target: Vec<Correlation> = plan
        .correlations
        .iter()
        .filter(|c| c.group_by == GroupBy::Target)
        .cloned()
        .collect();
    let seed_mean = if seeds.len() > 1 && !by_target.is_empty() {
        correlations(&seed_mean_table(&table), &by_target)
    } else {
        Vec::new()
    };
    if !seed_mean.is_empty() {
        write_correlation_csv(&out.join("seed_mean/correlation.csv"), &seed_mean)?;
    }
    let paired = paired_comparisons(&table, &measures);
    if !paired.is_empty() {
        write_paired_csv(&out.join("paired.csv"), &paired)?;
    }
    let md = summary_markdown(
        &plan.name,
        &plan.sweep.description,
        &table,
        &corr,
        &seed_mean,
        &paired,
        plan.cells.len(),
    );
    write_atomic(&out.join("summary.md"), md.as_bytes())?;
    crate::plots::write(&out.join("plots"), &corr)?;
    Ok(corr)
}

/// `summary.md`: the sweep, its cells and its correlations.
pub fn summary_markdown(
    name: &str,
    description: &str,
    table: &Table,
    corr: &[CorrelationRow],
    seed_mean: &[CorrelationRow],
    paired: &[PairedRow],
    cells_planned: usize,
) -> String {
    let mut md = format!("# Sweep `{name}`\n\n");
    if !description.trim().is_empty() {
        let _ = writeln!(md, "{}\n", description.trim());
    }
    let _ = writeln!(
        md,
        "{} of {} cells finished. Accuracies are measured on the target's test split after \
         fine-tuning; `bound` is the task-relatedness bound (smaller predicts better transfer).\n",
        table.rows.len(),
        cells_planned
    );
    md.push_str("## Correlation with measured accuracy\n\n");
    md.push_str(
        "Scores are oriented so that larger predicts better (bounds and their terms are negated), \
         so a useful score has positive coefficients. Intervals: 95 % percentile bootstrap over \
         cells (1000 resamples, seed 0). Weighted tau: scipy's `weightedtau` defaults. Top-1 \
         relative accuracy: accuracy of the top-scored cell over the best accuracy in the group.\n\n",
    );
    if corr.is_empty() {
        md.push_str("No correlations configured.\n\n");
    } else {
        md.push_str(&correlation_markdown(corr));
        md.push('\n');
    }
    if !seed_mean.is_empty() {
        md.push_str("## Per target, averaged over seeds\n\n");
        md.push_str(
            "The per-target correlations above again, on each model's score and accuracy \
             averaged over the seeds (one point per model; `seed_mean/correlation.csv`).\n\n",
        );
        md.push_str(&correlation_markdown(seed_mean));
        md.push('\n');
    }
    if !paired.is_empty() {
        md.push_str("## Task-relatedness against each baseline, paired\n\n");
        md.push_str(
            "Within each (target, seed) group with at least three models scored by both, the \
             weighted tau (and Spearman) of task-relatedness with the measured accuracy minus the \
             baseline's; differences averaged over groups, with a 95 % percentile bootstrap \
             interval resampling the groups (1000 resamples, seed 0). A positive difference \
             favours task-relatedness.\n\n",
        );
        md.push_str(&paired_markdown(paired));
        md.push('\n');
    }
    md.push_str(&modes_markdown(table));
    md.push_str(&validity_markdown(table));
    md.push_str("## Cells\n\n");
    let cols = summary_columns(table);
    let _ = writeln!(md, "| {} |", cols.join(" | "));
    let _ = writeln!(md, "|{}|", vec!["---"; cols.len()].join("|"));
    for i in 0..table.rows.len() {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| {
                let t = table.text(i, c);
                match t.parse::<f64>() {
                    // `+ 0.0` turns -0 into 0.
                    Ok(v) if c != "seed" => f(v + 0.0),
                    _ => t.to_string(),
                }
            })
            .collect();
        let _ = writeln!(md, "| {} |", cells.join(" | "));
    }
    md
}

#[cfg(test)]
mod paired_tests {
    use super::*;

    #[test]
    fn the_probe_and_full_fine_tuning_are_compared_overall_and_per_target() {
        let table = Table {
            columns: ["target", "model", "accuracy_linear_probe", "accuracy_full"]
                .iter()
                .map(|c| c.to_string())
                .collect(),
            rows: [
                ["t", "a", "0.5", "0.6"],
                ["t", "b", "0.6", "0.65"],
                ["t", "c", "0.7", "0.68"],
                ["u", "a", "0.2", "0.4"],
                ["u", "b", "0.3", "0.3"],
                ["u", "c", "", "0.9"],
            ]
            .iter()
            .map(|r| r.iter().map(|v| v.to_string()).collect())
            .collect(),
        };
        let md = modes_markdown(&table);
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        // Five cells have both accuracies; gains 10, 5, -2, 20 and 0 points.
        assert!(rows[1].starts_with("| all | 5 |"), "{md}");
        assert!(rows[1].contains("| +6.6 | -2.0 to +20.0 | 3 |"), "{md}");
        // Within t the two orders agree (Spearman 1) although the gain shrinks.
        assert!(rows[2].starts_with("| target = t | 3 |"), "{md}");
        assert!(rows[2].contains("| 1.000 | +4.3 |"), "{md}");
        assert!(rows[3].starts_with("| target = u | 2 |"), "{md}");
        // Without both modes there is no section.
        let probe_only = Table {
            columns: vec!["target".into(), "accuracy_linear_probe".into()],
            rows: vec![vec!["t".into(), "0.5".into()]],
        };
        assert_eq!(modes_markdown(&probe_only), "");
    }

    #[test]
    fn seed_means_average_each_model_over_its_seeds() {
        let table = Table {
            columns: ["cell", "target", "model", "seed", "bound", "accuracy_full"]
                .iter()
                .map(|c| c.to_string())
                .collect(),
            rows: [
                ["a__t__s0", "t", "a", "0", "2.0", "0.8"],
                ["b__t__s0", "t", "b", "0", "3.0", "0.5"],
                ["a__t__s1", "t", "a", "1", "4.0", "0.9"],
                ["b__t__s1", "t", "b", "1", "", "0.7"],
            ]
            .iter()
            .map(|r| r.iter().map(|v| v.to_string()).collect())
            .collect(),
        };
        let mean = seed_mean_table(&table);
        assert_eq!(
            mean.rows,
            [
                ["a__t__s0", "t", "a", "mean", "3", "0.8500000000000001"],
                ["b__t__s0", "t", "b", "mean", "3", "0.6"],
            ]
        );
    }

    #[test]
    fn paired_differences_are_taken_within_target_and_seed_groups() {
        // Four (target, seed) groups of four models. LogME orders the models as their accuracy
        // does in every group; the bound (smaller predicts better) orders them backwards in
        // three groups and as accuracy does in the fourth.
        let columns = ["target", "seed", "model", "bound", "logme", "accuracy_full"];
        let mut rows = Vec::new();
        for (g, (target, seed)) in [("a", "0"), ("a", "1"), ("b", "0"), ("b", "1")]
            .iter()
            .enumerate()
        {
            for m in 0..4 {
                let accuracy = 0.9 - 0.1 * m as f64;
                let logme = 4.0 - m as f64;
                let bound = if g == 3 {
                    1.0 + m as f64
                } else {
                    4.0 - m as f64
                };
                rows.push(vec![
                    target.to_string(),
                    seed.to_string(),
                    format!("m{m}"),
                    bound.to_string(),
                    logme.to_string(),
                    accuracy.to_string(),
                ]);
            }
        }
        let table = Table {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows,
        };
        let paired = paired_comparisons(&table, &["full".to_string()]);
        assert_eq!(paired.len(), 1);
        let r = &paired[0];
        assert_eq!(
            (r.estimator.as_str(), r.baseline.as_str()),
            ("bound", "logme")
        );
        assert_eq!(r.groups, 4);
        // Per group: weighted tau -1 - 1 = -2 (three groups) and 1 - 1 = 0 (one group).
        assert!(
            (r.weighted_tau_difference.value + 1.5).abs() < 1e-12,
            "{r:?}"
        );
        assert!((r.spearman_difference.value + 1.5).abs() < 1e-12, "{r:?}");
        assert!((r.baseline_weighted_tau - 1.0).abs() < 1e-12);
        assert!((r.estimator_weighted_tau + 0.5).abs() < 1e-12);
        let ci = r.weighted_tau_difference;
        assert!(
            ci.low >= -2.0 && ci.high <= 0.0 && ci.low < ci.high,
            "{ci:?}"
        );
        let md = paired_markdown(&paired);
        assert!(
            md.contains("| bound | logme | full | 4 | -0.500 / 1.000 | -1.500 ["),
            "{md}"
        );
    }
}
