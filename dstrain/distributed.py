"""The only module that touches Horovod or MPI: a small typed :class:`World` every other module is handed.

Three kinds of world, one interface:

- ``horovod``: training and evaluation (``hvd.init``; Gloo under ``horovodrun --gloo``, MPI under ``mpirun``,
  ``srun --mpi=pmix`` or ``horovodrun`` with the MPI controller);
- ``mpi``: preprocessing, which needs no TensorFlow (mpi4py, only imported when a launcher started us);
- ``single``: one process, nothing imported.

A launcher that started several processes says so in the environment; a world of one in that case is an error,
never a silent fallback (it would have every rank do all the work, or train on a fraction of the data alone).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

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

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # --- numbers and objects (eager, any backend)
    def allreduce(self, values: Sequence[float] | np.ndarray, op: str = "sum") -> np.ndarray:
        """Element-wise ``sum``, ``max`` or ``min`` of a float64 vector over all ranks."""
        x = np.asarray(values, dtype=np.float64)
        if self.size == 1:
            return x.copy()
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
        if self.backend == "horovod":
            return self._comm.allgather_object(obj)
        return self._comm.allgather(obj)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        if self.size == 1:
            return obj
        if self.backend == "horovod":
            return self._comm.broadcast_object(obj, root_rank=root)
        return self._comm.bcast(obj, root=root)

    def barrier(self) -> None:
        if self.size == 1:
            return
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

    def average_gradients(self, grads: Sequence[Any]) -> list[Any]:
        """Inside tf.function: each gradient averaged over ranks, fused into few collectives."""
        if self.size == 1:
            return list(grads)
        hvd = self._require_horovod()
        return hvd.grouped_allreduce(list(grads), op=hvd.Average)

    def broadcast_variables(self, variables: Sequence[Any], root: int = 0) -> None:
        """Every rank takes ``root``'s values (initial weights, optimizer state, counters after a resume)."""
        if self.size > 1:
            self._require_horovod().broadcast_variables(list(variables), root_rank=root)

    def join(self) -> None:
        """Wait until every rank has got here (Horovod's join also lets ranks with fewer batches finish)."""
        if self.size > 1 and self.backend == "horovod":
            self._comm.join()
        else:
            self.barrier()

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

    if "HOROVOD_CYCLE_TIME" not in os.environ and not tf.config.list_physical_devices("GPU"):
        # Every cycle is a round of messages between the ranks even when nothing is pending: at Horovod's 1 ms, ranks
        # that share a CPU's cores spend a good part of them on it (2 ranks on 2 cores ran 20-25 % slower).
        os.environ["HOROVOD_CYCLE_TIME"] = str(CPU_CYCLE_TIME_MS)
    hvd.init()
    _check_size(hvd.size(), "Horovod")
    if pin_gpu:
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
    return World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), "horovod", hvd)


def mpi_world() -> World:
    """MPI without TensorFlow, for preprocessing; a single world unless a launcher started several processes."""
    if launcher_size() is None:
        return World()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    _check_size(comm.Get_size(), "MPI")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    return World(comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(), "mpi", comm)
