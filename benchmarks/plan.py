"""Epoch planning cost and batch shapes: fixed ``--train_batch_size`` against duration batches (``--batch_frames``),
on one core, for a corpus of ``--samples`` utterances at world sizes 8 and 512.

The corpus is synthetic frame counts only (no audio, no store): row groups of 200-300 rows, lengths drawn from a
log-normal of median ~4 s at 20 ms frames, clipped to 0.5-20 s (25-1000 frames), the shape of read-speech corpora.
For each world size it times one rank's :func:`plan_epoch` (what each rank computes at every epoch start; best of
``--repeat`` runs, since other work on the machine only ever slows a run down) and a re-partitioned
:func:`resume_plan` (a duration-batched epoch stopped half-way at that world size, resumed at 8 ranks: it recomputes
every rank's batches of the stopped segment; at 4 ranks when it ran at 8). Fixed batches use the largest batch whose
worst case fits the same memory (``batch_frames // longest``), so "steps" compares how many steps an epoch takes at
equal peak memory.
Target: a 1M-sample corpus plans in seconds on one core at world 512.

    .venv/bin/python benchmarks/plan.py [--samples 1000000] [--batch_frames 32000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dstrain.loader.sampler import (  # noqa: E402
    PlanSpec,
    RowGroupTable,
    describe,
    make_row_groups,
    plan_epoch,
    resume_plan,
)


def corpus(samples: int, seed: int = 0) -> RowGroupTable:
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < samples:
        sizes.append(int(rng.integers(200, 301)))
    sizes[-1] -= sum(sizes) - samples
    frames = np.clip(np.exp(rng.normal(np.log(200), 0.6, size=samples)), 25, 1000).astype(np.int64)
    cuts = np.cumsum(sizes)[:-1]
    return RowGroupTable(make_row_groups(np.split(frames, cuts)))


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1_000_000, help="utterances in the corpus")
    p.add_argument("--batch_frames", type=int, default=32000, help="frames of padded batch per rank")
    p.add_argument("--window_row_groups", type=int, default=8, help="row groups per shuffle window")
    p.add_argument("--repeat", type=int, default=3, help="runs per timing (the best counts)")
    args = p.parse_args()
    table = corpus(args.samples)
    longest = int(table.n_frames.max())
    fixed = PlanSpec(batch_size=max(1, args.batch_frames // longest), window_row_groups=args.window_row_groups)
    frames = PlanSpec(batch_size=0, batch_frames=args.batch_frames, window_row_groups=args.window_row_groups)
    print(
        f"{table.n_samples} samples in {table.n_row_groups} row groups, {int(table.n_frames.min())}-{longest} frames "
        f"(mean {table.n_frames.mean():.0f}); fixed batch {fixed.batch_size} (= {args.batch_frames} // {longest}) "
        f"vs --batch_frames {args.batch_frames}; best of {args.repeat}"
    )
    print(
        f"{'world':>5} {'batches':>13} {'plan s':>7} {'steps':>6} {'mean batch':>10} {'padding':>8} {'fill':>6} "
        f"{'resume s':>9}"
    )
    for world in (8, 512):
        rows = {}
        for name, spec in (("fixed", fixed), ("batch_frames", frames)):
            seconds, plan = best(
                lambda: plan_epoch(table, spec, rank=world - 1, world=world, epoch=1, seed=0), args.repeat
            )
            pos = plan.position_after(plan.steps // 2)
            resume_s, _ = best(lambda: resume_plan(pos, table, spec, rank=0, world=8 if world != 8 else 4), args.repeat)
            d = describe(plan)
            fill = float(plan.batch_frames_used.mean()) / args.batch_frames
            rows[name] = (seconds, plan.steps)
            print(
                f"{world:>5} {name:>13} {seconds:>7.2f} {plan.steps:>6} {d['mean_batch_size']:>10.1f} "
                f"{d['padding_fraction']:>8.3f} {fill:>6.2f} {resume_s:>9.2f}"
            )
        (tf, sf), (td, sd) = rows["fixed"], rows["batch_frames"]
        print(f"{world:>5} {'ratio':>13} {td / tf:>6.2f}x {sd / sf:>5.2f}x  (duration / fixed: planning time, steps)")


if __name__ == "__main__":
    main()
