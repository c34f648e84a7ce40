"""Liveness of the ranks of a Horovod world, apart from Horovod's own traffic (:class:`PeerWatch`)."""

from __future__ import annotations

import atexit
import hmac
import logging
import os
import secrets
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("dstrain.distributed")

PEER_WARN_S = 10.0
"""A rank silent this long is named in a warning (DSTRAIN_PEER_WARN_SECONDS), well before any timeout ends the job."""
PEER_TIMEOUT_S = 60.0
"""A rank silent this long is lost: the ranks that hear nothing from it exit, so the launcher stops the job
(DSTRAIN_PEER_TIMEOUT_SECONDS; 0 turns the watch off). Gloo's own timeout (HOROVOD_GLOO_TIMEOUT_SECONDS, 30 s) often
ends a Gloo job first; MPI and NCCL have none, so under mpirun and srun this is the bound."""
EXIT_PEER_LOST = 76
"""Exit status of a rank that stopped because a peer was lost: rerun (or requeue) to resume from the last checkpoint."""


@dataclass
class _Peer:
    """What a rank's peer watch knows of one other rank."""

    name: str  # "rank 3"
    where: str  # "host:pid"
    last: float  # when it was last heard from (time.monotonic)
    closed: float | None = None  # when its connection closed
    warned: bool = False
    bye: bool = False  # it said goodbye: a clean exit
    buf: bytes = b""

    def __str__(self) -> str:
        return f"{self.name} ({self.where})"


class PeerWatch:
    """Liveness of every rank, apart from Horovod's own traffic: each rank keeps a TCP connection to rank 0 and both
    ends send a byte every second from a thread. A silence of :data:`PEER_WARN_S` is logged naming the rank, its host
    and pid (a stopped process, an overloaded or unreachable node), its end too; after :data:`PEER_TIMEOUT_S`, or
    when the connection closes without a goodbye (a killed process), the rank that noticed logs an error naming the
    lost one and exits with :data:`EXIT_PEER_LOST`, and its launcher stops every other rank. Collectives cannot do
    this: a rank blocked in one waits on the network for as long as TCP does (two hours, without Gloo's timeout).

    Only the job's ranks can take part: rank 0 listens on the address it advertises (the job's interface), not on
    every interface, and a connection counts as a rank only once its first line is ``HELLO rank host:pid SECRET`` with
    the job's secret (random, made by rank 0 and broadcast over Horovod; never logged). Anything else (a port scan,
    a connection that stays silent, random bytes, another job's rank) is closed within :data:`HELLO_S` and never
    judged, so nothing outside the job can end it."""

    HEARTBEAT_S = 1.0
    BEAT = b"\0"  # between the text lines (HELLO rank host:pid, BYE), which never hold it
    GRACE_S = 5.0  # a connection closed without a goodbye: the peer may be exiting with us (preemption, os._exit)
    HELLO_S = 5.0  # a connection to rank 0 that has not said the job's HELLO by then is closed
    MAX_PENDING = 64  # connections waiting for their HELLO at once; the oldest is dropped beyond
    MAX_HELLO = 512  # bytes a HELLO line may take

    def __init__(self, rank: int, warn_s: float, timeout_s: float):
        self.rank, self.warn_s, self.timeout_s = rank, warn_s, timeout_s
        self.me = f"{socket.gethostname()}:{os.getpid()}"
        self.server: socket.socket | None = None
        self.peers: dict[socket.socket, _Peer] = {}
        self.pending: dict[socket.socket, tuple[float, bytes]] = {}
        """Rank 0: connections that have not proved they belong to the job yet (their deadline, what they sent)."""
        self.secret = ""
        self._closing = False

    @classmethod
    def start(cls, hvd: Any) -> PeerWatch | None:
        timeout_s = float(os.environ.get("DSTRAIN_PEER_TIMEOUT_SECONDS", PEER_TIMEOUT_S))
        if timeout_s <= 0:
            return None
        warn_s = min(float(os.environ.get("DSTRAIN_PEER_WARN_SECONDS", PEER_WARN_S)), timeout_s)
        watch = cls(hvd.rank(), warn_s, timeout_s)
        job = None
        if watch.rank == 0:
            advertised = _advertised_address()
            watch.server = socket.create_server((advertised, 0), backlog=max(16, hvd.size()))
            job = (advertised, watch.server.getsockname()[1], secrets.token_hex(16))
        # Horovod: every rank learns where rank 0 listens, and the job's secret.
        host, port, watch.secret = hvd.broadcast_object(job, root_rank=0)
        address = (host, port)
        if watch.rank != 0:
            try:
                sock = socket.create_connection(address, timeout=10)
            except OSError as e:
                log.warning(
                    "rank %d: cannot reach rank 0's peer watch at %s:%d (%s): a lost rank 0 will not be "
                    "noticed here",
                    watch.rank,
                    *address,
                    e,
                )
                return None
            sock.sendall(f"HELLO {watch.rank} {watch.me} {watch.secret}\n".encode())
            watch._add(sock, "rank 0", address[0])
        threading.Thread(target=watch._loop, name="dstrain-peer-watch", daemon=True).start()
        atexit.register(watch.close)
        # A collective that gives up on a silent peer (Gloo's timeout) raises an error that names an address at best.
        previous = sys.excepthook

        def excepthook(kind, value, tb):
            previous(kind, value, tb)
            suspects, deadline = watch.suspects(), time.monotonic() + 2 * watch.HEARTBEAT_S
            while not suspects and time.monotonic() < deadline:  # a closed connection the watch has not read yet
                time.sleep(0.1)
                suspects = watch.suspects()
            if suspects:
                watch._lost(f"the error above came while {suspects}")

        sys.excepthook = excepthook
        return watch

    def _add(self, sock: socket.socket, name: str, where: str) -> None:
        sock.setblocking(False)
        self.peers[sock] = _Peer(name, where, time.monotonic())

    def close(self) -> None:
        """A clean exit: tell the peers, so that our closed connection is not taken for a lost rank."""
        self._closing = True
        for sock in list(self.peers):
            try:
                sock.send(b"BYE\n")
            except OSError:
                pass

    def _loop(self) -> None:
        sent = 0.0
        while not self._closing:
            watched = [s for s, p in self.peers.items() if p.closed is None] + list(self.pending)
            ready, _, _ = select.select(watched + ([self.server] if self.server else []), [], [], self.HEARTBEAT_S / 4)
            for sock in ready:
                if sock is self.server:
                    self._accept()
                elif sock in self.pending:
                    self._hello(sock)
                else:
                    self._receive(sock)
            now = time.monotonic()
            for sock in [s for s, (deadline, _) in self.pending.items() if now >= deadline]:
                self._refuse(sock, "it did not say the job's HELLO in time")
            if now - sent >= self.HEARTBEAT_S:
                sent = now
                for sock, p in self.peers.items():
                    if p.closed is None:
                        try:
                            sock.send(self.BEAT, socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            pass
                        except OSError:
                            p.closed = now
            for p in self.peers.values():
                self._judge(p, now)

    def _accept(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        conn.setblocking(False)
        if len(self.pending) >= self.MAX_PENDING:
            self._refuse(next(iter(self.pending)), "too many connections waiting to say HELLO")
        self.pending[conn] = (time.monotonic() + self.HELLO_S, b"")

    def _hello(self, sock: socket.socket) -> None:
        """A connection's first line: the job's HELLO makes it a rank, anything else closes it."""
        deadline, buf = self.pending[sock]
        try:
            data = sock.recv(self.MAX_HELLO)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._refuse(sock, "it closed before saying HELLO")
            return
        buf += data
        if b"\n" not in buf:
            if len(buf) > self.MAX_HELLO:
                self._refuse(sock, "it sent no HELLO line")
            else:
                self.pending[sock] = (deadline, buf)
            return
        line, rest = buf.split(b"\n", 1)
        words = line.decode(errors="replace").split()
        ok = len(words) == 4 and words[0] == "HELLO" and words[1].isdigit()
        if not ok or not hmac.compare_digest(words[3].encode(), self.secret.encode()):
            self._refuse(sock, "its first line is not the job's HELLO")
            return
        del self.pending[sock]
        try:
            sock.sendall(f"HELLO 0 {self.me}\n".encode())
        except OSError:
            sock.close()
            return
        self._add(sock, f"rank {words[1]}", words[2])
        self.peers[sock].buf = rest.replace(self.BEAT, b"")
        self._lines(self.peers[sock])  # a BYE may have come with the HELLO (a rank that exits at once)

    def _refuse(self, sock: socket.socket, why: str) -> None:
        """Closes a connection that is not one of the job's ranks; it is never judged."""
        self.pending.pop(sock, None)
        try:
            peer = "%s:%d" % sock.getpeername()[:2]
        except OSError:
            peer = "?"
        log.debug("peer watch: closed a connection from %s: %s", peer, why)
        sock.close()

    def _receive(self, sock: socket.socket) -> None:
        p = self.peers[sock]
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            p.closed = time.monotonic()
            return
        p.last = time.monotonic()
        p.buf += data.replace(self.BEAT, b"")
        self._lines(p)
        if p.warned:
            p.warned = False
            log.warning("%s is heard from again", p)

    def _lines(self, p: _Peer) -> None:
        while b"\n" in p.buf:
            line, p.buf = p.buf.split(b"\n", 1)
            words = line.decode(errors="replace").split()
            if words[:1] == ["HELLO"] and len(words) == 3:
                p.name, p.where = f"rank {words[1]}", words[2]
            elif words[:1] == ["BYE"]:
                p.bye = True

    def suspects(self) -> str:
        """The peers that are silent or gone, described; empty when all are well."""
        now, out = time.monotonic(), []
        for p in list(self.peers.values()):  # the watch's thread may be adding one
            if p.bye:
                continue
            if p.closed is not None:
                out.append(f"{p} had closed its connection without a goodbye")
            elif now - p.last >= self.warn_s:
                out.append(f"{p} had been silent for {now - p.last:.0f} s")
        return ", ".join(out)

    def _judge(self, p: _Peer, now: float) -> None:
        if p.bye:
            return
        if p.closed is not None:
            if now - p.closed >= self.GRACE_S:
                self._lost(
                    f"{p} is lost: its connection closed without a goodbye (the process was killed, or its node "
                    "went down)"
                )
            return
        silent = now - p.last
        if silent >= self.timeout_s:
            self._lost(
                f"{p} is lost: nothing heard from it for {silent:.0f} s (its node is down or unreachable, or it "
                "is stopped)"
            )
        elif silent >= self.warn_s and not p.warned:
            p.warned = True
            log.warning(
                "%s has been silent for %.0f s (stopped, overloaded, or its node unreachable); waiting for it, "
                "for at most %.0f s",
                p,
                silent,
                self.timeout_s,
            )

    def _lost(self, what: str) -> None:
        log.error(
            "%s; this rank (%s) exits with %d so that the launcher stops the job: run the same command (or "
            "requeue) on the nodes that are left to resume from the last checkpoint",
            what,
            self.me,
            EXIT_PEER_LOST,
        )
        for handler in logging.getLogger("dstrain").handlers + logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)


def _advertised_address() -> str:
    """The address rank 0's peers reach it at: on the interface the launcher chose, else its hostname's."""
    wanted = os.environ.get("HOROVOD_GLOO_IFACE") or os.environ.get("NCCL_SOCKET_IFNAME", "").split(",")[0]
    if wanted:
        import psutil

        for a in psutil.net_if_addrs().get(wanted, []):
            if a.family == socket.AF_INET:
                return a.address
    return socket.gethostbyname(socket.gethostname())
