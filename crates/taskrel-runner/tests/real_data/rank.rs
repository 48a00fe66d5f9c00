//! `taskrel rank` on real models and data: a fetched dataset without labels, and a user's own
//! folder of images with labels.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;
use std::process::Command;
use taskrel_testkit::data_root;

const ZOO: &str = "name: test-zoo
models:
  ccexam_mnist: {from: models/ccexam/mnist.pth, reference: mnist}
  ccexam_usps: {from: models/ccexam/usps.pth, reference: usps}
score:
  scores: [relatedness, logme, leep, nce, hscore, knn]
  reference_per_class: 50
  relatedness: {iterations: 100, batch_size: 200}
";

fn rank(dir: &Path, args: &[&str]) -> serde_json::Value {
    let zoo = dir.join("zoo.yaml");
    std::fs::write(&zoo, ZOO).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_taskrel"))
        .args(["rank", "--zoo", zoo.to_str().unwrap(), "--json", "--quiet"])
        .args(["--cache", dir.join("cache").to_str().unwrap()])
        .arg("--data-root")
        .arg(data_root())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn unlabeled_usps_ranks_the_usps_cnn_first() {
    let tmp = tempfile::tempdir().unwrap();
    let r = rank(
        tmp.path(),
        &["--target", "usps", "--unlabeled", "--budget", "100"],
    );
    assert_eq!(r["labels_used"], false);
    // 30 % of the 100 drawn samples held out for the reported terms.
    assert_eq!(r["n_target"], 70);
    assert_eq!(r["n_target_eval"], 30);
    let models = r["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!(models[0]["model"], "ccexam_usps", "{r:#}");
    let (a, b) = (
        models[0]["bound_unlabeled"].as_f64().unwrap(),
        models[1]["bound_unlabeled"].as_f64().unwrap(),
    );
    assert!(a < b && a.is_finite(), "{a} {b}");
    // The verdict follows the label-free threshold (3.0) of the bound it is given.
    let verdict = models[0]["verdict"].as_str().unwrap();
    let expected = if a <= 3.0 {
        "likely to transfer well"
    } else {
        "no assurance (compare within the zoo)"
    };
    assert!(verdict.starts_with(expected), "{a}: {verdict}");
}

#[test]
fn a_folder_of_labelled_images_gets_every_score() {
    let tmp = tempfile::tempdir().unwrap();
    let splits =
        taskrel_data::load(taskrel_data::DatasetName::Usps, &data_root().join("usps")).unwrap();
    let test = splits.test.unwrap();
    let taskrel_data::Inputs::Images(images) = &test.inputs else {
        panic!("USPS holds images")
    };
    let samples = tmp.path().join("samples");
    let mut written = [0usize; 2];
    for i in 0..test.len() {
        let class = test.labels[i] as usize;
        if class > 1 || written[class] == 12 {
            continue;
        }
        let dir = samples.join(["zero", "one"][class]);
        std::fs::create_dir_all(&dir).unwrap();
        let px = images.pixels[i * 256..(i + 1) * 256].to_vec();
        image::GrayImage::from_raw(16, 16, px)
            .unwrap()
            .save(dir.join(format!("{i}.png")))
            .unwrap();
        written[class] += 1;
    }
    let r = rank(tmp.path(), &["--samples", samples.to_str().unwrap()]);
    assert_eq!(r["labels_used"], true);
    // 24 images: per class, 30 % (rounded, at least one) held out.
    assert_eq!(
        r["n_target"].as_u64().unwrap() + r["n_target_eval"].as_u64().unwrap(),
        24
    );
    assert!(r["n_target_eval"].as_u64().unwrap() >= 4);
    for m in r["models"].as_array().unwrap() {
        for score in ["bound", "logme", "leep", "nce", "hscore", "knn"] {
            assert!(m[score].as_f64().unwrap().is_finite(), "{score} in {m}");
        }
    }
    // One image of another size is refused with its name.
    let odd = samples.join("one/odd.png");
    image::GrayImage::new(8, 8).save(&odd).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_taskrel"))
        .args([
            "rank",
            "--zoo",
            tmp.path().join("zoo.yaml").to_str().unwrap(),
        ])
        .args(["--samples", samples.to_str().unwrap(), "--quiet"])
        .arg("--data-root")
        .arg(data_root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("odd.png") && err.contains("8x8"), "{err}");
}

/// `rank` on a sample that cannot support an estimate: the exit status and the message.
fn refused(dir: &Path, samples: &Path) -> String {
    std::fs::write(dir.join("zoo.yaml"), ZOO).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_taskrel"))
        .args([
            "rank",
            "--zoo",
            dir.join("zoo.yaml").to_str().unwrap(),
            "--quiet",
        ])
        .args(["--cache", dir.join("cache").to_str().unwrap()])
        .arg("--data-root")
        .arg(data_root())
        .arg("--samples")
        .arg(samples)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "ranked {}: {err}", samples.display());
    assert!(
        out.stdout.is_empty(),
        "printed a ranking for {}",
        samples.display()
    );
    err
}

#[test]
fn degenerate_samples_get_no_ranking() {
    let tmp = tempfile::tempdir().unwrap();
    // Two classes of identical black images.
    let black = tmp.path().join("black");
    for class in ["a", "b"] {
        std::fs::create_dir_all(black.join(class)).unwrap();
        for i in 0..6 {
            image::GrayImage::new(16, 16)
                .save(black.join(class).join(format!("{i}.png")))
                .unwrap();
        }
    }
    let err = refused(tmp.path(), &black);
    assert!(
        err.contains("target fitting features are constant"),
        "{err}"
    );
    // One unlabeled image.
    let one = tmp.path().join("one");
    std::fs::create_dir_all(&one).unwrap();
    image::GrayImage::from_fn(16, 16, |x, y| image::Luma([(x * 16 + y) as u8]))
        .save(one.join("x.png"))
        .unwrap();
    assert!(refused(tmp.path(), &one).contains("the sample holds 1 item(s)"));
    // A class folder that links outside the sample folder.
    std::os::unix::fs::symlink(&one, black.join("linked")).unwrap();
    let err = refused(tmp.path(), &black);
    assert!(
        err.contains("the class folder points outside the sample folder"),
        "{err}"
    );
    std::fs::remove_file(black.join("linked")).unwrap();
    // An empty class folder next to a full one.
    std::fs::create_dir_all(black.join("c")).unwrap();
    let err = refused(tmp.path(), &black);
    assert!(
        err.contains("the class folder holds no .png/.jpg/.jpeg images") && err.contains("/c"),
        "{err}"
    );
    // CSV rows that are not `label,text` samples, each named by its line.
    for (text, message) in [
        ("label,text\nA,\nB,x\n", "line 2: the text is empty"),
        (
            "A,hello\nB,\"open quote\nA,more\n",
            "line 2: a quoted field is not closed",
        ),
        (
            "A,hello,there\n",
            "line 1: expected `label,text` or `text`, got 3 fields",
        ),
        ("A,hello\n,world\n", "line 2: the label is empty"),
    ] {
        let csv = tmp.path().join("s.csv");
        std::fs::write(&csv, text).unwrap();
        let err = refused(tmp.path(), &csv);
        assert!(
            err.contains(&format!("s.csv: {message}")),
            "{text:?}: {err}"
        );
    }
}

#[test]
fn a_zoo_with_an_unknown_score_is_refused_at_its_place() {
    let tmp = tempfile::tempdir().unwrap();
    let zoo = tmp.path().join("zoo.yaml");
    std::fs::write(&zoo, ZOO.replace("logme,", "logmee,")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_taskrel"))
        .args(["rank", "--zoo", zoo.to_str().unwrap(), "--target", "usps"])
        .args(["--budget", "50", "--quiet"])
        .arg("--data-root")
        .arg(data_root())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("zoo.yaml:6:25: score.scores: unknown score \"logmee\""),
        "{err}"
    );
}
