"""MPI for multi-node preprocessing, only when launched by mpirun/srun (mpi4py initialises MPI on import)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


@dataclass
class World:
    rank: int = 0
    size: int = 1
    comm: Any = None

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()

    def gather(self, value: Any) -> list[Any] | None:
        return self.comm.gather(value, root=0) if self.comm is not None else [value]

    def bcast(self, value: Any) -> Any:
        return self.comm.bcast(value, root=0) if self.comm is not None else value


def mpi_world() -> World:
    if not any(v in os.environ for v in _LAUNCHER_VARS):
        return World()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return World()
    return World(comm.Get_rank(), comm.Get_size(), comm)
