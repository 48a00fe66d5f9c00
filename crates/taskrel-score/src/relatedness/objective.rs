//! The step objective and its hand-written gradient.

use super::*;

/// The learned variables: `A (d, d)`, `A' (d, d)` and `b (d)` in f32 (they enter matrix
/// products), the logits of `B (K_T, K_R)` (column softmax) and of `D (K_R)` in f64.
#[derive(Clone, Debug)]
pub(super) struct Transform {
    pub(super) d: usize,
    pub(super) a: Vec<f32>,
    pub(super) a_inv: Vec<f32>,
    pub(super) shift: Vec<f32>,
    pub(super) k_t: usize,
    pub(super) k_r: usize,
    pub(super) b_logits: Vec<f64>,
    pub(super) d_logits: Vec<f64>,
}

impl Transform {
    /// `A = A' = I`, `b = 0`, B's logits `ln max(B, 1e-3)`, D's logits `ln p_R`.
    pub(super) fn identity(d: usize, b_init: &[Vec<f64>], prior: &[f64]) -> Self {
        let eye: Vec<f32> = (0..d * d)
            .map(|i| if i / d == i % d { 1.0 } else { 0.0 })
            .collect();
        Self {
            d,
            a: eye.clone(),
            a_inv: eye,
            shift: vec![0.0; d],
            k_t: b_init.len(),
            k_r: prior.len(),
            b_logits: b_init.iter().flatten().map(|&p| p.max(1e-3).ln()).collect(),
            d_logits: prior.iter().map(|p| p.ln()).collect(),
        }
    }

    /// `z A^T + b` for row-major `z (n, d)`.
    pub(super) fn apply(&self, z: &[f32], d: usize) -> Vec<f32> {
        let n = z.len() / d;
        let mut out = Vec::with_capacity(n * d);
        for _ in 0..n {
            out.extend_from_slice(&self.shift);
        }
        gemm(
            &mut out,
            View::new(z, n, d),
            View::new(&self.a, d, d).t(),
            1.0,
            true,
        );
        out
    }

    /// `(z - b) A'^T` for row-major `z (n, d)`.
    pub(super) fn apply_inverse(&self, z: &[f32], d: usize) -> Vec<f32> {
        let n = z.len() / d;
        let centred: Vec<f32> = z
            .chunks_exact(d)
            .flat_map(|row| row.iter().zip(&self.shift).map(|(v, s)| v - s))
            .collect();
        let mut out = vec![0f32; n * d];
        gemm(
            &mut out,
            View::new(&centred, n, d),
            View::new(&self.a_inv, d, d).t(),
            1.0,
            false,
        );
        out
    }

    /// `B`, row-major `(K_T, K_R)`, each column a softmax of its logits.
    pub(super) fn label_map(&self) -> Vec<f64> {
        let (kt, kr) = (self.k_t, self.k_r);
        let mut b = vec![0f64; kt * kr];
        for j in 0..kr {
            let col = softmax(
                &(0..kt)
                    .map(|k| self.b_logits[k * kr + j])
                    .collect::<Vec<_>>(),
            );
            for (k, v) in col.into_iter().enumerate() {
                b[k * kr + j] = v;
            }
        }
        b
    }
}

/// The terms of the objective that use target labels.
pub(super) struct LabelTerms<'a> {
    /// `Lbar_R,j`, mean cross-entropy of h_R per reference class.
    pub(super) class_loss: &'a [f64],
    /// `p_T`.
    pub(super) target_prior: &'a [f64],
    /// lambda.
    pub(super) label_weight: f64,
}

/// One iteration's batches and plan.
pub(super) struct Batch<'a> {
    /// Reference batch `(n_r, d)`.
    pub(super) zr: &'a [f32],
    /// `zr A^T + b`.
    pub(super) moved: &'a [f32],
    /// Target batch `(n_t, d)`.
    pub(super) zt: &'a [f32],
    /// Plan over batch positions.
    pub(super) plan: &'a Sparse,
    /// Reference labels of the batch rows.
    pub(super) ref_labels: &'a [usize],
    /// Target labels of the batch rows (all 0 when unlabelled).
    pub(super) target_labels: &'a [usize],
}

/// The objective's value and its gradient with respect to every variable.
#[derive(Debug)]
pub(super) struct Gradient {
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) value: f64,
    pub(super) a: Vec<f32>,
    pub(super) a_inv: Vec<f32>,
    pub(super) shift: Vec<f32>,
    pub(super) b_logits: Vec<f64>,
    pub(super) d_logits: Vec<f64>,
}

/// The step objective (module documentation) at `x` and its gradient, differentiated by hand
/// (a test checks it against candle's autograd). With `r_p = A z_i + b - z'_l` for plan entry
/// `p = (i, l, gamma_p)`, `E = A A' - I`, `E' = A' A - I`:
///
/// ```text
/// d/dA  = 4 sum_p gamma_p r_p z_i^T + 2 E A'^T + 2 A'^T E'      d/db = 4 sum_p gamma_p r_p
/// d/dA' = 2 A^T E + 2 E' A^T
/// ```
///
/// and, with labels, the label cost, `H_D(B)`, the reference term and `||p_T - B D||^2`
/// differentiated in `B` and `D`, then through the softmaxes to their logits.
/// The terms of the step that depend on A and A' only: `||A A' - I||^2 + ||A' A - I||^2` and
/// its gradients, `2 E1 A'^T + 2 A'^T E2` on A and `2 A^T E1 + 2 E2 A^T` on A' (E1 = A A' - I,
/// E2 = A' A - I).
pub(super) struct Orthogonality {
    pub(super) value: f64,
    pub(super) a: Vec<f32>,
    pub(super) a_inv: Vec<f32>,
}

pub(super) fn orthogonality(x: &Transform) -> Orthogonality {
    let d = x.d;
    let (a, ai) = (View::new(&x.a, d, d), View::new(&x.a_inv, d, d));
    let (mut e1, mut e2) = (vec![0f32; d * d], vec![0f32; d * d]);
    gemm_on(&mut e1, a, ai, 1.0, false, false);
    gemm_on(&mut e2, ai, a, 1.0, false, false);
    for o in 0..d {
        e1[o * d + o] -= 1.0;
        e2[o * d + o] -= 1.0;
    }
    let value = e1
        .iter()
        .chain(&e2)
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    let (e1v, e2v) = (View::new(&e1, d, d), View::new(&e2, d, d));
    let (mut ga, mut ga_inv) = (vec![0f32; d * d], vec![0f32; d * d]);
    gemm_on(&mut ga, e1v, ai.t(), 2.0, false, false);
    gemm_on(&mut ga, ai.t(), e2v, 2.0, true, false);
    gemm_on(&mut ga_inv, a.t(), e1v, 2.0, false, false);
    gemm_on(&mut ga_inv, e2v, a.t(), 2.0, true, false);
    Orthogonality {
        value,
        a: ga,
        a_inv: ga_inv,
    }
}

pub(super) fn objective(
    x: &Transform,
    batch: &Batch,
    labels: Option<&LabelTerms>,
    orth: Orthogonality,
) -> Gradient {
    pulp::Arch::new().dispatch(Objective {
        x,
        batch,
        labels,
        orth,
    })
}

pub(super) struct Objective<'a> {
    pub(super) x: &'a Transform,
    pub(super) batch: &'a Batch<'a>,
    pub(super) labels: Option<&'a LabelTerms<'a>>,
    pub(super) orth: Orthogonality,
}

impl pulp::NullaryFnOnce for Objective<'_> {
    type Output = Gradient;

    // Inlined into the dispatcher's target-feature context, where the plan loop vectorises.
    #[inline(always)]
    fn call(self) -> Gradient {
        objective_body(self.x, self.batch, self.labels, self.orth)
    }
}

#[inline(always)]
pub(super) fn objective_body(
    x: &Transform,
    batch: &Batch,
    labels: Option<&LabelTerms>,
    orth: Orthogonality,
) -> Gradient {
    let d = x.d;
    let n = batch.zr.len() / d;
    // Feature cost: per reference row, u_i = sum_l gamma_il r_il.
    let mut u = vec![0f32; n * d];
    let mut feature = 0.0;
    for &(i, l, gamma) in batch.plan {
        let (mi, zl) = (
            &batch.moved[i * d..(i + 1) * d],
            &batch.zt[l * d..(l + 1) * d],
        );
        let ui = &mut u[i * d..(i + 1) * d];
        let mut sq = 0f64;
        for ((uo, &m), &z) in ui.iter_mut().zip(mi).zip(zl) {
            let r = m - z;
            sq += f64::from(r) * f64::from(r);
            *uo += (gamma * f64::from(r)) as f32;
        }
        feature += gamma * sq;
    }
    let mut shift = vec![0f64; d];
    for row in u.chunks_exact(d) {
        for (s, &v) in shift.iter_mut().zip(row) {
            *s += 4.0 * f64::from(v);
        }
    }
    // The feature term's gradient on A, added to the orthogonality terms' (computed while the
    // plan was solved), on both cores: faer splits the output between them, not the sums, so
    // the bits are those of one core (the loop benchmark's report is identical); 0.58 s
    // against 0.68 s for the step outside the plan (medians of eight alternating runs).
    let mut ga = orth.a;
    let ga_inv = orth.a_inv;
    let eye = orth.value;
    {
        let (u, zr) = (View::new(&u, n, d), View::new(batch.zr, n, d));
        gemm_on(&mut ga, u.t(), zr, 4.0, true, true);
    }
    let mut value = 2.0 * feature + eye;
    let (kt, kr) = (x.k_t, x.k_r);
    let mut g_b_logits = vec![0f64; kt * kr];
    let mut g_d_logits = vec![0f64; kr];
    if let Some(terms) = labels {
        let b = x.label_map();
        let prior = softmax(&x.d_logits);
        let lambda = terms.label_weight;
        // Plan mass from reference class j to target class k.
        let mut mass = vec![0f64; kr * kt];
        for &(i, l, gamma) in batch.plan {
            mass[batch.ref_labels[i] * kt + batch.target_labels[l]] += gamma;
        }
        let mut gb = vec![0f64; kt * kr];
        let mut gd = vec![0f64; kr];
        for j in 0..kr {
            let sent: f64 = mass[j * kt..(j + 1) * kt].iter().sum();
            let col_sq: f64 = (0..kt).map(|q| b[q * kr + j].powi(2)).sum();
            let mut col_entropy = 0.0;
            for k in 0..kt {
                let bkj = b[k * kr + j];
                // Label cost 2 lambda sum gamma ||B e_j - e_k||^2.
                value += 2.0 * lambda * mass[j * kt + k] * (col_sq - 2.0 * bkj + 1.0);
                gb[k * kr + j] += 4.0 * lambda * (bkj * sent - mass[j * kt + k]);
                // -D_j B_kj ln clamp(B_kj, 1e-12, 1).
                let clamped = bkj.clamp(1e-12, 1.0);
                col_entropy += bkj * clamped.ln();
                let inside = f64::from(u8::from((1e-12..=1.0).contains(&bkj)));
                gb[k * kr + j] -= prior[j] * (clamped.ln() + inside);
            }
            value -= prior[j] * col_entropy;
            gd[j] += terms.class_loss[j] - col_entropy;
            value += prior[j] * terms.class_loss[j];
        }
        // ||p_T - B D||^2.
        for k in 0..kt {
            let gap =
                terms.target_prior[k] - (0..kr).map(|j| b[k * kr + j] * prior[j]).sum::<f64>();
            value += gap * gap;
            for j in 0..kr {
                gb[k * kr + j] -= 2.0 * gap * prior[j];
                gd[j] -= 2.0 * gap * b[k * kr + j];
            }
        }
        for j in 0..kr {
            let col: Vec<f64> = (0..kt).map(|k| b[k * kr + j]).collect();
            let grad: Vec<f64> = (0..kt).map(|k| gb[k * kr + j]).collect();
            for (k, v) in softmax_backward(&col, &grad).into_iter().enumerate() {
                g_b_logits[k * kr + j] = v;
            }
        }
        g_d_logits = softmax_backward(&prior, &gd);
    }
    Gradient {
        value,
        a: ga,
        a_inv: ga_inv,
        shift: shift.into_iter().map(|v| v as f32).collect(),
        b_logits: g_b_logits,
        d_logits: g_d_logits,
    }
}
