//! BERT-family encoders on candle-nn that train end to end: BERT and MPNet.
//!
//! The layers follow Hugging Face's `BertModel` and `MPNetModel` (post-layer-norm blocks) and
//! read their tensor names, so `model.safetensors` files load as they are. `config.json`'s
//! `model_type` picks the family (`bert` when absent):
//! - `bert`: absolute positions `0..len`, token-type embeddings (all type 0);
//! - `mpnet`: no token types; RoBERTa-style positions (`2 + i` for the i-th token, 1 on
//!   padding: transformers' `MPNetEmbeddings` fixes the padding index at 1, whatever the
//!   config's `pad_token_id`); every block adds a learned relative-position bias, one
//!   value per head for each of `relative_attention_num_buckets` buckets of key position minus
//!   query position (exact up to 8 apart, then logarithmic up to 128), to the attention scores.
//!
//! Two things differ from candle-transformers' BERT, which this replaces:
//! - in training mode, layer norm and softmax have a backward pass (kernels of
//!   [`crate::kernels`] on the CPU, tensor ops elsewhere); candle's fused kernels
//!   (`candle_nn::ops::layer_norm`, `softmax_last_dim`) record none, so with them the gradient
//!   stops at the first layer norm and only a head on top would learn. Evaluation keeps the
//!   fused kernels;
//! - dropout (`hidden_dropout_prob`, `attention_probs_dropout_prob`) is applied in training
//!   mode, drawn from the caller's seeded generator, where the PyTorch model applies it.

use candle_core::{D, DType, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::kernels::{AttentionProbs, DropoutMask, GELU_ERF, on_cpu_f32};
use crate::model::dropout;

/// The fields of a Hugging Face BERT `config.json` this encoder uses (others are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    /// Word-piece vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states (the feature dimension).
    pub hidden_size: usize,
    /// Transformer blocks.
    pub num_hidden_layers: usize,
    /// Attention heads per block; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// `gelu` (exact), `gelu_new` / `gelu_pytorch_tanh` (tanh approximation) or `relu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Dropout after the embeddings and after each block's two output projections.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f32,
    /// Dropout on the attention probabilities.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f32,
    /// Rows of the position table.
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// Rows of the token-type table.
    #[serde(default = "default_types")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Id of the padding token.
    #[serde(default)]
    pub pad_token_id: usize,
    /// Only `absolute` is supported.
    #[serde(default = "default_positions_kind")]
    pub position_embedding_type: String,
    /// `bert` or `mpnet`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// MPNet: buckets of the relative-position bias.
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
}

/// MPNet's position of padding; tokens take the positions after it.
const MPNET_PADDING_INDEX: u32 = 1;

/// The encoder families [`Bert`] implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Bert,
    Mpnet,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f32 {
    0.1
}
fn default_positions() -> usize {
    512
}
fn default_types() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_positions_kind() -> String {
    "absolute".into()
}
fn default_model_type() -> String {
    "bert".into()
}
fn default_buckets() -> usize {
    32
}

impl BertConfig {
    /// Parses and checks a `config.json` value; `source` names it in errors.
    pub fn from_json(value: &serde_json::Value, source: &std::path::Path) -> Result<Self> {
        let config: Self = serde_json::from_value(value.clone())
            .map_err(|e| Error::file(source, format!("not a BERT config: {e}")))?;
        let bad = |msg: String| Err(Error::file(source, msg));
        for (key, value) in [
            ("vocab_size", config.vocab_size),
            ("hidden_size", config.hidden_size),
            ("num_hidden_layers", config.num_hidden_layers),
            ("intermediate_size", config.intermediate_size),
            ("max_position_embeddings", config.max_position_embeddings),
            ("type_vocab_size", config.type_vocab_size),
        ] {
            if value == 0 {
                return bad(format!("{key} must be positive, got 0"));
            }
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            ));
        }
        if config.position_embedding_type != "absolute" {
            return bad(format!(
                "position_embedding_type {:?} is not supported (expected \"absolute\")",
                config.position_embedding_type
            ));
        }
        for (key, p) in [
            ("hidden_dropout_prob", config.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                config.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{key} must be in [0, 1), got {p}"));
            }
        }
        Activation::parse(&config.hidden_act).map_err(|m| Error::file(source, m))?;
        let family = config.family().map_err(|m| Error::file(source, m))?;
        if family == Family::Mpnet {
            if config.relative_attention_num_buckets < 4 {
                return bad(format!(
                    "relative_attention_num_buckets must be at least 4, got {}",
                    config.relative_attention_num_buckets
                ));
            }
            if config.max_positions() == 0 {
                return bad(format!(
                    "max_position_embeddings {} leaves no position after MPNet's padding index {MPNET_PADDING_INDEX}",
                    config.max_position_embeddings
                ));
            }
        }
        Ok(config)
    }

    /// The family `model_type` names.
    pub fn family(&self) -> std::result::Result<Family, String> {
        match self.model_type.as_str() {
            "bert" => Ok(Family::Bert),
            "mpnet" => Ok(Family::Mpnet),
            other => Err(format!(
                "model_type {other:?} is not supported (expected \"bert\" or \"mpnet\")"
            )),
        }
    }

    /// The longest sequence the position table covers (MPNet's positions start after its
    /// padding index).
    pub fn max_positions(&self) -> usize {
        match self.family() {
            Ok(Family::Mpnet) => self
                .max_position_embeddings
                .saturating_sub(MPNET_PADDING_INDEX as usize + 1),
            _ => self.max_position_embeddings,
        }
    }
}

/// MPNet's bucket of a relative position (key minus query), as `MPNetEncoder.
/// relative_position_bucket` computes it: half the buckets for keys after the query; within a
/// half, distances below a quarter of the buckets are exact, longer ones share logarithmic
/// buckets up to `max_distance`, beyond which all share the last. The logarithm is taken in f32,
/// as PyTorch does, so that the boundaries fall where they fall there.
pub fn relative_bucket(relative: i64, buckets: usize, max_distance: usize) -> u32 {
    let half = (buckets / 2) as i64;
    let exact = half / 2;
    let n = -relative;
    let base = if n < 0 { half } else { 0 };
    let n = n.abs();
    let within = if n < exact {
        n
    } else {
        let scaled = (n as f32 / exact as f32).ln()
            / ((max_distance as f64 / exact as f64).ln() as f32)
            * (half - exact) as f32;
        (exact + scaled as i64).min(half - 1)
    };
    (base + within) as u32
}

#[derive(Clone, Copy, Debug)]
enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            other => Err(format!(
                "hidden_act {other:?} is not supported (expected gelu, gelu_new, gelu_pytorch_tanh or relu)"
            )),
        }
    }

    /// The activation; when training on the CPU, exact GELU runs as [`GELU_ERF`] (the same
    /// values as candle's `gelu_erf` and its backward pass, in one parallel pass each).
    fn apply(self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(match self {
            Self::GeluErf if train && on_cpu_f32(x) => x.contiguous()?.apply_op1(GELU_ERF)?,
            Self::GeluErf => x.gelu_erf()?,
            Self::GeluTanh => x.gelu()?,
            Self::Relu => x.relu()?,
        })
    }
}

/// Dropout when training with probability `p > 0`; the identity otherwise.
fn maybe_dropout(x: Tensor, p: f32, train: &mut Option<&mut ChaCha8Rng>) -> Result<Tensor> {
    match train {
        Some(rng) if p > 0.0 => dropout(&x, p, rng),
        _ => Ok(x),
    }
}

/// Layer norm over the last dimension: candle's fused kernel when evaluating; when training,
/// the kernel of [`crate::kernels`] on the CPU and tensor ops (which record their backward
/// pass) elsewhere.
#[derive(Clone, Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            let x = x.contiguous()?;
            return Ok(candle_nn::ops::layer_norm(
                &x,
                &self.weight,
                &self.bias,
                self.eps as f32,
            )?);
        }
        if on_cpu_f32(x) {
            let kernel = crate::kernels::LayerNorm {
                eps: self.eps as f32,
            };
            return Ok(x
                .contiguous()?
                .apply_op3(&self.weight, &self.bias, kernel)?);
        }
        layer_norm_ops(x, &self.weight, &self.bias, self.eps)
    }
}

/// A linear layer on `(rows, in)` hidden states: candle-nn's `Linear` (`x w^T`, then the
/// bias broadcast over the rows), with the bias added by [`crate::kernels::BiasAdd`] when
/// training on the CPU (same sums; its gradient in one pass).
fn linear(layer: &Linear, x: &Tensor, training: bool) -> Result<Tensor> {
    match layer.bias() {
        Some(bias) if training && on_cpu_f32(x) && x.rank() == 2 => Ok(x
            .matmul(&layer.weight().t()?)?
            .apply_op2(bias, crate::kernels::BiasAdd)?),
        _ => Ok(layer.forward(x)?),
    }
}

/// Layer norm written with tensor ops (differentiable on every device).
pub(crate) fn layer_norm_ops(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?.broadcast_add(bias)?)
}

/// Softmax over the last dimension: candle's fused kernel when evaluating; when training, the
/// kernel of [`crate::kernels`] on the CPU and tensor ops elsewhere.
fn softmax_last(x: &Tensor, train: bool) -> Result<Tensor> {
    Ok(if !train {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)?
    } else if on_cpu_f32(x) {
        x.contiguous()?.apply_op1(crate::kernels::Softmax)?
    } else {
        candle_nn::ops::softmax(x, D::Minus1)?
    })
}

#[derive(Clone, Debug)]
struct Embeddings {
    words: Embedding,
    positions: Embedding,
    /// BERT only.
    types: Option<Embedding>,
    norm: LayerNorm,
}

#[derive(Clone, Debug)]
struct Block {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
}

/// The BERT encoder: embeddings and transformer blocks, without the pooler.
#[derive(Clone, Debug)]
pub struct Bert {
    family: Family,
    embeddings: Embeddings,
    blocks: Vec<Block>,
    /// MPNet: the relative-position bias table `(buckets, heads)`, shared by every block.
    relative_bias: Option<Embedding>,
    heads: usize,
    act: Activation,
    hidden_dropout: f32,
    attention_dropout: f32,
}

impl Bert {
    /// Creates the variables through `vb` with Hugging Face's names (`embeddings.*`,
    /// `encoder.layer.{i}.*`, and MPNet's `encoder.relative_attention_bias`).
    pub fn new(config: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let family = config.family().map_err(Error::Invalid)?;
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let e = vb.pp("embeddings");
        let embeddings = Embeddings {
            words: candle_nn::embedding(config.vocab_size, h, e.pp("word_embeddings"))?,
            positions: candle_nn::embedding(
                config.max_position_embeddings,
                h,
                e.pp("position_embeddings"),
            )?,
            types: match family {
                Family::Bert => Some(candle_nn::embedding(
                    config.type_vocab_size,
                    h,
                    e.pp("token_type_embeddings"),
                )?),
                Family::Mpnet => None,
            },
            norm: LayerNorm::new(h, eps, e.pp("LayerNorm"))?,
        };
        // Where each family keeps a block's attention weights.
        let (q, k, v, o, attn_norm) = match family {
            Family::Bert => (
                "self.query",
                "self.key",
                "self.value",
                "output.dense",
                "output.LayerNorm",
            ),
            Family::Mpnet => ("attn.q", "attn.k", "attn.v", "attn.o", "LayerNorm"),
        };
        let blocks = (0..config.num_hidden_layers)
            .map(|i| {
                let b = vb.pp(format!("encoder.layer.{i}"));
                let a = b.pp("attention");
                Ok(Block {
                    query: candle_nn::linear(h, h, a.pp(q))?,
                    key: candle_nn::linear(h, h, a.pp(k))?,
                    value: candle_nn::linear(h, h, a.pp(v))?,
                    attn_out: candle_nn::linear(h, h, a.pp(o))?,
                    attn_norm: LayerNorm::new(h, eps, a.pp(attn_norm))?,
                    up: candle_nn::linear(h, config.intermediate_size, b.pp("intermediate.dense"))?,
                    down: candle_nn::linear(config.intermediate_size, h, b.pp("output.dense"))?,
                    out_norm: LayerNorm::new(h, eps, b.pp("output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let relative_bias = match family {
            Family::Bert => None,
            Family::Mpnet => Some(candle_nn::embedding(
                config.relative_attention_num_buckets,
                config.num_attention_heads,
                vb.pp("encoder.relative_attention_bias"),
            )?),
        };
        Ok(Self {
            family,
            embeddings,
            blocks,
            relative_bias,
            heads: config.num_attention_heads,
            act: Activation::parse(&config.hidden_act).map_err(Error::Invalid)?,
            hidden_dropout: config.hidden_dropout_prob,
            attention_dropout: config.attention_probs_dropout_prob,
        })
    }

    /// Token plus position (plus BERT's token-type) embeddings, `(n, len, hidden)`.
    fn embed(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (_, len) = ids.dims2()?;
        let words = self.embeddings.words.forward(ids)?;
        match self.family {
            Family::Bert => {
                let positions = Tensor::arange(0u32, len as u32, ids.device())?;
                let x = words.broadcast_add(&self.embeddings.positions.forward(&positions)?)?;
                Ok(match &self.embeddings.types {
                    Some(types) => x.broadcast_add(&types.forward(&positions.zeros_like()?)?)?,
                    None => x,
                })
            }
            Family::Mpnet => {
                // 1 + (tokens up to and including this one) on tokens, 1 on padding:
                // `create_position_ids_from_input_ids` with the mask as its test.
                let mask = mask.to_dtype(DType::F32)?;
                let positions = ((mask.cumsum(1)? * &mask)? + f64::from(MPNET_PADDING_INDEX))?
                    .to_dtype(DType::U32)?;
                Ok((words + self.embeddings.positions.forward(&positions)?)?)
            }
        }
    }

    /// MPNet's relative-position bias `(1, heads, len, len)` for sequences of `len`.
    fn position_bias(
        &self,
        table: &Embedding,
        len: usize,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let buckets = table.embeddings().dim(0)?;
        let index: Vec<u32> = (0..len)
            .flat_map(|query| {
                (0..len).map(move |key| relative_bucket(key as i64 - query as i64, buckets, 128))
            })
            .collect();
        let index = Tensor::from_vec(index, (len, len), device)?;
        Ok(table.forward(&index)?.permute((2, 0, 1))?.unsqueeze(0)?)
    }

    /// Last hidden states `(n, len, hidden)` of token ids `(n, len)` with attention mask
    /// `(n, len)` (1 for tokens, 0 for padding, which comes after the tokens); BERT's token
    /// types are all 0. `train` carries the
    /// dropout generator and selects the differentiable kernels.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        mut train: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let training = train.is_some();
        let (n, len) = ids.dims2()?;
        let x = self.embed(ids, mask)?;
        let position_bias = match &self.relative_bias {
            Some(table) => Some(
                self.position_bias(table, len, ids.device())?
                    .to_dtype(x.dtype())?,
            ),
            None => None,
        };
        // Hidden states stay 2-d, `(n * len, hidden)`, outside attention: a linear layer on a
        // 3-d input would broadcast its weight over the batch, and its backward pass would then
        // materialise one weight gradient per sequence before summing them.
        let hidden = x.dim(2)?;
        let x = self
            .embeddings
            .norm
            .forward(&x.reshape((n * len, hidden))?, training)?;
        let mut x = maybe_dropout(x, self.hidden_dropout, &mut train)?;
        // 0 where attended, a large negative number on padding: (n, 1, 1, len).
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * f64::from(f32::MAX))?
            .to_dtype(x.dtype())?
            .reshape((n, 1, 1, len))?;
        let seq_bias = bias.reshape((n, len))?;
        let head_dim = hidden / self.heads;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((n, len, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        for block in &self.blocks {
            let q = split((linear(&block.query, &x, training)? * scale)?)?;
            let k = split(linear(&block.key, &x, training)?)?;
            let v = split(linear(&block.value, &x, training)?)?;
            let mut scores = q.matmul(&k.t()?)?;
            if let Some(position_bias) = &position_bias {
                scores = scores.broadcast_add(position_bias)?;
            }
            let probs = if training && on_cpu_f32(&scores) {
                // One kernel for bias, softmax and dropout (same draws, same values).
                let mask = match train.as_deref_mut() {
                    Some(rng) if self.attention_dropout > 0.0 => Some(DropoutMask::draw(
                        scores.elem_count(),
                        self.attention_dropout,
                        rng,
                    )),
                    _ => None,
                };
                scores.apply_op2(&seq_bias, AttentionProbs { mask })?
            } else {
                let probs = softmax_last(&scores.broadcast_add(&bias)?, training)?;
                maybe_dropout(probs, self.attention_dropout, &mut train)?
            };
            let context = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((n * len, hidden))?;
            let attn = maybe_dropout(
                linear(&block.attn_out, &context, training)?,
                self.hidden_dropout,
                &mut train,
            )?;
            let attn = block.attn_norm.forward(&(attn + &x)?, training)?;
            let up = self
                .act
                .apply(&linear(&block.up, &attn, training)?, training)?;
            let down = maybe_dropout(
                linear(&block.down, &up, training)?,
                self.hidden_dropout,
                &mut train,
            )?;
            x = block.out_norm.forward(&(down + &attn)?, training)?;
        }
        Ok(x.reshape((n, len, hidden))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_buckets_change_where_transformers_changes_them() {
        // transformers 4.36.2 / torch 1.13:
        //   rel = torch.arange(-300, 301)
        //   b = MPNetEncoder.relative_position_bucket(rel, num_buckets=32, max_distance=128)
        // listing each relative position where the bucket changes, with the new bucket:
        let changes: [(i64, u32); 31] = [
            (-300, 15),
            (-90, 14),
            (-63, 13),
            (-45, 12),
            (-31, 11),
            (-22, 10),
            (-15, 9),
            (-11, 8),
            (-7, 7),
            (-6, 6),
            (-5, 5),
            (-4, 4),
            (-3, 3),
            (-2, 2),
            (-1, 1),
            (0, 0),
            (1, 17),
            (2, 18),
            (3, 19),
            (4, 20),
            (5, 21),
            (6, 22),
            (7, 23),
            (8, 24),
            (12, 25),
            (16, 26),
            (23, 27),
            (32, 28),
            (46, 29),
            (64, 30),
            (91, 31),
        ];
        let mut expected = Vec::new();
        for (k, &(from, bucket)) in changes.iter().enumerate() {
            let to = changes.get(k + 1).map_or(301, |c| c.0);
            expected.extend((from..to).map(|_| bucket));
        }
        let got: Vec<u32> = (-300..301).map(|r| relative_bucket(r, 32, 128)).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn unknown_model_types_are_refused() {
        let config = serde_json::json!({
            "model_type": "roberta", "vocab_size": 10, "hidden_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16
        });
        let err = BertConfig::from_json(&config, std::path::Path::new("config.json"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains(
                "model_type \"roberta\" is not supported (expected \"bert\" or \"mpnet\")"
            ),
            "{err}"
        );
    }
}
