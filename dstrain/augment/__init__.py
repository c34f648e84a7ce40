"""``--augment``: DeepSpeech 0.9's augmentation syntax and every op it names.

:mod:`.spec` reads the syntax (shared by training and preprocessing) and says what an op declares; :mod:`.waveform`
holds preprocessing's ops (on the audio, into stored copies); :mod:`.filterbank` declares training's ops (on the stored
log mel), which run in the training step (:mod:`.device`, TensorFlow) or, ``overlay`` and what must precede it, on the
loader threads (:mod:`.loader`, numpy); :mod:`.legacy` translates DeepSpeech 0.6's augmentation flags into specs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstrain.augment.spec import ParsedOp


def registry() -> dict[str, dict[str, type[ParsedOp]]]:
    """Every op class by the command whose ``--augment`` takes it (``train``, ``preprocess``), then by name."""
    # Imported here: importing the package for its syntax alone should not load preprocessing's audio codecs.
    from dstrain.augment import filterbank, waveform

    return {"train": dict(filterbank.OPS), "preprocess": dict(waveform.OPS)}
