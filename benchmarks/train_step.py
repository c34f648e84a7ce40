"""Training throughput on this machine's CPU: frames/s of ``dstrain train`` under Horovod against a plain
single-process tf.keras loop of the same model, and two ranks against one.

The store is synthetic (``tests/conftest.synthetic_store``: ``--utterances`` random log mel utterances of 100-400
frames). Every configuration runs in its own process(es), epoch after epoch; epoch 1 is warm-up (tracing, oneDNN
primitive caches, the loader's first reads) and the figure is the best later epoch's frames/s (real frames, padding
not counted), since other work on the machine only ever slows an epoch down.

* **keras**: ``DeepSpeech.for_features`` + Adam + ``ctc_loss`` in a ``tf.GradientTape`` step (``tf.function`` with
  the trainer's input signature), over the batches an np=1 ``dstrain train`` epoch draws (``plan_epoch`` with the
  same batch size, buckets and seed), read once and held in memory: same model, batch and lengths, no loader, no
  Horovod. Thread pools as the ranks get them.
* **np1**: ``horovodrun -np 1 --gloo dstrain train``; its epoch log line.
* **np1-1t**: the same with ``--intra_op_parallelism_threads 1`` (inter-op threads as the environment says: on 2
  cores that is 2, and the rank keeps ~1.5 cores busy running independent ops side by side).
* **np1-1core**: one intra-op and one inter-op thread, free to use the second core for its side work (loader
  threads, Horovod's and Python's threads). **np1-1core-half**: the same at half the batch, what each of two ranks
  computes in np2-gloo.
* **np1-core**: np1-1core held to one core (CPU affinity: this process's first core, inherited by horovodrun and
  the rank): one rank with exactly what each of two ranks has on this 2-core machine, the baseline of per-core
  scaling (the target's).
* **2x-np1-1core** / **2x-np1-core**: two such jobs at once (the second held to the next core), with nothing between
  them: their summed frames/s is the most two ranks can reach on this machine.
* **np2-weak**: ``horovodrun -np 2 --gloo`` with one intra-op thread per rank and the per-rank batch kept (twice the
  global batch): Horovod's usual way to scale, and how a user adds ranks to the same command.
  **np2-gloo / np2-mpi**: ``--gloo`` / ``--mpi`` with ``--train_batch_size`` halved, so the global batch and the
  steps per epoch stay those of np=1. **np2-mpirun**: Open MPI's ``mpirun`` as ``dstrain launch --launcher mpirun``
  writes it.

Ranks (and the keras process) get the environment ``dstrain launch`` would give them
(``dstrain.launch.launcher.rank_environment``), so the figures are those of the shipped defaults; ``--env
NAME=VALUE`` (repeatable) overrides them for every configuration, ``--bare`` leaves them out (the ranks' own defaults
then apply), options after ``--`` go to every ``dstrain train``. The table says how much of the machine other
programs took during each configuration's runs; on a shared machine run it niced (``nice -n -10``) and with
``--rounds 2``. Targets: np1 >= 0.97x keras; np2 >= 1.7x one rank on one core (np1-core); also printed: the
same against np1-1core, the machine's ceiling (2x-np1-core) and each np2 as a share of it. ``--batch`` is np=1's batch
and np2-weak's per-rank batch: a rank pays a roughly fixed cost per step (allreduce, waiting for the slower rank), so
the larger the batch, the closer np=2 gets to two independent jobs. The default run takes about 14 minutes on 2 idle
cores.

    .venv/bin/python benchmarks/train_step.py [--utterances 1200] [--epochs 3] [--n_hidden 384] [--batch 16]
    .venv/bin/python benchmarks/train_step.py --only np2-gloo --env HOROVOD_CYCLE_TIME=10 --timeline /tmp/tl.json \
        -- --loader_threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ALPHABET = os.path.join(REPO, "dstrain", "data", "alphabet.txt")
BIN = os.path.dirname(sys.executable)
TARGET_NP1, TARGET_NP2 = 0.97, 1.7


def epoch_records(run_dir: str) -> list[dict]:
    """The epoch records of a dstrain train run (its RUN/metrics.jsonl)."""
    from dstrain.record import events, read_record
    from dstrain.rundir import RunDir

    path = RunDir(run_dir).metrics_path
    return events(read_record(path), "epoch") if os.path.exists(path) else []


# ----------------------------------------------------------------------------------------------------------------------
# keras: the reference loop (runs in its own process: TensorFlow's thread pools are fixed once it starts)


def keras_worker(spec: dict) -> dict:
    import tensorflow as tf

    from dstrain.alphabet import Alphabet
    from dstrain.distributed import World
    from dstrain.loader.builder import TrainInput
    from dstrain.loader.config import LoaderConfig
    from dstrain.model import DeepSpeech, ModelConfig, ctc_loss
    from dstrain.store import FeatureStore

    store = FeatureStore.open(spec["store"])
    # The batches dstrain train's np=1 epochs draw (same builder, sampler, buckets and seed), read once into memory.
    data = TrainInput.build(
        [spec["store"]],
        None,
        LoaderConfig(loader_threads=2, limit_train=spec.get("limit", 0)),
        World(),
        batch_size=spec["batch"],
        seed=4568,
        epochs=spec["epochs"],
    )

    def epoch_batches(epoch: int) -> list:
        batches = [tuple(tf.constant(a) for a in b[:4]) for b in data.reader(epoch)]  # no --augment: keys unused
        data.end_epoch()
        return batches

    tf.keras.utils.set_random_seed(4568)
    amp = spec.get("precision") == "fp16"
    if amp:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
    n_classes = len(Alphabet.from_file(ALPHABET)) + 1
    model = DeepSpeech.for_features(
        ModelConfig(n_hidden=spec["n_hidden"], dropout_rate=0.05), store.features, n_classes
    )
    stats = data.feature_statistics()
    model.front_end.set_statistics(stats.mean, stats.std())
    optimizer = tf.keras.optimizers.Adam(learning_rate=1e-4)
    if amp:
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    n_mel = store.features.n_mel

    @tf.function(
        input_signature=(
            tf.TensorSpec([None, None, n_mel], tf.float32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([None], tf.int32),
        )
    )
    def step(x, x_len, y, y_len):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(ctc_loss(model((x, x_len), training=True), x_len, y, y_len))
            scaled = optimizer.get_scaled_loss(loss) if amp else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        if amp:
            grads = optimizer.get_unscaled_gradients(grads)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    epochs = []
    for epoch in range(spec["epochs"]):
        batches = epoch_batches(epoch)
        frames = sum(int(b[1].numpy().sum()) for b in batches)
        start = time.perf_counter()
        for b in batches:
            loss = step(*b)
        float(loss)
        epochs.append(frames / (time.perf_counter() - start))
    return {"epochs": epochs}


# ----------------------------------------------------------------------------------------------------------------------
# dstrain train under a launcher


def children_cpu() -> float:
    """CPU seconds (user + system) of every finished child process so far, theirs included."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy since boot (every process, ours and others')."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class Measured:
    """Wall time, our CPU and everybody else's over a block: ``others`` is the share of the machine's cores that
    other programs took meanwhile (the noise of the figures measured in it)."""

    def __enter__(self) -> "Measured":
        self.t0, self.cpu0, self.busy0 = time.perf_counter(), children_cpu(), machine_busy()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = children_cpu() - self.cpu0
        others = machine_busy() - self.busy0 - self.cpu
        self.others = max(0.0, others / (self.wall * (os.cpu_count() or 1)))


def rank_env(np_: int, extra: dict[str, str], bare: bool) -> dict[str, str]:
    """The ranks' environment: what ``dstrain launch`` adds (unless ``bare``), then ``extra``."""
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    if not bare:
        from dstrain.launch.launcher import LaunchConfig, rank_environment

        cfg = LaunchConfig(command=("dstrain",), np=np_)
        env.update(rank_environment(cfg, (), env, os.cpu_count() or 1))
    env.update(extra)
    return env


def launcher_argv(kind: str, np_: int, env: dict[str, str]) -> list[str]:
    if kind in ("gloo", "mpi"):
        return [os.path.join(BIN, "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", f"--{kind}"]
    # mpirun as dstrain launch --launcher mpirun writes it; every variable the benchmark set is passed on.
    argv = ["mpirun", "-np", str(np_), "--bind-to", "none", "--map-by", "slot", "--oversubscribe"]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    passed = (set(env) - set(os.environ)) | {k for k in env if k.startswith(("HOROVOD_", "OMP_", "TF_", "OMPI_"))}
    for name in sorted(passed | {"PATH"}):
        argv += ["-x", name]
    return argv + ["-x", "HOROVOD_CONTROLLER=mpi", "-x", "HOROVOD_CPU_OPERATIONS=mpi"]


def dstrain_run(
    args,
    store: str,
    np_: int,
    kind: str,
    intra: int,
    batch: int,
    train_args: list[str],
    extra: dict[str, str],
    timeline: str = "",
    copies: int = 1,
    cores: list[int] | None = None,
) -> dict:
    """``copies`` > 1 runs that many identical jobs at once; their frames/s add up epoch by epoch. ``cores`` holds copy
    ``i`` (its launcher and ranks) to core ``cores[i]``."""
    env = rank_env(np_, extra, args.bare)
    cmd = (
        launcher_argv(kind, np_, env)
        + [
            os.path.join(BIN, "dstrain"),
            "train",
            "--train_files",
            store,
            "--alphabet_config_path",
            ALPHABET,
            "--n_hidden",
            str(args.n_hidden),
            "--dropout_rate",
            "0.05",
            "--epochs",
            str(args.epochs),
            "--train_batch_size",
            str(batch),
            "--learning_rate",
            "0.0001",
            "--noshow_progressbar",
            "--intra_op_parallelism_threads",
            str(intra),
        ]
        + train_args
        + list(args.train_args)
    )
    if timeline:
        cmd += ["--horovod_timeline", timeline]
    with tempfile.TemporaryDirectory(prefix="dstrain-bench-") as tmp, Measured() as m:
        runs = [os.path.join(tmp, f"run{i}") for i in range(copies)]
        procs = [
            subprocess.Popen(
                cmd + ["--checkpoint_dir", runs[i]],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=(lambda c=cores[i]: os.sched_setaffinity(0, {c})) if cores else None,
            )
            for i in range(copies)
        ]
        outs = [p.communicate()[0] for p in procs]
        found = [epoch_records(run) for run in runs]
    epochs = [0.0] * args.epochs
    for proc, out, records in zip(procs, outs, found):
        if proc.returncode != 0 or len(records) < args.epochs:
            sys.exit(f"{' '.join(cmd)}\nfailed with status {proc.returncode}:\n{out[-4000:]}")
        if args.verbose:
            from dstrain.record import format_epoch

            print("\n".join(format_epoch(r) for r in records), flush=True)
        epochs = [e + r["frames_per_s"] for e, r in zip(epochs, records)]
    return {"epochs": epochs, "wall": m.wall, "cpu": m.cpu, "others": m.others}


# ----------------------------------------------------------------------------------------------------------------------


CONFIGS = (
    "keras",
    "np1",
    "np1-1t",
    "np1-1core",
    "np1-core",
    "np1-1core-half",
    "2x-np1-1core",
    "2x-np1-core",
    "np2-gloo",
    "np2-mpi",
    "np2-mpirun",
    "np2-weak",
)
DEFAULT = "keras,np1,np1-1t,np1-1core,np1-core,2x-np1-core,np2-weak,np2-gloo"


def run_config(name: str, args, store: str, extra: dict[str, str]) -> dict:
    if name == "keras":
        spec = {"store": store, "batch": args.batch, "n_hidden": args.n_hidden, "epochs": args.epochs}
        with Measured() as m:
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)],
                env=rank_env(1, extra, args.bare),
                check=True,
                stdout=subprocess.PIPE,
                text=True,
            )
        return dict(json.loads(out.stdout.strip().splitlines()[-1]), wall=m.wall, cpu=m.cpu, others=m.others)
    copies = 2 if name.startswith("2x-") else 1
    name = name.removeprefix("2x-")
    np_ = 2 if name.startswith("np2") else 1
    kind = {"np2-mpi": "mpi", "np2-mpirun": "mpirun"}.get(name, "gloo")
    intra = 0 if name == "np1" else 1
    pin = name == "np1-core"
    train_args = ["--inter_op_parallelism_threads", "1"] if "core" in name else []
    batch = args.batch // 2 if name in ("np1-1core-half", "np2-gloo", "np2-mpi", "np2-mpirun") else args.batch
    timeline = f"{args.timeline}.{name}" if args.timeline and np_ == 2 else ""
    cores = sorted(os.sched_getaffinity(0))[:copies] if pin else None
    if cores is not None and len(cores) < copies:
        sys.exit(f"{name}: {copies} one-core jobs need {copies} cores, this process may use {len(cores)}")
    return dstrain_run(args, store, np_, kind, intra, batch, train_args, extra, timeline, copies, cores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=1200, help="utterances in the synthetic store")
    parser.add_argument("--frames", default="100,400", help="utterance lengths drawn from [lo, hi) frames")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=1, help="run the configurations in turn this many times")
    parser.add_argument("--n_hidden", type=int, default=384)
    parser.add_argument("--batch", type=int, default=16, help="global batch (per rank: batch / ranks)")
    parser.add_argument("--only", default=DEFAULT, help=f"comma-separated configurations among {','.join(CONFIGS)}")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="rank environment override")
    parser.add_argument("--bare", action="store_true", help="ranks get no dstrain launch defaults")
    parser.add_argument("--timeline", default="", help="np=2 runs write Horovod timelines to this path (+.CONFIG)")
    parser.add_argument("--store", default="", help="reuse (or create) the synthetic store here")
    parser.add_argument("--verbose", action="store_true", help="print every epoch line")
    parser.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: extra dstrain train options")
    args = parser.parse_args()
    if args._worker:
        print(json.dumps(keras_worker(json.loads(args._worker))))
        return
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    if args.batch % 2:
        parser.error("--batch must be even (np=2 halves it)")
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first is warm-up)")
    extra = dict(e.split("=", 1) for e in args.env)
    only = args.only.split(",")
    for name in only:
        if name not in CONFIGS:
            parser.error(f"--only: unknown configuration {name!r}; choose among {', '.join(CONFIGS)}")

    # Per configuration: the frames/s of every epoch after the first, CPU seconds, and the share of the machine other
    # programs took meanwhile, over all rounds.
    rates: dict[str, list[float]] = {n: [] for n in only}
    cpu: dict[str, list[float]] = {n: [] for n in only}
    others: dict[str, list[float]] = {n: [] for n in only}
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or os.path.join(tmp, "store")
        if not os.path.exists(os.path.join(store, "_manifest.json")):
            sys.path.insert(0, os.path.join(REPO, "tests"))
            from conftest import synthetic_store

            lo, hi = (int(v) for v in args.frames.split(","))
            synthetic_store(store, args.utterances, row_group_rows=32, frames=(lo, hi), seed=1)
        for _ in range(args.rounds):
            for name in only:
                r = run_config(name, args, store, extra)
                rates[name] += r["epochs"][1:]
                cpu[name].append(r["cpu"])
                others[name].append(r["others"])
                print(
                    f"  {name:<11} frames/s by epoch {' '.join(f'{v:.0f}' for v in r['epochs'])}  "
                    f"({r['wall']:.0f} s wall, "
                    f"{r['cpu']:.0f} s CPU; other programs took {r['others']:.0%} of the machine)",
                    flush=True,
                )

    # Best epoch: other programs only ever slow an epoch down.
    print(f"\n{'configuration':<14} {'frames/s':>9} {'other epochs':>13} {'CPU s/run':>10} {'others':>7}")
    for name in only:
        rest = sorted(rates[name])[:-1]
        print(
            f"{name:<14} {max(rates[name]):>9.0f} {f'{min(rest):.0f}-{max(rest):.0f}' if rest else '':>13} "
            f"{min(cpu[name]):>10.0f} {max(others[name]):>7.0%}"
        )
    print()

    def ratio(a: str, b: str, target: float) -> None:
        if rates.get(a) and rates.get(b):
            x = max(rates[a]) / max(rates[b])
            verdict = f"target >= {target}x  {'ok' if x >= target else 'MISSED'}" if target else "(for reference)"
            print(f"{a + ' / ' + b:<26} {x:>6.2f}x   {verdict}")

    twos = ("np2-weak", "np2-gloo", "np2-mpi", "np2-mpirun")
    ratio("np1", "keras", TARGET_NP1)
    for two in twos:
        ratio(two, "np1-core", TARGET_NP2)
    for two in twos:
        ratio(two, "np1-1core", 0.0)
    # What this machine allows two ranks at all: two single-core jobs with no communication between them.
    for ceiling, one in (("2x-np1-core", "np1-core"), ("2x-np1-1core", "np1-1core")):
        ratio(ceiling, one, 0.0)
        for two in twos:
            ratio(two, ceiling, 0.0)
    for two in twos:
        for one in ("np1-1t", "np1"):
            ratio(two, one, 0.0)
    if rates.get("np1-1core-half") and rates.get("np1-1core"):
        x = 2 * max(rates["np1-1core-half"]) / max(rates["np1-1core"])
        print(f"ceiling of np2-gloo / np1-1core at this global batch (2 x np1-1core-half / np1-1core): {x:.2f}x")
    if any(max(v) > 0.1 for v in others.values()):
        print("\nother programs took more than 10% of the machine during some runs: the figures are lower bounds")


if __name__ == "__main__":
    main()
