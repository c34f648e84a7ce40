"""--ema_decay: an exponential moving average of the model's weights, kept beside them on every rank.

Every rank updates its average inside the training step, after the optimizer step, from weights that are identical on
all ranks, so the averages are identical too without any collective. A step skipped for a non-finite loss or gradient
(or a float16 overflow) leaves the average alone. The decay of update ``n`` (0-based, counting updates, not steps) is
``min(D, (1 + n) / (10 + n))``, TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` warm-up: 0.1 at the first
update, so the average follows the weights while they move fast instead of remembering the random initialisation.

The average lives in a second model of the same geometry, saved in checkpoints under
:data:`dstrain.rundir.EMA_MODEL` with its update count, so a checkpoint's average loads into any model of the run
(evaluate, export, fine-tuning) the way its raw weights do. Evaluation swaps it in and back (:meth:`swapped_in`):
the raw weights keep training.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import tensorflow as tf

from dstrain.model import DeepSpeech
from dstrain.rundir import EMA_MODEL

UPDATES = "ema_updates"
"""Checkpoint key of the number of updates made (the warm-up's ``n``)."""


def warmed_up_decay(decay: float, updates: tf.Tensor) -> tf.Tensor:
    """The decay of the update after ``updates`` earlier ones: ``min(decay, (1 + n) / (10 + n))``."""
    n = tf.cast(updates, tf.float32)
    return tf.minimum(tf.constant(decay, tf.float32), (1.0 + n) / (10.0 + n))


class WeightAverage:
    """The moving average of ``model``'s weights (all of them: the front end's fixed statistics average to
    themselves), in ``average``, a model built by ``new_model``."""

    KEYS = (EMA_MODEL, UPDATES)

    def __init__(self, model: DeepSpeech, decay: float, new_model: Callable[[], DeepSpeech]):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.model, self.decay = model, decay
        self.average = new_model()
        self.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name=UPDATES)
        self.pairs = list(zip(model.weights, self.average.weights))
        bad = [(a.name, b.name) for a, b in self.pairs if a.shape != b.shape]
        if len(model.weights) != len(self.average.weights) or bad:
            raise ValueError(f"the averaged model's weights do not match the model's: {bad or 'counts differ'}")

    def trackables(self) -> dict[str, tf.Module | tf.Variable]:
        """What checkpoints save of it."""
        return dict(zip(self.KEYS, (self.average, self.updates)))

    def variables(self) -> list[tf.Variable]:
        """What every rank takes from rank 0 at the start."""
        return list(self.average.weights) + [self.updates]

    def reset(self) -> None:
        """Starts the average at the model's current weights (a fresh run, fine-tuning, or a checkpoint saved
        without an average)."""
        for w, a in self.pairs:
            a.assign(tf.identity(w))
        self.updates.assign(0)

    def update(self) -> tf.Operation:
        """One update towards the current weights (in the training step's graph, after the optimizer's step)."""
        d = warmed_up_decay(self.decay, self.updates)
        # a - (1 - d)(a - w) = d a + (1 - d) w, exact where a == w: weights that do not train stay as they are.
        ops = [a.assign_sub((1.0 - d) * (a - tf.cast(w, a.dtype))) for w, a in self.pairs]
        with tf.control_dependencies(ops):
            return self.updates.assign_add(1).op

    def _swap(self) -> None:
        for w, a in self.pairs:
            raw = tf.identity(w)
            w.assign(tf.identity(a))
            a.assign(raw)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block and its own weights again after it, whatever happens."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def copy_to_model(self) -> None:
        """The model takes the average for good (after training: test and export)."""
        for w, a in self.pairs:
            w.assign(tf.identity(a))
