"""Horovod's elastic mode: the driver ``dstrain launch --elastic`` runs (:func:`run_elastic_driver`) and the state a
training under it commits and rolls back (:class:`Elastic`)."""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from dstrain.distributed.world import World


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
