"""PeerWatch (dstrain/distributed/peer_watch.py) between two processes on this machine, with Horovod's broadcast
stood in for by a file: a stopped peer is named and welcomed back, a silent or killed one ends the watcher with status
76, a clean exit does not; connections that are not the job's ranks (a port scan, a silent connection, random bytes,
a HELLO without the job's secret) are closed and never end the job. The cluster in a box runs it under real launchers
(test_multinode.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from cluster import Output, wait_for
from conftest import assert_says

pytestmark = pytest.mark.timeout(120)
PEER_HELLO_S = 5.0  # PeerWatch.HELLO_S

RANK = textwrap.dedent("""
    import json, logging, os, sys, time
    from dstrain.distributed import PeerWatch

    rank, where, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])

    class FileBroadcast:  # Horovod's broadcast_object, through a file
        def rank(self): return rank
        def size(self): return 2
        def broadcast_object(self, obj, root_rank=0):
            if rank == 0:
                with open(where + ".tmp", "w") as f:
                    json.dump(obj, f)
                os.replace(where + ".tmp", where)
                return obj
            while not os.path.exists(where):
                time.sleep(0.01)
            return tuple(json.load(open(where)))

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    PeerWatch.GRACE_S = 1.0
    PeerWatch.start(FileBroadcast())
    open(f"{where}.watching.{rank}", "w").close()
    time.sleep(seconds)
    open(f"{where}.done.{rank}", "w").close()
""")


def start(rank: int, tmp_path, seconds: float) -> Output:
    env = dict(os.environ, DSTRAIN_PEER_WARN_SECONDS="1", DSTRAIN_PEER_TIMEOUT_SECONDS="4")
    proc = subprocess.Popen(
        [sys.executable, "-c", RANK, str(rank), str(tmp_path / "address"), str(seconds)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = Output(proc)
    watching = tmp_path / f"address.watching.{rank}"
    wait_for(lambda: watching.exists() or proc.poll() is not None, 60, f"rank {rank}'s watch to start")
    assert watching.exists(), f"rank {rank} exited with {proc.returncode}:\n{out.text[-3000:]}"
    return out


def done(tmp_path, rank: int) -> bool:
    """Whether the rank ran its time out (it writes the file as it leaves)."""
    return (tmp_path / f"address.done.{rank}").exists()


@pytest.fixture
def pair(tmp_path):
    procs = []

    def make(seconds0: float = 60, seconds1: float = 60):
        procs.extend([start(0, tmp_path, seconds0), start(1, tmp_path, seconds1)])
        return procs

    yield make
    for out in procs:
        if out.proc.poll() is None:
            out.proc.kill()
        out.finish(30)


def test_a_stopped_peer_is_named_welcomed_back_and_lost_if_it_stays_silent(pair):
    rank0, rank1 = pair()
    pid = rank1.proc.pid
    rank1.proc.send_signal(signal.SIGSTOP)
    rank0.wait_says(
        rf"WARNING rank 1 \(\S+:{pid}\) has been silent for 1 s \(stopped, overloaded, or its node unreachable\); "
        r"waiting for it, for at most 4 s",
        20,
    )
    rank1.proc.send_signal(signal.SIGCONT)
    rank0.wait_says(rf"WARNING rank 1 \(\S+:{pid}\) is heard from again", 20)
    rank1.proc.send_signal(signal.SIGSTOP)
    assert rank0.finish(30) == 76
    assert_says(rank0.text, "rank 1 (", f":{pid}) is lost: nothing heard from it for 4 s")
    rank1.proc.send_signal(signal.SIGCONT)
    # The stopped rank, once running, finds rank 0 gone and leaves too.
    assert rank1.finish(30) == 76
    assert_says(rank1.text, "rank 0 (", "is lost")


def test_a_killed_peer_is_lost_at_once(pair):
    rank0, rank1 = pair()
    rank1.proc.kill()
    assert rank0.finish(30) == 76
    assert_says(rank0.text, "is lost: its connection closed without a goodbye")


def test_a_clean_exit_says_goodbye(pair, tmp_path):
    rank0, rank1 = pair(seconds0=4, seconds1=0)
    assert rank1.finish(30) == 0
    assert rank0.finish(30) == 0 and done(tmp_path, 0)
    assert_says(rank0.text, lacks=("lost", "silent"))


def test_connections_that_are_not_ranks_of_the_job_are_closed_and_never_end_it(pair, tmp_path):
    """What a port scanner, a curious neighbour or another job's rank does to rank 0's port: the job goes on."""
    rank0, rank1 = pair(seconds0=12, seconds1=12)
    host, port, secret = json.load(open(tmp_path / "address"))

    def connect() -> socket.socket:
        return socket.create_connection((host, port), timeout=5)

    connect().close()  # connect and close, as a scanner does
    silent = connect()  # connect and stay silent
    noise = connect()
    noise.sendall(os.urandom(4096))  # random bytes (no line in the first 512)
    stranger = connect()
    stranger.sendall(f"HELLO 1 elsewhere:1 {'0' * len(secret)}\n".encode())  # a rank of another job
    # The watch closes every one of them (the silent one after its HELLO deadline) and answers none with its HELLO.
    for sock in (silent, noise, stranger):
        sock.settimeout(PEER_HELLO_S + 5)
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
    started = time.monotonic()
    assert rank1.finish(30) == 0 and rank0.finish(30) == 0, rank0.text + rank1.text
    assert time.monotonic() - started > 1  # they ran their time out, not ended early
    assert done(tmp_path, 0) and done(tmp_path, 1)
    assert_says(rank0.text, lacks=("is lost",))  # (a 1 s silence warning may come on a busy machine)
    assert_says(rank0.text + rank1.text, lacks=(secret,))  # never logged


def test_rank_0_listens_on_the_address_it_advertises_only(tmp_path, pair):
    pair(seconds0=3, seconds1=3)
    host, port, _ = json.load(open(tmp_path / "address"))
    listening = [c for c in psutil_connections() if c.status == "LISTEN" and c.laddr.port == port]
    assert [c.laddr.ip for c in listening] == [host]


def psutil_connections():
    import psutil

    return psutil.net_connections(kind="tcp")
