//! `taskrel bench`: measurements that are compared with peer implementations run on the same
//! machine (see `scripts/bench-peers.sh` for the POT side).

use std::path::Path;
use std::time::Instant;

use taskrel_data::DatasetName;

/// The 32-bit LCG shared with `scripts/bench/pot_emd.py`: `s = (1664525 s + 1013904223) mod 2^32`.
fn lcg(seed: u64, k: usize) -> Vec<f32> {
    let mut s = seed;
    (0..k)
        .map(|_| {
            s = (1664525 * s + 1013904223) % (1 << 32);
            (s as f64 / (1u64 << 32) as f64) as f32
        })
        .collect()
}

/// Exact EMD on `n x n` uniform problems (points in 16-d, the second cloud shifted by 0.25).
pub fn emd(sizes: &[usize], json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for &n in sizes {
        let d = 16;
        let x = lcg(7, n * d);
        let y: Vec<f32> = lcg(8, n * d).into_iter().map(|v| v + 0.25).collect();
        let cost = taskrel_score::ot::euclidean(&x, &y, d);
        let w = taskrel_score::ot::uniform(n);
        let reps = (2000 / n).clamp(1, 20);
        let start = Instant::now();
        let mut plan = None;
        for _ in 0..reps {
            plan = Some(taskrel_score::ot::emd(&w, &w, &cost)?);
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
        let plan = plan.ok_or_else(|| anyhow::anyhow!("no repetition ran"))?;
        rows.push(
            serde_json::json!({ "n": n, "ms": ms, "cost": plan.cost, "pivots": plan.pivots }),
        );
        if !json {
            println!(
                "emd n = {n:>5}: {ms:>9.2} ms per solve (cost {:.6}, {} pivots)",
                plan.cost, plan.pivots
            );
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}

/// Peak resident memory of this process, from `/proc/self/status` (Linux), in MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Loading a dataset (all splits) from disk.
pub fn data(name: DatasetName, root: &Path, json: bool) -> anyhow::Result<()> {
    let start = Instant::now();
    let splits = taskrel_data::load(name, root)?;
    let seconds = start.elapsed().as_secs_f64();
    let pixels: usize = splits
        .iter()
        .filter_map(|(_, d)| d.images())
        .map(|i| i.pixels.len())
        .sum();
    let peak = peak_rss_mb();
    let report = serde_json::json!({
        "dataset": name, "seconds": seconds, "peak_rss_mb": peak, "pixel_mb": pixels as f64 / 1e6,
        "samples": splits.iter().map(|(_, d)| d.len()).sum::<usize>(),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "load {name}: {seconds:.3} s, peak RSS {:.1} MB for {:.1} MB of pixels",
            peak.unwrap_or(f64::NAN),
            pixels as f64 / 1e6
        );
    }
    Ok(())
}

/// Train-step time: `steps` end-to-end steps of `model` at `batch` (lenet200 on MNIST images;
/// a text model on AG News texts joined in fours so every sequence is truncated to `max_len`).
pub fn train_step(
    model_ref: &str,
    data_root: &Path,
    device: &candle_core::Device,
    batch: usize,
    steps: usize,
    max_len: usize,
    json: bool,
) -> anyhow::Result<()> {
    use taskrel_models::train::{self, Mode, TrainConfig};
    let reference: taskrel_models::ModelRef = model_ref.parse()?;
    let options = taskrel_models::LoadOptions {
        max_len,
        device: device.clone(),
        ..Default::default()
    };
    let mut model = taskrel_models::load(&reference, &options)?;
    let n = batch * steps;
    let data = match model.spec.modality {
        taskrel_data::Modality::Image => {
            let mnist = taskrel_data::load(DatasetName::Mnist, &data_root.join("mnist"))?;
            let train = mnist.get(taskrel_data::SplitName::Train)?;
            train.select(&(0..n).collect::<Vec<_>>())?
        }
        taskrel_data::Modality::Text => {
            let ag = taskrel_data::load(DatasetName::AgNews, &data_root.join("ag_news"))?;
            let test = ag.get(taskrel_data::SplitName::Test)?;
            let texts = test.texts().unwrap_or_default();
            let len = texts.len().max(1);
            let joined: Vec<String> = (0..n)
                .map(|i| {
                    (0..4)
                        .map(|k| texts[(4 * i + k) % len].as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            taskrel_data::Dataset {
                inputs: taskrel_data::Inputs::Texts(joined),
                labels: (0..n).map(|i| test.labels[i % len]).collect(),
                classes: test.classes.clone(),
            }
        }
    };
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: batch,
        seed: 0,
        ..Default::default()
    };
    // One warm-up step, then the timed steps.
    let warm = data.select(&(0..batch).collect::<Vec<_>>())?;
    train::fine_tune(&mut model, &warm, Mode::Full, &cfg, true)?;
    let history = train::fine_tune(&mut model, &data, Mode::Full, &cfg, true)?;
    let seconds = history.epochs.first().map_or(f64::NAN, |e| e.seconds);
    let ms = seconds * 1e3 / steps as f64;
    let report = serde_json::json!({
        "model": model_ref, "batch": batch, "steps": steps, "max_len": max_len,
        "ms_per_step": ms, "samples_per_second": n as f64 / seconds, "peak_rss_mb": peak_rss_mb(),
        "device": format!("{device:?}"),
        "threads": candle_core::utils::get_num_threads(),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "train step {model_ref}, batch {batch}: {ms:.1} ms ({:.0} samples/s, peak RSS {:.0} MB, {} threads)",
            n as f64 / seconds,
            peak_rss_mb().unwrap_or(f64::NAN),
            candle_core::utils::get_num_threads()
        );
    }
    Ok(())
}

/// LogME on `n x d` features of `k` classes (features from the 32-bit LCG, seed 11, plus 0.5
/// on the dimensions `j % k == label`; labels `i % k`), as `scripts/bench/logme_numpy.py`
/// builds them for thuml/LogME.
pub fn logme(n: usize, d: usize, k: usize, reps: usize, json: bool) -> anyhow::Result<()> {
    let raw = lcg(11, n * d);
    let labels: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
    let x: Vec<f64> = raw
        .iter()
        .enumerate()
        .map(|(idx, &v)| {
            let (i, j) = (idx / d, idx % d);
            f64::from(v) + if j % k == i % k { 0.5 } else { 0.0 }
        })
        .collect();
    let m = taskrel_score::baselines::Matrix::new(&x, n, d)?;
    let mut times = Vec::new();
    let mut score = f64::NAN;
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        score = taskrel_score::baselines::logme(m, &labels)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let best = times[0];
    if json {
        println!(
            "{}",
            serde_json::json!({"n": n, "d": d, "classes": k, "logme": score, "best_seconds": best})
        );
    } else {
        println!(
            "LogME n = {n}, d = {d}, {k} classes: {score:.10} in {best:.3} s (best of {})",
            times.len()
        );
    }
    Ok(())
}
