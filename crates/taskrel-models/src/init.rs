//! Seeded weight initialisation, drawn on the CPU from ChaCha8 so that a seed gives the same
//! weights on every device (candle's own CPU generator cannot be seeded).
//!
//! Rules, by variable name and shape, in sorted name order:
//! - `bias`, `running_mean`: 0; `running_var` and 1-d `weight` (normalisation layers): 1;
//! - weights with 2+ dimensions: PyTorch's default for convolutions and linear layers,
//!   U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in the product of all but the first
//!   dimension; or, for transformers, N(0, 0.02) as BERT's `initializer_range`.

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;

/// How 2+-dimensional weights are drawn.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WeightInit {
    /// PyTorch's default for conv / linear layers.
    FanIn,
    /// N(0, std^2), BERT style.
    Normal(f32),
}

/// Re-draws every variable whose name starts with `prefix` (all when empty).
pub(crate) fn init_vars(
    varmap: &VarMap,
    prefix: &str,
    seed: u64,
    weights: WeightInit,
) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| crate::Error::Invalid("variable map lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().filter(|k| k.starts_with(prefix)).collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let values: Vec<f32> = if leaf == "bias" || leaf == "running_mean" {
            vec![0.0; n]
        } else if leaf == "running_var" || dims.len() == 1 {
            vec![1.0; n]
        } else {
            match weights {
                WeightInit::FanIn => {
                    let fan_in: usize = dims[1..].iter().product();
                    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                }
                WeightInit::Normal(std) => {
                    (0..n).map(|_| std * standard_normal(&mut rng)).collect()
                }
            }
        };
        let t = Tensor::from_vec(values, dims, &Device::Cpu)?
            .to_dtype(var.dtype())?
            .to_device(var.device())?;
        var.set(&t)?;
    }
    Ok(())
}

/// One N(0, 1) draw (Box-Muller).
pub(crate) fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}
