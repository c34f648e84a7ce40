"""Fault tolerance, as an object the training loop calls at fixed points, so that the loop reads the same whichever
runs: :class:`Requeue` (checkpoints, and a stopped or failed job starts again from the last one: horovodrun, mpirun,
srun, MPIJobs) or :class:`dstrain.train.elastic.ElasticTraining` (a lost or added node re-forms the world in place,
rolled back to the last commit in memory).

What the loop asks of it: the world that reads the stores' catalogs at start (:meth:`scan_world`), whether every rank
loads the checkpoint itself (:attr:`loads_everywhere`), the micro-batches per optimizer step for the world as it is
(:meth:`micro_batches`), and the calls :meth:`run` (the training, with its start record), :meth:`step_end` and
:meth:`epoch_end`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from dstrain.distributed import World, elastic_launch
from dstrain.train.elastic import ElasticConfig, ElasticTraining

if TYPE_CHECKING:
    from dstrain.train.trainer import Trainer


class SampleLog:
    """--record_samples: the ids of the samples this rank's steps consumed since the last flush, by epoch; a flush
    gathers every rank's and rank 0 records them (samples events), so an audit can show that none is lost or
    repeated across stops, resumes and elastic resets."""

    def __init__(self, enabled: bool, world: World, write: Callable[..., dict]):
        self.enabled, self.world, self._write = enabled, world, write
        self.consumed: dict[int, list[int]] = {}

    def add(self, epoch: int, ids: list[int]) -> None:
        """The ids of a step just trained on (the loop calls it only when :attr:`enabled`)."""
        self.consumed.setdefault(epoch, []).extend(ids)

    def forget(self) -> None:
        """The steps since the last flush are not done (a rollback)."""
        self.consumed = {}

    def gather(self) -> list[dict[int, list[int]]] | None:
        """Collective: every rank's samples since the last gather."""
        if not self.enabled:
            return None
        gathered = self.world.allgather_object(self.consumed)  # Horovod: every rank's samples since the last flush
        self.consumed = {}
        return gathered

    def write(self, gathered: list[dict[int, list[int]]] | None, commit: int | None = None) -> None:
        """Rank 0's samples records of what :meth:`gather` returned (the record writes nothing on other ranks)."""
        extra = {} if commit is None else {"commit": commit}
        for epoch in sorted({e for by_epoch in gathered or () for e in by_epoch}):
            ids = [i for by_epoch in gathered for i in by_epoch.get(epoch, ())]
            self._write("samples", number=epoch + 1, ids=ids, ranks=len(gathered), **extra)

    def flush(self) -> None:
        self.write(self.gather())


class FaultTolerance(Protocol):
    samples: SampleLog
    """--record_samples: what the steps consumed, recorded at each of this policy's commit points."""
    loads_everywhere: bool
    """Every rank loads the checkpoint itself (nothing collective may run before :meth:`run`), instead of rank 0
    loading it and broadcasting."""

    def scan_world(self, world: World) -> World: ...

    def micro_batches(self, accumulation_steps: int, world_size: int) -> tuple[int, float]:
        """(micro-batches per optimizer step, the world size the learning rate is scaled by)."""
        ...

    def run(self, trainer: Trainer, loaded: str | None) -> None: ...

    def step_end(self, step: int) -> None: ...

    def epoch_end(self) -> None: ...


class Requeue:
    """Checkpoint and restart: nothing to do at a step's end; at an epoch's end the epoch's samples are recorded
    (--record_samples). A stop request or a lost rank ends the job with a checkpoint or from the last one."""

    loads_everywhere = False

    def __init__(self, samples: SampleLog):
        self.samples = samples

    def scan_world(self, world: World) -> World:
        return world

    def micro_batches(self, accumulation_steps: int, world_size: int) -> tuple[int, float]:
        return accumulation_steps, float(world_size)

    def run(self, trainer: Trainer, loaded: str | None) -> None:
        trainer.write_start(loaded)
        trainer.fit()

    def step_end(self, step: int) -> None:
        pass

    def epoch_end(self) -> None:
        self.samples.flush()


def fault_tolerance(cfg: ElasticConfig, world: World, write: Callable[..., dict]) -> FaultTolerance:
    """The fault tolerance --elastic chooses; ``write`` writes a run record event (rank 0's)."""
    samples = SampleLog(cfg.record_samples, world, write)
    if not cfg.elastic:
        return Requeue(samples)
    if not elastic_launch():
        raise ValueError(
            "--elastic needs horovodrun's elastic mode: horovodrun --min-np A --max-np B "
            "--host-discovery-script S dstrain train ... (dstrain launch --elastic writes it)"
        )
    return ElasticTraining(cfg, world, samples)
