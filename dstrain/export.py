"""Exported model: a TensorFlow SavedModel plus what a decoder needs to use it.

    EXPORT_DIR/
      saved_model.pb, variables/   signatures ``probs`` (MFCC in) and ``probs_from_audio`` (16 kHz samples in)
      alphabet.txt                 the training alphabet, DeepSpeech format
      dstrain_export.json          feature and model parameters, training progress, dstrain version
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

import dstrain
from dstrain.alphabet import Alphabet
from dstrain.features import FeatureConfig
from dstrain.model import DeepSpeech

META_NAME = "dstrain_export.json"


class _Exported(tf.Module):
    def __init__(self, model: DeepSpeech, features: FeatureConfig):
        super().__init__()
        self.model = model
        self.fc = features
        n = model.n_input

        @tf.function(input_signature=[tf.TensorSpec([None, None, n], tf.float32), tf.TensorSpec([None], tf.int32)])
        def probs(mfcc, lengths):
            return {"probs": tf.nn.softmax(self.model((mfcc, lengths), training=False))}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def probs_from_audio(samples):
            # TensorFlow's own kernels, which dstrain.features reproduces (tested to 1e-3).
            spec = tf.raw_ops.AudioSpectrogram(
                input=samples[:, None], window_size=self.fc.window_samples, stride=self.fc.step_samples, magnitude_squared=True
            )
            mfcc = tf.raw_ops.Mfcc(
                spectrogram=spec,
                sample_rate=self.fc.sample_rate,
                upper_frequency_limit=self.fc.upper_hz,
                lower_frequency_limit=self.fc.lower_hz,
                filterbank_channel_count=self.fc.n_mel,
                dct_coefficient_count=self.fc.n_mfcc,
            )
            return {"probs": tf.nn.softmax(self.model((mfcc, tf.shape(mfcc)[1:2]), training=False))[0]}

        self.probs = probs
        self.probs_from_audio = probs_from_audio


def export_model(export_dir: str, model: DeepSpeech, alphabet: Alphabet, features: FeatureConfig, info: dict) -> None:
    os.makedirs(export_dir, exist_ok=True)
    module = _Exported(model, features)
    tf.saved_model.save(
        module, export_dir, signatures={"serving_default": module.probs, "probs_from_audio": module.probs_from_audio}
    )
    with open(os.path.join(export_dir, "alphabet.txt"), "w", encoding="utf-8") as f:
        f.write(alphabet.serialize())
    meta = {"dstrain_version": dstrain.__version__, "features": features.to_dict(), "model": model.cfg.to_dict(), **info}
    with open(os.path.join(export_dir, META_NAME), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")


@dataclass
class LoadedModel:
    alphabet: Alphabet
    features: FeatureConfig
    module: tf.Module

    def probs(self, mfcc: np.ndarray) -> np.ndarray:
        """``[T, n_mfcc]`` -> ``[T, n_classes]`` posteriors, blank last."""
        out = self.module.probs(tf.constant(mfcc[None], tf.float32), tf.constant([mfcc.shape[0]], tf.int32))
        return out["probs"].numpy()[0]


def load_model(export_dir: str) -> LoadedModel:
    meta_path = os.path.join(export_dir, META_NAME)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{export_dir}: no {META_NAME}; not a dstrain export (see dstrain train --export_dir)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    return LoadedModel(
        alphabet=Alphabet.from_file(os.path.join(export_dir, "alphabet.txt")),
        features=FeatureConfig(**meta["features"]),
        module=tf.saved_model.load(export_dir),
    )
