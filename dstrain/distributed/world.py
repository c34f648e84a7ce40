"""The world: rank, size and the collectives every other module is handed (:class:`World`), and how a process joins
one (:func:`start_horovod`, :func:`mpi_world`, or a single process)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from dstrain.distributed.elastic import elastic_launch
from dstrain.distributed.peer_watch import PeerWatch

log = logging.getLogger("dstrain.distributed")

CPU_CYCLE_TIME_MS = 5
"""Horovod's cycle time for CPU-only ranks unless HOROVOD_CYCLE_TIME is set (GPU ranks keep Horovod's 1 ms)."""


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
    return World(
        hvd.rank(),
        hvd.size(),
        hvd.local_rank(),
        hvd.local_size(),
        "horovod",
        hvd,
        _watch_pending=hvd.size() > 1 and not elastic,
    )


def mpi_world() -> World:
    """MPI without TensorFlow, for preprocessing; a single world unless a launcher started several processes."""
    if launcher_size() is None:
        return World()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    _check_size(comm.Get_size(), "MPI")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    return World(comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(), "mpi", comm)
