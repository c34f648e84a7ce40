"""Elastic training (``dstrain train --elastic`` under horovodrun's elastic driver): the fault tolerance that re-forms
the world in place instead of restarting the job.

The training state (:class:`dstrain.train.state.TrainState`) is committed in memory every
``--elastic_commit_steps`` optimizer steps and at every epoch's end. A peer lost mid-step rolls the survivors back
to the last commit; hosts added or removed keep the current state. Either way Horovod re-forms the world, rank 0's
state reaches every rank (new ones included), and the training loop is called again: what an epoch has left is
re-partitioned over the new ranks by the loader's position, and the learning rate and micro-batches per step follow
``--elastic_batch``. Collectives go through :class:`dstrain.distributed.Elastic`.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dstrain import runtime
from dstrain.config import option
from dstrain.distributed import Elastic, World
from dstrain.record import read_record

if TYPE_CHECKING:
    from dstrain.train.trainer import Trainer

log = logging.getLogger("dstrain.train")


@dataclass(frozen=True)
class ElasticConfig:
    """Elastic training (horovodrun --min-np/--max-np/--host-discovery-script; dstrain launch --elastic)"""

    elastic: bool = False
    """Keep training when nodes leave or join: a lost node rolls the others back to the last commit and they go on
    without it; a node the discovery script lists again joins and gets the state. Needs horovodrun's elastic mode
    (Gloo controller): not under mpirun, srun or an MPIJob, which keep the checkpoint-and-requeue path."""
    elastic_commit_steps: int = 20
    """Commit the training state in memory every this many optimizer steps (and at every epoch end): what a lost
    node rolls the others back to. More often costs a copy of the model and optimizer each time."""
    elastic_batch: str = option("global", choices=("global", "per_rank"))
    """When the world changes size: global keeps the global batch (each rank accumulates proportionally more or fewer
    micro-batches, as near as a whole number allows, and the learning rate stays), so results stay comparable with an
    uninterrupted run; per_rank keeps each rank's batch (the global batch and the scaled learning rate follow the
    world)."""
    record_samples: bool = False
    """Record every committed step's sample ids in the run record (samples events), to audit that no sample is lost or
    repeated across elastic resets."""

    def __post_init__(self) -> None:
        if self.elastic_commit_steps < 1:
            raise ValueError(f"elastic_commit_steps must be >= 1, got {self.elastic_commit_steps}")


LOST = "a rank was lost: rolled back to the last commit"
CHANGED = "hosts were added or removed"


class ElasticTraining:
    """The elastic fault tolerance (see the module's docstring). Its own bookkeeping (the world the global batch is
    defined for, whether the run's start is recorded, the commits and the last commit's samples) travels with the
    training state in every commit."""

    loads_everywhere = True  # nothing collective before the elastic loop: a joining worker would hang (horovod#2652)

    def __init__(self, cfg: ElasticConfig, world: World, samples: Any):
        if world.controller() != "gloo":
            raise ValueError(
                "--elastic needs horovodrun's Gloo controller (horovodrun --min-np ... --host-discovery-script "
                "...; dstrain launch --elastic writes it): mpirun, srun and MPIJobs restart from checkpoints"
            )
        self.cfg, self.samples = cfg, samples
        """samples: the --record_samples log (:class:`dstrain.train.fault.SampleLog`), flushed at each commit."""
        self.reference_world: int | None = None
        """The world the global batch is defined for: the first one."""
        self.started = False
        """The run's start record is written (a reset writes a reset record instead)."""
        self.commits = 0
        self.committed_samples: list[dict[int, list[int]]] | None = None
        """--record_samples: what the last commit gathered, kept in the commit so that a rank 0 that dies before
        recording it does not lose it."""
        self.reset_reason = CHANGED
        self.trainer: Any = None
        self.elastic: Elastic | None = None

    def scan_world(self, world: World) -> World:
        return World()  # every rank reads the stores' catalogs itself: nothing collective before the loop

    def micro_batches(self, accumulation_steps: int, world_size: int) -> tuple[int, float]:
        if self.reference_world is None:
            self.reference_world = world_size
        if self.cfg.elastic_batch == "global":
            # The same global batch at any world size, as near as a whole number of micro-batches gets.
            group = max(1, round(accumulation_steps * self.reference_world / world_size))
            return group, world_size * group / accumulation_steps
        return accumulation_steps, float(world_size)

    def run(self, trainer: Trainer, loaded: str | None) -> None:
        """:meth:`Trainer.fit` again after every reset, from the state committed last (a lost peer) or the current
        one (hosts added or removed), at the new world size."""
        self.trainer = trainer
        self.elastic = Elastic(
            trainer.world, trainer.state.variables(), self._get_state, self._set_state, self._on_reset
        )

        def body() -> None:
            # Every rank takes the same branch: ``started`` is rank 0's, from the synchronisation before this call (a
            # worker that has just joined would otherwise write a start record, with a collective the others skip).
            if not self.started:
                trainer.write_start(loaded)
                self.started = True
            else:
                hosts = trainer.world.allgather_object(socket.gethostname())  # Horovod: who is left, or new
                trainer.write(
                    "reset",
                    world_size=trainer.world.size,
                    hosts=hosts,
                    reason=self.reset_reason,
                    accumulation_steps=trainer.group,
                )
                log.warning(
                    "elastic reset (%s): %d rank(s) on %s, %d micro-batch(es) per step; going on from step %d",
                    self.reset_reason,
                    trainer.world.size,
                    ",".join(hosts),
                    trainer.group,
                    int(trainer.state.progress.step),
                )
                self._record_committed_samples()
                trainer.save("reset")  # a checkpoint of the state the new world goes on from
            trainer.fit()

        self.elastic.run(body)

    def step_end(self, step: int) -> None:
        if step % self.cfg.elastic_commit_steps == 0:
            self.commit()

    def epoch_end(self) -> None:
        self.commit()

    def commit(self) -> None:
        """The state a lost node rolls back to. The samples of the steps since the last commit are gathered first
        (should that fail, those steps roll back and are never recorded), then the state is kept, with them in it,
        and rank 0 records them, and last Horovod looks for host changes (which keep this state). Should rank 0 die
        between keeping the state and recording them, the next rank 0 records them after the reset
        (:meth:`_record_committed_samples`)."""
        samples = self.samples
        gathered = samples.gather()
        self.reset_reason = CHANGED
        self.commits += 1
        self.committed_samples = gathered
        self.elastic.commit(before_check=lambda: samples.write(gathered, self.commits))

    def _get_state(self) -> dict:
        return {
            "train": self.trainer.state.state_dict(),
            "reference_world": self.reference_world,
            "started": self.started,
            "commits": self.commits,
            "committed_samples": self.committed_samples,
        }

    def _set_state(self, state: dict, how: str) -> None:
        """The committed state back (``how`` = restore: rolled back after a lost peer) or rank 0's (sync)."""
        trainer = self.trainer
        trainer.data.close()
        trainer.data.end_epoch()
        trainer.state.load_state_dict(state["train"])
        self.samples.forget()  # steps after the last commit are not done
        trainer.reset_accumulation()
        self.started = state["started"]
        self.commits, self.committed_samples = state["commits"], state["committed_samples"]
        if how == "restore":
            self.reset_reason = LOST
        if state["reference_world"] != self.reference_world:
            self.reference_world = state["reference_world"]
            trainer.layout()

    def _on_reset(self) -> None:
        """The world changed (the new rank and size are set): what depends on them follows."""
        trainer = self.trainer
        trainer.data.close()
        runtime.setup_logging(
            trainer.world.rank, trainer.save_run, trainer.cfg.process.log_level
        )  # rank 0 may be another now
        trainer.take_roles()
        trainer.layout()

    def _record_committed_samples(self) -> None:
        """After a reset, rank 0: the last commit's samples, if the rank 0 that made it died before recording them
        (all or some of its epochs)."""
        record = self.trainer.record
        if not self.committed_samples or record.path is None or not os.path.exists(record.path):
            return
        recorded = {
            r["number"] for r in read_record(record.path) if r["event"] == "samples" and r.get("commit") == self.commits
        }
        missing = [
            {e: ids for e, ids in by_epoch.items() if e + 1 not in recorded} for by_epoch in self.committed_samples
        ]
        if any(missing):
            log.warning("recording the samples of commit %d, which the rank 0 that made it did not", self.commits)
            self.samples.write(missing, self.commits)
