# The transport part of the official LearnedAll loop (hammlab/TaskTransferAnalysis, small
# scale): per iteration, sample M reference points by class counts floor(M * D_j) and M
# target points by floor(M * p_T,k), build the cost ||A z + b - z'|| + 1e8 ||B y - y'|| and
# solve ot.emd with uniform weights. The Adam step is not timed, so the ratio against taskrel's
# full run is a lower bound on the real speed-up.
import json, struct, sys, time
import numpy as np, ot

def load(path):
    raw = open(path, 'rb').read()
    n = struct.unpack('<Q', raw[:8])[0]
    header = json.loads(raw[8:8 + n]); body = raw[8 + n:]
    def get(name, dtype):
        h = header[name]; a, b = h['data_offsets']
        return np.frombuffer(body[a:b], dtype=dtype).reshape(h['shape'])
    return get('features', np.float32), get('labels', np.uint32)

zr, yr = load(sys.argv[1]); zt, yt = load(sys.argv[2]); iters = int(sys.argv[3]) if len(sys.argv) > 3 else 1001
zr = (zr - zr.mean(0)) / (zr.std(0) + 1e-6); zt = (zt - zt.mean(0)) / (zt.std(0) + 1e-6)
K = int(yr.max()) + 1; M = 500
rng = np.random.default_rng(0)
pr = np.bincount(yr, minlength=K) / len(yr); pt = np.bincount(yt, minlength=K) / len(yt)
A = np.eye(zr.shape[1]); b = np.zeros(zr.shape[1]); B = np.full((K, K), 1.0 / K)
t0 = time.perf_counter(); t_emd = 0.0
for it in range(iters):
    ri = np.concatenate([rng.choice(np.where(yr == j)[0], int(M * pr[j]), replace=False) for j in range(K)])
    ti = np.concatenate([rng.choice(np.where(yt == k)[0], int(M * pt[k]), replace=False) for k in range(K)])
    x = zr[ri] @ A.T + b; y = zt[ti]
    C = ot.dist(x, y, metric='euclidean')
    by = B[:, yr[ri]].T; oy = np.eye(K)[yt[ti]]
    C += 1e8 * np.sqrt(((by[:, None, :] - oy[None, :, :]) ** 2).sum(-1))
    t1 = time.perf_counter()
    G = ot.emd(np.full(len(ri), 1 / len(ri)), np.full(len(ti), 1 / len(ti)), C)
    t_emd += time.perf_counter() - t1
total = time.perf_counter() - t0
print(json.dumps({"iterations": iters, "seconds_total": total, "seconds_emd": t_emd, "per_iteration_ms": total / iters * 1e3}))
