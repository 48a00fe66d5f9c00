//! Baseline transferability scores, computed on the same features as task-relatedness.
//!
//! Every score is "larger predicts better transfer". Inputs are row-major matrices; each
//! function says what it needs and refuses what it cannot use:
//!
//! | score | needs |
//! |---|---|
//! | [`logme`] | target features `(n, d)`, target labels |
//! | [`leep`] | source-head probabilities on the target `(n, c_s)`, target labels |
//! | [`nce`] | source-head predictions (argmax) on the target, target labels |
//! | [`h_score`], [`shrinkage_h_score`] | target features, target labels |
//! | [`otce`] | labelled source features and labelled target features |
//! | [`knn_accuracy`] | target features, target labels |
//!
//! Arithmetic is f64, as in the reference implementations (thuml/LogME, thuml
//! Transfer-Learning-Library, tanyang1231/OTCE_Transferability_CVPR21); the tests record
//! their outputs on fixed inputs.

use faer::{Mat, Side};

use crate::ot;
use crate::{Error, Result};

/// A row-major `(n, d)` f64 matrix.
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    pub values: &'a [f64],
    pub n: usize,
    pub d: usize,
}

impl<'a> Matrix<'a> {
    /// Checks the shape.
    pub fn new(values: &'a [f64], n: usize, d: usize) -> Result<Self> {
        if values.len() != n * d || n == 0 || d == 0 {
            return Err(Error::Invalid(format!(
                "expected a non-empty {n} x {d} matrix, got {} values",
                values.len()
            )));
        }
        Ok(Self { values, n, d })
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.values[i * self.d..(i + 1) * self.d]
    }

    fn to_faer(self) -> Mat<f64> {
        Mat::from_fn(self.n, self.d, |i, j| self.values[i * self.d + j])
    }
}

/// Number of classes of `labels` (max + 1), checking the length and that there are two.
fn classes(labels: &[u32], n: usize, what: &str) -> Result<usize> {
    if labels.len() != n {
        return Err(Error::Invalid(format!(
            "{what}: {} labels for {n} samples",
            labels.len()
        )));
    }
    let k = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    if k < 2 {
        return Err(Error::Invalid(format!(
            "{what} needs target labels of at least two classes"
        )));
    }
    Ok(k)
}

/// Eigenvalues (ascending) and eigenvectors (columns) of a symmetric matrix.
fn symmetric_eigen(m: &Mat<f64>) -> Result<(Vec<f64>, Mat<f64>)> {
    let evd = m
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::Invalid(format!("eigendecomposition failed: {e:?}")))?;
    let s = evd.S();
    let values: Vec<f64> = (0..m.nrows()).map(|i| s[i]).collect();
    Ok((values, evd.U().to_owned()))
}

/// Maps a label indicator `y (n)` to its coordinates `u_j^T y` on the left singular vectors.
type Projection = Box<dyn Fn(&[f64]) -> Vec<f64>>;

/// LogME (You et al., ICML 2021; the fixed-point algorithm of arXiv 2110.10545, as thuml/LogME
/// `LogME.py`): the mean over classes of the maximum log-evidence per sample of a Bayesian
/// linear regression from `features (n, d)` to each class indicator.
///
/// The singular values come from the eigendecomposition of `F^T F` when `n > d` (the
/// reference's `truncated_svd`) and of `F F^T` otherwise (its thin SVD). With rank-deficient
/// features and `n > d` (ReLU features with dead units), all `d` eigenvalues enter the
/// evidence and only the coordinates of null directions are zeroed: the reference keeps the
/// null directions too, because their numerically tiny singular values pass its 1e-10 test.
pub fn logme(features: Matrix<'_>, labels: &[u32]) -> Result<f64> {
    let (n, d) = (features.n, features.d);
    let k = classes(labels, n, "LogME")?;
    let f = features.to_faer();
    // sigma_j = s_j^2 and, per class, x_j = u_j^T y.
    let (sigma, project): (Vec<f64>, Projection) = if n > d {
        let gram = f.transpose() * &f;
        let (values, vectors) = symmetric_eigen(&gram)?;
        // Every direction counts in the evidence's log and gamma terms (a zero eigenvalue adds
        // log(alpha), which cancels part of d/2 log(alpha)); coordinates are computed where
        // s > 1e-10 (the reference's rank) and are zero elsewhere.
        let order: Vec<usize> = (0..d).rev().collect();
        let sigma: Vec<f64> = order.iter().map(|&j| values[j].max(0.0)).collect();
        // u_j = F v_j / s_j, so u_j^T y = (F^T y) . v_j / s_j.
        let fx = f.clone();
        let project = Box::new(move |y: &[f64]| -> Vec<f64> {
            let mut fty = vec![0.0; d];
            for i in 0..n {
                if y[i] != 0.0 {
                    for (c, t) in fty.iter_mut().enumerate() {
                        *t += fx[(i, c)] * y[i];
                    }
                }
            }
            order
                .iter()
                .map(|&j| {
                    let s = values[j].max(0.0).sqrt();
                    if s > 1e-10 {
                        (0..d).map(|c| fty[c] * vectors[(c, j)]).sum::<f64>() / s
                    } else {
                        0.0
                    }
                })
                .collect()
        });
        (sigma, project)
    } else {
        let gram = &f * f.transpose();
        let (values, vectors) = symmetric_eigen(&gram)?;
        let order: Vec<usize> = (0..n).rev().collect();
        let sigma: Vec<f64> = order.iter().map(|&j| values[j].max(0.0)).collect();
        let project = Box::new(move |y: &[f64]| -> Vec<f64> {
            order
                .iter()
                .map(|&j| (0..n).map(|i| vectors[(i, j)] * y[i]).sum())
                .collect()
        });
        (sigma, project)
    };
    let (nf, df) = (n as f64, d as f64);
    let mut total = 0.0;
    let mut y = vec![0.0; n];
    for class in 0..k {
        for (yi, &l) in y.iter_mut().zip(labels) {
            *yi = if l as usize == class { 1.0 } else { 0.0 };
        }
        let x = project(&y);
        let x2: Vec<f64> = x.iter().map(|v| v * v).collect();
        let res_x2 = y.iter().map(|v| v * v).sum::<f64>() - x2.iter().sum::<f64>();
        let (mut alpha, mut beta) = (1.0f64, 1.0f64);
        let (mut m2, mut res2) = (0.0, 0.0);
        for _ in 0..11 {
            let t = alpha / beta;
            let gamma: f64 = sigma.iter().map(|s| s / (s + t)).sum();
            m2 = sigma
                .iter()
                .zip(&x2)
                .map(|(s, x2)| s * x2 / ((t + s) * (t + s)))
                .sum();
            res2 = sigma
                .iter()
                .zip(&x2)
                .map(|(s, x2)| x2 / ((1.0 + s / t) * (1.0 + s / t)))
                .sum::<f64>()
                + res_x2;
            alpha = gamma / (m2 + 1e-5);
            beta = (nf - gamma) / (res2 + 1e-5);
            if ((alpha / beta) - t).abs() / t <= 1e-3 {
                break;
            }
        }
        let evidence = df / 2.0 * alpha.ln() + nf / 2.0 * beta.ln()
            - 0.5 * sigma.iter().map(|s| (alpha + beta * s).ln()).sum::<f64>()
            - beta / 2.0 * res2
            - alpha / 2.0 * m2
            - nf / 2.0 * (2.0 * std::f64::consts::PI).ln();
        total += evidence / nf;
    }
    Ok(total / k as f64)
}

/// LEEP (Nguyen et al., ICML 2020; as thuml/LogME `LEEP.py`): the mean log-likelihood of the
/// target labels under the empirical predictor `P(y|z) P(z|x)`, from the source head's
/// probabilities `(n, c_s)` on the target samples.
pub fn leep(probabilities: Matrix<'_>, labels: &[u32]) -> Result<f64> {
    let (n, cs) = (probabilities.n, probabilities.d);
    let ct = classes(labels, n, "LEEP")?;
    if probabilities
        .values
        .iter()
        .any(|p| !(0.0..=1.0 + 1e-6).contains(p))
    {
        return Err(Error::Invalid(
            "LEEP needs source-head probabilities in [0, 1] (softmax outputs)".into(),
        ));
    }
    let mut joint = vec![0.0; ct * cs];
    for (i, &label) in labels.iter().enumerate() {
        let y = label as usize;
        for (z, p) in probabilities.row(i).iter().enumerate() {
            joint[y * cs + z] += p / n as f64;
        }
    }
    let mut marginal = vec![0.0; cs];
    for y in 0..ct {
        for z in 0..cs {
            marginal[z] += joint[y * cs + z];
        }
    }
    let mut sum = 0.0;
    for (i, &label) in labels.iter().enumerate() {
        let y = label as usize;
        let p: f64 = probabilities
            .row(i)
            .iter()
            .enumerate()
            .map(|(z, pz)| pz * joint[y * cs + z] / marginal[z])
            .sum();
        sum += p.ln();
    }
    Ok(sum / n as f64)
}

/// NCE (Tran et al., ICCV 2019; as thuml/LogME `NCE.py`): minus the conditional entropy
/// `H(Y | Z)` of the target labels given the source head's predicted labels, with
/// `0 log 0 = 0` (the reference returns NaN whenever a (source, target) label pair never
/// occurs, and its `np.zeros(C_t, C_s)` needs the shape as a tuple).
pub fn nce(source_predictions: &[u32], labels: &[u32]) -> Result<f64> {
    let n = source_predictions.len();
    let ct = classes(labels, n, "NCE")?;
    let cs = source_predictions
        .iter()
        .copied()
        .max()
        .map_or(0, |m| m as usize + 1);
    let mut joint = vec![0.0; ct * cs];
    for (&z, &y) in source_predictions.iter().zip(labels) {
        joint[y as usize * cs + z as usize] += 1.0 / n as f64;
    }
    let mut h = 0.0;
    for z in 0..cs {
        let pz: f64 = (0..ct).map(|y| joint[y * cs + z]).sum();
        if pz == 0.0 {
            continue;
        }
        for y in 0..ct {
            let p = joint[y * cs + z];
            if p > 0.0 {
                h -= p * (p / pz).ln();
            }
        }
    }
    Ok(-h)
}

/// Column means and the centred matrix.
fn centred(x: Matrix<'_>) -> Mat<f64> {
    let mut mean = vec![0.0; x.d];
    for i in 0..x.n {
        for (m, v) in mean.iter_mut().zip(x.row(i)) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m /= x.n as f64);
    Mat::from_fn(x.n, x.d, |i, j| x.values[i * x.d + j] - mean[j])
}

/// `trace(pinv(a) b)` for symmetric `a` (numpy `pinv` with `rcond = 1e-15`: eigenvalues
/// below `1e-15 * max |eigenvalue|` are dropped).
fn trace_pinv_product(a: &Mat<f64>, b: &Mat<f64>) -> Result<f64> {
    let (values, u) = symmetric_eigen(a)?;
    let largest = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut trace = 0.0;
    for (j, &l) in values.iter().enumerate() {
        if l.abs() <= 1e-15 * largest {
            continue;
        }
        // u_j^T b u_j / l_j
        let uj = u.col(j);
        let bu = b * uj;
        let q: f64 = (0..a.nrows()).map(|i| uj[i] * bu[i]).sum();
        trace += q / l;
    }
    Ok(trace)
}

/// Class-mean matrix `g` (each row replaced by its class mean), centred, and its covariance.
fn class_mean_covariance(f: &Mat<f64>, labels: &[u32], k: usize, ddof: f64) -> Mat<f64> {
    let (n, d) = (f.nrows(), f.ncols());
    let mut means = vec![0.0; k * d];
    let mut counts = vec![0usize; k];
    for i in 0..n {
        let c = labels[i] as usize;
        counts[c] += 1;
        for j in 0..d {
            means[c * d + j] += f[(i, j)];
        }
    }
    for c in 0..k {
        for j in 0..d {
            means[c * d + j] /= counts[c].max(1) as f64;
        }
    }
    let g = Mat::from_fn(n, d, |i, j| means[labels[i] as usize * d + j]);
    covariance(&g, ddof)
}

/// Covariance of the columns, `ddof` as numpy (`np.cov`: 1).
fn covariance(x: &Mat<f64>, ddof: f64) -> Mat<f64> {
    let (n, d) = (x.nrows(), x.ncols());
    let mean: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|i| x[(i, j)]).sum::<f64>() / n as f64)
        .collect();
    let c = Mat::from_fn(n, d, |i, j| x[(i, j)] - mean[j]);
    let mut cov = c.transpose() * &c;
    let scale = 1.0 / (n as f64 - ddof);
    for i in 0..d {
        for j in 0..d {
            cov[(i, j)] *= scale;
        }
    }
    cov
}

/// H-score (Bao et al., ICIP 2019; as tllib `ranking/hscore.py` `h_score`):
/// `trace(pinv(cov(f)) cov(E[f | y]))`.
pub fn h_score(features: Matrix<'_>, labels: &[u32]) -> Result<f64> {
    let k = classes(labels, features.n, "H-score")?;
    let f = features.to_faer();
    let covf = covariance(&f, 1.0);
    let covg = class_mean_covariance(&f, labels, k, 1.0);
    trace_pinv_product(&covf, &covg)
}

/// Ledoit-Wolf shrinkage of the (biased) covariance of centred `x`, as scikit-learn's
/// `ledoit_wolf_shrinkage`; returns the shrinkage and the shrunk covariance.
fn ledoit_wolf(x: &Mat<f64>) -> (f64, Mat<f64>) {
    let (n, p) = (x.nrows() as f64, x.ncols());
    let emp = {
        let mut c = x.transpose() * x;
        for i in 0..p {
            for j in 0..p {
                c[(i, j)] /= n;
            }
        }
        c
    };
    let trace: f64 = (0..p).map(|i| emp[(i, i)]).sum();
    let mu = trace / p as f64;
    let x2 = Mat::from_fn(x.nrows(), p, |i, j| x[(i, j)] * x[(i, j)]);
    let x2tx2 = x2.transpose() * &x2;
    let mut beta_sum = 0.0;
    let mut delta_sum = 0.0;
    for i in 0..p {
        for j in 0..p {
            beta_sum += x2tx2[(i, j)];
            // (X^T X)_ij / n = emp_ij
            delta_sum += emp[(i, j)] * emp[(i, j)];
        }
    }
    let beta = (beta_sum / n - delta_sum) / (p as f64 * n);
    let delta = (delta_sum - 2.0 * mu * trace + p as f64 * mu * mu) / p as f64;
    let shrinkage = if beta == 0.0 {
        0.0
    } else {
        beta.min(delta) / delta
    };
    let mut shrunk = emp;
    for i in 0..p {
        for j in 0..p {
            shrunk[(i, j)] *= 1.0 - shrinkage;
        }
        shrunk[(i, i)] += shrinkage * mu;
    }
    (shrinkage, shrunk)
}

/// Shrinkage H-score (Ibrahim et al., ICLR 2023; as tllib `regularized_h_score`): the
/// H-score with the feature covariance replaced by its Ledoit-Wolf estimate and the class-mean
/// covariance scaled by `1 - shrinkage`.
pub fn shrinkage_h_score(features: Matrix<'_>, labels: &[u32]) -> Result<f64> {
    let k = classes(labels, features.n, "shrinkage H-score")?;
    let f = centred(features);
    let (shrinkage, covf) = ledoit_wolf(&f);
    let mut covg = class_mean_covariance(&f, labels, k, 1.0);
    for i in 0..covg.nrows() {
        for j in 0..covg.ncols() {
            covg[(i, j)] *= 1.0 - shrinkage;
        }
    }
    trace_pinv_product(&covf, &covg)
}

/// OTCE's transferability part (Tan et al., CVPR 2021; as `compute_otce_demo.py`): the exact
/// optimal coupling between uniform source and target samples under squared Euclidean cost,
/// then minus the conditional entropy `H(Y_T | Y_S)` of the coupled labels. Also returns
/// the transport cost.
pub fn otce(
    source: Matrix<'_>,
    source_labels: &[u32],
    target: Matrix<'_>,
    target_labels: &[u32],
) -> Result<(f64, f64)> {
    if source.d != target.d {
        return Err(Error::Invalid(format!(
            "OTCE needs features of one dimension, got {} and {}",
            source.d, target.d
        )));
    }
    let ks = classes(source_labels, source.n, "OTCE (source)")?;
    let kt = classes(target_labels, target.n, "OTCE (target)")?;
    let mut cost = vec![0.0; source.n * target.n];
    for i in 0..source.n {
        for j in 0..target.n {
            cost[i * target.n + j] = source
                .row(i)
                .iter()
                .zip(target.row(j))
                .map(|(a, b)| (a - b) * (a - b))
                .sum();
        }
    }
    let plan = ot::emd(&ot::uniform(source.n), &ot::uniform(target.n), &cost)?;
    let mut joint = vec![0.0; ks * kt];
    for &(i, j, x) in &plan.flows {
        joint[source_labels[i as usize] as usize * kt + target_labels[j as usize] as usize] += x;
    }
    let mut ce = 0.0;
    for s in 0..ks {
        let ps: f64 = joint[s * kt..(s + 1) * kt].iter().sum();
        for t in 0..kt {
            let p = joint[s * kt + t];
            if p > 0.0 {
                ce -= p * (p / ps).ln();
            }
        }
    }
    Ok((-ce, plan.cost))
}

/// Leave-one-out k-nearest-neighbour accuracy (Euclidean) of the target labels: each sample
/// is classified by a majority vote of its `k` nearest other samples; a tied vote goes to the
/// tied class with the nearest member. Distance ties are broken by the lower index.
pub fn knn_accuracy(features: Matrix<'_>, labels: &[u32], k: usize) -> Result<f64> {
    let n = features.n;
    let classes_n = classes(labels, n, "k-NN accuracy")?;
    if k == 0 || k >= n {
        return Err(Error::Invalid(format!(
            "k-NN accuracy needs 0 < k < n, got k = {k}, n = {n}"
        )));
    }
    let norms: Vec<f64> = (0..n)
        .map(|i| features.row(i).iter().map(|v| v * v).sum())
        .collect();
    let f = features.to_faer();
    let gram = &f * f.transpose();
    let mut hits = 0usize;
    let mut order: Vec<(f64, usize)> = Vec::with_capacity(n);
    for i in 0..n {
        order.clear();
        order.extend(
            (0..n)
                .filter(|&j| j != i)
                .map(|j| (norms[i] + norms[j] - 2.0 * gram[(i, j)], j)),
        );
        order.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let nearest = &mut order[..k];
        nearest.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut votes = vec![0usize; classes_n];
        for &(_, j) in nearest.iter() {
            votes[labels[j] as usize] += 1;
        }
        let top = votes.iter().copied().max().unwrap_or(0);
        let predicted = nearest
            .iter()
            .map(|&(_, j)| labels[j])
            .find(|&c| votes[c as usize] == top)
            .unwrap_or(0);
        if predicted == labels[i] {
            hits += 1;
        }
    }
    Ok(hits as f64 / n as f64)
}
