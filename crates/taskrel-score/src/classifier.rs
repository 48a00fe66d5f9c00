//! The reference classifier h_R of task-relatedness: a linear softmax head on standardised
//! reference features, trained with a gradient-norm penalty so that the cross-entropy is
//! (approximately) tau-Lipschitz in the features.
//!
//! For a linear head `h(z) = W z + c` the input gradient of the cross-entropy has the closed
//! form `grad_z CE(z, y) = W^T (softmax(W z + c) - onehot(y))`, so the penalty
//! `mean_i relu(||grad_z CE_i|| - tau)^2` is an ordinary function of `W, c` and needs no
//! double back-propagation. Training: full-batch Adam from zero weights.

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::Result;

/// A trained linear head `(k, d)` with bias `(k)`, on the CPU in f64 for evaluation.
#[derive(Clone, Debug)]
pub struct LinearHead {
    /// Row-major `(k, d)` weights.
    pub weight: Vec<f64>,
    /// `(k)` biases.
    pub bias: Vec<f64>,
    /// Classes.
    pub k: usize,
    /// Feature dimension.
    pub d: usize,
}

/// Settings of [`train_head`].
#[derive(Clone, Copy, Debug)]
pub struct HeadConfig {
    /// Lipschitz target of the loss in z.
    pub tau: f64,
    /// Weight of the gradient-norm penalty.
    pub penalty: f64,
    /// Full-batch Adam steps.
    pub steps: usize,
    /// Adam learning rate.
    pub lr: f64,
}

fn onehot(labels: &[u32], k: usize, device: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; labels.len() * k];
    for (i, &y) in labels.iter().enumerate() {
        v[i * k + y as usize] = 1.0;
    }
    Ok(Tensor::from_vec(v, (labels.len(), k), device)?)
}

/// Trains h_R on `z (n, d)` (standardised) with `labels` in `0..k`.
pub fn train_head(z: &Tensor, labels: &[u32], k: usize, cfg: &HeadConfig) -> Result<LinearHead> {
    let (_, d) = z.dims2()?;
    let device = z.device();
    let w = Var::zeros((k, d), DType::F32, device)?;
    let c = Var::zeros(k, DType::F32, device)?;
    let y = onehot(labels, k, device)?;
    let targets = Tensor::from_slice(labels, labels.len(), device)?;
    let mut opt = AdamW::new(
        vec![w.clone(), c.clone()],
        ParamsAdamW {
            lr: cfg.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    for _ in 0..cfg.steps {
        let logits = z
            .matmul(&w.as_tensor().t()?)?
            .broadcast_add(c.as_tensor())?;
        let ce = candle_nn::loss::cross_entropy(&logits, &targets)?;
        let p = candle_nn::ops::softmax(&logits, D::Minus1)?;
        let grad_z = (p - &y)?.matmul(w.as_tensor())?;
        let norms = (grad_z.sqr()?.sum(1)? + 1e-12)?.sqrt()?;
        let excess = (norms - cfg.tau)?.relu()?;
        let loss = (ce + (excess.sqr()?.mean_all()? * cfg.penalty)?)?;
        opt.backward_step(&loss)?;
    }
    let weight = w
        .as_tensor()
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let bias = c.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(LinearHead { weight, bias, k, d })
}

impl LinearHead {
    /// Softmax probabilities `(k)` at `z (d)`.
    pub fn probabilities(&self, z: &[f32]) -> Vec<f64> {
        let logits: Vec<f64> = (0..self.k)
            .map(|j| {
                self.bias[j]
                    + self.weight[j * self.d..(j + 1) * self.d]
                        .iter()
                        .zip(z)
                        .map(|(w, x)| w * f64::from(*x))
                        .sum::<f64>()
            })
            .collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let total: f64 = exp.iter().sum();
        exp.into_iter().map(|e| e / total).collect()
    }

    /// Cross-entropy and `||grad_z CE||` at `(z, y)`.
    pub fn loss_and_gradient_norm(&self, z: &[f32], y: u32) -> (f64, f64) {
        let mut p = self.probabilities(z);
        let ce = -p[y as usize].max(1e-300).ln();
        p[y as usize] -= 1.0;
        let norm = (0..self.d)
            .map(|t| {
                (0..self.k)
                    .map(|j| p[j] * self.weight[j * self.d + t])
                    .sum::<f64>()
                    .powi(2)
            })
            .sum::<f64>()
            .sqrt();
        (ce, norm)
    }
}
