"""The project's own sbatch scripts on a real one-node SLURM cluster started on localhost (tools/local_slurm.sh)."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from cluster import wait_for
from conftest import REPO, assert_says, final_digests, records, tool
from test_preprocess_scale import many_rows_csv, store_digest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (CI runs as root)")
    for exe in ("slurmctld", "slurmd", "munged", "sbatch"):
        if not shutil.which(exe):
            pytest.fail(f"{exe} missing: `make test` installs slurm-wlm and munge (tools/install.sh --test)")
    state = tmp_path_factory.mktemp("slurm")
    subprocess.run(
        [str(REPO / "tools" / "local_slurm.sh"), "start", str(state)], check=True, capture_output=True, timeout=120
    )
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"))
    yield env
    subprocess.run([str(REPO / "tools" / "local_slurm.sh"), "stop", str(state)], capture_output=True, timeout=60)


def job_env(slurm: dict, **params) -> dict:
    # The venv running these tests (its bin/python is a link: do not resolve it out of the venv).
    venv = os.path.dirname(os.path.dirname(sys.executable))
    return {**slurm, "DSTRAIN_HOME": str(REPO), "DSTRAIN_VENV": venv, **params}


def scontrol_job(slurm: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], env=slurm, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


SBATCH_2_RANKS = ["--nodes=1", "--ntasks-per-node=2", "--gres=gpu:2", "--cpus-per-task=1", "--time=15"]


def test_training_job(slurm, ldc93s1_store, alphabet_path, tmp_path):
    env = job_env(
        slurm,
        TRAIN_FILES=ldc93s1_store,
        DEV_FILES=ldc93s1_store,
        TEST_FILES=ldc93s1_store,
        ALPHABET=alphabet_path,
        CHECKPOINT_DIR=str(tmp_path / "ckpt"),
        EXPORT_DIR=str(tmp_path / "export"),
    )
    proc = subprocess.run(
        [
            "sbatch",
            "--wait",
            *SBATCH_2_RANKS,
            str(REPO / "slurm" / "train.sbatch"),
            "--n_hidden",
            "16",
            "--epochs",
            "3",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (log,) = tmp_path.glob("dstrain-train-*.out")
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    ckpt = tmp_path / "ckpt"
    (start,) = records(ckpt, "start")
    assert start["world_size"] == 2 and start["controller"] == "mpi"
    digests = final_digests(ckpt)
    assert len(digests) == 2 and len(set(digests)) == 1
    assert [r["number"] for r in records(ckpt, "epoch")] == [1, 2, 3]
    assert_says(text, "finished with status 0")  # the sbatch script's own line
    # One writer's files, nothing else: rank 1 would have left a second log or clashing checkpoint names.
    assert sorted(os.listdir(ckpt)) == ["best_dev", "config.json", "metrics.jsonl", "summaries", "train", "train.log"]
    # Three epoch checkpoints, numbered by the saved counter (best-dev saves count too), each complete.
    files = sorted(os.listdir(tmp_path / "ckpt" / "train"))
    numbers = sorted({int(re.match(r"ckpt-(\d+)\.", f).group(1)) for f in files if f.startswith("ckpt-")})
    assert len(numbers) == 3 and files == sorted(
        ["checkpoint"] + [f"ckpt-{i}.{ext}" for i in numbers for ext in ("data-00000-of-00001", "index")]
    )
    assert (tmp_path / "export" / "saved_model.pb").exists()


def test_usr1_checkpoints_requeues_and_resumes(slurm, ldc93s1_store, alphabet_path, tmp_path):
    ckpt = tmp_path / "ckpt"
    env = job_env(slurm, TRAIN_FILES=ldc93s1_store, ALPHABET=alphabet_path, CHECKPOINT_DIR=str(ckpt))
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            *SBATCH_2_RANKS,
            str(REPO / "slurm" / "train.sbatch"),
            "--n_hidden",
            "16",
            "--epochs",
            "400",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    job = out.strip().split(";")[0]
    metrics = ckpt / "metrics.jsonl"
    wait_for(
        lambda: metrics.exists() and any(r["number"] >= 10 for r in records(ckpt, "epoch")), 300, "training to run"
    )
    # As SLURM does before a time limit with --signal=USR1@secs: signal every rank of the job's steps.
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    info = wait_for(
        lambda: (i := scontrol_job(slurm, job)).get("Restarts") == "1" and i.get("JobState") == "PENDING" and i,
        120,
        "the requeue",
    )
    assert info["Requeue"] == "1"

    # SLURM holds a requeued job for 2 minutes before it is eligible again; start it sooner, but only once the
    # first run's step daemon has exited (it outlives the requeue by a few seconds, and the new run reuses its
    # step id and PMIx socket).
    def step_gone() -> bool:
        return subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job}\.0\]"], capture_output=True).returncode != 0

    wait_for(step_gone, 120, "the first run's step to exit")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    wait_for(
        lambda: scontrol_job(slurm, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 600, "the resumed job"
    )
    assert scontrol_job(slurm, job)["JobState"] == "COMPLETED"
    (log,) = tmp_path.glob("dstrain-train-*.out")
    text = log.read_text()
    assert_says(text, "requeueing job", "restart 1")  # the sbatch script's own lines
    (stop,) = records(ckpt, "stop")
    assert stop["signal"] == "SIGUSR1" and stop["exit_code"] == 75
    assert stop["requested_by"] and set(stop["requested_by"]) <= {0, 1}
    (resume,) = records(ckpt, "resume")
    assert resume["checkpoint"] == stop["checkpoint"] and resume["step"] == stop["step"]
    # Every epoch once, the interrupted one finished by the requeued run where it stopped.
    numbers = [r["number"] for r in records(ckpt, "epoch")]
    assert numbers == list(range(1, 401)), numbers[:5]
    assert records(ckpt, "final")[-1]["epochs_done"] == 400


def test_preprocessing_job_over_mpi_ranks(slurm, alphabet_path, tmp_path):
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
        env=job_env(slurm),
    )
    env = job_env(slurm, CSV=src, ALPHABET=alphabet_path, OUTPUT=str(tmp_path / "slurm_store"))
    proc = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            str(REPO / "slurm" / "preprocess.sbatch"),
            "--chunk_rows",
            "4",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (log,) = tmp_path.glob("dstrain-preprocess-*.out")
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert_says(log.read_text(), "2 rank(s)")
    assert store_digest(tmp_path / "slurm_store") == store_digest(local)
