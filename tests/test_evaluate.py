import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_says, synthetic_store, tool
from test_decoder import SCORER, needs_scorer, spell

from dstrain.alphabet import Alphabet
from dstrain.decoder.config import DecoderConfig
from dstrain.distributed import World
from dstrain.evaluate import (
    EvalConfig,
    EvaluationSetConfig,
    LmOptimizeConfig,
    Posteriors,
    decode_all,
    optimize_lm,
    out_of_vocabulary,
    report_test_set,
    sample_report,
    summarize,
)
from dstrain.metrics import error_rates


def test_numbers_checked_by_hand():
    post = Posteriors(["u1", "u2"], ["a b c", "d e"], [np.zeros((1, 1))] * 2, [2.0, 4.0])
    samples = sample_report(post, ["a x c", "d e f"])
    # words: 1 substitution of 3, 1 insertion over 2 -> 2 / 5; chars: "b"->"x" 1, " f" inserted 2 -> 3 / 8.
    summary = summarize(samples, report_count=1)
    assert summary["wer"] == pytest.approx(2 / 5) and summary["cer"] == pytest.approx(3 / 8)
    assert summary["loss"] == 3.0 and summary["samples"] == 2
    assert [s["wer"] for s in samples] == pytest.approx([1 / 3, 1 / 2])
    assert summary["best"][0]["wav_filename"] == "u1" and summary["worst"][0]["wav_filename"] == "u2"


def test_config_needs_one_model_source():
    with pytest.raises(ValueError, match="exactly one"):
        EvalConfig(test=EvaluationSetConfig(test_files=("s",)))
    with pytest.raises(ValueError, match="beam_width"):
        DecoderConfig(beam_width=0)


@needs_scorer
def test_lm_optimize_finds_parameters_that_reproduce_its_wer(monkeypatch, alphabet_path):
    import dstrain.evaluate as ev

    alphabet = Alphabet.from_file(alphabet_path)
    refs = ["the man had a dark suit", "she had your dark suit", "the men had far"]
    confused = [
        spell("the man had a dark suit", alphabet, {5: {"q": 0.5, "a": 0.4}}),
        spell("she had your dark suit", alphabet),
        spell("the men had far", alphabet, {5: {"a": 0.45, "e": 0.4}}),
    ]
    post = Posteriors(["1", "2", "3"], refs, confused, [0.0] * 3)
    monkeypatch.setattr(ev, "eval_posteriors", lambda cfg, world: (alphabet, post))
    cfg = LmOptimizeConfig(
        test=EvaluationSetConfig(test_files=("x",)),
        model="m",
        decoder=DecoderConfig(beam_width=32, scorer_path=str(SCORER)),
        n_trials=15,
        lm_alpha_max=3,
        lm_beta_max=3,
    )
    alpha, beta, wer = optimize_lm(cfg, World())
    scorer = cfg.decoder.scorer(alphabet)
    scorer.reset_params(alpha, beta)
    assert error_rates(list(zip(refs, decode_all(post, alphabet, cfg.decoder, scorer))))[0] == wer
    scorer.reset_params(0.75, 1.85)
    assert wer <= error_rates(list(zip(refs, decode_all(post, alphabet, cfg.decoder, scorer))))[0]


@needs_scorer
@pytest.mark.slow
def test_evaluate_checkpoint_export_and_two_ranks_agree(tmp_path, ldc93s1_csv, alphabet_path):
    from dstrain.prep.pipeline import PreprocessConfig, preprocess

    rows = open(ldc93s1_csv).read().splitlines()
    (tmp_path / "three.csv").write_text("\n".join([rows[0]] + [rows[1]] * 3) + "\n")
    store = str(tmp_path / "store")
    preprocess(
        PreprocessConfig(csv_files=(str(tmp_path / "three.csv"),), alphabet_path=alphabet_path, output=store),
        progress=False,
    )
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    subprocess.run(
        [
            tool("dstrain"),
            "train",
            "--train_files",
            store,
            "--dev_files",
            store,
            "--alphabet_config_path",
            alphabet_path,
            "--n_hidden",
            "16",
            "--epochs",
            "3",
            "--checkpoint_dir",
            str(tmp_path / "ckpt"),
            "--export_dir",
            str(tmp_path / "export"),
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    common = ["--test_files", store, "--beam_width", "20", "--scorer_path", str(SCORER), "--report_count", "1"]

    def run(prefix: list[str], source: list[str], out: str) -> tuple[dict, list[dict]]:
        """The summary (--summary_file) and the per-sample results (--test_output_file) of one evaluation."""
        summary, per_sample = tmp_path / f"{out}.summary.json", tmp_path / f"{out}.json"
        proc = subprocess.run(
            prefix
            + [tool("dstrain"), "evaluate", *source, *common]
            + ["--test_output_file", str(per_sample), "--summary_file", str(summary)],
            capture_output=True,
            text=True,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(summary.read_text()), json.loads(per_sample.read_text())

    ckpt, per_sample = run([], ["--checkpoint_dir", str(tmp_path / "ckpt")], "a")
    export, _ = run([], ["--model", str(tmp_path / "export")], "b")
    ranks, per_sample2 = run(
        [tool("horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo"],
        ["--checkpoint_dir", str(tmp_path / "ckpt")],
        "c",
    )
    assert ckpt["samples"] == export["samples"] == ranks["samples"] == 3 and len(per_sample) == len(per_sample2) == 3
    assert ckpt["loss"] == pytest.approx(export["loss"], rel=1e-4) == pytest.approx(ranks["loss"], rel=1e-4)
    assert ckpt["wer"] == ranks["wer"] and ckpt["cer"] == ranks["cer"]
    # The corpus figures are the per-sample edit counts pooled, not the mean of per-sample rates.
    wer, cer = error_rates([(s["src"], s["res"]) for s in per_sample])
    assert ckpt["wer"] == pytest.approx(wer, abs=1e-6) and ckpt["cer"] == pytest.approx(cer, abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_stops_evaluate_within_seconds(tmp_path, alphabet_path):
    """A scancel or pod deletion during dstrain evaluate: it leaves within 10 s, says so in one line, status 128+15."""
    import signal
    import time

    store = synthetic_store(tmp_path / "s", 64, frames=(150, 250), seed=2)
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    subprocess.run(
        [
            tool("dstrain"),
            "train",
            "--train_files",
            store,
            "--alphabet_config_path",
            alphabet_path,
            "--n_hidden",
            "16",
            "--epochs",
            "1",
            "--train_batch_size",
            "8",
            "--checkpoint_dir",
            str(tmp_path / "ckpt"),
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=200,
    )
    # A wide beam over 64 utterances: decoding takes far longer than the 10 s allowed to stop.
    proc = subprocess.Popen(
        [
            tool("dstrain"),
            "evaluate",
            "--checkpoint_dir",
            str(tmp_path / "ckpt"),
            "--test_files",
            store,
            "--beam_width",
            "2000",
            "--summary_file",
            str(tmp_path / "summary.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    # Evaluation writes no record or file before its end: its log line is the only sign that decoding has begun.
    for line in proc.stderr:
        if "decoding 64 samples" in line:
            break
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    status = proc.wait(timeout=60)
    took = time.monotonic() - signalled
    assert status == 128 + signal.SIGTERM and took < 10, (status, took, err[-2000:])
    assert_says(err, lacks=("Traceback",), last_line="dstrain evaluate: stopped by SIGTERM")
    assert_says(proc.stdout.read(), lacks=("WER",))
    assert not (tmp_path / "summary.json").exists(), "a stopped evaluation wrote a summary"


def test_out_of_vocabulary_counts_running_and_distinct_words():
    oov = out_of_vocabulary(["a b c", "a d d d"], {"a", "b"}, top=2)
    assert (oov["words"], oov["oov_words"], oov["distinct"], oov["distinct_oov"]) == (7, 4, 4, 2)
    assert oov["oov_rate"] == pytest.approx(4 / 7) and oov["distinct_oov_rate"] == 0.5
    assert oov["most_frequent"] == [["d", 3], ["c", 1]]


@needs_scorer
def test_a_test_set_decoded_with_a_scorer_reports_the_words_it_cannot_output(alphabet_path, capsys):
    alphabet = Alphabet.from_file(alphabet_path)
    refs = ["she had your dark suit", "the zqxjv had a suit"]
    post = Posteriors(["1", "2"], refs, [spell(r, alphabet) for r in refs], [0.0, 0.0])
    dec = DecoderConfig(beam_width=16, scorer_path=str(SCORER))
    summary = report_test_set(post, alphabet, EvaluationSetConfig(test_files=("x",)), dec, World())
    assert summary["oov"]["most_frequent"] == [["zqxjv", 1]] and summary["oov"]["oov_words"] == 1
    assert "zqxjv" not in dec.scorer(alphabet).vocabulary() and "suit" in dec.scorer(alphabet).vocabulary()
    said = "Scorer vocabulary: 1 of 10 reference words (10.0 %), 1 of 8 distinct (12.5 %)"
    assert_says(capsys.readouterr().out, said)
