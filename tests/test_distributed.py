"""2-process training through the real launchers, as users run it (Horovod's CI does the same on CPU).

Each rank runs under strace, so "only rank 0 writes" is checked at the system-call level: TensorFlow
writes checkpoints and SavedModels from C++, where no Python hook would see them. Also: which of Horovod's join and a
barrier World.join uses with a CPU and a GPU build of Horovod.
"""

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
from conftest import assert_says, final_digests, records, tool

pytestmark = pytest.mark.slow

WRITE = re.compile(
    r'(?:openat|open|creat)\(.*?"([^"]+)".*?(O_WRONLY|O_RDWR|O_CREAT)|(?:mkdir|mkdirat|rename|renameat2?|unlink|unlinkat)\(.*?"([^"]+)"'
)


def writes_under(trace_file: str, roots: list[str]) -> list[str]:
    """Lines of an strace log that create or change files below any of ``roots``."""
    hits = []
    with open(trace_file, errors="replace") as f:
        for line in f:
            m = WRITE.search(line)
            if not m:
                continue
            path = m.group(1) or m.group(3)
            if any(os.path.abspath(path).startswith(r + os.sep) or os.path.abspath(path) == r for r in roots):
                hits.append(line.strip())
    return hits


def wrapper(tmp_path) -> str:
    if not shutil.which("strace"):
        pytest.fail("strace is missing: tools/install.sh installs it")
    traces = tmp_path / "traces"
    traces.mkdir(exist_ok=True)
    script = tmp_path / "traced.sh"
    script.write_text(
        "#!/bin/sh\n"
        "rank=${HOROVOD_RANK:-${OMPI_COMM_WORLD_RANK:-unknown}}\n"
        "exec strace -f -qq --seccomp-bpf "
        "-e trace=open,openat,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat "
        f'-o "{traces}/trace.$rank" "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def train_args(store: str, alphabet: str, work, epochs: int) -> list[str]:
    return [
        tool("dstrain"),
        "train",
        "--train_files",
        store,
        "--dev_files",
        store,
        "--test_files",
        store,
        "--alphabet_config_path",
        alphabet,
        "--n_hidden",
        "16",
        "--epochs",
        str(epochs),
        "--learning_rate",
        "0.001",
        "--checkpoint_dir",
        str(work / "ckpt"),
        "--export_dir",
        str(work / "export"),
        "--inter_op_parallelism_threads",
        "1",
        "--intra_op_parallelism_threads",
        "1",
    ]


def launch(launcher: str, args: list[str], tmp_path) -> None:
    """Through ``dstrain launch``, exactly as docs/clusters.md, sbatch scripts and k8s launcher pod run training."""
    from dstrain.launch.launcher import launch_argv

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    cmd = launch_argv(launcher, [wrapper(tmp_path)] + args, np=2)
    cmd[0] = tool("dstrain")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_two_process_training_resume_and_rank0_only_writes(launcher, ldc93s1_store, alphabet_path, tmp_path):
    work = tmp_path / "work"
    roots = [str(work / "ckpt"), str(work / "export")]

    launch(launcher, train_args(ldc93s1_store, alphabet_path, work, epochs=2), tmp_path)
    (start,) = records(work / "ckpt", "start")
    assert start["controller"] == ("gloo" if launcher == "horovodrun" else "mpi") and start["world_size"] == 2, start
    digests = final_digests(work / "ckpt")
    assert len(digests) == 2 and digests[0] == digests[1], "ranks diverged"
    assert [r["number"] for r in records(work / "ckpt", "epoch")] == [1, 2] and not records(work / "ckpt", "resume")

    traces = tmp_path / "traces"
    assert writes_under(str(traces / "trace.0"), roots), "rank 0's trace shows no checkpoint writes: tracing is broken"
    assert writes_under(str(traces / "trace.1"), roots) == []
    assert (work / "ckpt" / "train.log").exists() and (work / "ckpt" / "config.json").exists()
    assert {"saved_model.pb", "alphabet.txt", "dstrain_export.json"} <= set(os.listdir(work / "export"))

    # A second launch of the same job continues where the checkpoint left off.
    for f in traces.iterdir():
        f.unlink()
    launch(launcher, train_args(ldc93s1_store, alphabet_path, work, epochs=4), tmp_path)
    (resume,) = records(work / "ckpt", "resume")
    assert resume["epoch"] == 2 and resume["epoch_step"] == 0, resume
    assert [r["number"] for r in records(work / "ckpt", "epoch")] == [1, 2, 3, 4]
    digests = final_digests(work / "ckpt")
    assert len(digests) == 2 and digests[0] == digests[1], "ranks diverged"
    assert writes_under(str(traces / "trace.1"), roots) == []
    # The log a person reads goes on in the same file: the first run's epochs, the resume, the second run's.
    assert_says((work / "ckpt" / "train.log").read_text(), "epoch 2/2", "Resuming from checkpoint", "epoch 4/4")


class _HorovodBuild:
    """What World.join asks of horovod.tensorflow, for a build with or without GPU operations."""

    Sum = "sum"

    def __init__(self, cuda: bool):
        self.cuda, self.calls = cuda, []

    def cuda_built(self) -> bool:
        return self.cuda

    def rocm_built(self) -> bool:
        return False

    def join(self) -> None:
        self.calls.append("join")

    def allreduce(self, tensor, op):
        self.calls.append(f"allreduce {op}")
        return tensor


@pytest.mark.parametrize("cuda", [False, True])
def test_join_runs_where_horovods_build_has_a_kernel_for_it(cuda):
    # Horovod built with GPU operations (the GPU image) registers its join op for the GPU alone: on a machine without
    # one (this one), join must fall back to a barrier; a CPU build keeps Horovod's join.
    import tensorflow as tf

    from dstrain.distributed import World

    assert not tf.config.list_logical_devices("GPU")
    hvd = _HorovodBuild(cuda)
    World(rank=0, size=2, backend="horovod", _comm=hvd).join()
    assert hvd.calls == (["allreduce sum"] if cuda else ["join"])
