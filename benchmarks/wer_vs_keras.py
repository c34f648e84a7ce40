"""Held-out-voice greedy WER at equal wall time: a plain single-process tf.keras loop of dstrain's model against
``horovodrun -np 2 dstrain train`` (recipes/synth_cv.sh), on the synthetic Common Voice corpus.

The plain loop is what a careful user writes by hand: the whole training store in memory as globally normalised
MFCCs, length-sorted batches (shuffled batch order), Adam with gradient clipping, the same model and batch size as
the recipe's global batch, greedy decoding. It trains for ``--minutes`` of wall time and reports greedy WER/CER on
the dev and test voices; the recipe's figures come from its own ``greedy_*.txt`` files (run it first with the same
MINUTES).

    recipes/synth_cv.sh build/synth_cv                       # MINUTES=20 by default
    .venv/bin/python benchmarks/wer_vs_keras.py --work build/synth_cv --minutes 20
"""

from __future__ import annotations

import argparse
import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dstrain.alphabet import greedy_decode  # noqa: E402
from dstrain.features import dct_matrix  # noqa: E402
from dstrain.metrics import error_rates  # noqa: E402
from dstrain.model import DeepSpeech, ModelConfig, ctc_loss  # noqa: E402
from dstrain.store import FeatureStore  # noqa: E402


def load(url: str):
    store = FeatureStore.open(url)
    dct = dct_matrix(store.features).astype(np.float32)
    xs, ys = [], []
    for i in range(len(store.manifest.shards)):
        for u in store.reader(i).utterances():
            xs.append(u.features.astype(np.float32) @ dct)
            ys.append(u.labels)
    return store, xs, ys


def batches(xs, ys, size: int, rng: np.random.Generator):
    order = np.argsort([len(x) for x in xs], kind="stable")
    groups = [order[i : i + size] for i in range(0, len(order), size)]
    for g in rng.permutation(len(groups)):
        idx = groups[g]
        t = max(len(xs[i]) for i in idx)
        ln = max(len(ys[i]) for i in idx)
        x = np.zeros((len(idx), t, xs[0].shape[1]), np.float32)
        y = np.zeros((len(idx), ln), np.int32)
        for j, i in enumerate(idx):
            x[j, : len(xs[i])] = xs[i]
            y[j, : len(ys[i])] = ys[i]
        yield x, np.array([len(xs[i]) for i in idx], np.int32), y, np.array([len(ys[i]) for i in idx], np.int32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="build/synth_cv", help="the recipe's work folder (stores/train, dev, test)")
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--batch_size", type=int, default=16, help="the recipe's global batch (2 ranks x 8)")
    p.add_argument("--n_hidden", type=int, default=384)
    p.add_argument("--learning_rate", type=float, default=0.001)
    args = p.parse_args()
    tf.keras.utils.set_random_seed(0)
    store, xs, ys = load(os.path.join(args.work, "stores", "train"))
    alphabet = store.manifest.get_alphabet()
    stacked = np.concatenate(xs)
    mean, std = stacked.mean(0), stacked.std(0) + 1e-6
    xs = [(x - mean) / std for x in xs]
    model = DeepSpeech(ModelConfig(n_hidden=args.n_hidden, dropout_rate=0.1), xs[0].shape[1], len(alphabet) + 1)
    opt = tf.keras.optimizers.Adam(args.learning_rate, clipnorm=10.0)

    @tf.function(reduce_retracing=True)
    def step(x, n, y, ln):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(ctc_loss(model((x, n), training=True), n, y, ln))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rng = np.random.default_rng(0)
    start, epochs, frames = time.time(), 0, 0
    deadline = start + args.minutes * 60
    while time.time() < deadline:
        for x, n, y, ln in batches(xs, ys, args.batch_size, rng):
            step(x, n, y, ln)
            frames += int(n.sum())
            if time.time() >= deadline:
                break
        else:
            epochs += 1
    elapsed = time.time() - start
    print(f"plain tf.keras loop: {epochs} full epochs in {elapsed / 60:.1f} min, {frames / elapsed:.0f} frames/s")
    for split in ("dev", "test"):
        _, vx, vy = load(os.path.join(args.work, "stores", split))
        pairs = []
        for x, n, y, ln in batches([(v - mean) / std for v in vx], vy, 32, np.random.default_rng(0)):
            probs = model((x, n), training=False).numpy()
            for b in range(len(n)):
                pairs.append((alphabet.decode(y[b, : ln[b]]), greedy_decode(probs[b, : n[b]].argmax(1), alphabet)))
        wer, cer = error_rates(pairs)
        ours = ""
        txt = os.path.join(args.work, f"greedy_{split}.txt")
        if os.path.exists(txt):
            m = re.search(r"WER: ([\d.]+), CER: ([\d.]+)", open(txt).read())
            ours = f"   dstrain (horovodrun -np 2): WER {float(m[1]):.3f} CER {float(m[2]):.3f}" if m else ""
        print(f"{split} voice: plain loop WER {wer:.3f} CER {cer:.3f}{ours}")


if __name__ == "__main__":
    main()
