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

The package: :mod:`~dstrain.distributed.world` (the world, its collectives and how one starts),
:mod:`~dstrain.distributed.elastic` (Horovod's elastic driver and state) and :mod:`~dstrain.distributed.peer_watch`
(liveness of the ranks).
"""

from dstrain.distributed.elastic import Elastic, elastic_launch, run_elastic_driver
from dstrain.distributed.peer_watch import EXIT_PEER_LOST, PEER_TIMEOUT_S, PEER_WARN_S, PeerWatch
from dstrain.distributed.world import (
    CPU_CYCLE_TIME_MS,
    World,
    WorldError,
    cpu_threads,
    inter_op_threads,
    launcher_size,
    mpi_world,
    start_horovod,
)

__all__ = [
    "CPU_CYCLE_TIME_MS",
    "EXIT_PEER_LOST",
    "PEER_TIMEOUT_S",
    "PEER_WARN_S",
    "Elastic",
    "PeerWatch",
    "World",
    "WorldError",
    "cpu_threads",
    "elastic_launch",
    "inter_op_threads",
    "launcher_size",
    "mpi_world",
    "run_elastic_driver",
    "start_horovod",
]
