"""Transcribe audio files with an exported model (greedy CTC decoding)."""
from __future__ import annotations

import numpy as np

from dstrain.alphabet import greedy_decode
from dstrain.audio import read_audio
from dstrain.export import LoadedModel
from dstrain.features import mfcc


def transcribe(model: LoadedModel, audio_path: str) -> str:
    samples = read_audio(audio_path, model.features.sample_rate)
    probs = model.probs(mfcc(samples, model.features))
    return greedy_decode(np.argmax(probs, axis=1), model.alphabet)
