"""The run record: ``RUN/metrics.jsonl``, one JSON object per line, appended by rank 0 as a training run goes. It is
the machine-readable account of what each epoch, evaluation, checkpoint and stop did; the log's epoch line,
TensorBoard's scalars, ``dstrain report`` and the tests all read it rather than log text. A resumed run appends to
the same file, so the record of a run that was stopped and resumed tells the whole story.

Every record has ``event``, ``time`` (Unix seconds), ``step`` (training steps done in all) and ``epoch`` (epochs
done). The events and their other fields (:data:`EVENTS` lists the required ones; optional fields may be absent):

``start``
    ``world_size``, ``hosts`` (each rank's host name, in rank order), ``controller`` (gloo or mpi), ``gpus`` (per
    rank), ``precision``, ``dstrain_version``; a run fine-tuned from another's weights (--load_checkpoint_dir)
    also ``init_from`` (the checkpoint its weights came from, as the log names it).
``resume``
    ``checkpoint`` (what was loaded), ``epoch_step`` (steps already done in the current epoch; 0 at a boundary).
``epoch``
    ``number`` (1-based: the epoch just finished), ``epochs`` (in all), ``loss`` (mean training loss of the epoch's
    steps run in this process; NaN if none), ``steps`` (optimizer steps run in this process), ``micro_batches``
    (batches each rank ran: steps x --accumulation_steps, the last group may be short), ``resumed_at_step`` (the
    epoch step, in micro-batches, this process started at), ``exact`` (False when a resume re-partitioned the epoch
    over another world size),
    ``seconds``, ``utterances_per_s``, ``frames_per_s``, ``padding`` (fraction of padded frames), ``loader_wait_max_s``
    (the slowest rank's wait for data), ``learning_rate``, ``nonfinite_steps`` (skipped in this epoch); with dev
    stores also ``dev_loss``, ``dev_wer``, ``dev_cer``, ``best`` (lowest dev loss so far), ``plateau`` (the learning
    rate was reduced), ``early_stop``; with --metrics_files ``metrics_loss`` (each store's loss, by its URL).
``eval``
    ``split`` (dev, test, or metrics with ``store``: one of --metrics_files), ``loss``, ``wer``, ``cer``, ``samples``,
    ``decoder`` (greedy, or beam for the test set), ``weights`` (which were evaluated: ``ema``, the moving average of
    --ema_decay, or ``raw``; absent in records written before it existed); decoded with a scorer, ``oov_rate`` and
    ``distinct_oov_rate`` (the reference words, running and distinct, outside the scorer's vocabulary).
``checkpoint``
    ``path``, ``best`` (also saved as the best-dev checkpoint), ``reason`` (epoch, periodic, stop, or reset: the
    state an elastic world goes on from), ``epoch_step``.
``nonfinite``
    ``loss``, ``consecutive`` (skipped steps in a row), ``samples`` (rank 0's sample ids of the step),
    ``rank_samples`` (every rank's sample ids of the step, in rank order: every rank skipped it; absent in records
    written before it existed).
``stop``
    ``reason``, ``signal`` (the name of the signal a rank received, or "" when a limit stopped the run),
    ``requested_by`` (the ranks that received one), ``exit_code``, ``checkpoint`` (saved before stopping, or null),
    ``weights_sha256`` (every rank's, in rank order, as in ``final``).
``final``
    ``epochs_done``, ``weights_sha256`` (every rank's, in rank order: identical in a healthy run), ``test`` (loss,
    wer, cer, samples of the test set, or null), ``evaluated`` (the checkpoint --load_evaluate chose for the test set
    and the export, or "final weights"), ``weights`` (ema or raw: which weights of it the test set and the export
    used); with --ema_decay ``ema_weights_sha256`` (every rank's digest of the moving average, in rank order).
``reset``
    (elastic training) the world re-formed: ``world_size``, ``hosts``, ``reason`` (a rank was lost and the state
    rolled back to the last commit, or hosts were added or removed), ``accumulation_steps`` (micro-batches per step
    now). ``step`` and ``epoch`` are where training goes on from.
``samples``
    (--record_samples) the sample ids every rank consumed since the last commit (elastic) or in the epoch, pad repeats
    left out: ``number`` (the epoch they belong to, from 1), ``ids``, ``ranks``; elastic: ``commit`` (the commit that
    kept them, counted from 1; a rank 0 lost before recording a commit's samples is replaced by one that records them
    after the reset). Steps rolled back by an elastic reset are never recorded.

Example::

    from dstrain.record import read_record
    epochs = [r for r in read_record("runs/a/metrics.jsonl") if r["event"] == "epoch"]
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

log = logging.getLogger("dstrain.record")

SCHEMA_VERSION = 1

EVENTS: dict[str, tuple[str, ...]] = {
    "start": ("world_size", "hosts", "controller", "gpus", "precision", "dstrain_version"),
    "resume": ("checkpoint", "epoch_step"),
    "epoch": (
        "number",
        "epochs",
        "loss",
        "steps",
        "micro_batches",
        "resumed_at_step",
        "exact",
        "seconds",
        "utterances_per_s",
        "frames_per_s",
        "padding",
        "loader_wait_max_s",
        "learning_rate",
        "nonfinite_steps",
    ),
    "eval": ("split", "loss", "wer", "cer", "samples", "decoder"),
    "checkpoint": ("path", "best", "reason", "epoch_step"),
    "nonfinite": ("loss", "consecutive", "samples"),
    "stop": ("reason", "signal", "requested_by", "exit_code", "checkpoint", "weights_sha256"),
    "final": ("epochs_done", "weights_sha256", "test"),
    "reset": ("world_size", "hosts", "reason", "accumulation_steps"),
    "samples": ("ids", "ranks"),
}
COMMON = ("event", "time", "step", "epoch")


def _json_safe(value: Any) -> Any:
    """NaN and infinities as JSON can hold them: strings (json's NaN literal is not JSON, and jq rejects it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def check(record: dict) -> None:
    """Raises ValueError when ``record`` lacks a field its event requires (or the event is unknown)."""
    event = record.get("event")
    if event not in EVENTS:
        raise ValueError(f"run record: unknown event {event!r} (known: {', '.join(EVENTS)})")
    missing = [k for k in COMMON + EVENTS[event] if k not in record]
    if missing:
        raise ValueError(f"run record: {event} record lacks {', '.join(missing)}")


class RunRecord:
    """Appends records to ``path``; with ``path`` None (ranks other than 0, runs without a run directory) it only
    builds and returns them."""

    def __init__(self, path: str | None):
        self.path = path

    def write(self, event: str, *, step: int, epoch: int, **fields: Any) -> dict:
        record = {"event": event, "time": round(time.time(), 3), "step": int(step), "epoch": int(epoch), **fields}
        check(record)
        if self.path is not None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            line = (json.dumps(_json_safe(record), ensure_ascii=False) + "\n").encode()
            # One write of one line in append mode. Every append starts on a new line: after a kill or a full disk
            # cut the last one short, the next record must not be joined to it (readers skip the damaged line).
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line
                os.write(fd, line)
            finally:
                os.close(fd)
        return record


def read_record(path: str) -> list[dict]:
    """Every record of ``path``, in order. A damaged line (a write cut short by a kill or a full disk, whatever came
    after it) is skipped with a warning naming its number; a last line without its newline may still be being
    written, and is left out silently."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "event" not in record:
                raise ValueError("not a record")
        except ValueError:
            if i < len(lines) - 1:  # (the last piece has no newline after it: a write in progress or cut short)
                log.warning("%s:%d: a damaged line of the run record, skipped", path, i + 1)
            continue
        out.append(record)
    return out


def events(records: list[dict], event: str) -> list[dict]:
    """The records of one event, in order."""
    return [r for r in records if r.get("event") == event]


def format_epoch(r: dict) -> str:
    """The log's epoch line, from the run record's epoch record."""
    msg = (
        f"epoch {r['number']}/{r['epochs']} train loss {r['loss']:.4f} ({r['steps']} steps, {r['seconds']:.1f} s, "
        f"{r['utterances_per_s']:.1f} utt/s, {r['frames_per_s']:.0f} frames/s, padding {r['padding']:.1%}, "
        f"loader wait max {r['loader_wait_max_s']:.1f} s)"
    )
    if r["resumed_at_step"]:
        msg += f" after resuming at step {r['resumed_at_step']}"
    if "dev_loss" in r:
        msg += f", dev loss {r['dev_loss']:.4f} WER {r['dev_wer']:.3f} CER {r['dev_cer']:.3f}" + (
            " (best)" if r["best"] else ""
        )
    for store, loss in r.get("metrics_loss", {}).items():
        msg += f", {store} loss {loss:.4f}"
    if r.get("plateau"):
        msg += f", learning rate x{r['plateau']} (plateau)"
    if r.get("early_stop"):
        msg += f", early stop: {r['early_stop']}"
    return msg
