"""Elastic training on the cluster in a box (tools/cluster.sh), one CPU rank per node, under horovodrun's elastic
driver on node1 (never failed: the driver is the job's single point of failure) with dstrain's hostfile discovery:
a node killed or cut off mid-epoch and the survivors go on without restarting; the node listed again joins and gets
the state; below --min_np the job fails with a clear message and a loadable checkpoint; without failures the weights
are those of the same job without --elastic. Every committed step's sample ids are in the run record (samples
events), so the tests check that no training sample is lost or repeated across resets."""

import collections
import os
import signal
import sys
from pathlib import Path

import pytest
from cluster import Output, box, rank_env, stop_group, train_argv, wait_for
from conftest import assert_says, final_digests, records, run_record, synthetic_store, wait_record

pytestmark = pytest.mark.slow
HOLD = Path(__file__).parent / "elastic_hold.py"
N_UTTERANCES = 41
EPOCHS = 4
# A failure needs the job to outlast its detection (up to Gloo's 30 s), a reset and a rejoin (each retraces the
# step): the failure tests give it epochs for hours and end it themselves (a stop request, or the failure).
UNTIL_STOPPED = 10_000
# The documented bound (docs/elastic.md, "Bounds"): from the kill or the cut to the survivors' reset record.
RESET_BOUND_S = {"kill": 60, "cut": 90}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    # 41 utterances in row groups of 4 over 3 shards: divides evenly into neither 2 nor 3 ranks nor batches.
    return synthetic_store(
        tmp_path_factory.mktemp("elastic") / "s",
        N_UTTERANCES,
        row_group_rows=4,
        shard_rows=15,
        frames=(40, 90),
        seed=11,
    )


def write_hosts(path, *nodes: str) -> None:
    """The hostfile the discovery script reads every second; replaced whole, as an operator's editor would."""
    tmp = path.with_suffix(".new")
    tmp.write_text("".join(f"{n} slots=1\n" for n in nodes))
    tmp.replace(path)


def elastic_job(
    c,
    store: str,
    run_dir,
    hosts,
    *extra: str,
    min_np: int = 2,
    timeout: int = 60,
    epochs: int = EPOCHS,
    hold: tuple[int, object] | None = None,
) -> Output:
    """The elastic job; ``hold`` = (commit, marker): its rank 0 holds inside that commit (tests/elastic_hold.py)."""
    train = train_argv(store, run_dir, "--elastic_commit_steps", "2", "--record_samples", *extra, epochs=epochs)
    if hold is not None:  # not `dstrain train` for the launcher to recognise: --elastic by hand
        train = [sys.executable, str(HOLD), str(hold[0]), str(hold[1]), *train[1:], "--elastic"]
    argv = [
        "dstrain",
        "launch",
        "--elastic",
        "--min_np",
        str(min_np),
        "--max_np",
        "3",
        "--hostfile",
        str(hosts),
        "--elastic_timeout",
        str(timeout),
        "--blacklist_cooldown",
        "1,2",
        "--",
        *train,
    ]
    return Output(c.popen("node1", *argv, env=rank_env(PYTHONFAULTHANDLER="1")))


def check_samples(run_dir, epochs: int | None = EPOCHS) -> None:
    """Every epoch used every training utterance exactly once (the pad repeats left out), counting only committed
    steps: the samples records hold just those. ``epochs=None``: a job stopped mid-epoch, whose last epoch used each
    utterance at most once."""
    used = collections.defaultdict(collections.Counter)
    for r in records(run_dir, "samples"):
        used[r["number"]].update(r["ids"])
    assert sorted(used) == list(range(1, (epochs or max(used)) + 1)), sorted(used)
    for epoch, counts in used.items():
        assert set(counts.values()) == {1}, (epoch, {i: n for i, n in counts.items() if n != 1})
        if epochs is None and epoch == max(used):
            continue
        assert sorted(counts) == list(range(N_UTTERANCES)), (epoch, sorted(set(range(N_UTTERANCES)) - set(counts)))


def finished(out: Output, run_dir, ranks: int) -> list[str]:
    assert out.finish(600) == 0, out.text[-6000:]
    digests = final_digests(run_dir)
    assert len(digests) == ranks and len(set(digests)) == 1, digests
    return digests


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("failure", ["kill", "cut"])
def test_a_lost_node_leaves_the_others_training_and_it_rejoins_when_back(store, tmp_path, failure):
    with box(tmp_path / "c", 3) as c:
        hosts, run_dir = tmp_path / "hosts", tmp_path / "run"
        write_hosts(hosts, "node1", "node2", "node3")
        out = elastic_job(c, store, run_dir, hosts, epochs=UNTIL_STOPPED)
        try:
            wait_record(run_dir, "epoch", timeout=400, proc=out.proc)
            victim = lost_node(run_dir)
            survivors = sorted({"node1", "node2", "node3"} - {victim})
            pids = {n: c.ranks(n) for n in survivors}
            # Lost mid-epoch: the hostfile no longer lists it either (an operator, or SLURM marking it down).
            write_hosts(hosts, *survivors)
            getattr(c, failure)(victim)
            resets = wait_reset(out, run_dir, 2, RESET_BOUND_S[failure])
            assert sorted(resets[-1]["hosts"]) == survivors  # rank 0 may now be on another node
            # The survivors went on in the processes they started in.
            assert {n: c.ranks(n) for n in survivors} == pids
            # Back: the node comes up again and the hostfile lists it.
            c.revive(victim) if failure == "kill" else c.heal(victim)
            write_hosts(hosts, "node1", "node2", "node3")
            back = wait_reset(out, run_dir, 3, 300)[-1]
            # The three ranks commit steps together; then a stop request ends the job (it would train on for hours).
            wait_record(run_dir, "samples", lambda r: r["time"] > back["time"], timeout=300, proc=out.proc)
            os.kill(c.ranks("node1")[0], signal.SIGUSR1)
            code = out.finish(300)
        finally:
            stop_group(out.proc)
            (tmp_path / "job.log").write_text(out.text)
    assert code == 75, out.text[-6000:]
    sizes = [r["world_size"] for r in records(run_dir, "reset")]
    assert 2 in sizes and sizes[-1] == 3, sizes
    check_samples(run_dir, None)
    # Whoever was rank 0 numbered its checkpoints after those already there: none was written over.
    paths = [r["path"] for r in records(run_dir, "checkpoint")]
    assert len(set(paths)) == len(paths), paths
    (stop,) = records(run_dir, "stop")
    assert stop["checkpoint"] and len(stop["weights_sha256"]) == 3 and len(set(stop["weights_sha256"])) == 1, stop


@pytest.mark.timeout(900)
def test_a_rank_0_lost_inside_a_commit_leaves_its_samples_to_the_next_rank_0(store, tmp_path):
    """Rank 0 killed after every rank kept the commit's state and before it recorded the commit's samples: the
    survivors go on from that state, so the rank 0 after it records them (else they would be trained and unrecorded)."""
    commit, marker = 3, tmp_path / "held"
    with box(tmp_path / "c", 3) as c:
        hosts, run_dir = tmp_path / "hosts", tmp_path / "run"
        write_hosts(hosts, "node1", "node2", "node3")
        out = elastic_job(c, store, run_dir, hosts, hold=(commit, marker))
        try:
            wait_for(lambda: marker.exists() or out.proc.poll() is not None, 400, "rank 0 held inside its commit")
            assert marker.exists(), out.text[-6000:]
            os.kill(int(marker.read_text()), signal.SIGKILL)
            (reset, *_) = wait_reset(out, run_dir, 2, RESET_BOUND_S["kill"])
            # Horovod lets the host back after --blacklist_cooldown: the job may end on 2 or 3 ranks.
            assert out.finish(600) == 0, out.text[-6000:]
            digests = final_digests(run_dir)
            assert len(digests) == records(run_dir, "reset")[-1]["world_size"] and len(set(digests)) == 1, digests
        finally:
            stop_group(out.proc)
            (tmp_path / "job.log").write_text(out.text)
    events = [r for r in run_record(run_dir) if r["event"] in ("reset", "samples")]
    held = [i for i, r in enumerate(events) if r["event"] == "samples" and r.get("commit") == commit]
    assert held and held[0] > events.index(reset), events  # recorded after the reset, by the new rank 0
    check_samples(run_dir)


def lost_node(run_dir) -> str:
    """The node to fail: rank 0's (Horovod's driver places ranks in no fixed order), so that a new rank 0 takes over,
    unless rank 0 is on node1, which runs the driver and must stay (then the next rank's)."""
    (start,) = records(run_dir, "start")
    return next(h for h in start["hosts"] if h != "node1")


def wait_reset(out: Output, run_dir, size: int, timeout: float) -> list[dict]:
    """Waits for the run record's reset to a world of ``size``; returns the resets so far."""

    def reset():
        if out.proc.poll() is not None:
            pytest.fail(f"exited with {out.proc.returncode} before a reset to {size} ranks:\n{out.text[-6000:]}")
        found = records(run_dir, "reset") if (run_dir / "metrics.jsonl").exists() else []
        return found if any(r["world_size"] == size for r in found) else None

    return wait_for(reset, timeout, f"a reset to {size} ranks in the run record", poll=0.5)


@pytest.mark.timeout(1200)
def test_without_failures_elastic_gives_the_weights_of_a_plain_run(store, tmp_path):
    with box(tmp_path / "c", 3) as c:
        hosts = tmp_path / "hosts"
        write_hosts(hosts, "node1", "node2", "node3")
        out = elastic_job(c, store, tmp_path / "elastic", hosts)
        try:
            elastic = finished(out, tmp_path / "elastic", 3)
        finally:
            stop_group(out.proc)
        plain = Output(
            c.popen(
                "node1",
                "horovodrun",
                "-np",
                "3",
                "-H",
                "node1:1,node2:1,node3:1",
                "--gloo",
                *train_argv(store, tmp_path / "plain", epochs=EPOCHS),
                env=rank_env(),
            )
        )
        try:
            assert plain.finish(600) == 0, plain.text[-4000:]
        finally:
            stop_group(plain.proc)
    assert final_digests(tmp_path / "plain") == elastic
    assert records(tmp_path / "elastic", "reset") == []
    check_samples(tmp_path / "elastic")


@pytest.mark.timeout(900)
def test_below_min_np_the_job_fails_after_the_timeout_with_a_checkpoint(store, tmp_path):
    with box(tmp_path / "c", 3) as c:
        hosts, run_dir = tmp_path / "hosts", tmp_path / "run"
        write_hosts(hosts, "node1", "node2", "node3")
        out = elastic_job(c, store, run_dir, hosts, min_np=3, timeout=20, epochs=UNTIL_STOPPED)
        try:
            wait_record(run_dir, "epoch", timeout=400, proc=out.proc)
            # After the epoch's checkpoint (a kill of rank 0 during it leaves the one before: none yet here).
            wait_for(
                lambda: (run_dir / "metrics.jsonl").exists() and records(run_dir, "checkpoint"), 120, "a checkpoint"
            )
            victim = lost_node(run_dir)
            write_hosts(hosts, *sorted({"node1", "node2", "node3"} - {victim}))
            c.kill(victim)
            code = out.finish(300)
        finally:
            stop_group(out.proc)
            (tmp_path / "job.log").write_text(out.text)
    assert code != 0
    assert_says(out.text, "error: fewer than --min_np 3 ranks' hosts for --elastic_timeout 20 s")
    # The last checkpoint loads: a plain rerun would resume from it.
    from dstrain.rundir import RunDir

    rd = RunDir(str(run_dir))
    path = rd.latest_checkpoint()
    assert path, sorted(p.name for p in run_dir.iterdir())
    rd.restore_model(path)


@pytest.mark.timeout(1200)
def test_a_stop_request_checkpoints_exits_75_and_the_rerun_resumes(store, tmp_path):
    with box(tmp_path / "c", 3) as c:
        hosts, run_dir = tmp_path / "hosts", tmp_path / "run"
        write_hosts(hosts, "node1", "node2", "node3")
        out = elastic_job(c, store, run_dir, hosts)
        try:
            wait_record(run_dir, "epoch", timeout=400, proc=out.proc)
            (rank,) = c.ranks("node2")
            os.kill(rank, signal.SIGUSR1)  # one rank is told (a spot notice on its node): the whole job stops
            code = out.finish(300)
        finally:
            stop_group(out.proc)
            (tmp_path / "job.log").write_text(out.text)
        assert code == 75, out.text[-4000:]
        (stop,) = records(run_dir, "stop")
        assert stop["signal"] == "SIGUSR1" and stop["exit_code"] == 75 and stop["checkpoint"], stop
        # The same command again resumes from that checkpoint and completes every epoch's samples exactly once.
        again = elastic_job(c, store, run_dir, hosts)
        try:
            finished(again, run_dir, 3)
        finally:
            stop_group(again.proc)
    (resume,) = records(run_dir, "resume")
    assert resume["checkpoint"] == stop["checkpoint"]
    check_samples(run_dir)
