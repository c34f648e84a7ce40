"""The only module that touches Horovod or MPI: a small typed :class:`World` every other module is handed.

Three kinds of world, one interface:

- ``horovod``: training and evaluation (``hvd.init``; Gloo under ``horovodrun --gloo``, MPI under ``mpirun``,
  ``srun --mpi=pmix`` or ``horovodrun`` with the MPI controller);
- ``mpi``: preprocessing, which needs no TensorFlow (mpi4py, only imported when a launcher started us);
- ``single``: one process, nothing imported.

A launcher that started several processes says so in the environment; a world of one in that case is an error,
never a silent fallback (it would have every rank do all the work, or train on a fraction of the data alone).

Horovod worlds of several ranks are watched by :class:`PeerWatch`: a rank that falls silent is named while the job
waits for it, and one silent for too long (a dead node, a cut link) stops the job instead of hanging it.
"""
from __future__ import annotations

import atexit
import logging
import os
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("dstrain.distributed")

CPU_CYCLE_TIME_MS = 5
"""Horovod's cycle time for CPU-only ranks unless HOROVOD_CYCLE_TIME is set (GPU ranks keep Horovod's 1 ms)."""
PEER_WARN_S = 10.0
"""A rank silent this long is named in a warning (DSTRAIN_PEER_WARN_SECONDS), well before any timeout ends the job."""
PEER_TIMEOUT_S = 60.0
"""A rank silent this long is lost: the ranks that hear nothing from it exit, so the launcher stops the job
(DSTRAIN_PEER_TIMEOUT_SECONDS; 0 turns the watch off). Gloo's own timeout (HOROVOD_GLOO_TIMEOUT_SECONDS, 30 s) often
ends a Gloo job first; MPI and NCCL have none, so under mpirun and srun this is the bound."""
EXIT_PEER_LOST = 76
"""Exit status of a rank that stopped because a peer was lost: rerun (or requeue) to resume from the last checkpoint."""

# Variables launchers set in each process they start, with the number of processes.
_SIZE_VARIABLES = (
    "HOROVOD_SIZE",  # horovodrun (Gloo)
    "OMPI_COMM_WORLD_SIZE",  # Open MPI's mpirun, horovodrun with the MPI controller
    "PMI_SIZE",  # MPICH/Hydra, srun --mpi=pmi2
    "SLURM_STEP_NUM_TASKS",  # srun (any --mpi); not set in an sbatch script outside srun
)


def inter_op_threads(intra: int) -> int:
    """A rank on one core gains nothing from a second inter-op thread: it only spins beside the other ranks' work."""
    return 1 if intra == 1 else 2


def cpu_threads(cores: int, ranks_here: int) -> tuple[int, int]:
    """(intra-op, inter-op) threads for a CPU rank sharing ``cores`` with ``ranks_here - 1`` others: its share of the
    cores, and the inter-op threads that share calls for."""
    intra = max(1, cores // max(1, ranks_here))
    return intra, inter_op_threads(intra)


class WorldError(RuntimeError):
    """The processes are not wired up as their launcher said."""


def launcher_size(env: dict[str, str] | None = None) -> tuple[int, str] | None:
    """(processes, variable) a launcher announced, or None when nothing launched us as one of several."""
    env = os.environ if env is None else env
    for name in _SIZE_VARIABLES:
        value = env.get(name, "")
        if value.isdigit() and int(value) > 1:
            return int(value), name
    return None


def _check_size(size: int, what: str) -> None:
    announced = launcher_size()
    if announced and announced[0] != size:
        n, name = announced
        raise WorldError(
            f"{name}={n} says {n} processes were started, but {what} sees {size}: the ranks are not connected. "
            "Under srun use --mpi=pmix (or pmi2); under mpirun make sure Horovod was built with MPI "
            "(horovodrun --check-build); or start the job with dstrain launch"
        )


@dataclass
class World:
    """Where this process stands among its peers, and the collective operations they share."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str = "single"
    _comm: Any = field(default=None, repr=False)  # horovod.tensorflow module or an mpi4py communicator
    # Horovod worlds start their PeerWatch at their first collective outside a graph: it exchanges rank 0's address
    # with a broadcast, which would start TensorFlow's runtime before its thread pools are configured.
    _watch_pending: bool = field(default=False, repr=False)

    def _collective(self) -> None:
        """Every eager collective begins here (all ranks make the same calls: the watch starts everywhere at once)."""
        if self._watch_pending:
            self._watch_pending = False
            PeerWatch.start(self._comm)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # --- numbers and objects (eager, any backend)
    def allreduce(self, values: Sequence[float] | np.ndarray, op: str = "sum") -> np.ndarray:
        """Element-wise ``sum``, ``max`` or ``min`` of a float64 vector over all ranks."""
        x = np.asarray(values, dtype=np.float64)
        if self.size == 1:
            return x.copy()
        self._collective()
        if self.backend == "horovod":
            import tensorflow as tf

            hvd = self._comm
            ops = {"sum": hvd.Sum, "max": hvd.Max, "min": hvd.Min}
            return hvd.allreduce(tf.constant(x), op=ops[op], name=None).numpy()
        from mpi4py import MPI

        out = np.empty_like(x)
        self._comm.Allreduce(x, out, op={"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op])
        return out

    def allgather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        self._collective()
        if self.backend == "horovod":
            return self._comm.allgather_object(obj)
        return self._comm.allgather(obj)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        if self.size == 1:
            return obj
        self._collective()
        if self.backend == "horovod":
            return self._comm.broadcast_object(obj, root_rank=root)
        return self._comm.bcast(obj, root=root)

    def barrier(self) -> None:
        if self.size == 1:
            return
        self._collective()
        if self.backend == "horovod":
            # horovod.tensorflow has no barrier: an allreduce returns only once every rank has contributed.
            import tensorflow as tf

            self._comm.allreduce(tf.constant(0.0), op=self._comm.Sum)
        else:
            self._comm.Barrier()

    # --- TensorFlow (Horovod worlds)
    def allreduce_tensor(self, tensor: Any, op: str = "sum") -> Any:
        """Inside or outside tf.function: ``sum``/``max``/``min`` of a tensor over ranks."""
        if self.size == 1:
            return tensor
        hvd = self._require_horovod()
        return hvd.allreduce(tensor, op={"sum": hvd.Sum, "max": hvd.Max, "min": hvd.Min}[op])

    def gradient_tape(self, tape: Any) -> Any:
        """The tape whose gradients are averaged over ranks (Horovod's DistributedGradientTape)."""
        if self.size == 1:
            return tape
        return self._require_horovod().DistributedGradientTape(tape)

    def average_gradients(self, grads: Sequence[Any], compression: str = "none") -> list[Any]:
        """Inside tf.function: each gradient averaged over ranks, fused into few collectives. ``compression="fp16"``
        sends them as float16 (half the bytes; Horovod casts back to the gradient's dtype after the reduction)."""
        if self.size == 1:
            return list(grads)
        hvd = self._require_horovod()
        codec = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}[compression]
        return hvd.grouped_allreduce(list(grads), op=hvd.Average, compression=codec)

    def broadcast_variables(self, variables: Sequence[Any], root: int = 0) -> None:
        """Every rank takes ``root``'s values (initial weights, optimizer state, counters after a resume)."""
        if self.size > 1:
            self._collective()
            self._require_horovod().broadcast_variables(list(variables), root_rank=root)

    def join(self) -> None:
        """Wait until every rank has got here (Horovod's join also lets ranks with fewer batches finish)."""
        if self.size > 1 and self.backend == "horovod" and self._join_runs_here():
            self._collective()
            self._comm.join()
        else:
            self.barrier()

    def _join_runs_here(self) -> bool:
        # A Horovod built with GPU operations registers its join op for the GPU alone (horovod/tensorflow/
        # mpi_ops.cc): the GPU image on a CPU-only pod would fail there with "Could not find device for node
        # HorovodJoin". Every rank runs the same number of steps here, so a barrier does the same work.
        if not (self._comm.cuda_built() or self._comm.rocm_built()):
            return True
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))

    def controller(self) -> str:
        if self.backend != "horovod":
            return self.backend
        return "gloo" if self._comm.gloo_enabled() else "mpi"

    def _require_horovod(self) -> Any:
        if self.backend != "horovod":
            raise WorldError(f"this needs a Horovod world, not {self.backend!r} (use start_horovod())")
        return self._comm


def elastic_launch() -> bool:
    """Started by ``horovodrun --min-np/--max-np/--host-discovery-script`` (Horovod's elastic driver)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


NOTIFY_TIMEOUT_S = 5.0
"""How long the elastic driver waits on rank 0 to take a notice of changed hosts (see :func:`run_elastic_driver`)."""


def run_elastic_driver(horovodrun_args: Sequence[str]) -> None:
    """``horovodrun`` (its elastic driver) in this process, with one Horovod 0.28.1 bug worked around: the driver tells
    rank 0 of changed hosts with a plain blocking ``connect`` (3 attempts, no timeout) while it holds the lock that
    host discovery and the next rendezvous wait on; when rank 0's node stops answering (a cut link, a powered-off
    machine), every survivor waits for TCP to give up three times (~6 minutes). Here the notice is sent from a
    thread the driver waits on for :data:`NOTIFY_TIMEOUT_S` at most; a live rank 0 still gets it."""
    from horovod.runner.elastic.worker import WorkerNotificationClient
    from horovod.runner.launch import run_commandline

    send = WorkerNotificationClient.notify_hosts_updated

    def notify_hosts_updated(client: Any, timestamp: int, update_res: Any) -> None:
        thread = threading.Thread(target=send, args=(client, timestamp, update_res), daemon=True)
        thread.start()
        thread.join(NOTIFY_TIMEOUT_S)

    WorkerNotificationClient.notify_hosts_updated = notify_hosts_updated
    sys.argv = ["horovodrun", *horovodrun_args]
    run_commandline()


def start_horovod(pin_gpu: bool = True) -> World:
    """Initialises Horovod (one process per device) and pins this process to its GPU by local rank."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    elastic = elastic_launch()
    # Every cycle is a round of messages between the ranks even when nothing is pending: at Horovod's 1 ms, ranks
    # that share a CPU's cores spend a good part of them on it (2 ranks on 2 cores ran 20-25 % slower). Not in elastic
    # mode: Horovod 0.28.1's re-initialisation after a lost peer segfaults with a 5 ms cycle and a fusion threshold
    # set together (reproduced with a 20-line hvd.elastic script on the cluster in a box, 2 of 2 times; either alone:
    # 0 of 5).
    if "HOROVOD_CYCLE_TIME" not in os.environ and not tf.config.list_physical_devices("GPU") and not elastic:
        os.environ["HOROVOD_CYCLE_TIME"] = str(CPU_CYCLE_TIME_MS)
    hvd.init()
    if not elastic:  # an elastic world's size is the driver's to change
        _check_size(hvd.size(), "Horovod")
    if pin_gpu:
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
    # Elastic worlds leave lost peers to Horovod's driver and its resets: the watch would stop the job instead.
    return World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), "horovod", hvd,
                 _watch_pending=hvd.size() > 1 and not elastic)


class Elastic:
    """Elastic training under Horovod's driver (``hvd.elastic``), for a state made of TensorFlow variables (model,
    optimizer) and one Python dict (counters, loader position, history...), given as two callables.

    ``set_extra(extra, how)`` gets the dict back after a rollback (``how`` = "restore") or from rank 0 ("sync").
    ``run(fn)`` calls ``fn()`` until it returns. A peer lost mid-step (``HorovodInternalError``) rolls the state back
    to the last :meth:`commit`; hosts added or removed (``HostsUpdatedInterrupt``, raised by a commit) keep it. Either
    way Horovod re-forms the world, :attr:`World` takes the new rank and size, ``on_reset`` runs, rank 0's state is
    broadcast, and ``fn()`` is called again. Two Horovod bugs are designed around: the state is synchronised after
    every reset, removals included (Horovod skips it after a removal, and a world that fell below ``--min-np`` then
    deadlocks when new workers join, horovod#3494); and nothing collective runs before ``run`` (new workers would hang
    in their start-up, horovod#2652).
    """

    def __init__(self, world: World, variables: Sequence[Any], get_extra: Any, set_extra: Any, on_reset: Any):
        import tensorflow as tf
        from horovod.common.elastic import ObjectState
        from horovod.common.exceptions import HostsUpdatedInterrupt

        hvd = world._require_horovod()
        self.world = world

        class State(ObjectState):
            def __init__(self) -> None:
                self.variables = list(variables)
                self._copies = [tf.identity(v) for v in self.variables]
                super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank, extra=get_extra())

            def save(self) -> None:
                self._copies = [tf.identity(v) for v in self.variables]
                self.extra = get_extra()
                super().save()

            def restore(self) -> None:
                for v, c in zip(self.variables, self._copies):
                    v.assign(c)
                super().restore()
                set_extra(self.extra, "restore")

            def sync(self) -> None:
                hvd.broadcast_variables(self.variables, root_rank=0)
                self._copies = [tf.identity(v) for v in self.variables]
                super().sync()
                set_extra(self.extra, "sync")

            def check_host_updates(self) -> None:
                try:
                    super().check_host_updates()
                except HostsUpdatedInterrupt:
                    raise HostsUpdatedInterrupt(False) from None  # always re-sync (horovod#3494)

        def reset() -> None:
            world.rank, world.size = hvd.rank(), hvd.size()
            world.local_rank, world.local_size = hvd.local_rank(), hvd.local_size()
            on_reset()

        self.state = State()
        self.state.register_reset_callbacks([reset])
        self._run = hvd.elastic.run

    def run(self, fn: Any) -> Any:
        import tensorflow as tf
        from horovod.common.exceptions import HorovodInternalError

        def body(state: Any) -> Any:
            try:
                return fn()
            except tf.errors.OpError as e:
                # Horovod's TF wrapper turns only errors naming HorovodAllreduce/Allgather/Broadcast into a rollback
                # and returns None for any other, as if training had ended: a grouped allreduce (the gradients') or
                # another collective failing on a lost peer ended one rank's training early.
                if "Horovod" in e.message:
                    raise HorovodInternalError(e) from e
                raise

        return self._run(body)(self.state)

    def commit(self, before_check: Any = None) -> None:
        """Keeps the current state as the one a failure rolls back to (``before_check()`` then runs), and raises
        Horovod's interrupt (caught by :meth:`run`) when the driver has added or removed hosts."""
        self.state.save()
        if before_check is not None:
            before_check()
        self.state.check_host_updates()


def mpi_world() -> World:
    """MPI without TensorFlow, for preprocessing; a single world unless a launcher started several processes."""
    if launcher_size() is None:
        return World()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    _check_size(comm.Get_size(), "MPI")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    return World(comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(), "mpi", comm)


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
    this: a rank blocked in one waits on the network for as long as TCP does (two hours, without Gloo's timeout)."""

    HEARTBEAT_S = 1.0
    BEAT = b"\0"  # between the text lines (HELLO rank host:pid, BYE), which never hold it
    GRACE_S = 5.0  # a connection closed without a goodbye: the peer may be exiting with us (preemption, os._exit)

    def __init__(self, rank: int, warn_s: float, timeout_s: float):
        self.rank, self.warn_s, self.timeout_s = rank, warn_s, timeout_s
        self.me = f"{socket.gethostname()}:{os.getpid()}"
        self.server: socket.socket | None = None
        self.peers: dict[socket.socket, _Peer] = {}
        self._closing = False

    @classmethod
    def start(cls, hvd: Any) -> PeerWatch | None:
        timeout_s = float(os.environ.get("DSTRAIN_PEER_TIMEOUT_SECONDS", PEER_TIMEOUT_S))
        if timeout_s <= 0:
            return None
        warn_s = min(float(os.environ.get("DSTRAIN_PEER_WARN_SECONDS", PEER_WARN_S)), timeout_s)
        watch = cls(hvd.rank(), warn_s, timeout_s)
        address = None
        if watch.rank == 0:
            watch.server = socket.create_server(("0.0.0.0", 0), backlog=max(16, hvd.size()))
            address = (_advertised_address(), watch.server.getsockname()[1])
        # Horovod: every rank learns where rank 0 listens.
        address = hvd.broadcast_object(address, root_rank=0)
        if watch.rank != 0:
            try:
                sock = socket.create_connection(address, timeout=10)
            except OSError as e:
                log.warning("rank %d: cannot reach rank 0's peer watch at %s:%d (%s): a lost rank 0 will not be "
                            "noticed here", watch.rank, *address, e)  # fmt: skip
                return None
            sock.sendall(f"HELLO {watch.rank} {watch.me}\n".encode())
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
            watched = [s for s, p in self.peers.items() if p.closed is None]
            ready, _, _ = select.select(watched + ([self.server] if self.server else []), [], [], self.HEARTBEAT_S / 4)
            for sock in ready:
                if sock is self.server:
                    conn, (host, _) = self.server.accept()
                    conn.sendall(f"HELLO 0 {self.me}\n".encode())
                    self._add(conn, "a rank", host)
                else:
                    self._receive(sock)
            now = time.monotonic()
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
        while b"\n" in p.buf:
            line, p.buf = p.buf.split(b"\n", 1)
            words = line.decode(errors="replace").split()
            if words[:1] == ["HELLO"] and len(words) == 3:
                p.name, p.where = f"rank {words[1]}", words[2]
            elif words[:1] == ["BYE"]:
                p.bye = True
        if p.warned:
            p.warned = False
            log.warning("%s is heard from again", p)

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
                self._lost(f"{p} is lost: its connection closed without a goodbye (the process was killed, or its node "
                           "went down)")  # fmt: skip
            return
        silent = now - p.last
        if silent >= self.timeout_s:
            self._lost(f"{p} is lost: nothing heard from it for {silent:.0f} s (its node is down or unreachable, or it "
                       "is stopped)")  # fmt: skip
        elif silent >= self.warn_s and not p.warned:
            p.warned = True
            log.warning("%s has been silent for %.0f s (stopped, overloaded, or its node unreachable); waiting for it, "
                        "for at most %.0f s", p, silent, self.timeout_s)  # fmt: skip

    def _lost(self, what: str) -> None:
        log.error("%s; this rank (%s) exits with %d so that the launcher stops the job: run the same command (or "
                  "requeue) on the nodes that are left to resume from the last checkpoint", what, self.me, EXIT_PEER_LOST)  # fmt: skip
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
