//! CPU kernels with a backward pass, for training BERT and the CNNs: [`attention`] (softmax,
//! layer norm, attention probabilities, exact GELU) and [`convolution`] (unfold/fold, the fused
//! convolution + ReLU (+ pooling), ReLU, max pooling); shared here: storage access, dropout,
//! element-wise ops and the linear layers' bias add.
//!
//! candle's fused softmax and layer norm record no backward pass, and the same functions
//! written with tensor ops take many passes over the attention scores (and keep each
//! intermediate alive for the backward pass). These are single-pass kernels over rows of the
//! last dimension, for contiguous f32 tensors on the CPU, whose backward pass is one more
//! kernel. Other devices and types use the tensor-op versions in [`crate::bert`].

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, bail};
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

pub(crate) mod attention;
pub(crate) mod convolution;

pub(crate) use attention::{AttentionProbs, GELU_ERF, LayerNorm, Softmax};
pub(crate) use convolution::{MaxPool2, RELU, Unfold};

/// Whether the fast paths of these kernels apply: a contiguous-able f32 tensor on the CPU
/// (other devices and types take the tensor-op versions).
pub(crate) fn on_cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
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
pub(super) const CHUNK: usize = 1 << 14;

/// `f(x)` for every element of a contiguous f32 tensor, in parallel chunks.
pub(super) fn map1(
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
pub(super) fn map2(
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

/// An element-wise function `f` in one parallel pass, whose backward pass is one parallel
/// pass of `grad(x, g)` (input and incoming gradient).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pointwise {
    name: &'static str,
    f: fn(f32) -> f32,
    grad: PointwiseGrad,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct PointwiseGrad {
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
pub(super) fn with_data<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    with_storage(t, what, |cpu, layout| f(f32_slice(cpu, layout, what)?))
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
