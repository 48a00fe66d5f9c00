//! Encoders for taskrel, built with candle: loading pretrained weights, extracting features,
//! training from scratch and fine-tuning (linear probe or end to end).
//!
//! A [`Model`] is an encoder (inputs -> `(n, d)` features) plus a linear head (features ->
//! `(n, k)` logits), with every weight held in one `VarMap` so that the same object can be
//! evaluated, fine-tuned end to end, and saved as a checkpoint. Two encoder families fill the
//! [`Encoder`] trait: CNNs on images ([`cnn`]: `lenet200` and the pretrained ccexam digit CNNs)
//! and BERT-family transformers on texts ([`text`]).
//!
//! Every model carries a [`ModelSpec`] (modality, input size, channels, normalisation, feature
//! dimension); feeding a dataset of another image size or channel count adapts it
//! ([`preprocess`]) and records what was done, because silently wrong preprocessing is the most
//! common way transferability numbers go wrong.
//!
//! Randomness (initialisation, dropout masks, batch order) comes from ChaCha8 streams seeded
//! by the caller, drawn on the CPU and moved to the device, so a seed gives the same numbers on
//! every run.

pub mod bert;
pub mod cnn;
mod error;
pub mod hub;
mod init;
mod kernels;
mod model;
mod optim;
pub mod preprocess;
mod pth;
mod reference;
mod spec;
pub mod text;
pub mod train;

pub use error::{Error, Result};
pub use model::{Encoder, Inputs, Model};
pub use reference::{LoadOptions, ModelRef, load, random_bert};
pub use spec::{Arch, ImageInput, ModelSpec, TextInput};

/// Parses a device name: `cpu`, `cuda` (GPU 0), `cuda:N`, or `auto` (CUDA when this build
/// and the machine have it, else CPU).
pub fn device(name: &str) -> Result<candle_core::Device> {
    use candle_core::Device;
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        _ => {
            let ordinal = match name.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "unknown device {name:?}, expected cpu, cuda, cuda:N or auto"
                        ))
                    })?,
                None => {
                    return Err(Error::Invalid(format!(
                        "unknown device {name:?}, expected cpu, cuda, cuda:N or auto"
                    )));
                }
            };
            Device::new_cuda(ordinal).map_err(|e| {
                Error::Invalid(format!(
                    "device {name}: {e} (CUDA needs a build with `--features cuda` and an NVIDIA GPU)"
                ))
            })
        }
    }
}
