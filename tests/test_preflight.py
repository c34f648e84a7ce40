"""dstrain launch's pre-flight check, judged on nodes' answers made up here (the cluster in a box runs it for real in
test_multinode.py): which interface it picks, and the one line per problem it writes."""

import json
import subprocess
import sys

import pytest

from dstrain.launch.launcher import LaunchConfig, build_command
from dstrain.launch.preflight import PreflightError, choose_interface, command_paths, problems, versions

REFERENCE = {"dstrain": "0.1.0", "tensorflow": "2.15.1", "horovod": "0.28.1", "python": "3.11.2"}


def answer(node: str, address: str, resolves: list[str] | None = None, **changes) -> dict:
    a = {
        "as": node,
        "hostname": node,
        "resolves": [address] if resolves is None else resolves,
        "interfaces": {"lo": ["127.0.0.1/8"], "eth0": [f"{address}/24"], "docker0": ["172.17.0.1/16"]},
        "peers": {"node1": ["10.0.0.1"], "node2": ["10.0.0.2"]},
        "versions": dict(REFERENCE),
        "stores": {"/shared/s": ""},
        "run_dirs": {"/shared/run": ""},
    }
    a.update(changes)
    return a


def test_the_interface_the_hostnames_resolve_to_wins_over_another_shared_one():
    answers = {"node1": answer("node1", "10.0.0.1"), "node2": answer("node2", "10.0.0.2")}
    chosen = choose_interface(answers)
    assert (chosen.name, chosen.network, str(chosen)) == ("eth0", "10.0.0.0/24", "eth0 (10.0.0.0/24)")
    assert choose_interface(answers, "docker0").name == "docker0"
    # Routed nodes (a network each) still share an interface name.
    routed = {"node1": answer("node1", "10.0.1.1"), "node2": answer("node2", "10.0.2.1")}
    assert (choose_interface(routed).name, choose_interface(routed).network) == ("eth0", "")


def test_no_shared_interface_or_a_missing_one_is_named():
    a1, a2 = answer("node1", "10.0.0.1"), answer("node2", "10.0.0.2")
    a2["interfaces"] = {"lo": ["127.0.0.1/8"], "ib0": ["10.1.0.2/16"]}
    a1["interfaces"].pop("docker0")
    with pytest.raises(
        PreflightError,
        match=r"no network interface with an IPv4 address is shared by every node \(node1: eth0 "
        r"10.0.0.1/24, lo 127.0.0.1/8; node2: ib0 10.1.0.2/16, lo 127.0.0.1/8\)",
    ):
        choose_interface({"node1": a1, "node2": a2})
    with pytest.raises(PreflightError, match=r"^node2: no network interface eth0 with an IPv4 address \(it has ib0 "):
        choose_interface({"node1": a1, "node2": a2}, "eth0")


def test_each_problem_is_one_line_naming_the_node_and_the_fix():
    request = {"hosts": ["node1", "node2"]}
    answers = {"node1": answer("node1", "10.0.0.1"), "node2": answer("node2", "10.0.0.2")}
    eth0 = choose_interface(answers)
    assert problems(answers, eth0, request, REFERENCE) == []
    broken = {
        "node1": answer("node1", "10.0.0.1", resolves=["127.0.1.1"], stores={"/shared/s": "no _manifest.json there"}),
        "node2": answer(
            "node2",
            "10.0.0.2",
            peers={"node1": ["10.9.9.9"], "node2": ["10.0.0.2"]},
            run_dirs={"/shared/run": "unseen"},
            versions={**REFERENCE, "horovod": "0.28.0"},
        ),
        "node3": "ssh: connect to host node3 port 22: No route to host",
    }
    lines = problems(broken, eth0, request, REFERENCE)
    assert lines[0].startswith(
        "node3: could not run the check there (ssh: connect to host node3 port 22: No route to host)"
    )
    assert (
        lines[1].startswith("node1: its hostname node1 resolves to 127.0.1.1 (loopback)")
        and "10.0.0.1 in /etc/hosts" in lines[1]
    )
    assert lines[2].startswith(
        "node2: resolves node1 to 10.9.9.9, not to node1's eth0 address 10.0.0.1: fix /etc/hosts or DNS on node2"
    )
    assert lines[3].startswith("node1: cannot see the feature store /shared/s (no _manifest.json there)")
    assert lines[4].startswith("node2: does not see the file the launching node wrote in the run directory /shared/run")
    assert lines[5].startswith("node2: horovod 0.28.0 (here 0.28.1): install the same")
    assert len(lines) == 6 and all("\n" not in line for line in lines)
    unresolved = problems({"node1": answer("node1", "10.0.0.1", resolves=[])}, eth0, {"hosts": []}, REFERENCE)
    assert unresolved == [
        "node1: its hostname node1 does not resolve: map it to its eth0 address 10.0.0.1 in /etc/hosts or DNS"
    ]


def test_stores_and_run_directories_come_from_the_rank_command(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("dev_files: [/s/dev1, /s/dev2]\ncheckpoint_dir: /runs/from_yaml\n")
    command = (
        "dstrain",
        "train",
        "--train_files=/s/a,/s/b",
        "--test_files",
        "memory://t",
        "--config",
        str(config),
        "--save_checkpoint_dir",
        "/runs/save",
        "--checkpoint_dir",
        "/runs/r1",
    )
    assert command_paths(command) == (["/s/a", "/s/b", "/s/dev1", "/s/dev2"], ["/runs/r1", "/runs/save"])


def test_a_node_answers_about_itself(tmp_path):
    from dstrain.launch.preflight import TOKEN

    run = tmp_path / "run"
    run.mkdir()
    (run / f"{TOKEN}abc").write_text("abc")
    request = {
        "as": "me",
        "hosts": ["localhost"],
        "stores": [str(tmp_path / "nowhere")],
        "run_dirs": [str(run)],
        "token": "abc",
    }
    out = subprocess.run(
        [sys.executable, "-m", "dstrain.launch.preflight", json.dumps(request)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    a = json.loads(out.stdout)
    assert (
        a["versions"] == versions() and a["run_dirs"] == {str(run): ""} and (run / f"{TOKEN}abc-me").read_text() == "me"
    )
    assert (
        a["stores"] == {str(tmp_path / "nowhere"): "no _manifest.json there"} and "127.0.0.1" in a["peers"]["localhost"]
    )
    assert "lo" in a["interfaces"]


def test_the_chosen_interface_reaches_every_layer():
    cfg = LaunchConfig(command=("dstrain", "train"), launcher="mpirun", hosts="a:1,b:1")
    argv, env = build_command(
        cfg, {"PATH": "/bin", "DSTRAIN_PEER_TIMEOUT_SECONDS": "20"}, cores_per_node=2, interface="ib0"
    )
    assert "btl_tcp_if_include ib0 --mca oob_tcp_if_include ib0" in " ".join(argv)
    assert env["NCCL_SOCKET_IFNAME"] == "ib0" and {"NCCL_SOCKET_IFNAME", "DSTRAIN_PEER_TIMEOUT_SECONDS"} <= set(argv)
    hvd, env = build_command(LaunchConfig(command=("x",), hosts="a:1,b:1"), {}, cores_per_node=2, interface="ib0")
    assert hvd[:8] == ["horovodrun", "-np", "2", "-H", "a:1,b:1", "--gloo", "--network-interfaces", "ib0"]
    assert env["HOROVOD_GLOO_IFACE"] == "ib0" and env["HOROVOD_GLOO_TIMEOUT_SECONDS"] == "30"
