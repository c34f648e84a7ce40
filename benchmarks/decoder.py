"""Decoding speed with pruned_lm.scorer: dstrain's compiled beam search against pyctcdecode, same KenLM model, same
inputs, in one run. Target: >= 3x pyctcdecode's utterances per second, and within 1.5x of DeepSpeech's C++ decoder
(about 0.56 s for 40 utterances of 126-215 frames at beam 100 on this 2-core machine).

Inputs are 40 posteriorgrams spelling lines of ../shared/data/smoke/vocab.txt with random confusions and blank
runs (126-215 frames each), as a half-trained model produces them. Single process unless --processes says more.

    .venv/bin/pip install pyctcdecode   # once
    .venv/bin/python benchmarks/decoder.py [--processes 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from dstrain.alphabet import Alphabet
from dstrain.decoder.ctc import ctc_beam_search_decoder, ctc_beam_search_decoder_batch
from dstrain.decoder.scorer import Scorer
from dstrain.decoder.synthetic import noisy_posteriors

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "data")
ALPHABET = os.path.join(HERE, "..", "dstrain", "data", "alphabet.txt")


def utterances(alphabet: Alphabet, n: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    lines = [" ".join(line.split()) for line in open(os.path.join(SHARED, "smoke", "vocab.txt"), encoding="utf-8")]
    lines = [line for line in lines if line and not alphabet.missing(line)]
    out = []
    while len(out) < n:
        line = lines[rng.integers(len(lines))]
        words = line.split()[: rng.integers(8, 16)]
        p = noisy_posteriors(" ".join(words), alphabet, rng, max_blanks=1)
        if 126 <= len(p) <= 215:
            out.append(p)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--beams", default="100,500")
    args = parser.parse_args()
    alphabet = Alphabet.from_file(ALPHABET)
    scorer_path = os.path.join(SHARED, "scorer", "pruned_lm.scorer")
    scorer = Scorer(0.75, 1.85, scorer_path, alphabet)
    data = utterances(alphabet)
    frames = [len(u) for u in data]
    print(
        f"{len(data)} utterances, {min(frames)}-{max(frames)} frames, scorer {os.path.basename(scorer_path)}, "
        f"alpha 0.75 beta 1.85, {args.processes} process(es)"
    )

    from pyctcdecode import build_ctcdecoder

    vocab = open(os.path.join(SHARED, "scorer", "vocab.pruned.txt"), encoding="utf-8").read().split()
    reference = build_ctcdecoder(
        list(alphabet.labels) + [""], kenlm_model_path=scorer_path, unigrams=vocab, alpha=0.75, beta=1.85
    )
    logs = [np.log(np.maximum(u, 1e-30)).astype(np.float32) for u in data]
    reference.decode(logs[0], beam_width=10)  # load and warm up outside the timing

    print(f"{'beam':>5} {'dstrain utt/s':>14} {'s for 40':>9} {'pyctcdecode utt/s':>18} {'s for 40':>9} {'ratio':>6}")
    for beam in (int(b) for b in args.beams.split(",")):
        ctc_beam_search_decoder(data[0], alphabet, beam, scorer=scorer)  # warm the LM cache path as pyctcdecode's
        start = time.perf_counter()
        if args.processes > 1:
            batch = np.zeros((len(data), max(frames), len(alphabet) + 1))
            for i, u in enumerate(data):
                batch[i, : len(u)] = u
            ctc_beam_search_decoder_batch(batch, frames, alphabet, beam, args.processes, scorer=scorer)
        else:
            for u in data:
                ctc_beam_search_decoder(u, alphabet, beam, scorer=scorer)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        for log_probs in logs:
            reference.decode(log_probs, beam_width=beam)
        theirs = time.perf_counter() - start
        print(
            f"{beam:>5} {len(data) / ours:>14.1f} {ours:>9.2f} {len(data) / theirs:>18.1f} {theirs:>9.2f} "
            f"{theirs / ours:>5.1f}x"
        )


if __name__ == "__main__":
    main()
