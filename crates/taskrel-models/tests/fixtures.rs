//! Specification of the models crate on inputs the tests write themselves (no downloads):
//! lenet200 learns generated digits and checkpoints exactly, a tiny BERT built from generated
//! tokenizer and config files fine-tunes and round-trips, bad references fail clearly.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;

use candle_core::Device;
use taskrel_data::{Dataset, DatasetName, Modality};
use taskrel_models::train::{self, Mode, TrainConfig};
use taskrel_models::{LoadOptions, ModelRef, TextInput, load};
use taskrel_testkit::fixtures;

/// A split of a dataset of the generated data root in `root`.
fn split(root: &Path, name: DatasetName, train: bool) -> Dataset {
    let splits = taskrel_data::load(name, &root.join(name.as_str())).unwrap();
    if train {
        splits.train.unwrap()
    } else {
        splits.test.unwrap()
    }
}

/// The largest absolute difference between the head logits of two models on `data[idx]`.
fn logit_difference(a: &taskrel_models::Model, b: &taskrel_models::Model, data: &Dataset) -> f32 {
    let idx: Vec<usize> = (0..data.len().min(32)).collect();
    let la = a
        .head_logits(&a.features(data, &idx, None).unwrap())
        .unwrap();
    let lb = b
        .head_logits(&b.features(data, &idx, None).unwrap())
        .unwrap();
    (la - lb)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn model(reference: &str, seed: u64) -> taskrel_models::Model {
    let reference: ModelRef = reference.parse().unwrap();
    load(
        &reference,
        &LoadOptions {
            seed,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn bad_references_fail_clearly() {
    let err = load(
        &"no/such/model.pth".parse().unwrap(),
        &LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("model not found"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err = load(
        &"hf:nobody/nothing".parse().unwrap(),
        &LoadOptions {
            hub_cache: Some(dir.path().into()),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not in the Hugging Face cache"), "{err}");
    assert!(taskrel_models::device("gpu").is_err());
    assert!(matches!(
        taskrel_models::device("cpu").unwrap(),
        Device::Cpu
    ));
}

#[test]
fn lenet200_learns_generated_digits_reproduces_and_checkpoints_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixtures::data_root(dir.path()).unwrap();
    let (train_set, test_set) = (
        split(&root, DatasetName::Mnist, true),
        split(&root, DatasetName::Mnist, false),
    );
    let cfg = TrainConfig {
        epochs: 5,
        batch_size: 20,
        lr: 1e-3,
        seed: 2,
        ..Default::default()
    };
    let run = || {
        let mut net = model("lenet200", 0);
        let history = train::train(&mut net, &train_set, &cfg, true).unwrap();
        (net, history)
    };
    let (net, history) = run();
    assert_eq!(history.n_train, 400);
    let accuracy = train::evaluate(&net, &test_set, 64, true).unwrap().accuracy;
    // Each class lights its own block: chance is 0.1.
    assert!(
        accuracy >= 0.9,
        "lenet200 on the generated digits: {accuracy}"
    );
    // The same seeds give the same numbers.
    let (again, history_again) = run();
    let epochs = |h: &train::History| -> Vec<(f64, f64)> {
        h.epochs.iter().map(|e| (e.loss, e.accuracy)).collect()
    };
    assert_eq!(epochs(&history), epochs(&history_again));
    assert_eq!(logit_difference(&net, &again, &test_set), 0.0);
    // Another training seed gives other weights (the check above bites).
    let mut other = model("lenet200", 0);
    let other_cfg = TrainConfig {
        seed: 3,
        ..cfg.clone()
    };
    train::train(&mut other, &train_set, &other_cfg, true).unwrap();
    assert!(logit_difference(&net, &other, &test_set) > 0.0);
    // Save -> load gives identical logits, and the checkpoint says it is an image model.
    let saved = tempfile::tempdir().unwrap();
    net.save(saved.path()).unwrap();
    let reference = ModelRef::Path(saved.path().to_path_buf());
    assert_eq!(reference.modality().unwrap(), Modality::Image);
    let loaded = load(&reference, &LoadOptions::default()).unwrap();
    assert_eq!(logit_difference(&net, &loaded, &test_set), 0.0);
}

#[test]
fn a_tiny_bert_from_generated_files_fine_tunes_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixtures::data_root(&dir.path().join("data")).unwrap();
    let files = dir.path().join("bert");
    fixtures::bert_files(&files).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(files.join("config.json")).unwrap()).unwrap();
    let input = TextInput {
        max_len: 16,
        pooling: "mean".into(),
        normalize: false,
    };
    let options = LoadOptions {
        seed: 5,
        ..Default::default()
    };
    let mut bert =
        taskrel_models::random_bert(config, &files.join("tokenizer.json"), input, &options)
            .unwrap();
    let news = split(&root, DatasetName::AgNews, true);
    let cfg = TrainConfig {
        epochs: 2,
        batch_size: 8,
        lr: 1e-3,
        seed: 0,
        ..Default::default()
    };
    let snapshot = |m: &taskrel_models::Model| -> Vec<Vec<f32>> {
        let (encoder, _) = m.vars().unwrap();
        encoder
            .iter()
            .map(|v| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    };
    let before = snapshot(&bert);
    // A linear probe leaves the encoder bit-identical ...
    train::fine_tune(&mut bert, &news, Mode::LinearProbe, &cfg, true).unwrap();
    assert_eq!(snapshot(&bert), before);
    // ... end-to-end fine-tuning moves every encoder tensor and learns the topics.
    let h = train::fine_tune(&mut bert, &news, Mode::Full, &cfg, true).unwrap();
    assert!(h.epochs.iter().all(|e| e.loss.is_finite()));
    for (i, (a, b)) in snapshot(&bert).iter().zip(&before).enumerate() {
        assert_ne!(
            a, b,
            "encoder variable {i} did not change in full fine-tuning"
        );
    }
    assert!(
        h.preprocessing.contains("truncated at 16"),
        "{}",
        h.preprocessing
    );
    let test = split(&root, DatasetName::AgNews, false);
    let accuracy = train::evaluate(&bert, &test, 64, true).unwrap().accuracy;
    assert!(
        accuracy > 0.4,
        "tiny BERT on the generated topics: {accuracy} (chance 0.25)"
    );

    let saved = tempfile::tempdir().unwrap();
    bert.save(saved.path()).unwrap();
    let reference = ModelRef::Path(saved.path().to_path_buf());
    assert_eq!(reference.modality().unwrap(), Modality::Text);
    let again = load(&reference, &LoadOptions::default()).unwrap();
    assert_eq!(logit_difference(&bert, &again, &test), 0.0);
    // Text models refuse images.
    let err = again
        .preprocessing(&split(&root, DatasetName::Usps, false))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("text model and cannot read a image dataset"),
        "{err}"
    );
}

#[test]
fn a_references_modality_is_told_without_loading_weights() {
    let dir = tempfile::tempdir().unwrap();
    fixtures::bert_files(dir.path()).unwrap();
    for (reference, modality) in [
        ("lenet200".to_string(), Modality::Image),
        ("hf:org/name".to_string(), Modality::Text),
        ("not/there.pth".to_string(), Modality::Image),
        ("not/there".to_string(), Modality::Text),
        (dir.path().display().to_string(), Modality::Text),
    ] {
        let parsed: ModelRef = reference.parse().unwrap();
        assert_eq!(parsed.modality().unwrap(), modality, "{reference}");
    }
    // A checkpoint whose taskrel.json does not parse is named.
    std::fs::write(dir.path().join("taskrel.json"), "{").unwrap();
    let err = ModelRef::Path(dir.path().to_path_buf())
        .modality()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("taskrel.json") && err.contains("invalid model spec"),
        "{err}"
    );
}
