"""The run record's schema: what each event must carry, how it survives a kill mid-write, and that the trainer's
epoch line is made from it."""

import json
import math

import pytest

from dstrain.record import EVENTS, RunRecord, check, events, format_epoch, read_record
from dstrain.train.trainer import EPOCH_SCALARS

EPOCH = {
    "number": 2,
    "epochs": 3,
    "loss": 1.5,
    "steps": 10,
    "micro_batches": 10,
    "resumed_at_step": 4,
    "exact": True,
    "seconds": 2.0,
    "utterances_per_s": 20.0,
    "frames_per_s": 2000.0,
    "padding": 0.125,
    "loader_wait_max_s": 0.25,
    "learning_rate": 0.001,
    "nonfinite_steps": 0,
}


def test_every_event_names_its_fields_and_a_missing_one_is_refused(tmp_path):
    record = RunRecord(str(tmp_path / "run" / "metrics.jsonl"))
    written = record.write("epoch", step=10, epoch=2, **EPOCH)
    assert set(EVENTS) == {
        "start",
        "resume",
        "epoch",
        "eval",
        "checkpoint",
        "nonfinite",
        "stop",
        "final",
        "reset",
        "samples",
    }
    (back,) = read_record(record.path)
    assert back == written and back["event"] == "epoch" and back["step"] == 10
    with pytest.raises(ValueError, match="epoch record lacks padding"):
        record.write("epoch", step=1, epoch=1, **{k: v for k, v in EPOCH.items() if k != "padding"})
    with pytest.raises(ValueError, match="unknown event 'epochs'"):
        check({"event": "epochs"})
    assert len(read_record(record.path)) == 1  # refused records are not written


def test_non_finite_figures_stay_valid_json_and_a_cut_last_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    record = RunRecord(str(path))
    record.write("epoch", step=1, epoch=1, **dict(EPOCH, loss=math.nan))
    record.write("nonfinite", step=2, epoch=1, loss=math.inf, consecutive=1, samples=[3, 4])
    text = path.read_text()
    assert all(json.loads(line) for line in text.splitlines())  # strict JSON: no NaN literal
    path.write_text(text + '{"event": "epoch", "ti')  # a kill in the middle of a write
    got = read_record(str(path))
    assert [r["event"] for r in got] == ["epoch", "nonfinite"] and got[0]["loss"] == "nan"
    assert events(got, "nonfinite")[0]["samples"] == [3, 4]


def test_a_torn_line_is_skipped_with_its_number_and_the_next_append_starts_a_new_line(tmp_path, caplog):
    """A kill or a full disk cut a write short; the run goes on appending: nothing after the damage is lost."""
    path = tmp_path / "metrics.jsonl"
    record = RunRecord(str(path))
    record.write("epoch", step=1, epoch=1, **EPOCH)
    with open(path, "a") as f:
        f.write('{"event": "epoch", "ti')  # cut short, no newline
    record.write("nonfinite", step=2, epoch=1, loss=1.0, consecutive=1, samples=[3])
    with open(path, "a") as f:
        f.write("\x00\x00garbage\n[1, 2]\n")  # a full disk's zeros, a line that is JSON but no record
    record.write("nonfinite", step=3, epoch=1, loss=2.0, consecutive=2, samples=[4])
    lines = path.read_text().split("\n")
    assert lines[1] == '{"event": "epoch", "ti' and json.loads(lines[2])["step"] == 2  # a new line, not joined
    with caplog.at_level("WARNING", logger="dstrain.record"):
        got = read_record(str(path))
    assert [r["step"] for r in got] == [1, 2, 3]
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"{path}:{n}: a damaged line of the run record, skipped" for n in (2, 4, 5)], warned


def test_without_a_path_records_are_only_built():
    assert (
        RunRecord(None).write(
            "eval", step=3, epoch=1, split="dev", loss=1.0, wer=0.5, cer=0.25, samples=4, decoder="greedy"
        )["wer"]
        == 0.5
    )


def test_the_epoch_line_and_tensorboard_come_from_the_record():
    line = format_epoch(dict(EPOCH, dev_loss=1.25, dev_wer=0.5, dev_cer=0.25, best=True))
    assert line.startswith("epoch 2/3 train loss 1.5000 (10 steps, 2.0 s, 20.0 utt/s, 2000 frames/s, padding 12.5%")
    assert "after resuming at step 4" in line and line.endswith("dev loss 1.2500 WER 0.500 CER 0.250 (best)")
    assert set(EPOCH_SCALARS) <= set(EPOCH) | {"dev_loss", "dev_wer", "dev_cer"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_torn_line_between_epochs_leaves_the_run_report_and_average_going(tmp_path, caplog):
    """A kill (or a full disk) cut an append short between two epochs: the resumed run appends on a new line, and
    everything that reads the record (the run's own resume, ``dstrain report``, ``dstrain average --best``) goes on,
    the damaged line skipped with a warning naming it."""
    import subprocess
    import sys

    from cluster import rank_env, train_argv
    from conftest import synthetic_store

    store = synthetic_store(tmp_path / "s", 12, frames=(40, 80), seed=3)
    run_dir = tmp_path / "run"

    def dstrain(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dstrain.cli", *argv],
            env=rank_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=240,
        )

    def train(epochs: int) -> None:
        proc = dstrain(*train_argv(store, run_dir, "--dev_files", store, epochs=epochs)[1:])
        assert proc.returncode == 0, proc.stdout[-3000:]

    train(2)
    metrics = run_dir / "metrics.jsonl"
    torn_at = len(metrics.read_text().splitlines()) + 1
    with open(metrics, "a") as f:
        f.write('{"event": "epoch", "time": 1.0, "step": 12, "epo')  # cut short: no end, no newline
    train(3)
    with caplog.at_level("WARNING", logger="dstrain.record"):
        record = read_record(str(metrics))
    assert [r["number"] for r in events(record, "epoch")] == [1, 2, 3]
    assert len(events(record, "resume")) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"{metrics}:{torn_at}: a damaged line of the run record, skipped"
    ]
    report = dstrain("report", str(run_dir), "--output", str(tmp_path / "report"))
    assert report.returncode == 0, report.stdout[-3000:]
    average = dstrain("average", str(run_dir), "--best", "2", "--output", str(tmp_path / "best2"))
    assert average.returncode == 0, average.stdout[-3000:]
    from dstrain.rundir import RunDir

    with open(RunDir(str(tmp_path / "best2")).config_path, encoding="utf-8") as f:
        assert json.load(f)["averaged"]["select"] == "best"
