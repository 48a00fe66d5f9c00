//! AdamW with the update of candle-nn's `AdamW`, fused into three in-place passes over each
//! parameter on the CPU.
//!
//! candle-nn writes the update as fourteen tensor operations per parameter, each a pass over
//! memory and a fresh buffer: for MiniLM's 22.7 million weights that is over a gigabyte of
//! traffic a step. Here the first moment, the second moment and the parameter are updated in
//! place, element by element, with the same f32 operations in the same order (candle's
//! `x * c` is `x * c + 0`, its `x + c` is `x * 1 + c`, both with `c` rounded to f32), so the
//! parameters after every step are bit for bit candle-nn's (a test checks this). Parameters
//! on other devices or of other types are left to candle-nn's `AdamW`.

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Var, bail};
use candle_nn::{Optimizer as _, ParamsAdamW};

struct Slot {
    var: Var,
    m: Var,
    v: Var,
}

pub(crate) struct AdamW {
    /// Contiguous f32 parameters on the CPU, updated by the fused passes.
    slots: Vec<Slot>,
    /// Every other parameter, updated by candle-nn's `AdamW` itself.
    rest: candle_nn::AdamW,
    params: ParamsAdamW,
    step_t: i32,
}

impl AdamW {
    pub(crate) fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let (fused, rest): (Vec<Var>, Vec<Var>) = vars
            .into_iter()
            .filter(|var| var.dtype().is_float())
            .partition(|var| {
                var.device().is_cpu() && var.dtype() == DType::F32 && var.is_contiguous()
            });
        let slots = fused
            .into_iter()
            .map(|var| {
                let m = Var::zeros(var.shape(), var.dtype(), var.device())?;
                let v = Var::zeros(var.shape(), var.dtype(), var.device())?;
                Ok(Slot { var, m, v })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            rest: candle_nn::AdamW::new(rest, params.clone())?,
            params,
            step_t: 0,
        })
    }

    pub(crate) fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
        self.rest.set_learning_rate(lr);
    }

    pub(crate) fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let c = Constants {
            scale_m: 1.0 / (1.0 - p.beta1.powi(self.step_t)),
            scale_v: 1.0 / (1.0 - p.beta2.powi(self.step_t)),
            decay: 1.0 - p.lr * p.weight_decay,
            eps: p.eps,
            lr: p.lr,
        };
        let first = Moment {
            beta: p.beta1,
            square: false,
        };
        let second = Moment {
            beta: p.beta2,
            square: true,
        };
        for slot in &self.slots {
            let Some(g) = grads.get(&slot.var) else {
                continue;
            };
            if g.dtype() != DType::F32 {
                bail!("adamw: expected an f32 gradient, got {:?}", g.dtype())
            }
            let g = g.contiguous()?;
            slot.m.inplace_op2(&g, &first)?;
            slot.v.inplace_op2(&g, &second)?;
            slot.var.inplace_op3(&slot.m, &slot.v, &Update(c))?;
        }
        self.rest.step(grads)
    }
}

/// The step's constants in f64, rounded to f32 where the update uses them, as candle does.
#[derive(Clone, Copy, Debug)]
struct Constants {
    scale_m: f64,
    scale_v: f64,
    decay: f64,
    eps: f64,
    lr: f64,
}

/// The first moment, `m <- (m * b1 + 0) + (g * (1 - b1) + 0)`, or with `square` the second,
/// `v <- (v * b2 + 0) + ((g * g) * (1 - b2) + 0)`.
struct Moment {
    beta: f64,
    square: bool,
}
/// `theta <- (theta * decay + 0) - ((m * s_m + 0) / (sqrt(v * s_v + 0) * 1 + eps) * lr + 0)`.
struct Update(Constants);

/// The contiguous f32 data of a parameter-sized operand.
fn operand<'a>(storage: &'a CpuStorage, layout: &Layout, len: usize) -> Result<&'a [f32]> {
    let data = crate::kernels::f32_slice(storage, layout, "adamw")?;
    if data.len() != len {
        bail!(
            "adamw: expected an operand of {len} elements, got {}",
            data.len()
        )
    }
    Ok(data)
}

fn target<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("adamw: expected f32 data")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => bail!("adamw: expected a contiguous parameter"),
    }
}

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;

fn moment(
    dst: &mut CpuStorage,
    dst_l: &Layout,
    (g, g_l): (&CpuStorage, &Layout),
    beta: f64,
    square: bool,
) -> Result<()> {
    use rayon::prelude::*;
    let out = target(dst, dst_l)?;
    let g = operand(g, g_l, out.len())?;
    let (keep, take, zero) = (beta as f32, (1.0 - beta) as f32, 0f32);
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .for_each(|(out, g)| {
            for (o, &gv) in out.iter_mut().zip(g) {
                let grad = if square { gv * gv } else { gv };
                *o = (*o * keep + zero) + (grad * take + zero);
            }
        });
    Ok(())
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        if self.square {
            "adamw-second-moment"
        } else {
            "adamw-first-moment"
        }
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> Result<()> {
        moment(dst, dst_l, (g, g_l), self.beta, self.square)
    }
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<()> {
        use rayon::prelude::*;
        let out = target(dst, dst_l)?;
        let m = operand(m, m_l, out.len())?;
        let v = operand(v, v_l, out.len())?;
        let c = self.0;
        let (scale_m, scale_v, decay) = (c.scale_m as f32, c.scale_v as f32, c.decay as f32);
        let (eps, lr, one, zero) = (c.eps as f32, c.lr as f32, 1f32, 0f32);
        out.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(out, (m, v))| {
                for ((theta, &mv), &vv) in out.iter_mut().zip(m).zip(v) {
                    let m_hat = mv * scale_m + zero;
                    let v_hat = vv * scale_v + zero;
                    let adjusted = m_hat / (v_hat.sqrt() * one + eps);
                    *theta = (*theta * decay + zero) - (adjusted * lr + zero);
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};
    use candle_nn::Optimizer as _;

    use super::*;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map(|v| v.into_iter().map(f32::to_bits).collect())
            .unwrap_or_default()
    }

    #[test]
    fn fused_adamw_is_bit_identical_to_candle_nn() -> Result<()> {
        let dev = Device::Cpu;
        // Shapes with a chunk boundary inside, a transposed (strided) gradient, and a
        // parameter without a gradient.
        let shapes: [&[usize]; 3] = [&[3 * CHUNK + 17], &[37, 53], &[5]];
        for (lr, wd) in [(1e-3, 0.0), (5e-2, 0.01)] {
            let init: Vec<Tensor> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let n: usize = s.iter().product();
                    let values = (0..n).map(|q| ((q * 7 + i) as f32 * 0.37).sin() * (i + 1) as f32);
                    Tensor::from_iter(values, &dev)?.reshape(*s)
                })
                .collect::<Result<_>>()?;
            let ours: Vec<Var> = init.iter().map(Var::from_tensor).collect::<Result<_>>()?;
            let theirs: Vec<Var> = init.iter().map(Var::from_tensor).collect::<Result<_>>()?;
            let params = candle_nn::ParamsAdamW {
                lr,
                weight_decay: wd,
                ..Default::default()
            };
            let mut fused = AdamW::new(ours.clone(), params.clone())?;
            let mut reference = candle_nn::AdamW::new(theirs.clone(), params)?;
            for step in 0..5 {
                // A loss whose gradients differ from step to step and include exact zeros.
                let loss = |vars: &[Var]| -> Result<Tensor> {
                    let a = (vars[0].as_tensor().sqr()? * (step as f64 + 0.5))?
                        .relu()?
                        .sum_all()?;
                    let b = vars[1]
                        .as_tensor()
                        .t()?
                        .matmul(vars[1].as_tensor())?
                        .sum_all()?;
                    a + b
                };
                let (g_ours, g_theirs) = (loss(&ours)?.backward()?, loss(&theirs)?.backward()?);
                fused.step(&g_ours)?;
                reference.step(&g_theirs)?;
                for (a, b) in ours.iter().zip(&theirs) {
                    assert_eq!(
                        bits(a.as_tensor()),
                        bits(b.as_tensor()),
                        "step {step}, lr {lr}"
                    );
                }
            }
            assert_ne!(
                bits(ours[0].as_tensor()),
                bits(&init[0]),
                "the parameters moved"
            );
        }
        Ok(())
    }
}
