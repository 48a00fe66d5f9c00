//! `taskrel`: predict how well a pretrained model transfers to a task, then check by
//! fine-tuning. This binary parses arguments once, runs one subcommand, and exits in one place.

mod data_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

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
        /// mnist, fashion_mnist, usps, ag_news or dbpedia.
        name: taskrel_data::DatasetName,
        /// Folder holding the dataset's files (default: data/<name>).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Print one JSON object on stdout instead of the table.
        #[arg(long)]
        json: bool,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Data { name, root, json } => {
            let root = root.unwrap_or_else(|| PathBuf::from("data").join(name.as_str()));
            data_cmd::run(name, &root, json)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
