"""Checkpoints: model, optimizer and progress counters in one tf.train.Checkpoint, in a :class:`RunDir`.

Only rank 0 constructs a :class:`Checkpoints`: other ranks receive state by broadcast.
"""
from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from dstrain.train.rundir import RunDir


@dataclass
class Progress:
    """Counters saved with the weights."""

    epoch: tf.Variable
    """Epochs fully done."""
    step: tf.Variable
    """Training steps done in all."""
    best_dev_loss: tf.Variable
    epoch_step: tf.Variable
    """Steps done in the unfinished epoch ``epoch`` (non-zero only in a checkpoint taken on preemption)."""

    @classmethod
    def new(cls) -> "Progress":
        return cls(
            epoch=tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch"),
            step=tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step"),
            best_dev_loss=tf.Variable(float("inf"), dtype=tf.float64, trainable=False, name="best_dev_loss"),
            epoch_step=tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch_step"),
        )

    def variables(self) -> list[tf.Variable]:
        return [self.epoch, self.step, self.best_dev_loss, self.epoch_step]


class Checkpoints:
    def __init__(self, run: RunDir, model: tf.keras.Model, optimizer, progress: Progress, max_to_keep: int = 5):
        self.run = run
        self.ckpt = tf.train.Checkpoint(
            model=model,
            optimizer=optimizer,
            epoch=progress.epoch,
            step=progress.step,
            best_dev_loss=progress.best_dev_loss,
            epoch_step=progress.epoch_step,
        )
        self.latest = tf.train.CheckpointManager(self.ckpt, run.latest_dir, max_to_keep=max_to_keep)
        self.best = tf.train.CheckpointManager(self.ckpt, run.best_dir, max_to_keep=1)

    def restore_latest(self) -> str | None:
        path = self.latest.latest_checkpoint
        if path:
            self.ckpt.restore(path).assert_existing_objects_matched()
        return path

    def restore_best(self) -> str | None:
        path = self.best.latest_checkpoint
        if path:
            self.ckpt.restore(path).assert_existing_objects_matched()
        return path

    def save(self, step: int, best: bool) -> str:
        path = self.latest.save(checkpoint_number=step)
        if best:
            self.best.save(checkpoint_number=step)
        return path
