"""Evaluation: posteriors from a checkpoint or an export, beam search with an optional scorer, WER/CER.

WER and CER are corpus-level, as DeepSpeech reports them: edit distance summed over samples divided by the summed
reference length. Samples are dealt out over Horovod ranks and gathered to rank 0, which reports and writes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from dstrain.alphabet import Alphabet
from dstrain.data import epoch_plan, make_dataset, shard_refs
from dstrain.decoder.ctc import ctc_beam_search_decoder
from dstrain.decoder.scorer import Scorer
from dstrain.features import FeatureConfig
from dstrain.metrics import edit_distance, error_rates
from dstrain.model import ctc_loss
from dstrain.store import check_compatible, read_manifest


@dataclass(frozen=True)
class DecoderConfig:
    beam_width: int = 1024
    """Beam width (--beam_width, DeepSpeech's default 1024)."""
    scorer_path: str = ""
    """DeepSpeech .scorer package (--scorer_path); empty decodes without a language model."""
    lm_alpha: float | None = None
    """Language model weight (--lm_alpha); None takes the package's default."""
    lm_beta: float | None = None
    """Word insertion bonus (--lm_beta); None takes the package's default."""
    cutoff_prob: float = 1.0
    cutoff_top_n: int = 300

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")

    def scorer(self, alphabet: Alphabet) -> Scorer | None:
        return Scorer(self.lm_alpha, self.lm_beta, self.scorer_path, alphabet) if self.scorer_path else None


@dataclass(frozen=True)
class EvalConfig:
    test_files: tuple[str, ...]
    checkpoint_dir: str = ""
    """Evaluate the best-dev (else latest) checkpoint of a training run ..."""
    model: str = ""
    """... or an export directory."""
    test_batch_size: int = 8
    report_count: int = 5
    test_output_file: str = ""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        if not self.test_files:
            raise ValueError("test_files: give at least one feature store (--test_files)")
        if bool(self.checkpoint_dir) == bool(self.model):
            raise ValueError("give exactly one of --checkpoint_dir and --model")


@dataclass
class Posteriors:
    """What the acoustic model said about each sample; decoding runs on these (again, for lm-optimize)."""

    ids: list[str]
    references: list[str]
    probs: list[np.ndarray]
    losses: list[float]


def load_probs_fn(cfg: EvalConfig):
    """(alphabet, features, fn(mfcc [B,T,F], lengths [B]) -> probs [B,T,C])."""
    if cfg.model:
        from dstrain.export import load_model

        loaded = load_model(cfg.model)
        return loaded.alphabet, loaded.features, lambda x, n: loaded.module.probs(x, n)["probs"]
    from dstrain.model import DeepSpeech, ModelConfig

    path = os.path.join(cfg.checkpoint_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{cfg.checkpoint_dir}: no config.json; not a dstrain checkpoint directory")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    alphabet = Alphabet.from_file(saved["train"]["alphabet_config_path"])
    features = FeatureConfig(**saved["features"])
    model = DeepSpeech(ModelConfig(**saved["train"]["model"]), features.n_mfcc, len(alphabet) + 1)
    model((tf.zeros([1, 1, features.n_mfcc]), tf.ones([1], tf.int32)))
    source = tf.train.latest_checkpoint(os.path.join(cfg.checkpoint_dir, "best_dev")) or tf.train.latest_checkpoint(
        os.path.join(cfg.checkpoint_dir, "train")
    )
    if not source:
        raise FileNotFoundError(f"{cfg.checkpoint_dir}: no checkpoint to evaluate")
    tf.train.Checkpoint(model=model).restore(source).expect_partial()
    return alphabet, features, lambda x, n: tf.nn.softmax(model((x, n), training=False))


def posteriors(cfg: EvalConfig, rank: int = 0, world: int = 1):
    """This rank's share of the test samples: posteriors, references and CTC losses."""
    alphabet, features, probs_fn = load_probs_fn(cfg)
    stores = []
    for url in cfg.test_files:
        m = read_manifest(url)
        check_compatible(m, alphabet, url)
        stores.append((url, m))
    refs = shard_refs(stores)
    plan = epoch_plan([r.rows for r in refs], rank, world, 0, 0, shuffle=False, pad=False)
    ids = [f"{refs[s].url}#{row}" for s, row in plan.items]
    out = Posteriors(ids, [], [], [])
    for x, x_len, y, y_len in make_dataset(refs, plan, features, cfg.test_batch_size, world):
        probs = probs_fn(x, x_len)
        # softmax(log p) = p: the CTC loss of the posteriors is the model's loss.
        losses = ctc_loss(tf.math.log(tf.maximum(probs, 1e-30)), x_len, y, y_len).numpy()
        for b in range(probs.shape[0]):
            out.probs.append(probs[b, : x_len[b]].numpy().astype(np.float64))
            out.references.append(alphabet.decode(y[b, : y_len[b]].numpy()))
            out.losses.append(float(losses[b]))
    return alphabet, out


def decode_all(post: Posteriors, alphabet: Alphabet, dec: DecoderConfig, scorer: Scorer | None) -> list[str]:
    return [
        ctc_beam_search_decoder(p, alphabet, dec.beam_width, dec.cutoff_prob, dec.cutoff_top_n, scorer)[0][1]
        for p in post.probs
    ]


def sample_report(post: Posteriors, hypotheses: list[str]) -> list[dict]:
    samples = []
    for uid, ref, hyp, loss in zip(post.ids, post.references, hypotheses, post.losses):
        words = max(len(ref.split()), 1)
        samples.append({
            "wav_filename": uid, "src": ref, "res": hyp, "loss": loss,
            "wer": edit_distance(ref.split(), hyp.split()) / words, "cer": edit_distance(ref, hyp) / max(len(ref), 1),
        })  # fmt: skip
    return samples


def summarize(samples: list[dict], report_count: int) -> dict:
    wer, cer = error_rates([(s["src"], s["res"]) for s in samples])
    ranked = sorted(samples, key=lambda s: (s["wer"], s["loss"]))
    mid = len(ranked) // 2
    half = report_count // 2
    return {
        "wer": wer, "cer": cer, "loss": float(np.mean([s["loss"] for s in samples])) if samples else float("nan"),
        "samples": len(samples), "best": ranked[:report_count],
        "median": ranked[max(0, mid - half) : max(0, mid - half) + report_count], "worst": ranked[::-1][:report_count],
    }  # fmt: skip


def print_report(name: str, summary: dict) -> None:
    print(f"Test on {name} - WER: {summary['wer']:.6f}, CER: {summary['cer']:.6f}, loss: {summary['loss']:.6f}, "
          f"{summary['samples']} samples")  # fmt: skip
    for title in ("best", "median", "worst"):
        print("-" * 80 + f"\n{title.capitalize()} WER:")
        for s in summary[title]:
            print(f"WER: {s['wer']:.6f}, CER: {s['cer']:.6f}, loss: {s['loss']:.6f}\n - src: \"{s['src']}\"\n - res: \"{s['res']}\"")


def evaluate(cfg: EvalConfig) -> dict | None:
    """Runs on every Horovod rank (or alone); rank 0 returns the summary, others None."""
    import horovod.tensorflow as hvd

    hvd.init()  # Horovod: ranks split the samples; decoding is per rank
    rank, world = hvd.rank(), hvd.size()
    alphabet, post = posteriors(cfg, rank, world)
    scorer = cfg.decoder.scorer(alphabet)
    samples = sample_report(post, decode_all(post, alphabet, cfg.decoder, scorer))
    gathered = hvd.allgather_object(samples)  # Horovod: every rank's samples to everyone
    if rank != 0:
        return None
    every = [s for part in gathered for s in part]
    summary = summarize(every, cfg.report_count)
    print_report(",".join(cfg.test_files), summary)
    if cfg.test_output_file:
        with open(cfg.test_output_file, "w", encoding="utf-8") as f:
            json.dump(every, f, indent=2, ensure_ascii=False)
    return summary


def optimize_lm(cfg: EvalConfig, n_trials: int, alpha_max: float, beta_max: float, seed: int = 0) -> tuple[float, float, float]:
    """Alpha/beta search on ``cfg.test_files`` (a dev set) with optuna's TPE, as DeepSpeech's lm_optimizer.py.
    The acoustic model runs once; every trial re-decodes its posteriors. Returns (alpha, beta, WER)."""
    import optuna

    if not cfg.decoder.scorer_path:
        raise ValueError("lm-optimize needs --scorer_path")
    alphabet, post = posteriors(cfg)
    scorer = cfg.decoder.scorer(alphabet)
    assert scorer is not None

    def objective(trial: "optuna.Trial") -> float:
        scorer.reset_params(trial.suggest_float("lm_alpha", 0.0, alpha_max), trial.suggest_float("lm_beta", 0.0, beta_max))
        hyps = decode_all(post, alphabet, cfg.decoder, scorer)
        return error_rates(list(zip(post.references, hyps)))[0]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=n_trials)
    return study.best_params["lm_alpha"], study.best_params["lm_beta"], study.best_value
