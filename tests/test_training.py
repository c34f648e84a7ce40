"""Training semantics through the real entry points: exact resume after SIGKILL, preemption that cannot lose its
checkpoint, mixed precision, non-finite steps, early stopping from global figures, geometry checks, bytes mode."""
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import DATA, SHARED, synthetic_store, tool

pytestmark = pytest.mark.slow
DIGEST = re.compile(r"rank (\d)/(\d): final weights sha256 ([0-9a-f]{64})")


def env(**extra) -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", **extra)


def train_cmd(store: str, work, *extra: str, epochs: int = 3, batch: int = 2) -> list[str]:
    return [tool("dstrain"), "train", "--train_files", store, "--alphabet_config_path", str(DATA / "alphabet.txt"),
            "--n_hidden", "16", "--epochs", str(epochs), "--train_batch_size", str(batch), "--learning_rate", "0.002",
            "--checkpoint_dir", str(work), "--inter_op_parallelism_threads", "1", "--intra_op_parallelism_threads", "1",
            "--loader_threads", "2", *extra]  # fmt: skip


def horovodrun(np_: int = 2) -> list[str]:
    return [tool("horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", "--gloo"]


def mpirun(np_: int = 2) -> list[str]:
    return ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none", "-x", "PATH", "-x", "TF_CPP_MIN_LOG_LEVEL",
            "-x", "TF_DETERMINISTIC_OPS", "-x", "HOROVOD_CONTROLLER=mpi", "-x", "HOROVOD_CPU_OPERATIONS=mpi"] + (
        ["--allow-run-as-root"] if os.geteuid() == 0 else [])  # fmt: skip


def run(cmd: list[str], timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=kw.pop("env", env()), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, **kw)  # fmt: skip


def digests(out: str) -> dict[str, str]:
    return {rank: d for rank, _, d in DIGEST.findall(out)}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    # 41 utterances in row groups of 4 over 3 shards: divides evenly into neither ranks nor batches.
    return synthetic_store(tmp_path_factory.mktemp("train") / "s", 41, row_group_rows=4, shard_rows=15, frames=(40, 90), seed=11)


@pytest.mark.timeout(400)
def test_sigkill_mid_epoch_then_resume_gives_bit_identical_weights(store, tmp_path):
    deterministic = env(TF_DETERMINISTIC_OPS="1")
    # Batch 1: 20 steps per epoch per rank, so a kill soon after epoch 2's first save lands well before its end (with
    # 10 steps an epoch-end checkpoint could come first, and the resume would not be a mid-epoch one).
    args = ("--dropout_rate", "0", "--checkpoint_steps", "3", "--random_seed", "7")
    t0 = time.time()
    reference = run(horovodrun() + train_cmd(store, tmp_path / "ref", *args, batch=1), env=deterministic)
    assert reference.returncode == 0, reference.stdout[-4000:]
    assert time.time() - t0 < 120, "a 2-process run over an uneven store should take seconds"
    want = digests(reference.stdout)
    assert len(want) == 2 and len(set(want.values())) == 1
    assert len(re.findall(r"epoch \d/3 train loss .*?\((\d+) steps", reference.stdout)) == 3

    work = tmp_path / "killed"
    proc = subprocess.Popen(horovodrun() + train_cmd(store, work, *args, batch=1), env=deterministic, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    seen = ""
    for line in proc.stdout:
        seen += line
        # Epoch 2's first mid-epoch checkpoint: kill everything a moment later, mid-step.
        if re.search(r"saved \S+ at step \d+ \(epoch 2, step [1-9]", line):
            time.sleep(random.uniform(0.02, 0.15))
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, seen[-3000:]
    resumed = run(horovodrun() + train_cmd(store, work, *args, batch=1), env=deterministic)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "Resuming from checkpoint" in resumed.stdout and "resuming after step" in resumed.stdout, resumed.stdout[-3000:]
    assert digests(resumed.stdout) == want, "the resumed run consumed other samples or diverged"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_sigusr1_on_one_rank_stops_all_after_rank0s_checkpoint(store, tmp_path, launcher):
    work = tmp_path / "run"
    cmd = (horovodrun() if launcher == "horovodrun" else mpirun()) + train_cmd(store, work, "--dropout_rate", "0", epochs=400)
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = ""
    for line in proc.stdout:
        out += line
        if "epoch 3/400" in line:
            break
    os.kill(rank_pid(proc.pid, 1), signal.SIGUSR1)  # rank 1 only
    out += proc.stdout.read()
    proc.wait(timeout=120)
    if launcher == "mpirun":
        assert proc.returncode == 75, out[-4000:]  # mpirun passes the ranks' status on
    else:  # horovodrun exits 1 whenever a rank failed; it reports each rank's status
        assert "Process 0 exit with status code 75" in out and "Process 1 exit with status code 75" in out, out[-4000:]
    exits = [float(t) for t in re.findall(r"exiting with 75 to be resumed at ([\d.]+)", out)]
    assert len(exits) == 2 and "Stop requested (SIGUSR1)" in out and "Stop requested (on another rank)" in out
    index = work / "train" / "checkpoint"
    assert index.exists() and os.stat(index).st_mtime <= min(exits), "a rank left before rank 0's checkpoint was complete"
    stopped_at = int(re.search(r"saved at epoch \d+, step (\d+)", out).group(1))
    resumed = run((horovodrun() if launcher == "horovodrun" else mpirun()) + train_cmd(store, work, "--dropout_rate", "0", epochs=5))
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert f"step {stopped_at})" in resumed.stdout  # "Resuming from checkpoint ... (epoch N done, step K)"
    if launcher == "horovodrun":
        # Stopped mid-epoch again, then resumed on one rank: the rest of the epoch is re-partitioned, and it says so.
        out = run(horovodrun() + train_cmd(store, work, "--dropout_rate", "0", "--checkpoint_steps", "2", epochs=7),
                  timeout=300)  # fmt: skip
        assert out.returncode == 0
        partial = work / "partial"
        import shutil

        shutil.copytree(work, partial)
        _stop_mid_epoch(store, partial)
        one = run(horovodrun(1) + train_cmd(store, partial, "--dropout_rate", "0", epochs=9))
        assert one.returncode == 0, one.stdout[-3000:]
        assert "re-partitioned over 1 ranks" in one.stdout, one.stdout[-3000:]


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
    proc = subprocess.Popen(horovodrun() + train_cmd(store, work, "--dropout_rate", "0", "--checkpoint_steps", "2", epochs=9),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    for line in proc.stdout:
        if re.search(r"saved \S+ at step \d+ \(epoch \d+, step [2-8] of it\)", line):
            for rank in (0, 1):
                os.kill(rank_pid(proc.pid, rank), signal.SIGUSR1)
            break
    proc.stdout.read()
    proc.wait(timeout=120)


KILL_WHILE_SAVING = textwrap.dedent("""
    import sys, tensorflow as tf
    from dstrain.features import FeatureConfig
    from dstrain.model import DeepSpeech, ModelConfig
    from dstrain.train.checkpoint import Checkpoints, Progress
    from dstrain.train.rundir import RunDir
    model = DeepSpeech.for_features(ModelConfig(n_hidden=512), FeatureConfig(), 29)
    opt = tf.keras.optimizers.Adam()
    opt.build(model.trainable_variables)
    progress = Progress.new()
    ckpt = Checkpoints(RunDir(sys.argv[1]), model, opt, progress, max_to_keep=2)
    if ckpt.latest.latest_checkpoint:
        ckpt.restore(ckpt.latest.latest_checkpoint)
    print("ready", flush=True)
    while True:
        progress.step.assign_add(1)
        ckpt.save(best=int(progress.step) % 3 == 0)
""")

RESTORE = textwrap.dedent("""
    import sys, tensorflow as tf
    from dstrain.train.rundir import RunDir
    from dstrain.features import FeatureConfig
    from dstrain.model import DeepSpeech, ModelConfig
    from dstrain.train.checkpoint import Checkpoints, Progress
    run = RunDir(sys.argv[1])
    for path in (run.latest_checkpoint(), run.best_checkpoint()):
        if path:
            model = DeepSpeech.for_features(ModelConfig(n_hidden=512), FeatureConfig(), 29)
            opt = tf.keras.optimizers.Adam()
            opt.build(model.trainable_variables)
            Checkpoints(RunDir(sys.argv[1] + "-scratch"), model, opt, Progress.new()).restore(path)
    print("loaded", run.latest_checkpoint())
""")


@pytest.mark.timeout(600)
def test_sigkill_at_any_moment_of_saving_leaves_a_loadable_checkpoint(tmp_path):
    work = str(tmp_path / "run")
    rng = random.Random(0)
    kills = 0
    saver = None
    while kills < 20:
        saver = subprocess.Popen([sys.executable, "-c", KILL_WHILE_SAVING, work], stdout=subprocess.PIPE, text=True, env=env())
        assert saver.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.8))  # a save of a ~20 MB checkpoint takes ~0.1 s: kills land inside saves too
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        kills += 1
        # The next start (the saver itself) restores the latest checkpoint; check the best one too.
    check = subprocess.run([sys.executable, "-c", RESTORE, work], capture_output=True, text=True, env=env(), timeout=120)
    assert check.returncode == 0 and "loaded" in check.stdout, check.stderr[-3000:]
    assert len(os.listdir(os.path.join(work, "train"))) >= 3


@pytest.mark.timeout(400)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_with_identical_weights_on_both_ranks(store, tmp_path, precision):
    out = run(horovodrun() + train_cmd(store, tmp_path / precision, "--precision", precision, "--dropout_rate", "0",
                                       epochs=6, batch=4) + ["--learning_rate", "0.01"])  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:]
    assert f"{precision} precision" in out.stdout
    d = digests(out.stdout)
    assert len(d) == 2 and d["0"] == d["1"]
    losses = [float(x) for x in re.findall(r"epoch \d/6 train loss ([\d.]+|nan)", out.stdout)]
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

    table = table.set_column(table.schema.get_field_index("features"), "features", pa.array(feats, table.schema.field("features").type))
    pq.write_table(table, os.path.join(url, shard), row_group_size=4)
    _refresh_manifest(url)
    out = run(horovodrun() + train_cmd(url, tmp_path / "w", "--nofeature_normalization", "--noshuffle", epochs=2, batch=2))
    assert out.returncode == 0, out.stdout[-4000:]
    skipped = re.findall(r"rank (\d) WARNING step (\d+) skipped on all ranks.*samples \[([\d, ]+)\]", out.stdout)
    # Both ranks skip the same steps (one per epoch: the batch holding sample 5, which only one rank reads).
    by_rank = {r: sorted(int(step) for rr, step, _ in skipped if rr == r) for r in ("0", "1")}
    assert by_rank["0"] == by_rank["1"] and len(by_rank["0"]) == 2, out.stdout[-3000:]
    assert sum("5" in ids.split(", ") for _, _, ids in skipped) == 2
    d = digests(out.stdout)
    assert d["0"] == d["1"]
    assert "nan" not in re.findall(r"epoch 2/2 train loss (\S+)", out.stdout)[0]


def _refresh_manifest(url: str) -> None:
    import json

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
    out = run(horovodrun() + train_cmd(store, tmp_path / "w", "--dev_files", store, "--early_stop", "--es_epochs", "1",
                                       "--es_min_delta", "1000", epochs=10))  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:]
    assert "early stop" in out.stdout and "epoch 2/10" in out.stdout and "epoch 3/10" not in out.stdout
    d = digests(out.stdout)
    assert len(d) == 2 and d["0"] == d["1"]


@pytest.mark.timeout(300)
def test_checkpoint_of_another_geometry_names_the_mismatch(store, tmp_path):
    assert run(train_cmd(store, tmp_path / "w", epochs=1)).returncode == 0
    out = run(train_cmd(store, tmp_path / "w", epochs=2) + ["--n_hidden", "32"])
    assert out.returncode == 2 and "n_hidden 16 in the checkpoint, --n_hidden 32 now" in out.stdout, out.stdout[-2000:]
    assert len(out.stdout.strip().splitlines()[-1]) < 400 and "Traceback" not in out.stdout


@pytest.mark.timeout(300)
def test_fine_tuning_from_another_run_with_a_new_output_layer(store, tmp_path):
    assert run(train_cmd(store, tmp_path / "base", epochs=1)).returncode == 0
    out = run(train_cmd(store, tmp_path / "tuned", "--load_checkpoint_dir", str(tmp_path / "base"), "--drop_source_layers", "1",
                        epochs=1) + ["--learning_rate", "0.0005"])  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:]
    assert "Starting from the weights of" in out.stdout and "fine-tuning" in out.stdout


@pytest.mark.timeout(400)
def test_bytes_output_mode_on_a_russian_sample(tmp_path):
    import shutil

    for name in ("ru.wav", "ru.csv"):
        shutil.copy(SHARED / "data" / "smoke" / name, tmp_path / name)
    prep = run([tool("dstrain"), "preprocess", "--csv", str(tmp_path / "ru.csv"), "--bytes_output_mode", "--output", str(tmp_path / "s")])
    assert prep.returncode == 0, prep.stdout
    store = str(tmp_path / "s")
    out = run([tool("dstrain"), "train", "--train_files", store, "--dev_files", store, "--test_files", store, "--bytes_output_mode",
               "--n_hidden", "128", "--epochs", "450", "--learning_rate", "0.004", "--dropout_rate", "0", "--test_batch_size", "1",
               "--inter_op_parallelism_threads", "1", "--intra_op_parallelism_threads", "1"], timeout=380)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:]
    text = open(tmp_path / "ru.csv", encoding="utf-8").read().splitlines()[1].split(",", 2)[2]
    assert f' - res: "{text}"' in out.stdout, out.stdout[-2000:]
