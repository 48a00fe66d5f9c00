#!/usr/bin/env bash
# Run a sweep as a Slurm job array, one shard per array task, then merge:
#
#   N=8
#   jobid=$(sbatch --parsable --array=1-$N scripts/slurm-array.sh configs/quickstart.yaml $N)
#   sbatch --dependency=afterok:$jobid --wrap \
#     "target/release/taskrel merge results/shards/*/quickstart --into results/quickstart"
#
# Every task writes results/shards/<I>/<sweep>/ and shares results/.cache (trained sources and
# features are written atomically, so concurrent tasks at worst compute an entry twice).
# A failed or preempted task is rerun with the same index: finished cells are skipped.
#SBATCH --job-name=taskrel
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=results/shards/slurm-%A_%a.out
set -euo pipefail
sweep=${1:?usage: slurm-array.sh <sweep.yaml> <number of shards> [device]}
shards=${2:?usage: slurm-array.sh <sweep.yaml> <number of shards> [device]}
device=${3:-cpu}
index=${SLURM_ARRAY_TASK_ID:?run under sbatch --array=1-N}
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
exec target/release/taskrel run "$sweep" \
  --shard "$index/$shards" \
  --results "results/shards/$index" \
  --cache results/.cache \
  --device "$device" --quiet
