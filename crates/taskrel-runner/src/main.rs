//! `taskrel`: predict how well a pretrained model transfers to a task, then check by
//! fine-tuning. This binary parses arguments once, runs one subcommand, and exits in one place.

use taskrel_runner::{bench_cmd, data_cmd, model_cmd, rank_cmd, relatedness_cmd, sweep_cmd};

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::bail;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "taskrel", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Summarise a dataset: splits, counts per class, image size or text lengths.
    Data {
        /// mnist, fashion_mnist, usps, ag_news, dbpedia, or csv:PATH for any labelled-text CSV
        /// with a header (plain, .gz or .bz2; name its columns with --label-column and
        /// --text-columns).
        name: String,
        /// Folder holding the dataset's files (default: data/<name>).
        #[arg(long)]
        root: Option<PathBuf>,
        #[command(flatten)]
        table: TableArgs,
        /// Print one JSON object on stdout instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Train a model from scratch (all weights re-drawn from --seed) and evaluate on the test split.
    Train {
        /// Architecture or model to re-initialise (lenet200, or any model reference).
        #[arg(long, default_value = "lenet200")]
        model: String,
        #[command(flatten)]
        data: model_cmd::DataArgs,
        #[command(flatten)]
        hp: model_cmd::TrainArgs,
        #[command(flatten)]
        run: model_cmd::RunArgs,
        /// Checkpoint folder to write (model.safetensors + taskrel.json).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Fine-tune a model with a new head (linear probe or end to end) and evaluate on the test split.
    Finetune {
        /// Model reference: a .pth file, a checkpoint or model folder, hf:org/name.
        #[arg(long)]
        model: String,
        /// linear_probe or full.
        #[arg(long, default_value = "linear_probe", value_parser = model_cmd::parse_enum::<taskrel_models::train::Mode>)]
        mode: taskrel_models::train::Mode,
        #[command(flatten)]
        data: model_cmd::DataArgs,
        #[command(flatten)]
        hp: model_cmd::TrainArgs,
        #[command(flatten)]
        run: model_cmd::RunArgs,
        /// Checkpoint folder to write.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Accuracy and loss of a model with its own head on a dataset split.
    Eval {
        #[arg(long)]
        model: String,
        #[command(flatten)]
        data: model_cmd::DataArgs,
        /// train or test.
        #[arg(long, default_value = "test", value_parser = model_cmd::parse_enum::<taskrel_data::SplitName>)]
        split: taskrel_data::SplitName,
        #[command(flatten)]
        run: model_cmd::RunArgs,
    },
    /// Write (n, d) features and labels of a dataset split to a safetensors file.
    Features {
        #[arg(long)]
        model: String,
        #[command(flatten)]
        data: model_cmd::DataArgs,
        /// train or test.
        #[arg(long, default_value = "train", value_parser = model_cmd::parse_enum::<taskrel_data::SplitName>)]
        split: taskrel_data::SplitName,
        /// Samples per class (seeded, stratified); all samples when absent.
        #[arg(long)]
        per_class: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        run: model_cmd::RunArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Task-relatedness between reference and target features (files from `taskrel features`).
    Relatedness {
        /// Labelled reference features the variables are fitted on.
        #[arg(long)]
        reference: PathBuf,
        /// Target features the variables are fitted on (labels used unless --unlabeled).
        #[arg(long)]
        target: PathBuf,
        /// Reference features the reported terms are measured on (e.g. the test split);
        /// without it, 30 % of each class of --reference is held out (seeded).
        #[arg(long)]
        reference_eval: Option<PathBuf>,
        /// Target features the reported terms are measured on; without it, 30 % of each class
        /// of --target is held out (seeded).
        #[arg(long)]
        target_eval: Option<PathBuf>,
        /// Random start of the label map (the authors') instead of the transport-plan start.
        #[arg(long)]
        random_label_map: bool,
        /// Gradient-norm penalty weight of h_R.
        #[arg(long)]
        head_penalty: Option<f64>,
        /// Epochs of h_R's training.
        #[arg(long)]
        head_epochs: Option<usize>,
        /// Adam learning rate of h_R.
        #[arg(long)]
        head_lr: Option<f64>,
        /// Mini-batch size of h_R's training.
        #[arg(long)]
        head_batch_size: Option<usize>,
        /// Most reference fitting samples h_R is trained on.
        #[arg(long)]
        head_samples: Option<usize>,
        /// Most evaluation samples per class the reported terms are measured on.
        #[arg(long)]
        eval_per_class: Option<usize>,
        /// learned_all, learned_a or fixed_all.
        #[arg(long, default_value = "learned_all", value_parser = model_cmd::parse_enum::<taskrel_score::Variant>)]
        variant: taskrel_score::Variant,
        /// Ignore target labels (label-free task-relatedness).
        #[arg(long)]
        unlabeled: bool,
        /// emd, block_emd or sinkhorn.
        #[arg(long, default_value = "emd", value_parser = model_cmd::parse_enum::<taskrel_score::Solver>)]
        solver: taskrel_score::Solver,
        /// Alternating iterations.
        #[arg(long, default_value_t = 1001)]
        iterations: usize,
        /// Samples per batch and domain.
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks to compare with peer implementations on the same machine.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
    /// Print the cells a sweep file expands to; runs nothing.
    Plan {
        /// Sweep file (configs/*.yaml).
        sweep: PathBuf,
        /// Folder of fetched datasets and weights.
        #[arg(long, default_value = "data")]
        data_root: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run a sweep: train sources, extract features, score, fine-tune, correlate. Resumes
    /// where a previous run stopped.
    Run(sweep_cmd::RunOptions),
    /// Re-render correlation.csv, summary.md and plots/ of a results folder from its CSV.
    Report {
        /// A results folder (results/<sweep>).
        dir: PathBuf,
        #[arg(long, default_value = "data")]
        data_root: PathBuf,
    },
    /// Join the results folders of shards of one sweep.
    Merge {
        /// Results folders of the shards.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Folder to write the merged results to.
        #[arg(long)]
        into: PathBuf,
        #[arg(long, default_value = "data")]
        data_root: PathBuf,
    },
    /// Rank the models of a zoo for a small target sample: task-relatedness and baselines.
    Rank(rank_cmd::RankOptions),
    /// The pooled embedding of one text.
    Embed {
        #[arg(long)]
        model: String,
        #[arg(long)]
        text: String,
        #[command(flatten)]
        run: model_cmd::RunArgs,
    },
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Exact EMD on uniform n x n problems (compare: scripts/bench/pot_emd.py).
    Emd {
        /// Problem sizes.
        #[arg(long, value_delimiter = ',', default_value = "500,1000,2500")]
        sizes: Vec<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Train-step time of a model, end to end (compare: scripts/bench/torch_train_step.py).
    Train {
        /// lenet200 or a model reference.
        #[arg(long, default_value = "lenet200")]
        model: String,
        #[arg(long, default_value_t = 128)]
        batch_size: usize,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 128)]
        max_len: usize,
        #[arg(long, default_value = "data")]
        data_root: PathBuf,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// LogME on synthetic features (compare: scripts/bench/logme_numpy.py with thuml/LogME).
    Logme {
        #[arg(long, default_value_t = 5000)]
        n: usize,
        #[arg(long, default_value_t = 1024)]
        d: usize,
        #[arg(long, default_value_t = 10)]
        classes: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        #[arg(long)]
        json: bool,
    },
    /// Loading a dataset: wall time and peak memory.
    Data {
        name: taskrel_data::DatasetName,
        #[arg(long)]
        root: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// The columns and split of a `csv:PATH` dataset.
#[derive(Debug, clap::Args)]
struct TableArgs {
    /// Header name of the label column (csv:PATH).
    #[arg(long)]
    label_column: Option<String>,
    /// Header names of the text columns, comma-separated, joined in this order (csv:PATH).
    #[arg(long, value_delimiter = ',')]
    text_columns: Option<Vec<String>>,
    /// Keep only rows with these labels, comma-separated (csv:PATH; default: all).
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
    /// Header name of a column holding train or test per row (csv:PATH; default: a seeded
    /// split stratified by class).
    #[arg(long)]
    split_column: Option<String>,
    /// Share of each class held out for the test split when there is no split column
    /// (csv:PATH; default 0.3).
    #[arg(long)]
    test_fraction: Option<f64>,
    /// Seed of that split (csv:PATH; default 0).
    #[arg(long)]
    split_seed: Option<u64>,
    /// Drop rows whose text is empty instead of failing (csv:PATH).
    #[arg(long)]
    skip_empty: bool,
}

impl TableArgs {
    fn spec(&self) -> anyhow::Result<taskrel_data::table::TableSpec> {
        let (Some(label), Some(texts)) = (&self.label_column, &self.text_columns) else {
            bail!("a csv:PATH dataset needs --label-column and --text-columns");
        };
        let mut spec = taskrel_data::table::TableSpec::new(label.clone(), texts.clone());
        spec.classes.clone_from(&self.classes);
        spec.split_column.clone_from(&self.split_column);
        spec.test_fraction = self.test_fraction.unwrap_or(spec.test_fraction);
        spec.seed = self.split_seed.unwrap_or(spec.seed);
        spec.skip_empty = self.skip_empty;
        Ok(spec)
    }

    /// Whether any option of a csv:PATH dataset was given.
    fn any_given(&self) -> bool {
        self.label_column.is_some()
            || self.text_columns.is_some()
            || !self.classes.is_empty()
            || self.split_column.is_some()
            || self.test_fraction.is_some()
            || self.split_seed.is_some()
            || self.skip_empty
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Data {
            name,
            root,
            table,
            json,
        } => match name.strip_prefix("csv:") {
            Some(path) => {
                if root.is_some() {
                    bail!("--root applies to named datasets; csv:PATH names its file itself");
                }
                data_cmd::run_table(Path::new(path), &table.spec()?, json)
            }
            None => {
                if table.any_given() {
                    bail!(
                        "--label-column, --text-columns, --classes, --split-column, --test-fraction, \
                         --split-seed and --skip-empty apply to csv:PATH datasets only"
                    );
                }
                let name: taskrel_data::DatasetName = name.parse()?;
                let root = root.unwrap_or_else(|| PathBuf::from("data").join(name.as_str()));
                data_cmd::run(name, &root, json)
            }
        },
        Command::Train {
            model,
            data,
            hp,
            run,
            out,
        } => model_cmd::train_or_finetune(&model, None, &data, &hp, &run, out.as_deref()),
        Command::Finetune {
            model,
            mode,
            data,
            hp,
            run,
            out,
        } => model_cmd::train_or_finetune(&model, Some(mode), &data, &hp, &run, out.as_deref()),
        Command::Eval {
            model,
            data,
            split,
            run,
        } => model_cmd::eval(&model, &data, split, &run),
        Command::Features {
            model,
            data,
            split,
            per_class,
            seed,
            run,
            out,
        } => model_cmd::features(&model, &data, split, per_class, seed, &run, &out),
        Command::Embed { model, text, run } => model_cmd::embed(&model, &text, &run),
        Command::Plan {
            sweep,
            data_root,
            json,
        } => sweep_cmd::plan(&sweep, &data_root, json),
        Command::Run(options) => sweep_cmd::run(&options),
        Command::Rank(options) => rank_cmd::rank(&options),
        Command::Report { dir, data_root } => sweep_cmd::report(&dir, &data_root),
        Command::Merge {
            dirs,
            into,
            data_root,
        } => sweep_cmd::merge(&dirs, &into, &data_root),
        Command::Bench {
            what: Bench::Emd { sizes, json },
        } => bench_cmd::emd(&sizes, json),
        Command::Bench {
            what:
                Bench::Train {
                    model,
                    batch_size,
                    steps,
                    max_len,
                    data_root,
                    device,
                    json,
                },
        } => bench_cmd::train_step(
            &model,
            &data_root,
            &taskrel_models::device(&device)?,
            batch_size,
            steps,
            max_len,
            json,
        ),
        Command::Bench {
            what:
                Bench::Logme {
                    n,
                    d,
                    classes,
                    reps,
                    json,
                },
        } => bench_cmd::logme(n, d, classes, reps, json),
        Command::Bench {
            what: Bench::Data { name, root, json },
        } => {
            let root = root.unwrap_or_else(|| PathBuf::from("data").join(name.as_str()));
            bench_cmd::data(name, &root, json)
        }
        Command::Relatedness {
            reference,
            target,
            reference_eval,
            target_eval,
            random_label_map,
            head_penalty,
            head_epochs,
            head_lr,
            head_batch_size,
            head_samples,
            eval_per_class,
            variant,
            unlabeled,
            solver,
            iterations,
            batch_size,
            seed,
            device,
            json,
        } => {
            let defaults = taskrel_score::RelatednessConfig::default();
            let cfg = taskrel_score::RelatednessConfig {
                variant,
                solver,
                iterations,
                batch_size,
                unlabeled,
                seed,
                label_map_init: if random_label_map {
                    taskrel_score::relatedness::LabelMapInit::Random
                } else {
                    taskrel_score::relatedness::LabelMapInit::Transport
                },
                gradient_penalty: head_penalty.unwrap_or(defaults.gradient_penalty),
                head_epochs: head_epochs.unwrap_or(defaults.head_epochs),
                head_lr: head_lr.unwrap_or(defaults.head_lr),
                head_batch_size: head_batch_size.unwrap_or(defaults.head_batch_size),
                head_samples: head_samples.unwrap_or(defaults.head_samples),
                eval_per_class: eval_per_class.unwrap_or(defaults.eval_per_class),
                ..defaults
            };
            let files = |fit, eval| relatedness_cmd::TaskFiles { fit, eval };
            relatedness_cmd::run(
                &files(reference, reference_eval),
                &files(target, target_eval),
                &cfg,
                &device,
                json,
            )
        }
    }
}

/// glibc serves every allocation above a moving threshold (128 KiB at first) with a fresh
/// `mmap` and returns it with `munmap` when freed, so each tensor buffer of a training step
/// was new memory the kernel had to fault in and zero: a MiniLM step (batch 32, sequence 128)
/// spent about a third of its time there. Raising the threshold to glibc's maximum (32 MiB)
/// and keeping freed memory in the heap lets buffers be reused from step to step.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_allocator() {
    const MMAP_THRESHOLD: libc::c_int = 32 << 20;
    // -1 turns trimming off (mallopt(3)): freed memory stays in the heap for the next step.
    const NO_TRIM: libc::c_int = -1;
    // SAFETY: `mallopt` only changes glibc's allocator parameters (under its own lock) and
    // has no memory-safety preconditions. A rejected value leaves the default, which is only
    // slower, so the return value is not checked.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, NO_TRIM);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// candle runs its element-wise operations on a pool of its own threads, which busy-wait for
/// 25,000 spins after every job before they sleep, while its matrix products and this
/// project's kernels run on rayon's threads. On a machine with few cores the two pools take
/// cores from each other. So the spinning is capped at 100 (a MiniLM step, batch 32, sequence
/// 128, on 2 cores: 4.6-5.8 s instead of 5.5-8.8 s in alternating runs; the gain grows with
/// the load on the machine), and with at most 4 cores candle's element-wise operations run on
/// the calling thread (the heavy ones of training are this project's kernels anyway; a
/// `lenet200` step, batch 128, 2 cores: about 55 ms instead of 61-70 ms). The results do not
/// change (no sum depends on which thread does the work). Values the user set in
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` or `CANDLE_NUM_THREADS` are kept.
#[allow(unsafe_code)]
fn tune_threads() {
    let few_cores = std::thread::available_parallelism().is_ok_and(|n| n.get() <= 4);
    let settings = [
        ("CANDLE_BARRIER_POOL_SPIN_LIMIT", true, "100"),
        ("CANDLE_NUM_THREADS", few_cores, "1"),
    ];
    for (var, wanted, value) in settings {
        if wanted && std::env::var_os(var).is_none() {
            // SAFETY: called first thing in `main`, before any thread exists (candle and
            // rayon start their pools on first use), so nothing reads the environment
            // concurrently.
            unsafe { std::env::set_var(var, value) };
        }
    }
}

fn main() -> ExitCode {
    tune_threads();
    tune_allocator();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
