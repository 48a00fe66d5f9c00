//! A BERT encoder on candle-nn that trains end to end.
//!
//! The layers follow Hugging Face's `BertModel` (absolute positions, post-layer-norm blocks) and
//! read its tensor names, so `model.safetensors` files load as they are. Two things differ from
//! candle-transformers' BERT, which this replaces:
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
use crate::kernels::{AttentionProbs, DropoutMask, GELU_ERF};
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
        Ok(config)
    }
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

fn on_cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
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
    types: Embedding,
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
    embeddings: Embeddings,
    blocks: Vec<Block>,
    heads: usize,
    act: Activation,
    hidden_dropout: f32,
    attention_dropout: f32,
}

impl Bert {
    /// Creates the variables through `vb` with Hugging Face's names (`embeddings.*`,
    /// `encoder.layer.{i}.*`).
    pub fn new(config: &BertConfig, vb: VarBuilder) -> Result<Self> {
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
            types: candle_nn::embedding(config.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            norm: LayerNorm::new(h, eps, e.pp("LayerNorm"))?,
        };
        let blocks = (0..config.num_hidden_layers)
            .map(|i| {
                let b = vb.pp(format!("encoder.layer.{i}"));
                let a = b.pp("attention");
                Ok(Block {
                    query: candle_nn::linear(h, h, a.pp("self.query"))?,
                    key: candle_nn::linear(h, h, a.pp("self.key"))?,
                    value: candle_nn::linear(h, h, a.pp("self.value"))?,
                    attn_out: candle_nn::linear(h, h, a.pp("output.dense"))?,
                    attn_norm: LayerNorm::new(h, eps, a.pp("output.LayerNorm"))?,
                    up: candle_nn::linear(h, config.intermediate_size, b.pp("intermediate.dense"))?,
                    down: candle_nn::linear(config.intermediate_size, h, b.pp("output.dense"))?,
                    out_norm: LayerNorm::new(h, eps, b.pp("output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            blocks,
            heads: config.num_attention_heads,
            act: Activation::parse(&config.hidden_act).map_err(Error::Invalid)?,
            hidden_dropout: config.hidden_dropout_prob,
            attention_dropout: config.attention_probs_dropout_prob,
        })
    }

    /// Last hidden states `(n, len, hidden)` of token ids `(n, len)` with attention mask
    /// `(n, len)` (1 for tokens, 0 for padding); token types are all 0. `train` carries the
    /// dropout generator and selects the differentiable kernels.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        mut train: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let training = train.is_some();
        let (n, len) = ids.dims2()?;
        let positions = Tensor::arange(0u32, len as u32, ids.device())?;
        let x = self
            .embeddings
            .words
            .forward(ids)?
            .broadcast_add(&self.embeddings.positions.forward(&positions)?)?
            .broadcast_add(&self.embeddings.types.forward(&positions.zeros_like()?)?)?;
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
            let scores = q.matmul(&k.t()?)?;
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
