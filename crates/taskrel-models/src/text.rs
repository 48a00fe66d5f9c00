//! BERT-family text encoders ([`crate::bert::Bert`]) with the `tokenizers` crate.
//!
//! A model folder holds `config.json`, `tokenizer.json` and `model.safetensors` (tensor names
//! with or without a `bert.` prefix), and optionally sentence-transformers' `modules.json` and
//! `1_Pooling/config.json`. Features are the attention-masked mean of the last hidden states,
//! L2-normalised when `modules.json` lists a `Normalize` module (as all-MiniLM-L6-v2 does).
//!
//! Padding and truncation are set explicitly, whatever `tokenizer.json` ships (the MiniLM file
//! pads every text to 128 tokens): pad to the longest text of the batch, truncate at
//! `max_len`. Training mode applies the config's dropout, as the PyTorch model does.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha8Rng;
use taskrel_data::Dataset;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::bert::{Bert, BertConfig};
use crate::error::{Error, Result};
use crate::model::Encoder;
use crate::spec::{Arch, TextInput};

/// Default longest token sequence.
pub const DEFAULT_MAX_LEN: usize = 128;

/// A BERT encoder with its tokenizer and pooling.
pub struct BertEncoder {
    model: Bert,
    tokenizer: Tokenizer,
    input: TextInput,
    device: Device,
}

impl std::fmt::Debug for BertEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertEncoder")
            .field("input", &self.input)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// The files of a text model folder (or of a Hub cache snapshot).
#[derive(Clone, Debug)]
pub struct TextFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// `model.safetensors`.
    pub weights: PathBuf,
    /// `modules.json`, when present.
    pub modules: Option<PathBuf>,
    /// `1_Pooling/config.json`, when present.
    pub pooling: Option<PathBuf>,
}

impl TextFiles {
    /// The files of a local folder; fails naming the first missing one.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let need = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::file(
                    dir,
                    format!("{name} not found in the model folder"),
                ))
            }
        };
        let maybe = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        Ok(Self {
            config: need("config.json")?,
            tokenizer: need("tokenizer.json")?,
            weights: need("model.safetensors")?,
            modules: maybe("modules.json"),
            pooling: maybe("1_Pooling/config.json"),
        })
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

/// Text input settings from the sentence-transformers files (mean pooling is required).
pub fn text_input(files: &TextFiles, max_len: usize) -> Result<TextInput> {
    if let Some(path) = &files.pooling {
        let pooling = read_json(path)?;
        if pooling
            .get("pooling_mode_mean_tokens")
            .and_then(|v| v.as_bool())
            == Some(false)
        {
            return Err(Error::file(
                path,
                "only mean pooling is supported (pooling_mode_mean_tokens is false)",
            ));
        }
    }
    let normalize = match &files.modules {
        Some(path) => read_json(path)?.as_array().is_some_and(|mods| {
            mods.iter()
                .any(|m| m["type"].as_str().is_some_and(|t| t.ends_with("Normalize")))
        }),
        None => false,
    };
    Ok(TextInput {
        max_len,
        pooling: "mean".into(),
        normalize,
    })
}

/// Parses and checks a BERT `config.json` value.
pub fn bert_config(value: &serde_json::Value, source: &Path) -> Result<BertConfig> {
    BertConfig::from_json(value, source)
}

/// Reads `config.json`.
pub fn read_config(path: &Path) -> Result<serde_json::Value> {
    read_json(path)
}

impl BertEncoder {
    /// Builds the encoder, creating its variables through `vb`.
    pub fn new(
        config: &BertConfig,
        tokenizer_path: &Path,
        input: TextInput,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        let mut tokenizer = Tokenizer::from_file(tokenizer_path)
            .map_err(|e| Error::file(tokenizer_path, format!("cannot read tokenizer: {e}")))?;
        // Every id the tokenizer can produce must have a row in the word embeddings, and
        // every position a row in the position table.
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > config.vocab_size {
            return Err(Error::file(
                tokenizer_path,
                format!(
                    "the tokenizer has {vocab} tokens but the model's vocab_size is {}",
                    config.vocab_size
                ),
            ));
        }
        if input.max_len == 0 || input.max_len > config.max_positions() {
            return Err(Error::Invalid(format!(
                "max_len {} is outside 1..={}, the longest sequence the model's position table covers",
                input.max_len,
                config.max_positions()
            )));
        }
        let (pad_id, pad_token) = tokenizer
            .get_padding()
            .map(|p| (p.pad_id, p.pad_token.clone()))
            .unwrap_or((config.pad_token_id as u32, "[PAD]".into()));
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id,
            pad_token,
            ..Default::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: input.max_len,
                ..Default::default()
            }))
            .map_err(|e| Error::file(tokenizer_path, format!("cannot set truncation: {e}")))?;
        let device = vb.device().clone();
        let model = Bert::new(config, vb)?;
        Ok(Self {
            model,
            tokenizer,
            input,
            device,
        })
    }

    /// Token ids and attention mask `(n, longest)` u32 for `texts`.
    pub fn tokenize(&self, texts: &[&str]) -> Result<(Tensor, Tensor)> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Invalid(format!("tokenizer failed: {e}")))?;
        let len = encodings.first().map_or(0, |e| e.get_ids().len());
        let mut ids = Vec::with_capacity(texts.len() * len);
        let mut mask = Vec::with_capacity(texts.len() * len);
        for e in &encodings {
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
        }
        let shape = (texts.len(), len);
        Ok((
            Tensor::from_vec(ids, shape, &self.device)?,
            Tensor::from_vec(mask, shape, &self.device)?,
        ))
    }

    /// Pooled features `(n, hidden)` of `texts` in evaluation mode.
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor> {
        self.pooled(texts, None)
    }

    /// Pooled features; `train` as in [`Encoder::features`].
    fn pooled(&self, texts: &[&str], train: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let (ids, mask) = self.tokenize(texts)?;
        let hidden = self.model.forward(&ids, &mask, train)?;
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?;
        let pooled = summed.broadcast_div(&counts)?;
        if self.input.normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12, f64::INFINITY)?;
            Ok(pooled.broadcast_div(&norm)?)
        } else {
            Ok(pooled)
        }
    }
}

impl Encoder for BertEncoder {
    fn arch(&self) -> Arch {
        Arch::Bert
    }

    fn preprocessing(&self, data: &Dataset) -> Result<String> {
        texts_of(data)?;
        Ok(format!(
            "wordpiece tokens, padded to the longest in batch, truncated at {}; mean pooling{}",
            self.input.max_len,
            if self.input.normalize {
                ", L2-normalised"
            } else {
                ""
            }
        ))
    }

    fn features(
        &self,
        data: &Dataset,
        indices: &[usize],
        train: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let texts = texts_of(data)?;
        let batch: Vec<&str> = indices.iter().map(|&i| texts[i].as_str()).collect();
        self.pooled(&batch, train)
    }

    fn save_extras(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.tokenizer
            .save(&path, false)
            .map_err(|e| Error::file(&path, e.to_string()))
    }
}

fn texts_of(data: &Dataset) -> Result<&[String]> {
    data.texts().ok_or_else(|| {
        Error::Invalid("bert is a text model and cannot read an image dataset".into())
    })
}
