//! Optimal transport: exact (network simplex), entropic (log-domain Sinkhorn on candle
//! tensors), and the exact class-block decomposition used by task-relatedness.
//!
//! Costs here are Euclidean distances (not squared) unless a caller passes its own matrix:
//! the Wasserstein term of task-relatedness is a 1-Wasserstein distance.

mod emd;
mod sinkhorn;

pub use emd::{Labelled, LabelledScratch, Plan, emd, emd_labelled, emd_labelled_in};
pub use sinkhorn::{DensePlan, SinkhornConfig, sinkhorn};

/// Euclidean distances `(n, m)` between the rows of `x (n, d)` and `y (m, d)`, row-major f64.
///
/// `y` is repacked first, so that for one row of `x` the squared differences are added
/// dimension by dimension into sixteen independent f32 sums, one per row of `y`: a contiguous
/// inner loop that the compiler vectorises without reordering any sum. Identical rows are at
/// distance exactly 0.
pub fn euclidean(x: &[f32], y: &[f32], d: usize) -> Vec<f64> {
    let d = d.max(1);
    let mut out = vec![0.0; (x.len() / d) * (y.len() / d)];
    euclidean_into(x, y, d, &mut out, y.len() / d, 0.0);
    out
}

/// [`euclidean`] plus `add`, written in place: distance `(i, j)` plus `add` goes to
/// `out[i * stride + j]`, other entries are left alone. Returns the largest value written (0
/// when none). `out` must reach the last row's last column.
pub(crate) fn euclidean_into(
    x: &[f32],
    y: &[f32],
    d: usize,
    out: &mut [f64],
    stride: usize,
    add: f64,
) -> f64 {
    // Compiled for the widest vector instructions this CPU has, chosen at run time; the sums
    // are the same on every CPU (no sum is reordered, no multiply-add is fused).
    pulp::Arch::new().dispatch(Euclidean {
        x,
        y,
        d,
        out,
        stride,
        add,
    })
}

struct Euclidean<'a> {
    x: &'a [f32],
    y: &'a [f32],
    d: usize,
    out: &'a mut [f64],
    stride: usize,
    add: f64,
}

impl pulp::NullaryFnOnce for Euclidean<'_> {
    type Output = f64;

    // Inlined into the dispatcher's target-feature context, where the loops vectorise.
    #[inline(always)]
    fn call(self) -> f64 {
        let Self {
            x,
            y,
            d,
            out,
            stride,
            add,
        } = self;
        euclidean_body(x, y, d, out, stride, add)
    }
}

#[inline(always)]
fn euclidean_body(x: &[f32], y: &[f32], d: usize, out: &mut [f64], stride: usize, add: f64) -> f64 {
    const W: usize = 16;
    let d = d.max(1);
    let m = y.len() / d;
    let mut largest = 0.0f64;
    // Rows of `y` in panels of sixteen, each panel stored dimension-major `(d, 16)` (the last
    // one padded with zero rows), so one panel is read front to back for every row of `x`.
    let panels = m.div_ceil(W);
    let mut packed = vec![0f32; panels * d * W];
    for (j, row) in y.chunks_exact(d).enumerate() {
        let panel = &mut packed[(j / W) * d * W..(j / W + 1) * d * W];
        for (k, &v) in row.iter().enumerate() {
            panel[k * W + j % W] = v;
        }
    }
    for (p, panel) in packed.chunks_exact(d * W).enumerate() {
        let (j0, width) = (p * W, (m - p * W).min(W));
        for (i, xi) in x.chunks_exact(d).enumerate() {
            let mut sums = [0f32; W];
            for (&xk, column) in xi.iter().zip(panel.as_chunks::<W>().0) {
                for (a, &v) in sums.iter_mut().zip(column) {
                    let t = xk - v;
                    *a += t * t;
                }
            }
            let at = i * stride + j0;
            for (o, &a) in out[at..at + width].iter_mut().zip(&sums) {
                *o = f64::from(a).sqrt() + add;
                largest = largest.max(*o);
            }
        }
    }
    largest
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euclidean_matches_f64_distances_and_is_zero_on_identical_rows() {
        let d = 21;
        let x: Vec<f32> = (0..3 * d).map(|i| (i as f32 * 0.7).sin() * 3.0).collect();
        let mut y: Vec<f32> = (0..37 * d).map(|i| (i as f32 * 0.3).cos() * 2.0).collect();
        y[4 * d..5 * d].copy_from_slice(&x[d..2 * d]);
        let got = euclidean(&x, &y, d);
        for i in 0..3 {
            for j in 0..37 {
                let (xi, yj) = (&x[i * d..(i + 1) * d], &y[j * d..(j + 1) * d]);
                let exact: f64 = xi
                    .iter()
                    .zip(yj)
                    .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let g = got[i * 37 + j];
                assert!(
                    (g - exact).abs() <= 1e-6 * exact,
                    "({i}, {j}): {g} vs {exact}"
                );
            }
        }
        assert_eq!(got[37 + 4], 0.0);
    }
}
