"""Training throughput and model FLOP utilisation (MFU) of ``dstrain train`` on one GPU.

What it runs, each in its own process (TensorFlow fixes its precision policy and memory once it starts):

* **matmul**: the card's dense matrix rate through TensorFlow (8192^3 float16 and bfloat16 products): the
  denominator of MFU. The first process also pays the PTX JIT of TensorFlow 2.15 on Hopper (its wheel has no
  sm_90 kernels); ``CUDA_CACHE_MAXSIZE`` keeps the result for the processes after it.
* **fp32-B / amp-B**: ``dstrain train`` (one process, the trainer's own loop, loader and step) at ``--n_hidden``
  2048 on a synthetic store, float32 or ``--automatic_mixed_precision``, ``--train_batch_size B``; frames/s of the
  best epoch after the first (the first traces and autotunes).
* **keras-amp-B**: the same model, batches and precision in a plain tf.keras loop fed from memory
  (``train_step.keras_worker``): what the model costs without dstrain's loop around it.
* **parts**: one batch of B utterances of ``--frames_parts`` frames under AMP, timed piece by piece (the whole
  step, forward only, forward + backward, the LSTM alone, CTC alone): where a step's time goes.

MFU = frames/s x training FLOPs per frame (3 x the forward matmul FLOPs, from the geometry: ~283 MFLOP at n_hidden
2048) / the measured float16 matmul rate. Results go to stdout and, as they come, to ``--out``/results.json.

    .venv/bin/python benchmarks/train_gpu.py --out /tmp/gpu [--only matmul,amp-128,amp-32,fp32-128,fp32-32]
    # a smoke run on CPU:
    .venv/bin/python benchmarks/train_gpu.py --n_hidden 64 --utterances 64 --only amp-16,keras-amp-16,parts-16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

from train_step import ALPHABET, BIN, epoch_records, keras_worker  # noqa: E402

from dstrain.record import format_epoch  # noqa: E402

DEFAULT = "matmul,amp-128,amp-32,fp32-128,fp32-32,keras-amp-128,parts-128,amp-256"


def train_flops_per_frame(n_hidden: int, n_input: int = 26, n_context: int = 9, n_classes: int = 29) -> float:
    """Multiply-adds x 2 of one frame's forward pass through DeepSpeech's layers, x 3 for forward + backward."""
    h = n_hidden
    macs = (2 * n_context + 1) * n_input * h + 2 * h * h + 4 * h * (h + h) + h * h + h * n_classes
    return 3 * 2 * macs


# ----------------------------------------------------------------------------------------------------------------------
# workers (one process each)


def matmul_worker(spec: dict) -> dict:
    import tensorflow as tf

    n, out = spec["n"], {"gpus": len(tf.config.list_physical_devices("GPU"))}
    if out["gpus"]:
        out["device"] = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0]).get(
            "device_name", ""
        )
    for dtype in (tf.float16, tf.bfloat16):
        a = tf.random.normal([n, n], dtype=tf.float32)
        a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)
        mm = tf.function(lambda a, b: tf.reduce_sum(tf.cast(tf.matmul(a, b)[:1, :1], tf.float32)))
        for _ in range(3):
            mm(a, b).numpy()
        reps, t = spec["reps"], time.perf_counter()
        r = [mm(a, b) for _ in range(reps)]
        r[-1].numpy()
        out[dtype.name] = 2 * n**3 * reps / (time.perf_counter() - t)
    return out


def parts_worker(spec: dict) -> dict:
    """Seconds per call of the pieces of one AMP training step on a fixed batch."""
    import numpy as np
    import tensorflow as tf

    from dstrain.features import FeatureConfig
    from dstrain.model import DeepSpeech, ModelConfig, ctc_loss

    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    b, t, h = spec["batch"], spec["frames"], spec["n_hidden"]
    fc = FeatureConfig()
    model = DeepSpeech.for_features(ModelConfig(n_hidden=h), fc, 29)
    opt = tf.keras.mixed_precision.LossScaleOptimizer(tf.keras.optimizers.Adam(1e-4))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((b, t, fc.n_mel)), tf.float32)
    x_len = tf.fill([b], t)
    y = tf.constant(rng.integers(0, 28, (b, t // 4)), tf.int32)
    y_len = tf.fill([b], t // 4)

    @tf.function
    def forward():
        return model((x, x_len), training=True)

    def loss_and_grads():
        # Plain Python, traced into each tf.function below (one tf.function calling another timed 2x slower).
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(ctc_loss(model((x, x_len), training=True), x_len, y, y_len))
            scaled = opt.get_scaled_loss(loss)
        return loss, opt.get_unscaled_gradients(tape.gradient(scaled, model.trainable_variables))

    @tf.function
    def fwd_bwd():
        return loss_and_grads()[1]

    @tf.function
    def step():
        loss, grads = loss_and_grads()
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    lstm_in = tf.cast(tf.random.normal([b, t, h]), tf.float16)
    mask = tf.sequence_mask(x_len, t)

    @tf.function
    def lstm():
        with tf.GradientTape() as tape:
            tape.watch(lstm_in)
            out = model.lstm(lstm_in, mask=mask, training=True)
            s = tf.reduce_sum(tf.cast(out, tf.float32))
        return tape.gradient(s, [lstm_in] + model.lstm.trainable_variables)

    logits = tf.random.normal([b, t, 29])

    @tf.function
    def ctc():
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = tf.reduce_mean(ctc_loss(logits, x_len, y, y_len))
        return tape.gradient(loss, logits)

    def timed(fn, reps: int = spec["reps"]) -> float:
        for _ in range(3):
            r = fn()
        _sync(r)
        t0 = time.perf_counter()
        for _ in range(reps):
            r = fn()
        _sync(r)
        return (time.perf_counter() - t0) / reps

    out = {
        name: timed(fn)
        for name, fn in (
            ("step", step),
            ("forward", forward),
            ("forward+backward", fwd_bwd),
            ("lstm fwd+bwd", lstm),
            ("ctc fwd+bwd", ctc),
        )
    }
    out["frames"] = b * t
    return out


def _sync(r) -> None:
    import tensorflow as tf

    for leaf in tf.nest.flatten(r):
        leaf.numpy()


WORKERS = {"matmul": matmul_worker, "parts": parts_worker, "keras": keras_worker}


def run_worker(kind: str, spec: dict, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--_worker", kind, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        raise RuntimeError(f"{kind} worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return json.loads(lines[-1])


def dstrain_train(args, store: str, precision: str, batch: int, timeout: float) -> dict:
    cmd = [
        os.path.join(BIN, "dstrain"),
        "train",
        "--train_files",
        store,
        "--alphabet_config_path",
        ALPHABET,
        "--n_hidden",
        str(args.n_hidden),
        "--epochs",
        str(args.epochs),
        "--train_batch_size",
        str(batch),
        "--learning_rate",
        "0.0001",
        "--noshow_progressbar",
        "--limit_train",
        str(args.steps * batch),
    ]
    if precision == "fp16":
        cmd.append("--automatic_mixed_precision")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dstrain-bench-") as run:
        proc = subprocess.run(
            cmd + ["--checkpoint_dir", run],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
        found = epoch_records(run)
    if proc.returncode != 0 or len(found) < args.epochs:
        raise RuntimeError(f"{' '.join(cmd)}\nfailed with status {proc.returncode}:\n{proc.stdout[-3000:]}")
    return {
        "epochs": [r["frames_per_s"] for r in found],
        "seconds": [r["seconds"] for r in found],
        "wall": time.perf_counter() - t0,
        "log": [format_epoch(r) for r in found],
    }


# ----------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=DEFAULT, help="comma-separated: matmul, amp-B, fp32-B, keras-amp-B, parts-B")
    parser.add_argument("--n_hidden", type=int, default=2048)
    parser.add_argument("--utterances", type=int, default=3072, help="utterances in the synthetic store")
    parser.add_argument("--frames", default="200,800", help="utterance lengths drawn from [lo, hi) frames (20 ms)")
    parser.add_argument("--frames_parts", type=int, default=500, help="frames of every utterance in the parts batch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
    parser.add_argument("--steps", type=int, default=24, help="steps per epoch (--limit_train steps x batch)")
    parser.add_argument("--matmul_n", type=int, default=8192)
    parser.add_argument("--timeout", type=float, default=240, help="seconds each process may take")
    parser.add_argument("--out", default="", help="folder for results.json (written after every configuration)")
    parser.add_argument("--store", default="", help="reuse (or create) the synthetic store here")
    parser.add_argument("--_worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        kind, spec = args._worker
        print(json.dumps(WORKERS[kind](json.loads(spec))), flush=True)
        return

    import tempfile

    flops = train_flops_per_frame(args.n_hidden)
    results: dict = {"n_hidden": args.n_hidden, "train_flops_per_frame": flops, "runs": {}}
    out_file = os.path.join(args.out, "results.json") if args.out else ""
    if args.out:
        os.makedirs(args.out, exist_ok=True)

    def record(name: str, value) -> None:
        results["runs"][name] = value
        if out_file:
            with open(out_file, "w") as f:
                json.dump(results, f, indent=1)

    tmp = tempfile.mkdtemp()
    store = args.store or os.path.join(tmp, "store")
    only = args.only.split(",")
    maker = None
    if not os.path.exists(os.path.join(store, "_manifest.json")):
        # The store is written in the background while the matmul process pays the PTX JIT.
        lo, hi = args.frames.split(",")
        maker = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {os.path.join(REPO, 'tests')!r}); "
                f"from conftest import synthetic_store; synthetic_store({store!r}, {args.utterances}, "
                f"row_group_rows=64, frames=({lo}, {hi}), seed=1)",
            ]
        )
    rate16 = None
    print(f"n_hidden {args.n_hidden}: {flops / 1e6:.1f} MFLOP per frame for a training step", flush=True)
    for name in only:
        t0 = time.perf_counter()
        try:
            if name == "matmul":
                r = run_worker("matmul", {"n": args.matmul_n, "reps": 20}, args.timeout + 180)
                rate16 = r.get("float16")
                results["device"] = r.get("device", "")
                print(
                    f"matmul {args.matmul_n}^3 on {r.get('device') or 'CPU'}: "
                    f"float16 {r['float16'] / 1e12:.0f} TFLOP/s, bfloat16 {r['bfloat16'] / 1e12:.0f} TFLOP/s "
                    f"({time.perf_counter() - t0:.0f} s with the first start)",
                    flush=True,
                )
                record(name, r)
                continue
            if maker is not None:
                if maker.wait() != 0:
                    sys.exit("could not write the synthetic store")
                maker = None
            kind, batch = name.rsplit("-", 1)
            batch = int(batch)
            if kind == "parts":
                r = run_worker(
                    "parts",
                    {"batch": batch, "frames": args.frames_parts, "n_hidden": args.n_hidden, "reps": 10},
                    args.timeout,
                )
                frames = r.pop("frames")
                print(
                    f"parts, AMP, batch {batch} x {args.frames_parts} frames: "
                    + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in r.items())
                    + f"; whole step {frames / r['step']:.0f} frames/s",
                    flush=True,
                )
                record(name, dict(r, frames=frames))
                continue
            if kind == "keras-amp":
                r = run_worker(
                    "keras",
                    {
                        "store": store,
                        "batch": batch,
                        "n_hidden": args.n_hidden,
                        "epochs": args.epochs,
                        "precision": "fp16",
                        "limit": args.steps * batch,
                    },
                    args.timeout,
                )
            elif kind in ("amp", "fp32"):
                r = dstrain_train(args, store, "fp16" if kind == "amp" else "fp32", batch, args.timeout)
            else:
                sys.exit(f"unknown configuration {name!r}")
            best = max(r["epochs"][1:])
            mfu = best * flops / rate16 if rate16 else float("nan")
            r.update(best=best, mfu=mfu)
            record(name, r)
            print(
                f"{name:<14} frames/s by epoch {' '.join(f'{v:.0f}' for v in r['epochs'])}  best {best:.0f}  "
                f"MFU {mfu:.1%}  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"{name}: FAILED: {e}", flush=True)
            record(name, {"error": str(e)[-2000:]})
    print(json.dumps({k: v.get("best", v.get("float16")) for k, v in results["runs"].items()}))


if __name__ == "__main__":
    main()
