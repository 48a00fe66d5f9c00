#!/usr/bin/env bash
# The main job in miniature: how related are USPS and Fashion-MNIST to MNIST, seen through the
# pretrained MNIST CNN? Fetches what is missing, extracts features (100 per class), and prints
# task-relatedness with and without target labels. Lower bound = more related.
#   scripts/quickstart.sh [--mirror DIR]   (passed on to scripts/fetch-data.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-data.sh "$@" mnist fashion_mnist usps ccexam >/dev/null
cargo build --release -q -p taskrel-runner
T=target/release/taskrel
OUT=.cache/quickstart
mkdir -p "$OUT"
MODEL=data/models/ccexam/mnist.pth
for d in mnist usps fashion_mnist; do
  $T features --model "$MODEL" --dataset "$d" --per-class 100 --seed 0 --quiet --out "$OUT/$d.safetensors"
done
printf '\n%-14s %10s %10s %12s %10s %14s\n' target bound "label H" "tau x W" "acc(h_R)" "label-free"
for d in mnist usps fashion_mnist; do
  labelled=$($T relatedness --reference "$OUT/mnist.safetensors" --target "$OUT/$d.safetensors" --iterations 301 --json)
  free=$($T relatedness --reference "$OUT/mnist.safetensors" --target "$OUT/$d.safetensors" --iterations 301 --unlabeled --json)
  python3 - "$d" "$labelled" "$free" <<'PY'
import json, sys
d, a, b = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"{d:<14} {a['bound']:>10.4f} {a['label_entropy']:>10.4f} {a['distribution_term']:>12.4f} {a['target_accuracy']:>10.4f} {b['bound']:>14.4f}")
PY
done
