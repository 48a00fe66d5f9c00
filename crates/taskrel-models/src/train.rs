//! Training from scratch, fine-tuning (linear probe or end to end), evaluation and feature
//! extraction. Each returns a record of what happened (loss and accuracy per epoch, timings,
//! the preprocessing applied) rather than printing it.
//!
//! - `train`: every weight re-drawn from the seed, then end-to-end training on the dataset.
//! - `fine_tune` with [`Mode::LinearProbe`]: the encoder is frozen (evaluation mode, so no
//!   dropout and BatchNorm on running statistics); features are computed once and a new head
//!   is trained on them.
//! - `fine_tune` with [`Mode::Full`]: a new head, then all weights trained end to end, with
//!   BatchNorm in training mode.
//!
//! Batches are drawn in a seeded order each epoch; optimisers are AdamW (candle-nn's update,
//! fused into in-place passes on the CPU: [`crate::optim`]) or SGD with
//! momentum (PyTorch's formulation: `v = mu v + g + wd w`, `w -= lr v`), with a constant or
//! cosine learning-rate schedule.

use std::time::Instant;

use candle_core::{D, DType, Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use taskrel_data::Dataset;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::optim::AdamW;

/// What fine-tuning updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Frozen encoder, new linear head.
    LinearProbe,
    /// New head, all weights trained.
    Full,
}

impl Mode {
    /// `linear_probe` or `full`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LinearProbe => "linear_probe",
            Self::Full => "full",
        }
    }
}

/// Optimiser.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW (betas 0.9, 0.999, eps 1e-8).
    Adamw,
    /// SGD with momentum.
    Sgd,
}

/// Learning-rate schedule over all steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Constant.
    Constant,
    /// Cosine decay from `lr` to 0.
    Cosine,
}

/// Hyper-parameters of a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Passes over the training data.
    pub epochs: usize,
    /// Samples per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Peak learning rate of the new head, in both modes (default: `lr`). A new head on
    /// L2-normalised text embeddings needs a far larger rate than the encoder.
    pub head_lr: Option<f64>,
    /// Weight decay (decoupled for AdamW, L2 for SGD).
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Optimiser.
    pub optimizer: OptimizerKind,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Seed of initialisation, sample budget, batch order and dropout.
    pub seed: u64,
    /// Train on this many samples per class (seeded stratified draw) instead of all.
    pub per_class: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 64,
            lr: 1e-3,
            head_lr: None,
            weight_decay: 0.0,
            momentum: 0.9,
            optimizer: OptimizerKind::Adamw,
            schedule: Schedule::Constant,
            seed: 0,
            per_class: None,
        }
    }
}

/// One epoch of training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss.
    pub loss: f64,
    /// Training accuracy (of the batches as trained, dropout on).
    pub accuracy: f64,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Wall time.
    pub seconds: f64,
    /// Training throughput.
    pub samples_per_second: f64,
}

/// What a training or fine-tuning run did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// `full` for training from scratch and end-to-end fine-tuning.
    pub mode: Mode,
    /// Training samples used.
    pub n_train: usize,
    /// Preprocessing applied to the inputs.
    pub preprocessing: String,
    /// Per-epoch records.
    pub epochs: Vec<EpochRecord>,
    /// Seconds spent computing frozen features (linear probe only).
    pub feature_seconds: f64,
    /// Total wall time.
    pub seconds: f64,
}

/// Accuracy and loss of a model with its own head on a labelled dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Fraction of correct argmax predictions.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Samples evaluated.
    pub n: usize,
    /// Preprocessing applied to the inputs.
    pub preprocessing: String,
    /// Wall time.
    pub seconds: f64,
}

/// Progress reporting: hidden when `quiet` (indicatif also hides itself when stderr is not a
/// terminal).
fn bar(len: usize, quiet: bool, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_string());
    bar
}

enum Optimizer {
    Adamw(AdamW),
    Sgd(Sgd),
}

struct Sgd {
    vars: Vec<(Var, Option<Tensor>)>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
}

impl Sgd {
    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        for (var, velocity) in &mut self.vars {
            let Some(g) = grads.get(var) else { continue };
            let g = if self.weight_decay > 0.0 {
                (g + (var.as_tensor() * self.weight_decay)?)?
            } else {
                g.clone()
            };
            let v = match velocity.take() {
                Some(v) if self.momentum > 0.0 => ((v * self.momentum)? + g)?,
                _ => g,
            };
            var.set(&(var.as_tensor() - (&v * self.lr)?)?)?;
            *velocity = Some(v);
        }
        Ok(())
    }
}

impl Optimizer {
    fn new(vars: Vec<Var>, cfg: &TrainConfig) -> Result<Self> {
        Ok(match cfg.optimizer {
            OptimizerKind::Adamw => Self::Adamw(AdamW::new(
                vars,
                candle_nn::ParamsAdamW {
                    lr: cfg.lr,
                    weight_decay: cfg.weight_decay,
                    ..Default::default()
                },
            )?),
            OptimizerKind::Sgd => Self::Sgd(Sgd {
                vars: vars.into_iter().map(|v| (v, None)).collect(),
                lr: cfg.lr,
                momentum: cfg.momentum,
                weight_decay: cfg.weight_decay,
            }),
        })
    }

    fn set_lr(&mut self, lr: f64) {
        match self {
            Self::Adamw(o) => o.set_learning_rate(lr),
            Self::Sgd(o) => o.lr = lr,
        }
    }

    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        match self {
            Self::Adamw(o) => o.step(grads)?,
            Self::Sgd(o) => o.step(grads)?,
        }
        Ok(())
    }
}

fn lr_at(cfg: &TrainConfig, step: usize, total: usize) -> f64 {
    match cfg.schedule {
        Schedule::Constant => cfg.lr,
        Schedule::Cosine => {
            cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total.max(1) as f64).cos())
        }
    }
}

impl TrainConfig {
    /// Settings that cannot work, as `(field, what was expected)`; empty when all can.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (field, value) in [
            ("epochs", Some(self.epochs)),
            ("batch_size", Some(self.batch_size)),
            ("per_class", self.per_class),
        ] {
            if value == Some(0) {
                out.push((field, "expected a positive count, got 0".to_string()));
            }
        }
        for (field, value) in [("lr", Some(self.lr)), ("head_lr", self.head_lr)] {
            if let Some(v) = value.filter(|v| !(v.is_finite() && *v > 0.0)) {
                out.push((field, format!("expected a positive finite rate, got {v}")));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            out.push((
                "weight_decay",
                format!("expected a finite value >= 0, got {}", self.weight_decay),
            ));
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            out.push((
                "momentum",
                format!("expected a value in [0, 1), got {}", self.momentum),
            ));
        }
        out
    }
}

fn validate(cfg: &TrainConfig, data: &Dataset) -> Result<()> {
    if let Some((field, message)) = cfg.problems().into_iter().next() {
        return Err(Error::Invalid(format!(
            "training setting {field}: {message}"
        )));
    }
    if data.is_empty() {
        return Err(Error::Invalid("cannot train on an empty dataset".into()));
    }
    Ok(())
}

fn labels_tensor(data: &Dataset, indices: &[usize], device: &Device) -> Result<Tensor> {
    let labels: Vec<u32> = indices.iter().map(|&i| data.labels[i]).collect();
    Ok(Tensor::from_vec(labels, indices.len(), device)?)
}

fn correct(logits: &Tensor, labels: &Tensor) -> Result<f64> {
    let predicted = logits.argmax(D::Minus1)?;
    Ok(predicted
        .eq(labels)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as f64)
}

/// Trains `model` from scratch on `data`: all weights re-drawn from `cfg.seed`, a head for
/// `data`'s classes, then end-to-end training.
pub fn train(model: &mut Model, data: &Dataset, cfg: &TrainConfig, quiet: bool) -> Result<History> {
    model.reinitialize(cfg.seed)?;
    fine_tune(model, data, Mode::Full, cfg, quiet)
}

/// Fine-tunes `model` on `data` with a new head for `data`'s classes (see module docs).
pub fn fine_tune(
    model: &mut Model,
    data: &Dataset,
    mode: Mode,
    cfg: &TrainConfig,
    quiet: bool,
) -> Result<History> {
    validate(cfg, data)?;
    let start = Instant::now();
    let preprocessing = model.preprocessing(data)?;
    let budgeted;
    let data = match cfg.per_class {
        Some(n) => {
            budgeted = data.take_per_class(n, cfg.seed)?;
            &budgeted
        }
        None => data,
    };
    model.reset_head(data.classes.clone(), cfg.seed.wrapping_add(1))?;
    let device = model.device().clone();
    let n = data.len();
    let mut feature_seconds = 0.0;
    let frozen = match mode {
        Mode::LinearProbe => {
            let t = Instant::now();
            let all: Vec<usize> = (0..n).collect();
            let features = extract(model, data, &all, cfg.batch_size.max(256), quiet)?;
            feature_seconds = t.elapsed().as_secs_f64();
            Some(features)
        }
        Mode::Full => None,
    };
    let (encoder_vars, head_vars) = model.vars()?;
    let head_lr = cfg.head_lr.unwrap_or(cfg.lr);
    let mut optimizer = Optimizer::new(
        head_vars,
        &TrainConfig {
            lr: head_lr,
            ..cfg.clone()
        },
    )?;
    let mut encoder_optimizer = match mode {
        Mode::LinearProbe => None,
        Mode::Full => Some(Optimizer::new(encoder_vars, cfg)?),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(2));
    let steps_per_epoch = n.div_ceil(cfg.batch_size);
    let total_steps = steps_per_epoch * cfg.epochs;
    let mut order: Vec<usize> = (0..n).collect();
    let mut epochs = Vec::with_capacity(cfg.epochs);
    let mut step = 0;
    for epoch in 1..=cfg.epochs {
        let t = Instant::now();
        order.shuffle(&mut rng);
        let progress = bar(
            steps_per_epoch,
            quiet,
            &format!("epoch {epoch}/{}", cfg.epochs),
        );
        let (mut loss_sum, mut hits) = (0.0, 0.0);
        for batch in order.chunks(cfg.batch_size) {
            let lr = lr_at(cfg, step, total_steps);
            optimizer.set_lr(lr * head_lr / cfg.lr);
            if let Some(o) = &mut encoder_optimizer {
                o.set_lr(lr);
            }
            let labels = labels_tensor(data, batch, &device)?;
            let features = match &frozen {
                Some(all) => all.index_select(
                    &Tensor::from_vec(
                        batch.iter().map(|&i| i as u32).collect(),
                        batch.len(),
                        &device,
                    )?,
                    0,
                )?,
                None => model.features(data, batch, Some(&mut rng))?,
            };
            let logits = model.head_logits(&features)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let grads = loss.backward()?;
            optimizer.step(&grads)?;
            if let Some(o) = &mut encoder_optimizer {
                o.step(&grads)?;
            }
            let batch_loss = loss.to_scalar::<f32>()? as f64;
            loss_sum += batch_loss * batch.len() as f64;
            hits += correct(&logits, &labels)?;
            step += 1;
            progress.set_message(format!("loss {batch_loss:.4}"));
            progress.inc(1);
        }
        progress.finish_and_clear();
        let seconds = t.elapsed().as_secs_f64();
        epochs.push(EpochRecord {
            epoch,
            loss: loss_sum / n as f64,
            accuracy: hits / n as f64,
            lr: lr_at(cfg, step, total_steps),
            seconds,
            samples_per_second: n as f64 / seconds.max(1e-9),
        });
    }
    Ok(History {
        mode,
        n_train: n,
        preprocessing,
        epochs,
        feature_seconds,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Features of the samples at `indices`, in evaluation mode, on the model's device.
fn extract(
    model: &Model,
    data: &Dataset,
    indices: &[usize],
    batch_size: usize,
    quiet: bool,
) -> Result<Tensor> {
    let progress = bar(indices.len().div_ceil(batch_size), quiet, "features");
    let mut parts = Vec::with_capacity(indices.len().div_ceil(batch_size));
    for batch in indices.chunks(batch_size) {
        parts.push(model.features(data, batch, None)?.detach());
        progress.inc(1);
    }
    progress.finish_and_clear();
    if parts.is_empty() {
        return Ok(Tensor::zeros(
            (0, model.spec.feature_dim),
            DType::F32,
            model.device(),
        )?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// `(indices.len(), feature_dim)` f32 features on the CPU, in evaluation mode.
pub fn features(
    model: &Model,
    data: &Dataset,
    indices: &[usize],
    batch_size: usize,
    quiet: bool,
) -> Result<Tensor> {
    model.preprocessing(data)?;
    Ok(extract(model, data, indices, batch_size.max(1), quiet)?.to_device(&Device::Cpu)?)
}

/// Accuracy and mean cross-entropy of the model's own head on all of `data`.
pub fn evaluate(
    model: &Model,
    data: &Dataset,
    batch_size: usize,
    quiet: bool,
) -> Result<Evaluation> {
    if data.is_empty() {
        return Err(Error::Invalid(
            "cannot evaluate on an empty dataset: no accuracy to report".into(),
        ));
    }
    let start = Instant::now();
    let preprocessing = model.preprocessing(data)?;
    if model.spec.num_classes() != data.num_classes() {
        return Err(Error::Invalid(format!(
            "the model's head has {} classes but the dataset has {}",
            model.spec.num_classes(),
            data.num_classes()
        )));
    }
    let device = model.device().clone();
    let all: Vec<usize> = (0..data.len()).collect();
    let progress = bar(all.len().div_ceil(batch_size.max(1)), quiet, "evaluate");
    let (mut loss_sum, mut hits) = (0.0, 0.0);
    for batch in all.chunks(batch_size.max(1)) {
        let labels = labels_tensor(data, batch, &device)?;
        let logits = model.head_logits(&model.features(data, batch, None)?)?;
        loss_sum += candle_nn::loss::cross_entropy(&logits, &labels)?.to_scalar::<f32>()? as f64
            * batch.len() as f64;
        hits += correct(&logits, &labels)?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    let n = data.len().max(1) as f64;
    Ok(Evaluation {
        accuracy: hits / n,
        loss: loss_sum / n,
        n: data.len(),
        preprocessing,
        seconds: start.elapsed().as_secs_f64(),
    })
}
