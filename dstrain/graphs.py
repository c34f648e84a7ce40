"""Inference graphs around a trained :class:`~dstrain.model.DeepSpeech`: audio to log mel (what preprocessing stores),
padded batches to log-probabilities, and the streaming step. Exports save them (:mod:`dstrain.export`) and
checkpoints loaded for inference trace them (:mod:`dstrain.inference`), so both compute the same thing.

Streaming (DeepSpeech's ``--n_steps`` graph): ``stream_step(log_mel [1,n_steps,n_mel], n_frames [], context
[1,2*n_context,n_mfcc], lstm_h [1,n_hidden], lstm_c [1,n_hidden], frames_seen [1])`` returns ``log_probs
[1,n_steps,C]`` and the four states. Start a stream with zero states; ``n_frames`` (< n_steps only in the last chunks)
counts the real frames of the chunk, the rest being end padding. The context window needs ``n_context`` frames of
look-ahead, so outputs lag inputs by ``n_context`` frames: over a stream, output ``j`` is frame ``j - n_context`` (the
first ``n_context`` outputs are lead-in, discard them), and the last ``n_context`` frames come out of a final chunk
with ``n_frames = 0``. :class:`dstrain.inference.Streamer` does this bookkeeping; the result equals the
whole-utterance model's.
"""

from __future__ import annotations

import tensorflow as tf

from dstrain.features import FeatureConfig, mel_matrix
from dstrain.model import DeepSpeech


def log_mel_graph(samples: tf.Tensor, features: FeatureConfig) -> tf.Tensor:
    """``[N]`` samples -> ``[T, n_mel]`` log mel, as :func:`dstrain.features.log_mel` (TensorFlow's AudioSpectrogram
    kernel, then the same float32 mel matrix and log floor)."""
    spectrogram = tf.raw_ops.AudioSpectrogram(
        input=samples[:, None],
        window_size=features.window_samples,
        stride=features.step_samples,
        magnitude_squared=True,
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


def stream_step_fn(model: DeepSpeech, n_steps: int):
    """The streaming graph: the layers of :meth:`DeepSpeech.call` applied to one chunk, the LSTM unrolled over it."""
    c, n = model.cfg.n_context, n_steps
    shapes = stream_state_shapes(model)
    spec = [
        tf.TensorSpec([1, n, model.input_width], tf.float32, "log_mel"),
        tf.TensorSpec([], tf.int32, "n_frames"),
        tf.TensorSpec(shapes["context"], tf.float32, "context"),
        tf.TensorSpec(shapes["lstm_h"], tf.float32, "lstm_h"),
        tf.TensorSpec(shapes["lstm_c"], tf.float32, "lstm_c"),
        tf.TensorSpec(shapes["frames_seen"], tf.int32, "frames_seen"),
    ]

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
        for layer in (1, 2, 3):
            x = model.dense_layer(layer, x, False)
        # Outputs before the stream's first n_context are lead-in (centred on frames before the start): no LSTM step.
        steps = frames_seen[0] + tf.range(n) >= c
        h, cell_state, outputs = lstm_h, lstm_c, []
        for i in range(n):
            _, (h_next, c_next) = model.lstm.cell(x[:, i], [h, cell_state], training=False)
            h, cell_state = tf.where(steps[i], h_next, h), tf.where(steps[i], c_next, cell_state)
            outputs.append(h)
        x = model.dense_layer(5, tf.stack(outputs, axis=1), False)
        return {
            "log_probs": tf.nn.log_softmax(model.out(x)),
            "context": context,
            "lstm_h": h,
            "lstm_c": cell_state,
            "frames_seen": tf.minimum(frames_seen + n, c),
        }

    return stream_step
