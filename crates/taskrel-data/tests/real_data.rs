//! The data crate on the real datasets in `data/` (`scripts/fetch-data.sh` fetches them; without
//! them every test here fails at once saying so): canonical counts, pixel conventions, splits.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use taskrel_data::{DatasetName, load, table};
use taskrel_testkit::data_root;

fn table_spec(label: &str, texts: &[&str]) -> table::TableSpec {
    table::TableSpec::new(label, texts.iter().map(|t| t.to_string()).collect())
}

#[test]
fn mnist_has_canonical_counts() {
    let splits = load(DatasetName::Mnist, &data_root().join("mnist")).unwrap();
    let train = splits.train.as_ref().unwrap();
    let test = splits.test.as_ref().unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!(
        train.class_counts(),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    let images = train.images().unwrap();
    assert_eq!((images.channels, images.height, images.width), (1, 28, 28));
    // The first training digit is a 5 (the well-known first MNIST sample).
    assert_eq!(train.labels[0], 5);
}

#[test]
fn fashion_mnist_is_balanced() {
    let splits = load(
        DatasetName::FashionMnist,
        &data_root().join("fashion_mnist"),
    )
    .unwrap();
    assert_eq!(
        splits.train.as_ref().unwrap().class_counts(),
        vec![6000; 10]
    );
    assert_eq!(splits.test.as_ref().unwrap().class_counts(), vec![1000; 10]);
    assert_eq!(splits.classes()[9], "Ankle boot");
}

#[test]
fn usps_has_canonical_counts_and_mnist_pixel_convention() {
    let splits = load(DatasetName::Usps, &data_root().join("usps")).unwrap();
    let train = splits.train.as_ref().unwrap();
    assert_eq!(
        (train.len(), splits.test.as_ref().unwrap().len()),
        (7291, 2007)
    );
    assert_eq!(
        train.class_counts(),
        [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644]
    );
    let images = train.images().unwrap();
    assert_eq!((images.height, images.width), (16, 16));
    // Background is -1 in the file and must become 0 as in MNIST; the first row of the
    // first image starts with seven -1.0 values, then -0.631 -> floor(0.1845 * 255) = 47
    // and 0.862 -> floor(0.931 * 255) = 237 (torchvision's truncating conversion).
    assert_eq!(&images.image(0)[..9], &[0, 0, 0, 0, 0, 0, 0, 47, 237]);
    let mean =
        images.pixels.iter().map(|&p| f64::from(p)).sum::<f64>() / images.pixels.len() as f64;
    assert!(mean < 80.0, "mostly background expected, mean pixel {mean}");
}

#[test]
fn ag_news_and_dbpedia_have_canonical_counts() {
    let ag = load(DatasetName::AgNews, &data_root().join("ag_news")).unwrap();
    assert!(ag.train.is_none());
    assert_eq!(ag.test.as_ref().unwrap().class_counts(), vec![1900; 4]);
    assert_eq!(ag.classes(), ["World", "Sports", "Business", "Sci/Tech"]);
    let first = &ag.test.as_ref().unwrap().texts().unwrap()[0];
    assert!(
        first.starts_with("Fears for T N pension after talks Unions representing"),
        "{first}"
    );

    let db = load(DatasetName::Dbpedia, &data_root().join("dbpedia")).unwrap();
    let (train, test) = (db.train.as_ref().unwrap(), db.test.as_ref().unwrap());
    assert_eq!(
        (train.len(), test.len(), db.classes().len()),
        (5000, 5000, 14)
    );
    // Empty titles: the text is the body alone, without the leading space of the file.
    assert!(train.texts().unwrap()[0].starts_with("Mfumu'eto is a magazine"));
}

#[test]
fn seeded_split_is_stratified_disjoint_and_reproducible() {
    let ag = load(DatasetName::AgNews, &data_root().join("ag_news")).unwrap();
    let test = ag.test.unwrap();
    let (train_a, test_a) = test.split(0.25, 7).unwrap();
    let (train_b, test_b) = test.split(0.25, 7).unwrap();
    assert_eq!(train_a, train_b);
    assert_eq!(test_a, test_b);
    assert_eq!(test_a.class_counts(), vec![475; 4]);
    assert_eq!(train_a.class_counts(), vec![1425; 4]);
    let mut all: Vec<&String> = train_a
        .texts()
        .unwrap()
        .iter()
        .chain(test_a.texts().unwrap())
        .collect();
    all.sort();
    let mut original: Vec<&String> = test.texts().unwrap().iter().collect();
    original.sort();
    assert_eq!(all, original);
    let shuffled = test.shuffled(1).unwrap();
    assert_eq!(shuffled.class_counts(), test.class_counts());
    assert_ne!(shuffled.labels, test.labels);
    assert!(test.split(1.0, 0).is_err());
}

#[test]
fn rotten_tomatoes_and_news_by_outlet_have_their_documented_counts() {
    let root = data_root();
    // ../shared/data/README.md: fresh 7,403, rotten 5,405, plot 1,097 (13,905 rows).
    let spec = table::TableSpec {
        classes: vec!["fresh".into(), "rotten".into()],
        ..table_spec("category", &["text"])
    };
    let rt = table::load(
        &root.join("rotten_tomatoes/rotten_tomatoes_corpus_full.csv.bz2"),
        &spec,
    )
    .unwrap();
    // The 14 empty texts are all `plot` rows, which are not checked.
    assert_eq!((rt.rows, rt.skipped), (13_905, 0));
    let total = |t: &table::Table| -> Vec<usize> {
        let (a, b) = (t.train.class_counts(), t.test.class_counts());
        a.iter().zip(&b).map(|(x, y)| x + y).collect()
    };
    assert_eq!(total(&rt), [7_403, 5_405]);
    // aljazeera 559, tass 485, abcnews 474, rte 443, huffpost 436, dw 436, chinadaily 360,
    // bbc 355, cnn 276; classes in sorted order.
    let path = root.join("news_articles/news_by_outlet.csv.gz");
    let spec = table_spec("outlet", &["title", "text"]);
    // One aljazeera article has neither title nor text (line 1828).
    let msg = table::load(&path, &spec).unwrap_err().to_string();
    assert!(
        msg.contains("line 1828") && msg.contains("empty text"),
        "{msg}"
    );
    let spec = table::TableSpec {
        skip_empty: true,
        ..spec
    };
    let news = table::load(&path, &spec).unwrap();
    assert_eq!((news.rows, news.skipped), (3_824, 1));
    assert_eq!(
        news.train.classes,
        [
            "abcnews",
            "aljazeera",
            "bbc",
            "chinadaily",
            "cnn",
            "dw",
            "huffpost",
            "rte",
            "tass"
        ]
    );
    assert_eq!(total(&news), [474, 558, 355, 360, 276, 436, 436, 443, 485]);
}
