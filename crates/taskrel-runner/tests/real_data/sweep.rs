//! Sweeps end to end on real data: `configs/smoke.yaml` run, reported, sharded and merged,
//! killed and resumed; malformed sweeps rejected before anything is written.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use taskrel_testkit::{data_root, workspace_root};

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_taskrel"));
    c.args(args).arg("--data-root").arg(data_root());
    c
}

fn ok(args: &[&str]) -> Output {
    let out = command(args).output().unwrap();
    assert!(
        out.status.success(),
        "taskrel {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn smoke() -> String {
    workspace_root()
        .join("configs/smoke.yaml")
        .display()
        .to_string()
}

/// `cells.csv` without its timing columns (the only ones that differ between runs).
fn rows_without_timings(path: &Path) -> Vec<Vec<String>> {
    let mut r = csv::Reader::from_path(path).unwrap();
    let headers: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    let keep: Vec<usize> = (0..headers.len())
        .filter(|&i| !headers[i].starts_with("seconds_"))
        .collect();
    let mut rows = vec![keep.iter().map(|&i| headers[i].clone()).collect()];
    for rec in r.records() {
        let rec = rec.unwrap();
        rows.push(keep.iter().map(|&i| rec[i].to_string()).collect());
    }
    rows
}

fn run_smoke(results: &Path, cache: &Path, extra: &[&str]) -> Output {
    let sweep = smoke();
    let mut args = vec![
        "run",
        sweep.as_str(),
        "--results",
        results.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    ok(&args)
}

#[test]
fn smoke_sweep_runs_reports_shards_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (results, cache) = (tmp.path().join("results"), tmp.path().join("cache"));
    let plan = ok(&["plan", &smoke(), "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let cells = plan["cells"].as_array().unwrap().len();
    assert_eq!(cells, 5);

    run_smoke(&results, &cache, &[]);
    let out = results.join("smoke");
    for f in [
        "config.yaml",
        "manifest.json",
        "cells.csv",
        "correlation.csv",
        "summary.md",
        "plots/bound_vs_linear_probe_all.png",
        "plots/bound_vs_linear_probe_all.svg",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let png = std::fs::read(out.join("plots/bound_vs_linear_probe_all.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let svg = std::fs::read_to_string(out.join("plots/bound_vs_linear_probe_all.svg")).unwrap();
    assert!(svg.contains("bound vs accuracy"), "plot title missing");

    let rows = rows_without_timings(&out.join("cells.csv"));
    assert_eq!(rows.len(), 1 + cells);
    let header = &rows[0];
    for col in [
        "bound",
        "reference_loss",
        "label_entropy",
        "wasserstein",
        "bound_unlabeled",
        "accuracy_linear_probe",
        "source_test_accuracy",
    ] {
        let c = header.iter().position(|h| h == col).unwrap();
        for row in &rows[1..] {
            let v: f64 = row[c]
                .parse()
                .unwrap_or_else(|_| panic!("{col}: {:?}", row[c]));
            assert!(v.is_finite(), "{col} = {v}");
        }
    }
    let acc = header
        .iter()
        .position(|h| h == "accuracy_linear_probe")
        .unwrap();
    for row in &rows[1..] {
        let a: f64 = row[acc].parse().unwrap();
        assert!(a > 0.3 && a <= 1.0, "linear-probe accuracy {a} in {row:?}");
    }
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        summary.contains("| bound | linear_probe | all | 5 |"),
        "{summary}"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let first_run = &manifest["invocations"][0];
    assert_eq!(first_run["command"], "run");
    assert_eq!(first_run["cells_run"], 5);
    assert_eq!(first_run["cells_finished"], 5);
    assert_eq!(first_run["taskrel_version"], env!("CARGO_PKG_VERSION"));
    assert!(first_run["stage_seconds"]["features"].as_f64().unwrap() > 0.0);

    // `report` regenerates the same summary from the CSV.
    std::fs::remove_file(out.join("summary.md")).unwrap();
    ok(&["report", out.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(out.join("summary.md")).unwrap(),
        summary
    );

    // `report` killed at several points leaves every output whole (the old one or the new
    // one) and nothing temporary.
    for delay_ms in [0, 5, 10, 20, 40, 80, 160] {
        let mut child = command(&["report", out.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        for p in walk(&out) {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.contains(".tmp") {
                continue; // the killed process's own, removed by the next report below
            }
            if name.ends_with(".png") {
                assert_eq!(&std::fs::read(&p).unwrap()[1..4], b"PNG", "{}", p.display());
            }
            if name.ends_with(".svg") || name.ends_with(".md") || name.ends_with(".csv") {
                assert!(
                    std::fs::metadata(&p).unwrap().len() > 0,
                    "{} is empty",
                    p.display()
                );
            }
        }
        assert_eq!(
            std::fs::read_to_string(out.join("summary.md")).unwrap(),
            summary
        );
        ok(&["report", out.to_str().unwrap()]);
        let left: Vec<PathBuf> = walk(&out)
            .into_iter()
            .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(
            left.is_empty(),
            "left after a kill at {delay_ms} ms and a report: {left:?}"
        );
    }

    // A second run finds every cell done and changes no row.
    let again = run_smoke(&results, &cache, &[]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 cells run, 5 already done"));
    assert_eq!(rows_without_timings(&out.join("cells.csv")), rows);

    // As committed (cells.csv and config.yaml, no per-cell records), the folder resumes from
    // cells.csv: nothing runs, and no row changes.
    let records = out.join("cells");
    std::fs::rename(&records, tmp.path().join("records")).unwrap();
    let resumed = run_smoke(&results, &cache, &[]);
    assert!(
        String::from_utf8_lossy(&resumed.stdout).contains("0 cells run, 5 already done"),
        "{}",
        String::from_utf8_lossy(&resumed.stdout)
    );
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("5 finished cells restored"));
    assert_eq!(rows_without_timings(&out.join("cells.csv")), rows);
    std::fs::remove_dir_all(&records).unwrap();
    std::fs::rename(tmp.path().join("records"), &records).unwrap();

    // Recomputing a score on finished cells reproduces it and keeps every other column.
    let rescored = run_smoke(&results, &cache, &["--rescore", "relatedness_unlabeled"]);
    assert!(String::from_utf8_lossy(&rescored.stdout).contains("(5 rescored)"));
    assert_eq!(rows_without_timings(&out.join("cells.csv")), rows);
    // Each invocation is appended to the manifest; the first run's record stays.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let invocations = manifest["invocations"].as_array().unwrap();
    assert_eq!(invocations.len(), 4);
    assert_eq!(&invocations[0], first_run);
    assert_eq!(invocations[3]["cells_rescored"], 5);
    assert_eq!(
        invocations[3]["rescored_scores"][0],
        "relatedness_unlabeled"
    );
    // A results folder as committed keeps cells.csv only: --rescore restores the finished
    // cells from it instead of running them again.
    std::fs::remove_dir_all(out.join("cells")).unwrap();
    let restored = run_smoke(&results, &cache, &["--rescore", "relatedness_unlabeled"]);
    assert!(String::from_utf8_lossy(&restored.stderr).contains("5 finished cells restored"));
    assert!(
        String::from_utf8_lossy(&restored.stdout)
            .contains("0 cells run, 5 already done (5 rescored)")
    );
    assert_eq!(rows_without_timings(&out.join("cells.csv")), rows);
    let bad = command(&["run", &smoke(), "--results", results.to_str().unwrap()])
        .args(["--rescore", "logme"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a score of this sweep"));

    // Shards 1/3, 2/3, 3/3 merged equal the unsharded run.
    let mut shard_dirs = Vec::new();
    for i in 1..=3 {
        let dir = tmp.path().join(format!("shard{i}"));
        run_smoke(&dir, &cache, &["--shard", &format!("{i}/3")]);
        shard_dirs.push(dir.join("smoke").to_str().unwrap().to_string());
    }
    let merged = tmp.path().join("merged");
    let mut args = vec!["merge"];
    args.extend(shard_dirs.iter().map(|s| s.as_str()));
    args.extend(["--into", merged.to_str().unwrap()]);
    ok(&args);
    assert_eq!(rows_without_timings(&merged.join("cells.csv")), rows);

    // SIGKILL at several points of a run with an empty cache, then resume: same rows, once each.
    let (killed, killed_cache) = (tmp.path().join("killed"), tmp.path().join("killed-cache"));
    let mut interrupted = 0;
    for delay_ms in [1500, 3000, 5000, 8000] {
        let mut child = command(&[
            "run",
            &smoke(),
            "--results",
            killed.to_str().unwrap(),
            "--cache",
            killed_cache.to_str().unwrap(),
            "--quiet",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL on Unix
        child.wait().unwrap();
        // The manifest is written last: without it, the kill interrupted the run.
        interrupted += usize::from(!killed.join("smoke/manifest.json").exists());
    }
    assert!(interrupted >= 1, "no kill interrupted a run");
    run_smoke(&killed, &killed_cache, &[]);
    assert_eq!(rows_without_timings(&killed.join("smoke/cells.csv")), rows);
    // Nothing temporary is left: no temp files, claims or entries moved aside.
    let left: Vec<PathBuf> = [&killed, &killed_cache]
        .into_iter()
        .flat_map(|d| walk(d))
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            [".tmp", ".stale-", ".claim"]
                .iter()
                .any(|m| name.contains(m))
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // Two runs at once on one results folder and one empty cache: each cell is computed by
    // one of them, and both end with the rows of a single run.
    let (shared, shared_cache) = (tmp.path().join("shared"), tmp.path().join("shared-cache"));
    let runs: Vec<_> = (0..2)
        .map(|_| {
            command(&[
                "run",
                &smoke(),
                "--results",
                shared.to_str().unwrap(),
                "--cache",
                shared_cache.to_str().unwrap(),
                "--quiet",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let mut computed = 0;
    for run in runs {
        let out = run.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let n: usize = stdout
            .split("smoke: ")
            .nth(1)
            .and_then(|s| s.split(" cells run").next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no cell count in {stdout:?}"));
        computed += n;
    }
    assert_eq!(computed, 5, "cells computed by the two runs together");
    assert_eq!(rows_without_timings(&shared.join("smoke/cells.csv")), rows);
}

fn write_sweep(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("bad.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

const GOOD: &str = "name: bad
models:
  m: {from: lenet200, train_on: mnist}
targets:
  t: {dataset: usps}
grid:
  model: [m]
  target: [t]
";

#[test]
fn malformed_sweeps_fail_before_writing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let fake_pth = tmp.path().join("fake.pth");
    std::fs::write(&fake_pth, "state_dict = {}\n").unwrap();
    let cases = [
        // A typo in a key.
        (
            GOOD.replace("  target: [t]", "  targte: [t]"),
            "unknown field `targte`",
            "line 8",
        ),
        // An unknown model in the grid.
        (
            GOOD.replace("model: [m]", "model: [m, resnet]"),
            "unknown model \"resnet\"; models defined: m",
            ":7:",
        ),
        // A wrong type.
        (
            format!("{GOOD}finetune: {{epochs: three}}\n"),
            "epochs",
            "line 9",
        ),
        // A text target for an image model.
        (
            GOOD.replace("dataset: usps", "dataset: ag_news"),
            "image model but target t is a text dataset",
            ":8:",
        ),
        // An unknown dataset.
        (
            GOOD.replace("dataset: usps", "dataset: svhn"),
            "targets.t.dataset",
            ":5:",
        ),
        // A name that leaves the results folder.
        (
            GOOD.replace("name: bad", "name: .."),
            "name: expected a folder name",
            ":1:7:",
        ),
        // Zero counts, rates that cannot work, classes the dataset lacks: placed at the key.
        (
            format!("{GOOD}pretrain: {{epochs: 2, batch_size: 0}}\n"),
            "pretrain.batch_size: expected a positive count, got 0",
            ":9:23:",
        ),
        (
            format!("{GOOD}finetune: {{lr: .nan}}\n"),
            "finetune.lr: expected a positive finite rate, got NaN",
            ":9:",
        ),
        (
            format!("{GOOD}measure:\n  test_per_class: 0\n"),
            "measure.test_per_class: expected a positive count, got 0",
            ":10:3:",
        ),
        (
            format!("{GOOD}score:\n  reference_per_class: 20\n  target_per_class: 0\n"),
            "score.target_per_class: expected at least 2 samples per class, got 0",
            ":11:3:",
        ),
        (
            format!("{GOOD}score:\n  relatedness:\n    iterations: 10\n    batch_size: 0\n"),
            "score.relatedness.batch_size: expected a positive count, got 0",
            ":12:5:",
        ),
        (
            GOOD.replace("{dataset: usps}", "{dataset: usps, classes: [0, 10]}"),
            "class 10 is outside usps, whose classes are 0..9",
            ":5:",
        ),
        // Model paths that exist but hold no model.
        (
            GOOD.replace(
                "{from: lenet200, train_on: mnist}",
                &format!("{{from: {}, reference: mnist}}", fake_pth.display()),
            ),
            "fake.pth is not a PyTorch .pth file (no zip archive header)",
            ":3:",
        ),
        (
            GOOD.replace(
                "{from: lenet200, train_on: mnist}",
                &format!("{{from: {}, reference: mnist}}", tmp.path().display()),
            ),
            "is not a model folder: expected config.json",
            ":3:",
        ),
        (
            format!("{GOOD}finetune: {{epochs: 0}}\n"),
            "finetune.epochs: expected a positive count, got 0",
            ":9:12:",
        ),
        (
            format!("{GOOD}finetune: {{lr: .inf}}\n"),
            "finetune.lr: expected a positive finite rate, got inf",
            ":9:",
        ),
        (
            format!("{GOOD}pretrain: {{lr: -0.001}}\n"),
            "pretrain.lr: expected a positive finite rate, got -0.001",
            ":9:",
        ),
        (
            format!("{GOOD}pretrain: {{per_class: 0}}\n"),
            "pretrain.per_class: expected a positive count, got 0",
            ":9:",
        ),
        (
            format!("{GOOD}score:\n  reference_per_class: 0\n"),
            "score.reference_per_class: expected at least 2 samples per class, got 0",
            ":10:3:",
        ),
        // More samples per class than the data holds.
        (
            format!("{GOOD}score:\n  target_per_class: 600\n"),
            "target t has 275 samples of class 5 (5) to draw from (the odd half of usps/train), 600 asked",
            ":10:3:",
        ),
        (
            format!("{GOOD}pretrain: {{per_class: 9000}}\n"),
            "model m trains on mnist, which has 5421 training samples of class 5 (5), 9000 asked",
            ":9:12:",
        ),
        // A model's own budget: checked as the sweep's, placed at the model.
        (
            GOOD.replace(
                "train_on: mnist}",
                "train_on: mnist, pretrain: {per_class: 9000}}",
            ),
            "model m trains on mnist, which has 5421 training samples of class 5 (5), 9000 asked",
            ":3:",
        ),
        (
            GOOD.replace("train_on: mnist}", "train_on: mnist, pretrain: {lr: 0.1}}"),
            "unknown field `lr`, expected one of epochs, per_class, seed",
            ":3:",
        ),
        (
            GOOD.replace(
                "train_on: mnist}",
                "train_on: mnist, pretrain: {epochs: 0}}",
            ),
            "models.m.pretrain: expected positive `epochs` and `per_class`",
            ":3:",
        ),
        (
            GOOD.replace(
                "{from: lenet200, train_on: mnist}",
                "{from: models/ccexam/mnist.pth, reference: mnist, pretrain: {seed: 1}}",
            ),
            "models.m.pretrain: a training budget applies to models with `train_on` only",
            ":3:",
        ),
    ];
    for (text, message, place) in cases {
        let path = write_sweep(tmp.path(), &text);
        // `plan` reports what `run` reports, and neither writes anything.
        for verb in ["plan", "run"] {
            let mut args = vec![verb, path.to_str().unwrap()];
            if verb == "run" {
                args.extend(["--results", results.to_str().unwrap()]);
            }
            let out = command(&args).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{verb} accepted:\n{text}");
            assert!(err.contains(message), "{verb}: {err:?} lacks {message:?}");
            assert!(err.contains(place), "{verb}: {err:?} lacks {place:?}");
            assert!(!results.exists(), "wrote results for a bad sweep");
        }
    }
}

/// Every path under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                dirs.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn a_damaged_or_edited_cache_entry_is_recomputed_and_stale_temp_files_go() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let only = ["--only", "lenet_mnist__usps__s0"];
    let first = tmp.path().join("first");
    run_smoke(&first, &cache, &only);
    let want = rows_without_timings(&first.join("smoke/cells.csv"));
    // Entries are created with the user's umask, like any file the user creates, so that a
    // shared cache is readable by the users it is shared with.
    {
        use std::os::unix::fs::PermissionsExt;
        let probe = tmp.path().join("probe");
        std::fs::write(&probe, b"").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let expected = mode(&probe);
        for entry in walk(&cache) {
            if entry.is_file() {
                assert_eq!(mode(&entry), expected, "{}", entry.display());
            }
        }
    }
    let mut features: Vec<PathBuf> = std::fs::read_dir(cache.join("features"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    features.sort();
    assert!(features.len() >= 2, "{features:?}");
    // A truncated entry, and a whole one whose labels were shifted by hand.
    let bytes = std::fs::read(&features[0]).unwrap();
    std::fs::write(&features[0], &bytes[..bytes.len() / 2]).unwrap();
    let mut edited = taskrel_score::FeatureSet::load(&features[1]).unwrap();
    let k = edited.classes.len() as u32;
    for y in edited.labels.iter_mut().flatten() {
        *y = (*y + 1) % k;
    }
    edited.save(&features[1]).unwrap();
    // A checkpoint with a byte more, and temporary files of a process that no longer runs
    // (above Linux's largest process id).
    let model_dir = std::fs::read_dir(cache.join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    let weights = model_dir.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes.push(0);
    std::fs::write(&weights, bytes).unwrap();
    let stale = [
        cache.join("features/abc.tmp-4194305"),
        cache.join("models/abc.tmp-4194305"),
    ];
    std::fs::write(&stale[0], b"partial").unwrap();
    std::fs::create_dir_all(&stale[1]).unwrap();

    let second = tmp.path().join("second");
    let out = run_smoke(&second, &cache, &only);
    let err = String::from_utf8_lossy(&out.stderr);
    for (what, path) in [
        ("truncated features", features[0].display().to_string()),
        ("edited features", features[1].display().to_string()),
        ("checkpoint", model_dir.display().to_string()),
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains(&path) && l.contains("recomputing")),
            "{what} not reported as recomputed:\n{err}"
        );
    }
    assert_eq!(rows_without_timings(&second.join("smoke/cells.csv")), want);
    for p in &stale {
        assert!(!p.exists(), "{} left in place", p.display());
    }
    // A finished cell whose bound was edited by hand is computed again.
    let record = first.join("smoke/cells/lenet_mnist__usps__s0.json");
    let mut row: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    row["bound"] = 99.0.into();
    std::fs::write(&record, serde_json::to_vec_pretty(&row).unwrap()).unwrap();
    let out = run_smoke(&first, &cache, &only);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not match its checksum; the cell is computed again"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 cells run"));
    assert_eq!(rows_without_timings(&first.join("smoke/cells.csv")), want);
    // Healed: a third run uses every entry as it is.
    let out = run_smoke(&tmp.path().join("third"), &cache, &only);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("recomputing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn csv_datasets_serve_as_targets_and_references_of_a_text_sweep() {
    let tmp = tempfile::tempdir().unwrap();
    let mut reviews = String::from("stars,headline,body\n");
    let mut topics = String::from("topic,text,part\n");
    let words = [
        ["superb", "wonderful", "great"],
        ["dreadful", "boring", "awful"],
        ["average", "fine", "ordinary"],
    ];
    for i in 0..36 {
        let k = i % 3;
        let w = words[k][i % 3];
        reviews.push_str(&format!(
            "{},\"A {w} film, number {i}\",\"The plot was {} and the cast {w}.\"\n",
            ["good", "bad", "so-so"][k],
            words[k][(i / 3) % 3]
        ));
        let part = if i % 4 == 0 { "test" } else { "train" };
        topics.push_str(&format!(
            "{},\"{} report {i}: {}\",{part}\n",
            ["sport", "politics", "science"][k],
            ["The match", "The election", "The experiment"][k],
            [
                "goals and a late winner",
                "votes and a new cabinet",
                "a lab and a new result"
            ][k]
        ));
    }
    std::fs::write(tmp.path().join("reviews.csv"), &reviews).unwrap();
    std::fs::write(tmp.path().join("topics.csv"), &topics).unwrap();
    let sweep = format!(
        "name: csv
datasets:
  reviews: {{csv: {dir}/reviews.csv, label_column: stars, text_columns: [headline, body]}}
  topics: {{csv: {dir}/topics.csv, label_column: topic, text_columns: [text], split_column: part}}
models:
  minilm: {{from: models/all-MiniLM-L6-v2, reference: topics}}
targets:
  r: {{dataset: reviews}}
grid: {{model: [minilm], target: [r]}}
finetune: {{epochs: 1, batch_size: 8, per_class: 6}}
score:
  scores: [relatedness, logme]
  reference_per_class: 3
  target_per_class: 3
  relatedness: {{iterations: 5, batch_size: 9, head_epochs: 3}}
max_len: 24
",
        dir = tmp.path().display()
    );
    let path = tmp.path().join("csv.yaml");
    std::fs::write(&path, &sweep).unwrap();
    let results = tmp.path().join("results");
    let cache = tmp.path().join("cache");
    let p = path.to_str().unwrap();
    ok(&[
        "run",
        p,
        "--results",
        results.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--quiet",
    ]);
    let mut r = csv::Reader::from_path(results.join("csv/cells.csv")).unwrap();
    let headers = r.headers().unwrap().clone();
    let row = r.records().next().unwrap().unwrap();
    let get = |name: &str| row[headers.iter().position(|h| h == name).unwrap()].to_string();
    assert_eq!(get("target"), "r");
    assert!(get("reference").starts_with("csv:"), "{}", get("reference"));
    assert!(
        get("reference").contains("topics.csv"),
        "{}",
        get("reference")
    );
    for score in ["bound", "logme", "accuracy_linear_probe"] {
        let v: f64 = get(score).parse().unwrap_or(f64::NAN);
        assert!(v.is_finite(), "{score} = {:?}", get(score));
    }

    // Mistakes in a CSV dataset are placed: a built-in name, a file that is not there, a
    // column the file lacks (placed in the CSV by the file's own line).
    let cases = [
        (
            sweep
                .replace("  reviews: {csv", "  mnist: {csv")
                .replace("dataset: reviews", "dataset: mnist"),
            "datasets.mnist",
            "built-in",
        ),
        (
            sweep.replace("reviews.csv, label", "absent.csv, label"),
            "datasets.reviews.csv",
            "no file",
        ),
        (
            sweep.replace("label_column: stars", "label_column: rating"),
            "reviews.csv: line 1 (header)",
            "no column \"rating\"",
        ),
    ];
    for (text, place, message) in cases {
        std::fs::write(&path, &text).unwrap();
        let out = command(&["plan", p]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "plan accepted:\n{text}");
        assert!(
            err.contains(place) && err.contains(message),
            "{err:?} lacks {place:?} / {message:?}"
        );
    }
}

/// A source with its own seed is trained once and shared by every seed of the grid; one
/// without is trained per seed.
#[test]
fn a_fixed_source_is_trained_once_for_all_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let cache = tmp.path().join("cache");
    let path = tmp.path().join("fixed.yaml");
    std::fs::write(
        &path,
        "name: fixed
models:
  fixed: {from: lenet200, train_on: usps, pretrain: {seed: 7, epochs: 2}}
  per_seed: {from: lenet200, train_on: usps}
targets:
  t: {dataset: mnist, classes: [0, 1, 2]}
grid:
  model: [fixed, per_seed]
  target: [t]
  seed: [0, 1]
pretrain: {epochs: 1, batch_size: 64, per_class: 30}
finetune: {epochs: 1, per_class: 10}
measure: {modes: [linear_probe], test_per_class: 10}
score: {scores: [knn], reference_per_class: 10, target_per_class: 10}
",
    )
    .unwrap();
    let plan = ok(&["plan", path.to_str().unwrap()]);
    let plan = String::from_utf8_lossy(&plan.stdout);
    for seed in [0, 1] {
        assert!(
            plan.contains(&format!(
                "(lenet200 trained on usps, 2 epochs, seed 7, fixed), target t, seed {seed}"
            )),
            "{plan}"
        );
        assert!(
            plan.contains(&format!(
                "(lenet200 trained on usps, 1 epochs, seed {seed}), target t, seed {seed}"
            )),
            "{plan}"
        );
    }
    ok(&[
        "run",
        path.to_str().unwrap(),
        "--results",
        results.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--quiet",
    ]);
    // Three trained models: the fixed one and one per seed for the other.
    let trained = std::fs::read_dir(cache.join("models")).unwrap().count();
    assert_eq!(trained, 3);
    let mut r = csv::Reader::from_path(results.join("fixed/cells.csv")).unwrap();
    let h = r.headers().unwrap().clone();
    let col = |name: &str| h.iter().position(|c| c == name).unwrap();
    let (model, acc) = (col("model"), col("source_test_accuracy"));
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    let acc_of = |m: &str| -> Vec<String> {
        rows.iter()
            .filter(|r| &r[model] == m)
            .map(|r| r[acc].to_string())
            .collect()
    };
    let (fixed, per_seed) = (acc_of("fixed"), acc_of("per_seed"));
    assert_eq!(fixed.len(), 2);
    assert_eq!(fixed[0], fixed[1], "a fixed source differs between seeds");
    assert_ne!(
        per_seed[0], per_seed[1],
        "per-seed sources are the same model"
    );
}
