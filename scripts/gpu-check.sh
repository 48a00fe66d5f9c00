#!/usr/bin/env bash
# GPU checks for a machine with an NVIDIA GPU, the CUDA 13 libraries and no Rust toolchain.
#
# Here (with Rust): build the CUDA binary and a small data bundle to carry:
#   scripts/gpu-check.sh prepare        -> .gpu/taskrel.xz and .gpu/data/ (git-ignored)
# There: run every check in one go, writing results under $OUT (or ./gpu-results):
#   scripts/gpu-check.sh run
# The bundle holds MNIST, USPS and the ccexam CNNs (about 15 MB), well inside a 64 MiB carry.
# Each check runs on the CPU and on CUDA so the JSON outputs can be compared side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    ../shared/scripts/cuda-build.sh -- --release -p taskrel-runner --bin taskrel --features cuda
    rm -rf .gpu/data && mkdir -p .gpu/data/models
    cp -r data/mnist data/usps .gpu/data/
    cp -r data/models/ccexam .gpu/data/models/
    du -sh .gpu ;;
  run)
    OUT="${OUT:-gpu-results}"; mkdir -p "$OUT"
    export LD_LIBRARY_PATH=$(find /usr /opt -xdev \( -name 'libcublas.so.13' -o -name 'libcurand.so.10' \
      -o -name 'libcudart.so.13' -o -name 'libcublasLt.so.13' -o -name 'libnvrtc.so.13' \) -printf '%h\n' \
      2>/dev/null | sort -u | tr '\n' ':')
    xz -dc .gpu/taskrel.xz > /tmp/taskrel && chmod +x /tmp/taskrel
    T=/tmp/taskrel; D=.gpu/data
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    for dev in cpu cuda; do
      $T eval --model $D/models/ccexam/mnist.pth --dataset mnist --data-root $D --device $dev --quiet --json > "$OUT/eval_mnist_$dev.json"
      $T train --dataset mnist --data-root $D --per-class 1000 --batch-size 32 --device $dev --quiet --json > "$OUT/train_lenet_$dev.json"
      $T bench train --model lenet200 --batch-size 128 --steps 20 --data-root $D --device $dev --json > "$OUT/bench_train_lenet_$dev.json"
      $T features --model $D/models/ccexam/mnist.pth --dataset mnist --data-root $D --per-class 500 --device $dev --quiet --out "/tmp/ref_$dev.safetensors"
      $T features --model $D/models/ccexam/mnist.pth --dataset usps --data-root $D --per-class 500 --device $dev --quiet --out "/tmp/tgt_$dev.safetensors"
      for solver in block_emd sinkhorn; do
        $T relatedness --reference "/tmp/ref_$dev.safetensors" --target "/tmp/tgt_$dev.safetensors" --solver $solver \
          --device $dev --json > "$OUT/relatedness_${solver}_$dev.json"
      done
    done
    echo "results in $OUT" ;;
  *) echo "usage: scripts/gpu-check.sh prepare | run" >&2; exit 2 ;;
esac
