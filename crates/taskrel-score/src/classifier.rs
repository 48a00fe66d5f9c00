//! The reference classifier h_R of task-relatedness: a linear softmax head on standardised
//! reference features, trained with the authors' gradient-norm penalty so that the loss is
//! (approximately) tau-Lipschitz in the features for *any* label, not only near its own
//! training points.
//!
//! Objective (Mehra, Zhang and Hamm, small-scale code): on a batch of `n` samples with labels
//! `y` and labels `u` drawn uniformly at random afresh every step,
//!
//! ```text
//! mean_i CE(z_i, y_i) + penalty * mean_i relu(||grad_z [CE(z_i, y_i) + CE(z_i, u_i)]|| - tau)^2
//! ```
//!
//! For a linear head `h(z) = W z + c` the input gradient has the closed form
//! `grad_z [CE(y) + CE(u)] = W^T (2 softmax(W z + c) - e_y - e_u)`, so the penalty is an
//! ordinary function of `W, c` and needs no double back-propagation. Training: Adam from zero
//! weights on seeded mini-batches, the gradient written out by hand (`HeadObjective`; a test
//! checks it against candle's autograd). Without the random label the head grows confident,
//! its in-sample gradients vanish and its held-out Lipschitz constant is many times tau.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::dense::{Adam, View, gemm};
use crate::{Error, Result};

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
    /// Passes over the training samples.
    pub epochs: usize,
    /// Samples per step (the last, smaller batch of an epoch is dropped, as the authors do,
    /// unless it is the only one).
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Adam's first-moment decay.
    pub beta1: f64,
    /// Seed of the batch order and of the random labels.
    pub seed: u64,
}

/// Trains h_R on row-major `z (n, d)` (standardised) with `labels` (`n`) in `0..k`.
pub fn train_head(
    z: &[f32],
    d: usize,
    labels: &[u32],
    k: usize,
    cfg: &HeadConfig,
) -> Result<LinearHead> {
    let n = labels.len();
    if n == 0 || z.len() != n * d {
        return Err(Error::Invalid(format!(
            "h_R: {} feature values for {n} labels of dimension {d}",
            z.len()
        )));
    }
    if let Some(bad) = labels.iter().find(|&&y| y as usize >= k) {
        return Err(Error::Invalid(format!("h_R: label {bad} outside 0..{k}")));
    }
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(Error::Invalid(format!(
            "h_R: batch size ({}) and epochs ({}) must be positive",
            cfg.batch_size, cfg.epochs
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut w = vec![0f32; k * d];
    let mut c = vec![0f64; k];
    let (mut opt_w, mut opt_c) = (
        Adam::with_beta1(k * d, cfg.lr, cfg.beta1),
        Adam::with_beta1(k, cfg.lr, cfg.beta1),
    );
    let batch = cfg.batch_size.min(n);
    let mut order: Vec<usize> = (0..n).collect();
    let (mut zb, mut yb, mut ub) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks_exact(batch) {
            zb.clear();
            yb.clear();
            ub.clear();
            for &i in chunk {
                zb.extend_from_slice(&z[i * d..(i + 1) * d]);
                yb.push(labels[i]);
                ub.push(rng.random_range(0..k as u32));
            }
            let g = HeadObjective {
                z: &zb,
                d,
                labels: &yb,
                random: &ub,
                k,
                w: &w,
                c: &c,
                cfg,
            }
            .evaluate();
            opt_w.step(&mut w, &g.weight);
            opt_c.step(&mut c, &g.bias);
        }
    }
    Ok(LinearHead {
        weight: w.iter().map(|&v| f64::from(v)).collect(),
        bias: c,
        k,
        d,
    })
}

/// The training objective of h_R and its gradient.
pub(crate) struct HeadGradient {
    /// `mean CE + penalty * mean relu(||grad_z [CE(y) + CE(u)]|| - tau)^2`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) loss: f64,
    /// Gradient with respect to the `(k, d)` weights.
    pub(crate) weight: Vec<f32>,
    /// Gradient with respect to the `(k)` biases.
    pub(crate) bias: Vec<f64>,
}

/// Objective and gradient at `(w, c)`, differentiated by hand. With `p_i` the softmax,
/// `q_i = 2 p_i - e_{y_i} - e_{u_i}` and `g_i = W^T q_i` (the two-label input gradient), the
/// penalty's gradient flows through `g_i` twice: directly through `W^T` (giving
/// `s_i q_i g_i^T`) and through the softmax (giving `2 s_i J_i W g_i` on the logits,
/// `J_i = diag(p_i) - p_i p_i^T`), where `s_i = 2 penalty relu(||g_i|| - tau) / (n ||g_i||)`.
/// The cross-entropy adds `(p_i - e_{y_i}) / n` on the logits.
#[derive(Clone, Copy)]
pub(crate) struct HeadObjective<'a> {
    /// Row-major `(n, d)` features.
    pub(crate) z: &'a [f32],
    /// Feature dimension.
    pub(crate) d: usize,
    /// `n` labels in `0..k`.
    pub(crate) labels: &'a [u32],
    /// `n` random labels in `0..k`.
    pub(crate) random: &'a [u32],
    /// Classes.
    pub(crate) k: usize,
    /// Row-major `(k, d)` weights.
    pub(crate) w: &'a [f32],
    /// `(k)` biases.
    pub(crate) c: &'a [f64],
    /// Penalty settings.
    pub(crate) cfg: &'a HeadConfig,
}

impl HeadObjective<'_> {
    /// The objective and its gradient, compiled for the CPU's vector width. The rows are taken
    /// in two fixed halves, one on each of two threads, and the halves' sums added (the same
    /// arithmetic for any number of threads).
    pub(crate) fn evaluate(self) -> HeadGradient {
        let n = self.labels.len();
        let half = n / 2;
        let part = |rows: std::ops::Range<usize>| Part {
            obj: HeadObjective {
                z: &self.z[rows.start * self.d..rows.end * self.d],
                labels: &self.labels[rows.clone()],
                random: &self.random[rows],
                ..self
            },
            mean_over: n,
        };
        let (first, second) = rayon::join(
            || pulp::Arch::new().dispatch(part(0..half)),
            || pulp::Arch::new().dispatch(part(half..n)),
        );
        HeadGradient {
            loss: first.loss + second.loss,
            weight: first
                .weight
                .iter()
                .zip(&second.weight)
                .map(|(a, b)| a + b)
                .collect(),
            bias: first
                .bias
                .iter()
                .zip(&second.bias)
                .map(|(a, b)| a + b)
                .collect(),
        }
    }
}

/// Some rows of a [`HeadObjective`]: their terms of its means over `mean_over` rows.
struct Part<'a> {
    obj: HeadObjective<'a>,
    mean_over: usize,
}

impl pulp::NullaryFnOnce for Part<'_> {
    type Output = HeadGradient;

    // Inlined into the dispatcher's target-feature context, where the row loops vectorise.
    #[inline(always)]
    fn call(self) -> HeadGradient {
        let HeadObjective {
            z,
            d,
            labels,
            random,
            k,
            w,
            c,
            cfg,
        } = self.obj;
        let n = labels.len();
        let nf = self.mean_over as f64;
        let mut logits = vec![0f32; n * k];
        gemm(
            &mut logits,
            View::new(z, n, d),
            View::new(w, k, d).t(),
            1.0,
            false,
        );
        // q = 2p - e_y - e_u, kept as f32 for the products, p in f64 for the rest.
        let mut p = vec![0f64; n * k];
        let mut q = vec![0f32; n * k];
        let mut ce = 0.0;
        for i in 0..n {
            let row = &mut p[i * k..(i + 1) * k];
            for (j, v) in row.iter_mut().enumerate() {
                *v = f64::from(logits[i * k + j]) + c[j];
            }
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = row.iter().map(|v| (v - max).exp()).sum();
            let (y, u) = (labels[i] as usize, random[i] as usize);
            ce -= row[y] - max - total.ln();
            for v in row.iter_mut() {
                *v = (*v - max).exp() / total;
            }
            for j in 0..k {
                let hits = f64::from(u8::from(j == y) + u8::from(j == u));
                q[i * k + j] = (2.0 * row[j] - hits) as f32;
            }
        }
        let mut g = vec![0f32; n * d];
        gemm(&mut g, View::new(&q, n, k), View::new(w, k, d), 1.0, false);
        let mut v = vec![0f32; n * k];
        gemm(
            &mut v,
            View::new(&g, n, d),
            View::new(w, k, d).t(),
            1.0,
            false,
        );
        let mut penalty = 0.0;
        let mut dlogits = vec![0f32; n * k];
        let mut scaled_q = vec![0f32; n * k];
        for i in 0..n {
            let gi = &g[i * d..(i + 1) * d];
            let norm =
                (gi.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() + 1e-12).sqrt();
            let excess = (norm - cfg.tau).max(0.0);
            penalty += excess * excess;
            let s = 2.0 * cfg.penalty * excess / (nf * norm);
            let (pi, vi) = (&p[i * k..(i + 1) * k], &v[i * k..(i + 1) * k]);
            let pv: f64 = pi.iter().zip(vi).map(|(a, b)| a * f64::from(*b)).sum();
            let y = labels[i] as usize;
            for j in 0..k {
                let r = pi[j] - f64::from(u8::from(j == y));
                dlogits[i * k + j] = (r / nf + 2.0 * s * pi[j] * (f64::from(vi[j]) - pv)) as f32;
                scaled_q[i * k + j] = (s * f64::from(q[i * k + j])) as f32;
            }
        }
        let mut gw = vec![0f32; k * d];
        gemm(
            &mut gw,
            View::new(&dlogits, n, k).t(),
            View::new(z, n, d),
            1.0,
            false,
        );
        gemm(
            &mut gw,
            View::new(&scaled_q, n, k).t(),
            View::new(&g, n, d),
            1.0,
            true,
        );
        let mut gc = vec![0f64; k];
        for i in 0..n {
            for j in 0..k {
                gc[j] += f64::from(dlogits[i * k + j]);
            }
        }
        HeadGradient {
            loss: ce / nf + cfg.penalty * penalty / nf,
            weight: gw,
            bias: gc,
        }
    }
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

    /// Cross-entropy at `(z, y)` and `||grad_z [CE(z, y) + CE(z, u)]||`, the two-label
    /// gradient norm the penalty constrains (`u` a random label).
    pub fn loss_and_gradient_norm(&self, z: &[f32], y: u32, u: u32) -> (f64, f64) {
        let mut q = self.probabilities(z);
        let ce = -q[y as usize].max(1e-300).ln();
        for v in q.iter_mut() {
            *v *= 2.0;
        }
        q[y as usize] -= 1.0;
        q[u as usize] -= 1.0;
        let norm = (0..self.d)
            .map(|t| {
                (0..self.k)
                    .map(|j| q[j] * self.weight[j * self.d + t])
                    .sum::<f64>()
                    .powi(2)
            })
            .sum::<f64>()
            .sqrt();
        (ce, norm)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Tensor, Var};

    use super::*;

    /// The objective written with candle tensor operations, differentiated by autograd.
    #[allow(clippy::too_many_arguments)]
    fn autograd(
        z: &[f32],
        d: usize,
        labels: &[u32],
        random: &[u32],
        k: usize,
        w: &[f32],
        c: &[f64],
        cfg: &HeadConfig,
    ) -> candle_core::Result<(f64, Vec<f32>, Vec<f32>)> {
        let dev = Device::Cpu;
        let n = labels.len();
        let zt = Tensor::from_slice(z, (n, d), &dev)?;
        let wv = Var::from_slice(w, (k, d), &dev)?;
        let cv = Var::from_vec(c.iter().map(|&x| x as f32).collect::<Vec<f32>>(), k, &dev)?;
        // e_y + e_u, the two labels of each sample.
        let mut onehot = vec![0f32; n * k];
        for (i, (&y, &u)) in labels.iter().zip(random).enumerate() {
            onehot[i * k + y as usize] += 1.0;
            onehot[i * k + u as usize] += 1.0;
        }
        let y = Tensor::from_vec(onehot, (n, k), &dev)?;
        let logits = zt
            .matmul(&wv.as_tensor().t()?)?
            .broadcast_add(cv.as_tensor())?;
        let ce = candle_nn::loss::cross_entropy(&logits, &Tensor::from_slice(labels, n, &dev)?)?;
        let p = candle_nn::ops::softmax(&logits, D::Minus1)?;
        // grad_z [CE(y) + CE(u)] = W^T (2p - e_y - e_u), kept in the graph.
        let grad_z = ((p * 2.0)? - &y)?.matmul(wv.as_tensor())?;
        let norms = (grad_z.sqr()?.sum(1)? + 1e-12)?.sqrt()?;
        let excess = (norms - cfg.tau)?.relu()?;
        let loss = (ce + (excess.sqr()?.mean_all()? * cfg.penalty)?)?;
        let grads = loss.backward()?;
        let gw = grads
            .get(wv.as_tensor())
            .map(|g| g.flatten_all()?.to_vec1::<f32>());
        let gc = grads.get(cv.as_tensor()).map(|g| g.to_vec1::<f32>());
        Ok((
            f64::from(loss.to_scalar::<f32>()?),
            gw.transpose()?.unwrap_or_default(),
            gc.transpose()?.unwrap_or_default(),
        ))
    }

    #[test]
    fn hand_written_gradient_matches_candle_autograd() -> candle_core::Result<()> {
        let (n, d, k) = (40, 6, 3);
        let mut rng = taskrel_testkit::fixtures::Lcg(7);
        let mut next = || rng.symmetric();
        let z: Vec<f32> = (0..n * d).map(|_| next() as f32).collect();
        let labels: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
        // Random labels that sometimes equal the true one (q then has a -2 entry).
        let random: Vec<u32> = (0..n).map(|i| ((i * 7 / 3) % k) as u32).collect();
        assert!(labels.iter().zip(&random).any(|(a, b)| a == b));
        assert!(labels.iter().zip(&random).any(|(a, b)| a != b));
        let w: Vec<f32> = (0..k * d).map(|_| (2.0 * next()) as f32).collect();
        let c: Vec<f64> = (0..k).map(|_| 0.5 * next()).collect();
        // tau between the smallest and largest input-gradient norms, so some samples are
        // penalised and some are not.
        let cfg = HeadConfig {
            tau: 3.0,
            penalty: 10.0,
            epochs: 1,
            batch_size: n,
            lr: 0.0,
            beta1: 0.5,
            seed: 0,
        };
        let head = LinearHead {
            weight: w.iter().map(|&v| f64::from(v)).collect(),
            bias: c.clone(),
            k,
            d,
        };
        let norms: Vec<f64> = (0..n)
            .map(|i| {
                head.loss_and_gradient_norm(&z[i * d..(i + 1) * d], labels[i], random[i])
                    .1
            })
            .collect();
        assert!(norms.iter().any(|&v| v > cfg.tau) && norms.iter().any(|&v| v < cfg.tau));
        let hand = HeadObjective {
            z: &z,
            d,
            labels: &labels,
            random: &random,
            k,
            w: &w,
            c: &c,
            cfg: &cfg,
        }
        .evaluate();
        let (loss, gw, gc) = autograd(&z, d, &labels, &random, k, &w, &c, &cfg)?;
        assert!(
            (hand.loss - loss).abs() < 1e-4 * loss.abs().max(1.0),
            "{} vs {loss}",
            hand.loss
        );
        let scale = gw.iter().fold(0f32, |m, g| m.max(g.abs()));
        assert!(scale > 0.1, "the penalty must be active: {scale}");
        let hand_all = hand
            .weight
            .iter()
            .map(|&v| f64::from(v))
            .chain(hand.bias.iter().copied());
        for (h, a) in hand_all.zip(gw.iter().chain(&gc)) {
            assert!(
                (h - f64::from(*a)).abs() < 1e-4 * f64::from(scale),
                "{h} vs {a}"
            );
        }
        Ok(())
    }
}
