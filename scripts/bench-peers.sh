#!/usr/bin/env bash
# Runs the peer implementations beside taskrel on this machine, in a throwaway virtual
# environment (nothing is added to the repository's requirements):
#   scripts/bench-peers.sh emd                 POT ot.emd2 vs taskrel bench emd
#   scripts/bench-peers.sh features DIR        the loop's inputs: a lenet200 trained on 10,000
#                                              MNIST images, its features of 500 MNIST images
#                                              per class (DIR/ref.safetensors) and of the whole
#                                              USPS training set (DIR/tgt.safetensors)
#   scripts/bench-peers.sh loop REF.st TGT.st [RUNS]
#                                              the official LearnedAll loop (TensorFlow + POT)
#                                              vs taskrel relatedness, alternating RUNS times;
#                                              each prints its loop's own time beside the wall
#                                              time (taskrel: "optimisation")
#   scripts/bench-peers.sh transfer DIR [RUNS]   the authors' whole small-scale transfer
#                                              (h_R, LearnedAll, the printed terms) beside
#                                              taskrel relatedness on the same features: a
#                                              lenet200 trained on MNIST (30 epochs, batch 256,
#                                              Adam 1e-3), reference MNIST, targets USPS and
#                                              Fashion-MNIST, train splits fitted on, test
#                                              splits reported on; one JSON line per run in
#                                              DIR/runs.jsonl (experiments/004)
set -euo pipefail
VENV="${TASKREL_BENCH_VENV:-${TMPDIR:-/tmp}/taskrel-bench-venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import numpy, ot, scipy, tensorflow" 2>/dev/null ||
  "$VENV/bin/pip" install -q numpy pot scipy tensorflow-cpu
TASKREL="${TASKREL:-target/release/taskrel}"
[ -x "$TASKREL" ] || cargo build --release -p taskrel-runner
case "${1:-}" in
  emd)
    "$TASKREL" bench emd --sizes "${2:-500,1000,2500}"
    "$VENV/bin/python" scripts/bench/pot_emd.py "${2:-500,1000,2500}" ;;
  features)
    "$TASKREL" train --model lenet200 --dataset mnist --per-class 1000 --epochs 1 --quiet --out "$2/lenet-mnist"
    "$TASKREL" features --model "$2/lenet-mnist" --dataset mnist --per-class 500 --seed 0 --out "$2/ref.safetensors"
    "$TASKREL" features --model "$2/lenet-mnist" --dataset usps --out "$2/tgt.safetensors" ;;
  loop)
    for run in $(seq "${4:-1}"); do
      /usr/bin/time -f "run $run taskrel relatedness: %e s wall, %M KB peak" \
        "$TASKREL" relatedness --reference "$2" --target "$3" | grep -F 'time:'
      /usr/bin/time -f "run $run official loop: %e s wall (with the TensorFlow import), %M KB peak" \
        "$VENV/bin/python" scripts/bench/official_loop.py "$2" "$3" 2>&1 | grep -v -e oneDNN -e absl
    done ;;
  transfer)
    D="$2"; mkdir -p "$D"
    [ -f "$D/lenet/taskrel.json" ] || "$TASKREL" train --model lenet200 --dataset mnist --epochs 30 \
      --batch-size 256 --lr 0.001 --seed 0 --quiet --out "$D/lenet"
    for ds in mnist fashion_mnist usps; do for split in train test; do
      [ -f "$D/$ds-$split.st" ] || "$TASKREL" features --model "$D/lenet" --dataset "$ds" \
        --split "$split" --quiet --out "$D/$ds-$split.st"
    done; done
    for run in $(seq "${3:-3}"); do for tg in usps fashion_mnist; do
      feats=("$D/mnist-train.st" "$D/mnist-test.st" "$D/$tg-train.st" "$D/$tg-test.st")
      echo "{\"implementation\": \"official\", \"target\": \"$tg\", \"run\": $run, \"report\": $(
        "$VENV/bin/python" scripts/bench/official_transfer.py "${feats[@]}" $((2022 + run)) 2>/dev/null | tail -1)}" >> "$D/runs.jsonl"
      echo "{\"implementation\": \"taskrel\", \"target\": \"$tg\", \"run\": $run, \"report\": $(
        "$TASKREL" relatedness --reference "${feats[0]}" --reference-eval "${feats[1]}" \
          --target "${feats[2]}" --target-eval "${feats[3]}" --eval-per-class 10000 \
          --seed $((run - 1)) --json | tr -d '\n')}" >> "$D/runs.jsonl"
    done; done ;;
  *) echo "usage: scripts/bench-peers.sh emd [SIZES] | features DIR | loop REF TGT [RUNS] | transfer DIR [RUNS]" >&2; exit 2 ;;
esac
