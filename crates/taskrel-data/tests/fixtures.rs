//! Specification of the data crate on inputs the tests write themselves (no downloads): corrupt
//! files fail with an error naming the file and the place, sampling and splits are deterministic,
//! users' own samples are read as documented, and the generated fixture datasets load.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::io::Write;
use std::path::{Path, PathBuf};
use taskrel_data::{DatasetName, Error, Inputs, csv_text, load, table};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn idx_images(n: u32, rows: u32, cols: u32, payload: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for w in [2051u32, n, rows, cols] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out.extend((0..payload).map(|i| (i % 256) as u8));
    out
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&2049u32.to_be_bytes());
    out.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    out.extend_from_slice(labels);
    out
}

/// The message of a load error, checked to be one line naming `file`.
fn error_of(name: DatasetName, dir: &Path, file: &str) -> String {
    let err = load(name, dir).expect_err("corrupt input must fail");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "one-line error expected: {msg}");
    assert!(msg.contains(file), "error should name {file}: {msg}");
    msg
}

fn toy(labels: &[u32]) -> taskrel_data::Dataset {
    taskrel_data::Dataset {
        inputs: Inputs::Texts(
            labels
                .iter()
                .enumerate()
                .map(|(i, y)| format!("{i}:{y}"))
                .collect(),
        ),
        labels: labels.to_vec(),
        classes: vec!["a".into(), "b".into(), "c".into()],
    }
}

fn table_spec(label: &str, texts: &[&str]) -> table::TableSpec {
    table::TableSpec::new(label, texts.iter().map(|t| t.to_string()).collect())
}

#[test]
fn text_normalisation_decodes_entity_remnants_and_line_breaks() {
    assert_eq!(
        csv_text::normalize("Eriksson doesn #39;t feel"),
        "Eriksson doesn't feel"
    );
    assert_eq!(
        csv_text::normalize("In  quot;helping quot; them"),
        "In \"helping\" them"
    );
    assert_eq!(
        csv_text::normalize("the  #36;10 million"),
        "the $10 million"
    );
    assert_eq!(
        csv_text::normalize("Johnson  amp; Johnson"),
        "Johnson & Johnson"
    );
    assert_eq!(
        csv_text::normalize("A second\\team of\\network"),
        "A second team of network"
    );
    assert_eq!(csv_text::normalize("a  #151; b"), "a \u{2014} b");
    // Words that merely end in a semicolon are untouched.
    assert_eq!(
        csv_text::normalize("the forecast; rain"),
        "the forecast; rain"
    );
    assert_eq!(csv_text::join_title_body("", " body  text "), "body text");
    assert_eq!(csv_text::join_title_body("Title", "body"), "Title body");
}

#[test]
fn idx_plain_and_dotted_names_load_and_match() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "train-images.idx3-ubyte",
        &idx_images(3, 2, 2, 12),
    );
    write(
        dir.path(),
        "train-labels.idx1-ubyte",
        &idx_labels(&[1, 2, 3]),
    );
    write(
        dir.path(),
        "t10k-images-idx3-ubyte.gz",
        &gzip(&idx_images(1, 2, 2, 4)),
    );
    write(
        dir.path(),
        "t10k-labels-idx1-ubyte.gz",
        &gzip(&idx_labels(&[9])),
    );
    let splits = load(DatasetName::Mnist, dir.path()).unwrap();
    let train = splits.train.unwrap();
    assert_eq!(train.labels, [1, 2, 3]);
    assert_eq!(train.images().unwrap().image(2), &[8, 9, 10, 11]);
    assert_eq!(splits.test.unwrap().labels, [9]);
}

#[test]
fn corrupt_idx_files_fail_with_file_and_place() {
    let cases: [(&str, Vec<u8>, Vec<u8>, &str); 5] = [
        (
            "truncated",
            idx_images(3, 2, 2, 10),
            idx_labels(&[1, 2, 3]),
            "byte 26: file truncated",
        ),
        (
            "wrong magic",
            idx_labels(&[1, 2]),
            idx_labels(&[1, 2]),
            "expected magic number 2051",
        ),
        (
            "count mismatch",
            idx_images(2, 2, 2, 8),
            idx_labels(&[1, 2, 3]),
            "3 labels but",
        ),
        ("empty", Vec::new(), idx_labels(&[1]), "empty file"),
        (
            "bad label",
            idx_images(1, 2, 2, 4),
            idx_labels(&[10]),
            "label 10 out of range",
        ),
    ];
    for (what, images, labels, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "train-images-idx3-ubyte", &images);
        write(dir.path(), "train-labels-idx1-ubyte", &labels);
        let msg = error_of(DatasetName::Mnist, dir.path(), "idx");
        assert!(msg.contains(expected), "{what}: {msg}");
    }
}

#[test]
fn missing_files_name_the_folder_and_how_to_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let msg = error_of(DatasetName::Usps, dir.path(), "zip.train.gz");
    assert!(msg.contains("fetch-data.sh"), "{msg}");
    let msg = error_of(DatasetName::Mnist, &dir.path().join("nope"), "nope");
    assert!(msg.contains("file not found"), "{msg}");
    // One IDX file without its partner is an error, not a silently missing split.
    write(
        dir.path(),
        "train-images-idx3-ubyte",
        &idx_images(1, 2, 2, 4),
    );
    let msg = error_of(DatasetName::Mnist, dir.path(), "train-labels-idx1-ubyte");
    assert!(msg.contains("file not found"), "{msg}");
}

#[test]
fn usps_rows_are_validated() {
    let row = |label: &str, n: usize, v: &str| format!("{label} {}\n", vec![v; n].join(" "));
    let cases = [
        (
            row("3.0000", 256, "-1") + &row("4.0000", 255, "-1"),
            "line 2: expected 257 values (label + 256 pixels), got 256",
        ),
        (
            row("3.0000", 256, "-1") + &row("12.0000", 256, "-1"),
            "line 2: expected a digit label 0-9",
        ),
        (
            row("3.0000", 256, "1.7"),
            "line 1: pixel value 1.7 outside [-1, 1]",
        ),
        (
            row("3.0000", 256, "x"),
            "line 1: expected a number, found \"x\"",
        ),
        (String::new(), "empty file"),
    ];
    for (text, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "zip.train.gz", &gzip(text.as_bytes()));
        let msg = error_of(DatasetName::Usps, dir.path(), "zip.train.gz");
        assert!(msg.contains(expected), "{msg}");
    }
}

#[test]
fn usps_libsvm_format_matches_esl() {
    // Digit 0 is label 1 in LIBSVM; omitted entries are 0.0, which maps to floor(127.5) = 127.
    let dir = tempfile::tempdir().unwrap();
    let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
    enc.write_all(b"1 1:-1 2:1 256:-0.5\n10 3:0.5\n").unwrap();
    write(dir.path(), "usps.bz2", &enc.finish().unwrap());
    let splits = load(DatasetName::Usps, dir.path()).unwrap();
    let train = splits.train.unwrap();
    assert_eq!(train.labels, [0, 9]);
    let images = train.images().unwrap();
    assert_eq!(&images.image(0)[..3], &[0, 255, 127]);
    assert_eq!(images.image(0)[255], 63); // floor(0.25 * 255) = floor(63.75)
    assert_eq!(images.image(1)[2], 191); // floor(0.75 * 255) = floor(191.25)

    write(dir.path(), "usps.bz2", b"");
    write(dir.path(), "usps", b"11 1:0.5\n");
    let msg = error_of(DatasetName::Usps, dir.path(), "usps.bz2");
    assert!(msg.contains("empty file"), "{msg}");
    std::fs::remove_file(dir.path().join("usps.bz2")).unwrap();
    let msg = error_of(DatasetName::Usps, dir.path(), "usps");
    assert!(
        msg.contains("line 1: expected a label 1-10, found \"11\""),
        "{msg}"
    );
}

#[test]
fn csv_records_are_validated() {
    let cases = [
        (
            "\"1\",\"t\",\"b\"\n\"5\",\"t\",\"b\"\n",
            "line 2: expected a class index 1-4 (classes.txt), found \"5\"",
        ),
        (
            "\"1\",\"t\",\"b\"\n\"2\",\"t\"\n",
            "line 2: expected 3 fields (class, title, text), found 2",
        ),
        ("\"x\",\"t\",\"b\"\n", "line 1: expected a class index 1-4"),
        ("", "empty file"),
    ];
    for (text, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "classes.txt",
            b"World\nSports\nBusiness\nSci/Tech\n",
        );
        write(dir.path(), "test.csv", text.as_bytes());
        let msg = error_of(DatasetName::AgNews, dir.path(), "test.csv");
        assert!(msg.contains(expected), "{msg}");
    }
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "test.csv", b"\"1\",\"t\",\"b\"\n");
    let msg = error_of(DatasetName::AgNews, dir.path(), "classes.txt");
    assert!(msg.contains("file not found"), "{msg}");
}

#[test]
fn csv_quotes_escapes_and_multiline_fields() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "classes.txt", b"A\nB\n");
    write(
        dir.path(),
        "train.csv",
        b"2,\"He said \"\"hi\"\"\",\"two\nlines\"\n1,,\" only body\"\n",
    );
    let train = load(DatasetName::AgNews, dir.path())
        .unwrap()
        .train
        .unwrap();
    assert_eq!(train.labels, [1, 0]);
    assert_eq!(
        train.texts().unwrap(),
        ["He said \"hi\" two lines", "only body"]
    );
}

#[test]
fn class_subsets_relabel_in_the_order_given() {
    let d = toy(&[0, 1, 2, 2, 1, 0]);
    let s = d.subset_classes(&[2, 0]).unwrap();
    assert_eq!(s.labels, [1, 0, 0, 1]);
    assert_eq!(s.classes, ["c", "a"]);
    assert_eq!(s.texts().unwrap(), ["0:0", "2:2", "3:2", "5:0"]);
    assert!(
        matches!(d.subset_classes(&[3]), Err(Error::Invalid(m)) if m.contains("class 3 does not exist"))
    );
    assert!(d.subset_classes(&[1, 1]).is_err());
}

#[test]
fn per_class_sampling_is_stratified_and_seeded() {
    let labels: Vec<u32> = (0..300).map(|i| (i % 3) as u32).collect();
    let d = toy(&labels);
    let a = d.sample_per_class(7, 42).unwrap();
    assert_eq!(a, d.sample_per_class(7, 42).unwrap());
    assert_ne!(a, d.sample_per_class(7, 43).unwrap());
    assert_eq!(d.select(&a).unwrap().class_counts(), [7, 7, 7]);
    let msg = d.sample_per_class(101, 0).unwrap_err().to_string();
    assert_eq!(
        msg,
        "class 0 (a) has 100 samples, 101 per class were asked for"
    );
}

#[test]
fn labelled_text_csv_reads_named_columns_and_splits_by_class() {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("id,category,title,body\n");
    for i in 0..30 {
        let class = ["sport", "arts", "world"][i % 3];
        csv.push_str(&format!(
            "{i},{class},Title {i},\"Body {i}, with a comma\"\n"
        ));
    }
    // A quoted field over two lines, an empty title (the body alone is the text).
    csv.push_str("30,arts,,\"two\nlines\"\n");
    let plain = write(dir.path(), "t.csv", csv.as_bytes());
    let spec = table_spec("category", &["title", "body"]);
    let t = table::load(&plain, &spec).unwrap();
    assert_eq!(t.rows, 31);
    assert_eq!(t.train.classes, ["arts", "sport", "world"]);
    // round(0.3 x 11) = 3 and round(0.3 x 10) = 3 test rows per class.
    assert_eq!(t.test.class_counts(), [3, 3, 3]);
    assert_eq!(t.train.class_counts(), [8, 7, 7]);
    let texts: Vec<&String> = [&t.train, &t.test]
        .iter()
        .flat_map(|d| d.texts().unwrap())
        .collect();
    assert!(
        texts
            .iter()
            .any(|s| *s == "Title 4\n\nBody 4, with a comma")
    );
    assert!(texts.iter().any(|s| *s == "two\nlines"));
    // The split is a function of the seed, and the same from a compressed copy.
    let gz = write(dir.path(), "t.csv.gz", &gzip(csv.as_bytes()));
    let again = table::load(&gz, &spec).unwrap();
    assert_eq!(again.test.texts(), t.test.texts());
    let other = table::load(
        &plain,
        &table::TableSpec {
            seed: 1,
            ..spec.clone()
        },
    )
    .unwrap();
    assert_ne!(other.test.texts(), t.test.texts());
    // A class filter and a split column of the file's own.
    let mut split_csv = String::from("label,text,part\n");
    for i in 0..12 {
        let part = if i % 4 == 0 { "test" } else { "train" };
        split_csv.push_str(&format!("{},text {i},{part}\n", ["a", "b", "c"][i % 3]));
    }
    let path = write(dir.path(), "s.csv", split_csv.as_bytes());
    let spec = table::TableSpec {
        classes: vec!["a".into(), "b".into()],
        split_column: Some("part".into()),
        ..table_spec("label", &["text"])
    };
    let t = table::load(&path, &spec).unwrap();
    assert_eq!(t.train.classes, ["a", "b"]);
    assert_eq!((t.train.len(), t.test.len()), (6, 2));
    assert_eq!(t.test.texts().unwrap(), ["text 0", "text 4"]);
}

#[test]
fn labelled_text_csv_errors_name_the_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let good = "label,text\na,one\na,two\nb,three\nb,four\n";
    let cases: [(&str, String, table::TableSpec, &[&str]); 8] = [
        (
            "column.csv",
            good.into(),
            table_spec("class", &["text"]),
            &["line 1", "no column \"class\"", "label, text"],
        ),
        (
            "fields.csv",
            format!("{good}b,five,extra\n"),
            table_spec("label", &["text"]),
            &["line 6", "3 fields, expected 2"],
        ),
        (
            "text.csv",
            format!("{good}b,\"  \"\n"),
            table_spec("label", &["text"]),
            &["line 6", "column \"text\"", "empty text"],
        ),
        (
            "label.csv",
            format!("{good},six\n"),
            table_spec("label", &["text"]),
            &["line 6", "column \"label\"", "empty label"],
        ),
        (
            "single.csv",
            format!("{good}c,seven\n"),
            table_spec("label", &["text"]),
            &["line 6", "\"c\" has one example"],
        ),
        (
            "quote.csv",
            format!("{good}b,\"never closed\nc,x\n"),
            table_spec("label", &["text"]),
            &["line 6", "not closed"],
        ),
        (
            "split.csv",
            "label,text,part\na,x,train\na,y,dev\n".into(),
            table::TableSpec {
                split_column: Some("part".into()),
                ..table_spec("label", &["text"])
            },
            &["line 3", "column \"part\"", "found \"dev\""],
        ),
        (
            "classes.csv",
            good.into(),
            table::TableSpec {
                classes: vec!["a".into(), "z".into()],
                ..table_spec("label", &["text"])
            },
            &["no row has the label \"z\"", "the labels are a, b"],
        ),
    ];
    for (name, text, spec, wanted) in cases {
        let path = write(dir.path(), name, text.as_bytes());
        let msg = table::load(&path, &spec).expect_err(name).to_string();
        assert!(
            !msg.contains('\n'),
            "{name}: one-line error expected: {msg}"
        );
        assert!(msg.contains(name), "{name}: the file is not named: {msg}");
        for w in wanted {
            assert!(msg.contains(w), "{name}: expected {w:?} in: {msg}");
        }
    }
}

#[test]
fn a_user_csv_header_row_is_not_a_class_and_quoted_commas_stay_in_the_text() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write(
        dir.path(),
        "s.csv",
        b"label,text\nA,\"one, two\"\nB,\"say \"\"hi\"\"\"\nA,\"two\nlines\"\n",
    );
    let sample = taskrel_data::samples::read(&csv).unwrap();
    assert!(sample.labelled);
    assert_eq!(sample.data.classes, ["A", "B"]);
    assert_eq!(sample.data.labels, [0, 1, 0]);
    let Inputs::Texts(texts) = &sample.data.inputs else {
        panic!("texts expected");
    };
    assert_eq!(texts[0], "one, two");
    assert_eq!(texts[1], "say \"hi\"");
    assert_eq!(texts[2], "two\nlines");
}

#[test]
fn a_held_out_part_is_drawn_per_class_and_disjoint_from_the_fitting_part() {
    let data = toy(&[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2]);
    let drawn = taskrel_data::samples::draw(&data, true, 30, 4);
    assert_eq!(
        drawn.len(),
        17,
        "at most 10 per class, all of each class here"
    );
    let (fit, eval) = taskrel_data::samples::hold_out(&data, &drawn, true, 0.3, 4).unwrap();
    let count = |part: &[usize], c: u32| part.iter().filter(|&&i| data.labels[i] == c).count();
    // round(0.3 * 5) = 2 (half away from zero), round(0.3 * 10) = 3, and a class of 2 keeps
    // one to fit on.
    assert_eq!(
        [count(&eval, 0), count(&eval, 1), count(&eval, 2)],
        [2, 3, 1]
    );
    assert_eq!(fit.len() + eval.len(), 17);
    assert!(fit.iter().all(|i| !eval.contains(i)));
    // Seeded: the same seed holds out the same samples, another seed others.
    let again = taskrel_data::samples::hold_out(&data, &drawn, true, 0.3, 4).unwrap();
    assert_eq!(again.1, eval);
    let other = (0..8)
        .map(|s| {
            taskrel_data::samples::hold_out(&data, &drawn, true, 0.3, s)
                .unwrap()
                .1
        })
        .any(|e| e != eval);
    assert!(other);
    // A class with a single sample cannot be both fitted on and evaluated on.
    let single = toy(&[0, 0, 1]);
    let err = taskrel_data::samples::hold_out(&single, &[0, 1, 2], true, 0.3, 0).unwrap_err();
    assert!(err.to_string().contains("class 1"), "{err}");
}

#[test]
fn the_generated_fixture_datasets_load_with_their_counts() {
    let dir = tempfile::tempdir().unwrap();
    let root = taskrel_testkit::fixtures::data_root(dir.path()).unwrap();
    for (name, shape) in [
        (DatasetName::Mnist, Some((1, 28, 28))),
        (DatasetName::FashionMnist, Some((1, 28, 28))),
        (DatasetName::Usps, Some((1, 16, 16))),
        (DatasetName::AgNews, None),
    ] {
        let splits = load(name, &root.join(name.as_str())).unwrap();
        let (train, test) = (splits.train.unwrap(), splits.test.unwrap());
        let classes = name.num_classes();
        assert_eq!(train.class_counts(), vec![40; classes], "{name}");
        assert_eq!(test.class_counts(), vec![20; classes], "{name}");
        if let Some((c, h, w)) = shape {
            let images = train.images().unwrap();
            assert_eq!((images.channels, images.height, images.width), (c, h, w));
            // Each class lights its own block: the mean images of two classes differ.
            let mean = |class: u32| -> Vec<f64> {
                let members: Vec<usize> = (0..train.len())
                    .filter(|&i| train.labels[i] == class)
                    .collect();
                (0..h * w)
                    .map(|p| {
                        members
                            .iter()
                            .map(|&i| f64::from(images.image(i)[p]))
                            .sum::<f64>()
                            / members.len() as f64
                    })
                    .collect()
            };
            let (a, b) = (mean(0), mean(7));
            let far = a
                .iter()
                .zip(&b)
                .filter(|(x, y)| (*x - *y).abs() > 100.0)
                .count();
            assert!(far > h * w / 10, "{name}: {far} pixels tell class 0 from 7");
        } else {
            let texts = train.texts().unwrap();
            assert_eq!(texts[0].split(' ').count(), 6, "{}", texts[0]);
        }
    }
}
