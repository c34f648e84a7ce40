"""The cluster in a box (tools/cluster.sh) for tests: :func:`box` makes one and always takes it down, tests skip with
the reason where this machine cannot hold one, and :func:`leftovers` (checked by conftest.py at the end of the session)
lists any namespace, interface or process of a cluster made in this session that is still there."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "tools" / "cluster.sh"
_made: dict[str, set[int]] = {}  # state directories of this session's clusters -> their namespaces' inodes


@functools.cache
def unavailable() -> str | None:
    """Why this machine cannot hold a cluster in a box, or None."""
    if os.geteuid() != 0:
        return "the cluster in a box needs root (network namespaces, sshd per node)"
    cap_eff = int(re.search(r"CapEff:\s+(\w+)", Path("/proc/self/status").read_text()).group(1), 16)
    if not cap_eff & (1 << 12):
        return "the cluster in a box needs CAP_NET_ADMIN"
    missing = [
        exe
        for exe in ("ip", "sshd", "ssh", "ssh-keygen", "nsenter", "unshare", "tc")
        if not shutil.which(exe) and not os.path.exists(f"/usr/sbin/{exe}")
    ]
    if missing:
        return (
            f"the cluster in a box needs {', '.join(missing)}: apt-get install openssh-server iproute2 "
            "(tools/install.sh --test)"
        )
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode:
        return f"cannot create namespaces here: {probe.stderr.strip()}"
    return None


def cluster_id(state_dir: Path) -> str:
    """The prefix of the cluster's namespace names, as tools/cluster.sh derives it from its directory."""
    return "dsc" + hashlib.sha256(str(Path(os.path.realpath(state_dir))).encode()).hexdigest()[:6]


class Cluster:
    """A running cluster in a box; node names node1..nodeN."""

    def __init__(self, state_dir: Path, n: int):
        self.dir = Path(os.path.realpath(state_dir))
        self.nodes = [f"node{i}" for i in range(1, n + 1)]

    def sh(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(CLUSTER_SH), "--dir", str(self.dir), *args], capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode:
            raise AssertionError(f"cluster.sh {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def argv(self, node: str, *cmd: str) -> list[str]:
        """The command line that runs ``cmd`` on ``node``."""
        return [str(CLUSTER_SH), "--dir", str(self.dir), "exec", node, *cmd]

    def run(
        self, node: str, *cmd: str, timeout: float = 120, env: dict | None = None, **kw
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.argv(node, *cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            env=env,
            **kw,
        )

    def popen(self, node: str, *cmd: str, env: dict | None = None, **kw) -> subprocess.Popen:
        """``cmd`` on ``node`` in its own session (so a test can signal its whole group), output merged, as text."""
        return subprocess.Popen(
            self.argv(node, *cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
            **kw,
        )

    def address(self, node: str) -> str:
        return "10.213.0.10" if node == "head" else f"10.213.0.{10 + int(node[4:])}"

    def hosts_file(self, node: str) -> Path:
        """The node's /etc/hosts (write it in place: the node's mount namespace holds it by inode)."""
        return self.dir / node / "hosts"

    def pids(self, node: str) -> list[int]:
        """Every process of the node (those in its network namespace)."""
        ino = int((self.dir / node / "netns.inode").read_text())
        return [pid for pid, i in _net_namespaces().items() if i == ino]

    def running(self, node: str, text: str) -> bool:
        """Whether a process of the node has ``text`` in its command line."""
        return any(text in _cmdline(pid) for pid in self.pids(node))

    def ranks(self, node: str) -> list[int]:
        """The node's ``dstrain train`` Python processes (not the shells, launchers or srun around them)."""
        ranks = []
        for pid in self.pids(node):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                len(argv) > 2
                and os.path.basename(argv[0]).startswith(b"python")
                and argv[1].endswith(b"/dstrain")
                and argv[2] == b"train"
            ):
                ranks.append(pid)
        return ranks

    def kill(self, node: str) -> None:
        self.sh("kill", node)

    def revive(self, node: str) -> None:
        self.sh("revive", node)

    def cut(self, node: str) -> None:
        self.sh("cut", node)

    def heal(self, node: str) -> None:
        self.sh("heal", node)

    def down(self) -> None:
        self.sh("down", timeout=180)


def _net_namespaces() -> dict[int, int]:
    """pid -> inode of its network namespace, for every process."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            out[int(pid)] = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
    return out


@contextlib.contextmanager
def box(state_dir: Path, n: int, *options: str) -> Iterator[Cluster]:
    """``tools/cluster.sh up n`` in ``state_dir``, taken down on the way out whatever happens inside; skips the test
    with the reason where the machine cannot hold one."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(state_dir, n)
    track(cluster.dir)
    try:
        cluster.sh("up", str(n), *options)
        _made[str(cluster.dir)] = {int(p.read_text()) for p in cluster.dir.glob("*/netns.inode")}
        yield cluster
    finally:
        # Inodes of nodes added later (the SLURM head), for the leftover check.
        _made[str(cluster.dir)] |= {int(p.read_text()) for p in cluster.dir.glob("*/netns.inode")}
        _made[str(cluster.dir)] |= {int(p.read_text()) for p in cluster.dir.glob("sw.inode")}
        cluster.down()


def track(state_dir: Path) -> None:
    """Counts a cluster made in ``state_dir`` by other means than :func:`box` in the end-of-session check."""
    _made.setdefault(str(Path(os.path.realpath(state_dir))), set())


def leftovers() -> list[str]:
    """What this session's clusters left behind: their namespaces, interfaces named like their links in this
    machine's namespace, and processes in their namespaces (ranks, sshd, slurmd, anchors)."""
    if not _made:
        return []
    found = []
    names = netns_names()
    named = {}
    for name in names:
        with contextlib.suppress(OSError):
            named[os.stat(f"/run/netns/{name}").st_ino] = name
    ours = {cluster_id(Path(d)) for d in _made}
    found += [f"namespace {n}" for n in names if n.split("-")[0] in ours]
    found += [
        f"interface {name} in this machine's namespace"
        for name in sorted(os.listdir("/sys/class/net"))
        if re.fullmatch(r"v(?:node\d+|head)", name)
    ]
    inodes = set().union(*_made.values()) if _made else set()
    for pid, ino in _net_namespaces().items():
        # An inode number can be reused by a namespace made since; one that now has another owner's name is not ours.
        # Anchors and sshds also carry the cluster's id or directory in their command line.
        cmdline = _cmdline(pid)
        if (
            (ino in inodes and named.get(ino, "").split("-")[0] in ("", *ours))
            or any(f"{i}-node" in cmdline or f"{i}-head" in cmdline for i in ours)
            or any(f"{d}/" in cmdline for d in _made)
        ):
            found.append(f"process {pid} ({cmdline})")
    return found


def netns_names() -> list[str]:
    """The named network namespaces (what ``ip netns list`` lists: the files of /run/netns)."""
    return sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []


def clean_up() -> None:
    """Takes down every cluster of this session (after a leftover was found)."""
    for d in _made:
        subprocess.run([str(CLUSTER_SH), "--dir", d, "down"], capture_output=True, timeout=180)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def wait_for(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.2):
    """The predicate's first true value, polled until ``timeout`` seconds; fails the test naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_group(proc: subprocess.Popen) -> None:
    """Kills a process started by :meth:`Cluster.popen` and its group (a test that failed half-way)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


# --- what the multi-node training tests share
def tiny_training(*extra: str, epochs: int = 2, batch: int = 2) -> list[str]:
    """The flags of a tiny deterministic training: small model, one thread per rank, no dropout, a fixed seed."""
    return [
        "--n_hidden",
        "16",
        "--epochs",
        str(epochs),
        "--train_batch_size",
        str(batch),
        "--learning_rate",
        "0.002",
        "--dropout_rate",
        "0",
        "--random_seed",
        "7",
        "--inter_op_parallelism_threads",
        "1",
        "--intra_op_parallelism_threads",
        "1",
        "--loader_threads",
        "2",
        *extra,
    ]


def train_argv(store: str, run_dir: Path, *extra: str, epochs: int = 2, batch: int = 2) -> list[str]:
    """``dstrain train`` of :func:`tiny_training` on ``store``, saving in ``run_dir``."""
    return [
        "dstrain",
        "train",
        "--train_files",
        store,
        "--alphabet_config_path",
        str(REPO / "dstrain" / "data" / "alphabet.txt"),
        "--checkpoint_dir",
        str(run_dir),
        *tiny_training(*extra, epochs=epochs, batch=batch),
    ]


def rank_env(**extra: str) -> dict:
    """The test's environment for commands on the nodes: this venv first on PATH, deterministic TensorFlow ops."""
    venv_bin = str(Path(sys.executable).parent)
    return dict(
        os.environ, PATH=f"{venv_bin}:{os.environ['PATH']}", TF_CPP_MIN_LOG_LEVEL="2", TF_DETERMINISTIC_OPS="1", **extra
    )


class Output:
    """A process's merged output, read by a thread as it comes: tests wait on its lines, not on the clock."""

    def __init__(self, proc: subprocess.Popen, stream=None):
        """Reads ``stream`` (default: the process's stdout, with stderr merged into it by the caller)."""
        self.proc, self.lines = proc, []
        self._stream = stream if stream is not None else proc.stdout
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_says(self, pattern: str, timeout: float) -> re.Match:
        """The first match of ``pattern`` in the output; fails if the process ends or ``timeout`` passes first. For
        what a program says to a person (a warning naming a silent rank); a run's progress is waited on in its run
        record (conftest.wait_record)."""
        regex = re.compile(pattern)

        def found():
            m = regex.search(self.text)
            if not m and self.proc.poll() is not None and not self._thread.is_alive():
                pytest.fail(f"exited with {self.proc.returncode} before /{pattern}/:\n{self.text[-4000:]}")
            return m

        return wait_for(found, timeout, f"/{pattern}/ in the output", poll=0.1)

    def finish(self, timeout: float) -> int:
        self.proc.wait(timeout=timeout)
        self._thread.join(timeout=30)
        return self.proc.returncode
