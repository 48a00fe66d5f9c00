//! The reported terms, measured on the evaluation samples.

use super::*;

/// The reported terms, measured on the evaluation samples.
pub(super) struct FinalTerms {
    pub(super) reference_loss: f64,
    pub(super) label_entropy: f64,
    pub(super) wasserstein: f64,
    pub(super) tau: f64,
    pub(super) target_accuracy: Option<f64>,
    pub(super) target_loss: Option<f64>,
    pub(super) pseudo_label_accuracy: Option<f64>,
    pub(super) prior: Vec<f64>,
    pub(super) label_map: Vec<Vec<f64>>,
}

pub(super) fn final_terms(
    inputs: &Inputs,
    head: &HeadTerms,
    learned: &Learned,
    cfg: &RelatednessConfig,
    blocks: &Blocks,
    warnings: &mut Vec<String>,
) -> Result<FinalTerms> {
    let (r, t, d) = (&inputs.r, &inputs.t, inputs.d);
    let (r_eval, t_eval) = (&inputs.r_eval, &inputs.t_eval);
    let x = &learned.x;
    let prior = if learned.learn_prior {
        softmax(&x.d_logits)
    } else {
        r.prior.clone()
    };
    let r_labels = r_eval.labels.as_deref().unwrap_or(&[]);
    // Target evaluation points taken back to the reference domain: A'(z' - b).
    let back = x.apply_inverse(&t_eval.z, d);
    let moved = x.apply(&r_eval.z, d);
    let probs: Vec<Vec<f64>> = (0..t_eval.n)
        .map(|i| head.head.probabilities(&back[i * d..(i + 1) * d]))
        .collect();
    let (label_map, wasserstein, pseudo_label_accuracy) = match &t_eval.labels {
        Some(t_labels) => {
            let b = if learned.learn_b {
                x.label_map()
            } else {
                identity(t.k, r.k).concat()
            };
            let map: Vec<Vec<f64>> = (0..t.k)
                .map(|k| b[k * r.k..(k + 1) * r.k].to_vec())
                .collect();
            let assigned: Vec<usize> = (0..r.k)
                .map(|j| argmax(&(0..t.k).map(|k| map[k][j]).collect::<Vec<f64>>()))
                .collect();
            let (mut total, mut counted) = (0.0, 0usize);
            for (k, pool) in members(t_labels, t.k).iter().enumerate() {
                if pool.is_empty() {
                    continue;
                }
                let mut xs: Vec<usize> = (0..r_eval.n)
                    .filter(|&p| assigned[r_labels[p] as usize] == k)
                    .collect();
                if xs.is_empty() {
                    warnings.push(format!("no reference class maps to target class {k}: its Wasserstein block uses all reference samples"));
                    xs = (0..r_eval.n).collect();
                }
                let (cost, _) =
                    blocks.solve(&rows(&moved, d, &xs), &rows(&t_eval.z, d, pool), d, 1.0)?;
                total += cost;
                counted += 1;
            }
            (map, total / counted.max(1) as f64, None)
        }
        None => {
            let (cost, plan) = blocks.solve(&moved, &t_eval.z, d, 1.0)?;
            // Pseudo-labels: the transformed classifier's prediction at each target point.
            let pseudo: Vec<usize> = probs.iter().map(|p| argmax(p)).collect();
            let mut map = vec![vec![0f64; r.k]; r.k];
            let mut sent = vec![0f64; r.k];
            for &(i, l, v) in &plan {
                let j = r_labels[i] as usize;
                map[pseudo[l]][j] += v;
                sent[j] += v;
            }
            for row in &mut map {
                for (j, v) in row.iter_mut().enumerate() {
                    *v /= sent[j].max(1e-300);
                }
            }
            let agreement = t_eval.hidden.as_ref().map(|labels| {
                labels
                    .iter()
                    .zip(&pseudo)
                    .filter(|(y, p)| **y as usize == **p)
                    .count() as f64
                    / t_eval.n as f64
            });
            (map, cost, agreement)
        }
    };
    let reference_loss: f64 = prior.iter().zip(&head.class_loss).map(|(p, l)| p * l).sum();
    let label_entropy: f64 = -(0..r.k)
        .map(|j| {
            prior[j]
                * (0..label_map.len())
                    .map(|k| {
                        let b = label_map[k][j];
                        if b > 0.0 { b * b.ln() } else { 0.0 }
                    })
                    .sum::<f64>()
        })
        .sum::<f64>();
    // tau at the transformed target points. The authors use the target label itself as the
    // reference label (their label sets coincide); here it is the reference class B and D
    // make most likely for that target class, which is the same class when B is the identity
    // and also defined when the label sets differ. Without labels: h_R's own prediction.
    let ref_class_of: Vec<usize> = (0..label_map.len())
        .map(|k| {
            argmax(
                &(0..r.k)
                    .map(|j| label_map[k][j] * prior[j])
                    .collect::<Vec<f64>>(),
            )
        })
        .collect();
    let mut random = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(0x7a0));
    let mut tau = 0f64;
    for i in 0..t_eval.n {
        let y = match (&t_eval.labels, inputs.labelled) {
            (Some(l), true) => ref_class_of[l[i] as usize],
            _ => argmax(&probs[i]),
        };
        let u = random.random_range(0..r.k as u32);
        let (_, norm) = head
            .head
            .loss_and_gradient_norm(&back[i * d..(i + 1) * d], y as u32, u);
        tau = tau.max(norm);
    }
    // Transformed classifier on the target: z' -> A'(z' - b) -> h_R -> B.
    let (target_accuracy, target_loss) = match (&t_eval.labels, inputs.labelled) {
        (Some(labels), true) => {
            let (mut hits, mut loss) = (0usize, 0f64);
            for (i, &y) in labels.iter().enumerate() {
                let p = &probs[i];
                let q: Vec<f64> = (0..t.k)
                    .map(|k| (0..r.k).map(|j| label_map[k][j] * p[j]).sum())
                    .collect();
                hits += usize::from(argmax(&q) == y as usize);
                loss -= q[y as usize].max(1e-300).ln();
            }
            (
                Some(hits as f64 / t_eval.n as f64),
                Some(loss / t_eval.n as f64),
            )
        }
        _ => (None, None),
    };
    Ok(FinalTerms {
        reference_loss,
        label_entropy,
        wasserstein,
        tau,
        target_accuracy,
        target_loss,
        pseudo_label_accuracy,
        prior,
        label_map,
    })
}
