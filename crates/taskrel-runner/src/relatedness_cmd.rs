//! `taskrel relatedness`: task-relatedness between two feature files.

use std::path::PathBuf;

use anyhow::Context;
use taskrel_score::{FeatureSet, RelatednessConfig, Samples};

/// Feature files of one task: fitting samples, and evaluation samples from a file of their
/// own or split off the fitting file.
#[derive(Debug)]
pub struct TaskFiles {
    pub fit: PathBuf,
    pub eval: Option<PathBuf>,
}

/// Fraction of a feature file held out for evaluation when no evaluation file is given.
pub const EVAL_FRACTION: f64 = 0.3;

/// Fitting and evaluation features of one task, and a sentence saying where they came from.
fn load_task(
    files: &TaskFiles,
    what: &str,
    seed: u64,
) -> anyhow::Result<(FeatureSet, FeatureSet, String)> {
    let fit = FeatureSet::load(&files.fit).with_context(|| format!("reading {what} features"))?;
    match &files.eval {
        Some(path) => {
            let eval = FeatureSet::load(path)
                .with_context(|| format!("reading {what} evaluation features"))?;
            let from = format!(
                "{what}: fitted on {}, evaluated on {}",
                files.fit.display(),
                path.display()
            );
            Ok((fit, eval, from))
        }
        None => {
            let (fit_part, eval_part) = fit.split(EVAL_FRACTION, seed).with_context(|| {
                format!("{}: holding out evaluation samples", files.fit.display())
            })?;
            let from = format!(
                "{what}: {} split by seed {seed}, {} rows fitted on, {} ({:.0} % per class) held out for evaluation",
                files.fit.display(),
                fit_part.n,
                eval_part.n,
                EVAL_FRACTION * 100.0
            );
            Ok((fit_part, eval_part, from))
        }
    }
}

pub fn run(
    reference: &TaskFiles,
    target: &TaskFiles,
    cfg: &RelatednessConfig,
    device: &str,
    json: bool,
) -> anyhow::Result<()> {
    let (r_fit, r_eval, r_from) = load_task(reference, "reference", cfg.seed)?;
    let (t_fit, t_eval, t_from) = load_task(target, "target", cfg.seed)?;
    let device = taskrel_models::device(device)?;
    let report = taskrel_score::relatedness(
        Samples::new(&r_fit, &r_eval),
        Samples::new(&t_fit, &t_eval),
        cfg,
        &device,
    )
    .with_context(|| {
        format!(
            "task-relatedness of reference {} against target {}",
            reference.fit.display(),
            target.fit.display()
        )
    })?;
    if json {
        let mut value = serde_json::to_value(&report)?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("samples".into(), serde_json::json!([r_from, t_from]));
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "task-relatedness ({} / {}, {} iterations, seed {}): reference {} x {}, target {} x {}",
        report.variant.as_str(),
        report.solver.as_str(),
        report.iterations,
        report.seed,
        report.n_reference,
        report.dim,
        report.n_target,
        report.dim
    );
    println!("  {r_from}");
    println!("  {t_from}");
    println!(
        "  evaluation samples: reference {}, target {}",
        report.n_reference_eval, report.n_target_eval
    );
    println!("  bound              {:>10.4}", report.bound);
    println!(
        "  reference loss     {:>10.4}   (h_R accuracy: {:.4} held out, {:.4} on its training samples)",
        report.reference_loss, report.reference_accuracy, report.reference_fit_accuracy
    );
    println!(
        "  label entropy      {:>10.4}   (target labels used: {})",
        report.label_entropy, report.labels_used.label_entropy
    );
    println!(
        "  distribution term  {:>10.4}   (tau {:.4} x W {:.4}; target labels used: {})",
        report.distribution_term, report.tau, report.wasserstein, report.labels_used.wasserstein
    );
    println!(
        "  tau: {:.4} at the transformed target points, {:.4} on held-out reference samples (target {}; constraint {})",
        report.tau,
        report.tau_reference,
        report.tau_target,
        if report.lipschitz_holds {
            "holds"
        } else {
            "violated"
        }
    );
    if let (Some(acc), Some(loss)) = (report.target_accuracy, report.target_loss) {
        println!("  transformed classifier on target: accuracy {acc:.4}, loss {loss:.4}");
    }
    if let Some(acc) = report.pseudo_label_accuracy {
        println!("  pseudo-label agreement with the (ignored) target labels: {acc:.4}");
    }
    for w in &report.warnings {
        println!("  note: {w}");
    }
    println!(
        "  time: {:.2} s (classifier {:.2}, optimisation {:.2} of which transport {:.2}, evaluation {:.2})",
        report.seconds.total,
        report.seconds.classifier,
        report.seconds.optimisation,
        report.seconds.transport,
        report.seconds.evaluation
    );
    Ok(())
}
