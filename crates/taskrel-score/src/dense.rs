//! Small dense linear algebra on row-major `f32` slices and the Adam update, for the
//! estimator's hand-differentiated steps (h_R and the learned transformations). Matrix
//! products go through faer's blocked, vectorised kernels on the rayon pool.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

/// A row-major matrix, read as itself or as its transpose.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl<'a> View<'a> {
    /// `data` as a row-major `(rows, cols)` matrix; `data.len()` must be `rows * cols`.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        Self {
            data,
            rows,
            cols,
            transposed: false,
        }
    }

    /// The transpose (no copy).
    pub(crate) fn t(self) -> Self {
        Self {
            transposed: !self.transposed,
            ..self
        }
    }

    fn shape(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    fn faer(&self) -> MatRef<'a, f32> {
        let m = MatRef::from_row_major_slice(self.data, self.rows, self.cols);
        if self.transposed { m.transpose() } else { m }
    }
}

/// `out (rows, cols) = alpha * lhs rhs`, or `out += alpha * lhs rhs` when `accumulate`.
pub(crate) fn gemm(out: &mut [f32], lhs: View, rhs: View, alpha: f32, accumulate: bool) {
    let (m, k) = lhs.shape();
    // Products under about a million multiply-adds are not worth waking the pool for.
    let parallel = m * k * rhs.shape().1 >= 1 << 20;
    gemm_on(out, lhs, rhs, alpha, accumulate, parallel);
}

/// [`gemm`] on the calling thread only, or on the whole pool.
pub(crate) fn gemm_on(
    out: &mut [f32],
    lhs: View,
    rhs: View,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    let ((m, k), (k2, n)) = (lhs.shape(), rhs.shape());
    debug_assert_eq!(k, k2);
    debug_assert_eq!(out.len(), m * n);
    let dst = MatMut::from_row_major_slice_mut(out, m, n);
    let beta = if accumulate {
        Accum::Add
    } else {
        Accum::Replace
    };
    let par = if parallel { Par::rayon(0) } else { Par::Seq };
    matmul(dst, beta, lhs.faer(), rhs.faer(), alpha, par);
}

/// Adam (Kingma and Ba) with the moment estimates of candle-nn's `AdamW` at zero weight decay:
/// `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
/// `theta -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`, computed in the parameters'
/// own precision.
#[derive(Clone, Debug)]
pub(crate) struct Adam<T> {
    lr: f64,
    beta1: f64,
    step: i32,
    m: Vec<T>,
    v: Vec<T>,
}

/// The two float types Adam updates.
pub(crate) trait Real:
    Copy
    + Default
    + From<f32>
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    /// Square root.
    fn sqrt(self) -> Self;
    /// From f64, rounded.
    fn of(v: f64) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
}

impl Real for f64 {
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

impl<T: Real> Adam<T> {
    /// Optimiser state for `len` parameters.
    pub(crate) fn new(len: usize, lr: f64) -> Self {
        Self::with_beta1(len, lr, BETA1)
    }

    /// Optimiser state with another first-moment decay (the authors train h_R with 0.5).
    pub(crate) fn with_beta1(len: usize, lr: f64, beta1: f64) -> Self {
        Self {
            lr,
            beta1,
            step: 0,
            m: vec![T::default(); len],
            v: vec![T::default(); len],
        }
    }

    /// One update of `theta` with gradient `grad` (both `len` long).
    pub(crate) fn step(&mut self, theta: &mut [T], grad: &[T]) {
        debug_assert_eq!(theta.len(), grad.len());
        self.step += 1;
        let update = AdamUpdate {
            theta,
            grad,
            m: &mut self.m,
            v: &mut self.v,
            lr: T::of(self.lr),
            b1: T::of(self.beta1),
            c1: T::of(1.0 - self.beta1.powi(self.step)),
            c2: T::of(1.0 - BETA2.powi(self.step)),
        };
        pulp::Arch::new().dispatch(update);
    }
}

struct AdamUpdate<'a, T> {
    theta: &'a mut [T],
    grad: &'a [T],
    m: &'a mut [T],
    v: &'a mut [T],
    lr: T,
    b1: T,
    c1: T,
    c2: T,
}

impl<T: Real> pulp::NullaryFnOnce for AdamUpdate<'_, T> {
    type Output = ();

    // Inlined into the dispatcher's target-feature context, where the loop vectorises.
    #[inline(always)]
    fn call(self) {
        let (b1, b2, eps) = (self.b1, T::of(BETA2), T::of(EPS));
        let one = T::from(1.0);
        for (((p, &g), m), v) in self.theta.iter_mut().zip(self.grad).zip(self.m).zip(self.v) {
            *m = b1 * *m + (one - b1) * g;
            *v = b2 * *v + (one - b2) * g * g;
            *p = *p - self.lr * (*m / self.c1) / ((*v / self.c2).sqrt() + eps);
        }
    }
}

/// Softmax of `logits` in place of a new vector (max-shifted).
pub(crate) fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / total).collect()
}

/// Gradient with respect to the logits of `p = softmax(logits)`, given `g = dL/dp`:
/// `p_i (g_i - sum_j p_j g_j)`.
pub(crate) fn softmax_backward(p: &[f64], g: &[f64]) -> Vec<f64> {
    let dot: f64 = p.iter().zip(g).map(|(p, g)| p * g).sum();
    p.iter().zip(g).map(|(p, g)| p * (g - dot)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_the_definition_for_every_transpose() {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let want: Vec<f32> = (0..m * n)
            .map(|o| (0..k).map(|q| a[(o / n) * k + q] * b[q * n + o % n]).sum())
            .collect();
        let cases = [
            (View::new(&a, m, k), View::new(&b, k, n)),
            (View::new(&at, k, m).t(), View::new(&b, k, n)),
            (View::new(&a, m, k), View::new(&bt, n, k).t()),
            (View::new(&at, k, m).t(), View::new(&bt, n, k).t()),
        ];
        for (lhs, rhs) in cases {
            let mut out = vec![1.0f32; m * n];
            gemm(&mut out, lhs, rhs, 2.0, true);
            for (o, w) in out.iter().zip(&want) {
                assert!(
                    (o - (1.0 + 2.0 * w)).abs() < 1e-5,
                    "{o} vs {}",
                    1.0 + 2.0 * w
                );
            }
        }
    }

    #[test]
    fn softmax_backward_matches_finite_differences() {
        let logits = [0.3, -1.2, 2.0, 0.0];
        let g = [1.0, -0.5, 0.25, 2.0];
        let analytic = softmax_backward(&softmax(&logits), &g);
        for i in 0..logits.len() {
            let h = 1e-6;
            let mut up = logits;
            up[i] += h;
            let mut down = logits;
            down[i] -= h;
            let f = |l: &[f64]| softmax(l).iter().zip(&g).map(|(p, g)| p * g).sum::<f64>();
            let numeric = (f(&up) - f(&down)) / (2.0 * h);
            assert!(
                (analytic[i] - numeric).abs() < 1e-8,
                "{i}: {} vs {numeric}",
                analytic[i]
            );
        }
    }
}
