//! The `taskrel` command as a user runs it: real data summaries and clean failures.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::Command;
use taskrel_testkit::{data_root, json, run};

const TASKREL: &str = env!("CARGO_BIN_EXE_taskrel");

#[test]
fn data_json_reports_canonical_counts() {
    let root = data_root();
    let usps = json(
        TASKREL,
        &[
            "data",
            "usps",
            "--root",
            root.join("usps").to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(usps["splits"]["train"]["n"], 7291);
    assert_eq!(usps["splits"]["test"]["n"], 2007);
    assert_eq!(
        usps["splits"]["train"]["class_counts"],
        serde_json::json!([1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644])
    );
    let ag = json(
        TASKREL,
        &[
            "data",
            "ag_news",
            "--root",
            root.join("ag_news").to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(
        ag["classes"],
        serde_json::json!(["World", "Sports", "Business", "Sci/Tech"])
    );
    assert_eq!(
        ag["splits"]["test"]["class_counts"],
        serde_json::json!([1900, 1900, 1900, 1900])
    );
    assert!(ag["splits"].get("train").is_none());
}

#[test]
fn mnist_cnn_finds_usps_more_related_than_fashion_mnist() {
    // The ordering of the paper's small-scale study, on the pretrained MNIST CNN's features.
    let root = data_root();
    let dir = tempfile::tempdir().unwrap();
    let model = root.join("models/ccexam/mnist.pth");
    let feats = |dataset: &str| {
        let out = dir.path().join(format!("{dataset}.safetensors"));
        let args = [
            "features",
            "--model",
            model.to_str().unwrap(),
            "--dataset",
            dataset,
            "--data-root",
            root.to_str().unwrap(),
            "--per-class",
            "60",
            "--seed",
            "1",
            "--quiet",
            "--json",
            "--out",
            out.to_str().unwrap(),
        ];
        let report = json(TASKREL, &args);
        assert_eq!(report["n"], 600);
        if dataset == "usps" {
            assert!(
                report["preprocessing"]
                    .as_str()
                    .unwrap()
                    .contains("bilinear resize to 28x28")
            );
        }
        out
    };
    let (mnist, usps, fashion) = (feats("mnist"), feats("usps"), feats("fashion_mnist"));
    let score = |target: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "relatedness",
            "--reference",
            mnist.to_str().unwrap(),
            "--target",
            target.to_str().unwrap(),
            "--iterations",
            "101",
            "--batch-size",
            "300",
            "--json",
        ];
        args.extend_from_slice(extra);
        json(TASKREL, &args)
    };
    for extra in [&[][..], &["--unlabeled"][..]] {
        let (u, f) = (score(&usps, extra), score(&fashion, extra));
        for key in [
            "bound",
            "reference_loss",
            "label_entropy",
            "wasserstein",
            "tau",
        ] {
            assert!(u[key].as_f64().unwrap().is_finite(), "{key}: {u}");
        }
        assert!(
            u["bound"].as_f64().unwrap() < f["bound"].as_f64().unwrap(),
            "{extra:?}: usps {} vs fashion {}",
            u["bound"],
            f["bound"]
        );
        if extra.is_empty() {
            assert!(
                u["target_accuracy"].as_f64().unwrap() > f["target_accuracy"].as_f64().unwrap()
            );
        } else {
            assert_eq!(u["labels_used"]["wasserstein"], false);
            assert!(u["target_accuracy"].is_null());
        }
        // Without evaluation files, 30 % of each class (18 of 60) is held out and said so.
        assert_eq!(u["n_reference_eval"], 180);
        assert_eq!(u["n_target_eval"], 180);
        let said = u["samples"].to_string();
        assert!(said.contains("held out for evaluation"), "{said}");
    }
    // Evaluation samples from files of their own are used whole (600 rows), and said so.
    let own = score(
        &usps,
        &[
            "--reference-eval",
            mnist.to_str().unwrap(),
            "--target-eval",
            fashion.to_str().unwrap(),
        ],
    );
    assert_eq!(own["n_reference_eval"], 600);
    assert!(own["samples"].to_string().contains("evaluated on"), "{own}");
}

#[test]
fn a_dataset_with_one_split_is_divided_without_overlap() {
    // The mirrored AG News has only its test file: train and test both come from a seeded
    // stratified 80/20 division of it (6,080 / 1,520 rows), and outputs say so.
    let root = data_root();
    let model = root.join("models/all-MiniLM-L6-v2");
    let dir = tempfile::tempdir().unwrap();
    for (split, text) in [
        ("train", "ag_news/train (derived"),
        ("test", "ag_news/test (derived"),
    ] {
        let out = dir.path().join(format!("{split}.safetensors"));
        let report = json(
            TASKREL,
            &[
                "features",
                "--model",
                model.to_str().unwrap(),
                "--dataset",
                "ag_news",
                "--data-root",
                root.to_str().unwrap(),
                "--split",
                split,
                "--per-class",
                "2",
                "--quiet",
                "--json",
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(
            report["dataset"].as_str().unwrap().starts_with(text),
            "{report}"
        );
        assert_eq!(report["n"], 8);
    }
}

#[test]
fn zero_counts_and_empty_shards_are_refused() {
    let root = data_root();
    let dir = tempfile::tempdir().unwrap();
    let model = root.join("models/ccexam/mnist.pth");
    let out_file = dir.path().join("f.safetensors");
    let root_arg = root.to_str().unwrap();
    let cases: [(Vec<&str>, &str); 3] = [
        (
            vec![
                "train",
                "--model",
                "lenet200",
                "--dataset",
                "mnist",
                "--data-root",
                root_arg,
                "--per-class",
                "0",
                "--out",
                out_file.to_str().unwrap(),
            ],
            "training setting per_class: expected a positive count, got 0",
        ),
        (
            vec![
                "features",
                "--model",
                model.to_str().unwrap(),
                "--dataset",
                "mnist",
                "--data-root",
                root_arg,
                "--per-class",
                "0",
                "--out",
                out_file.to_str().unwrap(),
            ],
            "samples per class must be positive, got 0",
        ),
        (
            vec![
                "run",
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../configs/smoke.yaml")
                    .to_str()
                    .unwrap()
                    .to_owned()
                    .leak(),
                "--data-root",
                root_arg,
                "--shard",
                "7/7",
                "--results",
                dir.path()
                    .join("results")
                    .to_str()
                    .unwrap()
                    .to_owned()
                    .leak(),
            ],
            "--shard 7/7: selects no cell of the 5 cells",
        ),
    ];
    for (args, message) in cases {
        let out = run(TASKREL, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!out_file.exists(), "{args:?} wrote {}", out_file.display());
        assert!(
            !dir.path().join("results").exists(),
            "{args:?} wrote results"
        );
    }
}

#[test]
fn broken_model_files_and_impossible_lengths_are_named() {
    let root = data_root();
    let minilm = root.join("models/all-MiniLM-L6-v2");
    let dir = tempfile::tempdir().unwrap();
    // A copy of MiniLM with one file replaced.
    let variant = |name: &str, file: &str, bytes: &[u8]| -> PathBuf {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for entry in std::fs::read_dir(&minilm).unwrap() {
            let p = entry.unwrap().path();
            let target = d.join(p.file_name().unwrap());
            if p.file_name().unwrap() != file {
                std::os::unix::fs::symlink(&p, target).unwrap();
            }
        }
        std::fs::write(d.join(file), bytes).unwrap();
        d
    };
    let truncated = variant("truncated", "model.safetensors", b"abc");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(minilm.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = 0.into();
    let no_layers = variant("no_layers", "config.json", config.to_string().as_bytes());
    config["num_hidden_layers"] = 6.into();
    config["vocab_size"] = 1000.into();
    let small_vocab = variant("small_vocab", "config.json", config.to_string().as_bytes());
    let empty_pth = dir.path().join("empty.pth");
    {
        // A zip holding a pickle of an empty dict: a state dict with no tensors.
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1], 'w'); \
                 z.writestr('archive/data.pkl', b'\\x80\\x02}q\\x00.'); z.close()",
                empty_pth.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let minilm_arg = minilm.to_str().unwrap();
    let cases: [(Vec<&str>, String); 6] = [
        (
            vec![
                "embed",
                "--model",
                small_vocab.to_str().unwrap(),
                "--text",
                "hi",
            ],
            "tokenizer.json: the tokenizer has 30522 tokens but the model's vocab_size is 1000"
                .into(),
        ),
        (
            vec![
                "embed",
                "--model",
                truncated.to_str().unwrap(),
                "--text",
                "hi",
            ],
            format!(
                "{}: not a safetensors file (header too small)",
                truncated.join("model.safetensors").display()
            ),
        ),
        (
            vec![
                "embed",
                "--model",
                no_layers.to_str().unwrap(),
                "--text",
                "hi",
            ],
            "config.json: num_hidden_layers must be positive, got 0".into(),
        ),
        (
            vec![
                "embed",
                "--model",
                minilm_arg,
                "--max-len",
                "0",
                "--text",
                "hi",
            ],
            "max_len 0 is outside 1..=512".into(),
        ),
        (
            vec![
                "embed",
                "--model",
                minilm_arg,
                "--max-len",
                "513",
                "--text",
                "hi",
            ],
            "max_len 513 is outside 1..=512, the longest sequence the model's position table covers".into(),
        ),
        (
            vec![
                "embed",
                "--model",
                empty_pth.to_str().unwrap(),
                "--text",
                "hi",
            ],
            "empty.pth: unrecognised architecture (it holds no tensors)".into(),
        ),
    ];
    for (args, message) in cases {
        let out = run(TASKREL, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&message), "{args:?}: {stderr}");
    }
}

#[test]
fn hub_models_are_downloaded_unless_offline() {
    let home = tempfile::tempdir().unwrap();
    let embed = |extra_env: &[(&str, &str)], offline: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_taskrel"));
        c.args(["embed", "--model", "hf:nobody/nothing", "--text", "hi"])
            .env("HF_HOME", home.path())
            .env_remove("HF_HUB_OFFLINE")
            // A port nothing listens on: a download attempt fails at once.
            .env("HF_ENDPOINT", "http://127.0.0.1:9");
        if offline {
            c.arg("--offline");
        }
        for (k, v) in extra_env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let tried = embed(&[], false);
    assert!(
        tried.contains("cannot reach http://127.0.0.1:9/nobody/nothing/resolve/main/config.json"),
        "{tried}"
    );
    for refused in [embed(&[], true), embed(&[("HF_HUB_OFFLINE", "1")], false)] {
        assert!(
            refused.contains("not in the Hugging Face cache; downloads are off"),
            "{refused}"
        );
    }
}
