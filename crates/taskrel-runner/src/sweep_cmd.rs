//! `taskrel plan | run | report | merge`: sweeps from YAML to results folders.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::engine::Engine;
use crate::results::{self, CELLS_CSV, CONFIG_FILE, Store};
use crate::sweep::{Cell, Plan, ScoreKind, Sweep};

/// Reads and validates a sweep file (with `check_files`, also that the data can supply every
/// per-class sample it asks for).
pub fn load_plan(path: &Path, data_root: &Path, check_files: bool) -> anyhow::Result<Plan> {
    let plan = Sweep::read(path)?.plan(path, data_root, check_files)?;
    if check_files {
        check_sample_sizes(&plan, path, data_root)?;
    }
    Ok(plan)
}

/// Every per-class request against the smallest class of the split it is drawn from: target
/// samples from the odd half of each target's train split, reference samples from the even
/// half of each reference dataset's train split, fine-tuning samples from each target's train
/// split.
fn check_sample_sizes(plan: &Plan, path: &Path, data_root: &Path) -> anyhow::Result<()> {
    use crate::sweep::DataRef;
    let mut loaded: std::collections::BTreeMap<DataRef, taskrel_data::Dataset> =
        std::collections::BTreeMap::new();
    let mut train = |name: &DataRef| -> anyhow::Result<taskrel_data::Dataset> {
        if let Some(d) = loaded.get(name) {
            return Ok(d.clone());
        }
        let (train, _) = name.load(data_root)?;
        loaded.insert(name.clone(), train.clone());
        Ok(train)
    };
    // (class, count) of the first smallest class.
    let smallest = |d: &taskrel_data::Dataset| -> (usize, usize) {
        d.class_counts()
            .into_iter()
            .enumerate()
            .min_by_key(|&(_, n)| n)
            .unwrap_or((0, 0))
    };
    let sweep = &plan.sweep;
    let cells_use = |pred: &dyn Fn(&crate::sweep::Cell) -> bool| plan.cells.iter().any(pred);
    for target in plan.targets.values() {
        if !cells_use(&|c| c.target == target.name) {
            continue;
        }
        let split = train(&target.dataset)?;
        let pool = crate::engine::target_pool(&split, target.classes.as_deref())?;
        let (class, n) = smallest(&pool);
        if sweep.score.target_per_class > n {
            return Err(sweep.error_at(
                path,
                &["score", "target_per_class"],
                format!(
                    "target {} has {n} samples of class {class} ({}) to draw from (the odd half of {}/train), {} asked",
                    target.name,
                    pool.classes.get(class).map_or("?", String::as_str),
                    target.dataset,
                    sweep.score.target_per_class
                ),
            ));
        }
        let full = match &target.classes {
            Some(c) => split.subset_classes(c)?,
            None => split,
        };
        let (class, n) = smallest(&full);
        if let Some(asked) = sweep.finetune.per_class.filter(|&k| k > n) {
            return Err(sweep.error_at(
                path,
                &["finetune", "per_class"],
                format!(
                    "target {} has {n} training samples of class {class} ({}), {asked} asked",
                    target.name,
                    full.classes.get(class).map_or("?", String::as_str),
                ),
            ));
        }
    }
    for source in plan.sources.values() {
        let asked = source.pretrain.per_class.or(sweep.pretrain.per_class);
        let (Some(train_on), Some(asked)) = (&source.train_on, asked) else {
            continue;
        };
        if !cells_use(&|c| c.model == source.name) {
            continue;
        }
        let split = train(train_on)?;
        let (class, n) = smallest(&split);
        if asked > n {
            let keys: &[&str] = match source.pretrain.per_class {
                Some(_) => &["models", &source.name, "pretrain", "per_class"],
                None => &["pretrain", "per_class"],
            };
            return Err(sweep.error_at(
                path,
                keys,
                format!(
                    "model {} trains on {train_on}, which has {n} training samples of class {class} ({}), {asked} asked",
                    source.name,
                    split.classes.get(class).map_or("?", String::as_str),
                ),
            ));
        }
    }
    if plan.scores.iter().any(|s| s.needs_reference()) {
        for source in plan.sources.values() {
            let Some(reference) = &source.reference else {
                continue;
            };
            if !cells_use(&|c| c.model == source.name) {
                continue;
            }
            let pool = crate::engine::reference_pool(&train(reference)?)?;
            let (class, n) = smallest(&pool);
            if sweep.score.reference_per_class > n {
                return Err(sweep.error_at(
                    path,
                    &["score", "reference_per_class"],
                    format!(
                        "model {}'s reference task {reference} has {n} samples of class {class} ({}) to draw from (the even half of its train split), {} asked",
                        source.name,
                        pool.classes.get(class).map_or("?", String::as_str),
                        sweep.score.reference_per_class
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `taskrel plan`.
pub fn plan(path: &Path, data_root: &Path, json_out: bool) -> anyhow::Result<()> {
    let plan = load_plan(path, data_root, true)?;
    let mut text = String::new();
    if json_out {
        let cells: Vec<_> = plan
            .cells
            .iter()
            .map(|c| json!({"cell": c.id, "model": c.model, "target": c.target, "seed": c.seed}))
            .collect();
        text = serde_json::to_string_pretty(&json!({"name": plan.name, "cells": cells}))?;
        text.push('\n');
    } else {
        let _ = writeln!(
            text,
            "sweep {}: {} cells; scores: {}; measured: {}",
            plan.name,
            plan.cells.len(),
            plan.scores
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            plan.sweep
                .measure
                .modes
                .iter()
                .map(|m| format!("accuracy after {}", m.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (i, c) in plan.cells.iter().enumerate() {
            let source = &plan.sources[&c.model];
            let how = match &source.train_on {
                Some(d) => {
                    let cfg = source.pretrain.config(&plan.sweep.pretrain, c.seed);
                    let fixed = if source.pretrain.seed.is_some() {
                        ", fixed"
                    } else {
                        ""
                    };
                    format!(
                        "{} trained on {d}, {} epochs, seed {}{fixed}",
                        source.from, cfg.epochs, cfg.seed
                    )
                }
                None => source.from.clone(),
            };
            let _ = writeln!(
                text,
                "  {:>4}  {:<40} model {} ({how}), target {}, seed {}",
                i + 1,
                c.id,
                c.model,
                c.target,
                c.seed
            );
        }
    }
    // A closed pipe (`taskrel plan ... | head`) ends the output quietly.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Options of `taskrel run`.
#[derive(Debug, clap::Args)]
pub struct RunOptions {
    /// Sweep file (configs/*.yaml).
    pub sweep: PathBuf,
    /// Results go to <results>/<sweep name>/.
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
    /// Folder of fetched datasets and weights.
    #[arg(long, default_value = "data")]
    pub data_root: PathBuf,
    /// Cache of trained sources and features (default: <results>/.cache).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Run this cell only (an id from `taskrel plan`).
    #[arg(long, conflicts_with = "shard")]
    pub only: Option<String>,
    /// Run shard I of N (every N-th cell from the I-th), e.g. 2/4.
    #[arg(long, value_parser = crate::sweep::parse_shard)]
    pub shard: Option<(usize, usize)>,
    /// Recompute these scores (comma-separated) on cells already finished, keeping their
    /// other columns: for a score added or fixed after a run, without fine-tuning again.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub rescore: Vec<ScoreKind>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub hub: crate::model_cmd::HubArgs,
}

/// The fields every invocation records; the caller adds its own.
fn invocation(command: &str, started: f64, cells_planned: usize) -> results::Invocation {
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
    results::Invocation {
        command: command.into(),
        taskrel_version: env!("CARGO_PKG_VERSION").into(),
        git_revision: git(&["rev-parse", "HEAD"]),
        git_dirty: dirty,
        started: utc(started),
        finished: utc(now_unix()),
        seconds: now_unix() - started,
        cells_planned,
        ..Default::default()
    }
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix seconds (proleptic Gregorian, UTC).
fn utc(unix: f64) -> String {
    let secs = unix.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `taskrel run`.
pub fn run(opts: &RunOptions) -> anyhow::Result<()> {
    let path = opts.sweep.as_path();
    let plan = load_plan(path, &opts.data_root, true)?;
    let device = taskrel_models::device(&opts.device)?;
    let rescore = opts.rescore.clone();
    if let Some(other) = rescore.iter().find(|k| !plan.scores.contains(k)) {
        let valid: Vec<&str> = plan.scores.iter().map(|k| k.as_str()).collect();
        bail!(
            "--rescore {}: not a score of this sweep; its scores: {}",
            other.as_str(),
            valid.join(", ")
        );
    }
    let selected: Vec<_> = match (&opts.only, opts.shard) {
        (Some(id), _) => {
            let cell = plan.cells.iter().find(|c| &c.id == id).ok_or_else(|| {
                let ids: Vec<&str> = plan.cells.iter().map(|c| c.id.as_str()).collect();
                anyhow::anyhow!("--only {id}: no such cell; cells: {}", ids.join(", "))
            })?;
            vec![cell]
        }
        (None, Some((i, n))) => plan.shard(i, n),
        (None, None) => plan.cells.iter().collect(),
    };
    if let (Some((i, n)), true) = (opts.shard, selected.is_empty()) {
        bail!(
            "--shard {i}/{n}: selects no cell of the {} cells (use at most {} shards)",
            plan.cells.len(),
            plan.cells.len()
        );
    }
    let out = opts.results.join(&plan.name);
    let cache = opts
        .cache
        .clone()
        .unwrap_or_else(|| opts.results.join(".cache"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for dir in [out.clone(), out.join("plots"), out.join("cells")] {
        crate::engine::clean_stale_temps(&dir)?;
    }
    // A results folder as committed keeps cells.csv and config.yaml but no per-cell records:
    // a run of the very same resolved configuration resumes from cells.csv. Where records
    // exist they are the truth (a damaged one is computed again, not restored).
    let config = crate::yaml::to_string(&plan.sweep)?;
    let no_records = std::fs::read_dir(out.join("cells")).map_or(true, |entries| {
        !entries
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "json"))
    });
    let same_config = no_records
        && std::fs::read_to_string(out.join(CONFIG_FILE))
            .ok()
            .as_deref()
            == Some(config.as_str());
    results::write_config(&out, &config)?;
    let store = Store::new(&out);
    store.set_aside_damaged()?;
    if !rescore.is_empty() || same_config {
        let restored = store.restore_from_csv(&out.join(CELLS_CSV))?;
        if restored > 0 {
            let why = if rescore.is_empty() {
                "the same configuration's earlier run"
            } else {
                "rescoring"
            };
            eprintln!(
                "{}: {restored} finished cells restored from {CELLS_CSV} for {why}",
                plan.name
            );
        }
    }
    let started = now_unix();
    let order: Vec<String> = plan.cells.iter().map(|c| c.id.clone()).collect();
    let columns = plan.columns();
    let mut engine = Engine::new(
        &plan.sources,
        plan.settings(),
        &opts.data_root,
        &cache,
        device,
        opts.hub.download(opts.quiet),
    );
    let bar = ProgressBar::new(selected.len() as u64);
    if opts.quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} cells  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(plan.name.clone());
    let (mut ran, mut skipped, mut rescored, mut elsewhere) = (0usize, 0usize, 0usize, 0usize);
    // Cells another live run is computing: waited for at the end (or taken over if that run
    // dies).
    let mut pending: Vec<&Cell> = Vec::new();
    let mut queue: std::collections::VecDeque<&Cell> = selected.iter().copied().collect();
    while let Some(cell) = queue.pop_front() {
        if rescore.is_empty() && pending.contains(&cell) && store.is_done(&cell.id) {
            pending.retain(|c| c.id != cell.id);
            elsewhere += 1;
            bar.inc(1);
            continue;
        }
        if store.is_done(&cell.id) {
            if !rescore.is_empty() {
                let stage = |s: &str| bar.set_message(format!("{}: rescore {s}", cell.id));
                let mut row = store.get(&cell.id)?;
                engine
                    .rescore_cell(cell, plan.target(cell)?, &rescore, &mut row, &stage)
                    .with_context(|| format!("cell {}", cell.id))?;
                store.put(&cell.id, &row)?;
                rescored += 1;
            }
            skipped += 1;
            bar.inc(1);
            continue;
        }
        let Some(claim) = store.claim(&cell.id)? else {
            if !pending.contains(&cell) {
                pending.push(cell);
            }
            queue.push_back(cell);
            if queue.iter().all(|c| pending.contains(c)) {
                // Only cells other runs are computing are left: poll.
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            continue;
        };
        pending.retain(|c| c.id != cell.id);
        if store.is_done(&cell.id) {
            // Finished by another run between the check above and the claim.
            drop(claim);
            elsewhere += 1;
            bar.inc(1);
            continue;
        }
        let t = Instant::now();
        let stage = |s: &str| bar.set_message(format!("{}: {s}", cell.id));
        let mut row = engine
            .run_cell(cell, plan.target(cell)?, &plan.scores, &stage)
            .with_context(|| format!("cell {}", cell.id))?;
        row.insert("seconds_total".into(), json!(t.elapsed().as_secs_f64()));
        store.put(&cell.id, &row)?;
        drop(claim);
        results::write_cells_csv(&out.join(CELLS_CSV), &columns, &order, &store.rows()?)?;
        ran += 1;
        bar.inc(1);
        if opts.quiet || bar.is_hidden() {
            eprintln!(
                "[{}/{}] {} done in {:.1} s",
                ran + skipped,
                selected.len(),
                cell.id,
                t.elapsed().as_secs_f64()
            );
        }
    }
    bar.finish_and_clear();
    let finished =
        results::write_cells_csv(&out.join(CELLS_CSV), &columns, &order, &store.rows()?)?;
    let corr = results::render(&out, &plan)?;
    results::Manifest::append(
        &out,
        &plan.name,
        results::Invocation {
            config: Some(path.display().to_string()),
            device: Some(opts.device.clone()),
            cache: Some(cache.display().to_string()),
            shard: opts.shard.map(|(i, n)| format!("{i}/{n}")),
            cells_selected: Some(selected.len()),
            cells_run: Some(ran),
            cells_already_done: Some(skipped),
            cells_run_by_another_process: Some(elsewhere),
            cells_rescored: Some(rescored),
            rescored_scores: opts
                .rescore
                .iter()
                .map(|k| k.as_str().to_string())
                .collect(),
            cells_finished: finished,
            stage_seconds: engine.stage_seconds.clone(),
            ..invocation("run", started, plan.cells.len())
        },
    )?;
    println!(
        "{}: {ran} cells run, {skipped} already done ({rescored} rescored), {elsewhere} run by another process, {finished} of {} in {}",
        plan.name,
        plan.cells.len(),
        out.join(CELLS_CSV).display()
    );
    if !corr.is_empty() {
        println!("\n{}", results::correlation_markdown(&corr));
    }
    Ok(())
}

/// `taskrel report`.
pub fn report(dir: &Path, data_root: &Path) -> anyhow::Result<()> {
    let plan = load_plan(&dir.join(CONFIG_FILE), data_root, false)?;
    for d in [dir.to_path_buf(), dir.join("plots")] {
        crate::engine::clean_stale_temps(&d)?;
    }
    let corr = results::render(dir, &plan)?;
    println!(
        "rendered {} and {} from {}",
        dir.join("summary.md").display(),
        dir.join("correlation.csv").display(),
        dir.join(CELLS_CSV).display()
    );
    if !corr.is_empty() {
        println!("\n{}", results::correlation_markdown(&corr));
    }
    Ok(())
}

/// `taskrel merge`.
pub fn merge(dirs: &[PathBuf], into: &Path, data_root: &Path) -> anyhow::Result<()> {
    let started = now_unix();
    let Some(first) = dirs.first() else {
        bail!("merge: give at least one results folder");
    };
    let config = std::fs::read_to_string(first.join(CONFIG_FILE))
        .with_context(|| format!("reading {}", first.join(CONFIG_FILE).display()))?;
    for d in &dirs[1..] {
        let other = std::fs::read_to_string(d.join(CONFIG_FILE))
            .with_context(|| format!("reading {}", d.join(CONFIG_FILE).display()))?;
        if other != config {
            bail!(
                "{} and {} come from different sweeps (their config.yaml differ)",
                first.join(CONFIG_FILE).display(),
                d.join(CONFIG_FILE).display()
            );
        }
    }
    let plan = load_plan(&first.join(CONFIG_FILE), data_root, false)?;
    std::fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
    results::write_config(into, &config)?;
    let target = Store::new(into);
    let mut merged = 0;
    for d in dirs {
        for (id, row) in Store::new(d).rows()? {
            if !target.is_done(&id) {
                target.put(&id, &row)?;
                merged += 1;
            }
        }
    }
    let order: Vec<String> = plan.cells.iter().map(|c| c.id.clone()).collect();
    let finished = results::write_cells_csv(
        &into.join(CELLS_CSV),
        &plan.columns(),
        &order,
        &target.rows()?,
    )?;
    results::render(into, &plan)?;
    results::Manifest::append(
        into,
        &plan.name,
        results::Invocation {
            merged_from: dirs.iter().map(|d| d.display().to_string()).collect(),
            cells_finished: finished,
            ..invocation("merge", started, plan.cells.len())
        },
    )?;
    println!(
        "merged {merged} cells into {} ({finished} of {} finished)",
        into.display(),
        plan.cells.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0.0), "1970-01-01T00:00:00Z");
        // date -u -d @1795882710 +%FT%TZ
        assert_eq!(utc(1_795_882_710.0), "2026-11-28T16:18:30Z");
        assert_eq!(utc(951_782_400.0), "2000-02-29T00:00:00Z");
    }
}
