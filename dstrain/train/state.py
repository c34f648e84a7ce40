"""The training state: everything a run needs to go on exactly where it was, in one object.

:class:`TrainState` holds the model, the optimizer, the weights' moving average, the counters, the dev history and the
loader's position. It has two halves: :meth:`TrainState.variables` (the tensors: weights, optimizer slots, the
average, the numeric counters) and :meth:`TrainState.state_dict` (plain values: counters, history, position). Both
ways of keeping a state go through them and nothing else:

- a checkpoint (:class:`dstrain.train.checkpoint.Checkpoints`) saves the variables and the state dict (the strings
  in :class:`~dstrain.train.checkpoint.Progress`'s variables), and a restore loads them back with
  :meth:`TrainState.load_state_dict`;
- an elastic commit keeps a :class:`Snapshot` (copies of the variables and the state dict) that a lost peer rolls
  back to, and rank 0's state reaches new workers the same way (variables by broadcast, the dict as an object).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from dstrain.train.checkpoint import Progress
from dstrain.train.ema import WeightAverage
from dstrain.train.schedule import DevHistory


@dataclass
class Snapshot:
    """A copy of a :class:`TrainState` in memory: its variables' values and its state dict."""

    values: list[tf.Tensor]
    state: dict[str, Any]


class TrainState:
    """What training restores to go on exactly: model, optimizer, moving average, counters, dev history and the
    loader's position (``loader`` has ``state_dict``/``load_state_dict`` of its own)."""

    def __init__(self, model: tf.keras.Model, optimizer: Any, ema: WeightAverage | None, loader: Any):
        self.model, self.optimizer, self.ema, self.loader = model, optimizer, ema, loader
        self.progress = Progress.new()
        """The counters, as the variables a checkpoint holds (their values are the state's)."""
        self.history = DevHistory()

    # --- the two halves
    def variables(self) -> list[tf.Variable]:
        """The tensors of the state, in a fixed order: what Horovod broadcasts and an elastic commit copies."""
        averaged = self.ema.variables() if self.ema is not None else []
        return self.model.variables + self.optimizer.variables + averaged + self.progress.numeric()

    def state_dict(self) -> dict[str, Any]:
        """The rest, as plain values (JSON-able)."""
        return {**self._counters(), "history": self.history.to_dict(), "position": self.loader.state_dict()["position"]}

    def _counters(self) -> dict[str, Any]:
        p = self.progress
        return {
            "epoch": int(p.epoch),
            "step": int(p.step),
            "best_dev_loss": float(p.best_dev_loss),
            "nonfinite": int(p.nonfinite),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = self.progress
        p.epoch.assign(state["epoch"])
        p.step.assign(state["step"])
        p.best_dev_loss.assign(state["best_dev_loss"])
        p.nonfinite.assign(state["nonfinite"])
        self.history = DevHistory.from_dict(state["history"])
        self.loader.load_state_dict({"position": state["position"]})

    # --- a checkpoint's view: the state dict's strings in the checkpoint's variables
    def before_save(self) -> dict[str, Any]:
        """Puts the state dict's history and position into the string variables a checkpoint saves; returns it."""
        state = self.state_dict()
        self.progress.position.assign(json.dumps(state["position"]) if state["position"] else "")
        self.progress.history.assign(json.dumps(state["history"]))
        return state

    def after_restore(self) -> None:
        """Takes the state dict back from the variables a checkpoint (or a broadcast of them) has set."""
        strings = self.progress.strings()
        history = json.loads(strings["history"] or "{}")
        position = json.loads(strings["position"]) if strings["position"] else None
        self.load_state_dict({**self._counters(), "history": history, "position": position})

    # --- an elastic commit's view
    def snapshot(self) -> Snapshot:
        return Snapshot([tf.identity(v) for v in self.variables()], self.state_dict())

    def restore(self, snapshot: Snapshot) -> None:
        for v, value in zip(self.variables(), snapshot.values):
            v.assign(value)
        self.load_state_dict(snapshot.state)
