"""Training across the nodes of a cluster in a box (tools/cluster.sh), one CPU rank per node, through horovodrun
(Gloo over ssh), mpirun (Open MPI over ssh) and dstrain launch: the same weights as on one node; the interface the
nodes share found and handed to every layer; a pre-flight check that names each broken node; a dead, cut-off or
stopped node that never hangs the job, and a rerun on the nodes left that resumes from the last checkpoint."""

import os
import re
import signal
import time

import pytest
from cluster import Output, box, rank_env, stop_group, train_argv, wait_for
from conftest import assert_says, final_digests, records, synthetic_store, wait_record

pytestmark = pytest.mark.slow
MPIRUN = [
    "mpirun",
    "--allow-run-as-root",
    "--bind-to",
    "none",
    "-x",
    "PATH",
    "-x",
    "TF_DETERMINISTIC_OPS",
    "-x",
    "TF_CPP_MIN_LOG_LEVEL",
    "-x",
    "HOROVOD_CONTROLLER=mpi",
    "-x",
    "HOROVOD_CPU_OPERATIONS=mpi",
]
# The documented bounds (docs/failure-model.md, "When a node dies"): from the kill or the cut to the exit of every
# surviving rank.
BOUND_S = {"kill": 30, "cut": 75}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    # 41 utterances in row groups of 4 over 3 shards: divides evenly into neither ranks nor batches.
    return synthetic_store(
        tmp_path_factory.mktemp("multinode") / "s", 41, row_group_rows=4, shard_rows=15, frames=(40, 90), seed=11
    )


def hostfile(tmp_path, *hosts: str) -> str:
    path = tmp_path / "hosts"
    path.write_text("".join(f"{h} slots=1\n" for h in hosts))
    return str(path)


@pytest.mark.timeout(900)
def test_horovodrun_and_mpirun_across_nodes_give_the_weights_of_one_node(store, tmp_path):
    with box(tmp_path / "c", 2) as c:
        runs = {
            "one node": ["horovodrun", "-np", "2", "-H", "node1:2", "--gloo"],
            "horovodrun": ["horovodrun", "-np", "2", "-H", "node1:1,node2:1", "--gloo"],
            "mpirun": MPIRUN + ["-np", "2", "-H", "node1,node2"],
        }
        outputs, listings = {}, {}
        for name, launcher in runs.items():
            run_dir = tmp_path / name.replace(" ", "_")
            out = Output(c.popen("node1", *launcher, *train_argv(store, run_dir, epochs=3), env=rank_env()))
            try:
                if name == "horovodrun":
                    stall_and_resume_rank_1(c, out, run_dir)
                assert out.finish(400) == 0, f"{name}:\n{out.text[-4000:]}"
            finally:
                stop_group(out.proc)
            outputs[name] = out.text
            listings[name] = sorted(os.listdir(run_dir))
            # Only rank 0 writes: its log (a file a person reads) has no other rank's lines, and its run directory is
            # one writer's.
            assert_says((run_dir / "train.log").read_text(), "rank 0 INFO", lacks=("rank 1 INFO",))
        digests = {name: final_digests(tmp_path / name.replace(" ", "_")) for name in runs}
        for name, d in digests.items():
            assert len(d) == 2 and len(set(d)) == 1, f"{name}: {d}"
        assert digests["horovodrun"] == digests["mpirun"] == digests["one node"]
        assert listings["horovodrun"] == listings["mpirun"] == listings["one node"]
        # Two ranks shared node1 in the reference, and had a node each in the others (Horovod's local size).
        starts = {name: records(tmp_path / name.replace(" ", "_"), "start")[0] for name in runs}
        assert starts["one node"]["hosts"] == ["node1", "node1"]
        assert starts["horovodrun"]["hosts"] == starts["mpirun"]["hosts"] == ["node1", "node2"]
        assert starts["horovodrun"]["controller"] == "gloo" and starts["mpirun"]["controller"] == "mpi"
        # ... and were told so (a warning to a person: they share the node's cores).
        assert_says(outputs["one node"], "2 CPU ranks on this node")
        assert_says(outputs["horovodrun"] + outputs["mpirun"], lacks=("2 CPU ranks on this node",))


def stall_and_resume_rank_1(c, out: Output, run_dir) -> None:
    """SIGSTOP rank 1 on node2 once training runs: rank 0 names it while it waits, before any timeout (Gloo's is
    30 s); SIGCONT, and the job goes on (to the same weights, which the caller checks)."""
    wait_record(run_dir, "epoch", timeout=300, proc=out.proc)
    (rank1,) = c.ranks("node2")
    os.kill(rank1, signal.SIGSTOP)
    try:
        out.wait_says(rf"rank 1 \(node2:{rank1}\) has been silent for \d+ s", 25)
    finally:
        os.kill(rank1, signal.SIGCONT)
    out.wait_says(rf"rank 1 \(node2:{rank1}\) is heard from again", 20)


@pytest.mark.timeout(300)
def test_launch_picks_the_interface_the_nodes_share_and_hands_it_to_every_layer(store, tmp_path):
    hosts = hostfile(tmp_path, "node1", "node2")
    rank_command = train_argv(store, tmp_path / "run")
    with box(tmp_path / "c", 2) as c:
        launch = ["dstrain", "launch", "--dry_run", "--hostfile", hosts]
        hvd = c.run("node1", *launch, "--", *rank_command, env=rank_env()).stdout
        assert_says(
            hvd,
            "network interface eth0 (10.213.0.0/24), shared by every node",
            patterns=(r"horovodrun -np 2 -H node1:1,node2:1 --gloo --network-interfaces eth0 ",),
        )
        mpi = c.run("node1", *launch, "--launcher", "mpirun", "--", *rank_command, env=rank_env()).stdout
        assert_says(
            mpi,
            "--mca btl_tcp_if_include eth0 --mca oob_tcp_if_include eth0",
            "-x NCCL_SOCKET_IFNAME",
            "-x HOROVOD_GLOO_IFACE",
            "oob_tcp_keepalive_time",
        )
        given = c.run("node1", *launch, "--network_interface", "eth0", "--", *rank_command, env=rank_env()).stdout
        assert_says(given, "network interface eth0 (10.213.0.0/24), given")
        wrong = c.run("node1", *launch, "--network_interface", "ib0", "--", *rank_command, env=rank_env())
        assert wrong.returncode == 2, wrong.stdout
        assert_says(
            wrong.stdout,
            "node1: no network interface ib0",
            "node2: no network interface ib0 with an IPv4 address (it has eth0 10.213.0.12/24, lo 127.0.0.1/8)",
        )


@pytest.mark.timeout(300)
def test_preflight_check_names_each_broken_node_and_its_fix(store, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rank_command = train_argv(store, run_dir)
    with box(tmp_path / "c", 2) as c:
        check = [
            "dstrain",
            "launch",
            "--check",
            "--hostfile",
            hostfile(tmp_path, "node1", "node2"),
            "--",
            *rank_command,
        ]

        def problems() -> list[str]:
            out = c.run("node1", *check, env=rank_env())
            assert out.returncode != 0, out.stdout
            return re.findall(r"^  (\S+: .*)$", out.stdout, re.M)

        ok = c.run("node1", *check, env=rank_env())
        assert ok.returncode == 0, ok.stdout
        assert_says(ok.stdout, "pre-flight check passed on node1, node2")
        assert not [
            f for f in os.listdir(run_dir) if f.startswith(".dstrain-check")
        ], "tokens left in the run directory"

        # node2's name mapped to loopback, as Debian and Ubuntu do by default.
        hosts = c.hosts_file("node2")
        healthy = hosts.read_text()
        with open(hosts, "w") as f:  # in place: node2 holds the file by inode
            f.write(healthy.replace("10.213.0.12\tnode2", "127.0.1.1\tnode2"))
        (line,) = problems()
        loopback = r"\Anode2: its hostname node2 resolves to 127\.0\.1\.1 \(loopback\)"
        assert_says(line, "10.213.0.12", patterns=(loopback,))
        with open(hosts, "w") as f:
            f.write(healthy)

        # Storage node2 does not see: the store, then the run directory (node2 has its own, empty, folders there).
        for path, expected in (
            (store, f"node2: cannot see the feature store {store}"),
            (str(run_dir), f"node2: does not see the file the launching node wrote in the run directory {run_dir}"),
        ):
            assert c.run("node2", "mount", "-t", "tmpfs", "none", path).returncode == 0
            (line,) = problems()
            assert_says(line, patterns=(r"\A" + re.escape(expected),))
            assert c.run("node2", "umount", path).returncode == 0

        # The run directory read-only on node2, and another Horovod there.
        assert (
            c.run(
                "node2", "sh", "-c", f"mount --bind {run_dir} {run_dir} && mount -o remount,bind,ro {run_dir}"
            ).returncode
            == 0
        )
        (line,) = problems()
        read_only = f"node2: cannot write in the run directory {run_dir}: Read-only file system"
        assert_says(line, patterns=(r"\A" + re.escape(read_only),))
        assert c.run("node2", "umount", str(run_dir)).returncode == 0
        from importlib.metadata import distribution

        metadata = distribution("horovod")._path / "METADATA"
        fake = tmp_path / "METADATA"
        fake.write_text(metadata.read_text().replace("Version: 0.28.1", "Version: 0.28.0"))
        assert c.run("node2", "mount", "--bind", str(fake), str(metadata)).returncode == 0
        (line,) = problems()
        assert_says(line, patterns=(r"\A" + re.escape("node2: horovod 0.28.0 (here 0.28.1): install the same"),))
        assert c.run("node2", "umount", str(metadata)).returncode == 0

        # A node that cannot be reached: the launch itself refuses to start, before any rank.
        c.kill("node2")
        launch = c.run(
            "node1",
            "dstrain",
            "launch",
            "--hostfile",
            hostfile(tmp_path, "node1", "node2"),
            "--",
            *rank_command,
            env=rank_env(),
        )
        assert launch.returncode == 2, launch.stdout
        assert_says(
            launch.stdout,
            lacks=("horovodrun",),
            patterns=(
                r"^  node2: could not run the check there \(ssh: connect to host node2 port 22: Connection refused\)",
            ),
        )
        assert not [f for f in os.listdir(run_dir) if f.startswith(".dstrain-check")]


def launch_argv(launcher: str, hosts: str, store: str, run_dir) -> list[str]:
    """3 epochs of ~20 steps per rank, a checkpoint every 3 steps, started from node1 (the driver and rank 0)."""
    return [
        "dstrain",
        "launch",
        "--launcher",
        launcher,
        "--hostfile",
        hosts,
        "--",
        *train_argv(store, run_dir, "--checkpoint_steps", "3", epochs=3, batch=1),
    ]


def start_training(c, launcher: str, hosts: str, store: str, run_dir) -> Output:
    """The training of :func:`launch_argv`, once rank 0 has saved a checkpoint inside epoch 2."""
    out = Output(c.popen("node1", *launch_argv(launcher, hosts, store, run_dir), env=rank_env()))
    try:
        # Rank 0's checkpoint inside epoch 2 (one epoch done, a step of the next).
        wait_record(run_dir, "checkpoint", lambda r: r["epoch"] == 1 and r["epoch_step"] >= 1, 300, out.proc)
    except BaseException:
        stop_group(out.proc)
        raise
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "launcher, failure, rerun",
    [("horovodrun", "kill", True), ("horovodrun", "cut", False), ("mpirun", "kill", False), ("mpirun", "cut", True)],
)
def test_a_dead_node_stops_every_rank_and_a_rerun_on_the_nodes_left_resumes(launcher, failure, rerun, store, tmp_path):
    run_dir = tmp_path / "run"
    with box(tmp_path / "c", 2) as c:
        out = start_training(c, launcher, hostfile(tmp_path, "node1", "node2"), store, run_dir)
        try:
            t0 = time.monotonic()
            getattr(c, failure)("node2")
            # Every survivor exits: the launcher, and rank 0 beside it on node1.
            wait_for(
                lambda: out.proc.poll() is not None and not c.ranks("node1"),
                BOUND_S[failure] + 30,
                f"the survivors to exit after node2's {failure}",
                poll=0.5,
            )
            elapsed = time.monotonic() - t0
        finally:
            stop_group(out.proc)
        out.finish(30)
        assert out.proc.returncode != 0
        assert (
            elapsed < BOUND_S[failure]
        ), f"the survivors took {elapsed:.0f} s after node2's {failure}:\n{out.text[-3000:]}"
        # Whichever notices first names it: PeerWatch, mpirun losing its daemon there, or Open MPI in rank 0 losing
        # its peer.
        assert_says(
            out.text,
            patterns=(
                r"rank 1 \(node2:\d+\) (is lost|had been silent|had closed)|lost communication with a remote daemon"
                r"(?s:.*)node2|Peer host:\s+node2",
            ),
        )
        print(f"{launcher}, node2 {failure}: survivors gone after {elapsed:.1f} s")
        if not rerun:  # the rerun is the same whatever stopped the job: once per launcher
            return
        # The same command on the node that is left: from the last checkpoint, the epoch's rest re-partitioned.
        again = c.run(
            "node1", *launch_argv(launcher, hostfile(tmp_path, "node1"), store, run_dir), env=rank_env(), timeout=400
        )
        assert again.returncode == 0, again.stdout[-4000:]
        (resume,) = records(run_dir, "resume")
        assert resume["epoch_step"] > 0, resume  # from the checkpoint inside epoch 2
        resumed = [r for r in records(run_dir, "epoch") if r["resumed_at_step"]]
        assert resumed and not resumed[0]["exact"], resumed
        assert_says(again.stdout, "re-partitioned over 1 ranks")  # and a person is told so
        assert len(final_digests(run_dir)) == 1
