//! Turning u8 images into model input tensors: size adaptation, channel adaptation, scaling
//! to [0, 1] and per-channel normalisation, with a description of what was done that every
//! output records.
//!
//! Resizing is separable bilinear (triangle-filter) resampling with PIL's conventions: pixel
//! centres at half-integers and, when shrinking, a filter widened by the scale factor so that
//! downsampling averages instead of aliasing. This is what torchvision's `Resize` does on PIL
//! images, the pipeline the ccexam CNNs were trained with.

use candle_core::{Device, Tensor};
use taskrel_data::Images;

use crate::error::Result;
use crate::spec::ImageInput;

/// How a dataset's images are adapted to a model's input, computed once per dataset.
#[derive(Clone, Debug)]
pub struct ImagePlan {
    from: (usize, usize, usize),
    input: ImageInput,
    rows: Vec<(usize, Vec<f32>)>,
    cols: Vec<(usize, Vec<f32>)>,
}

/// For each output position, the first input index and the weights of the inputs from there.
fn resample_weights(in_size: usize, out_size: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale; // bilinear: radius 1 in output units
    (0..out_size)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = ((center - support).floor().max(0.0)) as usize;
            let hi = (((center + support).ceil()) as usize).min(in_size);
            let mut weights: Vec<f64> = (lo..hi)
                .map(|j| (1.0 - ((j as f64 + 0.5 - center) / filter_scale).abs()).max(0.0))
                .collect();
            let total: f64 = weights.iter().sum();
            for w in &mut weights {
                *w /= total;
            }
            (lo, weights.into_iter().map(|w| w as f32).collect())
        })
        .collect()
}

impl ImagePlan {
    /// Plans the adaptation of `images` to `input`.
    pub fn new(images: &Images, input: &ImageInput) -> Self {
        let identity = images.height == input.height && images.width == input.width;
        let (rows, cols) = if identity {
            (Vec::new(), Vec::new())
        } else {
            (
                resample_weights(images.height, input.height),
                resample_weights(images.width, input.width),
            )
        };
        Self {
            from: (images.channels, images.height, images.width),
            input: input.clone(),
            rows,
            cols,
        }
    }

    /// One line saying what happens to each image, for logs and result files.
    pub fn describe(&self) -> String {
        let (c, h, w) = self.from;
        let i = &self.input;
        let mut steps = vec![format!("u8 {c}x{h}x{w}")];
        if (h, w) != (i.height, i.width) {
            steps.push(format!("bilinear resize to {}x{}", i.height, i.width));
        }
        if c != i.channels {
            steps.push(if c == 1 {
                format!("grey replicated to {} channels", i.channels)
            } else {
                format!("{c} channels averaged to grey")
            });
        }
        steps.push(format!(
            "/255, normalised mean {:?} std {:?}",
            i.mean, i.std
        ));
        steps.join(" -> ")
    }

    /// The model input `(indices.len(), channels, height, width)` f32 for the given images.
    pub fn batch(&self, images: &Images, indices: &[usize], device: &Device) -> Result<Tensor> {
        let i = &self.input;
        let plane = i.height * i.width;
        let mut out = Vec::with_capacity(indices.len() * i.channels * plane);
        let mut grey = vec![0f32; images.height * images.width];
        let mut tmp = vec![0f32; images.height * i.width];
        let mut resized = vec![0f32; plane];
        for &k in indices {
            let image = images.image(k);
            // Channel adaptation first, on the small source image.
            let source_planes: Vec<&[u8]> =
                image.chunks_exact(images.height * images.width).collect();
            let mut planes: Vec<Vec<f32>> = Vec::with_capacity(i.channels);
            if images.channels == i.channels {
                planes.extend(
                    source_planes
                        .iter()
                        .map(|p| p.iter().map(|&v| f32::from(v) / 255.0).collect()),
                );
            } else {
                for (g, px) in grey.iter_mut().enumerate() {
                    let sum: f32 = source_planes.iter().map(|p| f32::from(p[g])).sum();
                    *px = sum / (255.0 * source_planes.len() as f32);
                }
                planes.extend(std::iter::repeat_n(grey.clone(), i.channels));
            }
            for (ch, plane_in) in planes.iter().enumerate() {
                let src: &[f32] = if self.rows.is_empty() {
                    plane_in
                } else {
                    self.resize(plane_in, images.width, &mut tmp, &mut resized);
                    &resized
                };
                let (mean, std) = (i.mean[ch % i.mean.len()], i.std[ch % i.std.len()]);
                out.extend(src.iter().map(|&v| (v - mean) / std));
            }
        }
        Ok(Tensor::from_vec(
            out,
            (indices.len(), i.channels, i.height, i.width),
            device,
        )?)
    }

    fn resize(&self, src: &[f32], src_width: usize, tmp: &mut [f32], dst: &mut [f32]) {
        let out_w = self.cols.len();
        let src_h = src.len() / src_width;
        for r in 0..src_h {
            let row = &src[r * src_width..(r + 1) * src_width];
            for (c, (lo, w)) in self.cols.iter().enumerate() {
                tmp[r * out_w + c] = w.iter().zip(&row[*lo..]).map(|(a, b)| a * b).sum();
            }
        }
        for (r, (lo, w)) in self.rows.iter().enumerate() {
            for c in 0..out_w {
                dst[r * out_w + c] = w
                    .iter()
                    .enumerate()
                    .map(|(k, a)| a * tmp[(lo + k) * out_w + c])
                    .sum();
            }
        }
    }
}
