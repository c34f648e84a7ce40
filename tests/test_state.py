"""One training state (dstrain.train.state.TrainState) for both ways of keeping it: a checkpoint restored into a fresh
state, committed as an elastic snapshot, moved on, rolled back to that snapshot and saved again gives the state it
started from, to the bit (weights, optimizer slots, moving average, counters, dev history, loader position)."""

from __future__ import annotations

import copy
import json

import numpy as np
import tensorflow as tf
from conftest import DATA

from dstrain.alphabet import Alphabet
from dstrain.features import FeatureConfig
from dstrain.model import ModelConfig
from dstrain.rundir import RunDir
from dstrain.train.checkpoint import Checkpoints
from dstrain.train.ema import WeightAverage
from dstrain.train.schedule import DevHistory
from dstrain.train.state import TrainState


class Position:
    """The loader's side of the state: what TrainInput.state_dict/load_state_dict carry."""

    def __init__(self) -> None:
        self.position: dict | None = None

    def state_dict(self) -> dict:
        return {"position": copy.deepcopy(self.position)}

    def load_state_dict(self, state: dict) -> None:
        self.position = copy.deepcopy(state["position"])


def new_state(run: RunDir) -> TrainState:
    model = run.new_model()
    optimizer = tf.keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    return TrainState(model, optimizer, WeightAverage(model, 0.9, run.new_model), Position())


def train_a_little(state: TrainState, seed: int) -> None:
    """Optimizer steps with made-up gradients, a moving-average update, counters, history and position moved on."""
    rng = np.random.default_rng(seed)
    variables = state.model.trainable_variables
    for _ in range(2):
        grads = [tf.constant(rng.normal(size=v.shape), v.dtype) for v in variables]
        state.optimizer.apply_gradients(zip(grads, variables))
        state.ema.update()
    p = state.progress
    p.step.assign_add(7)
    p.epoch.assign_add(1)
    p.best_dev_loss.assign(float(rng.uniform(1, 10)))
    p.nonfinite.assign(int(rng.integers(0, 3)))
    history = DevHistory.from_dict(state.history.to_dict())
    history.add(float(rng.uniform(1, 10)))
    state.history = history
    state.loader.position = {"epoch": int(p.epoch), "step": int(rng.integers(1, 50)), "world": 2, "seed": seed}


def values(state: TrainState) -> tuple[list[bytes], str]:
    return [v.numpy().tobytes() for v in state.variables()], json.dumps(state.state_dict(), sort_keys=True)


def checkpoints(state: TrainState, run: RunDir) -> Checkpoints:
    return Checkpoints(run, state.model, state.optimizer, state.progress, ema=state.ema)


def test_a_checkpoint_and_an_elastic_commit_keep_the_same_state_bit_exact(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.write_config(
        {"model": ModelConfig(n_hidden=8).to_dict(), "checkpoint": {"max_to_keep": 5}},
        FeatureConfig(),
        Alphabet.from_file(str(DATA / "alphabet.txt")),
        1,
    )
    original = new_state(run)
    original.ema.reset()
    train_a_little(original, seed=1)
    original.before_save()
    path = checkpoints(original, run).save()
    want = values(original)

    # A checkpoint restored into a fresh state.
    restored = new_state(run)
    saver = checkpoints(restored, run)
    saver.restore(path)
    restored.after_restore()
    assert values(restored) == want

    # An elastic commit of it, then more training, then the rollback a lost peer causes.
    snapshot = restored.snapshot()
    train_a_little(restored, seed=2)
    assert values(restored) != want
    restored.restore(snapshot)
    assert values(restored) == want

    # Saved again from the rolled-back state, restored into another fresh state: still the original.
    restored.before_save()
    again = saver.save()
    third = new_state(run)
    checkpoints(third, run).restore(again)
    third.after_restore()
    assert values(third) == want
    assert third.state_dict()["position"] == original.loader.position
    assert third.history.losses == original.history.losses
