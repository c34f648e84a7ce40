"""Stop requests from the cluster: SLURM's ``--signal=USR1@secs`` warning, ``scontrol requeue`` and Kubernetes
pod deletion (SIGTERM). Handlers are installed first thing in ``main`` (:func:`install`), so a signal that arrives
while TensorFlow is still loading is recorded rather than fatal; the trainer agrees on it across ranks, rank 0
saves, every rank waits for that save, and all exit with :data:`EXIT_PREEMPTED` together."""
from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early on request, resumable; sbatch scripts requeue on it
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Handlers for SIGUSR1 and SIGTERM that only record the request."""

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self._event = threading.Event()
        self.signal_name = ""
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


_current: StopRequest | None = None


def install() -> StopRequest:
    """The process's stop request, created once (cli.main calls this before anything else)."""
    global _current
    if _current is None:
        _current = StopRequest()
    return _current


class Preempted(Exception):
    """Stopped on a signal after saving a resumable checkpoint."""

    exit_code = EXIT_PREEMPTED
