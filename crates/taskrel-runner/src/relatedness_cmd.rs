//! `taskrel relatedness`: task-relatedness between two feature files.

use std::path::Path;

use anyhow::Context;
use taskrel_score::{FeatureSet, RelatednessConfig};

pub fn run(
    reference: &Path,
    target: &Path,
    cfg: &RelatednessConfig,
    device: &str,
    json: bool,
) -> anyhow::Result<()> {
    let r = FeatureSet::load(reference).with_context(|| "reading reference features")?;
    let t = FeatureSet::load(target).with_context(|| "reading target features")?;
    let device = taskrel_models::device(device)?;
    let report = taskrel_score::relatedness(&r, &t, cfg, &device)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
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
    println!("  bound              {:>10.4}", report.bound);
    println!(
        "  reference loss     {:>10.4}   (h_R accuracy on reference {:.4})",
        report.reference_loss, report.reference_accuracy
    );
    println!(
        "  label entropy      {:>10.4}   (target labels used: {})",
        report.label_entropy, report.labels_used.label_entropy
    );
    println!(
        "  distribution term  {:>10.4}   (tau {:.4} x W {:.4}; target labels used: {})",
        report.distribution_term, report.tau, report.wasserstein, report.labels_used.wasserstein
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
