"""The run directory: the one object that knows where a training run keeps what.

Layout::

    RUN/                         --checkpoint_dir
      config.json                resolved configuration: train flags, feature parameters, the alphabet's labels,
                                 world size, dstrain version (DeepSpeech's flags.txt; written atomically)
      train/ckpt-N.*             latest checkpoints (resume point), --max_to_keep of them
      best_dev/ckpt-N.*          the checkpoint with the lowest dev loss (what export and evaluate prefer)
      summaries/                 TensorBoard event files (rank 0)
      train.log                  rank 0's log
      metrics.jsonl              the run record: one JSON object per epoch, evaluation, checkpoint, stop...
                                 (dstrain.record), appended by rank 0 across resumes

A checkpoint holds the model's weights under ``model`` and, with --ema_decay, their moving average under
``ema_model`` (the same structure). The weights evaluation uses (:func:`evaluation_weights`) are the average when a
checkpoint has one, else the model's: dev evaluation during training, test, export, ``dstrain evaluate``, fine-tuning
from another run and ``dstrain average`` all take those.

``dstrain average`` writes a run directory of its own: RUN's ``config.json`` with an ``averaged`` entry (where the
weights came from) and one checkpoint, ``train/ckpt-1``, holding only ``model``. It is an inference and fine-tuning
source, not a training state: training refuses to resume it.

Evaluate, export and fine-tuning load a run through :meth:`RunDir.read` and :meth:`RunDir.restore_model`, so they
need neither the original flags nor the alphabet file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import tensorflow as tf

import dstrain
from dstrain.alphabet import Alphabet
from dstrain.config import option
from dstrain.features import FeatureConfig
from dstrain.model import DeepSpeech, ModelConfig
from dstrain.record import read_record

CONFIG = "config.json"
LATEST = "train"
BEST = "best_dev"
SUMMARIES = "summaries"
LOG = "train.log"
METRICS = "metrics.jsonl"
MODEL = "model"
"""Checkpoint key of the trained weights."""
EMA_MODEL = "ema_model"
"""Checkpoint key of their exponential moving average (--ema_decay)."""
WEIGHTS = "/.ATTRIBUTES/VARIABLE_VALUE"


@dataclass(frozen=True)
class LoadEvaluateConfig:
    """Which checkpoint evaluation loads"""

    load_evaluate: str = option("auto", choices=("auto", "best", "last"))
    """Checkpoint of a run that testing, exporting and evaluation load (DeepSpeech's): best (lowest dev loss), last
    (the latest; after training, the final weights), or auto: best, else last."""


@dataclass
class RunInfo:
    """What ``config.json`` records."""

    train: dict
    features: FeatureConfig
    alphabet: Alphabet
    world_size: int
    model: ModelConfig
    averaged: dict | None = None
    """Set in a run directory written by ``dstrain average``: the run and checkpoints its weights are the mean of."""


class RunDir:
    def __init__(self, path: str):
        if not path:
            raise ValueError("a run directory needs a path (--checkpoint_dir)")
        self.path = path

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, CONFIG)

    @property
    def latest_dir(self) -> str:
        return os.path.join(self.path, LATEST)

    @property
    def best_dir(self) -> str:
        return os.path.join(self.path, BEST)

    @property
    def summaries_dir(self) -> str:
        return os.path.join(self.path, SUMMARIES)

    @property
    def log_path(self) -> str:
        return os.path.join(self.path, LOG)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.path, METRICS)

    def exists(self) -> bool:
        return os.path.exists(self.config_path)

    def write_config(self, train: dict, features: FeatureConfig, alphabet: Alphabet, world_size: int) -> None:
        """Rank 0. Written to a temporary name and renamed, so a kill never leaves half a file."""
        os.makedirs(self.path, exist_ok=True)
        record = {
            "dstrain_version": dstrain.__version__,
            "train": train,
            "features": features.to_dict(),
            "alphabet": list(alphabet.labels),
            "world_size": world_size,
        }
        tmp = self.config_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, self.config_path)

    def read(self) -> RunInfo:
        if not self.exists():
            raise FileNotFoundError(
                f"{self.path}: no {CONFIG}; not a dstrain run directory (dstrain train --checkpoint_dir)"
            )
        with open(self.config_path, encoding="utf-8") as f:
            saved = json.load(f)
        if "alphabet" in saved:
            alphabet = Alphabet(tuple(saved["alphabet"]))
        else:  # runs written before the labels were recorded kept only the file's path
            alphabet = Alphabet.from_file(saved["train"]["alphabet_config_path"])
        return RunInfo(
            train=saved["train"],
            features=FeatureConfig(**saved["features"]),
            alphabet=alphabet,
            world_size=int(saved.get("world_size", 1)),
            model=ModelConfig(**saved["train"]["model"]),
            averaged=saved.get("averaged"),
        )

    def latest_checkpoint(self) -> str | None:
        return tf.train.latest_checkpoint(self.latest_dir)

    def best_checkpoint(self) -> str | None:
        return tf.train.latest_checkpoint(self.best_dir)

    def best_or_latest(self, which: str = "auto") -> str:
        """The checkpoint ``--load_evaluate`` names: best (lowest dev loss), last, or auto: best, else last."""
        if which == "best":
            source, where = self.best_checkpoint(), f"{BEST}/"
        elif which == "last":
            source, where = self.latest_checkpoint(), f"{LATEST}/"
        else:
            source, where = self.best_checkpoint() or self.latest_checkpoint(), f"{BEST}/ or {LATEST}/"
        if not source:
            raise FileNotFoundError(f"{self.path}: no checkpoint in {where} (--load_evaluate {which})")
        return source

    def restore_model(self, checkpoint: str | None = None, which: str = "auto") -> tuple[DeepSpeech, RunInfo, str]:
        """The run's model with the evaluation weights (:func:`evaluation_weights`) of ``checkpoint`` (default:
        --load_evaluate's, ``which``), for inference."""
        info = self.read()
        model = self.new_model(info)
        source = checkpoint or self.best_or_latest(which)
        restore_evaluation_weights(model, source)
        return model, info, source

    def new_model(self, info: RunInfo | None = None) -> DeepSpeech:
        """A model of the run's geometry with fresh weights."""
        info = info or self.read()
        return DeepSpeech.for_features(info.model, info.features, len(info.alphabet) + 1)

    # --- choosing checkpoints (dstrain average)
    def kept_checkpoints(self) -> list[str]:
        """The latest checkpoints still on disk, oldest first (train/'s index lists the --max_to_keep it keeps)."""
        state = tf.train.get_checkpoint_state(self.latest_dir)
        paths = list(state.all_model_checkpoint_paths) if state else []
        return [p for p in paths if tf.io.gfile.exists(p + ".index")]

    def last_checkpoints(self, k: int) -> list[str]:
        """The ``k`` latest checkpoints, oldest first."""
        kept = self.kept_checkpoints()
        if len(kept) < k:
            raise ValueError(
                f"{self.path}: {len(kept)} checkpoint(s) in {LATEST}/, fewer than --last {k} "
                f"(training keeps --max_to_keep {self._max_to_keep()} of them)"
            )
        return kept[len(kept) - k :]

    def best_checkpoints(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` checkpoints on disk with the lowest dev loss, lowest first, with their loss.

        The run record pairs each epoch's checkpoint (a ``checkpoint`` record, reason epoch) with the ``epoch`` record
        written just before it, which holds the dev loss. Candidates are train/'s kept checkpoints that have one, and
        best_dev/'s checkpoint (the latest ``best`` one), which train/ may have dropped already. Checkpoints are named
        by a save counter that resumes never reset, so a name identifies one checkpoint across a resumed run."""
        if not os.path.exists(self.metrics_path):
            raise FileNotFoundError(
                f"{self.path}: no run record ({METRICS}) to rank checkpoints by dev loss; use --last"
            )
        losses: dict[str, float] = {}
        best: tuple[str, float] | None = None
        previous: dict = {}
        for r in read_record(self.metrics_path):
            if r["event"] == "checkpoint" and r.get("reason") == "epoch" and previous.get("event") == "epoch":
                loss = previous.get("dev_loss")
                if isinstance(loss, (int, float)) and math.isfinite(loss) and previous.get("step") == r["step"]:
                    name = os.path.basename(r["path"])
                    losses[name] = float(loss)
                    if r.get("best"):
                        best = (name, float(loss))
            previous = r
        if not losses:
            raise ValueError(
                f"{self.path}: its run record has no dev loss (trained without --dev_files): "
                "--best needs one; use --last"
            )
        kept = {os.path.basename(p): p for p in self.kept_checkpoints()}
        ranked = [(kept[name], loss) for name, loss in losses.items() if name in kept]
        if best is not None and best[0] not in kept and self.best_checkpoint():
            ranked.append((self.best_checkpoint(), best[1]))
        if len(ranked) < k:
            raise ValueError(
                f"{self.path}: {len(ranked)} checkpoint(s) on disk with a dev loss, fewer than --best {k} "
                f"({LATEST}/ keeps --max_to_keep {self._max_to_keep()}, {BEST}/ one)"
            )
        return sorted(ranked, key=lambda c: c[1])[:k]

    def _max_to_keep(self) -> int | str:
        try:
            return self.read().train["checkpoint"]["max_to_keep"]
        except (FileNotFoundError, KeyError, TypeError):
            return "?"

    # --- dstrain average's output
    def check_new(self) -> None:
        """Refuses a directory that already holds a run or checkpoints (written output must not mix with them)."""
        if self.exists() or self.latest_checkpoint() or self.best_checkpoint():
            raise ValueError(f"{self.path} already holds a run or checkpoints: give a new directory as --output")

    def write_averaged(self, source: "RunDir", model: DeepSpeech, averaged: dict) -> str:
        """Writes ``source``'s configuration with ``averaged`` added, then ``model``'s weights as the one checkpoint
        (config first: a directory without it is not a run, so a kill in between leaves nothing that loads).
        Returns the checkpoint's path."""
        self.check_new()
        with open(source.config_path, encoding="utf-8") as f:
            record = json.load(f)
        record["averaged"] = averaged
        os.makedirs(self.path, exist_ok=True)
        tmp = self.config_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, self.config_path)
        return tf.train.CheckpointManager(tf.train.Checkpoint(**{MODEL: model}), self.latest_dir, max_to_keep=1).save()


def evaluation_weights(checkpoint: str) -> str:
    """Which weights of ``checkpoint`` evaluation uses: "ema" (the moving average, when it holds one) or "raw"."""
    prefix = EMA_MODEL + "/"
    return "ema" if any(name.startswith(prefix) for name, _ in tf.train.list_variables(checkpoint)) else "raw"


def weight_shapes(checkpoint: str, which: str) -> dict[str, list[int]]:
    """The model variables (names relative to the model) of ``checkpoint``'s "ema" or "raw" weights and their shapes;
    optimizer slots left out."""
    prefix = (EMA_MODEL if which == "ema" else MODEL) + "/"
    return {
        name[len(prefix) : -len(WEIGHTS)]: shape
        for name, shape in tf.train.list_variables(checkpoint)
        if name.startswith(prefix) and name.endswith(WEIGHTS) and "/.OPTIMIZER_SLOT/" not in name
    }


def restore_evaluation_weights(model: DeepSpeech, checkpoint: str) -> str:
    """Loads ``checkpoint``'s evaluation weights into ``model`` (and only those: no optimizer, no counters);
    returns which ("ema" or "raw")."""
    which = evaluation_weights(checkpoint)
    status = tf.train.Checkpoint(**{EMA_MODEL if which == "ema" else MODEL: model}).restore(checkpoint)
    status.expect_partial()
    return which
