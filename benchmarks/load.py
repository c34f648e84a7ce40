"""Load time and memory of the exported forms of a DeepSpeech model (n_hidden 2048, random weights): the SavedModel,
the TFLite model and the quantised TFLite model, each loaded the way ``dstrain transcribe`` loads it
(:func:`dstrain.inference.load_model`) in a fresh process.

Each measurement is its own subprocess: it imports TensorFlow, then reads its resident memory (VmRSS), loads the model
(timed), reads it again, runs a first inference on 5 s of features (timed; the SavedModel traces and optimises its
graph on this call) and reads it a third time. Memory is the growth over the process after ``import tensorflow``.
The files are read once before the timed runs (warm page cache, as on a server that restarts); each form is measured
``--repeats`` times and the median reported. About two minutes on a 2-core CPU.

    .venv/bin/python benchmarks/load.py [--repeats 3] [--n_hidden 2048] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

FORMS = ("saved_model", "tflite", "tflite_quantized")
INFERENCE_FRAMES = 250  # 5 s at 20 ms


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def child(path: str) -> None:
    """One measurement, printed as JSON on the last line of stdout."""
    import numpy as np
    import tensorflow as tf  # noqa: F401 - imported before the baseline: TensorFlow's own cost is not the model's

    from dstrain.inference import load_model

    base = _rss_mb()
    start = time.perf_counter()
    model = load_model(path)
    load_s = time.perf_counter() - start
    loaded = _rss_mb()
    x = np.random.default_rng(0).normal(size=(INFERENCE_FRAMES, model.features.n_mel)).astype(np.float32)
    start = time.perf_counter()
    model.log_probs([x])
    first_s = time.perf_counter() - start
    after = _rss_mb()
    start = time.perf_counter()
    model.log_probs([x])
    second_s = time.perf_counter() - start
    print(
        json.dumps(
            {
                "load_s": load_s,
                "first_inference_s": first_s,
                "second_inference_s": second_s,
                "rss_load_mb": loaded - base,
                "rss_after_inference_mb": after - base,
            }
        )
    )


def export_forms(root: str, n_hidden: int) -> dict[str, str]:
    """Random-weight model exported as SavedModel, TFLite and quantised TFLite (reused when ``root`` has them)."""
    paths = {
        "saved_model": os.path.join(root, "export"),
        "tflite": os.path.join(root, "export", "model.tflite"),
        "tflite_quantized": os.path.join(root, "model_quantized.tflite"),
    }
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    from dstrain.alphabet import Alphabet
    from dstrain.export import ExportOptions, export_model, tflite_model
    from dstrain.features import FeatureConfig
    from dstrain.model import DeepSpeech, ModelConfig

    alphabet = Alphabet.from_file(os.path.join(os.path.dirname(__file__), "..", "dstrain", "data", "alphabet.txt"))
    model = DeepSpeech.for_features(ModelConfig(n_hidden=n_hidden), FeatureConfig(), len(alphabet) + 1)
    meta = export_model(
        paths["saved_model"],
        model,
        alphabet,
        FeatureConfig(),
        {"weights_from": "random"},
        options=ExportOptions(export_tflite=True),
    )
    with open(paths["tflite_quantized"], "wb") as f:
        f.write(tflite_model(model, meta, quantize=True))
    return paths


def _size_mb(path: str) -> float:
    if os.path.isfile(path):
        return os.path.getsize(path) / 2**20
    skip = {"model.tflite", "model_streaming.tflite"}  # the SavedModel alone
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs if f not in skip) / 2**20


def measure(path: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", path], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n_hidden", type=int, default=2048)
    parser.add_argument("--keep", default="", help="folder for the exports, reused by later runs (default: temporary)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.child:
        child(args.child)
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or tmp
        start = time.perf_counter()
        paths = export_forms(root, args.n_hidden)
        print(
            f"n_hidden {args.n_hidden}, random weights; exported in {time.perf_counter() - start:.0f} s; "
            f"{os.cpu_count()} CPUs; median of {args.repeats} fresh processes each\n"
        )
        rows = {}
        for form in FORMS:
            measure(paths[form])  # warm the page cache
            runs = [measure(paths[form]) for _ in range(args.repeats)]
            rows[form] = {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {
                "size_mb": _size_mb(paths[form])
            }

    header = (
        f"{'form':<18}{'file MB':>9}{'load s':>8}{'1st infer s':>13}{'2nd infer s':>13}{'RSS load MB':>13}"
        f"{'RSS +1st MB':>13}"
    )
    print(header + "\n" + "-" * len(header))
    for form, r in rows.items():
        print(
            f"{form:<18}{r['size_mb']:>9.1f}{r['load_s']:>8.2f}{r['first_inference_s']:>13.2f}{r['second_inference_s']:>13.2f}"
            f"{r['rss_load_mb']:>13.1f}{r['rss_after_inference_mb']:>13.1f}"
        )
    print(f"(inference: {INFERENCE_FRAMES} frames, 5 s of audio; RSS: growth after import tensorflow)")

    def ready_s(form: str) -> float:
        return rows[form]["load_s"] + rows[form]["first_inference_s"]

    best = min(FORMS, key=lambda f: (ready_s(f), rows[f]["rss_after_inference_mb"]))
    saved = rows["saved_model"]
    how = {
        "saved_model": "the export folder",
        "tflite": "EXPORT/model.tflite (dstrain export --export_tflite)",
        "tflite_quantized": "EXPORT/model.tflite (dstrain export --export_tflite --export_quantize)",
    }[best]
    print(
        f"\nRecommendation: {best} for transcription on CPU, dstrain transcribe --model {how}: loaded and through "
        f"its first 5 s in {ready_s(best):.2f} s against {ready_s('saved_model'):.2f} s for the SavedModel, with "
        f"{rows[best]['rss_after_inference_mb']:.0f} MB against {saved['rss_after_inference_mb']:.0f} MB; then "
        f"{rows[best]['second_inference_s']:.2f} s per 5 s against {saved['second_inference_s']:.2f} s."
    )
    if best == "tflite_quantized":
        print(
            "Quantised weights (int8, dynamic range) change log-probabilities slightly: check WER on a dev set "
            "(dstrain evaluate) before shipping it; the float TFLite model gives the SavedModel's outputs."
        )
    print(
        "Keep the SavedModel for batched or GPU inference and TensorFlow Serving (its log_probs signature takes "
        "padded batches)."
    )


if __name__ == "__main__":
    main()
