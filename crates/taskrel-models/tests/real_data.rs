//! Specification of the models crate on real weights and data in `data/` (`scripts/fetch-data.sh`
//! fetches them; without them every test here fails at once saying so): pretrained CNNs reach their
//! published accuracy, MiniLM and MPNet reproduce sentence-transformers' embeddings, gradients match
//! PyTorch's, training from scratch learns, transfer beats random features, checkpoints and seeds
//! reproduce exactly.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use candle_core::Device;
use std::path::Path;
use taskrel_data::{Dataset, DatasetName, Inputs};
use taskrel_models::train::{self, Mode, TrainConfig};
use taskrel_models::{LoadOptions, ModelRef, TextInput, load};
use taskrel_testkit::data_root;

fn split(name: DatasetName, train: bool) -> Dataset {
    let splits = taskrel_data::load(name, &data_root().join(name.as_str())).unwrap();
    if train {
        splits.train.unwrap()
    } else {
        splits.test.unwrap()
    }
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

fn weights(file: &str) -> String {
    data_root().join("models").join(file).display().to_string()
}

fn embed(m: &taskrel_models::Model, text: &str) -> Vec<f32> {
    let data = Dataset {
        inputs: Inputs::Texts(vec![text.into()]),
        labels: vec![0],
        classes: vec!["x".into()],
    };
    train::features(m, &data, &[0], 1, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// A 2-layer, 64-hidden BERT with MiniLM's vocabulary, random weights (seed 5), dropout `p`
/// and texts truncated at `max_len`.
fn tiny_bert(p: f32, max_len: usize) -> taskrel_models::Model {
    let config = serde_json::json!({
        "vocab_size": 30522, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128, "hidden_act": "gelu", "hidden_dropout_prob": p,
        "attention_probs_dropout_prob": p, "max_position_embeddings": 512,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0
    });
    tiny_encoder(config, 5, max_len)
}

/// A randomly initialised encoder of `config` with MiniLM's tokenizer, unnormalised mean
/// pooling and texts truncated at `max_len`.
fn tiny_encoder(config: serde_json::Value, seed: u64, max_len: usize) -> taskrel_models::Model {
    let tokenizer = data_root().join("models/all-MiniLM-L6-v2/tokenizer.json");
    let input = TextInput {
        max_len,
        pooling: "mean".into(),
        normalize: false,
    };
    let options = LoadOptions {
        seed,
        ..Default::default()
    };
    taskrel_models::random_bert(config, &tokenizer, input, &options).unwrap()
}

const GRAD_TEXTS: [&str; 3] = [
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "Stocks fell sharply on Monday.",
    "Scientists discover a new frog",
];

/// Runs `model` in training mode on `texts` (dropout off), checks it against evaluation mode,
/// then checks against PyTorch's: the first pooled features when given, the loss
/// `sum(f * w) + sum(f^2)` of the pooled features `f` (with `w[k] = ((7k mod 11) - 5) / 5`) and
/// the gradient norm of every encoder variable, sorted by name.
fn check_against_pytorch(
    model: &taskrel_models::Model,
    texts: &[&str],
    torch_loss: f32,
    torch_features: Option<&[f32]>,
    torch_norms: &[f64],
) {
    let data = Dataset {
        inputs: Inputs::Texts(texts.iter().map(|s| s.to_string()).collect()),
        labels: vec![0; texts.len()],
        classes: vec!["any".into()],
    };
    let idx: Vec<usize> = (0..texts.len()).collect();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let trained = model.features(&data, &idx, Some(&mut rng)).unwrap();
    let evaluated = model.features(&data, &idx, None).unwrap();
    // Training mode (differentiable kernels) and evaluation (fused kernels) agree.
    let gap = (&trained - &evaluated)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(gap < 1e-5, "train/eval features differ by {gap}");
    if let Some(want) = torch_features {
        let got = trained.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (got, want) in got.iter().zip(want) {
            assert!((got - want).abs() < 1e-5, "feature {got}, PyTorch {want}");
        }
    }
    let (n, d) = trained.dims2().unwrap();
    let w: Vec<f32> = (0..n * d)
        .map(|k| ((k * 7 % 11) as f32 - 5.0) / 5.0)
        .collect();
    let w = candle_core::Tensor::from_vec(w, (n, d), &Device::Cpu).unwrap();
    let loss = ((&trained * &w).unwrap().sum_all().unwrap()
        + trained.sqr().unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let loss = loss.to_scalar::<f32>().unwrap();
    assert!(
        (loss - torch_loss).abs() < 1e-4,
        "loss {loss}, PyTorch {torch_loss}"
    );
    let (encoder, _) = model.vars().unwrap();
    assert_eq!(encoder.len(), torch_norms.len());
    for (i, (var, &want)) in encoder.iter().zip(torch_norms).enumerate() {
        let got = grads
            .get(var)
            .map(|g| g.sqr().unwrap().sum_all().unwrap().sqrt().unwrap())
            .map(|g| f64::from(g.to_scalar::<f32>().unwrap()))
            .unwrap_or(f64::NAN);
        // The key biases cancel in the softmax: their gradient is 0 up to rounding.
        let tolerance = 1e-4 * want.max(1.0);
        assert!(
            (got - want).abs() < tolerance,
            "gradient norm of encoder variable {i}: {got}, PyTorch {want}"
        );
    }
}

/// With `TASKREL_SAVE_TINY_MODELS=DIR`, saves a tiny test model to `DIR/<name>`, where
/// `scripts/bench/tiny_encoders_reference.py` reads it to recompute the PyTorch numbers.
fn save_for_reference(model: &taskrel_models::Model, name: &str) {
    if let Some(dir) = std::env::var_os("TASKREL_SAVE_TINY_MODELS") {
        model.save(&Path::new(&dir).join(name)).unwrap();
    }
}

fn tiny_mpnet(p: f32, max_len: usize) -> taskrel_models::Model {
    let config = serde_json::json!({
        "model_type": "mpnet", "vocab_size": 30522, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 128, "hidden_act": "gelu",
        "hidden_dropout_prob": p, "attention_probs_dropout_prob": p,
        "max_position_embeddings": 64, "layer_norm_eps": 1e-5, "pad_token_id": 1,
        "relative_attention_num_buckets": 32
    });
    tiny_encoder(config, 6, max_len)
}

/// Texts of 6 to 32 tokens: relative positions up to 31 apart reach the logarithmic buckets.
const MPNET_TEXTS: [&str; 3] = [
    "The quick brown fox jumps over the lazy dog near the river bank today, while the farmer \
     watches from the old wooden fence and counts his sheep twice before sunset.",
    "Stocks fell sharply on Monday.",
    "Scientists discover a new frog",
];

#[test]
fn ccexam_cnns_reach_their_published_accuracy() {
    // ccexam reports 99.05 % (MNIST) and 95.12 % (USPS) on the full test sets.
    let mnist = model(&weights("ccexam/mnist.pth"), 0);
    let e = train::evaluate(&mnist, &split(DatasetName::Mnist, false), 500, true).unwrap();
    assert!(e.accuracy >= 0.985, "mnist.pth accuracy {}", e.accuracy);
    let usps = model(&weights("ccexam/usps.pth"), 0);
    let e = train::evaluate(&usps, &split(DatasetName::Usps, false), 500, true).unwrap();
    assert!(e.accuracy >= 0.945, "usps.pth accuracy {}", e.accuracy);
    assert_eq!(
        e.preprocessing,
        "u8 1x16x16 -> /255, normalised mean [0.2471] std [0.2994]"
    );
    // USPS into the MNIST CNN is resized, visibly.
    let p = mnist
        .preprocessing(&split(DatasetName::Usps, false))
        .unwrap();
    assert!(p.contains("bilinear resize to 28x28"), "{p}");
    // The SVHN CNN takes RGB: grey digits are replicated.
    let svhn = model(&weights("ccexam/svhn.pth"), 0);
    let p = svhn
        .preprocessing(&split(DatasetName::Usps, false))
        .unwrap();
    assert!(p.contains("grey replicated to 3 channels"), "{p}");
    let f = train::features(&svhn, &split(DatasetName::Usps, false), &[0, 1, 2], 3, true).unwrap();
    assert_eq!(f.dims(), [3, 256]);
}

#[test]
fn minilm_matches_sentence_transformers() {
    // from sentence_transformers import SentenceTransformer
    // SentenceTransformer("all-MiniLM-L6-v2").encode("This is an example sentence")[:5]
    // -> [0.0677, 0.0635, 0.0487, 0.0793, 0.0374]
    let m = model(&weights("all-MiniLM-L6-v2"), 0);
    let data = Dataset {
        inputs: Inputs::Texts(vec!["This is an example sentence".into()]),
        labels: vec![0],
        classes: vec!["x".into()],
    };
    let v = train::features(&m, &data, &[0], 1, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(v.len(), 384);
    for (got, want) in v.iter().zip([0.0677, 0.0635, 0.0487, 0.0793, 0.0374]) {
        assert!((got - want).abs() < 1e-3, "{got} vs {want}");
    }
    let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
}

#[test]
fn mpnet_matches_sentence_transformers() {
    // sentence-transformers 2.3.1, transformers 4.36.2, torch 1.13 (CPU):
    // SentenceTransformer("all-mpnet-base-v2").encode(s)[:5], for s below
    let m = model(&weights("all-mpnet-base-v2"), 0);
    assert_eq!(m.spec.feature_dim, 768);
    for (text, want) in [
        (
            "This is an example sentence",
            [0.0225, -0.0783, -0.023, -0.0051, -0.0803],
        ),
        (
            "Stocks fell sharply on Monday.",
            [-0.0454, -0.0482, -0.0162, 0.0339, -0.0113],
        ),
    ] {
        let v = embed(&m, text);
        assert_eq!(v.len(), 768);
        for (got, want) in v.iter().zip(want) {
            assert!((got - want).abs() < 1e-3, "{text}: {got} vs {want}");
        }
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}

#[test]
fn minilm_truncations_and_random_init() {
    let path: ModelRef = weights("all-MiniLM-L6-v2").parse().unwrap();
    let with = |layers: Option<usize>, random_init: bool, seed: u64| {
        load(
            &path,
            &LoadOptions {
                layers,
                random_init,
                seed,
                ..Default::default()
            },
        )
    };
    // transformers 5.24: config = AutoConfig.from_pretrained(d); config.num_hidden_layers = 2
    // AutoModel.from_pretrained(d, config=config), mean pooling over the attention mask, then
    // L2 normalisation, on "This is an example sentence"
    // -> [-0.0148, -0.0029, 0.0004, -0.037, -0.0089]
    let two = with(Some(2), false, 0).unwrap();
    assert_eq!(two.spec.bert.as_ref().unwrap()["num_hidden_layers"], 2);
    let v = embed(&two, "This is an example sentence");
    for (got, want) in v.iter().zip([-0.0148, -0.0029, 0.0004, -0.037, -0.0089]) {
        assert!((got - want).abs() < 1e-3, "{got} vs {want}");
    }
    let a = embed(&with(None, true, 3).unwrap(), "a sentence");
    let b = embed(&with(None, true, 3).unwrap(), "a sentence");
    let c = embed(&with(None, true, 4).unwrap(), "a sentence");
    assert_eq!(a, b, "random weights are a function of the seed");
    assert_ne!(a, c);
    let err = with(Some(7), false, 0).err().unwrap().to_string();
    assert!(
        err.contains("cannot keep 7 layers of a model with 6"),
        "{err}"
    );
    let err = load(
        &weights("ccexam/mnist.pth").parse().unwrap(),
        &LoadOptions {
            layers: Some(2),
            ..Default::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("BERT model folders only"), "{err}");
}

#[test]
fn lenet200_learns_mnist_transfers_to_usps_and_checkpoints_exactly() {
    let mnist_train = split(DatasetName::Mnist, true);
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 32,
        lr: 1e-3,
        per_class: Some(1000),
        seed: 0,
        ..Default::default()
    };
    let mut net = model("lenet200", 0);
    let history = train::train(&mut net, &mnist_train, &cfg, true).unwrap();
    assert_eq!(history.n_train, 10_000);
    let test = split(DatasetName::Mnist, false);
    let e = train::evaluate(&net, &test, 500, true).unwrap();
    assert!(
        e.accuracy >= 0.95,
        "lenet200 after 1 epoch on 10k MNIST: {}",
        e.accuracy
    );

    // Save -> load gives identical logits.
    let dir = tempfile::tempdir().unwrap();
    net.save(dir.path()).unwrap();
    let again = load(
        &ModelRef::Path(dir.path().to_path_buf()),
        &LoadOptions::default(),
    )
    .unwrap();
    let idx: Vec<usize> = (0..64).collect();
    let a = net
        .head_logits(&net.features(&test, &idx, None).unwrap())
        .unwrap();
    let b = again
        .head_logits(&again.features(&test, &idx, None).unwrap())
        .unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);

    // A linear probe on 100 USPS images per class: MNIST features beat random ones (measured
    // 0.891 vs 0.860 with these seeds; random conv features are a strong baseline on digits).
    let usps_train = split(DatasetName::Usps, true);
    let usps_test = split(DatasetName::Usps, false);
    let probe = TrainConfig {
        epochs: 30,
        batch_size: 64,
        lr: 1e-2,
        per_class: Some(100),
        seed: 1,
        ..Default::default()
    };
    let mut pretrained = again;
    train::fine_tune(
        &mut pretrained,
        &usps_train,
        Mode::LinearProbe,
        &probe,
        true,
    )
    .unwrap();
    let transferred = train::evaluate(&pretrained, &usps_test, 500, true)
        .unwrap()
        .accuracy;
    let mut random = model("lenet200", 7);
    train::fine_tune(&mut random, &usps_train, Mode::LinearProbe, &probe, true).unwrap();
    let baseline = train::evaluate(&random, &usps_test, 500, true)
        .unwrap()
        .accuracy;
    assert!(
        transferred > baseline + 0.01,
        "MNIST probe {transferred} vs random probe {baseline}"
    );
}

#[test]
fn same_seed_same_numbers() {
    let data = split(DatasetName::Usps, true);
    let cfg = TrainConfig {
        epochs: 2,
        batch_size: 16,
        per_class: Some(10),
        seed: 3,
        ..Default::default()
    };
    let run = || {
        let mut net = model("lenet200", 0);
        let h = train::train(&mut net, &data, &cfg, true).unwrap();
        let e = train::evaluate(&net, &data.take_per_class(20, 9).unwrap(), 64, true).unwrap();
        (
            h.epochs
                .iter()
                .map(|e| (e.loss, e.accuracy))
                .collect::<Vec<_>>(),
            e.accuracy,
            e.loss,
        )
    };
    assert_eq!(run(), run());
}

#[test]
fn bert_gradients_reach_every_weight_and_match_pytorch() {
    let bert = tiny_bert(0.0, 16);
    save_for_reference(&bert, "bert");
    // Reference (scripts/bench/tiny_encoders_reference.py, which torch 1.13 / transformers 4.36
    // reproduces): PyTorch 2 / transformers BertModel(add_pooling_layer=False) in train mode,
    // holding this model's weights (saved with `bert.save(dir)`), the same tokenizer.json,
    // padding="longest", truncation at 16, token types 0, masked mean pooling, then:
    //   w = torch.tensor([((k * 7 % 11) - 5.0) / 5.0 for k in range(n * d)]).reshape(n, d)
    //   loss = (f * w).sum() + (f ** 2).sum(); loss.backward()
    //   [p.grad.norm() for p in parameters sorted by name]  (pooler excluded)
    // which printed loss 64.79597473144531 and the norms below.
    let torch_norms: [f64; 37] = [
        18.66181, 15.872952, 208.367599, 564.073364, 175.821167, 18.580952, 15.880001, 18.554173,
        16.617821, 0.0, 0.084099, 0.018119, 0.084742, 2.833765, 12.888185, 2.157122, 10.252892,
        18.585876, 15.822839, 18.582111, 11.276446, 18.629694, 15.88574, 18.656996, 13.25876, 0.0,
        0.06195, 0.012766, 0.061525, 3.285834, 15.006693, 1.931075, 9.266418, 27.743849, 27.70536,
        18.591146, 10.369782,
    ];
    check_against_pytorch(&bert, &GRAD_TEXTS, 64.795975, None, &torch_norms);
}

#[test]
fn mpnet_gradients_reach_every_weight_and_match_pytorch() {
    let mpnet = tiny_mpnet(0.0, 32);
    save_for_reference(&mpnet, "mpnet");
    // Reference (scripts/bench/tiny_encoders_reference.py): torch 1.13 / transformers 4.36.2,
    // MPNetModel(MPNetConfig(**spec["bert"]), add_pooling_layer=False) in train mode holding
    // this model's weights (saved with
    // `mpnet.save(dir)`), the same tokenizer.json through PreTrainedTokenizerFast,
    // padding="longest", truncation at 32 (lengths 32, 8, 7), masked mean pooling, then:
    //   w = torch.tensor([((k * 7 % 11) - 5.0) / 5.0 for k in range(n * d)]).reshape(n, d)
    //   loss = (f * w).sum() + (f ** 2).sum(); loss.backward()
    //   [p.grad.norm() for _, p in sorted(model.named_parameters())]
    // which printed loss 16.949987411499023, features f[0, :4] = [0.041309, 0.117913, 0.112100,
    // -0.333639] and the norms below (the last is the relative-position bias table).
    let torch_norms: [f64; 37] = [
        11.254493, 5.085752, 145.844437, 143.024246, 11.138793, 5.064061, 0.0, 0.035288, 11.202966,
        5.647675, 0.013185, 0.038154, 1.908651, 5.144413, 1.314175, 3.909352, 11.148236, 5.072147,
        11.152726, 4.047976, 11.117023, 5.057258, 0.0, 0.045959, 11.118593, 5.290832, 0.016572,
        0.047515, 1.857492, 5.428497, 1.34638, 3.737883, 12.413056, 7.110754, 11.091236, 3.586848,
        0.046794,
    ];
    let features = [0.041309, 0.117913, 0.1121, -0.333639];
    check_against_pytorch(
        &mpnet,
        &MPNET_TEXTS,
        16.949987,
        Some(&features),
        &torch_norms,
    );
}

/// A local stand-in for the Hub: `resolve` URLs answer `HEAD` with the Hub's headers (the
/// large file by a redirect to `/cdn/<sha256>` with `X-Linked-Etag`/`X-Linked-Size`), `GET`
/// with the bytes, honouring `Range`; the first whole-file `GET` of the large file is cut off
/// half way. Repository `org/broken` answers 500. Every request is logged.
mod hub_server {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    pub struct Server {
        pub url: String,
        pub log: Arc<Mutex<Vec<String>>>,
    }

    pub fn start(files: HashMap<String, Vec<u8>>, large: &str, large_sha: String) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        let large = large.to_string();
        std::thread::spawn(move || {
            let mut cut_done = false;
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut range: Option<u64> = None;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("range: bytes=") {
                        range = v.trim().trim_end_matches('-').parse().ok();
                    }
                }
                let parts: Vec<&str> = line.split_whitespace().collect();
                let (method, path) = (parts[0].to_string(), parts[1].to_string());
                seen.lock()
                    .unwrap()
                    .push(format!("{method} {path} range={range:?}"));
                let mut head = |status: &str, headers: Vec<(String, String)>| {
                    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
                    for (k, v) in headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str("\r\n");
                    stream.write_all(out.as_bytes()).unwrap();
                };
                if path.starts_with("/org/broken/") {
                    head(
                        "500 Internal Server Error",
                        vec![("Content-Length".into(), "0".into())],
                    );
                    continue;
                }
                if let Some(sha) = path.strip_prefix("/cdn/") {
                    let body = &files[&large];
                    assert_eq!(sha, large_sha);
                    match range {
                        Some(from) => {
                            let rest = &body[from as usize..];
                            head(
                                "206 Partial Content",
                                vec![("Content-Length".into(), rest.len().to_string())],
                            );
                            stream.write_all(rest).unwrap();
                        }
                        None => {
                            head(
                                "200 OK",
                                vec![("Content-Length".into(), body.len().to_string())],
                            );
                            let end = if cut_done { body.len() } else { body.len() / 2 };
                            cut_done = true;
                            let _ = stream.write_all(&body[..end]);
                        }
                    }
                    continue;
                }
                // /org/tiny/resolve/<revision>/<file>
                let rest = path.strip_prefix("/org/tiny/resolve/").unwrap_or("");
                let file = rest.split_once('/').map_or("", |(_, f)| f);
                let Some(body) = files.get(file) else {
                    head("404 Not Found", vec![("Content-Length".into(), "0".into())]);
                    continue;
                };
                let commit = ("X-Repo-Commit".to_string(), COMMIT.to_string());
                if file == large {
                    head(
                        "302 Found",
                        vec![
                            commit,
                            ("Location".into(), format!("/cdn/{large_sha}")),
                            ("X-Linked-Etag".into(), format!("\"{large_sha}\"")),
                            ("X-Linked-Size".into(), body.len().to_string()),
                            ("Content-Length".into(), "0".into()),
                        ],
                    );
                    continue;
                }
                let etag = format!("\"{:040x}\"", body.len() * 7919 + file.len());
                head(
                    "200 OK",
                    vec![
                        commit,
                        ("ETag".into(), etag),
                        ("Content-Length".into(), body.len().to_string()),
                    ],
                );
                if method == "GET" {
                    stream.write_all(body).unwrap();
                }
            }
        });
        Server { url, log }
    }
}

#[test]
fn hub_models_download_into_the_cache_resume_and_respect_offline() {
    use sha2::Digest;
    let minilm = data_root().join("models/all-MiniLM-L6-v2");
    let mut files = std::collections::HashMap::new();
    for f in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "modules.json",
        "1_Pooling/config.json",
    ] {
        files.insert(f.to_string(), std::fs::read(minilm.join(f)).unwrap());
    }
    let large_sha: String = sha2::Sha256::digest(&files["model.safetensors"])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let size = files["model.safetensors"].len();
    let server = hub_server::start(files, "model.safetensors", large_sha.clone());
    let cache = tempfile::tempdir().unwrap();
    let online = LoadOptions {
        hub_cache: Some(cache.path().into()),
        hub_download: Some(taskrel_models::hub::Download {
            endpoint: server.url.clone(),
            token: None,
            progress: false,
        }),
        ..Default::default()
    };
    let offline = LoadOptions {
        hub_download: None,
        ..online.clone()
    };
    let texts = Dataset {
        inputs: Inputs::Texts(vec![
            "A download test.".into(),
            "Cached models load offline.".into(),
        ]),
        labels: vec![0, 0],
        classes: vec!["any".into()],
    };
    let embed = |m: &taskrel_models::Model| {
        m.features(&texts, &[0, 1], None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let local = embed(&load(&ModelRef::Path(minilm.clone()), &LoadOptions::default()).unwrap());

    // Offline and not cached: a clear refusal, and no request.
    let err = load(&"hf:org/tiny".parse().unwrap(), &offline)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not in the Hugging Face cache") && err.contains("downloads are off"),
        "{err}"
    );
    assert!(server.log.lock().unwrap().is_empty());

    // Online: downloaded (the cut-off transfer resumed from its half), same model as the folder.
    let got = embed(&load(&"hf:org/tiny".parse().unwrap(), &online).unwrap());
    assert_eq!(got, local);
    let log = server.log.lock().unwrap().clone();
    let cdn = format!("GET /cdn/{large_sha}");
    assert!(log.contains(&format!("{cdn} range=None")), "{log:#?}");
    assert!(
        log.contains(&format!("{cdn} range=Some({})", size / 2)),
        "{log:#?}"
    );
    let repo = cache.path().join("models--org--tiny");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        hub_server::COMMIT
    );
    let pointer = repo
        .join("snapshots")
        .join(hub_server::COMMIT)
        .join("model.safetensors");
    assert_eq!(
        std::fs::read_link(&pointer).unwrap(),
        Path::new("../../blobs").join(&large_sha)
    );
    assert_eq!(
        std::fs::read_link(
            repo.join("snapshots")
                .join(hub_server::COMMIT)
                .join("1_Pooling/config.json")
        )
        .unwrap()
        .parent()
        .unwrap(),
        Path::new("../../../blobs")
    );
    assert!(std::fs::read_dir(repo.join("blobs")).unwrap().all(|e| {
        !e.unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".incomplete")
    }));

    // Cached: offline loads it (also by revision after an online lookup), with no request.
    let requests = server.log.lock().unwrap().len();
    assert_eq!(
        embed(&load(&"hf:org/tiny".parse().unwrap(), &offline).unwrap()),
        local
    );
    assert_eq!(server.log.lock().unwrap().len(), requests);
    let pinned = format!("hf:org/tiny@{}", hub_server::COMMIT);
    assert_eq!(
        embed(&load(&pinned.parse().unwrap(), &online).unwrap()),
        local
    );
    assert_eq!(
        embed(&load(&pinned.parse().unwrap(), &offline).unwrap()),
        local
    );

    // A server error is named, with the repository and file.
    let err = load(&"hf:org/broken".parse().unwrap(), &online)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hf:org/broken@main: config.json") && err.contains("HTTP 500"),
        "{err}"
    );
}
