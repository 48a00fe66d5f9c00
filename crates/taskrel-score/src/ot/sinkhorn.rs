//! Entropic optimal transport by log-domain Sinkhorn iterations on candle tensors (so it runs
//! wherever candle does, CUDA included).
//!
//! With `K = -C / eps`, potentials `f (n)`, `g (m)` alternate
//! `f = eps (log a - logsumexp_j((g_j - C_ij) / eps))`, `g = eps (log b - logsumexp_i((f_i - C_ij) / eps))`,
//! and the plan is `P_ij = exp((f_i + g_j - C_ij) / eps)`. Computing in the log domain keeps
//! small `eps` (the regime that approaches the exact cost) free of underflow. Stops when the
//! row-marginal error (L1) falls below `tol` or after `max_iter` iterations.

use candle_core::{D, DType, Device, Tensor};

use crate::{Error, Result};

/// Settings of a Sinkhorn solve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SinkhornConfig {
    /// Entropic regularisation, in cost units.
    pub eps: f64,
    /// Iteration cap.
    pub max_iter: usize,
    /// L1 error of the row marginals at which to stop.
    pub tol: f64,
}

impl Default for SinkhornConfig {
    fn default() -> Self {
        Self {
            eps: 0.01,
            max_iter: 10_000,
            tol: 1e-9,
        }
    }
}

/// A dense entropic plan.
#[derive(Clone, Debug)]
pub struct DensePlan {
    /// `(n, m)` plan on the solve's device.
    pub plan: Tensor,
    /// `sum_ij P_ij C_ij` (the transport cost of the entropic plan, without the entropy).
    pub cost: f64,
    /// Iterations run.
    pub iterations: usize,
    /// Final L1 error of the row marginals.
    pub marginal_error: f64,
}

fn logsumexp(x: &Tensor, dim: usize) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?;
    Ok((x.broadcast_sub(&max)?.exp()?.sum_keepdim(dim)?.log()? + max)?.squeeze(dim)?)
}

/// Solves entropic OT between weights `a (n)` and `b (m)` with cost `(n, m)`, all f64 on
/// `device`.
pub fn sinkhorn(
    a: &[f64],
    b: &[f64],
    cost: &[f64],
    config: &SinkhornConfig,
    device: &Device,
) -> Result<DensePlan> {
    let (n, m) = (a.len(), b.len());
    super::emd::check_marginals(a, b)?;
    if cost.len() != n * m {
        return Err(Error::Invalid(format!(
            "sinkhorn: cost has {} entries, expected {n} x {m}",
            cost.len()
        )));
    }
    if config.eps.is_nan() || config.eps <= 0.0 {
        return Err(Error::Invalid(format!(
            "sinkhorn: eps must be positive, got {}",
            config.eps
        )));
    }
    let c = Tensor::from_slice(cost, (n, m), device)?.to_dtype(DType::F64)?;
    let log_a = Tensor::from_slice(a, n, device)?.log()?;
    let log_b = Tensor::from_slice(b, m, device)?.log()?;
    let a_t = Tensor::from_slice(a, n, device)?;
    let eps = config.eps;
    let neg_c = (c.neg()? / eps)?;
    let mut f = Tensor::zeros(n, DType::F64, device)?;
    let mut g = Tensor::zeros(m, DType::F64, device)?;
    let mut iterations = 0;
    let mut error = f64::INFINITY;
    while iterations < config.max_iter {
        // f_i = eps log a_i - eps logsumexp_j(g_j/eps - C_ij/eps)
        let s = neg_c.broadcast_add(&(&g / eps)?.unsqueeze(0)?)?;
        f = ((&log_a - logsumexp(&s, 1)?)? * eps)?;
        let s = neg_c.broadcast_add(&(&f / eps)?.unsqueeze(1)?)?;
        g = ((&log_b - logsumexp(&s, 0)?)? * eps)?;
        iterations += 1;
        if iterations % 10 == 0 || iterations == config.max_iter {
            let log_p = neg_c
                .broadcast_add(&(&f / eps)?.unsqueeze(1)?)?
                .broadcast_add(&(&g / eps)?.unsqueeze(0)?)?;
            let rows = log_p.exp()?.sum(D::Minus1)?;
            error = (rows - &a_t)?.abs()?.sum_all()?.to_scalar::<f64>()?;
            if error < config.tol {
                break;
            }
        }
    }
    let log_p = neg_c
        .broadcast_add(&(&f / eps)?.unsqueeze(1)?)?
        .broadcast_add(&(&g / eps)?.unsqueeze(0)?)?;
    let plan = log_p.exp()?;
    let cost = (&plan * &c)?.sum_all()?.to_scalar::<f64>()?;
    Ok(DensePlan {
        plan,
        cost,
        iterations,
        marginal_error: error,
    })
}
