"""``dstrain shards info``: what stores hold, and whether their shards are intact."""

from __future__ import annotations

from dataclasses import dataclass

from dstrain.config import option
from dstrain.store.store import FeatureStore


@dataclass(frozen=True)
class ShardsInfoConfig:
    """dstrain shards info: totals per store; verifies every shard's sha256"""

    stores: tuple[str, ...] = option(positional=True, nargs="+")
    """Store path(s) or URL(s)."""
    no_verify: bool = False
    """Skip reading the shards to check their checksums (sizes are still checked)."""


def run_info(cfg: ShardsInfoConfig) -> int:
    """Exit status 1 when a shard is missing, truncated or differs from its checksum."""
    bad = 0
    for url in cfg.stores:
        store = FeatureStore.open(url)
        m, fc = store.manifest, store.features
        print(url)
        print(
            f"  utterances {m.utterances}, hours {m.hours:.3f}, shards {len(m.shards)}, "
            f"bytes {sum(s.bytes for s in m.shards)}, frames {sum(s.frames for s in m.shards)}"
        )
        print(
            f"  features: {m.stored} {m.feature_dtype}, {fc.n_mel} mel -> {fc.n_mfcc} MFCC, "
            f"{fc.sample_rate} Hz, window {fc.window_ms} ms, step {fc.step_ms} ms"
        )
        print(f"  alphabet: {len(m.alphabet)} labels, sha256 {m.alphabet_sha256[:16]}…")
        rejects = m.rejects.get("by_reason", {})
        print(
            f"  rejected at preprocessing: {m.rejects.get('count', 0)}"
            + "".join(f", {n} {r}" for r, n in rejects.items())
        )
        if m.augmentation:
            a = m.augmentation
            print(
                f"  augmented copies: {m.augmented_utterances} ({a['copies_per_utterance']} per utterance, seed "
                f"{a['seed']}, {' '.join(a['specs'])}); ops applied: "
                + ", ".join(f"{n} {op}" for op, n in a["applied"].items())
                + f"; copies rejected: {a['rejects']['count']}"
            )
        problems = store.verify(checksums=not cfg.no_verify)
        bad += len(problems)
        what = "sizes" if cfg.no_verify else "checksums"
        print(f"  {what}: " + ("all shards OK" if not problems else f"{len(problems)} problem(s)"))
        for p in problems:
            print(f"    {p}")
    return 1 if bad else 0
