//! Specification of the score crate: optimal transport against POT, and task-relatedness
//! sanity on constructed and real features.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use candle_core::Device;
use taskrel_score::ot::{self, SinkhornConfig};

/// The 32-bit LCG both these tests and the Python reference scripts use for inputs:
/// `s = (1664525 s + 1013904223) mod 2^32`, value `s / 2^32`.
fn lcg(seed: u64, k: usize) -> Vec<f64> {
    let mut s = seed;
    (0..k)
        .map(|_| {
            s = (1664525 * s + 1013904223) % (1 << 32);
            s as f64 / (1u64 << 32) as f64
        })
        .collect()
}

struct Problem {
    a: Vec<f64>,
    b: Vec<f64>,
    cost: Vec<f64>,
}

/// Points `x (n, d)` from `lcg(seed)`, `y (m, d)` from `lcg(seed + 1) + 0.25`, both rounded to
/// f32; Euclidean cost in f64; weights uniform or `lcg + 0.1` normalised.
fn problem(seed: u64, n: usize, m: usize, d: usize, uniform: bool) -> Problem {
    let x: Vec<f64> = lcg(seed, n * d)
        .into_iter()
        .map(|v| f64::from(v as f32))
        .collect();
    let y: Vec<f64> = lcg(seed + 1, m * d)
        .into_iter()
        .map(|v| f64::from((v + 0.25) as f32))
        .collect();
    let mut cost = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            cost[i * m + j] = (0..d)
                .map(|k| (x[i * d + k] - y[j * d + k]).powi(2))
                .sum::<f64>()
                .sqrt();
        }
    }
    let weights = |s: u64, k: usize| {
        if uniform {
            vec![1.0 / k as f64; k]
        } else {
            let w: Vec<f64> = lcg(s, k).into_iter().map(|v| v + 0.1).collect();
            let t: f64 = w.iter().sum();
            w.into_iter().map(|v| v / t).collect()
        }
    };
    Problem {
        a: weights(seed + 2, n),
        b: weights(seed + 3, m),
        cost,
    }
}

// Reference values: POT 0.9 `ot.emd2(a, b, M, numItermax=10**8)` on the same inputs, built in
// numpy exactly as `problem` does:
//   def lcg(seed, k): s = seed; out = []
//       for _ in range(k): s = (1664525 * s + 1013904223) % 2**32; out.append(s / 2**32)
//       return np.array(out)
//   x = lcg(seed, n*d).reshape(n, d).astype(np.float32)
//   y = (lcg(seed+1, m*d).reshape(m, d) + 0.25).astype(np.float32)
//   a, b = uniform or (lcg(seed+2, n) + 0.1) / sum, (lcg(seed+3, m) + 0.1) / sum
//   M = np.sqrt(((x[:, None, :].astype(np.float64) - y[None, :, :]) ** 2).sum(-1))
const POT_EMD2: [(u64, usize, usize, usize, bool, f64); 4] = [
    (1, 50, 70, 5, false, 0.7036476928383248),
    (2, 200, 200, 8, true, 0.8191167919222314),
    (3, 500, 400, 16, false, 1.4043917824421355),
    (4, 1000, 1000, 10, true, 0.9421352169032329),
];

fn assert_marginals(plan: &ot::Plan, a: &[f64], b: &[f64]) {
    for (got, want) in plan.row_sums(a.len()).iter().zip(a) {
        assert!((got - want).abs() < 1e-12, "row sum {got} vs {want}");
    }
    for (got, want) in plan.col_sums(b.len()).iter().zip(b) {
        assert!((got - want).abs() < 1e-12, "column sum {got} vs {want}");
    }
    assert!(plan.flows.iter().all(|&(_, _, x)| x > 0.0));
}

#[test]
fn emd_matches_pot() {
    for (seed, n, m, d, uniform, expected) in POT_EMD2 {
        let p = problem(seed, n, m, d, uniform);
        let plan = ot::emd(&p.a, &p.b, &p.cost).unwrap();
        let rel = (plan.cost - expected).abs() / expected;
        assert!(
            rel < 1e-6,
            "seed {seed} n {n} m {m}: {} vs POT {expected} (rel {rel:e})",
            plan.cost
        );
        assert_marginals(&plan, &p.a, &p.b);
        assert!(
            plan.flows.len() < n + m,
            "a basic solution has at most n + m - 1 arcs"
        );
    }
}

#[test]
fn emd_of_a_cloud_with_itself_is_zero_and_permutation_invariant() {
    let p = problem(9, 120, 120, 6, true);
    let x: Vec<f32> = lcg(9, 120 * 6).into_iter().map(|v| v as f32).collect();
    assert!(ot::wasserstein1(&x, &x, 6).unwrap().abs() < 1e-12);
    // Reversing the rows of the first cloud permutes the cost rows: same optimum.
    let base = ot::emd(&p.a, &p.b, &p.cost).unwrap().cost;
    let reversed: Vec<f64> = (0..120)
        .rev()
        .flat_map(|i| p.cost[i * 120..(i + 1) * 120].to_vec())
        .collect();
    let again = ot::emd(&p.a, &p.b, &reversed).unwrap().cost;
    assert!(
        (base - again).abs() < 1e-12 * base.max(1.0),
        "{base} vs {again}"
    );
}

#[test]
fn emd_rejects_bad_inputs() {
    let err = ot::emd(&[0.5, 0.5], &[1.0], &[1.0, f64::NAN])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cost (1, 0) is NaN"), "{err}");
    let err = ot::emd(&[0.5, 0.6], &[1.0], &[1.0, 1.0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected equal positive totals"), "{err}");
    let err = ot::emd(&[], &[1.0], &[]).unwrap_err().to_string();
    assert!(err.contains("source weights are empty"), "{err}");
}

#[test]
fn sinkhorn_tends_to_emd_as_eps_shrinks() {
    let p = problem(1, 50, 70, 5, false);
    let exact = 0.7036476928383248;
    let mut previous_gap = f64::INFINITY;
    for eps in [0.1, 0.03, 0.01, 0.003] {
        let cfg = SinkhornConfig {
            eps,
            max_iter: 20_000,
            tol: 1e-10,
        };
        let s = ot::sinkhorn(&p.a, &p.b, &p.cost, &cfg, &Device::Cpu).unwrap();
        let gap = s.cost - exact;
        assert!(
            gap > -1e-9,
            "entropic plans cannot beat the exact optimum: gap {gap}"
        );
        assert!(
            gap < previous_gap,
            "eps {eps}: gap {gap} did not shrink from {previous_gap}"
        );
        previous_gap = gap;
    }
    assert!(previous_gap < 5e-3 * exact, "eps 0.003 gap {previous_gap}");
}
