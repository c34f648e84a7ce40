"""``dstrain average``: the element-wise mean of a run's last or best-dev checkpoints, written as a run directory
that ``dstrain evaluate``, ``dstrain export``, ``dstrain transcribe`` and fine-tuning (``--load_checkpoint_dir``) take.

Each checkpoint contributes the weights evaluation would use from it (:func:`dstrain.rundir.evaluation_weights`):
its moving average when it was trained with --ema_decay, else its raw weights, so an average of averages is what
gets evaluated when the run had one. Which checkpoints: :meth:`RunDir.last_checkpoints` and
:meth:`RunDir.best_checkpoints`.

Example::

    dstrain average runs/cv --best 5 --output runs/cv-best5
    dstrain evaluate --checkpoint_dir runs/cv-best5 --test_files stores/cv-test
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from dstrain.config import option
from dstrain.rundir import EMA_MODEL, MODEL, RunDir, evaluation_weights, weight_shapes

log = logging.getLogger("dstrain.average")


@dataclass(frozen=True)
class AverageConfig:
    """dstrain average: the mean of a run's last or best-dev checkpoints, as a run directory to evaluate, export or
    fine-tune from"""

    run_dir: str = option(positional=True)
    """The training run (its --checkpoint_dir)."""
    output: str = option()
    """New run directory to write: the run's config.json and one checkpoint (train/ckpt-1) of the averaged weights."""
    last: int = option(0, metavar="K")
    """Average the K latest checkpoints (train/ keeps the run's --max_to_keep); 0: not this way."""
    best: int = option(0, metavar="K")
    """Average the K checkpoints of the lowest dev loss the run record gives (train/'s kept ones and best_dev/'s);
    0: not this way."""

    def __post_init__(self) -> None:
        if self.last < 0 or self.best < 0:
            raise ValueError("--last and --best take a number of checkpoints >= 1")
        if bool(self.last) == bool(self.best):
            raise ValueError("give one of --last K and --best K")
        if os.path.abspath(self.output) == os.path.abspath(self.run_dir):
            raise ValueError("--output must be a new directory, not the run itself")


def _check_shapes(chosen: list[tuple[str, str]]) -> None:
    """All checkpoints hold the same variables with the same shapes (else there is no element-wise mean)."""
    first, first_weights = chosen[0]
    reference = weight_shapes(first, first_weights)
    if not reference:
        raise ValueError(f"{first}: no model weights in this checkpoint")
    for path, weights in chosen[1:]:
        shapes = weight_shapes(path, weights)
        for name in sorted(set(reference) | set(shapes)):
            if name not in shapes or name not in reference:
                where = path if name not in shapes else first
                raise ValueError(
                    f"{where} lacks {name}, which {first if where == path else path} has: checkpoints of "
                    "different models cannot be averaged"
                )
            if shapes[name] != reference[name]:
                raise ValueError(
                    f"{path}: {name} has shape {shapes[name]}, {reference[name]} in {first}: checkpoints of "
                    "different geometries cannot be averaged"
                )


def average(cfg: AverageConfig) -> str:
    """Writes the average; returns the checkpoint written."""
    run, out = RunDir(cfg.run_dir), RunDir(cfg.output)
    info = run.read()
    out.check_new()  # before the work
    if cfg.last:
        chosen, losses = run.last_checkpoints(cfg.last), [None] * cfg.last
    else:
        ranked = run.best_checkpoints(cfg.best)
        chosen, losses = [p for p, _ in ranked], [loss for _, loss in ranked]
    kinds = [evaluation_weights(p) for p in chosen]
    _check_shapes(list(zip(chosen, kinds)))
    model = run.new_model(info)
    total: list[np.ndarray] | None = None
    for path, kind in zip(chosen, kinds):
        try:
            status = tf.train.Checkpoint(**{EMA_MODEL if kind == "ema" else MODEL: model}).restore(path)
            status.assert_existing_objects_matched().expect_partial()
        except (AssertionError, ValueError) as e:
            raise ValueError(
                f"{path}: its weights do not fit the run's model ({run.config_path}): "
                f"{str(e).splitlines()[0][:300]}"
            ) from None
        # float64 sums: the mean of K equal float32 values is that value exactly.
        values = [np.asarray(w, np.float64) for w in model.get_weights()]
        total = values if total is None else [t + v for t, v in zip(total, values)]
    model.set_weights([(t / len(chosen)).astype(w.dtype.as_numpy_dtype) for t, w in zip(total, model.weights)])
    sources = [
        {"path": os.path.abspath(p), "weights": k, **({"dev_loss": loss} if loss is not None else {})}
        for p, k, loss in zip(chosen, kinds, losses)
    ]
    averaged = {"run": os.path.abspath(cfg.run_dir), "select": "last" if cfg.last else "best", "checkpoints": sources}
    written = out.write_averaged(run, model, averaged)
    log.info(
        "Averaged %d checkpoint(s) of %s (%s) into %s",
        len(chosen),
        cfg.run_dir,
        ", ".join(f"{os.path.basename(p)}: {k}" for p, k in zip(chosen, kinds)),
        written,
    )
    return written


def run_average(cfg: AverageConfig) -> int:
    """``dstrain average`` (one process)."""
    average(cfg)
    return 0
