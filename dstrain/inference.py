"""Models loaded for inference, whatever their form: an export folder (its SavedModel), a ``.tflite`` file
(whole-utterance or streaming) or a training run directory (its best-dev, else latest checkpoint).
:func:`load_model` is the one way in for ``dstrain evaluate``, ``dstrain transcribe`` and benchmarks; each form
answers the same calls (log mel in, log-probabilities out, blank last) and gives the same transcript.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from dstrain.alphabet import Alphabet, UTF8Alphabet
from dstrain.export import (
    ALPHABET_NAME,
    META_NAME,
    STREAMING_TFLITE_NAME,
    ExportOptions,
    export_metadata,
    read_export_metadata,
    read_tflite_metadata,
)
from dstrain.features import FeatureConfig
from dstrain.graphs import batch_log_probs, stream_step_fn
from dstrain.model import DeepSpeech
from dstrain.rundir import RunDir, evaluation_weights


class LoadedModel:
    """An acoustic model in any of its forms: log mel ``[T, n_mel]`` in, log-probabilities ``[T, C]`` out."""

    kind = "model"

    def __init__(self, alphabet: Alphabet | UTF8Alphabet, features: FeatureConfig, metadata: dict):
        self.alphabet, self.features, self.metadata = alphabet, features, metadata

    def log_probs(self, log_mels: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One ``[T_i, C]`` array per utterance."""
        raise NotImplementedError

    def batch_log_probs(self, log_mel: tf.Tensor | np.ndarray, lengths: tf.Tensor | np.ndarray) -> tf.Tensor:
        """``[B,T,n_mel]`` + lengths -> ``[B,T,C]`` (evaluation's padded batches); frames past a length are zero."""
        x, n = np.asarray(log_mel, np.float32), np.asarray(lengths, np.int64)
        per = self.log_probs([x[i, : n[i]] for i in range(len(n))])
        out = np.zeros((len(n), x.shape[1], int(self.metadata["n_classes"])), np.float32)
        for i, p in enumerate(per):
            out[i, : len(p)] = p
        return tf.constant(out)


class _BatchedModel(LoadedModel):
    batch_size = 16

    def _batch(self, log_mel: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def batch_log_probs(self, log_mel: tf.Tensor | np.ndarray, lengths: tf.Tensor | np.ndarray) -> tf.Tensor:
        """``[B,T,n_mel]`` + lengths -> ``[B,T,C]`` (for evaluation over padded batches)."""
        return self._batch(tf.convert_to_tensor(log_mel, tf.float32), tf.convert_to_tensor(lengths, tf.int32))

    def log_probs(self, log_mels: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.empty(0)] * len(log_mels)
        order = sorted(range(len(log_mels)), key=lambda i: len(log_mels[i]))  # similar lengths batch together
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            lengths = np.array([len(log_mels[i]) for i in idx], np.int32)
            x = np.zeros((len(idx), max(lengths.max(), 1), self.features.n_mel), np.float32)
            for row, i in enumerate(idx):
                x[row, : lengths[row]] = log_mels[i]
            result = self.batch_log_probs(x, lengths).numpy()
            for row, i in enumerate(idx):
                out[i] = result[row, : lengths[row]]
        return out


class SavedModelExport(_BatchedModel):
    kind = "saved_model"

    def __init__(self, export_dir: str, alphabet, features: FeatureConfig, metadata: dict):
        super().__init__(alphabet, features, metadata)
        self.module = tf.saved_model.load(export_dir)

    def _batch(self, log_mel, lengths):
        return self.module.log_probs(log_mel, lengths)["log_probs"]

    def streamer(self) -> "Streamer":
        fn = self.module.stream_step
        return Streamer(lambda **kw: {k: v.numpy() for k, v in fn(**kw).items()}, self.metadata)


class CheckpointModel(_BatchedModel):
    kind = "checkpoint"

    def __init__(self, model: DeepSpeech, alphabet, features: FeatureConfig, metadata: dict):
        super().__init__(alphabet, features, metadata)
        self.model = model
        width = model.input_width
        self._fn = tf.function(
            lambda x, n: batch_log_probs(model, x, n),
            input_signature=[tf.TensorSpec([None, None, width], tf.float32), tf.TensorSpec([None], tf.int32)],
        )

    def _batch(self, log_mel, lengths):
        return self._fn(log_mel, lengths)

    def streamer(self, n_steps: int | None = None) -> "Streamer":
        fn = stream_step_fn(self.model, n_steps or self.metadata["n_steps"])
        meta = dict(self.metadata, n_steps=n_steps or self.metadata["n_steps"])
        return Streamer(lambda **kw: {k: v.numpy() for k, v in fn(**kw).items()}, meta)


class TFLiteModel(LoadedModel):
    kind = "tflite"

    def __init__(self, path: str, alphabet, features: FeatureConfig, metadata: dict, num_threads: int | None = None):
        super().__init__(alphabet, features, metadata)
        self.interpreter = tf.lite.Interpreter(model_path=path, num_threads=num_threads or os.cpu_count())
        self.runner = self.interpreter.get_signature_runner()
        self.streaming = bool(metadata.get("tflite", {}).get("streaming"))

    def streamer(self) -> "Streamer":
        if not self.streaming:
            raise ValueError(f"{self.kind}: a whole-utterance TFLite model; stream with {STREAMING_TFLITE_NAME}")
        return Streamer(self.runner, self.metadata)

    def log_probs(self, log_mels: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.streaming:
            return [self.streamer().run(x) for x in log_mels]
        batch = int(self.metadata.get("tflite", {}).get("batch_size", 1))
        if batch != 1:
            return self._batched(log_mels, batch)
        out = []
        for x in log_mels:
            if len(x) == 0:
                out.append(np.zeros((0, self.metadata["n_classes"]), np.float32))
                continue
            out.append(self.runner(log_mel=np.asarray(x, np.float32)[None])["log_probs"][0])
        return out

    def _batched(self, log_mels: Sequence[np.ndarray], batch: int) -> list[np.ndarray]:
        """A model exported with --export_batch_size N: N utterances per call, a short last batch padded with
        one-frame rows whose outputs are dropped."""
        out = []
        for start in range(0, len(log_mels), batch):
            group = [np.asarray(x, np.float32) for x in log_mels[start : start + batch]]
            lengths = np.ones(batch, np.int32)
            lengths[: len(group)] = [len(x) for x in group]
            x = np.zeros((batch, max(int(lengths.max()), 1), self.features.n_mel), np.float32)
            for i, g in enumerate(group):
                x[i, : len(g)] = g
            result = self.runner(log_mel=x, lengths=lengths)["log_probs"]
            out += [result[i, : len(g)] for i, g in enumerate(group)]
        return out


class Streamer:
    """Drives a stream_step graph (SavedModel signature, TFLite signature runner or traced function) over log mel
    frames pushed in pieces of any size; it holds at most ``n_steps`` pending frames and the graph's state."""

    def __init__(self, step, metadata: dict):
        self.step = step
        self.n_steps, self.n_context = int(metadata["n_steps"]), int(metadata["model"]["n_context"])
        self.n_classes = int(metadata["n_classes"])
        features, n_hidden = metadata["features"], metadata["model"]["n_hidden"]
        self.state = {
            "context": np.zeros((1, max(2 * self.n_context, 1), features["n_mfcc"]), np.float32),
            "lstm_h": np.zeros((1, n_hidden), np.float32),
            "lstm_c": np.zeros((1, n_hidden), np.float32),
            "frames_seen": np.zeros((1,), np.int32),
        }
        self.pending = np.zeros((0, features["n_mel"]), np.float32)
        self.lead_in = self.n_context  # outputs still to discard
        self.frames_in = self.frames_out = 0

    def _call(self, n_frames: int) -> np.ndarray:
        chunk = np.zeros((1, self.n_steps, self.pending.shape[1]), np.float32)
        chunk[0, :n_frames] = self.pending[:n_frames]
        self.pending = self.pending[n_frames:]
        out = self.step(log_mel=chunk, n_frames=np.array(n_frames, np.int32), **self.state)
        self.state = {k: np.asarray(out[k]) for k in self.state}
        probs = np.asarray(out["log_probs"])[0]
        skip = min(self.lead_in, len(probs))
        self.lead_in -= skip
        probs = probs[skip:][: self.frames_in - self.frames_out]  # nothing past the last real frame
        self.frames_out += len(probs)
        return probs

    def _join(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros((0, self.n_classes), np.float32)

    def push(self, log_mel: np.ndarray) -> np.ndarray:
        """Frames ``[t, n_mel]`` in; out, the log-probabilities of the frames that have their look-ahead."""
        self.pending = np.concatenate([self.pending, np.asarray(log_mel, np.float32)])
        self.frames_in += len(log_mel)
        parts = []
        while len(self.pending) >= self.n_steps:
            parts.append(self._call(self.n_steps))
        return self._join(parts)

    def finish(self) -> np.ndarray:
        """The remaining frames' log-probabilities (the last ``n_context`` with the zero look-ahead of the edge)."""
        parts = []
        while self.frames_out < self.frames_in:
            parts.append(self._call(len(self.pending)))
        return self._join(parts)

    def run(self, log_mel: np.ndarray, chunk_frames: int = 0) -> np.ndarray:
        """A whole utterance ``[T, n_mel]`` through the stream, pushed ``chunk_frames`` at a time (0: at once)."""
        step = chunk_frames or max(len(log_mel), 1)
        return self._join([self.push(log_mel[i : i + step]) for i in range(0, len(log_mel), step)] + [self.finish()])


def iter_chunks(samples: np.ndarray, features: FeatureConfig, frames: int) -> Iterator[np.ndarray]:
    """Log mel of ``samples`` computed ``frames`` frames at a time (equal to the whole-signal features)."""
    from dstrain.features import log_mel, power_spectrogram

    step, window = features.step_samples, features.window_samples
    total = features.n_frames(len(samples))
    for first in range(0, total, frames):
        count = min(frames, total - first)
        piece = samples[first * step : first * step + (count - 1) * step + window]
        yield log_mel(power_spectrogram(piece, features), features)


def _metadata_alphabet(meta: dict, fallback_dir: str | None = None) -> Alphabet | UTF8Alphabet:
    if meta.get("bytes_output_mode"):
        return UTF8Alphabet()
    if meta.get("alphabet"):
        return Alphabet(tuple(meta["alphabet"]))
    return Alphabet.from_file(os.path.join(fallback_dir or ".", ALPHABET_NAME))


def load_model(path: str, num_threads: int | None = None, which: str = "auto") -> LoadedModel:
    """An export folder (its SavedModel), a ``.tflite`` file (whole-utterance or streaming) or a run directory (the
    checkpoint ``which`` names, as --load_evaluate: auto is its best-dev, else latest)."""
    if os.path.isfile(path) and path.endswith(".tflite"):
        meta = read_tflite_metadata(path)
        return TFLiteModel(path, _metadata_alphabet(meta), FeatureConfig(**meta["features"]), meta, num_threads)
    if os.path.exists(os.path.join(path, META_NAME)):
        meta = read_export_metadata(path)
        return SavedModelExport(path, _metadata_alphabet(meta, path), FeatureConfig(**meta["features"]), meta)
    run = RunDir(path)
    if not run.exists():
        raise FileNotFoundError(
            f"{path}: neither an export folder ({META_NAME}), a .tflite file nor a run directory (config.json)"
        )
    model, info, source = run.restore_model(which=which)
    meta = export_metadata(
        model,
        info.alphabet,
        info.features,
        {"weights_from": source, "weights": evaluation_weights(source)},
        ExportOptions(),
    )
    return CheckpointModel(model, info.alphabet, info.features, meta)
