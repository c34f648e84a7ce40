"""Transcribe audio files with an exported model (greedy CTC decoding)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dstrain.alphabet import greedy_decode
from dstrain.audio import read_audio
from dstrain.config import option
from dstrain.export import LoadedModel, load_model
from dstrain.features import mfcc


def transcribe(model: LoadedModel, audio_path: str) -> str:
    samples = read_audio(audio_path, model.features.sample_rate)
    probs = model.probs(mfcc(samples, model.features))
    return greedy_decode(np.argmax(probs, axis=1), model.alphabet)


@dataclass(frozen=True)
class TranscribeConfig:
    """dstrain transcribe: print the transcript of audio files"""

    model: str = option()
    """Export directory (dstrain train --export_dir)."""
    audio: tuple[str, ...] = option(nargs="+")
    """Audio file(s): WAV, FLAC, MP3; any rate."""


def run(cfg: TranscribeConfig) -> int:
    model = load_model(cfg.model)
    for path in cfg.audio:
        text = transcribe(model, path)
        print(text if len(cfg.audio) == 1 else f"{path}: {text}")
    return 0
