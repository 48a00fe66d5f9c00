"""The authors' whole small-scale transfer computation (hammlab/TaskTransferAnalysis,
small_scale/transfer_source_to_target.py), re-run on feature files exported by taskrel, so
that each reported term can be put beside taskrel's on the same features:

  1. StandardScaler per domain, fitted on the train features, applied to train and test;
  2. h_R: one dense layer, Adam(1e-4, beta_1=0.5), 501 epochs of batch 500 over the whole
     reference train set, loss mean CE(y) + 1e10 * mean(relu(||grad_z [CE(y) + CE(u)]|| - tau)^2)
     with u a fresh uniform random label per sample and step;
  3. LearnedAll: 1001 iterations of the loop in official_loop.py (stratified batches of 500,
     cdist costs with the 1e8 label cost, ot.emd, one TensorFlow step with five Adams), B's
     logits drawn from U[0, 1) and D's logits set to the prior, as the authors do;
  4. the printed terms on the test features: the reference loss weighted by D / p_R, the
     conditional entropy of B, the class-conditional W between A z + b (labels argmax B y) and
     the target test features, tau = max ||grad_z [CE(y) + CE(u)]|| at A'(z' - b) with the
     target labels, the bound ref + CE + tau * W, and the transformed classifier's accuracy
     and loss.

Their feature extractor is replaced by taskrel's features (the files); everything after it
follows their code. Not reproducible run to run (their numpy and TensorFlow draws are
unseeded beyond numpy's seed 2023 and TF's op-level randomness); run it several times.

Usage: official_transfer.py REF_TRAIN REF_TEST TGT_TRAIN TGT_TEST [SEED]
Prints one JSON line with the terms and the seconds taken.
"""
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import ot  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy.spatial.distance import cdist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official_loop import learned_all, read_features  # noqa: E402

TAU = 0.2
PENALTY = 1e10
BATCH = 500


def scaler(train):
    mean, std = train.mean(0), train.std(0)
    std[std == 0] = 1.0
    return lambda z: ((z - mean) / std).astype(np.float32)


def main():
    zr, yr = read_features(sys.argv[1])
    zr_test, yr_test = read_features(sys.argv[2])
    zt, yt = read_features(sys.argv[3])
    zt_test, yt_test = read_features(sys.argv[4])
    seed = int(sys.argv[5]) if len(sys.argv) > 5 else 2023
    np.random.seed(seed)
    start = time.perf_counter()
    fr, ft = scaler(zr), scaler(zt)
    zr, zr_test, zt, zt_test = fr(zr), fr(zr_test), ft(zt), ft(zt_test)
    kr, kt, d = int(yr.max()) + 1, int(yt.max()) + 1, zr.shape[1]
    eye_r, eye_t = np.eye(kr, dtype=np.float32), np.eye(kt, dtype=np.float32)
    yr1, yr1_test, yt1 = eye_r[yr], eye_r[yr_test], eye_t[yt]
    prior_source = np.full(kr, 1.0 / kr, np.float32)

    # --- h_R with the two-label gradient penalty --------------------------------------------
    inputs = tf.keras.layers.Input(shape=(d,))
    head = tf.keras.Model(inputs=inputs, outputs=tf.keras.layers.Dense(kr)(inputs))
    ce = tf.keras.losses.CategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE
    )
    head_opt = tf.keras.optimizers.Adam(1e-4, beta_1=0.5)

    def two_label_norms(x, y, u):
        x = tf.convert_to_tensor(x, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = head(x, training=True)
            loss = ce(y, out) + ce(u, out)
        g = tape.gradient(loss, x)
        return tf.sqrt(tf.reduce_sum(g**2, axis=1))

    @tf.function
    def head_step(x, y, u):
        with tf.GradientTape() as tape:
            out = head(x, training=True)
            penalty = tf.reduce_mean(tf.nn.relu(two_label_norms(x, y, u) - TAU) ** 2)
            loss = tf.reduce_mean(ce(y, out)) + PENALTY * penalty
        grads = tape.gradient(loss, head.trainable_variables)
        head_opt.apply_gradients(zip(grads, head.trainable_variables))

    for _ in range(501):
        order = np.arange(len(zr))
        np.random.shuffle(order)
        for b in range(len(zr) // BATCH):
            idx = order[b * BATCH : (b + 1) * BATCH]
            u = eye_r[np.random.randint(0, kr, len(idx))]
            head_step(zr[idx], yr1[idx], u)
    head_seconds = time.perf_counter() - start
    logits_test = head(zr_test, training=False).numpy()
    head_accuracy = float((logits_test.argmax(1) == yr_test).mean())
    tau_reference = float(
        tf.reduce_max(two_label_norms(zr_test, yr1_test, eye_r[np.random.randint(0, kr, len(zr_test))]))
    )

    # --- LearnedAll ---------------------------------------------------------------------------
    (a_np, a_bar_np, shift_np, bmat, prior), _ = learned_all(zr, yr1, zt, yt1, head, ce, 1001)

    # --- The printed terms, on the test features --------------------------------------------
    entropy = float(-np.sum(prior * np.sum(bmat * np.log(bmat), axis=0)))
    back = (a_bar_np @ (zt_test.T - shift_np)).T
    probs = tf.nn.softmax(head(back, training=False)).numpy() @ bmat.T
    target_accuracy = float((probs.argmax(1) == yt_test).mean())
    target_loss = float(-np.mean(np.log(np.maximum(probs[np.arange(len(yt_test)), yt_test], 1e-30))))
    moved = (a_np @ zr_test.T + shift_np).T
    mapped = (yr1_test @ bmat.T).argmax(1)
    classes = np.unique(mapped)
    wasserstein = 0.0
    for k in classes:
        xs, ys = moved[mapped == k], zt_test[yt_test == k]
        if len(ys) == 0:
            wasserstein = float("inf")
            break
        c = cdist(xs, ys, "euclidean")
        wasserstein += float(np.sum(ot.emd(ot.unif(len(xs)), ot.unif(len(ys)), c) * c)) / len(classes)
    weights = prior / prior_source
    logits = head(zr_test, training=False)
    per_sample = ce(yr1_test, logits).numpy()
    reference_loss = float(sum(weights[k] * per_sample[yr_test == k].sum() for k in range(kr)) / len(yr_test))
    # The authors take the target labels as h_R's labels (their label sets coincide).
    tau = float(
        tf.reduce_max(two_label_norms(back, eye_r[yt_test], eye_r[np.random.randint(0, kr, len(yt_test))]))
    )
    print(
        json.dumps(
            {
                "bound": reference_loss + entropy + tau * wasserstein,
                "reference_loss": reference_loss,
                "label_entropy": entropy,
                "wasserstein": wasserstein,
                "tau": tau,
                "tau_reference": tau_reference,
                "reference_accuracy": head_accuracy,
                "target_accuracy": target_accuracy,
                "target_loss": target_loss,
                "label_map_argmax": bmat.argmax(0).tolist(),
                "seconds_head": round(head_seconds, 1),
                "seconds_total": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
