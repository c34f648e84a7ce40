"""Stop requests from the cluster: SLURM's ``--signal=USR1@secs`` warning, ``scontrol requeue`` and Kubernetes
pod deletion (SIGTERM). The trainer polls :attr:`requested` between steps and agrees on it across ranks."""
from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early on request, resumable; sbatch scripts requeue on it


class StopRequest:
    """Installs handlers for SIGUSR1 and SIGTERM that only record the request."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self._event = threading.Event()
        self.signal_name = ""
        self._previous = {}
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
            signal.signal(sig, handler)
