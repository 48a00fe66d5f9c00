//! Transport plans between batches, and the label map's start.

use super::*;

/// One transport plan as sparse `(i, l, mass)` triples over batch positions.
pub(super) type Sparse = Vec<(usize, usize, f64)>;

pub(super) struct Blocks<'a> {
    pub(super) solver: Solver,
    pub(super) eps: f64,
    pub(super) device: &'a Device,
}

impl Blocks<'_> {
    /// Plan between point sets with uniform weights, scaled to total `mass`.
    pub(super) fn solve(&self, x: &[f32], y: &[f32], d: usize, mass: f64) -> Result<(f64, Sparse)> {
        let (n, m) = (x.len() / d, y.len() / d);
        let cost = ot::euclidean(x, y, d);
        let (a, b) = (ot::uniform(n), ot::uniform(m));
        match self.solver {
            Solver::Sinkhorn => {
                let mean = cost.iter().sum::<f64>() / cost.len().max(1) as f64;
                let cfg = SinkhornConfig {
                    eps: (self.eps * mean).max(1e-12),
                    max_iter: 2000,
                    tol: 1e-6,
                };
                let plan = ot::sinkhorn(&a, &b, &cost, &cfg, self.device)?;
                let p = plan
                    .plan
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_device(&Device::Cpu)?
                    .to_vec1::<f64>()?;
                let sparse = p
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| **v > 1e-12)
                    .map(|(k, v)| (k / m, k % m, v * mass))
                    .collect();
                Ok((plan.cost, sparse))
            }
            Solver::Emd | Solver::BlockEmd => {
                let plan = ot::emd(&a, &b, &cost)?;
                Ok((
                    plan.cost,
                    plan.flows
                        .iter()
                        .map(|&(i, j, v)| (i as usize, j as usize, v * mass))
                        .collect(),
                ))
            }
        }
    }
}

pub(super) fn identity(rows: usize, cols: usize) -> Vec<Vec<f64>> {
    (0..rows)
        .map(|k| (0..cols).map(|j| if j == k { 1.0 } else { 0.0 }).collect())
        .collect()
}

/// B from a feature-only exact plan between balanced samples of both domains: column j is
/// where reference class j's mass goes, by target class, mixed with 1 % of uniform.
pub(super) fn initial_label_map(
    r: &Domain,
    t: &Domain,
    d: usize,
    cfg: &RelatednessConfig,
    rng: &mut ChaCha8Rng,
    blocks: &Blocks,
) -> Result<Vec<Vec<f64>>> {
    let per = (cfg.batch_size / r.k.max(t.k)).max(1);
    let (mut ri, mut ti) = (Vec::new(), Vec::new());
    for pool in &r.members {
        draw(pool, per.min(pool.len()), rng, &mut ri);
    }
    for pool in &t.members {
        draw(
            pool,
            (cfg.batch_size as f64
                * (pool.len() as f64 / t.members.iter().map(Vec::len).sum::<usize>() as f64))
                .round()
                .max(1.0) as usize,
            rng,
            &mut ti,
        );
    }
    let emd_blocks = Blocks {
        solver: Solver::Emd,
        eps: blocks.eps,
        device: blocks.device,
    };
    let (_, plan) = emd_blocks.solve(&rows(&r.z, d, &ri), &rows(&t.z, d, &ti), d, 1.0)?;
    let mut map = vec![vec![0f64; r.k]; t.k];
    let mut sent = vec![0f64; r.k];
    for (i, l, v) in plan {
        let (j, k) = (r.label(ri[i]), t.label(ti[l]));
        map[k][j] += v;
        sent[j] += v;
    }
    let uniform = 1.0 / t.k as f64;
    for row in map.iter_mut() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = 0.99 * *v / sent[j].max(1e-300) + 0.01 * uniform;
        }
    }
    Ok(map)
}

/// The plan of one iteration, over batch positions.
#[allow(clippy::too_many_arguments)]
pub(super) fn batch_plan(
    r: &Domain,
    t: &Domain,
    ri: &[usize],
    ti: &[usize],
    moved: &[f32],
    zt: &[f32],
    d: usize,
    b: &[f64],
    labelled: bool,
    cfg: &RelatednessConfig,
    blocks: &Blocks,
    scratch: &mut ot::LabelledScratch,
) -> Result<Sparse> {
    if !labelled {
        return Ok(blocks.solve(moved, zt, d, 1.0)?.1);
    }
    let (rl, tl) = (
        r.labels.as_deref().unwrap_or(&[]),
        t.labels.as_deref().unwrap_or(&[]),
    );
    match cfg.solver {
        Solver::Emd => {
            // One problem with the huge label cost ||B y_i - e_{y'_l}||, solved without
            // computing the arcs of class pairs that cannot carry mass (ot::emd_labelled).
            let label_cost: Vec<f64> = (0..r.k)
                .flat_map(|j| {
                    (0..t.k).map(move |k| {
                        (0..t.k)
                            .map(|q| (b[q * r.k + j] - f64::from(u8::from(q == k))).powi(2))
                            .sum::<f64>()
                            .sqrt()
                    })
                })
                .collect();
            let x_classes: Vec<u32> = ri.iter().map(|&i| rl[i]).collect();
            let y_classes: Vec<u32> = ti.iter().map(|&l| tl[l]).collect();
            let problem = ot::Labelled {
                x: moved,
                y: zt,
                dim: d,
                x_classes: &x_classes,
                y_classes: &y_classes,
                label_cost: &label_cost,
                y_class_count: t.k,
                weight: cfg.label_weight,
            };
            let plan = ot::emd_labelled_in(
                scratch,
                &ot::uniform(ri.len()),
                &ot::uniform(ti.len()),
                &problem,
            )?;
            Ok(plan
                .flows
                .into_iter()
                .map(|(i, j, v)| (i as usize, j as usize, v))
                .collect())
        }
        Solver::BlockEmd | Solver::Sinkhorn => {
            let assigned: Vec<usize> = (0..r.k)
                .map(|j| argmax(&(0..t.k).map(|k| b[k * r.k + j]).collect::<Vec<f64>>()))
                .collect();
            let total_t = ti.len() as f64;
            let mut mass_used = 0.0;
            let mut jobs = Vec::with_capacity(t.k);
            for k in 0..t.k {
                let xs: Vec<usize> = (0..ri.len())
                    .filter(|&p| assigned[rl[ri[p]] as usize] == k)
                    .collect();
                let ys: Vec<usize> = (0..ti.len()).filter(|&q| tl[ti[q]] as usize == k).collect();
                if xs.is_empty() || ys.is_empty() {
                    continue;
                }
                let mass = ys.len() as f64 / total_t;
                mass_used += mass;
                jobs.push((xs, ys, mass));
            }
            let solve = |(xs, ys, mass): &(Vec<usize>, Vec<usize>, f64)| {
                blocks.solve(&rows(moved, d, xs), &rows(zt, d, ys), d, *mass)
            };
            // The class blocks are independent: exact ones are solved on all cores (the plan is
            // assembled in class order, so results do not depend on the thread count).
            let solved: Vec<(f64, Sparse)> = if cfg.solver == Solver::BlockEmd {
                use rayon::prelude::*;
                jobs.par_iter().map(solve).collect::<Result<_>>()?
            } else {
                jobs.iter().map(solve).collect::<Result<_>>()?
            };
            let mut plan = Vec::new();
            for ((xs, ys, _), (_, block)) in jobs.iter().zip(solved) {
                plan.extend(block.into_iter().map(|(i, l, v)| (xs[i], ys[l], v)));
            }
            if mass_used > 0.0 {
                for p in &mut plan {
                    p.2 /= mass_used;
                }
            }
            Ok(plan)
        }
    }
}
