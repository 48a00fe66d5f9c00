//! The `taskrel` command's library: sweep files validated into plans (`sweep`), the engine
//! that trains sources, caches features, computes scores and fine-tunes (`engine`), the
//! results folder (`results`), statistics (`stats`) and plots (`plots`), and each
//! subcommand's options and entry point (`*_cmd`). `main.rs` keeps the argument parsing and
//! the dispatch; tests and other tools call what the binary calls.

pub mod bench_cmd;
pub mod data_cmd;
pub mod engine;
pub mod model_cmd;
pub mod plots;
pub mod rank_cmd;
pub mod relatedness_cmd;
pub mod results;
pub mod stats;
pub mod sweep;
pub mod sweep_cmd;
pub mod yaml;
