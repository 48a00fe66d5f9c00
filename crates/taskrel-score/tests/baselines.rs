//! Baseline scores against their reference implementations on fixed pseudo-random inputs.
//!
//! Inputs come from a 64-bit LCG that the Python below reproduces exactly. Reference values:
//! thuml/LogME `LogME.py`, `LEEP.py`, `NCE.py` (with `np.zeros((C_t, C_s))`, the shape as a
//! tuple), tllib `ranking/hscore.py` (`h_score`, `regularized_h_score`, scikit-learn 1.9.1
//! LedoitWolf), POT 0.9.7 `ot.emd` for OTCE, numpy 2.4.6, run as:
//!
//! ```python
//! def lcg(seed):
//!     s = seed
//!     while True:
//!         s = (s * 6364136223846793005 + 1442695040888963407) % 2**64
//!         yield (s >> 11) / 2**53
//! def features(n, d, k, seed):
//!     g = lcg(seed); y = np.array([i % k for i in range(n)])
//!     x = np.array([[next(g) - 0.5 + 0.3 * (j % k == y[i]) for j in range(d)] for i in range(n)])
//!     return x, y
//! def probabilities(n, cs, k, seed):
//!     g = lcg(seed); y = np.array([i % k for i in range(n)])
//!     logits = np.array([[2 * next(g) + 1.5 * (z == y[i] % cs) for z in range(cs)] for i in range(n)])
//!     p = np.exp(logits - logits.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
//!     return p, y
//! def knn(x, y, k):  # leave-one-out, vote ties to the nearest tied class
//!     n = len(y); hits = 0; d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
//!     for i in range(n):
//!         order = sorted([j for j in range(n) if j != i], key=lambda j: (d2[i, j], j))[:k]
//!         votes = np.bincount(y[order], minlength=y.max() + 1)
//!         hits += next(y[j] for j in order if votes[y[j]] == votes.max()) == y[i]
//!     return hits / n
//! for (n, d, k, seed) in [(60, 8, 3, 1), (20, 30, 4, 2)]:
//!     x, y = features(n, d, k, seed)
//!     print(LogME().fit(x, y), h_score(x, y), regularized_h_score(x, y), knn(x, y, 5))
//! p, y = probabilities(50, 5, 3, 3); print(LEEP(p, y), NCE(p.argmax(1), y))
//! xs, ys = features(40, 6, 4, 4); xt, yt = features(30, 6, 3, 5)
//! C = ((xs[:, None, :] - xt[None, :, :]) ** 2).sum(-1)
//! P = ot.emd(ot.unif(40), ot.unif(30), C, numItermax=100000)
//! joint = np.array([[P[np.ix_(ys == a, yt == b)].sum() for b in range(3)] for a in range(4)])
//! ce = -(joint[joint > 0] * np.log((joint / joint.sum(1, keepdims=True))[joint > 0])).sum()
//! print(-ce, (P * C).sum())   # OTCE's compute_CE, and the transport cost
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use taskrel_score::baselines::{self, Matrix};

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn features(n: usize, d: usize, k: usize, seed: u64) -> (Vec<f64>, Vec<u32>) {
    let mut g = Lcg(seed);
    let y: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
    let mut x = Vec::with_capacity(n * d);
    for yi in &y {
        for j in 0..d {
            let shift = if j % k == *yi as usize { 0.3 } else { 0.0 };
            x.push(g.next() - 0.5 + shift);
        }
    }
    (x, y)
}

fn probabilities(n: usize, cs: usize, k: usize, seed: u64) -> (Vec<f64>, Vec<u32>) {
    let mut g = Lcg(seed);
    let y: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
    let mut p = Vec::with_capacity(n * cs);
    for yi in &y {
        let logits: Vec<f64> = (0..cs)
            .map(|z| 2.0 * g.next() + if z == *yi as usize % cs { 1.5 } else { 0.0 })
            .collect();
        let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let s: f64 = e.iter().sum();
        p.extend(e.iter().map(|v| v / s));
    }
    (p, y)
}

fn close(got: f64, want: f64) {
    let rel = (got - want).abs() / want.abs().max(1e-12);
    assert!(
        rel <= 1e-6,
        "got {got}, reference {want} (relative error {rel:.2e})"
    );
}

#[test]
fn feature_scores_match_references() {
    // (n, d, k, seed) -> LogME, H-score, shrinkage H-score, 5-NN leave-one-out accuracy.
    let cases = [
        (
            (60, 8, 3, 1),
            [
                -0.6419757646037846,
                1.1031490980767966,
                0.7794991868570567,
                0.6666666666666666,
            ],
        ),
        // n < d: LogME through F F^T, a singular covariance through the pseudo-inverse.
        (
            (20, 30, 4, 2),
            [
                0.2257882669266525,
                3.000000000000002,
                1.4333615087800629,
                0.7,
            ],
        ),
    ];
    for ((n, d, k, seed), [logme, hscore, shrinkage, knn]) in cases {
        let (x, y) = features(n, d, k, seed);
        let m = Matrix::new(&x, n, d).unwrap();
        close(baselines::logme(m, &y).unwrap(), logme);
        close(baselines::h_score(m, &y).unwrap(), hscore);
        close(baselines::shrinkage_h_score(m, &y).unwrap(), shrinkage);
        close(baselines::knn_accuracy(m, &y, 5).unwrap(), knn);
    }
}

#[test]
fn head_and_transport_scores_match_references() {
    let (p, y) = probabilities(50, 5, 3, 3);
    let m = Matrix::new(&p, 50, 5).unwrap();
    close(baselines::leep(m, &y).unwrap(), -0.7816746101100265);
    let argmax: Vec<u32> = p
        .chunks(5)
        .map(|r| (0..5).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap() as u32)
        .collect();
    close(baselines::nce(&argmax, &y).unwrap(), -0.027725887222397813);

    let (xs, ys) = features(40, 6, 4, 4);
    let (xt, yt) = features(30, 6, 3, 5);
    let (score, cost) = baselines::otce(
        Matrix::new(&xs, 40, 6).unwrap(),
        &ys,
        Matrix::new(&xt, 30, 6).unwrap(),
        &yt,
    )
    .unwrap();
    close(score, -0.9353222167376649);
    close(cost, 0.44764229254467214);
}

#[test]
fn scores_refuse_inputs_they_cannot_use() {
    let (x, y) = features(20, 4, 2, 0);
    let m = Matrix::new(&x, 20, 4).unwrap();
    let one_class = vec![0u32; 20];
    let err = baselines::logme(m, &one_class).unwrap_err().to_string();
    assert!(err.contains("at least two classes"), "{err}");
    assert!(baselines::h_score(m, &y[..10]).is_err());
    assert!(Matrix::new(&x, 21, 4).is_err());
    let err = baselines::leep(m, &y).unwrap_err().to_string();
    assert!(err.contains("probabilities"), "{err}");
    assert!(baselines::knn_accuracy(m, &y, 20).is_err());
    let other = Matrix::new(&x[..40], 10, 4).unwrap();
    let wide = Matrix::new(&x[..30], 10, 3).unwrap();
    assert!(baselines::otce(other, &y[..10], wide, &y[..10]).is_err());
}
