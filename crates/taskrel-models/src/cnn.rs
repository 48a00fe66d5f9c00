//! Image encoders: `lenet200` and the three pretrained ccexam digit CNNs, as sequences of
//! layers whose weight names follow the PyTorch modules they come from (so `.pth` files load
//! by name).
//!
//! Features are the penultimate layer (after its ReLU); the head is the last linear layer.

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig, Linear, VarBuilder};
use rand_chacha::ChaCha8Rng;
use taskrel_data::{Dataset, Modality};

use crate::error::{Error, Result};
use crate::kernels::convolution::{conv_relu, pad};
use crate::kernels::on_cpu_f32;
use crate::model::{Encoder, dropout};
use crate::preprocess::ImagePlan;
use crate::spec::{Arch, ImageInput, ModelSpec};

#[derive(Debug)]
enum Layer {
    Conv(Conv2d, usize),
    Norm(BatchNorm),
    Relu,
    MaxPool2,
    Dropout(f32),
    Flatten,
    Dense(Linear),
}

/// A CNN encoder: a sequence of layers from image tensor to `(n, feature_dim)` features.
#[derive(Debug)]
pub struct Cnn {
    arch: Arch,
    input: ImageInput,
    layers: Vec<Layer>,
}

/// The fixed properties of an image architecture.
pub(crate) struct ImageArch {
    pub input: ImageInput,
    pub feature_dim: usize,
    /// Variable prefix of the classification head.
    pub head: &'static str,
}

pub(crate) fn image_arch(arch: Arch) -> Option<ImageArch> {
    let grey = |size, mean, std| ImageInput {
        channels: 1,
        height: size,
        width: size,
        mean: vec![mean],
        std: vec![std],
    };
    Some(match arch {
        Arch::Lenet200 => ImageArch {
            input: grey(28, 0.5, 0.5),
            feature_dim: 200,
            head: "head",
        },
        Arch::CcexamMnist => ImageArch {
            input: grey(28, 0.1307, 0.3081),
            feature_dim: 128,
            head: "classifier.2",
        },
        Arch::CcexamUsps => ImageArch {
            input: grey(16, 0.2471, 0.2994),
            feature_dim: 128,
            head: "classifier.4",
        },
        Arch::CcexamSvhn => ImageArch {
            input: ImageInput {
                channels: 3,
                height: 32,
                width: 32,
                mean: vec![0.4377, 0.4438, 0.4728],
                std: vec![0.1980, 0.2010, 0.1970],
            },
            feature_dim: 256,
            head: "classifier.4",
        },
        Arch::Bert => return None,
    })
}

fn conv(cin: usize, cout: usize, k: usize, padding: usize, vb: VarBuilder) -> Result<Layer> {
    let cfg = Conv2dConfig {
        padding,
        ..Default::default()
    };
    Ok(Layer::Conv(
        candle_nn::conv2d(cin, cout, k, cfg, vb)?,
        padding,
    ))
}

fn norm(c: usize, vb: VarBuilder) -> Result<Layer> {
    // PyTorch's BatchNorm2d defaults, which the ccexam weights were trained with.
    let cfg = BatchNormConfig {
        eps: 1e-5,
        remove_mean: true,
        affine: true,
        momentum: 0.1,
    };
    Ok(Layer::Norm(candle_nn::batch_norm(c, cfg, vb)?))
}

fn dense(cin: usize, cout: usize, vb: VarBuilder) -> Result<Layer> {
    Ok(Layer::Dense(candle_nn::linear(cin, cout, vb)?))
}

impl Cnn {
    /// Builds the encoder of `arch` with variables from `vb` (created or looked up by name).
    pub fn new(arch: Arch, vb: VarBuilder) -> Result<Self> {
        let input = image_arch(arch)
            .ok_or_else(|| {
                Error::Invalid(format!("{} is not an image architecture", arch.as_str()))
            })?
            .input;
        use Layer::{Dropout, Flatten, MaxPool2, Relu};
        let f = vb.pp("features");
        let c = vb.pp("classifier");
        let layers = match arch {
            Arch::Lenet200 => vec![
                conv(1, 20, 5, 0, vb.pp("conv1"))?,
                Relu,
                MaxPool2,
                conv(20, 50, 5, 0, vb.pp("conv2"))?,
                Relu,
                MaxPool2,
                Dropout(0.5),
                Flatten,
                dense(50 * 4 * 4, 200, vb.pp("fc"))?,
                Relu,
                Dropout(0.5),
            ],
            Arch::CcexamMnist => vec![
                conv(1, 32, 3, 1, f.pp(0))?,
                Relu,
                MaxPool2,
                conv(32, 64, 3, 1, f.pp(3))?,
                Relu,
                MaxPool2,
                Flatten,
                dense(64 * 7 * 7, 128, c.pp(0))?,
                Relu,
            ],
            Arch::CcexamUsps => vec![
                conv(1, 32, 3, 1, f.pp(0))?,
                norm(32, f.pp(1))?,
                Relu,
                MaxPool2,
                conv(32, 64, 3, 1, f.pp(4))?,
                norm(64, f.pp(5))?,
                Relu,
                MaxPool2,
                Flatten,
                Dropout(0.3),
                dense(64 * 4 * 4, 128, c.pp(1))?,
                Relu,
                Dropout(0.3),
            ],
            Arch::CcexamSvhn => {
                let mut layers = Vec::new();
                for (b, (cin, cout)) in [(3, 32), (32, 64), (64, 128)].into_iter().enumerate() {
                    let block = f.pp(b);
                    layers.extend([
                        conv(cin, cout, 3, 1, block.pp(0))?,
                        norm(cout, block.pp(1))?,
                        Relu,
                    ]);
                    layers.extend([
                        conv(cout, cout, 3, 1, block.pp(3))?,
                        norm(cout, block.pp(4))?,
                        Relu,
                        MaxPool2,
                    ]);
                }
                layers.extend([
                    Flatten,
                    Dropout(0.3),
                    dense(128 * 4 * 4, 256, c.pp(1))?,
                    Relu,
                    Dropout(0.3),
                ]);
                layers
            }
            Arch::Bert => unreachable!("rejected by image_arch above"),
        };
        Ok(Self {
            arch,
            input,
            layers,
        })
    }

    /// Runs the layers on a preprocessed batch `(n, c, h, w)`; `train` holds the dropout RNG
    /// and switches BatchNorm to batch statistics.
    pub fn forward(&self, x: &Tensor, train: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        self.forward_with(x, train, true)
    }

    /// [`Cnn::forward`]; `fuse` lets a training pass on the CPU run each convolution with a
    /// bias, its ReLU and a max pooling after it as one op ([`conv_relu`]; same values and
    /// gradients, fewer passes).
    fn forward_with(
        &self,
        x: &Tensor,
        mut train: Option<&mut ChaCha8Rng>,
        fuse: bool,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        let mut layers = self.layers.iter().peekable();
        while let Some(layer) = layers.next() {
            x = match layer {
                Layer::Conv(c, padding)
                    if fuse
                        && train.is_some()
                        && on_cpu_f32(&x)
                        && c.bias().is_some()
                        && matches!(layers.peek(), Some(Layer::Relu)) =>
                {
                    layers.next();
                    let pool = matches!(layers.peek(), Some(Layer::MaxPool2));
                    if pool {
                        layers.next();
                    }
                    conv_relu(&x, c, *padding, pool)?
                }
                Layer::Conv(c, padding) => conv_unfold(&x, c, *padding)?,
                Layer::Norm(n) => n.forward_t(&x, train.is_some())?,
                Layer::Relu if on_cpu_f32(&x) => x.contiguous()?.apply_op1(crate::kernels::RELU)?,
                Layer::Relu => x.relu()?,
                Layer::MaxPool2 if on_cpu_f32(&x) => {
                    x.contiguous()?.apply_op1(crate::kernels::MaxPool2)?
                }
                Layer::MaxPool2 => max_pool2(&x)?,
                Layer::Dropout(p) => match train.as_deref_mut() {
                    Some(rng) => dropout(&x, *p, rng)?,
                    None => x,
                },
                Layer::Flatten => x.flatten_from(1)?,
                Layer::Dense(l) => l.forward(&x)?,
            };
        }
        Ok(x)
    }
}

/// A stride-1 convolution as one gather (unfold) and one matrix product,
/// `(b, c, h, w) -> (b, o, h', w')`.
///
/// candle's `conv2d` back-propagates into its input with a direct transposed convolution, and
/// does so even for the network's input: that made a `lenet200` training step about 11x slower
/// than PyTorch's here. As a gather plus a matrix product, the backward pass is a scatter-add
/// and matrix products.
fn conv_unfold(x: &Tensor, conv: &Conv2d, padding: usize) -> Result<Tensor> {
    let w = conv.weight();
    let (o, c, k, _) = w.dims4()?;
    let x = pad(x, padding)?;
    let (b, _, h, wd) = x.dims4()?;
    let (oh, ow) = (h + 1 - k, wd + 1 - k);
    let cols = if on_cpu_f32(&x) {
        x.contiguous()?.apply_op1(crate::kernels::Unfold { k })?
    } else {
        // Row (n, r, q), column (ch, i, j) of the unfolded batch reads pixel
        // (ch, r + i, q + j) of image n, as in the CPU kernel.
        let index = unfold_index(c, h, wd, k);
        let index = Tensor::from_vec(index, oh * ow * c * k * k, x.device())?;
        x.contiguous()?
            .reshape((b, c * h * wd))?
            .index_select(&index, 1)?
    };
    // The column order matches the (o, c, k, k) weight layout, so one matrix product with the
    // weight convolves the whole batch; the bias is added before the layout turns to NCHW.
    let y = cols
        .reshape((b * oh * ow, c * k * k))?
        .matmul(&w.reshape((o, c * k * k))?.t()?)?;
    let y = match conv.bias() {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    };
    Ok(y.reshape((b, oh, ow, o))?.permute((0, 3, 1, 2))?)
}

/// Pixel of each unfolded column, `(r, q, ch, i, j) -> (ch, r + i, q + j)` of a `(c, h, w)`
/// image, for a stride-1 `k x k` kernel.
pub(crate) fn unfold_index(c: usize, h: usize, w: usize, k: usize) -> Vec<u32> {
    let (oh, ow) = (h + 1 - k, w + 1 - k);
    let mut index = Vec::with_capacity(oh * ow * c * k * k);
    for r in 0..oh {
        for q in 0..ow {
            for ch in 0..c {
                for i in 0..k {
                    for j in 0..k {
                        index.push(((ch * h + r + i) * w + q + j) as u32);
                    }
                }
            }
        }
    }
    index
}

/// 2x2 max pooling (floor on odd sizes) as a reshape and two reductions, whose backward pass
/// is element-wise (candle's `max_pool2d` backward goes through a nearest upsampling and a
/// comparison of the whole input).
fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    let x = if h % 2 == 1 || w % 2 == 1 {
        x.narrow(2, 0, 2 * h2)?.narrow(3, 0, 2 * w2)?
    } else {
        x.clone()
    };
    Ok(x.contiguous()?
        .reshape((b, c, h2, 2, w2, 2))?
        .max(5)?
        .max(3)?)
}

impl Encoder for Cnn {
    fn arch(&self) -> Arch {
        self.arch
    }

    fn preprocessing(&self, data: &Dataset) -> Result<String> {
        let images = image_input(data, self.arch)?;
        Ok(ImagePlan::new(images, &self.input).describe())
    }

    fn features(
        &self,
        data: &Dataset,
        indices: &[usize],
        train: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let images = image_input(data, self.arch)?;
        let device = self.device();
        let x = ImagePlan::new(images, &self.input).batch(images, indices, &device)?;
        self.forward(&x, train)
    }
}

impl Cnn {
    fn device(&self) -> candle_core::Device {
        self.layers
            .iter()
            .find_map(|l| match l {
                Layer::Conv(c, _) => Some(c.weight().device().clone()),
                _ => None,
            })
            .unwrap_or(candle_core::Device::Cpu)
    }
}

fn image_input(data: &Dataset, arch: Arch) -> Result<&taskrel_data::Images> {
    data.images().ok_or_else(|| {
        Error::Invalid(format!(
            "{} is an image model and cannot read a {} dataset",
            arch.as_str(),
            Modality::Text.as_str()
        ))
    })
}

/// The spec of a CNN with the given classes and origin.
pub(crate) fn spec(arch: Arch, classes: Vec<String>, origin: String) -> Result<ModelSpec> {
    let a = image_arch(arch)
        .ok_or_else(|| Error::Invalid(format!("{} is not an image architecture", arch.as_str())))?;
    Ok(ModelSpec {
        arch,
        modality: Modality::Image,
        image: Some(a.input),
        text: None,
        bert: None,
        feature_dim: a.feature_dim,
        classes,
        origin,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarMap;
    use rand::SeedableRng;

    use super::*;

    /// The output and every weight's gradient of one training pass, as bits, by weight name.
    fn pass(net: &Cnn, vars: &VarMap, x: &Tensor, fuse: bool) -> Result<Vec<(String, Vec<u32>)>> {
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f32::to_bits)
                .collect())
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let y = net.forward_with(x, Some(&mut rng), fuse)?;
        let grads = y.sqr()?.sum_all()?.backward()?;
        let mut out = vec![("output".to_string(), bits(&y)?)];
        let data = vars
            .data()
            .lock()
            .map_err(|_| Error::Invalid("var map lock".into()))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let grad = grads
                .get(data[name].as_tensor())
                .ok_or_else(|| Error::Invalid(format!("no gradient for {name}")))?;
            out.push((name.clone(), bits(grad)?));
        }
        Ok(out)
    }

    #[test]
    fn fused_conv_relu_gives_the_same_values_and_gradients() -> Result<()> {
        let vars = VarMap::new();
        let net = Cnn::new(
            Arch::Lenet200,
            VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
        )?;
        let values = (0..6 * 28 * 28).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0);
        let x = Tensor::from_iter(values, &Device::Cpu)?.reshape((6, 1, 28, 28))?;
        let (fused, plain) = (pass(&net, &vars, &x, true)?, pass(&net, &vars, &x, false)?);
        assert_eq!(fused.len(), plain.len());
        // Both convolutions and the dense layer: weights and biases, and the output.
        assert_eq!(fused.len(), 7);
        for ((name, a), (_, b)) in fused.iter().zip(&plain) {
            assert!(a == b, "{name} differs");
            assert!(a.iter().any(|&v| v != 0), "{name} is all zeros");
        }
        Ok(())
    }
}
