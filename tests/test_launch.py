import os
import subprocess
import sys
import uuid

import pytest
from conftest import assert_says, tool

from dstrain.launch.launcher import (
    Host,
    LaunchConfig,
    build_command,
    expand_nodelist,
    expand_tasks_per_node,
    hosts_from_hostfile,
    hosts_from_slurm,
)


def test_slurm_nodelist_and_tasks():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]
    assert expand_nodelist("single") == ["single"]
    assert expand_tasks_per_node("4(x2),2", 3) == [4, 4, 2]
    assert expand_tasks_per_node("8", 2) == [8, 8]
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "4(x2)"}
    assert hosts_from_slurm(env) == (Host("n1", 4), Host("n2", 4))
    assert hosts_from_slurm({"SLURM_JOB_NODELIST": "g1", "SLURM_GPUS_ON_NODE": "8"}) == (Host("g1", 8),)
    with pytest.raises(ValueError):
        hosts_from_slurm({"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "4(x2)"})


def test_hostfiles(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# workers\nworker-0 slots=4\nworker-1:2\nworker-2\n")
    assert hosts_from_hostfile(str(f)) == (Host("worker-0", 4), Host("worker-1", 2), Host("worker-2", 1))


def test_commands_and_environment():
    cfg = LaunchConfig(command=("dstrain", "train"), launcher="mpirun", hosts="a:2,b:2")
    argv, env = build_command(cfg, {"PATH": "/bin", "NCCL_DEBUG": "INFO"}, cores_per_node=16)
    assert argv[:5] == ["mpirun", "-np", "4", "-H", "a:2,b:2"]
    assert argv[-2:] == ["dstrain", "train"]
    assert env["NCCL_DEBUG"] == "INFO"  # the user's setting wins
    assert env["OMP_NUM_THREADS"] == "8" and env["TF_NUM_INTRAOP_THREADS"] == "8"
    assert env["HOROVOD_FUSION_THRESHOLD"] == str(128 << 20)
    exported = {argv[i + 1] for i, a in enumerate(argv) if a == "-x"}
    assert {"PATH", "OMP_NUM_THREADS", "HOROVOD_CONTROLLER=mpi"} <= exported
    hvd, _ = build_command(LaunchConfig(command=("x",), np=2, log_dir="logs"), {}, cores_per_node=2)
    assert hvd == ["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", "--output-filename", "logs", "x"]
    with pytest.raises(ValueError, match="command"):
        LaunchConfig(command=())


FAILING_RANK = """
import os, sys, time
rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "-1")))
print(f"rank {rank} up", flush=True)
if rank == 1:
    time.sleep(2)
    sys.exit(3)
time.sleep(300)
"""


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_failing_rank_stops_the_job(launcher, tmp_path):
    marker = f"dstrain-fail-{uuid.uuid4().hex}"
    script = tmp_path / f"{marker}.py"
    script.write_text(FAILING_RANK)
    logs = tmp_path / "logs"
    # Rank 0 would sleep 300 s: the launcher returning within the timeout means it stopped rank 0 itself.
    proc = subprocess.run(
        [
            tool("dstrain"),
            "launch",
            "--launcher",
            launcher,
            "--np",
            "2",
            "--log_dir",
            str(logs),
            "--",
            sys.executable,
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    # The launcher waits for the ranks it stops: when it has returned, none may be left.
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    assert left.returncode == 1, f"processes left behind: {left.stdout}"  # pgrep: 1 when nothing matched
    per_rank = sorted(str(p.relative_to(logs)) for p in logs.rglob("stdout"))
    assert len(per_rank) == 2, per_rank
    assert_says("".join(p.read_text() for p in logs.rglob("stdout")), "rank 0 up")  # --output-filename's files


def test_cpu_ranks_get_their_share_of_the_cores_and_one_inter_op_thread_on_one_core():
    from dstrain.launch.launcher import rank_environment

    two_on_two = rank_environment(LaunchConfig(command=("x",), np=2), (), {}, cores_per_node=2)
    assert (two_on_two["TF_NUM_INTRAOP_THREADS"], two_on_two["TF_NUM_INTEROP_THREADS"]) == ("1", "1")
    two_on_sixteen = rank_environment(LaunchConfig(command=("x",), np=2), (), {}, cores_per_node=16)
    assert (two_on_sixteen["TF_NUM_INTRAOP_THREADS"], two_on_sixteen["TF_NUM_INTEROP_THREADS"]) == ("8", "2")
    # The cycle time is the rank's own choice (CPU or GPU), not the launcher's.
    assert "HOROVOD_CYCLE_TIME" not in two_on_two


def test_trainer_thread_defaults_for_cpu_ranks_sharing_a_node():
    from dstrain.distributed import cpu_threads

    assert cpu_threads(2, 2) == (1, 1)
    assert cpu_threads(1, 4) == (1, 1)
    assert cpu_threads(16, 2) == (8, 2)
    assert cpu_threads(2, 1) == (2, 2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("given, expected", [(None, "5"), ("2", "2")])
def test_cpu_ranks_default_to_a_5ms_horovod_cycle_unless_set(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "HOROVOD_CYCLE_TIME"}
    if given:
        env["HOROVOD_CYCLE_TIME"] = given
    code = (
        "import os; from dstrain.distributed import start_horovod; start_horovod(); "
        "print(os.environ['HOROVOD_CYCLE_TIME'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env, CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=110,
        check=True,
    )
    assert_says(out.stdout, last_line=expected)
