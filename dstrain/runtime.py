"""Setting up a training or evaluation process before any model exists: stop requests, Horovod, TensorFlow's thread
pools and GPU memory, logging and the Horovod timeline. :func:`start` does all of it in the order it must happen
(Horovod pins the GPU before TensorFlow touches a device; thread pools before TensorFlow's runtime starts).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from dstrain import preemption
from dstrain.config import option
from dstrain.distributed import World, cpu_threads, start_horovod
from dstrain.rundir import RunDir

log = logging.getLogger("dstrain")


@dataclass(frozen=True)
class ProcessConfig:
    """Process: threads, devices, logging"""

    inter_op_parallelism_threads: int = 0
    """TensorFlow inter-op threads; 0 means TensorFlow's choice."""
    intra_op_parallelism_threads: int = 0
    """TensorFlow intra-op threads; 0 means TensorFlow's choice."""
    use_allow_growth: bool = False
    """Let TensorFlow take GPU memory as it needs it instead of all at once."""
    log_placement: bool = False
    """Log the device (CPU, GPU) every TensorFlow operation runs on, as DeepSpeech's --log_placement."""
    horovod_timeline: str = ""
    """Write Horovod's timeline (chrome://tracing JSON) of the collectives to this file."""
    log_level: str = option("info", choices=("debug", "info", "warning", "error"))
    """Rank 0's log level (other ranks log warnings and errors)."""
    show_progressbar: bool = True
    """A progress bar with the epoch's ETA on rank 0 (only when its output is a terminal)."""


@dataclass
class Process:
    """What :func:`start` set up."""

    world: World
    n_gpus: int
    """GPUs this process sees (0 or 1: Horovod pins one per rank)."""
    stop: preemption.StopRequest
    cfg: ProcessConfig

    def progress_bar(self, total: int, done: int, desc: str):
        """A tqdm bar on rank 0 when it writes to a terminal, else None."""
        if not (self.world.is_root and self.cfg.show_progressbar and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=done, desc=desc, unit="step", leave=False)


def setup_logging(rank: int, run: RunDir | None, level: str = "info") -> None:
    """Rank 0 logs at ``level`` to the console and ``RUN/train.log``; other ranks log warnings and errors."""
    root = logging.getLogger("dstrain")
    root.handlers.clear()
    root.setLevel(getattr(logging, level.upper()) if rank == 0 else logging.WARNING)
    root.propagate = False  # TensorFlow's absl handler on the root logger would print every line twice
    fmt = logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    root.addHandler(console)
    if rank == 0 and run is not None:
        os.makedirs(run.path, exist_ok=True)
        fh = logging.FileHandler(run.log_path)
        fh.setFormatter(fmt)
        root.addHandler(fh)


def configure_tensorflow(cfg: ProcessConfig, world: World) -> int:
    """Thread pools and GPU memory, before TensorFlow starts its runtime; returns the visible GPUs."""
    import tensorflow as tf

    gpus = tf.config.get_visible_devices("GPU")
    if cfg.log_placement:
        tf.debugging.set_log_device_placement(True)
    if cfg.use_allow_growth:
        for g in gpus:
            tf.config.experimental.set_memory_growth(g, True)
    intra, inter = cfg.intra_op_parallelism_threads, cfg.inter_op_parallelism_threads
    if not gpus and world.local_size > 1:
        # Several CPU ranks on one node: TensorFlow's choice (all cores for every rank) oversubscribes them.
        share = cpu_threads(len(os.sched_getaffinity(0)), world.local_size)
        if not intra and "TF_NUM_INTRAOP_THREADS" not in os.environ:
            intra = share[0]
        if not inter and "TF_NUM_INTEROP_THREADS" not in os.environ:
            inter = share[1]
        log.info(
            "%d CPU ranks on this node: %s intra-op and %s inter-op thread(s) each",
            world.local_size,
            intra or os.environ.get("TF_NUM_INTRAOP_THREADS"),
            inter or os.environ.get("TF_NUM_INTEROP_THREADS"),
        )
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    return len(gpus)


def start(cfg: ProcessConfig, run: RunDir | None = None) -> Process:
    """Stop requests, Horovod (one process per device, pinned to its GPU), logging, TensorFlow's threads."""
    stop = preemption.install()
    if cfg.horovod_timeline:
        os.environ.setdefault("HOROVOD_TIMELINE", cfg.horovod_timeline)
    world = start_horovod()
    setup_logging(world.rank, run, cfg.log_level)
    n_gpus = configure_tensorflow(cfg, world)
    return Process(world, n_gpus, stop, cfg)
