"""The project's sbatch scripts on SLURM across the nodes of a cluster in a box: slurmctld on a `head` node beside
them, one slurmd per node (tools/cluster.sh slurm). Ranks start through `srun --mpi=pmix`, one per node."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from cluster import REPO, Cluster, box, rank_env, tiny_training, wait_for
from conftest import assert_says, final_digests, records, synthetic_store, tool, wait_record
from test_preprocess_scale import many_rows_csv, store_digest

pytestmark = pytest.mark.slow
ONE_RANK_PER_NODE = ["--ntasks-per-node=1", "--gres=gpu:1", "--cpus-per-task=1", "--time=15"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return synthetic_store(
        tmp_path_factory.mktemp("slurm-multinode") / "s", 41, row_group_rows=4, shard_rows=15, frames=(40, 90), seed=11
    )


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
    # The venv running these tests (its bin/python is a link: do not resolve it out of the venv).
    venv = os.path.dirname(os.path.dirname(sys.executable))
    return c.run(
        "head",
        *cmd,
        env=rank_env(SLURM_CONF=str(c.dir / "slurm" / "slurm.conf"), DSTRAIN_HOME=str(REPO), DSTRAIN_VENV=venv, **env),
    )


def job_info(c: Cluster, job: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", on_head(c, "scontrol", "show", "job", job).stdout))


def node_info(c: Cluster, node: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", on_head(c, "scontrol", "show", "node", node).stdout))


def submit(c: Cluster, store: str, run_dir, tmp_path) -> str:
    """A two-node training job: 4 epochs of ~20 steps per rank, a checkpoint every 3 steps."""
    # train_body.sh adds the stores, alphabet and run directory; the last --intra_op_parallelism_threads wins.
    args = " ".join(tiny_training("--checkpoint_steps", "3", epochs=4, batch=1))
    out = on_head(
        c,
        "sh",
        "-c",
        f"cd {tmp_path} && sbatch --parsable --nodes=2 {' '.join(ONE_RANK_PER_NODE)} "
        f"{REPO}/slurm/train_multinode.sbatch {args}",
        TRAIN_FILES=store,
        ALPHABET=str(REPO / "dstrain" / "data" / "alphabet.txt"),
        CHECKPOINT_DIR=str(run_dir),
    )
    assert out.returncode == 0, out.stdout
    return out.stdout.strip().split(";")[0]


def wait_checkpoint_inside(run_dir, epoch: int) -> dict:
    """The first checkpoint saved inside epoch ``epoch`` (1-based), after at least one of its steps."""

    def inside(r: dict) -> bool:
        return r["reason"] == "periodic" and r["epoch"] == epoch - 1 and r["epoch_step"] > 0

    return wait_record(run_dir, "checkpoint", inside, 400)


def release_requeued(c: Cluster, job: str, restarts: int) -> None:
    """SLURM holds a requeued job for two minutes: start it as soon as the last run's step has gone."""
    wait_for(
        lambda: (i := job_info(c, job)).get("Restarts") == str(restarts) and i.get("JobState") == "PENDING",
        180,
        f"requeue number {restarts}",
    )
    wait_for(
        lambda: not any(c.running(n, f"slurmstepd: [{job}.0]") for n in c.nodes), 120, "the last run's step to exit"
    )
    assert on_head(c, "scontrol", "update", f"JobId={job}", "StartTime=now").returncode == 0


@pytest.mark.timeout(1200)
def test_two_node_job_goes_through_usr1_and_a_dead_node_by_requeues(slurm, store, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, store, run_dir, tmp_path)
    wait_checkpoint_inside(run_dir, 2)
    assert job_info(slurm, job)["NodeList"] == "node[1-2]"
    # As SLURM does before a time limit with --signal=USR1@secs: every rank of the job's step is signalled. The job
    # checkpoints, requeues itself and resumes mid-epoch.
    assert on_head(slurm, "scancel", "--signal=USR1", job).returncode == 0
    release_requeued(slurm, job, 1)
    wait_checkpoint_inside(run_dir, 3)
    (log,) = tmp_path.glob("dstrain-train-multinode-*.out")
    first, again = records(run_dir, "start")[:2]
    assert first["world_size"] == 2 and first["controller"] == "mpi" and first["hosts"] == ["node1", "node2"]
    assert again["hosts"] == ["node1", "node2"]  # the requeued job (Restarts=1, waited on above), on the same nodes
    # The signal reached the ranks; rank 0 saved a checkpoint inside the epoch, and the requeued job resumed there.
    (stop,) = records(run_dir, "stop")
    assert stop["signal"] == "SIGUSR1" and set(stop["requested_by"]) in ({0}, {1}, {0, 1}), stop
    assert stop["exit_code"] == 75, stop
    saved = [r for r in records(run_dir, "checkpoint") if r["path"] == stop["checkpoint"]]
    assert saved and saved[-1]["reason"] == "stop" and saved[-1]["epoch_step"] > 0, saved
    (resume,) = records(run_dir, "resume")
    assert resume["checkpoint"] == stop["checkpoint"] and resume["epoch_step"] == saved[-1]["epoch_step"], resume
    assert (resume["epoch"], resume["step"]) == (stop["epoch"], stop["step"])
    resumed_epoch = wait_record(run_dir, "epoch", lambda r: r["number"] == stop["epoch"] + 1, 400)
    assert resumed_epoch["resumed_at_step"] > 0, "the requeued job did not resume mid-epoch"

    # node2 dies mid-epoch: rank 0 stops at once, SLURM marks the node down and the job, requeued, runs on node1 and
    # node3 from the last checkpoint.
    t0 = time.monotonic()
    slurm.kill("node2")
    wait_for(lambda: not slurm.ranks("node1"), 60, "rank 0 on node1 to exit")
    elapsed = time.monotonic() - t0
    assert elapsed < 30, f"rank 0 took {elapsed:.0f} s to exit after node2 died"
    print(f"srun, node2 killed: rank 0 gone after {elapsed:.1f} s")
    wait_for(lambda: "DOWN" in node_info(slurm, "node2").get("State", ""), 120, "node2 to be marked down")
    release_requeued(slurm, job, 2)
    wait_for(
        lambda: job_info(slurm, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 600, "the requeued job"
    )
    text = log.read_text()
    assert job_info(slurm, job)["JobState"] == "COMPLETED", text[-4000:]
    assert job_info(slurm, job)["NodeList"] == "node[1,3]" and job_info(slurm, job)["Restarts"] == "2"
    # What the job's log tells a person: rank 0's peer watch named the lost rank, or SLURM the failed node.
    assert_says(text, patterns=(r"rank 1 \(node2:\d+\) is lost|Node failure on node2",))
    assert len(records(run_dir, "resume")) == 2
    digests = final_digests(run_dir)
    assert len(digests) == 2 and len(set(digests)) == 1
    assert records(run_dir, "start")[-1]["hosts"] == ["node1", "node3"]


@pytest.mark.timeout(600)
def test_preprocessing_over_two_nodes_gives_the_store_of_one_process(slurm, alphabet_path, tmp_path):
    src = many_rows_csv(tmp_path, 30)
    local = tmp_path / "local"
    subprocess.run(
        [
            tool("dstrain"),
            "preprocess",
            "--csv",
            src,
            "--alphabet",
            alphabet_path,
            "--output",
            str(local),
            "--chunk_rows",
            "4",
        ],
        check=True,
        capture_output=True,
        env=rank_env(),
    )
    out = on_head(
        slurm,
        "sh",
        "-c",
        f"cd {tmp_path} && sbatch --wait --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 "
        f"{REPO}/slurm/preprocess.sbatch --chunk_rows 4",
        CSV=src,
        ALPHABET=alphabet_path,
        OUTPUT=str(tmp_path / "slurm_store"),
    )
    (log,) = tmp_path.glob("dstrain-preprocess-*.out")
    assert out.returncode == 0, log.read_text()[-3000:]
    job = re.search(r"Submitted batch job (\d+)", out.stdout).group(1)
    assert job_info(slurm, job)["NodeList"] == "node[1-2]" and job_info(slurm, job)["NumTasks"] == "2"
    assert store_digest(tmp_path / "slurm_store") == store_digest(local)


@pytest.mark.timeout(300)
def test_preflight_inside_an_allocation_asks_every_node_through_srun(slurm, store, tmp_path):
    check = [
        "salloc",
        "--nodelist=node1,node2",
        "--ntasks-per-node=1",
        "dstrain",
        "launch",
        "--check",
        "--launcher",
        "mpirun",
        "--",
        "dstrain",
        "train",
        "--train_files",
        store,
        "--checkpoint_dir",
        str(tmp_path / "run"),
    ]
    ok = on_head(slurm, *check)
    assert ok.returncode == 0, ok.stdout
    assert_says(
        ok.stdout,
        "pre-flight check passed on node1, node2",
        "network interface eth0 (10.213.0.0/24), shared by every node",
    )
    assert slurm.run("node2", "mount", "-t", "tmpfs", "none", store).returncode == 0
    broken = on_head(slurm, *check)
    assert broken.returncode != 0, broken.stdout
    assert_says(broken.stdout, f"  node2: cannot see the feature store {store}")
