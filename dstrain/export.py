"""Writing exports: what inference needs from a training run, in every form it is loaded in (the graphs are
:mod:`dstrain.graphs`', loading is :mod:`dstrain.inference`'s), and the format's names and metadata readers.

Layout::

    EXPORT_DIR/
      saved_model.pb, variables/   TensorFlow SavedModel; signatures (``[T]`` = frames, 20 ms unless
                                   --feature_win_step):
                                     serving_default  samples [N] (mono at the export's sample_rate, 16 kHz unless
                                                      preprocessed with --audio_sample_rate; float in [-1, 1])
                                                      -> log_probs [T, C]
                                     log_probs        log_mel [B,T,n_mel], lengths [B] -> log_probs [B,T,C]
                                     log_mel          samples [N] -> log_mel [T, n_mel] (what preprocessing stores)
                                     stream_step      one chunk of --n_steps frames with its state (see below)
                                     metadata         -> json (the same record as dstrain_export.json)
      alphabet.txt                 the training alphabet, DeepSpeech format
      dstrain_export.json          metadata: sample rate, feature and model parameters, alphabet, author, licence...
      flags.json                   the resolved configuration of the export (or of the training run that exported)
      model.tflite                 --export_tflite: batch 1 (--export_batch_size), any number of frames, log mel in,
                                   log_probs out (NAME.tflite with --export_file_name NAME)
      model_streaming.tflite       --export_tflite: the stream_step signature with a fixed --n_steps
                                   (NAME_streaming.tflite)
      SCORER.scorer                --export_zip: the --scorer_path package, copied in
    EXPORT_DIR.zip                 --export_zip: all of the above (DeepSpeech's package_zip)

Log-probabilities have the CTC blank last. Both TFLite files embed the metadata record (flatbuffer metadata
``dstrain``), so a ``.tflite`` file copied alone still transcribes. ``--export_quantize`` applies dynamic-range
quantisation (int8 weights, float activations) to both.

The streaming signature is :func:`dstrain.graphs.stream_step_fn`'s (see there for its states).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

import dstrain
from dstrain.alphabet import Alphabet, UTF8Alphabet
from dstrain.config import option, to_dict
from dstrain.features import FeatureConfig
from dstrain.graphs import (
    batch_log_probs,
    inference_model,
    log_mel_graph,
    stream_step_fn,
)
from dstrain.model import DeepSpeech
from dstrain.rundir import LoadEvaluateConfig, evaluation_weights

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
    export_max_ds_version: str = ""
    """Newest dstrain version known to use the export, recorded in its metadata (DeepSpeech wrote it to the model's
    .md file); empty means no upper bound."""
    export_file_name: str = "model"
    """Name of the TFLite files: NAME.tflite and NAME_streaming.tflite (DeepSpeech's --export_file_name, whose
    default output_graph named its .pb/.tflite; the SavedModel's saved_model.pb is named by TensorFlow)."""
    export_batch_size: int = 1
    """Batch size of the whole-utterance TFLite model, as DeepSpeech's exported graph: 1 takes log_mel [1,T,n_mel],
    N > 1 takes N utterances (log_mel [N,T,n_mel] and lengths [N]). The SavedModel takes any batch size (TFLite's
    LSTM needs a fixed one, so DeepSpeech's 0 for "any" is refused)."""
    export_beam_width: int = 500
    """Beam width recorded in the export as its default: dstrain transcribe uses it unless --beam_width is given, as
    DeepSpeech's client did."""
    remove_export: bool = False
    """Delete the export folder (it must hold an earlier dstrain export) before writing the new one; otherwise files
    of an earlier export are replaced and others left alone."""
    export_description: str = ""
    """Free description: training data, architecture changes, evaluation results."""

    def __post_init__(self) -> None:
        if self.n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {self.n_steps}")
        if "/" in self.export_model_name:
            raise ValueError(f"export_model_name must not contain '/', got {self.export_model_name!r}")
        if not self.export_file_name or "/" in self.export_file_name or self.export_file_name.endswith(".tflite"):
            raise ValueError(
                f"export_file_name must be a file name without '/' or .tflite, got {self.export_file_name!r}"
            )
        if self.export_batch_size < 1:
            raise ValueError(
                f"export_batch_size must be >= 1 (TFLite's LSTM needs a fixed batch size; the SavedModel "
                f"takes any), got {self.export_batch_size}"
            )
        if self.export_beam_width < 1:
            raise ValueError(f"export_beam_width must be >= 1, got {self.export_beam_width}")

    @property
    def tflite_names(self) -> tuple[str, str]:
        """File names of the whole-utterance and the streaming TFLite models."""
        return f"{self.export_file_name}.tflite", f"{self.export_file_name}_streaming.tflite"


@dataclass(frozen=True)
class ExportConfig:
    """dstrain export: a run's checkpoint as SavedModel, TFLite and streaming models"""

    export_dir: str = option()
    """Directory to write the export to (created; files of an earlier export there are replaced)."""
    checkpoint_dir: str = ""
    """The training run to export: the checkpoint --load_evaluate names (auto: its best-dev, else its latest)."""
    checkpoint_path: str = ""
    """One checkpoint to export instead (RUN/train/ckpt-N); its run is --checkpoint_dir, else two levels up."""
    scorer_path: str = option("", names=("--scorer_path", "--scorer"))
    """DeepSpeech .scorer package bundled by --export_zip (--scorer is DeepSpeech's alias)."""
    options: ExportOptions = field(default_factory=ExportOptions)
    evaluate: LoadEvaluateConfig = field(default_factory=LoadEvaluateConfig)

    def __post_init__(self) -> None:
        if not self.checkpoint_dir and not self.checkpoint_path:
            raise ValueError("give the run to export: --checkpoint_dir RUN (or --checkpoint_path RUN/train/ckpt-N)")
        if self.scorer_path and not os.path.isfile(self.scorer_path):
            raise ValueError(f"scorer_path: no file {self.scorer_path}")


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

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None, width], tf.float32, "log_mel"),
                tf.TensorSpec([None], tf.int32, "lengths"),
            ]
        )
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
        self.stream_step, self.metadata = stream_step_fn(model, n_steps), metadata

    def signatures(self) -> dict:
        return {
            "serving_default": self.log_probs_from_audio,
            "log_probs": self.log_probs,
            "log_mel": self.log_mel,
            "stream_step": self.stream_step,
            "metadata": self.metadata,
        }


# --- TFLite


def tflite_model(
    model: DeepSpeech, metadata: dict, quantize: bool, streaming_steps: int = 0, batch_size: int = 1
) -> bytes:
    """TFLite flatbuffer, builtin ops only: the whole-utterance model (``batch_size`` utterances of any number of
    frames) or, with ``streaming_steps``, the stream_step graph. ``metadata`` is embedded (read back by
    :func:`read_tflite_metadata`)."""
    model = inference_model(model)
    if streaming_steps:
        fn = stream_step_fn(model, streaming_steps)
    elif batch_size == 1:

        @tf.function(input_signature=[tf.TensorSpec([1, None, model.input_width], tf.float32, "log_mel")])
        def fn(log_mel):
            return {"log_probs": tf.nn.log_softmax(model((log_mel, tf.shape(log_mel)[1:2]), training=False))}

    else:

        @tf.function(
            input_signature=[
                tf.TensorSpec([batch_size, None, model.input_width], tf.float32, "log_mel"),
                tf.TensorSpec([batch_size], tf.int32, "lengths"),
            ]
        )
        def fn(log_mel, lengths):
            return {"log_probs": batch_log_probs(model, log_mel, lengths)}

    # The converter saves what it is given: the variables alone take 1 s, the Keras model with its traces 10 s.
    holder = tf.Module()
    holder.model_variables = list(model.variables)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], holder)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    meta = dict(
        metadata,
        tflite={
            "streaming": bool(streaming_steps),
            "n_steps": streaming_steps,
            "quantized": quantize,
            "batch_size": 1 if streaming_steps else batch_size,
        },
    )
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
    raise ValueError(
        f"{path}: no '{TFLITE_METADATA_KEY}' metadata; not a dstrain export (dstrain export --export_tflite)"
    )


def read_export_metadata(export_dir: str) -> dict:
    path = os.path.join(export_dir, META_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{export_dir}: no {META_NAME}; not a dstrain export (dstrain export, or train --export_dir)"
        )
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    # Names read from the metadata are opened inside the export: a path (or "..") there is an error, never followed.
    for name in meta.get("tflite_files", []):
        if not isinstance(name, str) or not name or name != os.path.basename(name) or name in (".", ".."):
            raise ValueError(f"{path}: tflite_files holds {name!r}, not a file name inside the export")
    return meta


# --- writing an export


def export_metadata(
    model: DeepSpeech, alphabet: Alphabet | UTF8Alphabet, features: FeatureConfig, info: dict, options: ExportOptions
) -> dict:
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
        "max_ds_version": options.export_max_ds_version,
        "beam_width": options.export_beam_width,
        "tflite_files": list(options.tflite_names) if options.export_tflite else [],
        "description": options.export_description,
        **info,
    }


def _write_json(path: str, record: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
        f.write("\n")


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
    ``config`` (the resolved flags) is saved as flags.json. Returns the metadata record.

    The export is written whole into a folder beside ``export_dir`` and then swapped in: a kill or a failed
    conversion at any point leaves the earlier export as it was (or the new one, complete), never a mix."""
    model = inference_model(model)
    if options.remove_export and os.path.isdir(export_dir):
        _remove_export(export_dir)
    parent = os.path.dirname(os.path.abspath(export_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(export_dir))}.new-", dir=parent)
    try:
        meta = export_metadata(model, alphabet, features, info, options)
        module = _Exported(model, features, json.dumps(meta, ensure_ascii=False), options.n_steps)
        tf.saved_model.save(module, staging, signatures=module.signatures())
        if not isinstance(alphabet, UTF8Alphabet):
            with open(os.path.join(staging, ALPHABET_NAME), "w", encoding="utf-8") as f:
                f.write(alphabet.serialize())
        if options.export_tflite:
            for name, steps in zip(options.tflite_names, (0, options.n_steps)):
                with open(os.path.join(staging, name), "wb") as f:
                    f.write(tflite_model(model, meta, options.export_quantize, steps, options.export_batch_size))
        if config is not None:
            _write_json(os.path.join(staging, FLAGS_NAME), config)
        _write_json(os.path.join(staging, META_NAME), meta)
        if os.path.isdir(export_dir):
            _carry_over(export_dir, staging, options)
        _swap_in(staging, export_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the new export on failure, the earlier one after a swap
    if options.export_zip:
        log.info("Packaged %s", package_zip(export_dir, scorer_path))
    return meta


def _carry_over(export_dir: str, staging: str, options: ExportOptions) -> None:
    """Files a person put beside an earlier export stay (as DeepSpeech's export leaves them without --remove_export);
    the earlier export's own files (its TFLite files whatever their names, its flags) do not."""
    earlier = {TFLITE_NAME, STREAMING_TFLITE_NAME, *options.tflite_names, FLAGS_NAME}
    if os.path.exists(os.path.join(export_dir, META_NAME)):
        earlier.update(read_export_metadata(export_dir).get("tflite_files", []))
    for name in sorted(set(os.listdir(export_dir)) - earlier - set(os.listdir(staging))):
        src, dst = os.path.join(export_dir, name), os.path.join(staging, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)


def _swap_in(staging: str, export_dir: str) -> None:
    """``staging`` becomes ``export_dir`` in one step where Linux can (renameat2's RENAME_EXCHANGE, after which
    ``staging`` holds the earlier export); elsewhere the earlier export is moved aside first, and a kill between the
    two renames leaves both complete folders, the earlier one named ``.NAME.new-*``'s sibling ``*.old``."""
    os.sync()  # the files reach the disk before any name points at them
    if not os.path.lexists(export_dir):
        os.rename(staging, export_dir)
    elif not _exchange(staging, export_dir):
        old = staging + ".old"
        os.rename(export_dir, old)
        os.rename(staging, export_dir)
        shutil.rmtree(old)
    folder = os.open(os.path.dirname(os.path.abspath(export_dir)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False where the system or file system
    cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove_export(export_dir: str) -> None:
    """--remove_export: the whole folder goes, but only when it holds a dstrain export (a mistyped path is not
    emptied)."""
    if os.listdir(export_dir) and not os.path.exists(os.path.join(export_dir, META_NAME)):
        raise ValueError(
            f"--remove_export: {export_dir} holds files but no earlier export ({META_NAME}); "
            "not deleting it (remove it yourself, or choose another --export_dir)"
        )
    shutil.rmtree(export_dir)
    log.info("--remove_export: removed the earlier export in %s", export_dir)


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
    from dstrain.rundir import RunDir

    run = cfg.checkpoint_dir or os.path.dirname(os.path.dirname(os.path.abspath(cfg.checkpoint_path)))
    if not RunDir(run).exists():
        raise FileNotFoundError(f"{run}: no config.json; give the run of --checkpoint_path as --checkpoint_dir")
    return RunDir(run).restore_model(cfg.checkpoint_path or None, cfg.evaluate.load_evaluate)


def run_export(cfg: ExportConfig) -> int:
    """``dstrain export``."""
    model, run_info, source = _restore(cfg)
    info = {
        "weights_from": source,
        "weights": evaluation_weights(source),
        "run": os.path.abspath(cfg.checkpoint_dir or os.path.dirname(source)),
    }
    if run_info.averaged:
        info["averaged"] = run_info.averaged  # dstrain average's sources
    config = {"export": to_dict(cfg), "train": run_info.train}
    export_model(
        cfg.export_dir,
        model,
        run_info.alphabet,
        run_info.features,
        info,
        options=cfg.options,
        scorer_path=cfg.scorer_path,
        config=config,
    )
    log.info("Exported %s to %s", source, cfg.export_dir)
    return 0
