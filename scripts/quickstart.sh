#!/usr/bin/env bash
# The README's first command: fetch what is missing, build, and run configs/quickstart.yaml
# (4 digit CNNs x 4 targets: task-relatedness and baselines from 50 images per class, then
# real fine-tuning, correlations, plots) into results/quickstart/. On 2 cores, about 4 minutes
# to build and 3.5 to run; a rerun reuses every finished cell.
#   scripts/quickstart.sh [--mirror DIR]   (passed on to scripts/fetch-data.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-data.sh "$@" mnist fashion_mnist usps ccexam
cargo build --release -q -p taskrel-runner
target/release/taskrel run configs/quickstart.yaml
