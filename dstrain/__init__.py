"""dstrain: distributed DeepSpeech-style CTC training."""

__version__ = "0.1.0"
