//! The `taskrel` command on the real datasets and weights in `data/` (`scripts/fetch-data.sh`
//! fetches them; without them every test here fails at once saying so), one module per part:
//! data summaries and clean failures (`cli`), sweeps end to end (`sweep`), ranking a zoo
//! (`rank`), the baseline scores on real features against their reference implementations
//! (`baselines`).

mod baselines;
mod cli;
mod rank;
mod sweep;
