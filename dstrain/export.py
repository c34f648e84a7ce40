"""Exported models: what inference needs from a training run, in the forms it is loaded in.

Layout::

    EXPORT_DIR/
      saved_model.pb, variables/   TensorFlow SavedModel; signatures (``[T]`` = frames at 20 ms):
                                     serving_default  samples [N] (16 kHz mono, float in [-1, 1]) -> log_probs [T, C]
                                     log_probs        log_mel [B,T,n_mel], lengths [B] -> log_probs [B,T,C]
                                     log_mel          samples [N] -> log_mel [T, n_mel] (what preprocessing stores)
                                     stream_step      one chunk of --n_steps frames with its state (see below)
                                     metadata         -> json (the same record as dstrain_export.json)
      alphabet.txt                 the training alphabet, DeepSpeech format
      dstrain_export.json          metadata: sample rate, feature and model parameters, alphabet, author, licence...
      flags.json                   the resolved configuration of the export (or of the training run that exported)
      model.tflite                 --export_tflite: batch 1, any number of frames, log mel in, log_probs out
      model_streaming.tflite       --export_tflite: the stream_step signature with a fixed --n_steps
      SCORER.scorer                --export_zip: the --scorer_path package, copied in
    EXPORT_DIR.zip                 --export_zip: all of the above (DeepSpeech's package_zip)

Log-probabilities have the CTC blank last. Both TFLite files embed the metadata record (flatbuffer metadata
``dstrain``), so a ``.tflite`` file copied alone still transcribes. ``--export_quantize`` applies dynamic-range
quantisation (int8 weights, float activations) to both.

Streaming (DeepSpeech's ``--n_steps`` graph): ``stream_step(log_mel [1,n_steps,n_mel], n_frames [], context
[1,2*n_context,n_mfcc], lstm_h [1,n_hidden], lstm_c [1,n_hidden], frames_seen [1])`` returns ``log_probs
[1,n_steps,C]`` and the four states. Start a stream with zero states; ``n_frames`` (< n_steps only in the last chunks)
counts the real frames of the chunk, the rest being end padding. The context window needs ``n_context`` frames of
look-ahead, so outputs lag inputs by ``n_context`` frames: over a stream, output ``j`` is frame ``j - n_context`` (the
first ``n_context`` outputs are lead-in, discard them), and the last ``n_context`` frames come out of a final chunk
with ``n_frames = 0``. :class:`Streamer` does this bookkeeping; the result equals the whole-utterance model's.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

import dstrain
from dstrain.alphabet import Alphabet, UTF8Alphabet
from dstrain.config import option, to_dict
from dstrain.features import FeatureConfig, mel_matrix
from dstrain.model import DeepSpeech

log = logging.getLogger("dstrain")

META_NAME = "dstrain_export.json"
FLAGS_NAME = "flags.json"
ALPHABET_NAME = "alphabet.txt"
TFLITE_NAME = "model.tflite"
STREAMING_TFLITE_NAME = "model_streaming.tflite"
TFLITE_METADATA_KEY = "dstrain"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExportOptions:
    """Export (TFLite, streaming, packaging, model metadata)"""

    export_tflite: bool = False
    """Also write model.tflite (whole utterance) and model_streaming.tflite (--n_steps frames per call)."""
    export_quantize: bool = False
    """Dynamic-range quantisation of the TFLite models (int8 weights, ~4x smaller)."""
    n_steps: int = 16
    """Frames per call of the streaming graph (20 ms each); higher means more latency, fewer calls."""
    export_zip: bool = False
    """Copy --scorer_path into the export and package both as EXPORT_DIR.zip."""
    export_author_id: str = "author"
    """Author of the exported model: the GitHub user or organisation that identifies them."""
    export_model_name: str = "model"
    """Name of the exported model; no forward slashes."""
    export_model_version: str = "0.0.1"
    """Semantic version of the exported model (https://semver.org), chosen by its author."""
    export_contact_info: str = ""
    """Public contact of the author: an email address, a contact form, an issue tracker."""
    export_license: str = ""
    """SPDX identifier of the model's licence (https://spdx.org/licenses), else the licence's name."""
    export_language: str = ""
    """IETF BCP 47 tag of the language the model was trained on, with script and region, e.g. en-Latn-GB."""
    export_min_ds_version: str = ""
    """Oldest dstrain version that can use the export; empty records this dstrain's version."""
    export_description: str = ""
    """Free description: training data, architecture changes, evaluation results."""

    def __post_init__(self) -> None:
        if self.n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {self.n_steps}")
        if "/" in self.export_model_name:
            raise ValueError(f"export_model_name must not contain '/', got {self.export_model_name!r}")


@dataclass(frozen=True)
class ExportConfig:
    """dstrain export: a run's checkpoint as SavedModel, TFLite and streaming models"""

    export_dir: str = option()
    """Directory to write the export to (created; files of an earlier export there are replaced)."""
    checkpoint_dir: str = ""
    """The training run to export: its best-dev checkpoint, else its latest."""
    checkpoint_path: str = ""
    """One checkpoint to export instead (RUN/train/ckpt-N); its run is --checkpoint_dir, else two levels up."""
    scorer_path: str = ""
    """DeepSpeech .scorer package bundled by --export_zip."""
    options: ExportOptions = field(default_factory=ExportOptions)

    def __post_init__(self) -> None:
        if not self.checkpoint_dir and not self.checkpoint_path:
            raise ValueError("give the run to export: --checkpoint_dir RUN (or --checkpoint_path RUN/train/ckpt-N)")
        if self.scorer_path and not os.path.isfile(self.scorer_path):
            raise ValueError(f"scorer_path: no file {self.scorer_path}")


# --- graphs


def log_mel_graph(samples: tf.Tensor, features: FeatureConfig) -> tf.Tensor:
    """``[N]`` samples -> ``[T, n_mel]`` log mel, as :func:`dstrain.features.log_mel` (TensorFlow's AudioSpectrogram
    kernel, then the same float32 mel matrix and log floor)."""
    spectrogram = tf.raw_ops.AudioSpectrogram(
        input=samples[:, None], window_size=features.window_samples, stride=features.step_samples, magnitude_squared=True
    )[0]
    energies = tf.matmul(tf.sqrt(spectrogram), tf.constant(mel_matrix(features)))
    return tf.math.log(tf.maximum(energies, 1e-12))


def inference_model(model: DeepSpeech) -> DeepSpeech:
    """``model`` when it computes in float32, else a float32 copy (after mixed-precision training): exports and their
    TFLite conversions compute in float32 whatever the training precision (variables are float32 either way)."""
    if all(layer.compute_dtype == "float32" for layer in (*model.dense, model.lstm, model.dense5, model.out)):
        return model
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("float32")
    try:
        if model.front_end is not None:
            copy = DeepSpeech.for_features(model.cfg, model.front_end.features, model.n_classes)
        else:
            copy = DeepSpeech(model.cfg, model.n_input, model.n_classes).build_for()
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
    copy.set_weights(model.get_weights())
    return copy


def _padding_value(model: DeepSpeech) -> tf.Tensor:
    """The log mel frame whose MFCC is exactly zero, what the context window pads the edges with."""
    fe = model.front_end
    return fe.mean if fe.normalize else tf.zeros_like(fe.mean)


def batch_log_probs(model: DeepSpeech, log_mel: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
    """``[B,T,C]`` log-probabilities. Frames past each length are set to the zero-MFCC frame first, so a padded
    utterance sees the same right context as alone and batching never changes a result."""
    mask = tf.sequence_mask(lengths, tf.shape(log_mel)[1])[:, :, None]
    x = tf.where(mask, tf.cast(log_mel, tf.float32), _padding_value(model))
    return tf.nn.log_softmax(model((x, lengths), training=False))


def stream_state_shapes(model: DeepSpeech) -> dict[str, list[int]]:
    c, h = model.cfg.n_context, model.cfg.n_hidden
    return {"context": [1, max(2 * c, 1), model.n_input], "lstm_h": [1, h], "lstm_c": [1, h], "frames_seen": [1]}


def _stream_step_fn(model: DeepSpeech, n_steps: int):
    """The streaming graph: the layers of :meth:`DeepSpeech.call` applied to one chunk, the LSTM unrolled over it."""
    c, n = model.cfg.n_context, n_steps
    shapes = stream_state_shapes(model)
    spec = [
        tf.TensorSpec([1, n, model.input_width], tf.float32, "log_mel"), tf.TensorSpec([], tf.int32, "n_frames"),
        tf.TensorSpec(shapes["context"], tf.float32, "context"), tf.TensorSpec(shapes["lstm_h"], tf.float32, "lstm_h"),
        tf.TensorSpec(shapes["lstm_c"], tf.float32, "lstm_c"), tf.TensorSpec(shapes["frames_seen"], tf.int32, "frames_seen"),
    ]  # fmt: skip

    @tf.function(input_signature=spec)
    def stream_step(log_mel, n_frames, context, lstm_h, lstm_c, frames_seen):
        real = tf.cast(tf.range(n) < n_frames, tf.float32)[None, :, None]
        mfcc = model.front_end(log_mel) * real  # end padding is what the whole model pads with: zero MFCC
        if c > 0:
            buffer = tf.concat([context, mfcc], axis=1)  # [1, 2C + n, n_mfcc]: 2C frames of history
            # The same [frame-major, feature-minor] layout as DeepSpeech.context_window, from slices (TFLite builtins).
            x = tf.concat([buffer[:, j : j + n] for j in range(2 * c + 1)], axis=-1)
            context = buffer[:, n:]
        else:
            x = mfcc
        for layer in model.dense:
            x = model._clipped(layer, x, False)
        # Outputs before the stream's first n_context are lead-in (centred on frames before the start): no LSTM step.
        steps = frames_seen[0] + tf.range(n) >= c
        h, cell_state, outputs = lstm_h, lstm_c, []
        for i in range(n):
            _, (h_next, c_next) = model.lstm.cell(x[:, i], [h, cell_state], training=False)
            h, cell_state = tf.where(steps[i], h_next, h), tf.where(steps[i], c_next, cell_state)
            outputs.append(h)
        x = model._clipped(model.dense5, tf.stack(outputs, axis=1), False)
        return {
            "log_probs": tf.nn.log_softmax(model.out(x)), "context": context, "lstm_h": h, "lstm_c": cell_state,
            "frames_seen": tf.minimum(frames_seen + n, c),
        }  # fmt: skip

    return stream_step


class _ModelRef:
    """Holds the Keras model without making it part of the SavedModel's object graph (only its variables are):
    the export then holds our signatures alone, not Keras's own traces, and loads faster."""

    def __init__(self, model: DeepSpeech):
        self.model = model


class _Exported(tf.Module):
    def __init__(self, model: DeepSpeech, features: FeatureConfig, metadata_json: str, n_steps: int):
        super().__init__(name="dstrain_export")
        self._ref = _ModelRef(model)
        self.model_variables = list(model.variables)
        width = model.input_width

        @tf.function(input_signature=[tf.TensorSpec([None, None, width], tf.float32, "log_mel"), tf.TensorSpec([None], tf.int32, "lengths")])
        def log_probs(log_mel, lengths):
            return {"log_probs": batch_log_probs(model, log_mel, lengths)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, "samples")])
        def log_mel(samples):
            return {"log_mel": log_mel_graph(samples, features)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, "samples")])
        def log_probs_from_audio(samples):
            x = log_mel_graph(samples, features)[None]
            return {"log_probs": tf.nn.log_softmax(model((x, tf.shape(x)[1:2]), training=False))[0]}

        @tf.function(input_signature=[])
        def metadata():
            return {"json": tf.constant(metadata_json)}

        self.log_probs, self.log_mel, self.log_probs_from_audio = log_probs, log_mel, log_probs_from_audio
        self.stream_step, self.metadata = _stream_step_fn(model, n_steps), metadata

    def signatures(self) -> dict:
        return {
            "serving_default": self.log_probs_from_audio, "log_probs": self.log_probs, "log_mel": self.log_mel,
            "stream_step": self.stream_step, "metadata": self.metadata,
        }  # fmt: skip


# --- TFLite


def tflite_model(model: DeepSpeech, metadata: dict, quantize: bool, streaming_steps: int = 0) -> bytes:
    """TFLite flatbuffer, builtin ops only: the whole-utterance model (batch 1, any number of frames) or, with
    ``streaming_steps``, the stream_step graph. ``metadata`` is embedded (read back by :func:`read_tflite_metadata`)."""
    model = inference_model(model)
    if streaming_steps:
        fn = _stream_step_fn(model, streaming_steps)
    else:

        @tf.function(input_signature=[tf.TensorSpec([1, None, model.input_width], tf.float32, "log_mel")])
        def fn(log_mel):
            return {"log_probs": tf.nn.log_softmax(model((log_mel, tf.shape(log_mel)[1:2]), training=False))}

    # The converter saves what it is given: the variables alone take 1 s, the Keras model with its traces 10 s.
    holder = tf.Module()
    holder.model_variables = list(model.variables)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], holder)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    meta = dict(metadata, tflite={"streaming": bool(streaming_steps), "n_steps": streaming_steps, "quantized": quantize})
    return _with_metadata(converter.convert(), json.dumps(meta, ensure_ascii=False).encode("utf-8"))


def _with_metadata(flatbuffer: bytes, payload: bytes) -> bytes:
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    fb = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(payload, np.uint8)
    fb.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = TFLITE_METADATA_KEY, len(fb.buffers) - 1
    fb.metadata = [m for m in (fb.metadata or []) if m.name != TFLITE_METADATA_KEY.encode()] + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(fb))


def read_tflite_metadata(path: str) -> dict:
    """The metadata record a dstrain ``.tflite`` embeds (mapped, not read: the weights stay on disk)."""
    from tensorflow.lite.python import schema_py_generated as schema

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        fb = schema.Model.GetRootAs(data, 0)
        for i in range(fb.MetadataLength()):
            entry = fb.Metadata(i)
            if entry.Name() == TFLITE_METADATA_KEY.encode():
                return json.loads(fb.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    raise ValueError(f"{path}: no '{TFLITE_METADATA_KEY}' metadata; not a dstrain export (dstrain export --export_tflite)")


# --- writing an export


def export_metadata(model: DeepSpeech, alphabet: Alphabet | UTF8Alphabet, features: FeatureConfig, info: dict,
                    options: ExportOptions) -> dict:  # fmt: skip
    """The record stored with every form of the model (DeepSpeech kept its equivalent in the graph and a .md)."""
    bytes_mode = isinstance(alphabet, UTF8Alphabet)
    return {
        "format_version": FORMAT_VERSION,
        "dstrain_version": dstrain.__version__,
        "sample_rate": features.sample_rate,
        "features": features.to_dict(),
        "model": model.cfg.to_dict(),
        "n_classes": model.n_classes,
        "bytes_output_mode": bytes_mode,
        "alphabet": None if bytes_mode else list(alphabet.labels),
        "n_steps": options.n_steps,
        "author_id": options.export_author_id,
        "model_name": options.export_model_name,
        "model_version": options.export_model_version,
        "contact_info": options.export_contact_info,
        "license": options.export_license,
        "language": options.export_language,
        "min_ds_version": options.export_min_ds_version or dstrain.__version__,
        "description": options.export_description,
        **info,
    }


def _write_json(path: str, record: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def export_model(
    export_dir: str,
    model: DeepSpeech,
    alphabet: Alphabet | UTF8Alphabet,
    features: FeatureConfig,
    info: dict,
    *,
    options: ExportOptions = ExportOptions(),
    scorer_path: str = "",
    config: dict | None = None,
) -> dict:
    """Write the export (see the module docstring); ``info`` (training progress, weights source) joins the metadata,
    ``config`` (the resolved flags) is saved as flags.json. Returns the metadata record."""
    model = inference_model(model)
    os.makedirs(export_dir, exist_ok=True)
    for stale in (TFLITE_NAME, STREAMING_TFLITE_NAME, FLAGS_NAME):
        if os.path.exists(os.path.join(export_dir, stale)):
            os.remove(os.path.join(export_dir, stale))
    meta = export_metadata(model, alphabet, features, info, options)
    module = _Exported(model, features, json.dumps(meta, ensure_ascii=False), options.n_steps)
    tf.saved_model.save(module, export_dir, signatures=module.signatures())
    if not isinstance(alphabet, UTF8Alphabet):
        with open(os.path.join(export_dir, ALPHABET_NAME), "w", encoding="utf-8") as f:
            f.write(alphabet.serialize())
    if options.export_tflite:
        for name, steps in ((TFLITE_NAME, 0), (STREAMING_TFLITE_NAME, options.n_steps)):
            with open(os.path.join(export_dir, name), "wb") as f:
                f.write(tflite_model(model, meta, options.export_quantize, steps))
    if config is not None:
        _write_json(os.path.join(export_dir, FLAGS_NAME), config)
    _write_json(os.path.join(export_dir, META_NAME), meta)
    if options.export_zip:
        log.info("Packaged %s", package_zip(export_dir, scorer_path))
    return meta


def package_zip(export_dir: str, scorer_path: str = "") -> str:
    """DeepSpeech's package_zip: the scorer copied into the export, then ``EXPORT_DIR.zip`` of the folder."""
    if scorer_path:
        if not os.path.isfile(scorer_path):
            raise FileNotFoundError(f"scorer_path: no file {scorer_path} to package (--scorer_path)")
        shutil.copy(scorer_path, os.path.join(export_dir, os.path.basename(scorer_path)))
    else:
        log.warning("--export_zip without --scorer_path: the package holds the acoustic model alone")
    root = os.path.abspath(export_dir).rstrip(os.sep)
    return shutil.make_archive(root, "zip", root)


def _restore(cfg: ExportConfig):
    from dstrain.train.rundir import RunDir

    run = cfg.checkpoint_dir or os.path.dirname(os.path.dirname(os.path.abspath(cfg.checkpoint_path)))
    if not RunDir(run).exists():
        raise FileNotFoundError(f"{run}: no config.json; give the run of --checkpoint_path as --checkpoint_dir")
    return RunDir(run).restore_model(cfg.checkpoint_path or None)


def run_export(cfg: ExportConfig) -> int:
    """``dstrain export``."""
    model, run_info, source = _restore(cfg)
    info = {"weights_from": source, "run": os.path.abspath(cfg.checkpoint_dir or os.path.dirname(source))}
    config = {"export": to_dict(cfg), "train": run_info.train}
    export_model(cfg.export_dir, model, run_info.alphabet, run_info.features, info, options=cfg.options,
                 scorer_path=cfg.scorer_path, config=config)  # fmt: skip
    log.info("Exported %s to %s", source, cfg.export_dir)
    return 0


# --- loading: export folder, .tflite file or run directory, one interface


class LoadedModel:
    """An acoustic model in any of its forms: log mel ``[T, n_mel]`` in, log-probabilities ``[T, C]`` out."""

    kind = "model"

    def __init__(self, alphabet: Alphabet | UTF8Alphabet, features: FeatureConfig, metadata: dict):
        self.alphabet, self.features, self.metadata = alphabet, features, metadata

    def log_probs(self, log_mels: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One ``[T_i, C]`` array per utterance."""
        raise NotImplementedError


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
        self._fn = tf.function(lambda x, n: batch_log_probs(model, x, n), input_signature=[
            tf.TensorSpec([None, None, width], tf.float32), tf.TensorSpec([None], tf.int32)])  # fmt: skip

    def _batch(self, log_mel, lengths):
        return self._fn(log_mel, lengths)

    def streamer(self, n_steps: int | None = None) -> "Streamer":
        fn = _stream_step_fn(self.model, n_steps or self.metadata["n_steps"])
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
        out = []
        for x in log_mels:
            if len(x) == 0:
                out.append(np.zeros((0, self.metadata["n_classes"]), np.float32))
                continue
            out.append(self.runner(log_mel=np.asarray(x, np.float32)[None])["log_probs"][0])
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
            "lstm_h": np.zeros((1, n_hidden), np.float32), "lstm_c": np.zeros((1, n_hidden), np.float32),
            "frames_seen": np.zeros((1,), np.int32),
        }  # fmt: skip
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


def read_export_metadata(export_dir: str) -> dict:
    path = os.path.join(export_dir, META_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{export_dir}: no {META_NAME}; not a dstrain export (dstrain export, or train --export_dir)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_model(path: str, num_threads: int | None = None) -> LoadedModel:
    """An export folder (its SavedModel), a ``.tflite`` file (whole-utterance or streaming) or a run directory (its
    best-dev, else latest checkpoint)."""
    if os.path.isfile(path) and path.endswith(".tflite"):
        meta = read_tflite_metadata(path)
        return TFLiteModel(path, _metadata_alphabet(meta), FeatureConfig(**meta["features"]), meta, num_threads)
    if os.path.exists(os.path.join(path, META_NAME)):
        meta = read_export_metadata(path)
        return SavedModelExport(path, _metadata_alphabet(meta, path), FeatureConfig(**meta["features"]), meta)
    from dstrain.train.rundir import RunDir

    run = RunDir(path)
    if not run.exists():
        raise FileNotFoundError(f"{path}: neither an export folder ({META_NAME}), a .tflite file nor a run directory (config.json)")
    model, info, source = run.restore_model()
    meta = export_metadata(model, info.alphabet, info.features, {"weights_from": source}, ExportOptions())
    return CheckpointModel(model, info.alphabet, info.features, meta)
