import os
import re
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dstrain" / "data"
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).parent  # the venv's bin: dstrain, horovodrun


@pytest.fixture(scope="session")
def alphabet_path() -> str:
    return str(DATA / "alphabet.txt")


@pytest.fixture(scope="session")
def ldc93s1_csv(tmp_path_factory) -> str:
    from dstrain.prep.importers.ldc93s1 import import_ldc93s1

    return import_ldc93s1(str(tmp_path_factory.mktemp("ldc93s1")))


@pytest.fixture(scope="session")
def ldc93s1_store(tmp_path_factory, ldc93s1_csv, alphabet_path) -> str:
    from dstrain.prep.pipeline import PreprocessConfig, preprocess

    out = str(tmp_path_factory.mktemp("store") / "shards")
    preprocess(PreprocessConfig(csv_files=(ldc93s1_csv,), alphabet_path=alphabet_path, output=out), progress=False)
    return out


def run_record(run_dir) -> list[dict]:
    """The run record (RUN/metrics.jsonl) of a training run: what tests read instead of log text."""
    from dstrain.record import read_record
    from dstrain.rundir import RunDir

    return read_record(RunDir(str(run_dir)).metrics_path)


def records(run_dir, event: str) -> list[dict]:
    return [r for r in run_record(run_dir) if r["event"] == event]


def count_records(run_dir, event: str) -> int:
    """How many ``event`` records the run directory holds so far (0 without a run record)."""
    from dstrain.rundir import RunDir

    return len(records(run_dir, event)) if os.path.exists(RunDir(str(run_dir)).metrics_path) else 0


def wait_record(run_dir, event: str, match=lambda r: True, timeout: float = 300, proc=None, since: int = 0) -> dict:
    """The first ``event`` record that ``match`` accepts, past the first ``since`` of them (those of an earlier run
    in the same directory: :func:`count_records` before starting the run), as soon as the run record holds it; fails
    after ``timeout`` seconds, or at once when ``proc`` (the run) has exited without writing it."""
    from cluster import wait_for

    from dstrain.rundir import RunDir

    path = Path(RunDir(str(run_dir)).metrics_path)

    def found():
        hits = [r for r in records(run_dir, event)[since:] if match(r)] if path.exists() else []
        if not hits and proc is not None and proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) without a matching {event} record")
        return hits[0] if hits else None

    return wait_for(found, timeout, f"a matching {event} record in {path}")


def final_digests(run_dir) -> list[str]:
    """Every rank's final weights sha256 (rank order) from the last ``final`` record of the run."""
    finals = records(run_dir, "final")
    assert finals, f"{run_dir}: the run recorded no final event"
    return finals[-1]["weights_sha256"]


def assert_says(
    output: str,
    *phrases: str,
    lacks: tuple[str, ...] = (),
    patterns: tuple[str, ...] = (),
    last_line: str | None = None,
    exactly: str | None = None,
    one_error_line: str | None = None,
) -> None:
    """What a program says to a person (an error line, a usage message, a summary, a warning that names a lost rank)
    or prints as its product (a transcript, a host list): the only place tests check text. Facts about a run (its
    epochs, checkpoints, digests, losses, resets, what a rank did) are read from the run record (:func:`records`)
    and the store/checkpoint APIs instead; ``python tests/log_text_count.py`` counts checks of text made elsewhere.

    ``output`` holds each of ``phrases``, none of ``lacks``, a match of each regex in ``patterns`` (multi-line), ends
    with the line ``last_line`` (trailing blank space aside), is ``exactly`` that, and has exactly one line that
    mentions "error" (any case: one error message, not a traceback), which holds ``one_error_line``; the failure
    shows the output's tail."""
    tail = output[-4000:]
    for phrase in phrases:
        assert phrase in output, f"no {phrase!r} in:\n{tail}"
    for phrase in lacks:
        assert phrase not in output, f"{phrase!r} in:\n{tail}"
    for pattern in patterns:
        assert re.search(pattern, output, re.M), f"no /{pattern}/ in:\n{tail}"
    if last_line is not None:
        lines = output.strip().splitlines()
        assert lines and lines[-1] == last_line, f"the last line is not {last_line!r}:\n{tail}"
    if exactly is not None:
        assert output == exactly, f"not {exactly!r}:\n{tail}"
    if one_error_line is not None:
        errors = [line for line in output.splitlines() if "error" in line.lower()]
        wanted = f"one error line, with {one_error_line!r}"
        assert len(errors) == 1 and one_error_line in errors[0], f"not {wanted}:\n{tail}"


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found next to {sys.executable} nor on PATH: run tools/install.sh")
    return found


def synthetic_store(
    path,
    n: int,
    *,
    row_group_rows: int = 8,
    shard_rows: int = 0,
    feature_dtype: str = "float32",
    frames: tuple[int, int] = (60, 200),
    seed: int = 0,
    alphabet_file: str | None = None,
) -> str:
    """A feature store of ``n`` random utterances written directly (no audio): fast stores of any size for loader
    and training tests. Labels spell short words of the bundled alphabet; ids are ``u000000``...; shards of
    ``shard_rows`` rows (0: one shard)."""
    import numpy as np

    from dstrain.alphabet import Alphabet
    from dstrain.features import FeatureConfig
    from dstrain.store import Manifest, ShardWriter, StoreLayout
    from dstrain.store.layout import MANIFEST
    from dstrain.store.stats import FeatureStats

    alphabet = Alphabet.from_file(alphabet_file or str(DATA / "alphabet.txt"))
    rng = np.random.default_rng(seed)
    layout = StoreLayout(str(path))
    layout.makedirs()
    fc = FeatureConfig()
    words = ["she", "had", "your", "dark", "suit", "in", "greasy", "wash", "water", "all", "year"]
    shards, stats = [], FeatureStats.empty(fc.n_mel)
    per_shard = shard_rows or n
    for s, start in enumerate(range(0, n, per_shard)):
        with ShardWriter(
            layout, lambda part, s=s: f"shard-{s:06d}-{part:03d}.parquet", 1e6, feature_dtype, row_group_rows
        ) as w:
            for i in range(start, min(n, start + per_shard)):
                t = int(rng.integers(*frames))
                text = " ".join(rng.choice(words, size=int(rng.integers(1, 4))))
                x = (rng.standard_normal((t, fc.n_mel)) + np.linspace(-3, 3, fc.n_mel)).astype(feature_dtype)
                stats = stats.merge(FeatureStats.from_features(x))
                w.add(
                    id=f"u{i:06d}",
                    source=f"synthetic-{i}",
                    transcript=text,
                    labels=alphabet.encode(text),
                    duration=t * 0.02,
                    log_mel=x,
                )
        shards += w.shards
    manifest = Manifest(
        features=fc.to_dict(),
        feature_dtype=feature_dtype,
        alphabet=list(alphabet.labels),
        alphabet_sha256=alphabet.sha256(),
        shards=shards,
        feature_stats=stats.to_dict(),
    )
    with layout.open(MANIFEST, "wt") as f:
        f.write(manifest.to_json())
    return str(path)


def pytest_sessionfinish(session, exitstatus):
    """Fails the run if a cluster in a box (tests/cluster.py) left a namespace, link, sshd or rank behind."""
    import cluster

    left = cluster.leftovers()
    if left:
        cluster.clean_up()
        session.config.get_terminal_writer().line("left behind by the cluster tests:\n  " + "\n  ".join(left), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
