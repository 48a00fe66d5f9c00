//! Model references as users write them, and loading them.
//!
//! | reference | what is loaded |
//! |---|---|
//! | `lenet200` | a freshly initialised `lenet200` (seeded), to be trained |
//! | `path/to/file.pth` | a ccexam digit CNN from a PyTorch state dict; the architecture is recognised from the tensor names |
//! | `path/to/folder` with `taskrel.json` | a taskrel checkpoint (any architecture) |
//! | `path/to/folder` with `config.json` | a BERT-family encoder (no head) |
//! | `hf:org/name[@revision]` | the same, from the Hugging Face Hub cache (`$HF_HOME/hub`, or the folder given); missing files are downloaded into it only when `LoadOptions::hub_download` is set ([`crate::hub`]) |

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::Device;

use crate::cnn::{self, Cnn};
use crate::error::{Error, Result};
use crate::model::{Encoder, Model, SPEC_FILE, WEIGHTS_FILE};
use crate::spec::{Arch, ModelSpec};
use crate::text::{self, BertEncoder, TextFiles};

/// Where a model comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelRef {
    /// A new `lenet200`.
    Lenet200,
    /// A local file or folder.
    Path(PathBuf),
    /// A Hugging Face Hub model id, `org/name` or `org/name@revision`: read from the local
    /// cache, downloaded into it only when [`LoadOptions::hub_download`] allows.
    Hub(String),
}

impl FromStr for ModelRef {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "lenet200" => Self::Lenet200,
            _ => match s.strip_prefix("hf:") {
                Some(id)
                    if id
                        .split_once('@')
                        .map_or(id, |(repo, _)| repo)
                        .contains('/')
                        && !id.ends_with('@') =>
                {
                    Self::Hub(id.to_string())
                }
                Some(id) => {
                    return Err(Error::Invalid(format!(
                        "hub reference hf:{id} must be hf:org/name or hf:org/name@revision"
                    )));
                }
                None => Self::Path(PathBuf::from(s)),
            },
        })
    }
}

impl ModelRef {
    /// Image or text, without loading weights: `lenet200` and `.pth`/`.pt` files are image
    /// models, `hf:` models and folders with `config.json` text models, and a taskrel
    /// checkpoint says in its `taskrel.json`. A path that does not exist (a plan checked
    /// without its files) is judged by its extension: `.pth`/`.pt` image, anything else text.
    pub fn modality(&self) -> Result<taskrel_data::Modality> {
        use taskrel_data::Modality;
        let is_pth = |p: &Path| p.extension().is_some_and(|e| e == "pth" || e == "pt");
        Ok(match self {
            Self::Lenet200 => Modality::Image,
            Self::Hub(_) => Modality::Text,
            Self::Path(p) if p.is_dir() && p.join(SPEC_FILE).is_file() => read_spec(p)?.1.modality,
            Self::Path(p) if p.is_dir() => Modality::Text,
            Self::Path(p) if p.exists() || is_pth(p) => Modality::Image,
            Self::Path(_) => Modality::Text,
        })
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Lenet200 => f.write_str("lenet200"),
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Hub(id) => write!(f, "hf:{id}"),
        }
    }
}

/// Options for [`load`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Device for the weights.
    pub device: Device,
    /// Seed of any freshly initialised weights.
    pub seed: u64,
    /// Longest token sequence for text models.
    pub max_len: usize,
    /// Hugging Face Hub cache folder; `None` uses `$HF_HOME/hub` or `~/.cache/huggingface/hub`.
    pub hub_cache: Option<PathBuf>,
    /// Download `hf:` models missing from the cache from here; `None` (the default) never
    /// downloads.
    pub hub_download: Option<crate::hub::Download>,
    /// Keep only the first this many transformer layers of a BERT model (a truncation).
    pub layers: Option<usize>,
    /// Draw a BERT model's weights from `seed` instead of loading them: the untrained model
    /// of the same shape and tokenizer.
    pub random_init: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            seed: 0,
            max_len: text::DEFAULT_MAX_LEN,
            hub_cache: None,
            hub_download: None,
            layers: None,
            random_init: false,
        }
    }
}

fn digit_classes() -> Vec<String> {
    (0..10).map(|d| d.to_string()).collect()
}

/// Loads the model a reference points to.
pub fn load(reference: &ModelRef, options: &LoadOptions) -> Result<Model> {
    let text_only = options.layers.is_some() || options.random_init;
    let is_text = matches!(reference, ModelRef::Hub(_))
        || matches!(reference, ModelRef::Path(p) if p.is_dir() && !p.join(SPEC_FILE).is_file());
    if text_only && !is_text {
        return Err(Error::Invalid(format!(
            "{reference}: layer truncation and random initialisation apply to BERT model folders only"
        )));
    }
    match reference {
        ModelRef::Lenet200 => {
            let spec = cnn::spec(
                Arch::Lenet200,
                digit_classes(),
                "lenet200 (random init)".into(),
            )?;
            let mut model = build(spec, options)?;
            model.reinitialize(options.seed)?;
            Ok(model)
        }
        ModelRef::Path(path) if path.is_dir() && path.join(SPEC_FILE).is_file() => {
            load_checkpoint(path, options)
        }
        ModelRef::Path(path) if path.is_dir() => load_text(
            &TextFiles::in_dir(path)?,
            &path.display().to_string(),
            options,
        ),
        ModelRef::Path(path) if !path.exists() => Err(Error::file(
            path,
            "model not found; run scripts/fetch-data.sh for the pretrained weights",
        )),
        ModelRef::Path(path) if path.extension().is_some_and(|e| e == "pth" || e == "pt") => {
            load_pth(path, options)
        }
        ModelRef::Path(path) => Err(Error::file(
            path,
            "not a model: expected a .pth file, a taskrel checkpoint folder or a folder with config.json",
        )),
        ModelRef::Hub(id) => {
            let cache = match &options.hub_cache {
                Some(dir) => hf_hub::Cache::new(dir.clone()),
                None => hf_hub::Cache::from_env(),
            };
            let (repo_id, revision) = id.split_once('@').unwrap_or((id.as_str(), "main"));
            let files_in_cache = || {
                let repo = cache.repo(hf_hub::Repo::with_revision(
                    repo_id.to_string(),
                    hf_hub::RepoType::Model,
                    revision.to_string(),
                ));
                let need = |name: &str| {
                    repo.get(name).ok_or_else(|| {
                        let how = if options.hub_download.is_some() {
                            "it was not downloaded".to_string()
                        } else {
                            format!(
                                "downloads are off (--offline or HF_HUB_OFFLINE=1; a library caller \
                                 sets LoadOptions::hub_download): download it on a connected machine \
                                 (huggingface-cli download {repo_id}) or give a local folder"
                            )
                        };
                        Error::file(
                            cache.path(),
                            format!("hf:{id}: {name} not in the Hugging Face cache; {how}"),
                        )
                    })
                };
                Ok::<_, Error>(TextFiles {
                    config: need("config.json")?,
                    tokenizer: need("tokenizer.json")?,
                    weights: need("model.safetensors")?,
                    modules: repo.get("modules.json"),
                    pooling: repo.get("1_Pooling/config.json"),
                })
            };
            let files = match (files_in_cache(), &options.hub_download) {
                (Ok(files), _) => files,
                (Err(_), Some(how)) => {
                    crate::hub::fetch(
                        cache.path(),
                        repo_id,
                        revision,
                        &[
                            ("config.json", true),
                            ("tokenizer.json", true),
                            ("model.safetensors", true),
                            ("modules.json", false),
                            ("1_Pooling/config.json", false),
                        ],
                        how,
                    )?;
                    files_in_cache()?
                }
                (Err(e), None) => return Err(e),
            };
            load_text(&files, &format!("hf:{id}"), options)
        }
    }
}

/// Builds a model of `spec` with initial (unloaded) weights.
fn build(spec: ModelSpec, options: &LoadOptions) -> Result<Model> {
    let arch = spec.arch;
    match arch {
        Arch::Bert => Err(Error::Invalid(
            "text models are built from their files".into(),
        )),
        _ => {
            let head = cnn::image_arch(arch).map_or("head", |a| a.head);
            Model::build(spec, head, &options.device, |vb| {
                Ok(Box::new(Cnn::new(arch, vb)?) as Box<dyn Encoder>)
            })
        }
    }
}

fn build_text(
    spec: ModelSpec,
    tokenizer: &Path,
    source: &Path,
    options: &LoadOptions,
) -> Result<Model> {
    let config_value = spec
        .bert
        .clone()
        .ok_or_else(|| Error::file(source, "text model spec without a BERT config"))?;
    let config = text::bert_config(&config_value, source)?;
    let input = spec
        .text
        .clone()
        .ok_or_else(|| Error::file(source, "text model spec without text input"))?;
    let tokenizer = tokenizer.to_path_buf();
    Model::build(spec, "head", &options.device, move |vb| {
        Ok(Box::new(BertEncoder::new(&config, &tokenizer, input, vb)?) as Box<dyn Encoder>)
    })
}

/// A BERT of the shape `config` describes with seeded random weights (N(0, 0.02)) and no
/// head: the "untrained transformer" baseline of model zoos, and tiny models for tests.
pub fn random_bert(
    config: serde_json::Value,
    tokenizer: &Path,
    input: crate::spec::TextInput,
    options: &LoadOptions,
) -> Result<Model> {
    let parsed = text::bert_config(&config, tokenizer)?;
    let spec = ModelSpec {
        arch: Arch::Bert,
        modality: taskrel_data::Modality::Text,
        image: None,
        text: Some(input),
        bert: Some(config),
        feature_dim: parsed.hidden_size,
        classes: Vec::new(),
        origin: format!("random BERT (seed {})", options.seed),
    };
    let mut model = build_text(spec, tokenizer, tokenizer, options)?;
    model.reinitialize(options.seed)?;
    Ok(model)
}

fn load_text(files: &TextFiles, origin: &str, options: &LoadOptions) -> Result<Model> {
    let mut config = text::read_config(&files.config)?;
    let mut origin = origin.to_string();
    if let Some(layers) = options.layers {
        let total = config
            .get("num_hidden_layers")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as usize;
        if layers == 0 || layers > total {
            return Err(Error::file(
                &files.config,
                format!("cannot keep {layers} layers of a model with {total}"),
            ));
        }
        config["num_hidden_layers"] = serde_json::Value::from(layers);
        origin = format!("{origin} (first {layers} of {total} layers)");
    }
    if options.random_init {
        origin = format!("{origin}, random weights (seed {})", options.seed);
    }
    let parsed = text::bert_config(&config, &files.config)?;
    let spec = ModelSpec {
        arch: Arch::Bert,
        modality: taskrel_data::Modality::Text,
        image: None,
        text: Some(text::text_input(files, options.max_len)?),
        bert: Some(config),
        feature_dim: parsed.hidden_size,
        classes: Vec::new(),
        origin,
    };
    let mut model = build_text(spec, &files.tokenizer, &files.config, options)?;
    if options.random_init {
        model.reinitialize(options.seed)?;
        return Ok(model);
    }
    let tensors = candle_core::safetensors::load(&files.weights, &Device::Cpu)
        .map_err(|e| Error::file(&files.weights, format!("not a safetensors file ({e})")))?;
    model.assign(&files.weights, tensors.into_iter().collect(), |name| {
        let name = ["bert.", "mpnet."]
            .iter()
            .find_map(|prefix| name.strip_prefix(prefix))
            .unwrap_or(name);
        Some(name.to_string())
    })?;
    Ok(model)
}

fn load_pth(path: &Path, options: &LoadOptions) -> Result<Model> {
    let tensors = crate::pth::read_state_dict(path)?;
    let has = |name: &str| tensors.iter().any(|(n, _)| n == name);
    let arch = if has("features.0.0.weight") {
        Arch::CcexamSvhn
    } else if has("features.1.running_mean") {
        Arch::CcexamUsps
    } else if has("features.0.weight") && has("classifier.2.weight") {
        Arch::CcexamMnist
    } else {
        let names: Vec<&str> = tensors.iter().take(6).map(|(n, _)| n.as_str()).collect();
        let found = if names.is_empty() {
            "it holds no tensors".to_string()
        } else {
            format!("tensors {}", names.join(", "))
        };
        return Err(Error::file(
            path,
            format!(
                "unrecognised architecture ({found}); expected a ccexam MNIST, USPS or SVHN CNN"
            ),
        ));
    };
    let spec = cnn::spec(arch, digit_classes(), path.display().to_string())?;
    let model = build(spec, options)?;
    model.assign(path, tensors, |name| Some(name.to_string()))?;
    Ok(model)
}

/// Loads a folder written by [`Model::save`].
/// The `taskrel.json` of a checkpoint folder, and its path.
fn read_spec(dir: &Path) -> Result<(PathBuf, ModelSpec)> {
    let spec_path = dir.join(SPEC_FILE);
    let text =
        std::fs::read_to_string(&spec_path).map_err(|e| Error::file(&spec_path, e.to_string()))?;
    let spec: ModelSpec = serde_json::from_str(&text)
        .map_err(|e| Error::file(&spec_path, format!("invalid model spec: {e}")))?;
    Ok((spec_path, spec))
}

fn load_checkpoint(dir: &Path, options: &LoadOptions) -> Result<Model> {
    let (spec_path, spec) = read_spec(dir)?;
    let model = match spec.arch {
        Arch::Bert => build_text(spec, &dir.join("tokenizer.json"), &spec_path, options)?,
        _ => build(spec, options)?,
    };
    model.load_weights(&dir.join(WEIGHTS_FILE))?;
    Ok(model)
}
