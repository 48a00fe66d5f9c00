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
#                                              vs taskrel relatedness, alternating RUNS times
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
        "$TASKREL" relatedness --reference "$2" --target "$3" > /dev/null
      /usr/bin/time -f "run $run official loop: %e s wall (with the TensorFlow import), %M KB peak" \
        "$VENV/bin/python" scripts/bench/official_loop.py "$2" "$3" 2>&1 | grep -v -e oneDNN -e absl
    done ;;
  *) echo "usage: scripts/bench-peers.sh emd [SIZES] | features DIR | loop REF TGT [RUNS]" >&2; exit 2 ;;
esac
