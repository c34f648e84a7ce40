"""The project's sbatch scripts on SLURM across the nodes of a cluster in a box: slurmctld on a `head` node beside
them, one slurmd per node (tools/cluster.sh slurm). Ranks start through `srun --mpi=pmix`, one per node."""
import re
import shutil
import subprocess
import time

import pytest

from cluster import REPO, Cluster, box, final_digests, rank_env, tiny_training, wait_for
from conftest import synthetic_store, tool
from test_preprocess_scale import many_rows_csv, store_digest

pytestmark = pytest.mark.slow
ONE_RANK_PER_NODE = ["--ntasks-per-node=1", "--gres=gpu:1", "--cpus-per-task=1", "--time=15"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return synthetic_store(tmp_path_factory.mktemp("slurm-multinode") / "s", 41, row_group_rows=4, shard_rows=15, frames=(40, 90), seed=11)


@pytest.fixture
def slurm(tmp_path):
    for exe in ("slurmctld", "slurmd", "munged", "sbatch"):
        if not shutil.which(exe):
            pytest.fail(f"{exe} missing: `make test` installs slurm-wlm and munge (tools/install.sh --test)")
    with box(tmp_path / "c", 3) as c:
        c.sh("slurm")
        yield c


def on_head(c: Cluster, *cmd: str, **env: str) -> subprocess.CompletedProcess:
    """A SLURM client command, where the controller is reachable."""
    return c.run("head", *cmd, env=rank_env(SLURM_CONF=str(c.dir / "slurm" / "slurm.conf"), DSTRAIN_HOME=str(REPO),
                                          DSTRAIN_VENV=str(REPO / ".venv"), **env))  # fmt: skip


def job_info(c: Cluster, job: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", on_head(c, "scontrol", "show", "job", job).stdout))


def start_mid_epoch_2(c: Cluster, store: str, tmp_path) -> str:
    """A two-node training job of 3 epochs, once rank 0 has saved a checkpoint inside epoch 2."""
    run_dir = tmp_path / "run"
    # train_body.sh adds the stores, alphabet and run directory; the last --intra_op_parallelism_threads wins.
    args = " ".join(tiny_training("--checkpoint_steps", "3", epochs=3, batch=1))
    out = on_head(c, "sh", "-c", f"cd {tmp_path} && sbatch --parsable --nodes=2 {' '.join(ONE_RANK_PER_NODE)} "
                  f"{REPO}/slurm/train_multinode.sbatch {args}", TRAIN_FILES=store,
                  ALPHABET=str(REPO / "dstrain" / "data" / "alphabet.txt"), CHECKPOINT_DIR=str(run_dir))  # fmt: skip
    assert out.returncode == 0, out.stdout
    job = out.stdout.strip().split(";")[0]
    log = run_dir / "train.log"
    wait_for(lambda: log.exists() and re.search(r"saved \S+ at step \d+ \(epoch 2, step [1-9]", log.read_text()), 400,
             "a checkpoint inside epoch 2")  # fmt: skip
    assert job_info(c, job)["NodeList"] == "node[1-2]"
    return job


def finish(c: Cluster, job: str, tmp_path) -> str:
    """The job's log once it has completed (after its requeue), with one final digest for both ranks."""
    wait_for(lambda: job_info(c, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 600, "the requeued job")
    text = job_log(tmp_path)
    assert job_info(c, job)["JobState"] == "COMPLETED", text[-4000:]
    assert "restart 1" in text and "Resuming from checkpoint" in text
    digests = final_digests(text)
    assert set(digests) == {0, 1} and len(set(digests.values())) == 1
    return text


def release_requeued(c: Cluster, job: str) -> None:
    """SLURM holds a requeued job for two minutes: start it as soon as the first run's step has gone."""
    wait_for(lambda: (i := job_info(c, job)).get("Restarts") == "1" and i.get("JobState") == "PENDING", 180, "the requeue")
    wait_for(lambda: not any(c.running(n, f"slurmstepd: [{job}.0]") for n in c.nodes), 120, "the first run's step to exit")
    assert on_head(c, "scontrol", "update", f"JobId={job}", "StartTime=now").returncode == 0


def job_log(tmp_path) -> str:
    (log,) = tmp_path.glob("dstrain-train-multinode-*.out")
    return log.read_text()


@pytest.mark.timeout(900)
def test_two_node_job_checkpoints_on_usr1_requeues_and_resumes_mid_epoch(slurm, store, tmp_path):
    job = start_mid_epoch_2(slurm, store, tmp_path)
    # As SLURM does before a time limit with --signal=USR1@secs: every rank of the job's step is signalled.
    assert on_head(slurm, "scancel", "--signal=USR1", job).returncode == 0
    release_requeued(slurm, job)
    text = finish(slurm, job, tmp_path)
    assert "on node[1-2], 2 ranks" in text and "Horovod: 2 process(es), mpi controller" in text
    assert "Stop requested (SIGUSR1)" in text and "requeueing job" in text
    stopped = re.search(r"Stop requested \(SIGUSR1\): checkpoint \S+ saved at epoch (\d+), step (\d+)", text)
    assert stopped and re.search(rf"Resuming from checkpoint \S+ \(epoch {int(stopped.group(1)) - 1} done, step {stopped.group(2)}\)", text)
    assert f"epoch {stopped.group(1)}: resuming after step" in text, "the requeued job did not resume mid-epoch"


@pytest.mark.timeout(900)
def test_a_dead_node_stops_the_job_which_is_requeued_on_the_nodes_left(slurm, store, tmp_path):
    job = start_mid_epoch_2(slurm, store, tmp_path)
    t0 = time.monotonic()
    slurm.kill("node2")
    wait_for(lambda: not slurm.ranks("node1"), 60, "rank 0 on node1 to exit")
    elapsed = time.monotonic() - t0
    assert elapsed < 30, f"rank 0 took {elapsed:.0f} s to exit after node2 died"
    print(f"srun, node2 killed: rank 0 gone after {elapsed:.1f} s")
    # SLURM marks the node down (SlurmdTimeout) and requeues the job; it runs again on node1 and node3.
    wait_for(lambda: "down" in on_head(slurm, "sinfo", "-h", "-n", "node2", "-o", "%T").stdout, 120, "node2 to be marked down")
    release_requeued(slurm, job)
    text = finish(slurm, job, tmp_path)
    assert job_info(slurm, job)["NodeList"] == "node[1,3]"
    assert re.search(r"rank 1 \(node2:\d+\) is lost|Node failure on node2", text), text[-4000:]


@pytest.mark.timeout(600)
def test_preprocessing_over_two_nodes_gives_the_store_of_one_process(slurm, alphabet_path, tmp_path):
    src = many_rows_csv(tmp_path, 30)
    local = tmp_path / "local"
    subprocess.run([tool("dstrain"), "preprocess", "--csv", src, "--alphabet", alphabet_path, "--output", str(local), "--chunk_rows", "4"],
                   check=True, capture_output=True, env=rank_env())  # fmt: skip
    out = on_head(slurm, "sh", "-c", f"cd {tmp_path} && sbatch --wait --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 "
                  f"{REPO}/slurm/preprocess.sbatch --chunk_rows 4", CSV=src, ALPHABET=alphabet_path, OUTPUT=str(tmp_path / "slurm_store"))  # fmt: skip
    (log,) = tmp_path.glob("dstrain-preprocess-*.out")
    assert out.returncode == 0, log.read_text()[-3000:]
    job = re.search(r"Submitted batch job (\d+)", out.stdout).group(1)
    assert job_info(slurm, job)["NodeList"] == "node[1-2]" and "2 rank(s)" in log.read_text()
    assert store_digest(tmp_path / "slurm_store") == store_digest(local)
