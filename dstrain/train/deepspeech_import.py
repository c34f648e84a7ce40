"""Import Mozilla DeepSpeech (0.9.x, TF1) checkpoints into dstrain's Keras :class:`~dstrain.model.DeepSpeech`.

DeepSpeech's graph (training/deepspeech_training/train.py, v0.9.3) and how each piece maps here:

* ``create_overlapping_windows``: ``conv1d`` with an identity filter ``eye(W*n_input).reshape(W, n_input,
  W*n_input)``, ``padding='SAME'``, reshaped to ``[B, T, W, n_input]``: feature ``c`` of window frame ``w``
  (frame ``t + w - n_context``, zeros past the edges) sits at row ``w * n_input + c`` of ``layer_1/weights``.
  :meth:`DeepSpeech.context_window` (``tf.signal.frame`` of the zero-padded input, reshaped) uses the same
  order, so ``layer_1`` is copied unpermuted.
* ``dense()``: ``layer_N/weights`` ``[in, out]`` and ``layer_N/bias`` ``[out]``, ``x @ W + b``: Keras
  ``Dense`` kernel/bias as they are. Clipped ReLU on layers 1, 2, 3, 5; none on layer 6 (the logits).
* LSTM: ``rnn_impl_lstmblockfusedcell`` (training and evaluation) builds ``LSTMBlockFusedCell(n_hidden,
  forget_bias=0, name='cudnn_compatible_lstm_cell')`` under scope ``cudnn_lstm/rnn/multi_rnn_cell/cell_0``;
  ``rnn_impl_static_rnn`` (TFLite export) uses ``LSTMCell(forget_bias=0)`` with the same variables, and
  ``--train_cudnn`` checkpoints are saved by CudnnLSTM in this same canonical layout. One ``kernel``
  ``[n_in + n_hidden, 4 n_hidden]`` multiplies ``concat([x, h_prev])``; column blocks are gates
  ``i, j (cell input), f, o``; one ``bias`` ``[4 n_hidden]``; ``forget_bias`` (0 in DeepSpeech) is added to
  the ``f`` pre-activation at every step; no peepholes, no cell clip. Keras ``LSTM``: ``kernel`` ``[n_in,
  4h]`` + ``recurrent_kernel`` ``[h, 4h]``, blocks ``i, f, c, o``, sigmoid/tanh, and ``unit_forget_bias``
  only initialises. So: split the kernel's rows at ``n_in``, reorder blocks ``(i, j, f, o) -> (i, f, j, o)``
  and add ``forget_bias`` (0 here) to the ``f`` block of the bias.

With ``--layer_norm`` (DeepSpeech's ``dense()``: ``tf.contrib.layers.layer_norm`` after the clipped ReLU, before
dropout, on layers 1, 2, 3 and 5), each of those layers also has ``layer_N/LayerNorm/gamma`` and ``beta`` ``[out]``:
Keras ``LayerNormalization`` (last axis, epsilon 1e-12, contrib's) ``gamma``/``beta`` as they are.

Frames past an utterance's length differ (DeepSpeech zeroes the LSTM output there, Keras repeats the last
valid one); CTC never reads them. DeepSpeech 0.9.3 feeds un-normalised MFCCs (26 coefficients, 32 ms window,
20 ms step, 16 kHz): imported weights only make sense on the same features.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import tensorflow as tf

from dstrain.model import DeepSpeech

log = logging.getLogger(__name__)

DEEPSPEECH_FORGET_BIAS = 0.0
"""``forget_bias`` DeepSpeech passes to LSTMBlockFusedCell and LSTMCell (CudnnLSTM has none)."""

LSTM_SCOPE = "cudnn_lstm/rnn/multi_rnn_cell/cell_0/cudnn_compatible_lstm_cell"

# Droppable layers, bottom to top, as DeepSpeech's util/checkpoints.py lists them: ['2', '3', 'lstm', '5', '6'].
# layer_1 is never dropped.
_DROP_ORDER = ("layer_2", "layer_3", "lstm", "layer_5", "layer_6")
_LAYERS = ("layer_1",) + _DROP_ORDER

# Checkpoint entries that are not model weights: optimizer slots and accumulators, counters, the LR variable.
_SLOT_RE = re.compile(
    r"(^|/)(Adam(_\d+)?|Momentum|RMSProp(_\d+)?|Adagrad|Ftrl(_\d+)?|ExponentialMovingAverage)$"
    r"|(^|/)(beta1_power|beta2_power|global_step|learning_rate)(_\d+)?$"
)


def _is_optimizer_state(name: str) -> bool:
    return bool(_SLOT_RE.search(name))


def resolve_checkpoint(path: str) -> str:
    """A checkpoint prefix from ``path``: a prefix, or a directory with a ``checkpoint`` or
    ``best_dev_checkpoint`` state file (the 0.9.3 release tarball ships the latter), or one ``*.index``."""
    if not os.path.isdir(path):
        if tf.io.gfile.exists(path + ".index"):
            return path
        raise ValueError(f"{path}: no DeepSpeech checkpoint here (expected {path}.index or a directory)")
    for state_file in ("checkpoint", "best_dev_checkpoint"):
        state = tf.compat.v1.train.get_checkpoint_state(path, latest_filename=state_file)
        if state and state.model_checkpoint_path:
            prefix = state.model_checkpoint_path
            if not tf.io.gfile.exists(prefix + ".index"):
                # State files written on the training machine may hold absolute paths from there.
                prefix = os.path.join(path, os.path.basename(prefix))
            if tf.io.gfile.exists(prefix + ".index"):
                return prefix
    indexes = sorted(f[: -len(".index")] for f in os.listdir(path) if f.endswith(".index"))
    if len(indexes) == 1:
        return os.path.join(path, indexes[0])
    raise ValueError(
        f"{path}: cannot tell which checkpoint to load: no usable 'checkpoint'/'best_dev_checkpoint' state file "
        f"and {len(indexes)} *.index files; pass the checkpoint prefix"
    )


def convert_lstm_weights(
    kernel: np.ndarray, bias: np.ndarray, forget_bias: float = DEEPSPEECH_FORGET_BIAS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF1 LSTM ``kernel [n_in + h, 4h]`` (gates i, j, f, o over ``concat([x, h])``) and ``bias [4h]`` ->
    Keras ``(kernel [n_in, 4h], recurrent_kernel [h, 4h], bias [4h])`` (gates i, f, c, o), with
    ``forget_bias`` folded into the forget gate's bias."""
    h = bias.shape[0] // 4
    n_in = kernel.shape[0] - h
    if bias.shape != (4 * h,) or kernel.ndim != 2 or kernel.shape[1] != 4 * h or n_in < 1:
        raise ValueError(f"LSTM kernel {list(kernel.shape)} and bias {list(bias.shape)} are not [n_in + h, 4h], [4h]")
    i, j, f, o = np.split(kernel, 4, axis=1)
    k = np.concatenate([i, f, j, o], axis=1)
    bi, bj, bf, bo = np.split(bias, 4)
    b = np.concatenate([bi, bf + np.asarray(forget_bias, bias.dtype), bj, bo])
    return k[:n_in], k[n_in:], b


def _hint(layer: str, ckpt: tuple[int, ...], want: tuple[int, ...], drop: int) -> str:
    if layer == "layer_6" and ckpt[:-1] == want[:-1] and ckpt[-1] != want[-1]:
        return f"alphabet size differs; use --drop_source_layers {max(drop, 1)}"
    if layer == "layer_1" and ckpt[0] != want[0]:
        return "input width (n_input * (2 * n_context + 1)) differs: DeepSpeech 0.9.3 uses 26 MFCCs, n_context 9"
    return "n_hidden differs (DeepSpeech 0.9.3 releases use n_hidden 2048)"


def _model_targets(model: DeepSpeech) -> dict[str, list[tf.Variable]]:
    """For each source layer, the Keras variables its checkpoint arrays go to, in :func:`_source_names`' order (the
    LSTM's two arrays become three)."""
    cell = model.lstm.cell
    dense = {f"layer_{n}": layer for n, layer in zip((1, 2, 3, 5), [*model.dense, model.dense5])}
    out = {name: [layer.kernel, layer.bias] for name, layer in dense.items()}
    for name, norm in zip(dense, model.norms):
        out[name] += [norm.gamma, norm.beta]
    out["layer_6"] = [model.out.kernel, model.out.bias]
    out["lstm"] = [cell.kernel, cell.recurrent_kernel, cell.bias]
    return out


def _source_names(layer: str, layer_norm: bool) -> tuple[str, ...]:
    """The checkpoint's arrays of ``layer``; with --layer_norm, dense layers 1, 2, 3 and 5 also have the gain and
    bias of ``tf.contrib.layers.layer_norm`` (scope LayerNorm inside the layer's)."""
    if layer == "lstm":
        return f"{LSTM_SCOPE}/kernel", f"{LSTM_SCOPE}/bias"
    names = (f"{layer}/weights", f"{layer}/bias")
    if layer_norm and layer != "layer_6":
        names += (f"{layer}/LayerNorm/gamma", f"{layer}/LayerNorm/beta")
    return names


def load_deepspeech_checkpoint(path: str, model: DeepSpeech, drop_source_layers: int = 0) -> list[str]:
    """Copy a DeepSpeech TF1 checkpoint's weights into ``model``; returns one log line per variable.

    ``path``: a checkpoint prefix (``.../best_dev-1466475``) or a directory holding one. The ``drop_source_layers``
    top layers (1: layer_6; 2: + layer_5; 3: + the LSTM; ... at most 5; layer_1 always loads), as DeepSpeech's
    ``--drop_source_layers``, are not read and keep the values ``model`` has (its fresh initialisation). A checkpoint
    trained with DeepSpeech's ``--layer_norm`` needs a model built with ``--layer_norm`` and the other way round.
    Optimizer state in the checkpoint is ignored. Every shape is checked before anything is assigned: a
    mismatch or a missing variable raises ``ValueError`` and leaves ``model`` unchanged.
    """
    if not 0 <= drop_source_layers <= len(_DROP_ORDER):
        raise ValueError(
            f"drop_source_layers must be in 0..{len(_DROP_ORDER)} (layer_1 is always loaded), got {drop_source_layers}"
        )
    prefix = resolve_checkpoint(path)
    reader = tf.train.load_checkpoint(prefix)
    shapes = {name: tuple(shape) for name, shape in reader.get_variable_to_shape_map().items()}

    if not model.built:
        model((tf.zeros([1, 1, model.n_input]), tf.ones([1], tf.int32)), training=False)
    targets = _model_targets(model)
    dropped = set(_DROP_ORDER[len(_DROP_ORDER) - drop_source_layers :]) if drop_source_layers else set()

    report: list[str] = []
    layer_norm = bool(model.norms)
    normalised = sorted(n for n in shapes if re.match(r"layer_\d/LayerNorm/", n) and not _is_optimizer_state(n))
    if normalised and not layer_norm:
        raise ValueError(
            f"{prefix}: checkpoint was trained with --layer_norm ({', '.join(normalised[:4])}"
            f"{' ...' if len(normalised) > 4 else ''}); pass --layer_norm to load it"
        )
    if layer_norm and not normalised:
        raise ValueError(
            f"{prefix}: checkpoint has no layer normalisation (layer_N/LayerNorm/gamma); it was trained "
            "without --layer_norm, so leave --layer_norm out to load it"
        )
    expected = {n for layer in _LAYERS for n in _source_names(layer, layer_norm)}
    missing = [
        n for layer in _LAYERS if layer not in dropped for n in _source_names(layer, layer_norm) if n not in shapes
    ]
    if missing:
        found = sorted(n for n in shapes if not _is_optimizer_state(n))
        raise ValueError(
            f"{prefix}: not in the checkpoint: {', '.join(missing)} (is this a DeepSpeech 0.x checkpoint? "
            f"model variables found: {', '.join(found[:12]) or 'none'}{' ...' if len(found) > 12 else ''})"
        )

    assignments: list[tuple[tf.Variable, np.ndarray]] = []
    for layer in _LAYERS:
        names = _source_names(layer, layer_norm)
        if layer in dropped:
            report.append(f"kept fresh (drop_source_layers={drop_source_layers}): {', '.join(names)}")
            continue
        vars_ = targets[layer]
        if layer == "lstm":
            n_in, h = vars_[0].shape[0], vars_[1].shape[0]
            wanted = [(n_in + h, 4 * h), (4 * h,)]
        else:
            wanted = [tuple(v.shape) for v in vars_]
        for name, want in zip(names, wanted):
            if shapes[name] != want:
                raise ValueError(
                    f"{name}: checkpoint {list(shapes[name])}, model {list(want)}: "
                    f"{_hint(layer, shapes[name], want, drop_source_layers)}"
                )
        arrays = [reader.get_tensor(n) for n in names]
        if layer == "lstm":
            arrays = list(convert_lstm_weights(*arrays))
        assignments += list(zip(vars_, arrays))
        report.append(
            "loaded "
            + ", ".join(f"{n} {list(shapes[n])}" for n in names)
            + " -> "
            + ", ".join(var.name for var in vars_)
            + (" (gates i,j,f,o -> i,f,c,o)" if layer == "lstm" else "")
        )

    for var, value in assignments:
        var.assign(tf.cast(value, var.dtype))
    for name in sorted(set(shapes) - expected):
        why = "optimizer state" if _is_optimizer_state(name) else "not part of dstrain's model"
        report.append(f"ignored {name} ({why})")
    for line in report:
        log.info("DeepSpeech import from %s: %s", prefix, line)
    return report
