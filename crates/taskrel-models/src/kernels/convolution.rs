//! Kernels of the CNNs: unfold and fold for a stride-1 convolution, the fused convolution +
//! ReLU (+ 2x2 max pooling) op, ReLU, max pooling and the channel-layout helpers of their
//! backward passes.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, bail};

use super::*;
use candle_nn::Conv2d;

use crate::error::{Error, Result};

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
pub(super) fn relu_grad(v: f32, gv: f32) -> f32 {
    gv * if v >= 0.0 { 1.0 } else { 0.0 }
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
pub(super) struct Fold {
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

pub(super) fn pool_dims(layout: &Layout, what: &str) -> candle_core::Result<[usize; 4]> {
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

pub(super) struct MaxPool2Backward;

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

/// A convolution and the ReLU after it, for training on the CPU: the values of
/// [`conv_unfold`] followed by the ReLU kernel, computed outside the autograd graph and
/// attached to it as one op on `(input, weight, bias)` whose backward pass makes the same
/// tensor calls as candle's backward pass through those operations would (so every gradient is
/// the same, bit for bit; a test checks it).
///
/// candle adds each node's gradient to a fresh zero tensor: through the bias, the permute, the
/// copy and the ReLU that is six passes over the activations, and it also computes the gradient
/// of the unfolded patches of the network's input, which nothing needs. Here only the
/// gradients of the arguments are formed, and the input's only when the input needs one.
///
/// With `pool`, the 2x2 max pooling after the ReLU joins the op too.
pub(crate) fn conv_relu(x: &Tensor, conv: &Conv2d, padding: usize, pool: bool) -> Result<Tensor> {
    let w = conv.weight();
    let bias = conv
        .bias()
        .ok_or_else(|| Error::Invalid("conv_relu: the convolution has no bias".into()))?;
    let (o, c, k, _) = w.dims4()?;
    let x = pad(x, padding)?;
    let (b, _, h, wd) = x.dims4()?;
    let (oh, ow) = (h + 1 - k, wd + 1 - k);
    let unfold = Unfold { k };
    let cols = x
        .detach()
        .contiguous()?
        .apply_op1_no_bwd(&unfold)?
        .reshape((b * oh * ow, c * k * k))?;
    let wt = w.detach().reshape((o, c * k * k))?.t()?;
    let pre =
        add_bias_channels_first(&cols.matmul(&wt)?, &bias.detach(), b)?.reshape((b, o, oh, ow))?;
    let activation = if pool {
        Some(pre.apply_op1_no_bwd(&RELU)?)
    } else {
        None
    };
    Ok(x.apply_op3(
        w,
        bias,
        ConvRelu {
            unfold,
            input: [b, c, h, wd],
            cols,
            wt,
            pre,
            activation,
        },
    )?)
}

/// `relu(conv(input, weight) + bias)`, max-pooled when `activation` is kept, with its
/// pre-activation and operands kept for the backward pass.
struct ConvRelu {
    unfold: Unfold,
    input: [usize; 4],
    /// The unfolded input `(b * oh * ow, c * k * k)`.
    cols: Tensor,
    /// The weight as `(c * k * k, o)`, a transposed view.
    wt: Tensor,
    /// The pre-activation `(b, o, oh, ow)`, contiguous.
    pre: Tensor,
    /// With pooling, the ReLU's output (the pooling's input).
    activation: Option<Tensor>,
}

impl candle_core::CustomOp3 for ConvRelu {
    fn name(&self) -> &'static str {
        "taskrel-conv-relu"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CustomOp1 as _;
        let input = self.activation.as_ref().unwrap_or(&self.pre);
        with_storage(input, self.name(), |input, layout| match self.activation {
            Some(_) => MaxPool2.cpu_fwd(input, layout),
            None => RELU.cpu_fwd(input, layout),
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Through the pooling if any and the ReLU, then back through permute (0, 3, 1, 2)
        // and the reshape.
        let (b, _, oh, ow) = self.pre.dims4()?;
        let grad = match &self.activation {
            Some(activation) => MaxPool2.backward(activation, grad)?,
            None => grad.clone(),
        };
        let g = relu_grad_channels_last(&self.pre, &grad)?;
        // The bias was broadcast over the rows; the matrix product's two gradients as candle
        // forms them (`grad rhs^T` and `lhs^T grad`).
        let grad_bias = column_sums(&g)?;
        let grad_w = self.cols.t()?.matmul(&g)?.t()?.reshape(w.dims())?;
        let grad_x = if x.track_op() {
            let patches = g
                .matmul(&self.wt.t()?)?
                .reshape((b, self.cols.dim(1)? * oh * ow))?;
            Some(self.unfold.fold(&patches, self.input)?)
        } else {
            None
        };
        Ok((grad_x, Some(grad_w), Some(grad_bias)))
    }
}

pub(crate) fn pad(x: &Tensor, padding: usize) -> candle_core::Result<Tensor> {
    if padding > 0 {
        x.pad_with_zeros(2, padding, padding)?
            .pad_with_zeros(3, padding, padding)
    } else {
        Ok(x.clone())
    }
}
