"""Scaling across nodes, measured on the cluster in a box and modelled: what it costs dstrain to train on two nodes
instead of one, and what that predicts for H200 clusters.

**Measured** (``tools/cluster.sh``: two nodes, network namespaces on a bridge, links shaped with ``tc`` to each of
``--rates``; one single-core rank per node, node K's rank held to core K-1):

* ``1x1``: one rank on one node, alone (``horovodrun -np 1``): the compute of a step;
* ``2 jobs``: two independent one-rank jobs at once, one per node: the machine's two-rank ceiling;
* ``2x1``: ``horovodrun -np 2 -H node1:1,node2:1`` for {fp32, ``--gradient_compression fp16``} x
  {``--accumulation_steps`` 1, 4}: step time, time in allreduce (Horovod's timeline) and efficiency = its
  throughput / the two jobs' throughput;
* the links themselves: TCP throughput of one stream and round-trip time between the nodes at each rate.

**Modelled** (:class:`StepModel`): step time = compute + exposed allreduce. Compute is the measured per-micro-batch
time of the two-job run times the micro-batches per step. A ring allreduce moves 2(N-1)/N of the gradient bytes per
rank and takes 2(N-1) hops of latency; its bytes go at ``efficiency`` x the link's measured TCP throughput, and every
collective costs ``overhead`` (Horovod's negotiation and cycle). dstrain's step reduces all gradients in one fused
group after the backward pass, so nothing of it overlaps compute (overlap 0). Three free parameters are fitted by
least squares to the measured 2x1 step times: ``efficiency``, ``overhead`` and ``interference`` (how much slower a rank
computes beside Horovod's threads on its one core; GPU ranks do not share theirs, so it is not carried to GPUs). The
script then prints every measured configuration beside the model's prediction and fails (exit 1) unless all are
within +-20 %.

Then the same model, with inputs for H200-class nodes (each named and sourced in :data:`GPU_INPUTS`), predicts the
scaling efficiency of 8, 32, 128 and 512 GPUs (8 per node on NVLink; 100/200/400 Gb/s per GPU between nodes) with
NCCL and with the host-memory path (Horovod built without NCCL: GPU -> host -> Gloo over TCP -> host -> GPU), with and
without fp16 compression and accumulation.

    .venv/bin/python benchmarks/scaling.py                       # ~15 minutes on this 2-core machine, as root
    .venv/bin/python benchmarks/scaling.py --rates 1gbit --epochs 2 --utterances 256   # quicker, coarser
    .venv/bin/python benchmarks/scaling.py --predict_only        # the GPU table from GPU_INPUTS alone
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

from train_step import ALPHABET, BIN, epoch_records  # noqa: E402

CLUSTER = os.path.join(REPO, "tools", "cluster.sh")
TOLERANCE = 0.20
CONFIGS = [(comp, acc) for comp in ("none", "fp16") for acc in (1, 4)]


# ----------------------------------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class Link:
    """A level of the network as one ring hop sees it."""

    bandwidth: float
    """Bytes per second one stream achieves (measured on the box; line rate x efficiency for NICs)."""
    latency: float
    """Seconds per hop (half a round trip, plus the transport's per-message cost)."""


@dataclass(frozen=True)
class StepModel:
    """Step time = compute + exposed allreduce, for data parallelism with one ring allreduce per optimizer step."""

    efficiency: float
    """Fraction of a link's bandwidth the collective achieves (fitted on the box)."""
    overhead: float
    """Seconds per collective besides moving bytes: negotiation, cycle wait, fusion copies (fitted on the box)."""
    overlap: float = 0.0
    """Fraction of the allreduce hidden behind the backward pass (0: dstrain reduces after the backward pass)."""
    interference: float = 0.0
    """Fraction by which a rank's compute slows beside Horovod's runtime (its background thread, Gloo's threads) when
    they share the rank's one core, as on the box (fitted there); 0 for GPU ranks, whose compute is on the GPU."""

    def allreduce(self, nbytes: float, ranks: int, link: Link, collectives: int = 2) -> float:
        """A ring allreduce of ``nbytes`` per rank over ``ranks`` whose slowest hop is ``link``: 2(N-1)/N of the bytes
        and 2(N-1) hop latencies; ``collectives`` small ones per step each cost ``overhead``."""
        if ranks == 1:
            return 0.0
        ring = 2 * (ranks - 1) / ranks * nbytes / (self.efficiency * link.bandwidth) + 2 * (ranks - 1) * link.latency
        return ring + collectives * self.overhead

    def step(self, compute: float, nbytes: float, ranks: int, link: Link, collectives: int = 2) -> float:
        slowed = compute * (1.0 + self.interference) if ranks > 1 else compute
        return slowed + (1.0 - self.overlap) * self.allreduce(nbytes, ranks, link, collectives)


def fit(points: list[tuple[float, float, Link, float]]) -> StepModel:
    """Least squares of relative error over (compute, bytes, link, measured two-rank step), for the three free
    parameters (efficiency and interference over a grid, overhead in closed form for each pair)."""
    best = None
    for eff, inter in itertools.product([e / 1000 for e in range(50, 1001, 5)], [i / 1000 for i in range(0, 301, 5)]):
        # For the others fixed the residual is linear in overhead: minimise sum(((known + 2 o) / y - 1)^2).
        known = [(StepModel(eff, 0.0, interference=inter).step(c, b, 2, link), y) for c, b, link, y in points]
        num = sum((y - k) * 2 / y**2 for k, y in known)
        den = sum(4 / y**2 for _, y in known)
        overhead = max(0.0, num / den)
        err = sum(((k + 2 * overhead) / y - 1) ** 2 for k, y in known)
        if best is None or err < best[0]:
            best = (err, StepModel(eff, overhead, interference=inter))
    return best[1]


# ----------------------------------------------------------------------------------------------------------------------
# Inputs for H200-class clusters: every number named and sourced.

GPU_INPUTS = {
    "step_compute_s": (
        128 * 500 / 787e3,
        "one H200, dstrain train --automatic_mixed_precision at batch 128: 787k "
        "frames/s (RESULTS.md, benchmarks/train_gpu.py), utterances of 200-800 frames (mean 500): "
        "81.3 ms",
    ),
    "params": (47.2e6, "DeepSpeech at n_hidden 2048 (RESULTS.md: 47.2M parameters)"),
    "nvlink_GBps": (
        450.0,
        "H100/H200 SXM NVLink 4: 900 GB/s per GPU both ways, 450 GB/s each way (NVIDIA H200 " "datasheet)",
    ),
    "nccl_efficiency": (
        0.85,
        "NCCL all-reduce bus bandwidth over line rate for messages of 100 MB+ on InfiniBand "
        "NDR (nccl-tests on DGX H100 reach 340-370 GB/s per 8x400 Gb/s node: 0.85-0.92)",
    ),
    "nccl_latency_s": (10e-6, "NCCL ring per-hop latency across nodes, order of magnitude (NCCL docs: ~5-20 us)"),
    "horovod_overhead_s": (
        1e-3,
        "a collective's wait for Horovod's next cycle on GPU ranks (HOROVOD_CYCLE_TIME, 1 ms, "
        "which dstrain keeps on GPUs; the response cache makes a repeated step's negotiation no "
        "more: Horovod's tensor-fusion docs). The box's fitted overhead is a CPU rank's, with a 5 ms "
        "cycle on a core shared with compute, and is kept for the host-memory path",
    ),
    "pcie_GBps": (
        25.0,
        "GPU<->host copies per GPU with 8 GPUs of a node copying at once (PCIe Gen5 x16: 64 GB/s "
        "each way per link, two GPUs per switch, host memory shared by 8)",
    ),
}


def gpu_table(model: StepModel, tcp_cap: float) -> list[dict]:
    """Predicted efficiency (time of one GPU's step / time of a step at scale) for each cluster shape and path."""
    compute = GPU_INPUTS["step_compute_s"][0]
    fp32 = GPU_INPUTS["params"][0] * 4
    nccl_eff, nccl_lat = GPU_INPUTS["nccl_efficiency"][0], GPU_INPUTS["nccl_latency_s"][0]
    rows = []
    for gpus, gbps, path, comp, acc in itertools.product(
        (8, 32, 128, 512), (100, 200, 400), ("nccl", "host"), ("none", "fp16"), (1, 4)
    ):
        nbytes = fp32 / (2 if comp == "fp16" else 1)
        nic = gbps * 1e9 / 8
        if path == "nccl":
            # A ring over NVLink inside a node and one NIC per GPU between nodes (rail-optimised): the slowest hop is
            # the NIC, or NVLink on one node.
            hop = Link(GPU_INPUTS["nvlink_GBps"][0] * 1e9 if gpus <= 8 else nic, nccl_lat)
            comm = StepModel(nccl_eff, GPU_INPUTS["horovod_overhead_s"][0]).allreduce(nbytes, gpus, hop)
        else:
            # Horovod's CPU path: copy to host, Gloo's ring over TCP (one stream per hop, capped by what one stream
            # carries on a host: the box's measurement), copy back.
            hop = Link(min(nic, tcp_cap) if gpus > 8 else tcp_cap, 30e-6)
            copies = 2 * nbytes / (GPU_INPUTS["pcie_GBps"][0] * 1e9)
            comm = model.allreduce(nbytes, gpus, hop) + copies
        step = acc * compute + comm
        rows.append(
            {
                "gpus": gpus,
                "gbps": gbps,
                "path": path,
                "compression": comp,
                "accumulation": acc,
                "comm_ms": comm * 1e3,
                "efficiency": acc * compute / step,
            }
        )
    return rows


def print_gpu_table(rows: list[dict]) -> None:
    print("\nPredicted scaling efficiency on H200-class nodes (8 GPUs per node on NVLink), one GPU's step = 81.3 ms:")
    print("| GPUs | path | compression, accumulation | 100 Gb/s | 200 Gb/s | 400 Gb/s |")
    print("|---|---|---|---|---|---|")
    key = lambda r: (r["gpus"], r["path"], r["compression"], r["accumulation"])  # noqa: E731
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["gbps"]] = r
    for (gpus, path, comp, acc), by_rate in groups.items():
        cells = " | ".join(f"{by_rate[g]['efficiency']:.0%} ({by_rate[g]['comm_ms']:.0f} ms)" for g in (100, 200, 400))
        label = ("fp32" if comp == "none" else "fp16") + f", x{acc}"
        print(f"| {gpus} | {'NCCL' if path == 'nccl' else 'host memory (no NCCL)'} | {label} | {cells} |")


# ----------------------------------------------------------------------------------------------------------------------
# Measurements on the cluster in a box


class Box:
    def __init__(self, state_dir: str):
        self.dir = state_dir

    def sh(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([CLUSTER, "--dir", self.dir, *args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(f"cluster.sh {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def argv(self, node: str, *cmd: str) -> list[str]:
        return [CLUSTER, "--dir", self.dir, "exec", node, *cmd]


PROBE = textwrap.dedent("""
    import socket, sys, time
    role, host, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if role == "server":
        srv = socket.create_server((host, 5999))
        srv.settimeout(60)
        print("ready", flush=True)
        conn, _ = srv.accept()
        for _ in range(200):  # round trips
            conn.sendall(conn.recv(1))
        got = 0
        while got < nbytes:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        conn.sendall(b"k")
    else:
        conn = socket.create_connection((host, 5999), timeout=60)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        for _ in range(200):
            conn.sendall(b"x"); conn.recv(1)
        rtt = (time.perf_counter() - t0) / 200
        block, t0 = b"\\0" * (1 << 20), time.perf_counter()
        for _ in range(nbytes >> 20):
            conn.sendall(block)
        conn.recv(1)
        print(f"{rtt} {nbytes / (time.perf_counter() - t0)}", flush=True)
""")


def probe_link(box: Box, rate_bits: float) -> Link:
    """One TCP stream node1 -> node2: ~4 s of data at the shaped rate (bounded), and 200 one-byte round trips."""
    nbytes = int(min(256 << 20, max(8 << 20, rate_bits / 8 * 4))) >> 20 << 20
    server = subprocess.Popen(
        box.argv("node2", sys.executable, "-c", PROBE, "server", "node2", str(nbytes)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout.readline().strip() == "ready"
    client = subprocess.run(
        box.argv("node1", sys.executable, "-c", PROBE, "client", "node2", str(nbytes)),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    server.wait(timeout=60)
    rtt, throughput = map(float, client.stdout.split())
    return Link(throughput, rtt / 2)


def loopback_tcp_cap() -> float:
    """What one TCP stream carries through this machine's network stack (loopback, no shaping): the host path's
    per-stream ceiling for the GPU table (Gloo's ring sends one stream per hop)."""
    import threading

    nbytes = 512 << 20
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def sink() -> None:
        conn, _ = srv.accept()
        while conn.recv(1 << 20):
            pass

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    conn = socket.create_connection(("127.0.0.1", port))
    block, t0 = b"\0" * (1 << 20), time.perf_counter()
    for _ in range(nbytes >> 20):
        conn.sendall(block)
    conn.close()
    t.join(timeout=60)
    return nbytes / (time.perf_counter() - t0)


def train_argv(args, store: str, run_dir: str, extra: list[str]) -> list[str]:
    return [
        os.path.join(BIN, "dstrain"),
        "train",
        "--train_files",
        store,
        "--alphabet_config_path",
        ALPHABET,
        "--n_hidden",
        str(args.n_hidden),
        "--epochs",
        str(args.epochs),
        "--train_batch_size",
        str(args.batch),
        "--dropout_rate",
        "0.05",
        "--learning_rate",
        "0.0001",
        "--noshow_progressbar",
        "--checkpoint_dir",
        run_dir,
        "--checkpoint_secs",
        "0",
        "--intra_op_parallelism_threads",
        "1",
        "--inter_op_parallelism_threads",
        "1",
        *extra,
    ]


def pinned(cmd: list[str]) -> list[str]:
    """The rank held to core ``HOROVOD_RANK`` (+ the offset in DSTRAIN_CORE0): one core per rank, as a node would
    give."""
    return ["sh", "-c", 'exec taskset -c "$((${DSTRAIN_CORE0:-0} + ${HOROVOD_RANK:-0}))" "$@"', "sh", *cmd]


def step_seconds(run_dir: str, epochs: int) -> tuple[float, int]:
    """(seconds per optimizer step, steps per epoch) of the best epoch after the first (which includes tracing)."""
    records = epoch_records(run_dir)
    if len(records) < epochs:
        raise RuntimeError(f"{run_dir}: {len(records)} epoch records of {epochs}")
    best = min(records[1:] or records, key=lambda r: r["seconds"] / r["steps"])
    return best["seconds"] / best["steps"], best["steps"]


def timeline_allreduce_s(path: str) -> float:
    """Wall time in ALLREDUCE activities (union over tensors) in Horovod's timeline, per training second is not
    asked: the total, to divide by the steps that wrote it."""
    if not os.path.exists(path):
        return math.nan
    text = open(path).read().strip().rstrip(",")
    events = json.loads(text if text.endswith("]") else text + "]")
    # Activities nest (ALLREDUCE holds the fusion-buffer copies and GLOO_ALLREDUCE): an end closes the latest begin
    # of its tensor (pid).
    spans, stacks = [], collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "B":
            stacks[e["pid"]].append((e.get("name"), e["ts"]))
        elif e.get("ph") == "E" and stacks[e.get("pid")]:
            name, begun = stacks[e["pid"]].pop()
            if name == "ALLREDUCE":
                spans.append((begun, e["ts"]))
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e6


def horovodrun(box: Box, node: str, hosts: str, np_: int, cmd: list[str], env: dict, timeout: float) -> None:
    argv = box.argv(
        node,
        "env",
        *[f"{k}={v}" for k, v in env.items()],
        os.path.join(BIN, "horovodrun"),
        "-np",
        str(np_),
        "-H",
        hosts,
        "--gloo",
        *(["--network-interfaces", "eth0"] if "," in hosts else []),
        *pinned(cmd),
    )
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)}\nfailed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def measure(args, work: str) -> dict:
    from conftest import synthetic_store

    store = synthetic_store(os.path.join(work, "store"), args.utterances, row_group_rows=32, frames=(100, 400), seed=1)
    box = Box(os.path.join(work, "cluster"))
    env = {"PATH": f"{BIN}:{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out: dict = {"single": {}, "jobs": {}, "pair": {}, "links": {}}
    timeout = 120 + 60 * args.epochs
    box.sh("up", "2")
    try:
        for acc in (1, 4):
            extra = ["--accumulation_steps", str(acc)]
            run = os.path.join(work, f"single-{acc}")
            horovodrun(box, "node1", "node1:1", 1, train_argv(args, store, run, extra), env, timeout)
            out["single"][acc] = step_seconds(run, args.epochs)[0]
            # Two independent jobs at once, one per node and core: the ceiling of two ranks on this machine.
            runs = [os.path.join(work, f"jobs-{acc}-{i}") for i in (1, 2)]
            procs = [
                subprocess.Popen(
                    box.argv(
                        f"node{i}",
                        "env",
                        *[f"{k}={v}" for k, v in env.items()],
                        f"DSTRAIN_CORE0={i - 1}",
                        os.path.join(BIN, "horovodrun"),
                        "-np",
                        "1",
                        "-H",
                        f"node{i}:1",
                        "--gloo",
                        *pinned(train_argv(args, store, runs[i - 1], extra)),
                    ),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for i in (1, 2)
            ]
            for p in procs:
                if p.wait(timeout=timeout):
                    raise RuntimeError(f"an independent job failed ({p.returncode})")
            out["jobs"][acc] = sum(step_seconds(r, args.epochs)[0] for r in runs) / 2
            print(
                f"acc {acc}: one rank {out['single'][acc] * 1e3:.0f} ms/step, two jobs at once "
                f"{out['jobs'][acc] * 1e3:.0f} ms/step each",
                flush=True,
            )
        for rate in args.rates.split(","):
            box.sh("shape", "--rate", rate)
            link = probe_link(box, parse_rate(rate))
            out["links"][rate] = {"bandwidth": link.bandwidth, "latency": link.latency}
            print(f"{rate}: TCP {link.bandwidth * 8 / 1e6:.0f} Mbit/s, RTT {2 * link.latency * 1e3:.2f} ms", flush=True)
            for comp, acc in CONFIGS:
                run = os.path.join(work, f"pair-{rate}-{comp}-{acc}")
                timeline = run + ".timeline.json"
                extra = [
                    "--accumulation_steps",
                    str(acc),
                    "--gradient_compression",
                    comp,
                    "--horovod_timeline",
                    timeline,
                ]
                horovodrun(box, "node1", "node1:1,node2:1", 2, train_argv(args, store, run, extra), env, timeout * 3)
                step, steps = step_seconds(run, args.epochs)
                total_steps = sum(r["steps"] for r in epoch_records(run))
                allreduce = timeline_allreduce_s(timeline) / max(1, total_steps)
                out["pair"][f"{rate}/{comp}/{acc}"] = {"step": step, "allreduce": allreduce}
                print(
                    f"{rate} {comp:4} x{acc}: {step * 1e3:.0f} ms/step, allreduce {allreduce * 1e3:.0f} ms/step, "
                    f"efficiency {out['jobs'][acc] / step:.0%}",
                    flush=True,
                )
    finally:
        box.sh("down", check=False)
    return out


def parse_rate(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[: -len(u)]) * f
    return float(rate)


def gradient_bytes(n_hidden: int, n_classes: int = 29, n_input: int = 26, n_context: int = 9) -> int:
    """fp32 bytes of DeepSpeech's gradients at this width (what the allreduce moves)."""
    width = (2 * n_context + 1) * n_input
    h = n_hidden
    params = (width * h + h) + 2 * (h * h + h) + 4 * (h * h + h * h + h) + (h * h + h) + (h * n_classes + n_classes)
    return 4 * params


def report(args, m: dict) -> bool:
    nbytes = gradient_bytes(args.n_hidden)
    points, rows = [], []
    for key, v in m["pair"].items():
        rate, comp, acc = key.split("/")
        link = Link(**m["links"][rate])
        b = nbytes / (2 if comp == "fp16" else 1)
        points.append((m["jobs"][int(acc)], b, link, v["step"]))
        rows.append((rate, comp, int(acc), v, b, link))
    model = fit(points)
    print(
        f"\nModel fitted on the {len(points)} two-node runs: efficiency {model.efficiency:.2f} of the measured TCP "
        f"throughput, {model.overhead * 1e3:.1f} ms per collective (2 per step), compute {model.interference:.1%} "
        f"slower beside Horovod's threads on the rank's core (not carried to GPUs), overlap 0; gradients "
        f"{nbytes / 1e6:.1f} MB fp32"
    )
    print(
        "| link | gradients | accumulation | measured step | of which allreduce (timeline) | model | error "
        "| efficiency |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for rate, comp, acc, v, b, link in rows:
        predicted = model.step(m["jobs"][acc], b, 2, link)
        err = predicted / v["step"] - 1
        ok &= abs(err) <= TOLERANCE
        print(
            f"| {rate} | {'fp16' if comp == 'fp16' else 'fp32'} | {acc} | {v['step'] * 1e3:.0f} ms | "
            f"{v['allreduce'] * 1e3:.0f} ms | {predicted * 1e3:.0f} ms | {err:+.0%} | "
            f"{m['jobs'][acc] / v['step']:.0%} |"
        )
    print(f"every configuration within +-{TOLERANCE:.0%}: {'yes' if ok else 'NO'}")
    m["model"] = {"efficiency": model.efficiency, "overhead": model.overhead, "interference": model.interference}
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates", default="100mbit,1gbit,10gbit", help="link rates to shape the box to, comma-separated"
    )
    parser.add_argument("--n_hidden", type=int, default=384)
    parser.add_argument("--batch", type=int, default=16, help="utterances per rank and micro-batch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--utterances", type=int, default=512)
    parser.add_argument("--out", default="", help="write the measurements and the model as JSON here")
    parser.add_argument("--from_json", default="", help="report from an earlier --out instead of measuring")
    parser.add_argument(
        "--predict_only",
        action="store_true",
        help="only the GPU table (model parameters from --from_json, else defaults)",
    )
    args = parser.parse_args()

    ok, m = True, {}
    if args.from_json:
        m = json.load(open(args.from_json))
        for key in ("single", "jobs"):  # JSON made the accumulation keys strings
            m[key] = {int(acc): v for acc, v in m[key].items()}
    elif not args.predict_only:
        if os.geteuid() != 0:
            sys.exit("benchmarks/scaling.py: the cluster in a box needs root")
        with tempfile.TemporaryDirectory(prefix="dstrain-scaling-") as work:
            m = measure(args, work)
    if m.get("pair"):
        ok = report(args, m)
    model = StepModel(**m["model"]) if "model" in m else StepModel(efficiency=0.5, overhead=5e-3)
    m["tcp_cap"] = m.get("tcp_cap") or loopback_tcp_cap()
    print(
        f"\nOne TCP stream through this machine's network stack (loopback): {m['tcp_cap'] * 8 / 1e9:.1f} Gbit/s "
        "(the host path's per-hop ceiling below)"
    )
    print("Inputs:", "; ".join(f"{k} = {v[0]:g} ({v[1]})" for k, v in GPU_INPUTS.items()))
    print_gpu_table(gpu_table(model, m["tcp_cap"]))
    if args.out:
        json.dump(m, open(args.out, "w"), indent=1, default=str)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
