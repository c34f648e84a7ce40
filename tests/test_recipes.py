"""The synthetic Common Voice recipe end to end at a reduced size (RESULTS.md's table comes from its full size)."""

import json
import os
import re
import subprocess

import pytest
from conftest import REPO, SHARED, records

from dstrain.alphabet import Alphabet
from dstrain.decoder.scorer_package import read_scorer_package, vocabulary
from dstrain.evaluate import out_of_vocabulary
from dstrain.metrics import error_rates
from dstrain.store import FeatureStore

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
@pytest.mark.skipif(
    not (SHARED / "tools" / "synth_cv_corpus.py").exists(), reason="needs ../shared/tools/synth_cv_corpus.py"
)
def test_synthetic_common_voice_recipe_end_to_end(tmp_path):
    work = tmp_path / "cv"
    env = dict(os.environ, CLIPS="80", TRAIN_SECONDS="60", TRIALS="4", SHARED=str(SHARED))
    proc = subprocess.run(
        [str(REPO / "recipes" / "synth_cv.sh"), str(work)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    run = work / "run-seed4568"
    for name in ("greedy_dev", "greedy_test", "scorer_dev", "scorer_test"):
        split = name.split("_")[1]
        m = re.search(r"WER: ([\d.]+), CER: ([\d.]+), loss: ([\d.]+), (\d+) samples", (run / f"{name}.txt").read_text())
        samples = json.load(open(run / f"{name}.json", encoding="utf-8"))
        # Every utterance of the held-out voice scored once, and the printed corpus rates are the samples' pooled ones.
        assert int(m[4]) == len(samples) == FeatureStore.open(str(work / "stores" / split)).manifest.utterances > 0
        wer, cer = error_rates([(s["src"], s["res"]) for s in samples])
        assert float(m[1]) == pytest.approx(wer, abs=1e-6) and float(m[2]) == pytest.approx(cer, abs=1e-6), name
    # It learned: the training loss fell from the first epoch to the last.
    epochs = records(run, "epoch")
    assert len(epochs) >= 2 and epochs[-1]["loss"] < epochs[0]["loss"], [e["loss"] for e in epochs]
    # The stop after TRAIN_SECONDS went through the preemption path: a checkpoint, then exit 75 on both ranks.
    (stop,) = records(run, "stop")
    assert stop["signal"] == "SIGUSR1" and stop["exit_code"] == 75 and stop["checkpoint"]
    assert "Best params: lm_alpha=" in (run / "lm_optimize.txt").read_text()
    assert (run / "report" / "index.html").exists()
    # The recipe's training: two augmented copies of every training utterance, evaluated on the moving average.
    aug = FeatureStore.open(str(work / "stores" / "train-aug")).manifest
    originals = FeatureStore.open(str(work / "stores" / "train")).manifest.utterances
    assert aug.utterances - aug.augmented_utterances == originals and 0 < aug.augmented_utterances <= 2 * originals
    assert {e["weights"] for e in records(run, "eval")} == {"ema"}
    # The scorer's n-grams hold no sentence that dev or the test voice reads (the corpus tool reads a pool line's
    # first 12 words), and its vocabulary covers both sets' words.
    held = set((work / "eval_sentences.txt").read_text().splitlines())
    lm_lines = (work / "lm.txt").read_text().splitlines()
    assert held and lm_lines and not {" ".join(line.split()[:12]) for line in lm_lines} & held
    labels = Alphabet.from_file(str(REPO / "dstrain" / "data" / "alphabet.txt")).labels
    vocab = vocabulary(read_scorer_package(str(work / "lm" / "synth.scorer")), labels)
    for split in ("dev", "test"):
        references = [s["src"] for s in json.load(open(run / f"scorer_{split}.json", encoding="utf-8"))]
        assert out_of_vocabulary(references, vocab)["oov_rate"] <= 0.02, split
