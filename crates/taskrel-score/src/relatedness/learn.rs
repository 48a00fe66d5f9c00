//! The alternating loop: batches, plans, steps of D, B, A, b and A'.

use super::*;

/// One iteration's batches: `floor(M D_j)` reference samples of class j and `floor(M p_T,k)`
/// target samples of class k (M of them, drawn from all, for an unlabelled target).
pub(super) fn draw_batches(
    r: &Domain,
    t: &Domain,
    prior_now: &[f64],
    batch_size: usize,
    rng: &mut ChaCha8Rng,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let mut ri = Vec::with_capacity(batch_size);
    for (j, pool) in r.members.iter().enumerate() {
        let count = (batch_size as f64 * prior_now[j]).floor() as usize;
        draw(pool, count, rng, &mut ri);
    }
    let mut ti = Vec::with_capacity(batch_size);
    for (k, pool) in t.members.iter().enumerate() {
        let count = (batch_size as f64 * t.prior[k]).floor() as usize;
        draw(pool, count, rng, &mut ti);
    }
    if ri.is_empty() || ti.is_empty() {
        return Err(Error::Invalid(format!(
            "batch size {batch_size} too small to sample every domain"
        )));
    }
    Ok((ri, ti))
}

/// The learned variables after the alternating optimisation on the fitting samples.
pub(super) struct Learned {
    pub(super) x: Transform,
    pub(super) learn_b: bool,
    pub(super) learn_prior: bool,
    pub(super) iterations: usize,
    pub(super) optimisation_seconds: f64,
    pub(super) transport_seconds: f64,
}

pub(super) fn learn(
    inputs: &Inputs,
    class_loss: &[f64],
    cfg: &RelatednessConfig,
    blocks: &Blocks,
) -> Result<Learned> {
    let (r, t, d, labelled) = (&inputs.r, &inputs.t, inputs.d, inputs.labelled);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let learn_b = labelled && cfg.variant == Variant::LearnedAll;
    let mut x = if !learn_b {
        Transform::identity(d, &identity(t.k, r.k), &r.prior)
    } else if cfg.label_map_init == LabelMapInit::Random {
        // The draws are the logits themselves, as in the authors' code.
        let mut x = Transform::identity(d, &identity(t.k, r.k), &r.prior);
        x.b_logits = (0..t.k * r.k).map(|_| rng.random::<f64>()).collect();
        x
    } else {
        Transform::identity(
            d,
            &initial_label_map(r, t, d, cfg, &mut rng, blocks)?,
            &r.prior,
        )
    };
    let terms = LabelTerms {
        class_loss,
        target_prior: &t.prior,
        label_weight: cfg.label_weight,
    };
    let learn_prior = labelled && cfg.variant != Variant::FixedAll;
    let (mut opt_a, mut opt_a_inv, mut opt_shift) = (
        Adam::new(d * d, cfg.lr),
        Adam::new(d * d, cfg.lr),
        Adam::new(d, cfg.lr),
    );
    let (mut opt_b, mut opt_prior) = (Adam::new(t.k * r.k, cfg.lr), Adam::new(r.k, cfg.lr_prior));
    let iterations = if cfg.variant == Variant::FixedAll {
        0
    } else {
        cfg.iterations
    };
    let opt_start = Instant::now();
    let mut transport_seconds = 0.0;
    let mut scratch = ot::LabelledScratch::default();
    for _ in 0..iterations {
        // (1) Seeded batches.
        let prior_now = if learn_prior {
            softmax(&x.d_logits)
        } else {
            r.prior.clone()
        };
        let (ri, ti) = draw_batches(r, t, &prior_now, cfg.batch_size, &mut rng)?;
        // (2) Plan on the current transformation.
        let zr = rows(&r.z, d, &ri);
        let zt = rows(&t.z, d, &ti);
        let moved = x.apply(&zr, d);
        let b_now = x.label_map();
        let t_solve = Instant::now();
        // The step's terms that depend on A and A' only are computed on the other core while
        // the plan is solved.
        let (plan, orth) = rayon::join(
            || {
                batch_plan(
                    r,
                    t,
                    &ri,
                    &ti,
                    &moved,
                    &zt,
                    d,
                    &b_now,
                    labelled,
                    cfg,
                    blocks,
                    &mut scratch,
                )
            },
            || orthogonality(&x),
        );
        let plan = plan?;
        transport_seconds += t_solve.elapsed().as_secs_f64();
        if plan.is_empty() {
            continue;
        }
        // (3) One Adam step on the objective.
        let batch = Batch {
            zr: &zr,
            moved: &moved,
            zt: &zt,
            plan: &plan,
            ref_labels: &ri.iter().map(|&i| r.label(i)).collect::<Vec<_>>(),
            target_labels: &ti.iter().map(|&i| t.label(i)).collect::<Vec<_>>(),
        };
        let g = objective(&x, &batch, labelled.then_some(&terms), orth);
        opt_a.step(&mut x.a, &g.a);
        opt_a_inv.step(&mut x.a_inv, &g.a_inv);
        opt_shift.step(&mut x.shift, &g.shift);
        if learn_b {
            opt_b.step(&mut x.b_logits, &g.b_logits);
        }
        if learn_prior {
            opt_prior.step(&mut x.d_logits, &g.d_logits);
        }
    }
    Ok(Learned {
        x,
        learn_b,
        learn_prior,
        iterations,
        optimisation_seconds: opt_start.elapsed().as_secs_f64(),
        transport_seconds,
    })
}
