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

Evaluate, export and fine-tuning load a run through :meth:`RunDir.read` and :meth:`RunDir.restore_model`, so they
need neither the original flags nor the alphabet file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import tensorflow as tf

import dstrain
from dstrain.alphabet import Alphabet
from dstrain.config import option
from dstrain.features import FeatureConfig
from dstrain.model import DeepSpeech, ModelConfig

CONFIG = "config.json"
LATEST = "train"
BEST = "best_dev"
SUMMARIES = "summaries"
LOG = "train.log"
METRICS = "metrics.jsonl"


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
            raise FileNotFoundError(f"{self.path}: no {CONFIG}; not a dstrain run directory (dstrain train --checkpoint_dir)")
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
        """The run's model with the weights of ``checkpoint`` (default: --load_evaluate's, ``which``), for inference."""
        info = self.read()
        model = DeepSpeech.for_features(info.model, info.features, len(info.alphabet) + 1)
        source = checkpoint or self.best_or_latest(which)
        tf.train.Checkpoint(model=model).restore(source).expect_partial()
        return model, info, source
