//! The `taskrel` command on inputs the tests write themselves (no downloads): a data root of
//! generated datasets (`taskrel_testkit::fixtures`) swept end to end, resumed and ranked; a
//! tiny BERT written by the test; clean failures on corrupt or missing data.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;
use std::process::{Command, Output};

use taskrel_testkit::{fixtures, json, run};

const TASKREL: &str = env!("CARGO_BIN_EXE_taskrel");

/// `taskrel ARGS --data-root ROOT`, which must succeed.
fn ok(root: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_taskrel"))
        .args(args)
        .arg("--data-root")
        .arg(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "taskrel {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A data root of generated datasets and a tiny random BERT checkpoint (`ROOT/models/tiny_bert`).
fn fixture_root(dir: &Path) -> std::path::PathBuf {
    let root = fixtures::data_root(&dir.join("data")).unwrap();
    let files = dir.join("bert-files");
    fixtures::bert_files(&files).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(files.join("config.json")).unwrap()).unwrap();
    let input = taskrel_models::TextInput {
        max_len: 16,
        pooling: "mean".into(),
        normalize: false,
    };
    let options = taskrel_models::LoadOptions {
        seed: 5,
        ..Default::default()
    };
    taskrel_models::random_bert(config, &files.join("tokenizer.json"), input, &options)
        .unwrap()
        .save(&root.join("models/tiny_bert"))
        .unwrap();
    root
}

const SWEEP: &str = r#"name: fixture
models:
  lenet_mnist: {from: lenet200, train_on: mnist}
  lenet_fashion: {from: lenet200, train_on: fashion_mnist}
  tiny_bert: {from: models/tiny_bert, train_on: ag_news}
targets:
  usps: {dataset: usps}
  mnist_0to4: {dataset: mnist, classes: [0, 1, 2, 3, 4]}
  news: {dataset: ag_news}
grid:
  model: [lenet_mnist, lenet_fashion, tiny_bert]
  target: [usps, mnist_0to4, news]
  seed: [0]
exclude:
  - {model: tiny_bert, target: usps}
  - {model: tiny_bert, target: mnist_0to4}
  - {model: lenet_mnist, target: news}
  - {model: lenet_fashion, target: news}
pretrain: {epochs: 4, batch_size: 20, lr: 0.001}
finetune: {epochs: 2, batch_size: 10, lr: 0.01}
measure:
  modes: [linear_probe, full]
score:
  scores: [relatedness, relatedness_unlabeled, logme, leep, knn]
  reference_per_class: 8
  target_per_class: 8
  relatedness: {iterations: 20, batch_size: 40, head_epochs: 40, eval_per_class: 4}
correlations:
  - {score: bound, measure: full, group_by: all}
"#;

/// The rows of a `cells.csv`, without the columns of timings.
fn rows_without_timings(path: &Path) -> Vec<Vec<String>> {
    let mut reader = csv::Reader::from_path(path).unwrap();
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            header
                .iter()
                .zip(r.iter())
                .filter(|(h, _)| !h.starts_with("seconds"))
                .map(|(_, v)| v.to_string())
                .collect()
        })
        .collect()
}

#[test]
fn a_sweep_over_generated_data_runs_resumes_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixture_root(dir.path());
    let sweep = dir.path().join("fixture.yaml");
    std::fs::write(&sweep, SWEEP).unwrap();
    let (results, cache) = (dir.path().join("results"), dir.path().join("cache"));
    let run = |results: &Path| {
        ok(
            &root,
            &[
                "run",
                sweep.to_str().unwrap(),
                "--results",
                results.to_str().unwrap(),
                "--cache",
                cache.to_str().unwrap(),
                "--quiet",
            ],
        )
    };
    run(&results);
    let out = results.join("fixture");
    let cells = out.join("cells.csv");
    let mut reader = csv::Reader::from_path(&cells).unwrap();
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name} in {header:?}"))
    };
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    let ids: Vec<&str> = rows.iter().map(|r| &r[column("cell")]).collect();
    assert_eq!(
        ids,
        [
            "lenet_mnist__usps__s0",
            "lenet_mnist__mnist_0to4__s0",
            "lenet_fashion__usps__s0",
            "lenet_fashion__mnist_0to4__s0",
            "tiny_bert__news__s0",
        ],
        "plan order, minus the excluded cross-modality pairs"
    );
    for r in &rows {
        for c in [
            "bound",
            "bound_unlabeled",
            "logme",
            "leep",
            "knn",
            "accuracy_full",
        ] {
            let v: f64 = r[column(c)].parse().unwrap_or(f64::NAN);
            assert!(
                v.is_finite(),
                "{}: {c} = {:?}",
                &r[column("cell")],
                &r[column(c)]
            );
        }
        let probe: f64 = r[column("accuracy_linear_probe")].parse().unwrap();
        assert!((0.0..=1.0).contains(&probe));
    }
    // Each class lights its own block in the same place in MNIST and USPS: the MNIST source
    // fine-tunes to USPS well.
    let accuracy: f64 = rows[0][column("accuracy_full")].parse().unwrap();
    assert!(accuracy > 0.8, "lenet_mnist on usps: {accuracy}");
    for file in [
        "summary.md",
        "correlation.csv",
        "manifest.json",
        "config.yaml",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let invocations = manifest["invocations"].as_array().unwrap();
    assert_eq!(invocations.len(), 1);
    assert_eq!(invocations[0]["cells_run"], 5);

    // A second run finds every cell done and changes nothing; the manifest keeps both runs.
    let before = std::fs::read(&cells).unwrap();
    run(&results);
    assert_eq!(std::fs::read(&cells).unwrap(), before);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let invocations = manifest["invocations"].as_array().unwrap();
    assert_eq!(invocations.len(), 2);
    assert_eq!(invocations[1]["cells_run"], 0);
    assert_eq!(invocations[1]["cells_already_done"], 5);

    // The same sweep from cached sources and features into a fresh folder gives the same
    // numbers (fixed seeds).
    let again = dir.path().join("again");
    run(&again);
    assert_eq!(
        rows_without_timings(&again.join("fixture/cells.csv")),
        rows_without_timings(&cells)
    );
}

#[test]
fn a_zoo_is_ranked_for_a_generated_target() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixture_root(dir.path());
    let zoo = dir.path().join("zoo.yaml");
    std::fs::write(
        &zoo,
        "name: fixture-zoo
models:
  lenet_mnist: {from: lenet200, train_on: mnist}
  lenet_fashion: {from: lenet200, train_on: fashion_mnist}
pretrain: {epochs: 4, batch_size: 20, lr: 0.001}
score:
  scores: [relatedness, logme, leep]
  reference_per_class: 8
  relatedness: {iterations: 20, batch_size: 40, head_epochs: 40, eval_per_class: 4}
",
    )
    .unwrap();
    let cache = dir.path().join("cache");
    let report = |extra: &[&str]| -> serde_json::Value {
        let out = ok(
            &root,
            &[
                &[
                    "rank",
                    "--zoo",
                    zoo.to_str().unwrap(),
                    "--target",
                    "usps",
                    "--budget",
                    "100",
                    "--cache",
                    cache.to_str().unwrap(),
                    "--json",
                    "--quiet",
                ][..],
                extra,
            ]
            .concat(),
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let ranked = report(&[]);
    let models = ranked["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!(ranked["labels_used"], true);
    let bounds: Vec<f64> = models
        .iter()
        .map(|m| m["bound"].as_f64().unwrap())
        .collect();
    assert!(
        bounds[0] <= bounds[1],
        "ranked by bound, smallest first: {bounds:?}"
    );
    for m in models {
        assert!(m["logme"].as_f64().unwrap().is_finite(), "{m}");
        assert!(m["verdict"].as_str().is_some_and(|v| !v.is_empty()), "{m}");
    }
    // Without labels only the label-free bound ranks.
    let unlabeled = report(&["--unlabeled"]);
    assert_eq!(unlabeled["labels_used"], false);
    assert_eq!(
        unlabeled["ranked_by"],
        "bound_unlabeled (smaller is better)"
    );
    // A text sample against image models is refused before any work.
    let texts = dir.path().join("texts.csv");
    std::fs::write(
        &texts,
        "label,text
a,one two
b,three four
",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_taskrel"))
        .args(["rank", "--zoo", zoo.to_str().unwrap(), "--samples"])
        .arg(&texts)
        .arg("--data-root")
        .arg(&root)
        .arg("--cache")
        .arg(&cache)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model lenet_fashion is an image model but the target sample holds texts"),
        "{err}"
    );
}

#[test]
fn corrupt_or_missing_data_exits_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("classes.txt"), "A\nB\n").unwrap();
    std::fs::write(
        dir.path().join("test.csv"),
        "\"1\",\"t\",\"b\"\n\"3\",\"t\",\"b\"\n",
    )
    .unwrap();
    let out = run(
        TASKREL,
        &["data", "dbpedia", "--root", dir.path().to_str().unwrap()],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("test.csv: line 2: expected a class index 1-2"),
        "{stderr}"
    );

    let out = run(
        TASKREL,
        &[
            "data",
            "mnist",
            "--root",
            dir.path().join("absent").to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fetch-data.sh"));

    let out = run(TASKREL, &["data", "cifar"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("expected one of: mnist, fashion_mnist, usps")
    );
}

#[test]
fn a_labelled_text_csv_is_summarised_and_its_errors_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reviews.csv");
    let mut csv = String::from("stars,headline,review\n");
    for i in 0..20 {
        csv.push_str(&format!(
            "{},head {i},\"body {i}, long\"\n",
            ["good", "bad"][i % 2]
        ));
    }
    std::fs::write(&path, &csv).unwrap();
    let name = format!("csv:{}", path.display());
    let args = [
        "data",
        name.as_str(),
        "--label-column",
        "stars",
        "--text-columns",
        "headline,review",
        "--json",
    ];
    let summary = json(TASKREL, &args);
    assert_eq!(summary["classes"], serde_json::json!(["bad", "good"]));
    assert_eq!(summary["modality"], "text");
    assert_eq!(
        summary["splits"]["test"]["class_counts"],
        serde_json::json!([3, 3])
    );
    assert_eq!(
        summary["splits"]["train"]["class_counts"],
        serde_json::json!([7, 7])
    );
    // Another seed draws another split of the same sizes.
    let other = json(TASKREL, &[&args[..], &["--split-seed", "3"]].concat());
    assert_eq!(other["splits"]["test"]["n"], 6);

    std::fs::write(&path, format!("{csv}good,,\"\"\n")).unwrap();
    let out = run(TASKREL, &args);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("reviews.csv: line 22, column \"headline, review\": empty text"),
        "{stderr}"
    );
    let out = run(TASKREL, &["data", name.as_str(), "--label-column", "stars"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--text-columns"));
}
