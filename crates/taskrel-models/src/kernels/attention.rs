//! Kernels of the attention blocks: softmax, layer norm, attention probabilities (bias,
//! softmax and dropout in one op) and exact GELU, each with its backward kernel.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, bail};

use super::*;

/// Softmax over the last dimension.
pub(crate) struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "taskrel-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(storage, layout, self.name())?;
        let d = row_len(layout, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(out, row)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = (v - max).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                out.iter_mut().for_each(|o| *o *= inv);
            });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &SoftmaxBackward,
        )?))
    }
}

/// `dx = y * (g - sum(g * y))` per row, from the softmax output `y` and its gradient `g`.
pub(super) struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "taskrel-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let y = f32_slice(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        if l1.shape() != l2.shape() {
            bail!(
                "{}: shapes {:?} and {:?} differ",
                self.name(),
                l1.shape(),
                l2.shape()
            )
        }
        let d = row_len(l1, self.name())?;
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(d)
            .zip(y.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(out, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                for ((o, &yv), &gv) in out.iter_mut().zip(y).zip(g) {
                    *o = yv * (gv - dot);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Layer norm over the last dimension with weight and bias.
pub(crate) struct LayerNorm {
    pub(crate) eps: f32,
}

/// Mean and 1 / standard deviation of a row.
pub(super) fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "taskrel-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let ([x, w, b], d) = three_inputs(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        if w.len() != d || b.len() != d {
            bail!("{}: weight and bias must have {d} values", self.name())
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(out, row)| {
                let (mean, rstd) = moments(row, self.eps);
                for (((o, &v), &wv), &bv) in out.iter_mut().zip(row).zip(w).zip(b) {
                    *o = (v - mean) * rstd * wv + bv;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.contiguous()?;
        let d = weight.dim(0)?;
        // One kernel gives `[dx | g * x_hat]` side by side; the weight and bias gradients are
        // column sums.
        let both = x.apply_op3_no_bwd(weight, &g, &LayerNormBackward { eps: self.eps })?;
        let last = both.rank() - 1;
        let dx = both.narrow(last, 0, d)?;
        let rows = g.elem_count() / d;
        let dw = both.narrow(last, d, d)?.reshape((rows, d))?.sum(0)?;
        let db = g.reshape((rows, d))?.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Rows of `[dx | g * x_hat]` for layer norm's input `x`, weight `w` and output gradient `g`:
/// `dx = rstd * (g w - mean(g w) - x_hat * mean(g w x_hat))`.
pub(super) struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "taskrel-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let ([x, w, g], d) = three_inputs(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        if l1.shape() != l3.shape() || w.len() != d {
            bail!("{}: mismatched shapes", self.name())
        }
        let mut out = vec![0f32; 2 * x.len()];
        out.par_chunks_mut(2 * d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(out, (row, g))| {
                let (mean, rstd) = moments(row, self.eps);
                let (dx, gx) = out.split_at_mut(d);
                let (mut mean_gw, mut mean_gwx) = (0f32, 0f32);
                for i in 0..d {
                    let x_hat = (row[i] - mean) * rstd;
                    let gw = g[i] * w[i];
                    mean_gw += gw;
                    mean_gwx += gw * x_hat;
                    gx[i] = g[i] * x_hat;
                }
                mean_gw /= d as f32;
                mean_gwx /= d as f32;
                for i in 0..d {
                    let x_hat = (row[i] - mean) * rstd;
                    dx[i] = rstd * (g[i] * w[i] - mean_gw - x_hat * mean_gwx);
                }
            });
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last *= 2;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// The attention probabilities of one layer in one pass: `softmax(scores + bias)` over the
/// last dimension, then dropout with `mask` if any. `scores` is `(n, heads, q, k)` and `bias`
/// `(n, k)` (0 where attended, very negative on padding). Only the raw scores and the output
/// stay alive for the backward pass, which recomputes the probabilities from the scores.
#[derive(Clone, Debug)]
pub(crate) struct AttentionProbs {
    pub(crate) mask: Option<DropoutMask>,
}

/// Rows of the scores per sequence of the batch, after checking the shapes.
pub(super) fn rows_per_sequence(
    scores: &Layout,
    bias: &Layout,
    what: &str,
) -> candle_core::Result<usize> {
    let (n, k) = match bias.dims() {
        [n, k] => (*n, *k),
        dims => bail!("{what}: expected a (n, k) bias, got {dims:?}"),
    };
    let d = row_len(scores, what)?;
    let rows = scores.shape().elem_count() / d;
    if d != k || n == 0 || !rows.is_multiple_of(n) {
        bail!(
            "{what}: scores {:?} do not match bias {:?}",
            scores.dims(),
            bias.dims()
        )
    }
    Ok(rows / n)
}

/// Writes `softmax(row + bias)` into `out`, exactly as [`Softmax`] does on the sum.
pub(super) fn biased_softmax(out: &mut [f32], row: &[f32], bias: &[f32]) {
    for ((o, &v), &b) in out.iter_mut().zip(row).zip(bias) {
        *o = v + b;
    }
    let max = out.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for o in out.iter_mut() {
        *o = (*o - max).exp();
        sum += *o;
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

impl CustomOp2 for AttentionProbs {
    fn name(&self) -> &'static str {
        "taskrel-attention-probs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(s1, l1, self.name())?;
        let bias = f32_slice(s2, l2, self.name())?;
        let per_seq = rows_per_sequence(l1, l2, self.name())?;
        let d = row_len(l1, self.name())?;
        if let Some(mask) = &self.mask {
            mask.check(x.len(), self.name())?;
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .enumerate()
            .for_each(|(r, (out, row))| {
                let b = &bias[(r / per_seq) * d..(r / per_seq + 1) * d];
                biased_softmax(out, row, b);
                if let Some(mask) = &self.mask {
                    for (o, &k) in out.iter_mut().zip(&mask.keep[r * d..(r + 1) * d]) {
                        *o *= mask.factor(k);
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        scores: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = scores.apply_op3_no_bwd(
            bias,
            &grad_res.contiguous()?,
            &AttentionProbsBackward(self.clone()),
        )?;
        Ok((Some(dx), None))
    }
}

/// The scores' gradient of [`AttentionProbs`]: the output gradient through the dropout mask,
/// then `p * (g - sum(g * p))` with `p` recomputed from the scores.
pub(super) struct AttentionProbsBackward(AttentionProbs);

impl CustomOp3 for AttentionProbsBackward {
    fn name(&self) -> &'static str {
        "taskrel-attention-probs-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(s1, l1, self.name())?;
        let bias = f32_slice(s2, l2, self.name())?;
        let g = f32_slice(s3, l3, self.name())?;
        let per_seq = rows_per_sequence(l1, l2, self.name())?;
        let d = row_len(l1, self.name())?;
        if l1.shape() != l3.shape() {
            bail!("{}: gradient shape differs from the scores'", self.name())
        }
        let mask = self.0.mask.as_ref();
        if let Some(mask) = mask {
            mask.check(x.len(), self.name())?;
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .enumerate()
            .for_each(|(r, (out, (row, g)))| {
                let b = &bias[(r / per_seq) * d..(r / per_seq + 1) * d];
                let mut p = vec![0f32; d];
                biased_softmax(&mut p, row, b);
                // `out` first holds the gradient of the probabilities.
                match mask {
                    Some(mask) => {
                        for ((o, &gv), &k) in out.iter_mut().zip(g).zip(&mask.keep[r * d..]) {
                            *o = gv * mask.factor(k);
                        }
                    }
                    None => out.copy_from_slice(g),
                }
                let dot: f32 = p.iter().zip(out.iter()).map(|(a, b)| a * b).sum();
                for (o, &pv) in out.iter_mut().zip(&p) {
                    *o = pv * (*o - dot);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// GELU with the exact error function, `x/2 (1 + erf(x / sqrt 2))`. Forward and backward
/// compute what candle's `gelu_erf` and its backward pass compute, operation for operation, so
/// results are bit-identical to the tensor-op version.
pub(crate) const GELU_ERF: Pointwise = Pointwise {
    name: "taskrel-gelu-erf",
    f: |v| (candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * v,
    grad: PointwiseGrad {
        name: "taskrel-gelu-erf-backward",
        f: gelu_erf_grad,
    },
};

/// `g * (0.5 + 0.398942 x exp(-x^2 / 2) + 0.5 erf(x / sqrt 2))` in the order of candle's
/// `gelu_erf` backward pass (each scalar affine step as candle's `affine`, `v * mul + add`).
pub(super) fn gelu_erf_grad(a: f32, gv: f32) -> f32 {
    use candle_core::cpu::erf::erf_f32;
    let half = 0.5f64 as f32;
    let coef = 0.398942f64 as f32;
    let inv_sqrt2 = (1. / 2f64.sqrt()) as f32;
    let neg_half_square = -(a * a) * half + 0.0;
    let scaled_exp_arg = (neg_half_square.exp() * coef + 0.0) * a;
    let erf_scaled = erf_f32(a * inv_sqrt2 + 0.0) * half + 0.0;
    gv * ((scaled_exp_arg * 1.0 + half) + erf_scaled)
}
