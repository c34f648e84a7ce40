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
    """Dropout on the output of dense layer 1 during training, and of layers 2, 3 and 5 unless --dropout_rate2,
    --dropout_rate3, --dropout_rate6 say otherwise; 0 disables it."""
    dropout_rate2: float = -1.0
    """Dropout on dense layer 2's output; -1 means --dropout_rate (DeepSpeech's)."""
    dropout_rate3: float = -1.0
    """Dropout on dense layer 3's output; -1 means --dropout_rate."""
    dropout_rate4: float = 0.0
    """Dropout on the LSTM's (layer 4's) output; -1 means --dropout_rate. DeepSpeech 0.9.3 accepted it and never
    applied it, so its default 0 is DeepSpeech's model."""
    dropout_rate5: float = 0.0
    """Accepted as DeepSpeech 0.9.3 did, where it had no effect: layer 5's output dropout is --dropout_rate6 there
    and here. Anything but 0 is an error that says so."""
    dropout_rate6: float = -1.0
    """Dropout on dense layer 5's output, what enters the output layer (DeepSpeech's create_model applies
    --dropout_rate6 there); -1 means --dropout_rate."""
    layer_norm: bool = False
    """Layer normalisation after the clipped ReLU of dense layers 1, 2, 3 and 5, before their dropout (DeepSpeech's
    --layer_norm: a gain and a bias per unit, epsilon 1e-12); DeepSpeech checkpoints trained with it import."""
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
        for n in (2, 3, 4, 6):
            rate = getattr(self, f"dropout_rate{n}")
            if rate != -1.0 and not 0.0 <= rate < 1.0:
                raise ValueError(f"dropout_rate{n} must be in [0, 1) or -1 (same as --dropout_rate), got {rate}")
        if self.dropout_rate5 != 0.0:
            raise ValueError(
                f"dropout_rate5 {self.dropout_rate5}: DeepSpeech 0.9.3 never applied it (layer 5's output "
                "dropout is --dropout_rate6); give --dropout_rate6 instead"
            )
        if self.relu_clip <= 0:
            raise ValueError(f"relu_clip must be > 0, got {self.relu_clip}")

    def layer_dropout(self) -> dict[int, float]:
        """Training dropout on the output of layers 1, 2, 3, 4 (the LSTM) and 5, -1s resolved as DeepSpeech's
        util/config.py resolves them."""

        def rate(value: float) -> float:
            return self.dropout_rate if value == -1.0 else value

        return {
            1: self.dropout_rate,
            2: rate(self.dropout_rate2),
            3: rate(self.dropout_rate3),
            4: rate(self.dropout_rate4),
            5: rate(self.dropout_rate6),
        }

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
        # On the outputs of layers 1, 2, 3, 4 (the LSTM) and 5.
        self.dropouts = [tf.keras.layers.Dropout(rate) for rate in cfg.layer_dropout().values()]
        # Layers 1, 2, 3 and 5; only with --layer_norm, so models without it keep their checkpoints' variables.
        self.norms = (
            [tf.keras.layers.LayerNormalization(epsilon=1e-12, name=f"layer_{n}_norm") for n in (1, 2, 3, 5)]
            if cfg.layer_norm
            else []
        )

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

    def dense_layer(self, n: int, x: tf.Tensor, training: bool) -> tf.Tensor:
        """Dense layer ``n`` (1, 2, 3 or 5) as DeepSpeech's ``dense()``: clipped ReLU, layer norm, dropout."""
        layer = self.dense5 if n == 5 else self.dense[n - 1]
        y = layer(x)  # in the layer's compute dtype (float16/bfloat16 under mixed precision)
        x = tf.minimum(tf.nn.relu(y), tf.cast(self.cfg.relu_clip, y.dtype))
        if self.norms:
            x = self.norms[3 if n == 5 else n - 1](x)
        return self.dropouts[n - 1](x, training=training)

    def call(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool = False) -> tf.Tensor:
        features, lengths = inputs
        if self.front_end is not None:
            # Padding frames become zero MFCCs (not normalised silence), so a padded utterance's last frames see
            # the same context whatever its batch-mates, as exports and streaming see it.
            mask = tf.sequence_mask(lengths, maxlen=tf.shape(features)[1], dtype=tf.float32)
            features = self.front_end(features) * mask[:, :, None]
        x = self.context_window(features)
        for n in (1, 2, 3):
            x = self.dense_layer(n, x, training)
        mask = tf.sequence_mask(lengths, maxlen=tf.shape(features)[1])
        x = self.dropouts[3](self.lstm(x, mask=mask, training=training), training=training)
        x = self.dense_layer(5, x, training)
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
