//! CPU kernels with a backward pass, for training BERT and the CNNs.
//!
//! candle's fused softmax and layer norm record no backward pass, and the same functions
//! written with tensor ops take many passes over the attention scores (and keep each
//! intermediate alive for the backward pass). These are single-pass kernels over rows of the
//! last dimension, for contiguous f32 tensors on the CPU, whose backward pass is one more
//! kernel. Other devices and types use the tensor-op versions in [`crate::bert`].

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, bail};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The contiguous f32 data of a CPU tensor's storage.
pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{what}: expected f32 data")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

fn row_len(layout: &Layout, what: &str) -> candle_core::Result<usize> {
    match layout.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => bail!("{what}: expected a non-empty last dimension"),
    }
}

/// The three f32 inputs of a layer-norm kernel and the row length of the first.
fn three_inputs<'a>(
    what: &str,
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
) -> candle_core::Result<([&'a [f32]; 3], usize)> {
    Ok((
        [
            f32_slice(s1, l1, what)?,
            f32_slice(s2, l2, what)?,
            f32_slice(s3, l3, what)?,
        ],
        row_len(l1, what)?,
    ))
}

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
struct SoftmaxBackward;

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
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
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
struct LayerNormBackward {
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

/// A dropout mask: `true` keeps an element (scaled by `scale`), `false` zeroes it.
#[derive(Clone, Debug)]
pub(crate) struct DropoutMask {
    keep: Arc<[bool]>,
    scale: f32,
}

impl DropoutMask {
    /// One draw per element from `rng` in row-major order, kept with probability `1 - p`.
    pub(crate) fn draw(len: usize, p: f32, rng: &mut ChaCha8Rng) -> Self {
        let keep = 1.0 - p;
        Self {
            keep: (0..len).map(|_| rng.random::<f32>() < keep).collect(),
            scale: 1.0 / keep,
        }
    }

    /// The multiplier of a kept (`1 / keep`) or dropped (0) element.
    fn factor(&self, keep: bool) -> f32 {
        if keep { self.scale } else { 0.0 }
    }

    /// The mask as multipliers, for a mask tensor.
    pub(crate) fn factors(&self) -> Vec<f32> {
        self.keep.iter().map(|&k| self.factor(k)).collect()
    }

    fn check(&self, len: usize, what: &str) -> candle_core::Result<()> {
        if self.keep.len() != len {
            bail!("{what}: mask of {} for {len} values", self.keep.len())
        }
        Ok(())
    }
}

/// Inverted dropout with a fixed mask; its backward pass applies the same mask to the
/// gradient. The mask is kept as one byte per element instead of an f32 tensor.
#[derive(Clone, Debug)]
pub(crate) struct Dropout(pub(crate) DropoutMask);

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "taskrel-dropout"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(storage, layout, self.name())?;
        self.0.check(x.len(), self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(self.0.keep.par_chunks(CHUNK)))
            .for_each(|(out, (x, keep))| {
                for ((o, &v), &k) in out.iter_mut().zip(x).zip(keep) {
                    *o = v * self.0.factor(k);
                }
            });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// Elements per parallel chunk of the element-wise kernels.
const CHUNK: usize = 1 << 14;

/// `f(x)` for every element of a contiguous f32 tensor, in parallel chunks.
fn map1(
    what: &str,
    (storage, layout): (&CpuStorage, &Layout),
    f: impl Fn(f32) -> f32 + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    use rayon::prelude::*;
    let x = f32_slice(storage, layout, what)?;
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(out, x)| out.iter_mut().zip(x).for_each(|(o, &v)| *o = f(v)));
    Ok((CpuStorage::F32(y), layout.shape().clone()))
}

/// `f(x, g)` for every element of an input `x` and its gradient `g` (same shape).
fn map2(
    what: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    use rayon::prelude::*;
    let x = f32_slice(s1, l1, what)?;
    let g = f32_slice(s2, l2, what)?;
    if l1.shape() != l2.shape() {
        bail!("{what}: gradient shape differs from the input's")
    }
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(out, (x, g))| {
            for ((o, &v), &gv) in out.iter_mut().zip(x).zip(g) {
                *o = f(v, gv);
            }
        });
    Ok((CpuStorage::F32(y), l1.shape().clone()))
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
fn rows_per_sequence(scores: &Layout, bias: &Layout, what: &str) -> candle_core::Result<usize> {
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
fn biased_softmax(out: &mut [f32], row: &[f32], bias: &[f32]) {
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
struct AttentionProbsBackward(AttentionProbs);

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

/// An element-wise function `f` in one parallel pass, whose backward pass is one parallel
/// pass of `grad(x, g)` (input and incoming gradient).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pointwise {
    name: &'static str,
    f: fn(f32) -> f32,
    grad: PointwiseGrad,
}

#[derive(Clone, Copy, Debug)]
struct PointwiseGrad {
    name: &'static str,
    f: fn(f32, f32) -> f32,
}

impl CustomOp1 for Pointwise {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map1(self.name, (storage, layout), self.f)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.backward(arg, grad_res)?))
    }
}

impl Pointwise {
    /// The gradient at input `arg` given the gradient `grad` of the output.
    pub(crate) fn backward(&self, arg: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        arg.apply_op2_no_bwd(&grad.contiguous()?, &self.grad)
    }
}

impl CustomOp2 for PointwiseGrad {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map2(self.name, (s1, l1), (s2, l2), self.f)
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
fn gelu_erf_grad(a: f32, gv: f32) -> f32 {
    use candle_core::cpu::erf::erf_f32;
    let half = 0.5f64 as f32;
    let coef = 0.398942f64 as f32;
    let inv_sqrt2 = (1. / 2f64.sqrt()) as f32;
    let neg_half_square = -(a * a) * half + 0.0;
    let scaled_exp_arg = (neg_half_square.exp() * coef + 0.0) * a;
    let erf_scaled = erf_f32(a * inv_sqrt2 + 0.0) * half + 0.0;
    gv * ((scaled_exp_arg * 1.0 + half) + erf_scaled)
}

/// ReLU; the backward pass lets the gradient through where `x >= 0` (as candle's `relu`
/// backward does, 0 included).
pub(crate) const RELU: Pointwise = Pointwise {
    name: "taskrel-relu",
    f: |v| v.max(0.0),
    grad: PointwiseGrad {
        name: "taskrel-relu-backward",
        f: relu_grad,
    },
};

/// The gradient through ReLU at input `v` of an incoming gradient `gv`.
fn relu_grad(v: f32, gv: f32) -> f32 {
    gv * if v >= 0.0 { 1.0 } else { 0.0 }
}

/// Runs `f` on the CPU storage of a tensor and its layout.
pub(crate) fn with_storage<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&CpuStorage, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        bail!("{what}: expected a CPU tensor")
    };
    f(cpu, layout)
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_data<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    with_storage(t, what, |cpu, layout| f(f32_slice(cpu, layout, what)?))
}

/// `(b * p, o)` rows plus a per-column `bias (o)`, laid out as `(b, o, p)`: what
/// `y.broadcast_add(bias).reshape((b, p, o)).permute((0, 2, 1)).contiguous()` computes (the
/// same additions), in one parallel pass instead of an addition and a strided copy.
pub(crate) fn add_bias_channels_first(
    y: &Tensor,
    bias: &Tensor,
    b: usize,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let what = "taskrel-bias-channels-first";
    let (rows, o) = y.dims2()?;
    if b == 0 || rows % b != 0 || bias.dims() != [o] {
        bail!(
            "{what}: {rows} x {o} rows, bias {:?}, batch {b}",
            bias.dims()
        )
    }
    let p = rows / b;
    let bias = bias.to_vec1::<f32>()?;
    let out = with_data(y, what, |y| {
        let mut out = vec![0f32; rows * o];
        out.par_chunks_mut(o * p)
            .zip(y.par_chunks(p * o))
            .for_each(|(out, y)| {
                for (q, row) in y.chunks_exact(o).enumerate() {
                    for (c, (&v, &bc)) in row.iter().zip(&bias).enumerate() {
                        out[c * p + q] = v + bc;
                    }
                }
            });
        Ok(out)
    })?;
    Tensor::from_vec(out, (b, o, p), y.device())
}

/// The gradient through ReLU at `pre (b, o, ...)` of `grad` (same shape), laid out as rows
/// `(b * p, o)`: what the ReLU backward kernel followed by `permute` to channels-last and
/// `contiguous` computes (the same products), in one parallel pass.
pub(crate) fn relu_grad_channels_last(pre: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let what = "taskrel-relu-grad-channels-last";
    let dims = pre.dims();
    if dims.len() < 2 || grad.dims() != dims {
        bail!("{what}: input {dims:?}, gradient {:?}", grad.dims())
    }
    let (b, o) = (dims[0], dims[1]);
    let p = pre.elem_count() / (b * o).max(1);
    let grad = grad.contiguous()?;
    let out = with_data(pre, what, |pre| {
        with_data(&grad, what, |grad| {
            let mut out = vec![0f32; pre.len()];
            out.par_chunks_mut(o * p)
                .zip(pre.par_chunks(o * p).zip(grad.par_chunks(o * p)))
                .for_each(|(out, (pre, grad))| {
                    for c in 0..o {
                        for q in 0..p {
                            let i = c * p + q;
                            out[q * o + c] = relu_grad(pre[i], grad[i]);
                        }
                    }
                });
            Ok(out)
        })
    })?;
    Tensor::from_vec(out, (b * p, o), pre.device())
}

/// `y (rows, o) + bias (o)` on every row, as `y.broadcast_add(bias)` adds them; the backward
/// pass hands the gradient to `y` and its column sums ([`column_sums`], the order of candle's
/// `sum_keepdim(0)`) to the bias, without candle's index arithmetic per element.
pub(crate) struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "taskrel-bias-add"
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
        let bias = f32_slice(s2, l2, self.name())?;
        let o = row_len(l1, self.name())?;
        if l1.dims().len() != 2 || l2.dims() != [o] {
            bail!(
                "{}: rows {:?}, bias {:?}",
                self.name(),
                l1.dims(),
                l2.dims()
            )
        }
        let mut out = vec![0f32; y.len()];
        let rows_per_chunk = (CHUNK / o).max(1);
        out.par_chunks_mut(rows_per_chunk * o)
            .zip(y.par_chunks(rows_per_chunk * o))
            .for_each(|(out, y)| {
                for (out, y) in out.chunks_exact_mut(o).zip(y.chunks_exact(o)) {
                    for ((v, &a), &b) in out.iter_mut().zip(y).zip(bias) {
                        *v = a + b;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let bias_grad = column_sums(&grad)?;
        Ok((Some(grad), Some(bias_grad)))
    }
}

/// Column sums of a `(rows, o)` tensor, each added row by row from 0 as candle's
/// `sum_keepdim(0)` adds them, in one pass over contiguous rows.
pub(crate) fn column_sums(g: &Tensor) -> candle_core::Result<Tensor> {
    let (_, o) = g.dims2()?;
    let sums = with_data(g, "taskrel-column-sums", |g| {
        let mut sums = vec![0f32; o];
        for row in g.chunks_exact(o.max(1)) {
            for (s, &v) in sums.iter_mut().zip(row) {
                *s += v;
            }
        }
        Ok(sums)
    })?;
    Tensor::from_vec(sums, o, g.device())
}

/// The patches of a stride-1 `k x k` convolution, `(b, c, h, w) -> (b, oh * ow * c * k * k)`:
/// position `(r, q, ch, i, j)` of image `n`'s row holds pixel `(ch, r + i, q + j)`, so one
/// matrix product with the `(o, c * k * k)` weight convolves the batch. Images are gathered in
/// parallel; the backward pass adds each patch gradient back to its pixels, in patch order,
/// image by image in parallel (the order `index_select`'s backward pass would use).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Unfold {
    pub(crate) k: usize,
}

impl Unfold {
    /// `(c, h, w, oh, ow)` of a `(b, c, h, w)` input.
    fn geometry(&self, layout: &Layout, what: &str) -> candle_core::Result<[usize; 5]> {
        let [_, c, h, w] = layout.dims() else {
            bail!(
                "{what}: expected a (b, c, h, w) input, got {:?}",
                layout.dims()
            )
        };
        if *h < self.k || *w < self.k || self.k == 0 {
            bail!(
                "{what}: a {0}x{0} kernel does not fit {h}x{w} images",
                self.k
            )
        }
        Ok([*c, *h, *w, h + 1 - self.k, w + 1 - self.k])
    }

    /// Calls `f(patch_position, pixel)` for every run of `k` patch values of one image (one
    /// kernel row: patch positions `p..p + k` read pixels `pixel..pixel + k`), in patch order.
    fn for_each_run(&self, [c, h, w, oh, ow]: [usize; 5], mut f: impl FnMut(usize, usize)) {
        let k = self.k;
        let mut p = 0;
        for r in 0..oh {
            for q in 0..ow {
                for ch in 0..c {
                    for i in 0..k {
                        f(p, (ch * h + r + i) * w + q);
                        p += k;
                    }
                }
            }
        }
    }
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "taskrel-unfold"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(storage, layout, self.name())?;
        let g = self.geometry(layout, self.name())?;
        let [c, h, w, oh, ow] = g;
        let (image, cols) = (c * h * w, oh * ow * c * self.k * self.k);
        let b = layout.dims()[0];
        let mut y = vec![0f32; b * cols];
        y.par_chunks_mut(cols)
            .zip(x.par_chunks(image))
            .for_each(|(out, img)| {
                let k = self.k;
                self.for_each_run(g, |p, px| out[p..p + k].copy_from_slice(&img[px..px + k]))
            });
        Ok((CpuStorage::F32(y), Shape::from((b, cols))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.fold(grad_res, arg.dims4()?.into())?))
    }
}

impl Unfold {
    /// The gradient of the `(b, c, h, w) = dims` input from the gradient of the patches.
    pub(crate) fn fold(&self, grad: &Tensor, dims: [usize; 4]) -> candle_core::Result<Tensor> {
        grad.contiguous()?.apply_op1_no_bwd(&Fold {
            unfold: *self,
            dims,
        })
    }
}

/// The backward pass of [`Unfold`]: patch gradients `(b, oh * ow * c * k * k)` summed back
/// onto the `(b, c, h, w)` pixels.
struct Fold {
    unfold: Unfold,
    dims: [usize; 4],
}

impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "taskrel-fold"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let grad = f32_slice(storage, layout, self.name())?;
        let shape = Shape::from(self.dims.to_vec());
        let g = self
            .unfold
            .geometry(&Layout::contiguous(&shape), self.name())?;
        let [c, h, w, oh, ow] = g;
        let (image, cols) = (c * h * w, oh * ow * c * self.unfold.k * self.unfold.k);
        if layout.dims() != [self.dims[0], cols] {
            bail!("{}: gradient of shape {:?}", self.name(), layout.dims())
        }
        let mut dx = vec![0f32; self.dims[0] * image];
        dx.par_chunks_mut(image)
            .zip(grad.par_chunks(cols))
            .for_each(|(out, g_row)| {
                // Each pixel receives its patch gradients in patch order, as before.
                let k = self.unfold.k;
                self.unfold.for_each_run(g, |p, px| {
                    for (o, &v) in out[px..px + k].iter_mut().zip(&g_row[p..p + k]) {
                        *o += v;
                    }
                })
            });
        Ok((CpuStorage::F32(dx), shape))
    }
}

/// 2x2 max pooling of `(b, c, h, w)` (floor on odd sizes), as the maximum over each pair of
/// columns and then over the two row maxima. The backward pass follows candle's backward pass
/// of those two max reductions: the gradient goes to every element equal to its maximum.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaxPool2;

fn pool_dims(layout: &Layout, what: &str) -> candle_core::Result<[usize; 4]> {
    match layout.dims() {
        [b, c, h, w] if *h >= 2 && *w >= 2 => Ok([*b, *c, *h, *w]),
        dims => bail!("{what}: expected (b, c, h, w) with h, w >= 2, got {dims:?}"),
    }
}

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "taskrel-max-pool2"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(storage, layout, self.name())?;
        let [b, c, h, w] = pool_dims(layout, self.name())?;
        let (h2, w2) = (h / 2, w / 2);
        let mut y = vec![0f32; b * c * h2 * w2];
        y.par_chunks_mut(h2 * w2)
            .zip(x.par_chunks(h * w))
            .for_each(|(out, plane)| {
                for r in 0..h2 {
                    for q in 0..w2 {
                        let at = |i: usize, j: usize| plane[(2 * r + i) * w + 2 * q + j];
                        let top = at(0, 0).max(at(0, 1));
                        let bottom = at(1, 0).max(at(1, 1));
                        out[r * w2 + q] = top.max(bottom);
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((b, c, h2, w2))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.backward(arg, grad_res)?))
    }
}

impl MaxPool2 {
    /// The gradient at the pooled input `arg` given the gradient `grad` of the output.
    pub(crate) fn backward(&self, arg: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        arg.apply_op2_no_bwd(&grad.contiguous()?, &MaxPool2Backward)
    }
}

struct MaxPool2Backward;

impl CustomOp2 for MaxPool2Backward {
    fn name(&self) -> &'static str {
        "taskrel-max-pool2-backward"
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
        let g = f32_slice(s2, l2, self.name())?;
        let [b, c, h, w] = pool_dims(l1, self.name())?;
        let (h2, w2) = (h / 2, w / 2);
        if l2.dims() != [b, c, h2, w2] {
            bail!("{}: gradient of shape {:?}", self.name(), l2.dims())
        }
        // `1.0 * g` or `0.0 * g` where an element equals its maximum or not, then added to
        // a zero gradient, once per reduction, as the tensor-op backward pass computes it.
        let pass = |hit: bool, g: f32| 0.0 + (if hit { 1.0 } else { 0.0 }) * g;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(g.par_chunks(h2 * w2)))
            .for_each(|(out, (plane, g))| {
                for r in 0..h2 {
                    for q in 0..w2 {
                        let at = |i: usize, j: usize| plane[(2 * r + i) * w + 2 * q + j];
                        let rows = [at(0, 0).max(at(0, 1)), at(1, 0).max(at(1, 1))];
                        let top = rows[0].max(rows[1]);
                        let gv = g[r * w2 + q];
                        for (i, &row_max) in rows.iter().enumerate() {
                            let g_row = pass(row_max == top, gv);
                            for j in 0..2 {
                                out[(2 * r + i) * w + 2 * q + j] = pass(at(i, j) == row_max, g_row);
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::{D, Device, Tensor, Var};

    fn max_gap(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Deterministic awkward inputs: (rows, d) values spread over several magnitudes.
    fn input(rows: usize, d: usize, scale: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * d)
            .map(|k| scale * (((k * 37 % 101) as f32 - 50.0) / 17.0).sin() * (1.0 + (k % 7) as f32))
            .collect();
        Tensor::from_vec(v, (rows, d), &Device::Cpu).unwrap()
    }

    #[test]
    fn softmax_kernel_matches_tensor_ops_with_gradients() {
        let x = Var::from_tensor(&input(6, 13, 3.0)).unwrap();
        let w = input(6, 13, 1.0);
        let fused = x.as_tensor().apply_op1(super::Softmax).unwrap();
        let ops = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        assert!(max_gap(&fused, &ops) < 1e-6);
        let g1 = (&fused * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&ops * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
        assert!(max_gap(g1, g2) < 1e-5, "{}", max_gap(g1, g2));
    }

    #[test]
    fn layer_norm_kernel_matches_tensor_ops_with_gradients() {
        let x = Var::from_tensor(&input(5, 11, 2.0)).unwrap();
        let weight =
            Var::from_tensor(&(input(1, 11, 0.5).squeeze(0).unwrap() + 1.0).unwrap()).unwrap();
        let bias = Var::from_tensor(&input(1, 11, 0.3).squeeze(0).unwrap()).unwrap();
        let w = input(5, 11, 1.0);
        let kernel = super::LayerNorm { eps: 1e-5 };
        let fused = x
            .as_tensor()
            .apply_op3(weight.as_tensor(), bias.as_tensor(), kernel)
            .unwrap();
        let ops =
            crate::bert::layer_norm_ops(x.as_tensor(), weight.as_tensor(), bias.as_tensor(), 1e-5)
                .unwrap();
        assert!(max_gap(&fused, &ops) < 1e-5);
        let loss = |y: &Tensor| {
            ((y * &w).unwrap().sum_all().unwrap() + y.sqr().unwrap().sum_all().unwrap()).unwrap()
        };
        let g1 = loss(&fused).backward().unwrap();
        let g2 = loss(&ops).backward().unwrap();
        for var in [&x, &weight, &bias] {
            let gap = max_gap(g1.get(var).unwrap(), g2.get(var).unwrap());
            assert!(gap < 1e-4, "gradient gap {gap}");
        }
    }

    /// Gradients of `sum(y * w)` with respect to `x` for two ways of computing `y`.
    fn grads_of(x: &Var, w: &Tensor, y1: &Tensor, y2: &Tensor) -> (Tensor, Tensor) {
        let g = |y: &Tensor| {
            let grads = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
            grads.get(x).unwrap().clone()
        };
        (g(y1), g(y2))
    }

    fn same_bits(a: &Tensor, b: &Tensor) -> bool {
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        a.len() == b.len() && a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits())
    }

    #[test]
    fn bias_add_is_bit_identical_to_broadcast_add() {
        // Enough rows that the sums of the bias gradient round differently in another order.
        let (rows, o) = (3000, 7);
        let y = Var::from_tensor(&input(rows, o, 2.0)).unwrap();
        let bias = Var::from_tensor(&input(1, o, 1.0).squeeze(0).unwrap()).unwrap();
        let fused = y.apply_op2(bias.as_tensor(), super::BiasAdd).unwrap();
        let ops = y.broadcast_add(bias.as_tensor()).unwrap();
        assert!(same_bits(&fused, &ops));
        let w = input(rows, o, 1.0);
        assert!({
            let (g1, g2) = grads_of(&y, &w, &fused, &ops);
            same_bits(&g1, &g2)
        });
        let (g1, g2) = grads_of(&bias, &w, &fused, &ops);
        assert!(same_bits(&g1, &g2));
        // The same sums in reverse row order differ somewhere: the test can see the order.
        let rows_of_w = w.to_vec2::<f32>().unwrap();
        let reversed: Vec<f32> = (0..o)
            .map(|j| rows_of_w.iter().rev().fold(0f32, |acc, row| acc + row[j]))
            .collect();
        assert!(!same_bits(
            &Tensor::new(reversed.as_slice(), &Device::Cpu).unwrap(),
            &g2
        ));
    }

    #[test]
    fn dropout_attention_and_gelu_kernels_are_bit_identical_to_tensor_ops() {
        use rand::SeedableRng;
        let rng = || rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Dropout: the kernel against a multiplication by the mask tensor.
        let x = Var::from_tensor(&input(6, 13, 3.0)).unwrap();
        let w = input(6, 13, 1.0);
        let mask = super::DropoutMask::draw(78, 0.3, &mut rng());
        let fused = x.apply_op1(super::Dropout(mask.clone())).unwrap();
        let factors = Tensor::from_vec(mask.factors(), (6, 13), &Device::Cpu).unwrap();
        let ops = (x.as_tensor() * &factors).unwrap();
        assert!(same_bits(&fused, &ops));
        assert!(mask.factors().contains(&0.0), "the test mask drops nothing");
        let (g1, g2) = grads_of(&x, &w, &fused, &ops);
        assert!(same_bits(&g1, &g2));

        // Attention probabilities: bias, softmax and dropout against the three tensor ops.
        let (n, heads, len) = (2, 3, 5);
        let x = Var::from_tensor(
            &input(n * heads * len, len, 2.0)
                .reshape((n, heads, len, len))
                .unwrap(),
        )
        .unwrap();
        let w = input(n * heads * len, len, 1.0)
            .reshape((n, heads, len, len))
            .unwrap();
        let bias = Tensor::from_vec(
            vec![0f32, 0., 0., -f32::MAX, -f32::MAX, 0., 0., 0., 0., 0.],
            (n, len),
            &Device::Cpu,
        )
        .unwrap();
        for p in [None, Some(0.25)] {
            let mask = p.map(|p| super::DropoutMask::draw(n * heads * len * len, p, &mut rng()));
            let fused = x
                .apply_op2(&bias, super::AttentionProbs { mask: mask.clone() })
                .unwrap();
            let biased = x
                .broadcast_add(&bias.reshape((n, 1, 1, len)).unwrap())
                .unwrap()
                .contiguous()
                .unwrap();
            let mut ops = biased.apply_op1(super::Softmax).unwrap();
            if let Some(mask) = &mask {
                let f = Tensor::from_vec(mask.factors(), ops.shape(), &Device::Cpu).unwrap();
                ops = (ops * f).unwrap();
            }
            assert!(same_bits(&fused, &ops));
            let (g1, g2) = grads_of(&x, &w, &fused, &ops);
            assert!(same_bits(&g1, &g2), "gradient gap {}", max_gap(&g1, &g2));
        }

        // Exact GELU against candle's gelu_erf, values and gradients.
        let x = Var::from_tensor(&input(7, 9, 2.5)).unwrap();
        let w = input(7, 9, 1.0);
        let fused = x.apply_op1(super::GELU_ERF).unwrap();
        let ops = x.gelu_erf().unwrap();
        assert!(same_bits(&fused, &ops));
        let (g1, g2) = grads_of(&x, &w, &fused, &ops);
        assert!(same_bits(&g1, &g2), "gradient gap {}", max_gap(&g1, &g2));
    }

    #[test]
    fn cnn_kernels_are_bit_identical_to_tensor_ops() {
        // Unfold against the gather it replaces, for a (2, 3, 6, 7) batch and a 3x3 kernel.
        let (b, c, h, wd, k) = (2, 3, 6, 7, 3);
        let x =
            Var::from_tensor(&input(b * c, h * wd, 1.5).reshape((b, c, h, wd)).unwrap()).unwrap();
        let (oh, ow) = (h + 1 - k, wd + 1 - k);
        let index = crate::cnn::unfold_index(c, h, wd, k);
        let index = Tensor::new(index.as_slice(), &Device::Cpu).unwrap();
        let fused = x.apply_op1(super::Unfold { k }).unwrap();
        let ops = x
            .reshape((b, c * h * wd))
            .unwrap()
            .index_select(&index, 1)
            .unwrap();
        assert!(same_bits(&fused, &ops));
        let w = input(b, oh * ow * c * k * k, 1.0);
        let (g1, g2) = grads_of(&x, &w, &fused, &ops);
        assert!(same_bits(&g1, &g2));

        // ReLU and 2x2 max pooling (odd width; ties from the ReLU's zeros) against tensor ops.
        let relu_fused = x.apply_op1(super::RELU).unwrap();
        let relu_ops = x.relu().unwrap();
        assert!(same_bits(&relu_fused, &relu_ops));
        let pool_fused = relu_fused.apply_op1(super::MaxPool2).unwrap();
        let pool_ops = relu_ops
            .narrow(3, 0, 6)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, c, 3, 2, 3, 2))
            .unwrap()
            .max(5)
            .unwrap()
            .max(3)
            .unwrap();
        assert!(same_bits(&pool_fused, &pool_ops));
        let w = input(b * c, 9, 1.0).reshape((b, c, 3, 3)).unwrap();
        let (g1, g2) = grads_of(&x, &w, &pool_fused, &pool_ops);
        assert!(same_bits(&g1, &g2));
        let zeros = relu_ops
            .eq(0f32)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<u8>()
            .unwrap();
        assert!(zeros > 8, "no ties to test");
    }
}
