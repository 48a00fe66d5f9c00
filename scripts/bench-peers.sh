#!/usr/bin/env bash
# Runs the peer implementations beside taskrel on this machine, in a throwaway virtual
# environment (nothing is added to the repository's requirements):
#   scripts/bench-peers.sh emd                 POT ot.emd2 vs taskrel bench emd
#   scripts/bench-peers.sh loop REF.st TGT.st  the official loop's transport vs taskrel relatedness
set -euo pipefail
VENV="${TASKREL_BENCH_VENV:-${TMPDIR:-/tmp}/taskrel-bench-venv}"
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q numpy pot; }
TASKREL="${TASKREL:-target/release/taskrel}"
[ -x "$TASKREL" ] || cargo build --release -p taskrel-runner
case "${1:-}" in
  emd)
    "$TASKREL" bench emd --sizes "${2:-500,1000,2500}"
    "$VENV/bin/python" scripts/bench/pot_emd.py "${2:-500,1000,2500}" ;;
  loop)
    /usr/bin/time -f "taskrel relatedness: %e s wall, %M KB peak" "$TASKREL" relatedness --reference "$2" --target "$3" --solver "${4:-block_emd}" > /dev/null
    "$VENV/bin/python" scripts/bench/official_loop_transport.py "$2" "$3" ;;
  *) echo "usage: scripts/bench-peers.sh emd [SIZES] | loop REF TGT [SOLVER]" >&2; exit 2 ;;
esac
