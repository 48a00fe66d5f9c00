"""POT's exact EMD on the same problems as `taskrel bench emd` (same LCG inputs, same sizes).

Run by scripts/bench-peers.sh in a throwaway virtual environment (numpy, POT)."""
import json, sys, time

import numpy as np
import ot


def lcg(seed, k):
    s, out = seed, np.empty(k)
    for i in range(k):
        s = (1664525 * s + 1013904223) % 2**32
        out[i] = s / 2**32
    return out.astype(np.float32)


for n in [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "500,1000,2500").split(",")]:
    d = 16
    x = lcg(7, n * d).reshape(n, d).astype(np.float64)
    y = (lcg(8, n * d) + np.float32(0.25)).reshape(n, d).astype(np.float64)
    cost = np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))
    w = np.full(n, 1.0 / n)
    reps = max(1, min(20, 2000 // n))
    start = time.perf_counter()
    for _ in range(reps):
        value = ot.emd2(w, w, cost, numItermax=10**9)
    ms = (time.perf_counter() - start) * 1e3 / reps
    print(json.dumps({"n": n, "ms": ms, "cost": float(value)}))
