"""Checkpoints: model, optimizer, progress counters, the loader's position and (--ema_decay) the weights' moving
average in one tf.train.Checkpoint, kept in a :class:`RunDir`; what to load before training (resume, fine-tune,
DeepSpeech release) and when to save.

Only rank 0 saves; every rank restores the same state by broadcast. Saving cannot leave a broken latest checkpoint:
TensorFlow writes the files under a temporary name, and the ``checkpoint`` index that names the latest one is
replaced atomically after them, so a kill at any moment leaves the previous checkpoint the latest. Checkpoints are
numbered by a save counter stored with them, so a resumed run never overwrites one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import tensorflow as tf
from tensorflow.python.checkpoint import checkpoint_management

from dstrain.config import option
from dstrain.model import DeepSpeech, ModelConfig
from dstrain.rundir import EMA_MODEL, MODEL, RunDir, RunInfo, evaluation_weights, restore_evaluation_weights
from dstrain.train.ema import WeightAverage

log = logging.getLogger("dstrain.checkpoint")


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints, resume and fine-tuning"""

    checkpoint_dir: str = ""
    """Run directory to resume from and save to (sets --load_checkpoint_dir and --save_checkpoint_dir); empty
    disables checkpoints."""
    load_checkpoint_dir: str = ""
    """Run to start from when --save_checkpoint_dir has no checkpoint yet (fine-tuning), or a DeepSpeech 0.9
    release checkpoint folder."""
    save_checkpoint_dir: str = ""
    """Run directory rank 0 saves checkpoints, config and summaries in."""
    load_train: str = option("auto", choices=("auto", "last", "best", "init"))
    """What to load before training: last, best (lowest dev loss), init (fresh weights), or auto: the save
    directory's last checkpoint (an exact resume), else the load directory's best then last, else init."""
    checkpoint_secs: int = 600
    """Save a checkpoint every this many seconds (mid-epoch too, with the loader position); 0 disables."""
    checkpoint_steps: int = 0
    """Also save every this many training steps; 0 disables."""
    max_to_keep: int = 5
    """Latest checkpoints kept (the best-dev one is kept apart)."""
    drop_source_layers: int = 0
    """When starting from another run: re-initialise this many top layers (1: the output layer, for a new
    alphabet; up to 5)."""
    train_cudnn: bool = False
    """Accepted for DeepSpeech compatibility: Keras picks cuDNN's LSTM on GPUs by itself and checkpoints are portable
    between GPU and CPU, so it is no longer needed."""
    load_cudnn: bool = False
    """Accepted for DeepSpeech compatibility; not needed (see --train_cudnn)."""

    @property
    def load_dir(self) -> str:
        return self.load_checkpoint_dir or self.checkpoint_dir

    @property
    def save_dir(self) -> str:
        return self.save_checkpoint_dir or self.checkpoint_dir

    def __post_init__(self) -> None:
        if self.max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {self.max_to_keep}")
        if not 0 <= self.drop_source_layers <= 5:
            raise ValueError(f"drop_source_layers must be in 0..5, got {self.drop_source_layers}")
        if self.checkpoint_secs < 0 or self.checkpoint_steps < 0:
            raise ValueError("checkpoint_secs and checkpoint_steps must be >= 0")


@dataclass
class Progress:
    """Counters saved with the weights."""

    epoch: tf.Variable
    """Epochs fully done."""
    step: tf.Variable
    """Training steps done in all."""
    best_dev_loss: tf.Variable
    nonfinite: tf.Variable
    """Training steps skipped because a loss or gradient was not finite on some rank."""
    position: tf.Variable
    """The loader's position in the current epoch (JSON of dstrain.loader.sampler.LoaderPosition), "" at an epoch
    boundary."""
    history: tf.Variable
    """Dev losses and plateau state (JSON of dstrain.train.schedule.DevHistory)."""

    @classmethod
    def new(cls) -> "Progress":
        return cls(
            epoch=tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch"),
            step=tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step"),
            best_dev_loss=tf.Variable(float("inf"), dtype=tf.float64, trainable=False, name="best_dev_loss"),
            nonfinite=tf.Variable(0, dtype=tf.int64, trainable=False, name="nonfinite_steps"),
            position=tf.Variable("", dtype=tf.string, trainable=False, name="loader_position"),
            history=tf.Variable("{}", dtype=tf.string, trainable=False, name="dev_history"),
        )

    def numeric(self) -> list[tf.Variable]:
        """What Horovod can broadcast (strings go through broadcast_object)."""
        return [self.epoch, self.step, self.best_dev_loss, self.nonfinite]

    def strings(self) -> dict[str, str]:
        return {"position": self.position.numpy().decode(), "history": self.history.numpy().decode()}

    def set_strings(self, values: dict[str, str]) -> None:
        self.position.assign(values["position"])
        self.history.assign(values["history"])

    def trackables(self) -> dict[str, tf.Variable]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best_dev_loss": self.best_dev_loss,
            "nonfinite_steps": self.nonfinite,
            "loader_position": self.position,
            "dev_history": self.history,
        }


def check_geometry(saved: RunInfo, model: DeepSpeech, n_classes: int, drop_source_layers: int, where: str) -> None:
    """A checkpoint of another shape cannot be loaded: name what differs and how to proceed."""
    mismatches = []
    for name in ("n_hidden", "n_context", "layer_norm"):
        a, b = getattr(saved.model, name), getattr(model.cfg, name)
        if a != b:
            mismatches.append(f"{name} {a} in the checkpoint, --{name} {b} now")
    features = model.front_end.features if model.front_end is not None else None
    for name, flag in (
        ("sample_rate", "audio_sample_rate"),
        ("window_ms", "feature_win_len"),
        ("step_ms", "feature_win_step"),
    ):
        a, b = getattr(saved.features, name), getattr(features, name, None)
        if features is not None and a != b:
            mismatches.append(f"{flag} {a} in the checkpoint, {b} in the training stores")
    if saved.features.n_mfcc != model.n_input:
        mismatches.append(
            f"{saved.features.n_mfcc} MFCC inputs in the checkpoint, {model.n_input} now (feature parameters)"
        )
    saved_classes = len(saved.alphabet) + 1
    if saved_classes != n_classes and drop_source_layers < 1:
        mismatches.append(
            f"{saved_classes - 1} alphabet labels in the checkpoint, {n_classes - 1} now "
            "(use --drop_source_layers 1 to train a new output layer)"
        )
    if mismatches:
        raise ValueError(f"{where}: cannot load a checkpoint of another geometry: " + "; ".join(mismatches))


class Checkpoints:
    """Rank 0's saver. ``latest``: the resume points; ``best``: the lowest dev loss.

    ``on_written(kind, path)``, if given, is called inside each save once a checkpoint's files are written and
    before the index (``checkpoint``) names it: the one moment a kill must not matter (the tests hold saves there).
    """

    def __init__(
        self,
        run: RunDir,
        model: tf.keras.Model,
        optimizer,
        progress: Progress,
        max_to_keep: int = 5,
        on_written: Callable[[str, str], None] | None = None,
        ema: WeightAverage | None = None,
    ):
        self.run = run
        self.parts = {
            MODEL: model,
            "optimizer": optimizer,
            **progress.trackables(),
            **(ema.trackables() if ema else {}),
        }
        self.ckpt = tf.train.Checkpoint(**self.parts)
        self.latest = tf.train.CheckpointManager(self.ckpt, run.latest_dir, max_to_keep=max_to_keep)
        self.best = tf.train.CheckpointManager(self.ckpt, run.best_dir, max_to_keep=1)
        # Numbering goes on after the checkpoints already there (a restore sets it too): a rank that takes over as
        # rank 0 (elastic) must not write over the names an earlier rank 0 saved.
        numbers = [int(p.rsplit("-", 1)[1]) for p in self.latest.checkpoints + self.best.checkpoints]
        if numbers:
            self.ckpt.save_counter.assign(max(numbers))
        self.on_written = on_written
        self.last_save = time.monotonic()

    def restore(self, path: str) -> None:
        """Everything ``path`` holds. A checkpoint saved before --ema_decay was turned on has no average of the
        weights: the rest is restored, and the caller starts the average afresh."""
        if EMA_MODEL not in self.parts or evaluation_weights(path) == "ema":
            self.ckpt.restore(path).assert_existing_objects_matched()
            return
        older = tf.train.Checkpoint(**{k: v for k, v in self.parts.items() if k not in WeightAverage.KEYS})
        older.restore(path).assert_existing_objects_matched()
        self.ckpt.save_counter.assign(older.save_counter)  # numbering goes on after the restored one's

    def _options(self, kind: str) -> tf.train.CheckpointOptions | None:
        if self.on_written is None:
            return None
        # The manager appends its own callback (which writes the index) after the ones it is given.
        return tf.train.CheckpointOptions(experimental_write_callbacks=[lambda path: self.on_written(kind, path)])

    def save(self, best: bool = False) -> str:
        path = self.latest.save(options=self._options("latest"))  # numbered by the saved save counter: never overwrites
        if best:
            self._keep_as_best(path)
        self.last_save = time.monotonic()
        return path

    def _keep_as_best(self, path: str) -> None:
        """best_dev/ gets a copy of the checkpoint just saved, under the same name: the same state, without a second
        serialisation (half the cost of an epoch's saves on small models). As a save: files first, then the index
        (written atomically), then the previous best's files; a kill leaves the old best or the new one."""
        dest = os.path.join(self.run.best_dir, os.path.basename(path))
        tf.io.gfile.makedirs(self.run.best_dir)
        for f in tf.io.gfile.glob(path + ".*"):
            tf.io.gfile.copy(f, dest + f[len(path) :], overwrite=True)
        if self.on_written is not None:
            self.on_written("best", dest)
        previous = self.best.checkpoints
        # What CheckpointManager itself writes the index with (names relative to the folder, written atomically).
        checkpoint_management.update_checkpoint_state_internal(
            self.run.best_dir, dest, all_model_checkpoint_paths=[dest], save_relative_paths=True
        )
        for old in previous:
            if old != dest:
                for f in tf.io.gfile.glob(old + ".*"):
                    tf.io.gfile.remove(f)
        self.best = tf.train.CheckpointManager(self.ckpt, self.run.best_dir, max_to_keep=1)

    def due(self, cfg: CheckpointConfig, step: int) -> bool:
        if cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0:
            return True
        return bool(cfg.checkpoint_secs) and time.monotonic() - self.last_save >= cfg.checkpoint_secs


def is_deepspeech_release(path: str) -> bool:
    """A TF1 DeepSpeech checkpoint (``layer_1/weights`` ...) rather than a dstrain run."""
    if os.path.exists(os.path.join(path, "config.json")):
        return False
    try:
        from dstrain.train.deepspeech_import import resolve_checkpoint

        prefix = resolve_checkpoint(path)
        names = {n for n, _ in tf.train.list_variables(prefix)}
    except (ValueError, tf.errors.NotFoundError, FileNotFoundError, OSError):
        return False
    return "layer_1/weights" in names


def check_release_fine_tuning(cfg: CheckpointConfig, model: ModelConfig) -> None:
    """A DeepSpeech release was trained on raw MFCCs: fine-tuning it with input normalisation on (the default) would
    feed its weights inputs they never saw. Every rank checks (the checkpoint is on shared storage), before any data
    is read, so all stop with the same one-line error."""
    load = cfg.load_dir
    if not load or load == cfg.save_dir or cfg.load_train == "init" or not model.feature_normalization:
        return
    if is_deepspeech_release(load):
        raise ValueError(
            f"--load_checkpoint_dir {load} is a DeepSpeech release checkpoint, trained on raw MFCCs: pass "
            "--nofeature_normalization to fine-tune it (dstrain normalises its inputs by default)"
        )


def check_not_averaged(cfg: CheckpointConfig) -> None:
    """A run directory written by dstrain average holds weights, not a training state: training neither resumes it
    nor saves into it. Every rank checks, before anything is written there (the directory is on shared storage)."""
    save = cfg.save_dir
    if save and RunDir(save).exists() and RunDir(save).read().averaged:
        raise ValueError(
            f"{save} holds averaged weights (dstrain average), not a training state: start a new run from "
            f"them with --load_checkpoint_dir {save} and another --checkpoint_dir"
        )


def load_weights_from(path: str, model: DeepSpeech, n_classes: int, drop_source_layers: int, which: str) -> str:
    """Fine-tuning / transfer learning: the model weights (not the optimizer, not the counters) of another run or
    a DeepSpeech release; ``drop_source_layers`` top layers keep their fresh initialisation. A run's checkpoint gives
    the weights evaluation would use (its moving average when it has one). Returns the source."""
    if is_deepspeech_release(path):
        from dstrain.train.deepspeech_import import load_deepspeech_checkpoint

        for line in load_deepspeech_checkpoint(path, model, drop_source_layers):
            log.info("  %s", line)
        return f"DeepSpeech checkpoint {path}"
    run = RunDir(path)
    saved = run.read()
    check_geometry(saved, model, n_classes, drop_source_layers, path)
    source = (
        (run.best_checkpoint() or run.latest_checkpoint()) if which in ("auto", "best") else run.latest_checkpoint()
    )
    if not source:
        raise FileNotFoundError(f"{path}: no checkpoint to start from")
    keep = [v.numpy() for v in _top_layers(model, drop_source_layers)]
    weights = restore_evaluation_weights(model, source)
    for v, value in zip(_top_layers(model, drop_source_layers), keep):
        v.assign(value)
    return f"{source} (its moving average)" if weights == "ema" else source


def _top_layers(model: DeepSpeech, n: int) -> list[tf.Variable]:
    """Variables of the ``n`` top layers, DeepSpeech's order: output, layer_5, LSTM, layer_3, layer_2."""
    layers = [model.out, model.dense5, model.lstm, model.dense[2], model.dense[1]][:n]
    return [v for layer in layers for v in layer.weights]


def read_json(var: tf.Variable) -> dict:
    text = var.numpy().decode()
    return json.loads(text) if text else {}
