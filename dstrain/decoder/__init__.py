"""DeepSpeech-compatible CTC decoding: ``ds_ctcdecoder``'s Python API, for code written against it.

from dstrain.decoder import Alphabet, Scorer, ctc_beam_search_decoder
alphabet = Alphabet("alphabet.txt")
scorer = Scorer(0.93, 1.18, "kenlm.scorer", alphabet)
[(confidence, text), ...] = ctc_beam_search_decoder(probs, alphabet, 1024, scorer=scorer)
"""

from __future__ import annotations

from dstrain.alphabet import Alphabet as _Alphabet
from dstrain.alphabet import UTF8Alphabet
from dstrain.decoder.ctc import ctc_beam_search_decoder, ctc_beam_search_decoder_batch
from dstrain.decoder.scorer import Scorer


def Alphabet(config_path: str) -> _Alphabet:  # noqa: N802 - DeepSpeech's name
    """``ds_ctcdecoder.Alphabet(path)``: a DeepSpeech alphabet file."""
    return _Alphabet.from_file(config_path)


__all__ = ["Alphabet", "UTF8Alphabet", "Scorer", "ctc_beam_search_decoder", "ctc_beam_search_decoder_batch"]
