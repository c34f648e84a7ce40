"""Evaluation, the one implementation behind training's dev and test phases, ``dstrain evaluate`` and
``dstrain lm-optimize``: posteriors of a model over feature stores, CTC loss, beam search with an optional
scorer, WER/CER.

WER and CER are corpus-level, as DeepSpeech reports them: edit distance summed over samples divided by the summed
reference length. Samples are dealt out over the ranks of the :class:`~dstrain.distributed.World` and gathered.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import numpy as np
import tensorflow as tf

from dstrain.alphabet import Alphabet, greedy_decode
from dstrain.config import option, parse_list
from dstrain.decoder.config import DecoderConfig
from dstrain.decoder.scorer import Scorer
from dstrain.distributed import World
from dstrain.inference import load_model
from dstrain.loader.builder import EvalInput
from dstrain.loader.config import LoaderConfig
from dstrain.metrics import edit_distance, error_rates
from dstrain.model import ctc_loss
from dstrain.rundir import LoadEvaluateConfig

log = logging.getLogger("dstrain.evaluate")

LogitsFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
"""(MFCC [B,T,F], lengths [B]) -> logits or log-probabilities [B,T,C], blank last (CTC's loss is the same for both)."""


@dataclass(frozen=True)
class EvaluationSetConfig:
    """Test set"""

    test_files: tuple[str, ...] = option((), parse=parse_list)
    """Test feature store(s), comma-separated: WER/CER after training, or what dstrain evaluate scores."""
    test_batch_size: int = 8
    """Utterances per evaluation step on each worker."""
    reverse_test: bool = False
    """Test batches longest first instead of shortest first (DeepSpeech's --reverse_test; the order of
    --test_output_file follows it)."""
    report_count: int = 5
    """Best, median and worst samples to print."""
    test_output_file: str = ""
    """Per-sample results as JSON (rank 0 writes)."""

    def __post_init__(self) -> None:
        if self.test_batch_size < 1:
            raise ValueError(f"test_batch_size must be >= 1, got {self.test_batch_size}")


@dataclass(frozen=True)
class EvalConfig:
    """dstrain evaluate: WER/CER of a checkpoint or an export on test stores"""

    checkpoint_dir: str = ""
    """A training run: the checkpoint --load_evaluate names (auto: its best-dev, else the latest)."""
    model: str = ""
    """An export folder or a .tflite file (instead of --checkpoint_dir)."""
    test: EvaluationSetConfig = field(default_factory=EvaluationSetConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    evaluate: LoadEvaluateConfig = field(default_factory=LoadEvaluateConfig)
    summary_file: str = ""
    """What the run printed last, as JSON (rank 0 writes): dstrain evaluate's summary (wer, cer, loss, samples, the
    best/median/worst samples, oov with a scorer); lm-optimize's best lm_alpha, lm_beta and their wer."""

    def __post_init__(self) -> None:
        if not self.test.test_files:
            raise ValueError("test_files: give at least one feature store (--test_files)")
        if bool(self.checkpoint_dir) == bool(self.model):
            raise ValueError("give exactly one of --checkpoint_dir and --model")


@dataclass(frozen=True)
class LmOptimizeConfig(EvalConfig):
    """dstrain lm-optimize: search lm_alpha/lm_beta on a dev set with optuna"""

    n_trials: int = 2400
    """Trials of optuna's TPE sampler (DeepSpeech's lm_optimizer.py default)."""
    lm_alpha_max: float = 5.0
    """Upper end of the lm_alpha search range."""
    lm_beta_max: float = 5.0
    """Upper end of the lm_beta search range."""


@dataclass
class Posteriors:
    """What the acoustic model said about each sample of this rank; decoding runs on these (again, for lm-optimize)."""

    ids: list[str]
    references: list[str]
    probs: list[np.ndarray]
    losses: list[float]


def posteriors(data: EvalInput, logits_fn: LogitsFn, alphabet: Alphabet) -> Posteriors:
    """What the model says about this rank's share of ``data``."""
    out = Posteriors([], [], [], [])
    for ids, (x, x_len, y, y_len) in data.batches():
        logits = logits_fn(tf.constant(x), tf.constant(x_len))
        losses = ctc_loss(logits, tf.constant(x_len), tf.constant(y), tf.constant(y_len)).numpy()
        probs = tf.nn.softmax(tf.cast(logits, tf.float32)).numpy()
        for b, uid in enumerate(ids):
            out.ids.append(uid)
            out.probs.append(probs[b, : x_len[b]].astype(np.float64))
            out.references.append(alphabet.decode(y[b, : y_len[b]]))
            out.losses.append(float(losses[b]))
    return out


def greedy_error_counts(post: Posteriors, alphabet: Alphabet) -> np.ndarray:
    """(word edits, words, char edits, chars) of greedy decoding: summed over ranks, they give corpus WER/CER."""
    counts = np.zeros(4)
    for p, ref in zip(post.probs, post.references):
        hyp = greedy_decode(np.argmax(p, axis=1), alphabet)
        counts += (edit_distance(ref.split(), hyp.split()), len(ref.split()), edit_distance(ref, hyp), len(ref))
    return counts


def global_loss(post: Posteriors, world: World) -> tuple[float, int]:
    """Mean loss over every rank's samples (ranks hold different numbers of them: sum, then divide)."""
    total, count = world.allreduce([sum(post.losses), len(post.losses)])
    return float(total / max(count, 1.0)), int(count)


def decode_all(post: Posteriors, alphabet: Alphabet, dec: DecoderConfig, scorer: Scorer | None) -> list[str]:
    return [dec.decode(p, alphabet, scorer) for p in post.probs]


def sample_report(post: Posteriors, hypotheses: list[str]) -> list[dict]:
    samples = []
    for uid, ref, hyp, loss in zip(post.ids, post.references, hypotheses, post.losses):
        words = max(len(ref.split()), 1)
        samples.append(
            {
                "wav_filename": uid,
                "src": ref,
                "res": hyp,
                "loss": loss,
                "wer": edit_distance(ref.split(), hyp.split()) / words,
                "cer": edit_distance(ref, hyp) / max(len(ref), 1),
            }
        )
    return samples


def summarize(samples: list[dict], report_count: int) -> dict:
    wer, cer = error_rates([(s["src"], s["res"]) for s in samples])
    ranked = sorted(samples, key=lambda s: (s["wer"], s["loss"]))
    mid = len(ranked) // 2
    half = report_count // 2
    return {
        "wer": wer,
        "cer": cer,
        "loss": float(np.mean([s["loss"] for s in samples])) if samples else float("nan"),
        "samples": len(samples),
        "best": ranked[:report_count],
        "median": ranked[max(0, mid - half) : max(0, mid - half) + report_count],
        "worst": ranked[::-1][:report_count],
    }


def out_of_vocabulary(references: Sequence[str], vocabulary: Collection[str], top: int = 10) -> dict:
    """The reference words a scorer's vocabulary lacks (a decode with the scorer can never output them): running and
    distinct counts, their rates, and the ``top`` most frequent with their counts."""
    running = [w for ref in references for w in ref.split()]
    missing = Counter(w for w in running if w not in vocabulary)
    distinct = len(set(running))
    return {
        "words": len(running),
        "oov_words": sum(missing.values()),
        "oov_rate": sum(missing.values()) / max(len(running), 1),
        "distinct": distinct,
        "distinct_oov": len(missing),
        "distinct_oov_rate": len(missing) / max(distinct, 1),
        "most_frequent": [[w, n] for w, n in missing.most_common(top)],
    }


def format_oov(oov: dict) -> str:
    """One line a person reads beside the WER: how much of the references the scorer cannot spell."""
    words = ", ".join(f"{w} ({n})" for w, n in oov["most_frequent"]) or "none"
    return (
        f"Scorer vocabulary: {oov['oov_words']} of {oov['words']} reference words ({100 * oov['oov_rate']:.1f} %), "
        f"{oov['distinct_oov']} of {oov['distinct']} distinct ({100 * oov['distinct_oov_rate']:.1f} %), are not in it "
        f"and cannot be decoded with it; most frequent: {words}"
    )


def print_report(name: str, summary: dict) -> None:
    print(
        f"Test on {name} - WER: {summary['wer']:.6f}, CER: {summary['cer']:.6f}, loss: {summary['loss']:.6f}, "
        f"{summary['samples']} samples"
    )
    if "oov" in summary:
        print(format_oov(summary["oov"]))
    for title in ("best", "median", "worst"):
        print("-" * 80 + f"\n{title.capitalize()} WER:")
        for s in summary[title]:
            print(
                f"WER: {s['wer']:.6f}, CER: {s['cer']:.6f}, loss: {s['loss']:.6f}\n"
                f" - src: \"{s['src']}\"\n - res: \"{s['res']}\""
            )


def report_test_set(
    post: Posteriors, alphabet: Alphabet, test: EvaluationSetConfig, dec: DecoderConfig, world: World
) -> dict | None:
    """Decode this rank's samples, gather all ranks', report and write on rank 0 (which returns the summary)."""
    log.info(
        "decoding %d samples (beam width %d%s)", len(post.probs), dec.width(), ", scorer" if dec.scorer_path else ""
    )
    scorer = dec.scorer(alphabet)
    samples = sample_report(post, decode_all(post, alphabet, dec, scorer))
    gathered = world.allgather_object(samples)
    if not world.is_root:
        return None
    every = [s for part in gathered for s in part]
    summary = summarize(every, test.report_count)
    if scorer is not None:
        summary["oov"] = out_of_vocabulary([s["src"] for s in every], scorer.vocabulary())
    print_report(",".join(test.test_files), summary)
    if test.test_output_file:
        with open(test.test_output_file, "w", encoding="utf-8") as f:
            json.dump(every, f, indent=2, ensure_ascii=False)
    return summary


def eval_posteriors(cfg: EvalConfig, world: World) -> tuple[Alphabet, Posteriors]:
    """The model of ``--model`` or ``--checkpoint_dir`` on this rank's share of the test stores."""
    source = cfg.model or cfg.checkpoint_dir
    model = load_model(source, which=cfg.evaluate.load_evaluate)
    data = EvalInput.build(
        cfg.test.test_files,
        model.alphabet,
        LoaderConfig(),
        world,
        batch_size=cfg.test.test_batch_size,
        features=model.features,
        reference=f"the model ({source})",
        reverse=cfg.test.reverse_test,
    )
    log.info(
        "evaluating %s (%s) on %d samples, %d on this rank", source, model.kind, data.plan.pool_size, data.plan.samples
    )
    return model.alphabet, posteriors(data, model.batch_log_probs, model.alphabet)


def evaluate(cfg: EvalConfig, world: World) -> dict | None:
    """Runs on every rank (or alone); rank 0 returns the summary, others None."""
    alphabet, post = eval_posteriors(cfg, world)
    return report_test_set(post, alphabet, cfg.test, cfg.decoder, world)


def optimize_lm(cfg: LmOptimizeConfig, world: World, seed: int = 0) -> tuple[float, float, float]:
    """Alpha/beta search on ``test_files`` (a dev set) with optuna's TPE, as DeepSpeech's lm_optimizer.py.
    The acoustic model runs once; every trial re-decodes its posteriors. Returns (alpha, beta, WER)."""
    import optuna

    if not cfg.decoder.scorer_path:
        raise ValueError("lm-optimize needs --scorer_path")
    alphabet, post = eval_posteriors(cfg, world)
    scorer = cfg.decoder.scorer(alphabet)
    assert scorer is not None
    references = [r for part in world.allgather_object(post.references) for r in part]
    if world.is_root:
        print(format_oov(out_of_vocabulary(references, scorer.vocabulary())))

    def objective(trial: "optuna.Trial") -> float:
        scorer.reset_params(
            trial.suggest_float("lm_alpha", 0.0, cfg.lm_alpha_max), trial.suggest_float("lm_beta", 0.0, cfg.lm_beta_max)
        )
        hyps = decode_all(post, alphabet, cfg.decoder, scorer)
        return error_rates(list(zip(post.references, hyps)))[0]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=cfg.n_trials)
    return study.best_params["lm_alpha"], study.best_params["lm_beta"], study.best_value


def run_evaluate(cfg: EvalConfig) -> int:
    """``dstrain evaluate``: every rank of a launch (or one process) takes part."""
    from dstrain.distributed import start_horovod

    write_summary(cfg.summary_file, evaluate(cfg, start_horovod()))
    return 0


def write_summary(path: str, summary: dict | None) -> None:
    """``--summary_file``: the summary rank 0 printed, as JSON (other ranks have none to write)."""
    if path and summary is not None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
            f.write("\n")


def run_lm_optimize(cfg: LmOptimizeConfig) -> int:
    """``dstrain lm-optimize`` (one process: the trials re-decode the same posteriors)."""
    alpha, beta, wer = optimize_lm(cfg, World())
    print(f"Best params: lm_alpha={alpha:.6f} and lm_beta={beta:.6f} with WER={wer:.6f}")
    write_summary(cfg.summary_file, {"lm_alpha": alpha, "lm_beta": beta, "wer": wer})
    return 0
