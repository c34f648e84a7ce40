"""Stop requests from the cluster: SLURM's ``--signal=USR1@secs`` warning, ``scancel``, ``scontrol requeue`` and
Kubernetes pod deletion (SIGTERM). Handlers are installed first thing in ``main`` (:func:`install`), so a signal that
arrives while TensorFlow is still loading is recorded rather than fatal. Then every subcommand obeys in one of two
ways:

* **cooperating** (``dstrain train``, ``dstrain preprocess``): the request is only recorded; the command reaches a
  safe point (training: all ranks agree, rank 0 saves a checkpoint, every rank waits for it; preprocessing: the
  chunks in flight are finished or abandoned, leaving a resumable store) and exits with :data:`EXIT_PREEMPTED`;
* **interrupted** (every other subcommand, :meth:`StopRequest.interrupt`): the request raises :class:`Interrupted`
  in the main thread at once, and should the main thread be stuck in native code that long, the process leaves
  anyway after :data:`INTERRUPT_GRACE_S`; the exit status is ``128 + signal``, as for a process the signal killed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early on request, resumable; sbatch scripts requeue on it
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
INTERRUPT_GRACE_S = 5.0
"""How long an interrupted command may take to unwind (to print its message) before it is made to exit."""


class Interrupted(BaseException):
    """A stop request interrupted a command that has nothing to save.

    A BaseException, as KeyboardInterrupt is: it is raised wherever the main thread happens to be, and the ``except
    Exception`` there must not swallow it (logging's handlers do: a signal inside a log line's write became a
    "--- Logging error ---" traceback, the command went on, and only the watchdog ended it)."""

    def __init__(self, signal_name: str, status: int):
        super().__init__(f"stopped by {signal_name}")
        self.signal_name, self.status = signal_name, status


class StopRequest:
    """Handlers for SIGUSR1 and SIGTERM that record the request (and, once :meth:`interrupt` was called, raise)."""

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self._event = threading.Event()
        self.signal_name = ""
        self.signum = 0
        self._interrupt: str | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name, self.signum = signal.Signals(signum).name, signum
        self._event.set()
        if self._interrupt is not None:
            self._raise()

    def _raise(self) -> None:
        status = 128 + self.signum
        # The main thread may be inside native code (a TensorFlow conversion, a collective) that never returns to
        # Python in time: a watchdog makes sure the process leaves within the grace period anyway.
        message = f"{self._interrupt}: stopped by {self.signal_name}\n"
        watchdog = threading.Timer(INTERRUPT_GRACE_S, _leave, args=(message, status))
        watchdog.daemon = True
        watchdog.start()
        raise Interrupted(self.signal_name, status)

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def interrupt(self, command: str) -> None:
        """From now on a request raises :class:`Interrupted` (at once if one already came). ``command`` names the
        command in the message a stuck process leaves with."""
        self._interrupt = command
        if self.requested:
            self._raise()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _leave(message: str, status: int) -> None:
    sys.stderr.write(message)
    sys.stderr.flush()
    os._exit(status)


_current: StopRequest | None = None


def install() -> StopRequest:
    """The process's stop request, created once (cli.main calls this before anything else)."""
    global _current
    if _current is None:
        _current = StopRequest()
    return _current


def requested() -> bool:
    """A stop request came (False when no handlers were installed: dstrain used as a library)."""
    return _current is not None and _current.requested


def signal_name() -> str:
    return _current.signal_name if _current is not None else ""


class Preempted(Exception):
    """Stopped on a signal after saving a resumable state."""

    exit_code = EXIT_PREEMPTED
