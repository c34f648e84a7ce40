"""Elastic launches: the horovodrun command dstrain launch --elastic writes, and the host discovery scripts it ships
(a hostfile an operator edits, a SLURM allocation minus its nodes that are down, a Kubernetes job's ready pods),
run as Horovod runs them, with fake scontrol/sinfo/kubectl on PATH."""

import os
import shlex
import subprocess

import pytest
from conftest import assert_says

from dstrain.launch.launcher import DISCOVERY, LaunchConfig, build_command


def discover(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [os.path.join(DISCOVERY, script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def fake_tools(tmp_path, **outputs: str) -> dict:
    """Executables on PATH printing fixed output (for ``sinfo`` etc.); returns the environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in outputs.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/{name}.args\nprintf '%s' {shlex.quote(text)}\n")
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_hostfile_discovery_reads_mpi_and_horovod_lines_as_edited(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# the job's nodes\nnode1 slots=4\nnode2:2\nnode3   # back after repair\n\n")
    out = discover("hostfile.sh", str(hosts))
    assert out.returncode == 0, out.stderr
    assert_says(out.stdout, exactly="node1:4\nnode2:2\nnode3:1\n")
    hosts.write_text("node1 slots=4\n")  # an operator takes two nodes out
    assert_says(discover("hostfile.sh", str(hosts)).stdout, exactly="node1:4\n")
    assert_says(discover("hostfile.sh", str(hosts), env={"DSTRAIN_SLOTS": "8"}).stdout, exactly="node1:4\n")
    # Missing (being replaced): a failure Horovod retries, not an empty world.
    gone = discover("hostfile.sh", str(tmp_path / "nope"))
    assert gone.returncode != 0
    assert_says(gone.stderr, "cannot read")


def test_slurm_discovery_leaves_out_nodes_slurm_reports_down(tmp_path):
    env = fake_tools(tmp_path, scontrol="gpu01\ngpu02\ngpu03\n", sinfo="gpu02\n")
    env.update(SLURM_JOB_NODELIST="gpu[01-03]", SLURM_NTASKS_PER_NODE="8")
    out = discover("slurm.sh", env=env)
    assert out.returncode == 0, out.stderr
    assert_says(out.stdout, exactly="gpu01:8\ngpu03:8\n")
    assert_says((tmp_path / "sinfo.args").read_text(), "-t down,drain")  # what it asked sinfo
    env = fake_tools(tmp_path, scontrol="gpu01\ngpu02\n", sinfo="")
    whole = discover("slurm.sh", env={**env, "SLURM_JOB_NODELIST": "gpu[01-02]"})
    assert_says(whole.stdout, exactly="gpu01:1\ngpu02:1\n")
    outside = discover("slurm.sh", env={"SLURM_JOB_NODELIST": ""})
    assert outside.returncode != 0
    assert_says(outside.stderr, "not inside a SLURM allocation")


def test_kubernetes_discovery_lists_ready_pods_of_the_label(tmp_path):
    env = fake_tools(tmp_path, kubectl="10.0.0.5 True\n10.0.0.6 False\n10.0.0.7 True\n")
    out = discover("kubernetes.sh", "job-name=ds,role=worker", env={**env, "DSTRAIN_SLOTS": "2"})
    assert out.returncode == 0, out.stderr
    assert_says(out.stdout, exactly="10.0.0.5:2\n10.0.0.7:2\n")
    assert_says((tmp_path / "kubectl.args").read_text(), "-l job-name=ds,role=worker")  # what it asked kubectl


def test_elastic_launch_writes_horovodrun_elastic_with_discovery(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=1\nnode2 slots=1\nnode3 slots=1\n")
    cfg = LaunchConfig(command=("dstrain", "train", "--epochs", "2"), elastic=True, min_np=2, hostfile=str(hosts))
    argv, env = build_command(cfg, {"PATH": "/bin"}, cores_per_node=4)
    assert argv[:3] == ["horovodrun", "-np", "3"] and "--gloo" in argv
    assert argv[argv.index("--min-np") + 1] == "2" and argv[argv.index("--max-np") + 1] == "3"
    script = argv[argv.index("--host-discovery-script") + 1]
    assert script.endswith(f"hostfile.sh {hosts}")
    assert argv[-4:] == ["train", "--epochs", "2", "--elastic"]  # the ranks train elastically
    assert "-H" not in argv  # hosts come from discovery alone
    with pytest.raises(ValueError, match="Gloo"):
        LaunchConfig(command=("x",), elastic=True, launcher="mpirun", hostfile=str(hosts))
    with pytest.raises(ValueError, match="hosts that can change"):
        build_command(LaunchConfig(command=("x",), elastic=True, np=2), {}, cores_per_node=4)
