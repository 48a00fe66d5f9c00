//! Correlation statistics between predicted scores and measured accuracies, with scipy's
//! semantics (`scipy.stats.pearsonr`, `spearmanr`, `kendalltau` (tau-b) and `weightedtau`
//! with its defaults), top-1 relative accuracy, and seeded bootstrap confidence intervals.
//!
//! Every function returns `NaN` where scipy does: fewer than two points, or a constant input.
//! The sample sizes here are small (tens to hundreds of cells), so the pair statistics are the
//! direct O(n^2) sums, which are exact and easy to check.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Pearson's r.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n < 2 {
        return f64::NAN;
    }
    // A constant input has no correlation (scipy returns NaN). Its computed mean need not
    // equal the values exactly, so the deviations below would not all be zero: test first.
    let constant = |v: &[f64]| v[..n].iter().all(|&a| a == v[0]);
    if constant(x) || constant(y) {
        return f64::NAN;
    }
    let mean = |v: &[f64]| v[..n].iter().sum::<f64>() / n as f64;
    let (mx, my) = (mean(x), mean(y));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (dx, dy) = (x[i] - mx, y[i] - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    (sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0)
}

/// Ranks from 1, ties sharing their average rank (`scipy.stats.rankdata(method="average")`).
pub fn rank_average(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && x[order[end]] == x[order[start]] {
            end += 1;
        }
        let average = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = average;
        }
        start = end;
    }
    ranks
}

/// Spearman's rho: Pearson's r of the average ranks.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&rank_average(x), &rank_average(y))
}

fn sign(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Sums over pairs `i < j` of `weight(i, j)`: (concordant minus discordant, not tied in x,
/// not tied in y).
fn pair_sums(x: &[f64], y: &[f64], weight: impl Fn(usize, usize) -> f64) -> (f64, f64, f64) {
    let (mut signed, mut untied_x, mut untied_y) = (0.0, 0.0, 0.0);
    for i in 0..x.len() {
        for j in i + 1..x.len() {
            let w = weight(i, j);
            let (sx, sy) = (sign(x[i] - x[j]), sign(y[i] - y[j]));
            signed += w * sx * sy;
            if sx != 0.0 {
                untied_x += w;
            }
            if sy != 0.0 {
                untied_y += w;
            }
        }
    }
    (signed, untied_x, untied_y)
}

/// Kendall's tau-b (scipy's default variant): ties in either variable shrink the denominator.
pub fn kendall_tau_b(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n < 2 {
        return f64::NAN;
    }
    let (signed, untied_x, untied_y) = pair_sums(&x[..n], &y[..n], |_, _| 1.0);
    if untied_x == 0.0 || untied_y == 0.0 {
        return f64::NAN;
    }
    (signed / (untied_x.sqrt() * untied_y.sqrt())).clamp(-1.0, 1.0)
}

/// Weighted tau with one importance ranking: rank 0 is the element with the largest `x`
/// (ties broken by the larger `y`, then by the later position, as scipy's `lexsort` order
/// reversed); the pair (i, j) weighs `1/(r_i + 1) + 1/(r_j + 1)` (hyperbolic, additive).
fn weighted_tau_ranked(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]).then(y[a].total_cmp(&y[b])));
    let mut rank = vec![0usize; n];
    for (r, &i) in order.iter().rev().enumerate() {
        rank[i] = r;
    }
    let weigh = |i: usize| 1.0 / (rank[i] as f64 + 1.0);
    let (signed, untied_x, untied_y) = pair_sums(x, y, |i, j| weigh(i) + weigh(j));
    if untied_x == 0.0 || untied_y == 0.0 {
        return f64::NAN;
    }
    signed / (untied_x.sqrt() * untied_y.sqrt())
}

/// Weighted Kendall tau with `scipy.stats.weightedtau` defaults (`rank=True`, hyperbolic
/// weigher, additive): the average of the values obtained ranking importance by `x` and by `y`.
/// Exchanges at the top (large values) weigh most.
pub fn weighted_tau(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n < 2 {
        return f64::NAN;
    }
    let (x, y) = (&x[..n], &y[..n]);
    (weighted_tau_ranked(x, y) + weighted_tau_ranked(y, x)) / 2.0
}

/// Accuracy of the item with the highest score (the first one on ties) divided by the best
/// accuracy: 1 when the score picks the best model.
pub fn top1_relative(score: &[f64], accuracy: &[f64]) -> f64 {
    let n = score.len().min(accuracy.len());
    let mut pick: Option<usize> = None;
    for i in 0..n {
        if score[i].is_nan() {
            continue;
        }
        if pick.is_none_or(|p| score[i] > score[p]) {
            pick = Some(i);
        }
    }
    let best = accuracy[..n]
        .iter()
        .copied()
        .filter(|a| !a.is_nan())
        .fold(f64::NEG_INFINITY, f64::max);
    match pick {
        Some(p) if best > 0.0 => accuracy[p] / best,
        _ => f64::NAN,
    }
}

/// A statistic with a bootstrap 95 % percentile interval.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

/// Resamples the pairs with replacement `resamples` times (ChaCha8 from `seed`), and returns
/// the statistic on the data with the 2.5 and 97.5 percentiles of the resampled values
/// (resamples where the statistic is undefined are skipped).
pub fn bootstrap(
    x: &[f64],
    y: &[f64],
    statistic: fn(&[f64], &[f64]) -> f64,
    resamples: usize,
    seed: u64,
) -> Estimate {
    let n = x.len().min(y.len());
    let value = statistic(&x[..n], &y[..n]);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut values = Vec::with_capacity(resamples);
    let (mut bx, mut by) = (vec![0.0; n], vec![0.0; n]);
    for _ in 0..if n < 3 { 0 } else { resamples } {
        for k in 0..n {
            let i = rng.random_range(0..n);
            bx[k] = x[i];
            by[k] = y[i];
        }
        let v = statistic(&bx, &by);
        if v.is_finite() {
            values.push(v);
        }
    }
    values.sort_by(f64::total_cmp);
    Estimate {
        value,
        low: percentile(&values, 2.5),
        high: percentile(&values, 97.5),
    }
}

/// The mean of `values` with the 2.5 and 97.5 percentiles of the means of `resamples`
/// resamples with replacement (ChaCha8 from `seed`); no interval below two values.
pub fn bootstrap_mean(values: &[f64], resamples: usize, seed: u64) -> Estimate {
    let n = values.len();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    if n == 0 {
        return Estimate {
            value: f64::NAN,
            low: f64::NAN,
            high: f64::NAN,
        };
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means = Vec::with_capacity(resamples);
    let mut drawn = vec![0.0; n];
    for _ in 0..if n < 2 { 0 } else { resamples } {
        for d in drawn.iter_mut() {
            *d = values[rng.random_range(0..n)];
        }
        means.push(mean(&drawn));
    }
    means.sort_by(f64::total_cmp);
    Estimate {
        value: mean(values),
        low: percentile(&means, 2.5),
        high: percentile(&means, 97.5),
    }
}

/// Linear-interpolated percentile of sorted values (numpy's default method).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let pos = q / 100.0 * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        }
    }
}

/// Least-squares line `y = slope * x + intercept`.
pub fn fit_line(x: &[f64], y: &[f64]) -> Option<(f64, f64)> {
    let n = x.len().min(y.len());
    if n < 2 {
        return None;
    }
    let mx = x[..n].iter().sum::<f64>() / n as f64;
    let my = y[..n].iter().sum::<f64>() / n as f64;
    let sxx: f64 = x[..n].iter().map(|v| (v - mx) * (v - mx)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = (0..n).map(|i| (x[i] - mx) * (y[i] - my)).sum();
    let slope = sxy / sxx;
    Some((slope, my - slope * mx))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-9, "{a} vs {b}");
    }

    // Reference values from scipy 1.17.1:
    //   import numpy as np, scipy.stats as st
    //   x, y = np.array(X, float), np.array(Y, float)
    //   st.pearsonr(x, y)[0], st.spearmanr(x, y)[0], st.kendalltau(x, y)[0], st.weightedtau(x, y)[0]
    const CASES: [(&[f64], &[f64], [f64; 4]); 3] = [
        (
            &[0.12, 0.55, 0.31, 0.87, 0.44, 0.91, 0.05, 0.66],
            &[0.30, 0.52, 0.41, 0.80, 0.35, 0.95, 0.10, 0.60],
            [
                0.9609037353663691,
                0.9761904761904763,
                0.9285714285714285,
                0.9614542268944369,
            ],
        ),
        // Ties in x, in y and in both.
        (
            &[1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 4.0, 5.0, 5.0, 6.0],
            &[2.0, 1.0, 3.0, 3.0, 3.0, 5.0, 4.0, 6.0, 6.0, 5.0],
            [
                0.826839467166563,
                0.8553459119496856,
                0.7249999999999999,
                0.6815627001515006,
            ],
        ),
        // A bound against accuracy: lower bound, higher accuracy.
        (
            &[2.1, 1.7, 0.4, 1.2, 3.3, 0.9, 2.8],
            &[0.61, 0.72, 0.95, 0.83, 0.31, 0.88, 0.52],
            [-0.9883293101398715, -1.0, -1.0, -1.0],
        ),
    ];

    #[test]
    fn correlations_match_scipy() {
        for (x, y, [p, s, k, w]) in CASES {
            close(pearson(x, y), p);
            close(spearman(x, y), s);
            close(kendall_tau_b(x, y), k);
            close(weighted_tau(x, y), w);
        }
    }

    #[test]
    fn pearson_of_a_constant_input_is_nan_as_in_scipy() {
        // scipy.stats.pearsonr([0.1] * 3, [1, 2, 3]) -> nan (ConstantInputWarning). The mean
        // of three 0.1s is 0.10000000000000002, so testing the deviations would miss it.
        let x = [0.1, 0.1, 0.1];
        assert_ne!(x.iter().sum::<f64>() / 3.0, 0.1);
        assert!(pearson(&x, &[1.0, 2.0, 3.0]).is_nan());
        assert!(pearson(&[1.0, 2.0, 3.0], &x).is_nan());
        // scipy.stats.pearsonr([0.1, 0.1, 0.2], [1, 2, 3]).statistic = 0.8660254037844386
        assert!(
            (pearson(&[0.1, 0.1, 0.2], &[1.0, 2.0, 3.0]) - 0.866_025_403_784_438_6).abs() < 1e-12
        );
    }

    #[test]
    fn average_ranks_and_degenerate_inputs() {
        // scipy.stats.rankdata([3, 1, 3, 2, 3]) = [4, 1, 4, 2, 4]
        assert_eq!(
            rank_average(&[3.0, 1.0, 3.0, 2.0, 3.0]),
            [4.0, 1.0, 4.0, 2.0, 4.0]
        );
        assert!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
        assert!(kendall_tau_b(&[1.0], &[2.0]).is_nan());
        assert!(weighted_tau(&[2.0, 2.0], &[1.0, 3.0]).is_nan());
    }

    #[test]
    fn top1_and_bootstrap() {
        let score = [0.2, 0.9, 0.5];
        let acc = [0.8, 0.6, 0.75];
        close(top1_relative(&score, &acc), 0.6 / 0.8);
        close(top1_relative(&[0.9, 0.1, 0.5], &acc), 1.0);
        let (x, y, [p, ..]) = CASES[0];
        let a = bootstrap(x, y, pearson, 500, 7);
        let b = bootstrap(x, y, pearson, 500, 7);
        assert_eq!(a, b, "bootstrap must be reproducible for a seed");
        close(a.value, p);
        assert!(
            a.low <= a.value && a.value <= a.high && a.low > 0.5,
            "{a:?}"
        );
        // numpy.percentile([1, 2, 3, 4], 2.5) = 1.075
        close(percentile(&[1.0, 2.0, 3.0, 4.0], 2.5), 1.075);
        let (slope, intercept) = fit_line(&[0.0, 1.0, 2.0], &[1.0, 3.0, 5.0]).unwrap();
        close(slope, 2.0);
        close(intercept, 1.0);
    }
}
