"""What a port scanner or a confused client does to a job's listening sockets, for the tests that show nothing
outside the job can stop it: find every TCP port a set of processes listens on (from /proc, no tools), then
connect and close, connect and stay silent, or send random bytes."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

PROBES = ("close", "stay", "bytes")


@dataclass(frozen=True)
class Listener:
    pid: int
    address: str
    port: int

    def target(self) -> tuple[str, int]:
        """Where to connect: the address itself, or loopback for a wildcard one."""
        wildcard = self.address in ("0.0.0.0", "::")
        return ("::1" if ":" in self.address else "127.0.0.1") if wildcard else self.address, self.port


def _listening_inodes() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket in this network namespace."""
    found = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != "0A":  # LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc holds the address as host-order 32-bit words
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found[inode] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    return found


def listeners(pids: list[int]) -> list[Listener]:
    """Every TCP port the processes ``pids`` listen on (a process that has gone is left out)."""
    inodes = _listening_inodes()
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inode = int(link[8:-1])
                if inode in inodes:
                    out.append(Listener(pid, *inodes[inode]))
    return sorted(set(out), key=lambda x: (x.pid, x.port))


def probe(listener: Listener, kind: str, rng: random.Random) -> socket.socket | None:
    """One probe of ``kind``; for "stay" the open connection is returned (the caller closes it later)."""
    host, port = listener.target()
    sock = socket.create_connection((host, port), timeout=5)
    if kind == "close":
        sock.close()
        return None
    if kind == "bytes":
        try:
            sock.sendall(rng.randbytes(4096))
        except OSError:  # the listener may close at once: that is its right
            pass
        sock.close()
        return None
    return sock
