"""Weight averaging: --ema_decay's moving average (its formula, the swap around evaluation, identical on two ranks,
saved and restored on resume, leaving the raw training as it was) and dstrain average (the mean of a run's last or
best-dev checkpoints, and that evaluate, export and fine-tuning take what it writes)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import DATA, assert_says, final_digests, records, synthetic_store, tool

from dstrain.alphabet import Alphabet
from dstrain.average import AverageConfig, average
from dstrain.features import FeatureConfig
from dstrain.model import DeepSpeech, ModelConfig
from dstrain.record import EVENTS, RunRecord
from dstrain.rundir import RunDir
from dstrain.train.checkpoint import Checkpoints, Progress
from dstrain.train.ema import WeightAverage


def tiny_model(n_hidden: int = 8) -> DeepSpeech:
    return DeepSpeech.for_features(ModelConfig(n_hidden=n_hidden), FeatureConfig(), 29)


def test_the_average_follows_its_warmed_up_formula_and_evaluation_swaps_it_in_and_out():
    model = tiny_model()
    ema = WeightAverage(model, 0.2, tiny_model)
    ema.reset()
    want = [w.numpy().astype(np.float64) for w in model.weights]
    skipped = tf.Variable(False)
    update = tf.function(lambda: tf.cond(skipped, tf.no_op, ema.update))  # as inside the training step
    rng = np.random.default_rng(0)
    for n in range(4):
        new = [rng.standard_normal(w.shape).astype(np.float32) for w in model.weights]
        model.set_weights(new)
        update()
        d = min(0.2, (1 + n) / (10 + n))  # 0.1, 0.18, then 0.2: the warm-up, then the decay given
        want = [d * a + (1 - d) * w for a, w in zip(want, new)]
    assert int(ema.updates) == 4
    skipped.assign(True)
    model.set_weights([w * 0 for w in model.get_weights()])
    update()  # a skipped step leaves the average alone
    assert int(ema.updates) == 4
    got = ema.average.get_weights()
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    raw = model.get_weights()
    with ema.swapped_in():
        assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), got))
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), raw))
    with pytest.raises(RuntimeError), ema.swapped_in():
        raise RuntimeError("an evaluation that fails")
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), raw))  # the raw weights are back anyway
    assert all(np.array_equal(a, b) for a, b in zip(ema.average.get_weights(), got))


class FakeRun:
    """A run directory written as training writes one: config.json, checkpoints through Checkpoints (with the
    moving average if ``ema``), and the run record's epoch and checkpoint records. Weights are constants, so
    averages are easy to predict: the raw weights of a checkpoint saved with ``value`` are all ``value``, their
    average's all ``value + 100``."""

    def __init__(self, path, *, ema: bool = False, n_hidden: int = 8, max_to_keep: int = 5):
        self.run = RunDir(str(path))
        cfg = ModelConfig(n_hidden=n_hidden)
        self.run.write_config(
            {"model": cfg.to_dict(), "checkpoint": {"max_to_keep": max_to_keep}},
            FeatureConfig(),
            Alphabet.from_file(str(DATA / "alphabet.txt")),
            1,
        )
        self.model = self.run.new_model()
        optimizer = tf.keras.optimizers.Adam()
        optimizer.build(self.model.trainable_variables)
        self.ema = WeightAverage(self.model, 0.9, self.run.new_model) if ema else None
        self.progress = Progress.new()
        self.ckpt = Checkpoints(self.run, self.model, optimizer, self.progress, max_to_keep, ema=self.ema)
        self.record = RunRecord(self.run.metrics_path)

    def save(self, value: float, dev_loss: float | None = None, reason: str = "epoch", best: bool = False) -> str:
        self.model.set_weights([np.full(w.shape, value, np.float32) for w in self.model.weights])
        if self.ema is not None:
            self.ema.average.set_weights([np.full(w.shape, value + 100, np.float32) for w in self.model.weights])
        step = int(self.progress.step)
        if reason == "epoch":
            self.progress.step.assign_add(1)
            step += 1
            figures = dict.fromkeys(EVENTS["epoch"], 0)
            if dev_loss is not None:
                figures.update(dev_loss=dev_loss, best=best)
            self.record.write("epoch", step=step, epoch=0, **figures)
        path = self.ckpt.save(best=best)
        self.record.write("checkpoint", step=step, epoch=0, path=path, best=best, reason=reason, epoch_step=0)
        return path


def test_a_checkpoint_without_an_average_resumes_with_one(tmp_path):
    """--ema_decay turned on when resuming a run trained without it: the rest of the checkpoint is restored (the
    caller starts the average at the weights), and numbering goes on after it."""
    plain = FakeRun(tmp_path / "run")
    plain.save(1.0)
    path = plain.save(2.0)
    resumed = FakeRun(tmp_path / "run", ema=True)
    resumed.ckpt.restore(path)
    assert int(resumed.progress.step) == 2 and all((w == 2.0).all() for w in resumed.model.get_weights())
    assert os.path.basename(resumed.save(3.0)) == "ckpt-3"


def averaged(tmp_path, run: FakeRun, name: str, **how) -> list[np.ndarray]:
    average(AverageConfig(run_dir=run.run.path, output=str(tmp_path / name), **how))
    model, _, source = RunDir(str(tmp_path / name)).restore_model()
    assert source.endswith(os.path.join("train", "ckpt-1"))
    return model.get_weights()


def test_averages_of_equal_and_of_differing_checkpoints(tmp_path):
    same = FakeRun(tmp_path / "same")
    for _ in range(3):
        same.save(1.2345678)
    for w in averaged(tmp_path, same, "same-avg", last=3):
        assert np.array_equal(w, np.full(w.shape, 1.2345678, np.float32))  # exactly each of them
    two = FakeRun(tmp_path / "two")
    two.save(1.0)
    two.save(2.5)
    for w in averaged(tmp_path, two, "two-avg", last=2):
        np.testing.assert_allclose(w, 1.75, rtol=1e-7)
    for w in averaged(tmp_path, two, "latest", last=1):
        assert np.array_equal(w, np.full(w.shape, 2.5, np.float32))
    info = RunDir(str(tmp_path / "two-avg")).read()
    assert info.averaged["select"] == "last" and [c["weights"] for c in info.averaged["checkpoints"]] == ["raw", "raw"]
    assert info.model == two.run.read().model


def test_best_k_ranks_by_the_run_records_dev_loss_and_averages_the_moving_averages(tmp_path):
    run = FakeRun(tmp_path / "run", ema=True, max_to_keep=4)
    # Epochs with these dev losses (the second is the best), then a stop checkpoint at the last epoch's step. train/
    # keeps 4 checkpoints: epochs 3-5 and the stop; best_dev/ keeps epoch 2's, which train/ has dropped.
    losses = [5.0, 2.0, 4.0, 3.0, 6.0]
    for epoch, loss in enumerate(losses, 1):
        run.save(float(epoch), dev_loss=loss, best=loss == min(losses[:epoch]))
    run.save(5.0, reason="stop")
    assert len(run.run.kept_checkpoints()) == 4
    best = run.run.best_checkpoints(4)
    assert [loss for _, loss in best] == [2.0, 3.0, 4.0, 6.0]
    assert os.path.dirname(best[0][0]) == run.run.best_dir
    for w in averaged(tmp_path, run, "best2", best=2):  # epochs 2 and 4: their moving averages, 102 and 104
        np.testing.assert_allclose(w, 103.0, rtol=1e-7)
    sources = RunDir(str(tmp_path / "best2")).read().averaged["checkpoints"]
    assert [(c["weights"], c["dev_loss"]) for c in sources] == [("ema", 2.0), ("ema", 3.0)]
    for w in averaged(tmp_path, run, "last2", last=2):  # epoch 5 and the stop checkpoint after it
        np.testing.assert_allclose(w, 105.0, rtol=1e-7)
    with pytest.raises(ValueError, match=r"4 checkpoint\(s\) on disk with a dev loss, fewer than --best 5"):
        average(AverageConfig(run_dir=run.run.path, output=str(tmp_path / "best5"), best=5))
    with pytest.raises(
        ValueError, match=r"4 checkpoint\(s\) in train/, fewer than --last 5 \(training keeps --max_to_keep 4"
    ):
        average(AverageConfig(run_dir=run.run.path, output=str(tmp_path / "last5"), last=5))
    with pytest.raises(ValueError, match="already holds a run"):
        average(AverageConfig(run_dir=run.run.path, output=str(tmp_path / "best2"), best=1))


def test_checkpoints_that_cannot_be_averaged_are_named(tmp_path):
    run = FakeRun(tmp_path / "run")
    run.save(1.0)
    # A checkpoint of another geometry slipped into the run's train/ (one index, numbered after the run's).
    other = tiny_model(n_hidden=12)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=other), run.run.latest_dir, max_to_keep=5)
    manager.save(checkpoint_number=99)
    with pytest.raises(
        ValueError, match=r"ckpt-99: .* has shape \[.*12.*\], .* in .*ckpt-1: checkpoints of different geometries"
    ):
        average(AverageConfig(run_dir=run.run.path, output=str(tmp_path / "out"), last=2))
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ValueError, match=r"no dev loss \(trained without --dev_files\)"):
        average(AverageConfig(run_dir=run.run.path, output=str(tmp_path / "out"), best=1))
    for how, message in (
        ({}, "give one of --last K and --best K"),
        ({"last": 1, "best": 1}, "give one of"),
        ({"last": -1}, ">= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            AverageConfig(run_dir="r", output="o", **how)
    with pytest.raises(ValueError, match="not the run itself"):
        AverageConfig(run_dir="r", output="./r", last=1)


# --- through the real entry points


def env(**extra) -> dict:
    return dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL="2", PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", **extra
    )


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        env=env(TF_DETERMINISTIC_OPS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return synthetic_store(
        tmp_path_factory.mktemp("avg") / "s", 41, row_group_rows=4, shard_rows=15, frames=(40, 90), seed=11
    )


# Without dropout and with deterministic ops, a resume continues exactly where the run stopped.
TRAIN = ("--dropout_rate", "0", "--accumulation_steps", "2", "--test_batch_size", "8", "--beam_width", "8")


@pytest.fixture(scope="module")
def ema_run(store, tmp_path_factory):
    """Two ranks, 2 epochs, --ema_decay with accumulated micro-batches, a dev set, test and export at the end."""
    from test_training import horovodrun, train_cmd

    root = tmp_path_factory.mktemp("ema")
    out = run(
        horovodrun()
        + train_cmd(
            store,
            root / "run",
            "--ema_decay",
            "0.9",
            "--dev_files",
            store,
            "--test_files",
            store,
            "--export_dir",
            str(root / "export"),
            *TRAIN,
            epochs=2,
        )
    )
    assert out.returncode == 0, out.stdout[-4000:]
    return root


@pytest.mark.slow
@pytest.mark.timeout(900)  # four 2-rank runs, the module's one included: 342 s on the loaded 2-core machine
def test_moving_average_on_two_ranks_is_identical_resumes_exactly_and_leaves_training_alone(store, ema_run, tmp_path):
    from test_training import horovodrun, train_cmd

    work = ema_run / "run"
    (final,) = records(work, "final")
    raw, ema = final["weights_sha256"], final["ema_weights_sha256"]
    assert len(ema) == 2 and ema[0] == ema[1] and raw[0] == raw[1] and ema[0] != raw[0]
    # Every evaluation saw the average: dev each epoch, then the test set and the export (of the best-dev checkpoint).
    evals = records(work, "eval")
    assert [e["split"] for e in evals] == ["dev"] * 2 + ["test"] and {e["weights"] for e in evals} == {"ema"}
    assert final["weights"] == "ema" and final["evaluated"] == RunDir(str(work)).best_checkpoint()
    meta = json.load(open(ema_run / "export" / "dstrain_export.json"))
    assert meta["weights"] == "ema" and meta["weights_from"] == final["evaluated"]
    # One update per optimizer step: with 2 micro-batches a step, as many updates as steps, half the micro-batches.
    epochs = records(work, "epoch")
    reader = tf.train.load_checkpoint(RunDir(str(work)).latest_checkpoint())
    assert (
        reader.get_tensor("ema_updates/.ATTRIBUTES/VARIABLE_VALUE") == final["step"] == sum(e["steps"] for e in epochs)
    )
    assert sum(e["micro_batches"] for e in epochs) > 1.5 * final["step"]

    # Stopped after an epoch and resumed: the same raw weights and the same average as the run that went through.
    resumed = tmp_path / "resumed"
    for epochs_to_do in (1, 2):
        out = run(
            horovodrun()
            + train_cmd(store, resumed, "--ema_decay", "0.9", "--dev_files", store, *TRAIN, epochs=epochs_to_do)
        )
        assert out.returncode == 0, out.stdout[-4000:]
    assert len(records(resumed, "resume")) == 1
    (last,) = records(resumed, "final")[-1:]
    assert last["weights_sha256"] == raw and last["ema_weights_sha256"] == ema
    assert [e["dev_loss"] for e in records(resumed, "epoch")] == [e["dev_loss"] for e in epochs]

    # Without --ema_decay the raw weights train exactly the same (the swaps around evaluation put them back), and
    # the dev losses, of the raw weights now, differ.
    plain = tmp_path / "plain"
    out = run(horovodrun() + train_cmd(store, plain, "--dev_files", store, *TRAIN, epochs=2))
    assert out.returncode == 0, out.stdout[-4000:]
    assert final_digests(plain) == raw and "ema_weights_sha256" not in records(plain, "final")[0]
    assert {e["weights"] for e in records(plain, "eval")} == {"raw"}
    assert all(a["dev_loss"] != b["dev_loss"] for a, b in zip(records(plain, "epoch"), epochs))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_steps_skipped_by_the_loss_scale_leave_the_average_alone(store, tmp_path):
    from test_training import train_cmd

    # float16's dynamic loss scale starts too high: its first steps overflow and are skipped.
    out = run(train_cmd(store, tmp_path / "w", "--ema_decay", "0.9", "--precision", "fp16", epochs=2, batch=4))
    assert out.returncode == 0, out.stdout[-3000:]
    (final,) = records(tmp_path / "w", "final")
    skipped = sum(e["nonfinite_steps"] for e in records(tmp_path / "w", "epoch"))
    reader = tf.train.load_checkpoint(RunDir(str(tmp_path / "w")).latest_checkpoint())
    assert skipped > 0 and reader.get_tensor("ema_updates/.ATTRIBUTES/VARIABLE_VALUE") == final["step"] - skipped


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_averaged_checkpoint_is_evaluated_exported_and_fine_tuned(store, ema_run, tmp_path):
    from test_training import train_cmd

    work = str(ema_run / "run")
    avg = tmp_path / "avg"
    out = run([tool("dstrain"), "average", work, "--best", "2", "--output", str(avg)])
    assert out.returncode == 0, out.stdout[-3000:]
    sources = RunDir(str(avg)).read().averaged["checkpoints"]
    dev_losses = sorted(e["dev_loss"] for e in records(work, "epoch"))
    assert [c["dev_loss"] for c in sources] == dev_losses[:2] and {c["weights"] for c in sources} == {"ema"}
    # The mean of what evaluation takes from each: their moving averages.
    each = [RunDir(work).restore_model(c["path"])[0].get_weights() for c in sources]
    for got, a, b in zip(RunDir(str(avg)).restore_model()[0].get_weights(), *each):
        np.testing.assert_allclose(got, (a.astype(np.float64) + b) / 2, rtol=1e-6, atol=1e-7)

    test = ["--test_files", store, "--beam_width", "8", "--report_count", "1"]
    out = run(
        [
            tool("dstrain"),
            "evaluate",
            "--checkpoint_dir",
            str(avg),
            *test,
            "--test_output_file",
            str(tmp_path / "a.json"),
        ]
    )
    assert out.returncode == 0, out.stdout[-3000:]
    assert len(json.load(open(tmp_path / "a.json"))) == 41
    out = run([tool("dstrain"), "export", "--checkpoint_dir", str(avg), "--export_dir", str(tmp_path / "export")])
    assert out.returncode == 0, out.stdout[-3000:]
    meta = json.load(open(tmp_path / "export" / "dstrain_export.json"))
    assert (
        meta["weights_from"].endswith(os.path.join("avg", "train", "ckpt-1")) and meta["averaged"]["select"] == "best"
    )
    out = run(
        [
            tool("dstrain"),
            "evaluate",
            "--model",
            str(tmp_path / "export"),
            *test,
            "--test_output_file",
            str(tmp_path / "b.json"),
        ]
    )
    assert out.returncode == 0, out.stdout[-3000:]
    by_checkpoint = {s["wav_filename"]: s["loss"] for s in json.load(open(tmp_path / "a.json"))}
    by_export = {s["wav_filename"]: s["loss"] for s in json.load(open(tmp_path / "b.json"))}
    assert by_checkpoint.keys() == by_export.keys()
    assert all(by_export[k] == pytest.approx(v, rel=1e-4) for k, v in by_checkpoint.items())

    tuned = tmp_path / "tuned"
    out = run(train_cmd(store, tuned, "--load_checkpoint_dir", str(avg), epochs=1))
    assert out.returncode == 0, out.stdout[-3000:]
    assert records(tuned, "epoch") and not records(tuned, "resume")
    out = run(train_cmd(store, avg, epochs=1))  # resuming it as if it were a training state
    assert out.returncode == 2, out.stdout[-2000:]
    assert_says(out.stdout, one_error_line="holds averaged weights (dstrain average)")
    out = run([tool("dstrain"), "average", work, "--last", "9", "--output", str(tmp_path / "nine")])
    assert out.returncode == 2, out.stdout[-2000:]
    assert_says(out.stdout, one_error_line="fewer than --last 9")
