//! The model: an encoder and a linear head over one variable map.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder, VarMap};
use rand_chacha::ChaCha8Rng;
use taskrel_data::Dataset;

use crate::error::{Error, Result};
use crate::init::{WeightInit, init_vars};
use crate::spec::{Arch, ModelSpec};

/// Inputs of an encoder, prepared from a dataset batch.
pub use taskrel_data::Inputs;

/// Turns a batch of dataset samples into `(batch, feature_dim)` features.
///
/// Two implementations: [`crate::cnn::Cnn`] for images and [`crate::text::BertEncoder`] for
/// texts. `train` carries the dropout generator and puts normalisation layers in training mode;
/// `None` evaluates.
pub trait Encoder: std::fmt::Debug + Send + Sync {
    /// The architecture.
    fn arch(&self) -> Arch;
    /// What is done to `data`'s inputs before the network sees them, in one line.
    fn preprocessing(&self, data: &Dataset) -> Result<String>;
    /// Features of the samples at `indices`.
    fn features(
        &self,
        data: &Dataset,
        indices: &[usize],
        train: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor>;
    /// Writes whatever besides the weights a checkpoint needs (the tokenizer of text models).
    fn save_extras(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// Inverted dropout with a mask drawn from `rng` on the CPU (one draw per element, in
/// row-major order). CPU f32 tensors go through [`crate::kernels::Dropout`], which keeps the
/// mask as bytes; other devices multiply by a mask tensor, with the same result.
pub(crate) fn dropout(x: &Tensor, p: f32, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let mask = crate::kernels::DropoutMask::draw(x.elem_count(), p, rng);
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1(crate::kernels::Dropout(mask))?);
    }
    let mask = Tensor::from_vec(mask.factors(), x.shape(), &Device::Cpu)?
        .to_dtype(x.dtype())?
        .to_device(x.device())?;
    Ok((x * mask)?)
}

/// An encoder, an optional classification head, and all their weights.
pub struct Model {
    /// What the model is and expects.
    pub spec: ModelSpec,
    encoder: Box<dyn Encoder>,
    head: Option<Linear>,
    head_prefix: String,
    varmap: VarMap,
    device: Device,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("spec", &self.spec)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// File names inside a checkpoint folder.
pub(crate) const SPEC_FILE: &str = "taskrel.json";
pub(crate) const WEIGHTS_FILE: &str = "model.safetensors";

impl Model {
    /// Builds a model: `make_encoder` creates the encoder's variables through the builder;
    /// a head `feature_dim -> classes` is added when the spec lists classes.
    pub(crate) fn build(
        spec: ModelSpec,
        head_prefix: &str,
        device: &Device,
        make_encoder: impl FnOnce(VarBuilder) -> Result<Box<dyn Encoder>>,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let encoder = make_encoder(vb.clone())?;
        let head = if spec.classes.is_empty() {
            None
        } else {
            Some(candle_nn::linear(
                spec.feature_dim,
                spec.classes.len(),
                vb.pp(head_prefix),
            )?)
        };
        Ok(Self {
            spec,
            encoder,
            head,
            head_prefix: head_prefix.to_string(),
            varmap,
            device: device.clone(),
        })
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How `data` is adapted to this model, in one line.
    pub fn preprocessing(&self, data: &Dataset) -> Result<String> {
        if data.modality() != self.spec.modality {
            return Err(Error::Invalid(format!(
                "{} is a {} model and cannot read a {} dataset",
                self.spec.arch.as_str(),
                self.spec.modality.as_str(),
                data.modality().as_str()
            )));
        }
        self.encoder.preprocessing(data)
    }

    /// `(indices.len(), feature_dim)` features; `train` as in [`Encoder::features`].
    pub fn features(
        &self,
        data: &Dataset,
        indices: &[usize],
        train: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        self.encoder.features(data, indices, train)
    }

    /// Whether the model has a classification head.
    pub fn has_head(&self) -> bool {
        self.head.is_some()
    }

    /// The head's weight `(num_classes, feature_dim)` and bias `(num_classes)`.
    pub fn head_weights(&self) -> Result<(Tensor, Tensor)> {
        let head = self.head.as_ref().ok_or_else(|| {
            Error::Invalid(format!("{} has no classification head", self.spec.origin))
        })?;
        let bias = head
            .bias()
            .cloned()
            .ok_or_else(|| Error::Invalid("the classification head has no bias".into()))?;
        Ok((head.weight().clone(), bias))
    }

    /// Softmax of the head on row-major `(n, d)` features, row-major `(n, num_classes)` in
    /// f64 (computed from the head's weights in f64, as the reference implementations of LEEP
    /// and NCE compute it); `None` without a head.
    pub fn head_probabilities(
        &self,
        values: &[f32],
        n: usize,
        d: usize,
    ) -> Result<Option<Vec<f64>>> {
        if self.head.is_none() {
            return Ok(None);
        }
        let x = Tensor::from_slice(values, (n, d), &self.device)?.to_dtype(DType::F64)?;
        let (w, b) = self.head_weights()?;
        let logits = x
            .matmul(&w.to_dtype(DType::F64)?.t()?)?
            .broadcast_add(&b.to_dtype(DType::F64)?)?;
        let p = candle_nn::ops::softmax_last_dim(&logits)?;
        Ok(Some(p.flatten_all()?.to_vec1::<f64>()?))
    }

    /// `(n, num_classes)` logits of the head on `(n, feature_dim)` features.
    pub fn head_logits(&self, features: &Tensor) -> Result<Tensor> {
        let head = self.head.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "{} has no classification head; fine-tune it on a labelled dataset first",
                self.spec.origin
            ))
        })?;
        Ok(head.forward(features)?)
    }

    /// Replaces the head by a freshly initialised one for `classes`.
    pub fn reset_head(&mut self, classes: Vec<String>, seed: u64) -> Result<()> {
        let prefix = format!("{}.", self.head_prefix);
        self.lock_vars()?
            .retain(|name, _| !name.starts_with(&prefix));
        let vb = VarBuilder::from_varmap(&self.varmap, DType::F32, &self.device);
        self.head = Some(candle_nn::linear(
            self.spec.feature_dim,
            classes.len(),
            vb.pp(&self.head_prefix),
        )?);
        init_vars(&self.varmap, &prefix, seed, WeightInit::FanIn)?;
        self.spec.classes = classes;
        Ok(())
    }

    /// Re-draws every weight (training from scratch).
    pub fn reinitialize(&mut self, seed: u64) -> Result<()> {
        let weights = if self.spec.arch == Arch::Bert {
            WeightInit::Normal(0.02)
        } else {
            WeightInit::FanIn
        };
        init_vars(&self.varmap, "", seed, weights)
    }

    fn lock_vars(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, std::collections::HashMap<String, Var>>> {
        self.varmap
            .data()
            .lock()
            .map_err(|_| Error::Invalid("variable map lock poisoned".into()))
    }

    /// Trainable variables sorted by name, as `(encoder, head)`.
    pub fn vars(&self) -> Result<(Vec<Var>, Vec<Var>)> {
        let prefix = format!("{}.", self.head_prefix);
        let vars = self.lock_vars()?;
        let mut named: Vec<(&String, &Var)> = vars
            .iter()
            .filter(|(name, _)| !(name.ends_with("running_mean") || name.ends_with("running_var")))
            .collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let (head, encoder): (Vec<_>, Vec<_>) = named
            .into_iter()
            .partition(|(name, _)| name.starts_with(&prefix));
        Ok((
            encoder.into_iter().map(|(_, v)| v.clone()).collect(),
            head.into_iter().map(|(_, v)| v.clone()).collect(),
        ))
    }

    /// Copies weights into the model's variables by name. `rename` maps a file name to a
    /// variable name (or `None` to skip it). Every variable outside the head must receive a
    /// weight of the right shape; head weights are taken when present.
    pub(crate) fn assign(
        &self,
        source: &Path,
        tensors: Vec<(String, Tensor)>,
        rename: impl Fn(&str) -> Option<String>,
    ) -> Result<()> {
        let vars = self.lock_vars()?;
        let mut filled = std::collections::HashSet::new();
        for (name, tensor) in tensors {
            let Some(name) = rename(&name) else { continue };
            let Some(var) = vars.get(&name) else { continue };
            if var.dims() != tensor.dims() {
                return Err(Error::file(
                    source,
                    format!(
                        "tensor {name}: expected shape {:?}, found {:?}",
                        var.dims(),
                        tensor.dims()
                    ),
                ));
            }
            var.set(&tensor.to_dtype(DType::F32)?.to_device(&self.device)?)?;
            filled.insert(name);
        }
        let prefix = format!("{}.", self.head_prefix);
        let mut missing: Vec<&String> = vars
            .keys()
            .filter(|k| !filled.contains(*k) && !k.starts_with(&prefix))
            .collect();
        if !missing.is_empty() {
            missing.sort();
            let shown: Vec<&str> = missing.iter().take(5).map(|s| s.as_str()).collect();
            return Err(Error::file(
                source,
                format!(
                    "{} weights missing for {}, e.g. {}",
                    missing.len(),
                    self.spec.arch.as_str(),
                    shown.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Writes `model.safetensors` and `taskrel.json` (and the tokenizer for text models) into
    /// `dir`, creating it. Files are written beside and renamed into place, so an interrupted
    /// save leaves any previous checkpoint intact.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e.to_string()))?;
        let tmp = dir.join(format!("{WEIGHTS_FILE}.tmp"));
        // Serialised here and written with `fs::write`, so that the file gets the user's
        // umask like every other output (safetensors' own writer creates it mode 0600).
        let bytes = {
            let vars = self.lock_vars()?;
            let tensors: std::collections::BTreeMap<&str, &Tensor> = vars
                .iter()
                .map(|(name, var)| (name.as_str(), var.as_tensor()))
                .collect();
            safetensors::serialize(tensors, None).map_err(|e| Error::file(&tmp, e.to_string()))?
        };
        if let Err(e) = std::fs::write(&tmp, bytes) {
            // Nothing partial is left behind (the disk may be full).
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::file(&tmp, e.to_string()));
        }
        std::fs::rename(&tmp, dir.join(WEIGHTS_FILE))
            .map_err(|e| Error::file(dir, e.to_string()))?;
        self.encoder.save_extras(dir)?;
        let json = serde_json::to_string_pretty(&self.spec)
            .map_err(|e| Error::file(dir, e.to_string()))?;
        let tmp = dir.join(format!("{SPEC_FILE}.tmp"));
        std::fs::write(&tmp, json).map_err(|e| Error::file(&tmp, e.to_string()))?;
        std::fs::rename(&tmp, dir.join(SPEC_FILE)).map_err(|e| Error::file(dir, e.to_string()))?;
        Ok(())
    }

    /// Loads every variable from a safetensors file written by [`Model::save`].
    pub(crate) fn load_weights(&self, path: &Path) -> Result<()> {
        let tensors = candle_core::safetensors::load(path, &self.device)
            .map_err(|e| Error::file(path, format!("not a safetensors file ({e})")))?;
        let n = self.lock_vars()?.len();
        if tensors.len() != n {
            return Err(Error::file(
                path,
                format!("expected {n} tensors, found {}", tensors.len()),
            ));
        }
        self.assign(path, tensors.into_iter().collect(), |n| Some(n.to_string()))
    }
}
