//! The baseline scores on one real feature set against their reference implementations:
//! features of the pretrained USPS CNN on 20 USPS test images per class (and 15 MNIST test
//! images per class as OTCE's source), made by `taskrel features`.
//!
//! Reference values (thuml/LogME `LogME.py`, `LEEP.py`, `NCE.py`; tllib `hscore.py`; POT 0.9.7
//! `ot.emd`; numpy 2.4.6, scikit-learn 1.9.1), from the same files:
//!
//! ```python
//! # taskrel features --model data/models/ccexam/usps.pth --dataset usps --split test \
//! #   --per-class 20 --seed 0 --out usps.safetensors   (and mnist, --per-class 15)
//! x, y = load("usps.safetensors"); xm, ym = load("mnist.safetensors")  # f32 -> f64
//! sd = torch.load("usps.pth"); W, b = sd["classifier.4.weight"], sd["classifier.4.bias"]  # f64
//! logits = x @ W.T + b; p = softmax(logits, axis=1)
//! print(LogME().fit(x, y), h_score(x, y), regularized_h_score(x, y), knn(x, y, 5))
//! print(LEEP(p, y), NCE(p.argmax(1), y))
//! P = ot.emd(ot.unif(150), ot.unif(200), ((xm[:, None] - x[None]) ** 2).sum(-1))
//! print(-conditional_entropy(P, ym, y))   # OTCE, as in crates/taskrel-score/tests/baselines.rs
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;
use std::process::Command;

use taskrel_score::{FeatureSet, Samples, ScoreInputs, ScoreKind};
use taskrel_testkit::data_root;

fn features(dataset: &str, per_class: &str, out: &Path) -> FeatureSet {
    let model = data_root().join("models/ccexam/usps.pth");
    let status = Command::new(env!("CARGO_BIN_EXE_taskrel"))
        .args(["features", "--model", model.to_str().unwrap()])
        .args([
            "--dataset",
            dataset,
            "--split",
            "test",
            "--per-class",
            per_class,
        ])
        .args(["--seed", "0", "--quiet", "--out", out.to_str().unwrap()])
        .arg("--data-root")
        .arg(data_root())
        .status()
        .unwrap();
    assert!(status.success());
    FeatureSet::load(out).unwrap()
}

fn close(got: f64, want: f64) {
    taskrel_testkit::assert_close(got, want, 1e-6);
}

#[test]
fn baselines_match_references_on_real_features() {
    let tmp = tempfile::tempdir().unwrap();
    let usps = features("usps", "20", &tmp.path().join("usps.safetensors"));
    let mnist = features("mnist", "15", &tmp.path().join("mnist.safetensors"));
    // Through the typed scores, as the engine computes them.
    let (cfg, device) = (
        taskrel_score::RelatednessConfig::default(),
        candle_core::Device::Cpu,
    );
    let inputs = ScoreInputs {
        target: Samples::new(&usps, &usps),
        reference: Some(Samples::new(&mnist, &mnist)),
        head_probabilities: None,
        relatedness: &cfg,
        seed: 0,
        device: &device,
    };
    let score = |kind: ScoreKind| kind.compute(&inputs).unwrap()[0];
    close(score(ScoreKind::Logme), 0.5177709734067382);
    close(score(ScoreKind::Hscore), 8.34907524841454);
    close(score(ScoreKind::HscoreShrinkage), 8.025775181417089);
    close(score(ScoreKind::Knn), 0.965);
    close(score(ScoreKind::Otce), -0.6925178792376188);
    // Without a head, LEEP does not apply.
    assert!(score(ScoreKind::Leep).is_nan());

    // The source head's probabilities on the same features, in f64 as the reference.
    let model = taskrel_models::load(
        &data_root()
            .join("models/ccexam/usps.pth")
            .display()
            .to_string()
            .parse()
            .unwrap(),
        &taskrel_models::LoadOptions::default(),
    )
    .unwrap();
    // The engine's path: the head's probabilities, then LEEP and NCE through the typed scores.
    let p = model
        .head_probabilities(&usps.values, usps.n, usps.d)
        .unwrap()
        .unwrap();
    let c = p.len() / usps.n;
    let inputs = ScoreInputs {
        head_probabilities: Some((&p, c)),
        ..inputs
    };
    close(
        ScoreKind::Leep.compute(&inputs).unwrap()[0],
        -0.15368044311721238,
    );
    close(
        ScoreKind::Nce.compute(&inputs).unwrap()[0],
        -0.16003762181002817,
    );
}
