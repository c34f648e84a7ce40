"""DeepSpeech's acoustic model in TF2 Keras: context window, 3 clipped-ReLU dense layers, one LSTM,
a fifth dense layer and a softmax-ready output of ``alphabet + 1`` classes (CTC blank last).

With a :class:`FrontEnd` the model takes what the feature store keeps (log mel filterbank, float16 or float32) and its
first op widens, normalises and turns it into MFCCs on the device, so the host never does, and exports carry it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import tensorflow as tf

from dstrain.features import FeatureConfig, dct_matrix


@dataclass(frozen=True)
class ModelConfig:
    """Acoustic model geometry (DeepSpeech's)"""

    n_hidden: int = 2048
    """Units in each dense layer and the LSTM."""
    n_context: int = 9
    """Frames of context on each side of the current one: 2*9+1 = 19 frames per step."""
    relu_clip: float = 20.0
    """ReLU activations are clipped at this value."""
    dropout_rate: float = 0.05
    """Dropout on dense layers 1, 2, 3 and 5 during training; 0 disables it."""
    feature_normalization: bool = True
    """Normalise each filterbank channel by the training store's mean and deviation in the model's first op;
    --nofeature_normalization gives DeepSpeech's inputs (needed to fine-tune a DeepSpeech release checkpoint)."""

    def __post_init__(self) -> None:
        if self.n_hidden < 1:
            raise ValueError(f"n_hidden must be >= 1, got {self.n_hidden}")
        if self.n_context < 0:
            raise ValueError(f"n_context must be >= 0, got {self.n_context}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.relu_clip <= 0:
            raise ValueError(f"relu_clip must be > 0, got {self.relu_clip}")

    def to_dict(self) -> dict:
        return asdict(self)


class FrontEnd(tf.keras.layers.Layer):
    """log mel ``[B,T,n_mel]`` (any float dtype) -> MFCC ``[B,T,n_mfcc]`` float32: widen, normalise, DCT."""

    def __init__(self, features: FeatureConfig, normalize: bool):
        super().__init__(name="front_end", dtype="float32")  # float32 even under a mixed precision policy
        self.features, self.normalize = features, normalize
        self.dct = tf.constant(dct_matrix(features), tf.float32)
        self.mean = self.add_weight("mean", [features.n_mel], initializer="zeros", trainable=False)
        self.std = self.add_weight("std", [features.n_mel], initializer="ones", trainable=False)

    def set_statistics(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean.assign(np.asarray(mean, np.float32))
        self.std.assign(np.asarray(std, np.float32))

    def call(self, log_mel: tf.Tensor) -> tf.Tensor:
        x = tf.cast(log_mel, tf.float32)
        if self.normalize:
            x = (x - self.mean) / self.std
        return tf.einsum("btm,mc->btc", x, self.dct)


class DeepSpeech(tf.keras.Model):
    """``call((features [B,T,n_input], lengths [B]))`` -> logits ``[B, T, n_classes]`` (float32); with a front end
    the features are the stored log mel ``[B,T,n_mel]`` instead of MFCCs."""

    def __init__(self, cfg: ModelConfig, n_input: int, n_classes: int, front_end: FrontEnd | None = None):
        super().__init__(name="deepspeech")
        self.cfg, self.n_input, self.n_classes = cfg, n_input, n_classes
        self.front_end = front_end
        self.dense = [tf.keras.layers.Dense(cfg.n_hidden, name=f"layer_{i}") for i in (1, 2, 3)]
        self.lstm = tf.keras.layers.LSTM(cfg.n_hidden, return_sequences=True, name="layer_4")
        self.dense5 = tf.keras.layers.Dense(cfg.n_hidden, name="layer_5")
        # Float32 output keeps softmax and CTC stable under mixed precision.
        self.out = tf.keras.layers.Dense(n_classes, name="layer_6", dtype="float32")
        self.dropout = tf.keras.layers.Dropout(cfg.dropout_rate)

    @classmethod
    def for_features(cls, cfg: ModelConfig, features: FeatureConfig, n_classes: int) -> "DeepSpeech":
        """The model trained and exported by dstrain: log mel in, front end inside, weights created."""
        return cls(cfg, features.n_mfcc, n_classes, FrontEnd(features, cfg.feature_normalization)).build_for()

    @property
    def input_width(self) -> int:
        return self.front_end.features.n_mel if self.front_end is not None else self.n_input

    def build_for(self) -> "DeepSpeech":
        """Creates the weights now (Keras creates them on the first call), e.g. before restoring a checkpoint."""
        self((tf.zeros([1, 1, self.input_width]), tf.ones([1], tf.int32)))
        return self

    def get_config(self) -> dict:
        return {"cfg": self.cfg.to_dict(), "n_input": self.n_input, "n_classes": self.n_classes}

    def context_window(self, features: tf.Tensor) -> tf.Tensor:
        """Each frame with ``n_context`` frames either side, zero-padded at the edges: [B, T, (2C+1)*n_input]."""
        c = self.cfg.n_context
        padded = tf.pad(features, [[0, 0], [c, c], [0, 0]])
        windows = tf.signal.frame(padded, 2 * c + 1, 1, axis=1)  # [B, T, 2C+1, n_input]
        return tf.reshape(windows, [tf.shape(features)[0], -1, (2 * c + 1) * self.n_input])

    def _clipped(self, layer: tf.keras.layers.Layer, x: tf.Tensor, training: bool) -> tf.Tensor:
        y = layer(x)  # in the layer's compute dtype (float16/bfloat16 under mixed precision)
        x = tf.minimum(tf.nn.relu(y), tf.cast(self.cfg.relu_clip, y.dtype))
        return self.dropout(x, training=training)

    def call(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool = False) -> tf.Tensor:
        features, lengths = inputs
        if self.front_end is not None:
            # Padding frames become zero MFCCs (not normalised silence), so a padded utterance's last frames see
            # the same context whatever its batch-mates, as exports and streaming see it.
            mask = tf.sequence_mask(lengths, maxlen=tf.shape(features)[1], dtype=tf.float32)
            features = self.front_end(features) * mask[:, :, None]
        x = self.context_window(features)
        for layer in self.dense:
            x = self._clipped(layer, x, training)
        mask = tf.sequence_mask(lengths, maxlen=tf.shape(features)[1])
        x = self.lstm(x, mask=mask, training=training)
        x = self._clipped(self.dense5, x, training)
        return self.out(x)


def sparse_labels(labels: tf.Tensor, label_lengths: tf.Tensor) -> tf.SparseTensor:
    """Padded ``[B, L]`` labels to the SparseTensor CTC wants; padding never leaks in (label 0 is valid)."""
    mask = tf.sequence_mask(label_lengths, maxlen=tf.shape(labels)[1])
    indices = tf.where(mask)
    return tf.SparseTensor(indices, tf.gather_nd(labels, indices), tf.shape(labels, out_type=tf.int64))


def ctc_loss(logits: tf.Tensor, logit_lengths: tf.Tensor, labels: tf.Tensor, label_lengths: tf.Tensor) -> tf.Tensor:
    """Per-utterance CTC negative log likelihood, blank = last class (DeepSpeech's convention)."""
    return tf.nn.ctc_loss(
        labels=sparse_labels(labels, label_lengths),
        logits=tf.cast(logits, tf.float32),
        label_length=None,
        logit_length=logit_lengths,
        logits_time_major=False,
        blank_index=-1,
    )
