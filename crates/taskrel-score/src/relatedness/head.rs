//! The reference head h_R and its held-out terms.

use super::*;

/// What h_R gives on the held-out reference sample.
pub(super) struct HeadTerms {
    pub(super) head: crate::classifier::LinearHead,
    /// `Lbar_R,j` on the evaluation sample (reported).
    pub(super) class_loss: Vec<f64>,
    /// `Lbar_R,j` on the fitting sample (the objective's class-loss term, as the authors
    /// compute it on training batches).
    pub(super) fit_class_loss: Vec<f64>,
    pub(super) accuracy: f64,
    pub(super) fit_accuracy: f64,
    /// Largest two-label gradient norm on the evaluation sample.
    pub(super) tau_reference: f64,
}

/// Trains h_R on the reference fitting sample and measures it on the evaluation sample.
pub(super) fn fit_head(inputs: &Inputs, cfg: &RelatednessConfig) -> Result<HeadTerms> {
    let (r, d) = (&inputs.r, inputs.d);
    let n_fit = r.members.iter().map(Vec::len).sum::<usize>();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(0x4ead));
    let mut idx = Vec::new();
    for pool in &r.members {
        let share = (cfg.head_samples as f64 * pool.len() as f64 / n_fit as f64).ceil() as usize;
        draw(pool, share.clamp(1, pool.len()), &mut rng, &mut idx);
    }
    let labels: Vec<u32> = idx.iter().map(|&i| r.label(i) as u32).collect();
    let head_cfg = HeadConfig {
        tau: cfg.tau,
        penalty: cfg.gradient_penalty,
        epochs: cfg.head_epochs,
        batch_size: cfg.head_batch_size,
        lr: cfg.head_lr,
        beta1: cfg.head_beta1,
        seed: cfg.seed.wrapping_add(0x4ead),
    };
    let head = train_head(&rows(&r.z, d, &idx), d, &labels, r.k, &head_cfg)?;
    let fit_hits = idx
        .iter()
        .filter(|&&i| argmax(&head.probabilities(&r.z[i * d..(i + 1) * d])) == r.label(i))
        .count();
    let mut fit_class_loss = vec![0f64; r.k];
    for (j, pool) in r.members.iter().enumerate() {
        for &i in pool {
            let p = head.probabilities(&r.z[i * d..(i + 1) * d]);
            fit_class_loss[j] -= p[j].max(1e-300).ln() / pool.len() as f64;
        }
    }
    let held = &inputs.r_eval;
    let held_labels = held.labels.as_deref().unwrap_or(&[]);
    let counts = members(held_labels, r.k);
    let mut class_loss = vec![0f64; r.k];
    let (mut tau_reference, mut hits) = (0f64, 0usize);
    let mut random = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(0xa11d));
    for (i, &y) in held_labels.iter().enumerate() {
        let zi = &held.z[i * d..(i + 1) * d];
        let u = random.random_range(0..r.k as u32);
        let (ce, norm) = head.loss_and_gradient_norm(zi, y, u);
        class_loss[y as usize] += ce / counts[y as usize].len() as f64;
        tau_reference = tau_reference.max(norm);
        hits += usize::from(argmax(&head.probabilities(zi)) == y as usize);
    }
    Ok(HeadTerms {
        head,
        class_loss,
        fit_class_loss,
        accuracy: hits as f64 / held.n as f64,
        fit_accuracy: fit_hits as f64 / idx.len() as f64,
        tau_reference,
    })
}
