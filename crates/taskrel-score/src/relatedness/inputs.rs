//! Inputs: checks, standardisation per domain, fitting and evaluation rows, class members.

use super::*;

/// Per-column z-scoring fitted on one sample, `(x - mean) / std` with the population std, as
/// scikit-learn's `StandardScaler` (the authors' code) does it: a column that is constant on
/// the fitting sample (a ReLU unit that never fires there, common with a few dozen images
/// per class) keeps scale 1, so held-out values of that column stay finite instead of being
/// divided by a floor (with a 1e-6 floor, W on held-out MNIST CNN features was 18,821).
pub(super) struct Scaler {
    pub(super) mean: Vec<f64>,
    pub(super) std: Vec<f64>,
    /// Columns with a spread (the others keep scale 1).
    pub(super) varying: usize,
}

impl Scaler {
    pub(super) fn fit(set: &FeatureSet) -> Self {
        let (n, d) = (set.n as f64, set.d);
        let mut mean = vec![0f64; d];
        for i in 0..set.n {
            for (m, &v) in mean.iter_mut().zip(set.row(i)) {
                *m += f64::from(v);
            }
        }
        for m in &mut mean {
            *m /= n;
        }
        // Two passes, so that a constant column has exactly zero spread.
        let mut sq = vec![0f64; d];
        for i in 0..set.n {
            for ((s, &v), m) in sq.iter_mut().zip(set.row(i)).zip(&mean) {
                *s += (f64::from(v) - m).powi(2);
            }
        }
        let spread: Vec<Option<f64>> = sq
            .iter()
            .zip(&mean)
            .map(|(s, m)| {
                let std = (s / n).sqrt();
                (std >= 10.0 * f64::from(f32::EPSILON) * m.abs().max(1.0)).then_some(std)
            })
            .collect();
        Self {
            varying: spread.iter().flatten().count(),
            std: spread.iter().map(|s| s.unwrap_or(1.0)).collect(),
            mean,
        }
    }

    /// Row-major standardised copy of `set`.
    pub(super) fn apply(&self, set: &FeatureSet) -> Vec<f32> {
        let mut out = Vec::with_capacity(set.n * set.d);
        for i in 0..set.n {
            out.extend(
                set.row(i)
                    .iter()
                    .enumerate()
                    .map(|(t, &v)| ((f64::from(v) - self.mean[t]) / self.std[t]) as f32),
            );
        }
        out
    }
}

pub(super) fn members(labels: &[u32], k: usize) -> Vec<Vec<usize>> {
    let mut m = vec![Vec::new(); k];
    for (i, &y) in labels.iter().enumerate() {
        m[y as usize].push(i);
    }
    m
}

/// `count` members drawn without replacement (with replacement past the class size).
pub(super) fn draw(pool: &[usize], count: usize, rng: &mut ChaCha8Rng, out: &mut Vec<usize>) {
    if pool.is_empty() || count == 0 {
        return;
    }
    if count <= pool.len() {
        out.extend(pool.choose_multiple(rng, count).copied());
    } else {
        out.extend((0..count).map(|_| pool[rng.random_range(0..pool.len())]));
    }
}

pub(super) fn rows(z: &[f32], d: usize, idx: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(idx.len() * d);
    for &i in idx {
        out.extend_from_slice(&z[i * d..(i + 1) * d]);
    }
    out
}

pub(super) fn argmax(v: &[f64]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 { (i, x) } else { best }
        })
        .0
}

/// One domain's standardised fitting sample (what the variables are learned on).
pub(super) struct Domain {
    pub(super) z: Vec<f32>,
    pub(super) labels: Option<Vec<u32>>,
    pub(super) k: usize,
    pub(super) prior: Vec<f64>,
    pub(super) members: Vec<Vec<usize>>,
}

impl Domain {
    /// Label of sample `i` (0 for an unlabelled domain, which has a single pseudo-class).
    pub(super) fn label(&self, i: usize) -> usize {
        self.labels.as_ref().map_or(0, |l| l[i] as usize)
    }
}

/// One domain's standardised evaluation sample (at most `eval_per_class` per class).
pub(super) struct Held {
    pub(super) z: Vec<f32>,
    pub(super) labels: Option<Vec<u32>>,
    /// Labels present but ignored (label-free mode), to report the pseudo-labels' agreement.
    pub(super) hidden: Option<Vec<u32>>,
    pub(super) n: usize,
}

/// Number of classes a labelled set spans (its class names, or its largest label + 1).
pub(super) fn class_count(set: &FeatureSet, labels: &[u32]) -> usize {
    set.classes
        .len()
        .max(labels.iter().map(|&y| y as usize + 1).max().unwrap_or(0))
}

/// Up to `per_class` rows of each class of `labels` (all rows, as one class, when `None`),
/// drawn without replacement, grouped by class.
pub(super) fn eval_rows(
    labels: Option<&[u32]>,
    n: usize,
    k: usize,
    per_class: usize,
    seed: u64,
) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let pools = match labels {
        Some(l) => members(l, k),
        None => vec![(0..n).collect()],
    };
    let cap = if labels.is_some() {
        per_class
    } else {
        per_class * k
    };
    let mut out = Vec::new();
    for pool in &pools {
        draw(pool, pool.len().min(cap), &mut rng, &mut out);
    }
    out
}

/// The checked inputs: both domains standardised with scalers fitted on their fitting samples.
pub(super) struct Inputs {
    pub(super) r: Domain,
    pub(super) t: Domain,
    pub(super) r_eval: Held,
    pub(super) t_eval: Held,
    pub(super) labelled: bool,
    pub(super) d: usize,
}

pub(super) fn check_inputs(
    reference: Samples,
    target: Samples,
    cfg: &RelatednessConfig,
    warnings: &mut Vec<String>,
) -> Result<Inputs> {
    let d = reference.fit.d;
    for (what, set) in [
        ("reference evaluation", reference.eval),
        ("target fitting", target.fit),
        ("target evaluation", target.eval),
    ] {
        if set.d != d {
            return Err(Error::Invalid(format!(
                "reference fitting features have {d} dimensions, {what} features {}: all must come from the same encoder",
                set.d
            )));
        }
    }
    for (what, set) in [
        ("reference fitting", reference.fit),
        ("reference evaluation", reference.eval),
        ("target fitting", target.fit),
        ("target evaluation", target.eval),
    ] {
        if set.n == 0 {
            return Err(Error::Invalid(format!("{what} features have no samples")));
        }
    }
    if let Some((field, message)) = cfg.problems().into_iter().next() {
        return Err(Error::Invalid(format!(
            "relatedness setting {field}: {message}"
        )));
    }
    let need_labels = |set: &'_ FeatureSet, what: &str| {
        set.labels.clone().ok_or_else(|| {
            Error::Invalid(format!(
                "{what} features need labels (the reference task is supervised)"
            ))
        })
    };
    let ref_labels = need_labels(reference.fit, "reference fitting")?;
    let ref_eval_labels = need_labels(reference.eval, "reference evaluation")?;
    let k_r =
        class_count(reference.fit, &ref_labels).max(class_count(reference.eval, &ref_eval_labels));
    let ref_members = members(&ref_labels, k_r);
    let eval_counts = members(&ref_eval_labels, k_r);
    for (what, m) in [("fitting", &ref_members), ("evaluation", &eval_counts)] {
        if let Some(empty) = m.iter().position(Vec::is_empty) {
            return Err(Error::Invalid(format!(
                "reference class {empty} ({}) has no {what} samples; drop it or sample every class",
                reference
                    .fit
                    .classes
                    .get(empty)
                    .map_or("unnamed", String::as_str)
            )));
        }
    }
    let labelled = !cfg.unlabeled && target.fit.labels.is_some();
    if labelled && target.eval.labels.is_none() {
        return Err(Error::Invalid(
            "target fitting features are labelled but the evaluation features are not: give both labels or use label-free mode".into(),
        ));
    }
    if !labelled && cfg.variant == Variant::LearnedA {
        return Err(Error::Invalid(
            "variant learned_a needs target labels; use learned_all or fixed_all without them"
                .into(),
        ));
    }
    if k_r < 2 {
        return Err(Error::Invalid(format!(
            "the reference task has {k_r} class; task-relatedness needs at least two"
        )));
    }
    if let Some(few) = ref_members.iter().position(|m| m.len() < 2) {
        return Err(Error::Invalid(format!(
            "reference class {few} ({}) has 1 fitting sample; at least two per class are needed",
            reference
                .fit
                .classes
                .get(few)
                .map_or("unnamed", String::as_str)
        )));
    }
    if target.fit.n < 2 {
        return Err(Error::Invalid(format!(
            "the target fitting sample has {} sample; at least two are needed",
            target.fit.n
        )));
    }
    let r_scaler = Scaler::fit(reference.fit);
    let t_scaler = Scaler::fit(target.fit);
    for (what, scaler, set) in [
        ("reference", &r_scaler, reference.fit),
        ("target", &t_scaler, target.fit),
    ] {
        if scaler.varying == 0 {
            return Err(Error::Invalid(format!(
                "{what} fitting features are constant: all {} samples have the same {} values (identical inputs, or an encoder that ignores them), so there is no distribution to compare",
                set.n, set.d
            )));
        }
    }
    let distinct = {
        let mut rows: Vec<&[f32]> = (0..target.fit.n).map(|i| target.fit.row(i)).collect();
        rows.sort_by(|a, b| {
            a.iter()
                .map(|v| v.to_bits())
                .cmp(b.iter().map(|v| v.to_bits()))
        });
        rows.dedup_by(|a, b| {
            a.iter()
                .map(|v| v.to_bits())
                .eq(b.iter().map(|v| v.to_bits()))
        });
        rows.len()
    };
    if 2 * distinct < target.fit.n {
        warnings.push(format!(
            "{} of the {} target fitting samples repeat another's features exactly",
            target.fit.n - distinct,
            target.fit.n
        ));
    }
    let r = Domain {
        z: r_scaler.apply(reference.fit),
        prior: ref_members
            .iter()
            .map(|m| m.len() as f64 / reference.fit.n as f64)
            .collect(),
        labels: Some(ref_labels),
        k: k_r,
        members: ref_members,
    };
    let (t, t_eval_labels) = if labelled {
        let labels = target.fit.labels.clone().unwrap_or_default();
        let eval_labels = target.eval.labels.clone().unwrap_or_default();
        let k_t = class_count(target.fit, &labels).max(class_count(target.eval, &eval_labels));
        let m = members(&labels, k_t);
        let present = m.iter().filter(|mk| !mk.is_empty()).count();
        if present < 2 {
            return Err(Error::Invalid(format!(
                "the target fitting sample has {present} class with samples; task-relatedness with target labels needs at least two (or use label-free mode)"
            )));
        }
        if let Some(one) = m.iter().position(|mk| mk.len() == 1) {
            return Err(Error::Invalid(format!(
                "target class {one} ({}) has 1 fitting sample; at least two per class are needed",
                target
                    .fit
                    .classes
                    .get(one)
                    .map_or("unnamed", String::as_str)
            )));
        }
        for (k, mk) in m.iter().enumerate() {
            if mk.is_empty() {
                warnings.push(format!(
                    "target class {k} has no fitting samples: it gets prior 0 and no Wasserstein block"
                ));
            }
        }
        let t = Domain {
            z: t_scaler.apply(target.fit),
            prior: m
                .iter()
                .map(|mk| mk.len() as f64 / target.fit.n as f64)
                .collect(),
            labels: Some(labels),
            k: k_t,
            members: m,
        };
        (t, Some(eval_labels))
    } else {
        // One pseudo-class holding every sample, so batches are M points drawn from all.
        let t = Domain {
            z: t_scaler.apply(target.fit),
            labels: None,
            k: 1,
            prior: vec![1.0],
            members: vec![(0..target.fit.n).collect()],
        };
        (t, None)
    };
    if labelled && cfg.variant != Variant::LearnedAll && t.k != r.k {
        return Err(Error::Invalid(format!(
            "variant {} fixes B to the identity, which needs as many target classes as reference classes ({} vs {})",
            cfg.variant.as_str(),
            t.k,
            r.k
        )));
    }
    let held = |set: &FeatureSet, scaler: &Scaler, labels: Option<&[u32]>, k: usize, salt: u64| {
        let rows_kept = eval_rows(
            labels,
            set.n,
            k,
            cfg.eval_per_class,
            cfg.seed.wrapping_add(salt),
        );
        let z = scaler.apply(set);
        let pick = |l: &[u32]| rows_kept.iter().map(|&i| l[i]).collect::<Vec<u32>>();
        Held {
            z: rows(&z, d, &rows_kept),
            labels: labels.map(pick),
            // Agreement is only meaningful when the label sets can coincide.
            hidden: match labels {
                Some(_) => None,
                None => set
                    .labels
                    .as_deref()
                    .filter(|_| set.classes.len() == k_r)
                    .map(pick),
            },
            n: rows_kept.len(),
        }
    };
    let r_eval = held(
        reference.eval,
        &r_scaler,
        Some(&ref_eval_labels),
        k_r,
        0x5eed,
    );
    let t_eval = held(
        target.eval,
        &t_scaler,
        t_eval_labels.as_deref(),
        t.k.max(k_r),
        0x7e57,
    );
    Ok(Inputs {
        r,
        t,
        r_eval,
        t_eval,
        labelled,
        d,
    })
}
