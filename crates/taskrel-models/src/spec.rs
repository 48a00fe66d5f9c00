//! What a model expects and produces, saved beside every checkpoint as `taskrel.json`.

use serde::{Deserialize, Serialize};
use taskrel_data::Modality;

/// The architectures taskrel can build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// The paper's small CNN: conv20-5 / pool / conv50-5 / pool / dense 200; 1x28x28 input.
    Lenet200,
    /// ccexam `MNISTNet`: conv32-3 / pool / conv64-3 / pool / dense 128; 1x28x28.
    CcexamMnist,
    /// ccexam `USPSNet`: as `CcexamMnist` with BatchNorm and dropout 0.3; 1x16x16.
    CcexamUsps,
    /// ccexam `SVHNNet`: three double-conv BatchNorm blocks / dense 256; 3x32x32.
    CcexamSvhn,
    /// A BERT-family encoder with mean pooling.
    Bert,
}

impl Arch {
    /// The name used in specs, configs and outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lenet200 => "lenet200",
            Self::CcexamMnist => "ccexam_mnist",
            Self::CcexamUsps => "ccexam_usps",
            Self::CcexamSvhn => "ccexam_svhn",
            Self::Bert => "bert",
        }
    }
}

/// Image input of a model: shape and per-channel normalisation applied to [0, 1] pixels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageInput {
    /// Channels (1 grey, 3 RGB).
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// Per-channel mean subtracted from [0, 1] pixels.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided out after the mean.
    pub std: Vec<f32>,
}

/// Text input of a model: tokenizer limits and pooling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextInput {
    /// Longest token sequence fed to the model; longer texts are truncated.
    pub max_len: usize,
    /// Pooling of token states into one vector (`mean` is the only one implemented).
    pub pooling: String,
    /// Whether pooled vectors are L2-normalised before use as features.
    pub normalize: bool,
}

/// Everything needed to rebuild a model and feed it correctly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Architecture.
    pub arch: Arch,
    /// Image or text.
    pub modality: Modality,
    /// Image input, for image models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInput>,
    /// Text input, for text models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextInput>,
    /// BERT configuration (`config.json`), for text models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bert: Option<serde_json::Value>,
    /// Dimension of the features (the head's input).
    pub feature_dim: usize,
    /// Class names of the head, in output order.
    pub classes: Vec<String>,
    /// Where the weights came from (file, training run), for the record.
    pub origin: String,
}

impl ModelSpec {
    /// Number of head outputs.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
}
