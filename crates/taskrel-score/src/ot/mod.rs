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
///
/// Differences are accumulated in eight independent f32 lanes so the compiler vectorises the
/// inner loop (a single running sum cannot be reordered), then summed in f64.
pub fn euclidean(x: &[f32], y: &[f32], d: usize) -> Vec<f64> {
    let (n, m) = (x.len() / d.max(1), y.len() / d.max(1));
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        let xi = &x[i * d..(i + 1) * d];
        for j in 0..m {
            out[i * m + j] = squared_distance(xi, &y[j * d..(j + 1) * d]).sqrt();
        }
    }
    out
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (pa, pb) in ca.zip(cb) {
        for k in 0..8 {
            let t = pa[k] - pb[k];
            lanes[k] += t * t;
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(p, q)| (p - q) * (p - q)).sum();
    lanes.iter().map(|&v| f64::from(v)).sum::<f64>() + f64::from(tail)
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
