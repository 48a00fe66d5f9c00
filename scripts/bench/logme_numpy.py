"""thuml/LogME on the features `taskrel bench logme` builds, for a side-by-side timing.

    python scripts/bench/logme_numpy.py PATH/TO/LogME/repo [n d k reps]

PATH/TO/LogME/repo is a checkout of https://github.com/thuml/LogME (its LogME.py needs numpy
and numba). Features: the 32-bit LCG s = (1664525 s + 1013904223) mod 2^32 from seed 11,
rounded to f32 as taskrel does, plus 0.5 where j % k == i % k; labels i % k.
"""
import sys, time
import numpy as np

sys.path.insert(0, sys.argv[1])
from LogME import LogME  # noqa: E402

n, d, k, reps = (int(a) for a in (sys.argv[2:6] if len(sys.argv) > 5 else (5000, 1024, 10, 3)))
state = 11
a, c, mod = 1664525, 1013904223, 1 << 32
# The LCG in closed form per block would be faster; a plain loop keeps it obviously equal.
vals = np.empty(n * d, dtype=np.float64)
for idx in range(n * d):
    state = (a * state + c) % mod
    vals[idx] = np.float32(state / mod)
x = vals.reshape(n, d)
y = np.arange(n) % k
x = x + 0.5 * ((np.arange(d)[None, :] % k) == y[:, None])
times = []
for _ in range(reps):
    t = time.perf_counter()
    score = LogME().fit(x, y)
    times.append(time.perf_counter() - t)
print(f"thuml LogME n = {n}, d = {d}, {k} classes: {score:.10f} in {min(times):.3f} s (best of {reps})")
