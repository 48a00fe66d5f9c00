//! Optimal transport: exact (network simplex), entropic (log-domain Sinkhorn on candle
//! tensors), and the exact class-block decomposition used by task-relatedness.
//!
//! Costs here are Euclidean distances (not squared) unless a caller passes its own matrix:
//! the Wasserstein term of task-relatedness is a 1-Wasserstein distance.

mod emd;
mod sinkhorn;

pub use emd::{Plan, emd};
pub use sinkhorn::{DensePlan, SinkhornConfig, sinkhorn};

/// Euclidean distances `(n, m)` between the rows of `x (n, d)` and `y (m, d)`, row-major f64.
pub fn euclidean(x: &[f32], y: &[f32], d: usize) -> Vec<f64> {
    let (n, m) = (x.len() / d.max(1), y.len() / d.max(1));
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        let xi = &x[i * d..(i + 1) * d];
        for j in 0..m {
            let yj = &y[j * d..(j + 1) * d];
            let s: f32 = xi.iter().zip(yj).map(|(a, b)| (a - b) * (a - b)).sum();
            out[i * m + j] = f64::from(s).sqrt();
        }
    }
    out
}

/// Uniform weights summing to one.
pub fn uniform(n: usize) -> Vec<f64> {
    vec![1.0 / n as f64; n]
}

/// The 1-Wasserstein distance between two uniform point clouds (Euclidean cost), exact.
pub fn wasserstein1(x: &[f32], y: &[f32], d: usize) -> crate::Result<f64> {
    let (n, m) = (x.len() / d.max(1), y.len() / d.max(1));
    Ok(emd(&uniform(n), &uniform(m), &euclidean(x, y, d))?.cost)
}
