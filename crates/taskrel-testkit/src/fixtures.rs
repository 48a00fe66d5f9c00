//! Small generated datasets and a tiny BERT's files, in the layouts the loaders read, so that
//! tests need no downloads.
//!
//! | function | writes | like |
//! |---|---|---|
//! | [`digits`] | IDX image and label files (plain, MNIST's names) | MNIST, Fashion-MNIST |
//! | [`usps`] | ESL `zip.train` / `zip.test` rows of 256 values in [-1, 1] | USPS |
//! | [`topics`] | `classes.txt`, `train.csv`, `test.csv` (`"class","title","description"`) | AG News |
//! | [`bert_files`] | `config.json` and a WordPiece `tokenizer.json` over [`VOCABULARY`] | a BERT folder without weights |
//! | [`data_root`] | all four datasets under one folder, as `scripts/fetch-data.sh` lays them out | `data/` |
//!
//! The images are learnable on purpose: each class lights one block of a grid, in the same
//! places for [`Layout::Digits`] at any size (so a model of the MNIST-like set transfers to the
//! USPS-like one) and in other places for [`Layout::Clothes`]. Every value comes from a seeded
//! [`Lcg`], so a fixture is the same on every machine.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Knuth's MMIX linear congruential generator: a fixed, platform-independent stream for test
/// inputs.
#[derive(Clone, Debug)]
pub struct Lcg(pub u64);

impl Lcg {
    /// The next state.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }

    /// A value in [0, 1): the top 53 bits of the next state over 2^53 (numpy:
    /// `(s >> 11) / 2**53` on the state `s = (s * 6364136223846793005 + 1442695040888963407)
    /// % 2**64`).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A value in [-1, 1): the state's top 31 bits over 2^31, doubled, less 1.
    pub fn symmetric(&mut self) -> f64 {
        ((self.next_u64() >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        (self.next_u64() >> 33) % n
    }
}

/// `k` values in [0, 1) from the 32-bit LCG `s = (1664525 s + 1013904223) mod 2^32` (value
/// `s / 2^32`), the generator the score tests' Python reference scripts reproduce.
pub fn lcg32(seed: u64, k: usize) -> Vec<f64> {
    let mut s = seed;
    (0..k)
        .map(|_| {
            s = (1664525 * s + 1013904223) % (1 << 32);
            s as f64 / (1u64 << 32) as f64
        })
        .collect()
}

/// Where each class's block sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Two rows of five blocks, class `c` at row `c / 5`, column `c % 5`.
    Digits,
    /// Five rows of two blocks, class `c` at row `c % 5`, column `c / 5`.
    Clothes,
}

/// `10 * per_class` images of `side` x `side` pixels (u8, 0 background), `per_class` of each of
/// 10 classes in a seeded order, with their labels.
pub fn images(layout: Layout, side: usize, per_class: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = Lcg(seed);
    let (rows, cols) = match layout {
        Layout::Digits => (2, 5),
        Layout::Clothes => (5, 2),
    };
    let (bh, bw) = (side / rows, side / cols);
    let mut pixels = Vec::with_capacity(10 * per_class * side * side);
    let mut labels: Vec<u8> = (0..10 * per_class).map(|i| (i % 10) as u8).collect();
    shuffle(&mut labels, &mut rng);
    for &label in &labels {
        let c = usize::from(label);
        let (r, k) = match layout {
            Layout::Digits => (c / 5, c % 5),
            Layout::Clothes => (c % 5, c / 5),
        };
        // A one-pixel jitter, so that no two images of a class are the same.
        let dy = rng.below(3) as isize - 1;
        let dx = rng.below(3) as isize - 1;
        for y in 0..side as isize {
            for x in 0..side as isize {
                let (by, bx) = ((y - dy) / bh as isize, (x - dx) / bw as isize);
                let lit = by == r as isize && bx == k as isize;
                let v = if lit {
                    200 + rng.below(56)
                } else {
                    rng.below(40)
                };
                pixels.push(v as u8);
            }
        }
    }
    (pixels, labels)
}

/// A seeded Fisher-Yates shuffle: the classes of a fixture come in no pattern, as in the real
/// files (the pools of even and odd positions then hold every class).
fn shuffle<T>(items: &mut [T], rng: &mut Lcg) {
    for i in (1..items.len()).rev() {
        items.swap(i, rng.below(i as u64 + 1) as usize);
    }
}

fn idx_images(pixels: &[u8], n: usize, side: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + pixels.len());
    for w in [2051u32, n as u32, side as u32, side as u32] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out.extend_from_slice(pixels);
    out
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + labels.len());
    out.extend_from_slice(&2049u32.to_be_bytes());
    out.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    out.extend_from_slice(labels);
    out
}

fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, bytes)
}

/// An MNIST-like dataset in `dir`: IDX files `train-*` (`train_per_class` per class) and
/// `t10k-*` (`test_per_class`), 28x28.
pub fn digits(
    dir: &Path,
    layout: Layout,
    train_per_class: usize,
    test_per_class: usize,
    seed: u64,
) -> std::io::Result<()> {
    for (prefix, per_class, s) in [
        ("train", train_per_class, seed),
        ("t10k", test_per_class, seed ^ 0x5eed),
    ] {
        let (pixels, labels) = images(layout, 28, per_class, s);
        write(
            &dir.join(format!("{prefix}-images-idx3-ubyte")),
            &idx_images(&pixels, labels.len(), 28),
        )?;
        write(
            &dir.join(format!("{prefix}-labels-idx1-ubyte")),
            &idx_labels(&labels),
        )?;
    }
    Ok(())
}

/// A USPS-like dataset in `dir`: ESL rows (`label v1 .. v256`, values in [-1, 1]) of 16x16
/// digits in the [`Layout::Digits`] layout.
pub fn usps(
    dir: &Path,
    train_per_class: usize,
    test_per_class: usize,
    seed: u64,
) -> std::io::Result<()> {
    for (name, per_class, s) in [
        ("zip.train", train_per_class, seed),
        ("zip.test", test_per_class, seed ^ 0x5eed),
    ] {
        let (pixels, labels) = images(Layout::Digits, 16, per_class, s);
        let mut text = String::new();
        for (i, label) in labels.iter().enumerate() {
            let _ = write!(text, "{label}.0000");
            for &p in &pixels[i * 256..(i + 1) * 256] {
                let _ = write!(text, " {:.4}", f64::from(p) / 255.0 * 2.0 - 1.0);
            }
            text.push('\n');
        }
        write(&dir.join(name), text.as_bytes())?;
    }
    Ok(())
}

/// The words of [`bert_files`]' tokenizer after its five special tokens: the topic words of
/// [`topics`] and some shared ones.
pub const VOCABULARY: [&str; 40] = [
    "the", "a", "of", "and", "in", "on", "new", "today", "report", "says", // shared
    "war", "army", "border", "treaty", "minister", "election", "troops", "capital", // world
    "match", "goal", "league", "coach", "season", "team", "cup", "score", // sports
    "shares", "market", "bank", "profit", "stocks", "trade", "prices", "deal", // business
    "software", "chip", "internet", "phone", "robot", "data", // science and technology
];

const TOPICS: [(&str, std::ops::Range<usize>); 4] = [
    ("World", 10..18),
    ("Sports", 18..26),
    ("Business", 26..34),
    ("Sci/Tech", 34..40),
];

/// A topic-classification dataset like AG News in `dir`: four classes, each text six words,
/// mostly from its class's words in [`VOCABULARY`].
pub fn topics(
    dir: &Path,
    train_per_class: usize,
    test_per_class: usize,
    seed: u64,
) -> std::io::Result<()> {
    let classes: Vec<&str> = TOPICS.iter().map(|(name, _)| *name).collect();
    write(&dir.join("classes.txt"), classes.join("\n").as_bytes())?;
    for (name, per_class, s) in [
        ("train.csv", train_per_class, seed),
        ("test.csv", test_per_class, seed ^ 0x5eed),
    ] {
        let mut rng = Lcg(s);
        let mut order: Vec<usize> = (0..4 * per_class).map(|i| i % 4).collect();
        shuffle(&mut order, &mut rng);
        let mut text = String::new();
        for class in order {
            let (_, words) = &TOPICS[class];
            let mut pick = |n: usize| -> Vec<&str> {
                (0..n)
                    .map(|_| {
                        if rng.below(10) < 7 {
                            VOCABULARY[words.start + rng.below(words.len() as u64) as usize]
                        } else {
                            VOCABULARY[rng.below(10) as usize]
                        }
                    })
                    .collect()
            };
            let title = pick(2).join(" ");
            let body = pick(4).join(" ");
            let _ = writeln!(text, "\"{}\",\"{title}\",\"{body}\"", class + 1);
        }
        write(&dir.join(name), text.as_bytes())?;
    }
    Ok(())
}

/// A tiny BERT's `config.json` (2 layers, hidden size 32) and a WordPiece `tokenizer.json` over
/// `[PAD] [UNK] [CLS] [SEP] [MASK]` and [`VOCABULARY`], in `dir`. No weights: a test draws them
/// (`taskrel_models::random_bert`).
pub fn bert_files(dir: &Path) -> std::io::Result<()> {
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    let vocab: Vec<String> = specials
        .iter()
        .chain(VOCABULARY.iter())
        .enumerate()
        .map(|(id, word)| format!("\"{word}\": {id}"))
        .collect();
    let added: Vec<String> = specials
        .iter()
        .enumerate()
        .map(|(id, word)| {
            format!(
                "{{\"id\": {id}, \"content\": \"{word}\", \"single_word\": false, \"lstrip\": false, \
                 \"rstrip\": false, \"normalized\": false, \"special\": true}}"
            )
        })
        .collect();
    let tokenizer = format!(
        r###"{{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [{added}],
  "normalizer": {{"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true}},
  "pre_tokenizer": {{"type": "BertPreTokenizer"}},
  "post_processor": {{
    "type": "TemplateProcessing",
    "single": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}],
    "pair": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}, {{"Sequence": {{"id": "B", "type_id": 1}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 1}}}}],
    "special_tokens": {{"[CLS]": {{"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}}, "[SEP]": {{"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}}}
  }},
  "decoder": {{"type": "WordPiece", "prefix": "##", "cleanup": true}},
  "model": {{"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": {{{vocab}}}}}
}}
"###,
        added = added.join(", "),
        vocab = vocab.join(", ")
    );
    write(&dir.join("tokenizer.json"), tokenizer.as_bytes())?;
    let config = format!(
        r#"{{
  "model_type": "bert",
  "vocab_size": {},
  "hidden_size": 32,
  "num_hidden_layers": 2,
  "num_attention_heads": 2,
  "intermediate_size": 64,
  "hidden_act": "gelu",
  "hidden_dropout_prob": 0.1,
  "attention_probs_dropout_prob": 0.1,
  "max_position_embeddings": 64,
  "type_vocab_size": 2,
  "layer_norm_eps": 1e-12,
  "pad_token_id": 0
}}
"#,
        specials.len() + VOCABULARY.len()
    );
    write(&dir.join("config.json"), config.as_bytes())
}

/// A data root like `data/` in `dir`: `mnist` and `usps` in the digits layout, `fashion_mnist`
/// in the clothes layout (40 train and 20 test images per class; USPS 16x16), and `ag_news` (40
/// train and 20 test texts per class). Returns `dir`.
pub fn data_root(dir: &Path) -> std::io::Result<PathBuf> {
    digits(&dir.join("mnist"), Layout::Digits, 40, 20, 1)?;
    digits(&dir.join("fashion_mnist"), Layout::Clothes, 40, 20, 2)?;
    usps(&dir.join("usps"), 40, 20, 3)?;
    topics(&dir.join("ag_news"), 40, 20, 4)?;
    Ok(dir.to_path_buf())
}
