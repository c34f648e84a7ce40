"""Training semantics through the real entry points: exact resume after SIGKILL, preemption that cannot lose its
checkpoint, mixed precision, non-finite steps, early stopping from global figures, geometry checks, bytes mode."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap

import pytest
from cluster import Output
from conftest import (
    DATA,
    SHARED,
    assert_says,
    count_records,
    final_digests,
    records,
    synthetic_store,
    tool,
    wait_record,
)

pytestmark = pytest.mark.slow


def env(**extra) -> dict:
    return dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL="2", PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", **extra
    )


def train_cmd(store: str, work, *extra: str, epochs: int = 3, batch: int = 2) -> list[str]:
    return [
        tool("dstrain"),
        "train",
        "--train_files",
        store,
        "--alphabet_config_path",
        str(DATA / "alphabet.txt"),
        "--n_hidden",
        "16",
        "--epochs",
        str(epochs),
        "--train_batch_size",
        str(batch),
        "--learning_rate",
        "0.002",
        "--checkpoint_dir",
        str(work),
        "--inter_op_parallelism_threads",
        "1",
        "--intra_op_parallelism_threads",
        "1",
        "--loader_threads",
        "2",
        *extra,
    ]


def horovodrun(np_: int = 2) -> list[str]:
    return [tool("horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", "--gloo"]


def mpirun(np_: int = 2) -> list[str]:
    return [
        "mpirun",
        "-np",
        str(np_),
        "--oversubscribe",
        "--bind-to",
        "none",
        "-x",
        "PATH",
        "-x",
        "TF_CPP_MIN_LOG_LEVEL",
        "-x",
        "TF_DETERMINISTIC_OPS",
        "-x",
        "HOROVOD_CONTROLLER=mpi",
        "-x",
        "HOROVOD_CPU_OPERATIONS=mpi",
    ] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])


def run(cmd: list[str], timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        env=kw.pop("env", env()),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        **kw,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    # 41 utterances in row groups of 4 over 3 shards: divides evenly into neither ranks nor batches.
    return synthetic_store(
        tmp_path_factory.mktemp("train") / "s", 41, row_group_rows=4, shard_rows=15, frames=(40, 90), seed=11
    )


@pytest.mark.timeout(400)
def test_sigkill_mid_epoch_then_resume_gives_bit_identical_weights(store, tmp_path):
    deterministic = env(TF_DETERMINISTIC_OPS="1")
    # Batch 1: 21 steps per epoch per rank, so a kill soon after epoch 2's first save lands well before its end (with
    # 10 steps an epoch-end checkpoint could come first, and the resume would not be a mid-epoch one). Augmentation in
    # the training step draws from each sample's (seed, epoch, id), so the resumed steps augment alike.
    args = ("--dropout_rate", "0", "--checkpoint_steps", "3", "--random_seed", "7", "--augment", "default")
    reference = run(horovodrun() + train_cmd(store, tmp_path / "ref", *args, batch=1), env=deterministic)
    assert reference.returncode == 0, reference.stdout[-4000:]
    # The run record: one epoch record per epoch, and a final record with both ranks' (identical) weights.
    want = final_digests(tmp_path / "ref")
    assert len(want) == 2 and len(set(want)) == 1
    epochs = records(tmp_path / "ref", "epoch")
    assert [r["number"] for r in epochs] == [1, 2, 3] and [r["steps"] for r in epochs] == [21, 21, 21]

    work = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            horovodrun() + train_cmd(store, work, *args, batch=1),
            env=deterministic,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            # Epoch 2's first mid-epoch checkpoint (its step 1..3 of 21): kill everything at once, mid-epoch.
            wait_record(work, "checkpoint", lambda r: r["epoch"] == 1 and 1 <= r["epoch_step"] <= 3, 400, proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    resumed = run(horovodrun() + train_cmd(store, work, *args, batch=1), env=deterministic)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    (resume,) = records(work, "resume")
    assert 0 < resume["epoch_step"] < 21 and resume["epoch"] == 1, resume  # a mid-epoch resume, in epoch 2
    epoch2 = [r for r in records(work, "epoch") if r["number"] == 2][-1]
    assert epoch2["resumed_at_step"] == resume["epoch_step"] and epoch2["exact"]
    assert final_digests(work) == want, "the resumed run consumed other samples or diverged"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_sigusr1_on_one_rank_stops_all_after_rank0s_checkpoint(store, tmp_path, launcher):
    work = tmp_path / "run"
    cmd = (horovodrun() if launcher == "horovodrun" else mpirun()) + train_cmd(
        store, work, "--dropout_rate", "0", epochs=400
    )
    proc = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    output = Output(proc)
    try:
        wait_record(work, "epoch", lambda r: r["number"] == 3, 400, proc)
        os.kill(rank_pid(proc.pid, 1), signal.SIGUSR1)  # rank 1 only
        output.finish(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = output.text
    if launcher == "mpirun":
        assert proc.returncode == 75, out[-4000:]  # mpirun passes the ranks' status on
    else:  # horovodrun exits 1 whenever a rank failed; it reports each rank's status
        assert_says(out, "Process 0 exit with status code 75", "Process 1 exit with status code 75")
    # Every rank says when it left: no rank's own exit is in any record (rank 0 writes it, before the others leave).
    exits = [float(t) for t in re.findall(r"exiting with 75 to be resumed at ([\d.]+)", out)]
    assert len(exits) == 2, out[-4000:]
    (stop,) = records(work, "stop")
    assert stop["signal"] == "SIGUSR1" and stop["requested_by"] == [1] and stop["exit_code"] == 75, stop
    assert_says(out, "Stop requested (on another rank)")  # rank 1 asked; rank 0 was told by the step's allreduce
    index = work / "train" / "checkpoint"
    assert index.exists() and os.stat(index).st_mtime <= min(
        exits
    ), "a rank left before rank 0's checkpoint was complete"
    assert stop["checkpoint"] and records(work, "checkpoint")[-1]["reason"] == "stop"
    resumed = run(
        (horovodrun() if launcher == "horovodrun" else mpirun())
        + train_cmd(store, work, "--dropout_rate", "0", epochs=5)
    )
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    (resume,) = records(work, "resume")
    assert resume["checkpoint"] == stop["checkpoint"] and resume["step"] == stop["step"]
    if launcher == "horovodrun":
        # Stopped mid-epoch again, then resumed on one rank: the rest of the epoch is re-partitioned, and it says so.
        partial = work / "partial"
        import shutil

        shutil.copytree(work, partial)
        _stop_mid_epoch(store, partial)
        one = run(horovodrun(1) + train_cmd(store, partial, "--dropout_rate", "0", epochs=9))
        assert one.returncode == 0, one.stdout[-3000:]
        assert_says(one.stdout, "re-partitioned over 1 ranks")
        resumed_epoch = [r for r in records(partial, "epoch") if r["resumed_at_step"]][-1]
        assert not resumed_epoch["exact"] and records(partial, "start")[-1]["world_size"] == 1


def descendants(root: int) -> list[int]:
    parent = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent[int(pid)] = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def rank_pid(launcher: int, rank: int) -> int:
    """The Python process of ``rank`` among a launcher's descendants (not the launcher, not a shell)."""
    for pid in descendants(launcher):
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"python" not in os.path.basename(cmdline[0]) or not any(c.endswith(b"/dstrain") for c in cmdline[:2]):
            continue
        if any(e in (f"HOROVOD_RANK={rank}".encode(), f"OMPI_COMM_WORLD_RANK={rank}".encode()) for e in environ):
            return int(pid)
    raise AssertionError(f"no rank {rank} process under {launcher}")


def _stop_mid_epoch(store: str, work) -> None:
    """Run 2 ranks until a mid-epoch checkpoint of the next epoch is saved, then SIGUSR1 (stop, checkpoint, exit 75)."""
    earlier = count_records(work, "checkpoint")  # the run directory may hold an earlier run's
    with open(f"{work}.log", "w") as log:
        proc = subprocess.Popen(
            horovodrun() + train_cmd(store, work, "--dropout_rate", "0", "--checkpoint_steps", "2", epochs=9),
            env=env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            mid_epoch = lambda r: r["reason"] == "periodic" and 2 <= r["epoch_step"] <= 8  # noqa: E731
            wait_record(work, "checkpoint", mid_epoch, 400, proc, since=earlier)
            for rank in (0, 1):
                os.kill(rank_pid(proc.pid, rank), signal.SIGUSR1)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


KILL_WHILE_SAVING = textwrap.dedent("""
    import json, sys, threading, tensorflow as tf
    from dstrain.features import FeatureConfig
    from dstrain.model import DeepSpeech, ModelConfig
    from dstrain.train.checkpoint import Checkpoints, Progress
    from dstrain.rundir import RunDir
    run, stage, saves_before = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = DeepSpeech.for_features(ModelConfig(n_hidden=512), FeatureConfig(), 29)
    opt = tf.keras.optimizers.Adam()
    opt.build(model.trainable_variables)
    progress = Progress.new()
    saves = [0]
    def on_written(kind, path):
        # Held inside the save (files written, index not yet updated) until the test kills this process.
        if kind == stage and saves[0] > saves_before:
            print(json.dumps({"inside": int(progress.step), "kind": kind, "path": path}), flush=True)
            threading.Event().wait()
    ckpt = Checkpoints(RunDir(run), model, opt, progress, max_to_keep=2, on_written=on_written)
    if ckpt.latest.latest_checkpoint:
        ckpt.restore(ckpt.latest.latest_checkpoint)
    print(json.dumps({"ready": int(progress.step)}), flush=True)
    while True:
        progress.step.assign_add(1)
        saves[0] += 1
        ckpt.save(best=int(progress.step) % 3 == 0)
""")

RESTORE = textwrap.dedent("""
    import json, sys, tensorflow as tf
    from dstrain.rundir import RunDir
    from dstrain.features import FeatureConfig
    from dstrain.model import DeepSpeech, ModelConfig
    from dstrain.train.checkpoint import Checkpoints, Progress
    run = RunDir(sys.argv[1])
    for path in (run.latest_checkpoint(), run.best_checkpoint()):
        model = DeepSpeech.for_features(ModelConfig(n_hidden=512), FeatureConfig(), 29)
        opt = tf.keras.optimizers.Adam()
        opt.build(model.trainable_variables)
        progress = Progress.new()
        Checkpoints(RunDir(sys.argv[1] + "-scratch"), model, opt, progress).restore(path)
        print(json.dumps({"loaded": path, "step": int(progress.step)}))
""")


@pytest.mark.timeout(600)
def test_sigkill_inside_any_save_leaves_a_loadable_checkpoint(tmp_path):
    """20 kills, each landing inside a save (held there: files written, index not updated), of the latest or of the
    best-dev checkpoint; every restart loads exactly the checkpoint the index named before the interrupted save."""
    work = str(tmp_path / "run")
    rng = random.Random(0)
    expected, held = 0, {"latest": 0, "best": 0}
    for kill in range(20):
        stage = ("latest", "best")[kill % 2]
        saver = subprocess.Popen(
            [sys.executable, "-c", KILL_WHILE_SAVING, work, stage, str(rng.randint(0, 3))],
            stdout=subprocess.PIPE,
            text=True,
            env=env(),
        )
        # The saver's reports, one JSON object a line: where it started, and the save it is held inside.
        ready = json.loads(saver.stdout.readline())
        assert ready == {"ready": expected}, (kill, ready)
        inside = json.loads(saver.stdout.readline())
        assert inside["kind"] == stage, (kill, inside)
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        step, path = inside["inside"], inside["path"]
        # A latest checkpoint killed before its index update is not the resume point; its predecessor is.
        expected = step - 1 if stage == "latest" else step
        assert os.path.exists(path + ".index") and index_names(work, stage) != os.path.basename(path), (kill, path)
        held[stage] += 1
    assert held == {"latest": 10, "best": 10}
    check = subprocess.run(
        [sys.executable, "-c", RESTORE, work], capture_output=True, text=True, env=env(), timeout=120
    )
    assert check.returncode == 0, check.stderr[-3000:]
    loaded = [json.loads(line) for line in check.stdout.splitlines() if line.startswith("{")]
    assert len(loaded) == 2 and loaded[0]["step"] == expected and loaded[1]["step"] % 3 == 0, check.stdout


def index_names(run: str, kind: str) -> str:
    """The checkpoint that the index file of the latest or best checkpoints names (what a restart loads)."""
    index = os.path.join(run, "train" if kind == "latest" else "best_dev", "checkpoint")
    if not os.path.exists(index):
        return ""
    return re.search(r'^model_checkpoint_path: "([^"]+)"', open(index).read(), re.M).group(1)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_with_identical_weights_on_both_ranks(store, tmp_path, precision):
    out = run(
        horovodrun()
        + train_cmd(store, tmp_path / precision, "--precision", precision, "--dropout_rate", "0", epochs=6, batch=4)
        + ["--learning_rate", "0.01"]
    )
    assert out.returncode == 0, out.stdout[-4000:]
    work = tmp_path / precision
    assert records(work, "start")[0]["precision"] == precision
    d = final_digests(work)
    assert len(d) == 2 and d[0] == d[1]
    losses = [float(r["loss"]) for r in records(work, "epoch")]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses


@pytest.mark.timeout(400)
def test_a_non_finite_step_on_one_rank_is_skipped_on_both(tmp_path):
    url = synthetic_store(tmp_path / "s", 8, row_group_rows=4, frames=(40, 60), seed=3)
    # Poison one utterance: an infinite feature value makes its loss and gradients non-finite.
    import pyarrow.parquet as pq

    shard = next(p for p in os.listdir(url) if p.endswith(".parquet"))
    table = pq.read_table(os.path.join(url, shard))
    feats = table.column("features").to_pylist()
    feats[5][7] = float("inf")
    import pyarrow as pa

    table = table.set_column(
        table.schema.get_field_index("features"), "features", pa.array(feats, table.schema.field("features").type)
    )
    pq.write_table(table, os.path.join(url, shard), row_group_size=4)
    _refresh_manifest(url)
    out = run(
        horovodrun() + train_cmd(url, tmp_path / "w", "--nofeature_normalization", "--noshuffle", epochs=2, batch=2)
    )
    assert out.returncode == 0, out.stdout[-4000:]
    work = tmp_path / "w"
    # One step per epoch is skipped on every rank: the batch holding sample 5, which only one rank reads. Every rank
    # gathers its samples into the record as it skips the step (rank_samples, in rank order).
    assert [r["nonfinite_steps"] for r in records(work, "epoch")] == [1, 1]
    skipped = records(work, "nonfinite")
    assert [r["epoch"] for r in skipped] == [0, 1] and all(len(r["rank_samples"]) == 2 for r in skipped), skipped
    assert all(r["rank_samples"][0] == r["samples"] for r in skipped), skipped
    assert sum(5 in ids for r in skipped for ids in r["rank_samples"]) == 2, skipped
    d = final_digests(work)
    assert d[0] == d[1]
    assert all(isinstance(r["loss"], float) for r in records(work, "epoch")), "a skipped step's loss entered the mean"


@pytest.mark.timeout(300)
def test_augmentation_that_would_make_samples_infeasible_never_skips_a_step(tmp_path):
    # Tempo x8 leaves 4-5 of 30-40 frames, fewer than most transcripts need: without the transcript's bound every
    # such sample's CTC loss would be infinite and its step skipped on every rank.
    url = synthetic_store(tmp_path / "s", 24, frames=(30, 40), seed=5)
    out = run(horovodrun() + train_cmd(url, tmp_path / "w", "--augment", "tempo[factor=8]", epochs=2, batch=4))
    assert out.returncode == 0, out.stdout[-3000:]
    epochs = records(tmp_path / "w", "epoch")
    assert [r["nonfinite_steps"] for r in epochs] == [0, 0] and not records(tmp_path / "w", "nonfinite")
    assert all(r["steps"] == 3 for r in epochs)


def _refresh_manifest(url: str) -> None:
    from dstrain.store import StoreLayout

    layout = StoreLayout(url)
    m = json.load(open(os.path.join(url, "_manifest.json")))
    for s in m["shards"]:
        s["bytes"] = os.path.getsize(os.path.join(url, s["path"]))
        s["sha256"] = layout.sha256(s["path"])
    json.dump(m, open(os.path.join(url, "_manifest.json"), "w"))


@pytest.mark.timeout(400)
def test_early_stop_from_global_dev_loss_stops_both_ranks_together(store, tmp_path):
    # Each rank holds different dev samples, so their local dev losses differ; the decision uses the global loss.
    out = run(
        horovodrun()
        + train_cmd(
            store,
            tmp_path / "w",
            "--dev_files",
            store,
            "--early_stop",
            "--es_epochs",
            "1",
            "--es_min_delta",
            "1000",
            epochs=10,
        )
    )
    assert out.returncode == 0, out.stdout[-4000:]
    epochs = records(tmp_path / "w", "epoch")
    assert [r["number"] for r in epochs] == [1, 2] and epochs[-1]["early_stop"] and not epochs[0].get("early_stop")
    assert len(records(tmp_path / "w", "eval")) == 2
    d = final_digests(tmp_path / "w")
    assert len(d) == 2 and d[0] == d[1]


@pytest.mark.timeout(300)
def test_checkpoint_of_another_geometry_names_the_mismatch(store, tmp_path):
    assert run(train_cmd(store, tmp_path / "w", epochs=1)).returncode == 0
    out = run(train_cmd(store, tmp_path / "w", epochs=2) + ["--n_hidden", "32"])
    assert out.returncode == 2, out.stdout[-2000:]
    assert_says(out.stdout, "n_hidden 16 in the checkpoint, --n_hidden 32 now", lacks=("Traceback",))
    assert_says(out.stdout, patterns=(r"^.{1,399}\s*\Z",))  # its last line is short: a message, not a dump


@pytest.mark.timeout(300)
def test_fine_tuning_from_another_run_with_a_new_output_layer(store, tmp_path):
    assert run(train_cmd(store, tmp_path / "base", epochs=1)).returncode == 0
    out = run(
        train_cmd(
            store,
            tmp_path / "tuned",
            "--load_checkpoint_dir",
            str(tmp_path / "base"),
            "--drop_source_layers",
            "1",
            epochs=1,
        )
        + ["--learning_rate", "0.0005"]
    )
    assert out.returncode == 0, out.stdout[-3000:]
    # Started from the base run's weights (its checkpoint, named in the start record), not resumed from it.
    (start,) = records(tmp_path / "tuned", "start")
    assert start["init_from"].startswith(str(tmp_path / "base")) and not records(tmp_path / "tuned", "resume"), start


@pytest.mark.timeout(400)
@pytest.mark.skipif(
    not (SHARED / "data" / "smoke" / "ru.csv").exists(), reason="needs ../shared/data/smoke (the Russian sample)"
)
def test_bytes_output_mode_on_a_russian_sample(tmp_path):
    import shutil

    for name in ("ru.wav", "ru.csv"):
        shutil.copy(SHARED / "data" / "smoke" / name, tmp_path / name)
    prep = run(
        [
            tool("dstrain"),
            "preprocess",
            "--csv",
            str(tmp_path / "ru.csv"),
            "--bytes_output_mode",
            "--output",
            str(tmp_path / "s"),
        ]
    )
    assert prep.returncode == 0, prep.stdout
    store = str(tmp_path / "s")
    out = run(
        [
            tool("dstrain"),
            "train",
            "--train_files",
            store,
            "--test_files",
            store,
            "--bytes_output_mode",
            "--n_hidden",
            "256",
            "--epochs",
            "450",
            "--learning_rate",
            "0.002",
            "--dropout_rate",
            "0",
            "--test_batch_size",
            "1",
            "--inter_op_parallelism_threads",
            "1",
            "--intra_op_parallelism_threads",
            "1",
            "--test_output_file",
            str(tmp_path / "test.json"),
        ],
        timeout=380,
    )
    assert out.returncode == 0, out.stdout[-3000:]
    text = open(tmp_path / "ru.csv", encoding="utf-8").read().splitlines()[1].split(",", 2)[2]
    (sample,) = json.load(open(tmp_path / "test.json", encoding="utf-8"))
    assert sample["src"] == text and sample["res"] == text, sample


def _final_weights(run_dir) -> list:
    """The run's latest checkpoint's model weights (numpy), in a subprocess-free way: the run directory's own loader."""
    from dstrain.rundir import RunDir

    model, _, _ = RunDir(str(run_dir)).restore_model(RunDir(str(run_dir)).latest_checkpoint())
    return model.get_weights()


@pytest.mark.timeout(500)
def test_accumulation_equals_one_larger_batch_and_fp16_compression_stays_close(tmp_path):
    import numpy as np

    # In input order without buckets, 4 micro-batches of 2 are exactly the batch of 8 a plain run takes.
    url = synthetic_store(tmp_path / "s", 32, row_group_rows=8, frames=(40, 70), seed=8)
    plain = ("--noshuffle", "--length_buckets", "1", "--dropout_rate", "0", "--learning_rate", "0.001")
    runs = {
        "big": ("--train_batch_size", "8"),
        "acc": ("--train_batch_size", "2", "--accumulation_steps", "4"),
        "fp16": ("--train_batch_size", "8", "--gradient_compression", "fp16"),
    }
    for name, extra in runs.items():
        out = run(horovodrun() + train_cmd(url, tmp_path / name, *plain, *extra, epochs=2))
        assert out.returncode == 0, (name, out.stdout[-3000:])
        d = final_digests(tmp_path / name)
        assert d[0] == d[1], name
    big, acc = records(tmp_path / "big", "epoch"), records(tmp_path / "acc", "epoch")
    assert [r["steps"] for r in big] == [r["steps"] for r in acc] == [2, 2]
    assert [r["micro_batches"] for r in big] == [2, 2] and [r["micro_batches"] for r in acc] == [8, 8]
    assert [r["loss"] for r in acc] == pytest.approx([r["loss"] for r in big], rel=1e-4)
    weights = {name: _final_weights(tmp_path / name) for name in runs}
    for a, b in zip(weights["big"], weights["acc"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
    # float16 on the wire: not the same bits, but the same training within float16's precision.
    assert final_digests(tmp_path / "fp16") != final_digests(tmp_path / "big")
    for a, b in zip(weights["big"], weights["fp16"]):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-4)


@pytest.mark.timeout(400)
def test_batch_frames_two_ranks_run_equal_steps_with_identical_weights(store, tmp_path):
    import numpy as np

    from dstrain.alphabet import Alphabet
    from dstrain.distributed import World
    from dstrain.loader.builder import TrainInput
    from dstrain.loader.config import LoaderConfig
    from dstrain.loader.sampler import plan_all

    work = tmp_path / "w"
    out = run(horovodrun() + train_cmd(store, work, "--batch_frames", "400", "--dropout_rate", "0", epochs=2))
    assert out.returncode == 0, out.stdout[-4000:]
    d = final_digests(work)
    assert len(d) == 2 and d[0] == d[1]
    # The run's plans, recomputed as every rank computes them: the same steps on both ranks, batches within budget.
    data = TrainInput.build(
        [store],
        Alphabet.from_file(str(DATA / "alphabet.txt")),
        LoaderConfig(batch_frames=400),
        World(),
        batch_size=2,
        seed=4568,
        epochs=2,
    )
    epochs = records(work, "epoch")
    assert [r["number"] for r in epochs] == [1, 2]
    for epoch, record in enumerate(epochs):
        plans = plan_all(data.catalog.table, data.spec, world=2, epoch=epoch, seed=4568)
        assert plans[0].steps == plans[1].steps == record["steps"]
        assert np.array_equal(plans[0].batch_sizes, plans[1].batch_sizes)
        assert all(p.batch_frames_used.max() <= 400 for p in plans)
        assert record["padding"] == pytest.approx(plans[0].padding_fraction)
        assert record["steps"] < 10  # batch 2 would take 10 steps; 40..90 frames fit 4 to 10 a batch
    data.close()


UNEQUAL_STEP = textwrap.dedent("""
    import json, sys, numpy as np, tensorflow as tf
    from dstrain import runtime
    from dstrain.loader.reader import pad_batch, read_row_group
    from dstrain.model import ModelConfig, ctc_loss
    from dstrain.runtime import ProcessConfig
    from dstrain.train.trainer import TrainConfig, Trainer
    store, alphabet, out = sys.argv[1:4]
    cfg = TrainConfig(train_files=(store,), alphabet_config_path=alphabet,
                      model=ModelConfig(n_hidden=16, dropout_rate=0.0),
                      process=ProcessConfig(inter_op_parallelism_threads=1, intra_op_parallelism_threads=1))
    trainer = Trainer(cfg, runtime.start(cfg.process))
    trainer.restore_and_broadcast()
    world, model = trainer.world, trainer.model
    rows = read_row_group(trainer.data.catalog.refs[0], trainer.data.catalog.n_mel)
    def batch(idx):
        return pad_batch([rows.features[i] for i in idx], [rows.labels[i] for i in idx])
    def mean_loss_grad(idx):
        x, x_len, y, y_len = batch(idx)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(ctc_loss(model((x, x_len), training=True), x_len, y, y_len))
        return loss, tape.gradient(loss, model.trainable_variables)
    # The reference: the gradient of the mean loss of all three utterances in one batch, from the same weights; and
    # what averaging the two ranks' own means would give instead.
    loss, want = mean_loss_grad([0, 1, 2])
    mean_of_means = [0.5 * (a + b) for a, b in zip(mean_loss_grad([0])[1], mean_loss_grad([1, 2])[1])]
    # The step: one utterance on rank 0, two on rank 1.
    idx = [0] if world.rank == 0 else [1, 2]
    keys = np.array([[0, i] for i in idx], np.int64)
    result = trainer.train_step(*batch(idx), keys, tf.constant([0.0, 0.0, 0.001], tf.float32))
    # Adam's first moment after one step is (1 - beta_1) g of the gradient the step applied.
    got = [v for v in trainer.optimizer.variables if v.name.startswith("m/")]
    assert len(got) == len(want), (len(got), len(want))
    flat = lambda ts: np.concatenate([np.ravel(t) for t in ts])
    got, want, other = flat(got), flat([0.1 * g for g in want]), flat([0.1 * g for g in mean_of_means])
    scale = float(np.abs(want).max())
    report = {"loss": float(result[0]), "want_loss": float(loss), "count": float(result[3]),
              "error": float(np.abs(got - want).max() / scale),
              "mean_of_means_error": float(np.abs(other - want).max() / scale)}
    if world.is_root:
        json.dump(report, open(out, "w"))
    world.join()
""")


@pytest.mark.timeout(400)
def test_a_step_over_unequal_batches_is_the_mean_over_all_its_utterances(store, tmp_path):
    """One utterance on rank 0 and two on rank 1 give the gradient of one batch of all three: each rank's gradient
    counts by its share of the step's utterances (averaging the two ranks' means would weigh rank 0's one twice)."""
    path = tmp_path / "report.json"
    out = run(horovodrun() + [sys.executable, "-c", UNEQUAL_STEP, store, str(DATA / "alphabet.txt"), str(path)])
    assert out.returncode == 0, out.stdout[-4000:]
    report = json.loads(path.read_text())
    assert report["count"] == 3 and report["loss"] == pytest.approx(report["want_loss"], rel=1e-5)
    assert report["error"] < 1e-4 and report["mean_of_means_error"] > 1e-2, report
