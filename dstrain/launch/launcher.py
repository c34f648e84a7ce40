"""Thin helpers around ``horovodrun`` and ``mpirun``: hosts from SLURM or a hostfile, a pre-flight check of every
node (:mod:`dstrain.launch.preflight`) that also finds the network interface the nodes share, per-rank environment
defaults, per-rank log files. The launcher process is replaced by horovodrun/mpirun (exec), so signals reach the
ranks and the exit status is theirs; both abort every rank when one fails.

    dstrain launch --np 2 -- dstrain train --train_files ...
    dstrain launch --launcher mpirun --hostfile hosts -- dstrain train ...
    dstrain launch --check --hostfile hosts -- dstrain train ...   # only the pre-flight check
    dstrain launch --dry_run ...            # print the command instead of running it
    dstrain launch --elastic --min_np 2 --hostfile hosts -- dstrain train ...   # elastic: hosts discovered live

Elastic launches (``--elastic``) run horovodrun's elastic driver with a host discovery script shipped with dstrain
(``dstrain/launch/discover/``: a hostfile an operator edits while the job runs, or the SLURM allocation's nodes
that are up) and add ``--elastic`` to the ``dstrain train`` command. The driver (this process) must stay up: run it
on a stable node.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import dataclass

from dstrain.config import option
from dstrain.distributed import cpu_threads, inter_op_threads
from dstrain.executables import find_executable
from dstrain.launch import preflight

LAUNCHERS = ("horovodrun", "mpirun")
DISCOVERY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "discover")

# Defaults for every rank; a variable already set in the environment wins.
HOROVOD_DEFAULTS = {
    # DeepSpeech's dense layers hold ~47M parameters at n_hidden 2048: fuse gradients into 128 MiB buffers.
    "HOROVOD_FUSION_THRESHOLD": str(128 * 1024 * 1024),
    "NCCL_DEBUG": "WARN",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # A collective that waits this long on a peer fails (Horovod's default, stated here because the bounds in
    # docs/failure-model.md on a dead node count on it).
    "HOROVOD_GLOO_TIMEOUT_SECONDS": "30",
}
# Open MPI's daemons probe a silent peer after 10 s idle, every 5 s, and give up after 3 missed probes: mpirun learns
# of a node that lost its link within ~25 s instead of TCP's two hours, and aborts the job naming it.
MPI_KEEPALIVE = {"oob_tcp_keepalive_time": "10", "oob_tcp_keepalive_intvl": "5", "oob_tcp_keepalive_probes": "3"}


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


@dataclass(frozen=True)
class LaunchConfig:
    """dstrain launch: run a command on N ranks through horovodrun or mpirun (hosts from SLURM or a hostfile)"""

    command: tuple[str, ...] = option(positional=True, nargs=argparse.REMAINDER, metavar="-- COMMAND")
    """The per-rank command after --, e.g. -- dstrain train ..."""
    launcher: str = option("horovodrun", choices=LAUNCHERS)
    """Program that starts the ranks."""
    np: int = 0
    """Processes in all; 0 means one per host slot."""
    hosts: str = ""
    """h1:4,h2:4 (horovodrun's -H); empty: the SLURM allocation, else localhost:NP."""
    hostfile: str = ""
    """MPI (host slots=N) or Horovod (host:N) hostfile, instead of --hosts."""
    controller: str = option("gloo", choices=("gloo", "mpi"))
    """horovodrun's controller (mpirun always uses MPI)."""
    log_dir: str = ""
    """Per-rank stdout/stderr files go here; empty: ranks print to the console."""
    threads_per_rank: int = 0
    """OpenMP/TensorFlow intra-op threads per rank; 0: the node's cores divided by its ranks."""
    network_interface: str = ""
    """Network interface the ranks talk over (Horovod's Gloo, Open MPI's TCP, NCCL's sockets); empty: the one every
    node shares, found by the pre-flight check (nothing is set for a job on this machine alone)."""
    elastic: bool = False
    """Elastic training: horovodrun's elastic driver, hosts discovered live (--hostfile, re-read every second, or the
    SLURM allocation's nodes that are up), dstrain train --elastic on every rank. Gloo only."""
    min_np: int = 1
    """Elastic: fewest ranks to train with; below it the job waits (--elastic_timeout) for hosts to come back."""
    max_np: int = 0
    """Elastic: most ranks to train with; 0 means the slots listed when the job starts."""
    elastic_timeout: int = 600
    """Elastic: seconds to wait for --min_np ranks (at the start, or after losing hosts) before the job fails."""
    blacklist_cooldown: str = "10,300"
    """Elastic: a host whose rank failed is left out for at least MIN, at most MAX seconds (doubling each time it
    fails again), then tried again if the discovery still lists it."""
    host_discovery_script: str = ""
    """Elastic: your own discovery command (prints host:slots lines) instead of the hostfile or SLURM one."""
    preflight: bool = True
    """Check every node before starting the ranks: hostname resolution, shared stores and run directory, versions."""
    check: bool = False
    """Run the pre-flight check only, and exit (status 0 when every node is ready)."""
    dry_run: bool = False
    """Print the command, do not run it."""
    env: dict = option(default_factory=dict, cli=False)
    """Extra variables for every rank; they win over the environment."""

    def __post_init__(self) -> None:
        if self.command[:1] == ("--",):
            object.__setattr__(self, "command", tuple(self.command[1:]))
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.controller not in ("gloo", "mpi"):
            raise ValueError(f"controller must be gloo or mpi, got {self.controller!r}")
        if not self.command:
            raise ValueError("command: give the per-rank command after --, e.g. -- dstrain train ...")
        if self.np < 0:
            raise ValueError(f"np must be >= 0, got {self.np}")
        if self.hosts and self.hostfile:
            raise ValueError("give --hosts or --hostfile, not both")
        if self.elastic and (self.launcher != "horovodrun" or self.controller != "gloo"):
            raise ValueError(
                "--elastic runs horovodrun's elastic driver with the Gloo controller (not mpirun or --controller mpi)"
            )
        if self.min_np < 1 or self.max_np < 0 or (self.max_np and self.max_np < self.min_np):
            raise ValueError(f"need 1 <= --min_np <= --max_np, got {self.min_np} and {self.max_np}")
        if not re.fullmatch(r"\d+,\d+", self.blacklist_cooldown):
            raise ValueError(f"blacklist_cooldown: MIN,MAX seconds, got {self.blacklist_cooldown!r}")


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list: ``gpu[01-03,07],login1`` -> ``[gpu01, gpu02, gpu03, gpu07, login1]``."""
    hosts: list[str] = []
    for prefix, ranges, suffix_sep in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?(,|$)", nodelist):
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(prefix + part)
    return hosts


def expand_tasks_per_node(spec: str, n_nodes: int) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` such as ``4(x2),2`` -> ``[4, 4, 2]``; a single number applies to every node."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot read tasks per node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if len(counts) == 1 and n_nodes > 1:
        counts *= n_nodes
    return counts


def hosts_from_slurm(env: dict[str, str]) -> tuple[Host, ...]:
    """Hosts and slots of the current SLURM allocation (one slot per task, i.e. per GPU with --gpus-per-task)."""
    nodes = expand_nodelist(env["SLURM_JOB_NODELIST"])
    spec = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
    if not spec:
        gpus = env.get("SLURM_GPUS_ON_NODE")
        spec = gpus if gpus else "1"
    counts = expand_tasks_per_node(spec, len(nodes))
    if len(counts) != len(nodes):
        raise ValueError(f"{len(nodes)} nodes but tasks per node {spec!r}")
    return tuple(Host(n, c) for n, c in zip(nodes, counts))


def hosts_from_hostfile(path: str) -> tuple[Host, ...]:
    """MPI hostfile (``host slots=4``) or Horovod's (``host:4``); a bare host has one slot. ``#`` comments."""
    hosts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"(\S+?)(?::(\d+))?(?:\s+slots\s*=\s*(\d+))?(?:\s+.*)?", line)
            if not m:
                raise ValueError(f"{path}: cannot read host line {line!r}")
            hosts.append(Host(m.group(1), int(m.group(2) or m.group(3) or 1)))
    if not hosts:
        raise ValueError(f"{path}: no hosts")
    return tuple(hosts)


def parse_hosts(spec: str) -> tuple[Host, ...]:
    """``h1:4,h2:4`` (horovodrun's -H)."""
    out = []
    for item in spec.split(","):
        name, _, slots = item.partition(":")
        out.append(Host(name, int(slots or 1)))
    return tuple(out)


def from_slurm(cfg: LaunchConfig, env: dict[str, str]) -> bool:
    """Whether the hosts are the SLURM allocation's (no --hosts, --hostfile or --np)."""
    return not cfg.hosts and not cfg.hostfile and "SLURM_JOB_NODELIST" in env and not cfg.np


def resolve_hosts(cfg: LaunchConfig, env: dict[str, str]) -> tuple[Host, ...]:
    """--hosts, else --hostfile, else the SLURM allocation (unless --np says otherwise), else none (localhost)."""
    if cfg.hosts:
        return parse_hosts(cfg.hosts)
    if cfg.hostfile:
        return hosts_from_hostfile(cfg.hostfile)
    if from_slurm(cfg, env):
        return hosts_from_slurm(env)
    return ()


def rank_environment(
    cfg: LaunchConfig, hosts: tuple[Host, ...], base: dict[str, str], cores_per_node: int
) -> dict[str, str]:
    """Variables every rank gets (only those not already in ``base``)."""
    ranks_per_node = max(h.slots for h in hosts) if hosts else max(cfg.np, 1)
    threads = cfg.threads_per_rank or cpu_threads(cores_per_node, ranks_per_node)[0]
    wanted = dict(HOROVOD_DEFAULTS)
    wanted.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "TF_NUM_INTRAOP_THREADS": str(threads),
            "TF_NUM_INTEROP_THREADS": str(inter_op_threads(threads)),
        }
    )
    wanted.update(cfg.env)
    return {k: v for k, v in wanted.items() if k not in base or k in cfg.env}


def build_command(
    cfg: LaunchConfig, base_env: dict[str, str], cores_per_node: int, interface: str = ""
) -> tuple[list[str], dict[str, str]]:
    """The launcher argv and the environment to run it with; ``interface`` is the network the ranks talk over."""
    hosts = resolve_hosts(cfg, base_env) or (Host("localhost", cfg.np or 1),)
    np_ = cfg.np or sum(h.slots for h in hosts)
    extra = rank_environment(cfg, hosts, base_env, cores_per_node)
    if interface:
        # NCCL finds its own interface otherwise, and may pick one the other nodes cannot reach (docker0, a VPN).
        extra.update({"NCCL_SOCKET_IFNAME": interface, "HOROVOD_GLOO_IFACE": interface})
    env = {**base_env, **extra}
    host_arg = ",".join(f"{h.name}:{h.slots}" for h in hosts)
    if cfg.elastic:
        argv = ["horovodrun", "-np", str(np_), *elastic_arguments(cfg, base_env, np_), "--gloo"]
        if interface:
            argv += ["--network-interfaces", interface]
        if cfg.log_dir:
            argv += ["--output-filename", cfg.log_dir]
        command = list(cfg.command)
        if command[:2] in (["dstrain", "train"], [os.path.join(os.path.dirname(sys.executable), "dstrain"), "train"]):
            command += [] if "--elastic" in command else ["--elastic"]
        return argv + command, env
    if cfg.launcher == "horovodrun":
        argv = ["horovodrun", "-np", str(np_), "-H", host_arg, f"--{cfg.controller}"]
        if interface:
            argv += ["--network-interfaces", interface]
        if cfg.log_dir:
            argv += ["--output-filename", cfg.log_dir]
    else:
        argv = ["mpirun", "-np", str(np_), "-H", host_arg, "--bind-to", "none", "--map-by", "slot"]
        if os.geteuid() == 0:
            argv.append("--allow-run-as-root")
        if cfg.log_dir:
            argv += ["--output-filename", cfg.log_dir]
        for name, value in MPI_KEEPALIVE.items():
            argv += ["--mca", name, value]
        if interface:
            argv += ["--mca", "btl_tcp_if_include", interface, "--mca", "oob_tcp_if_include", interface]
        # mpirun passes only what it is told to the ranks (remote ones included).
        for name in sorted(set(extra) | FORWARDED | {n for n in env if n.startswith("DSTRAIN_")}):
            if name in env:
                argv += ["-x", name]
        argv += ["-x", "HOROVOD_CONTROLLER=mpi", "-x", "HOROVOD_CPU_OPERATIONS=mpi"]
    return argv + list(cfg.command), env


def elastic_arguments(cfg: LaunchConfig, env: dict[str, str], np_: int) -> list[str]:
    """horovodrun's elastic flags: the discovery command, the bounds on the world size, the timeouts."""
    if cfg.host_discovery_script:
        script = cfg.host_discovery_script
    elif cfg.hostfile:
        script = f"{shlex.quote(os.path.join(DISCOVERY, 'hostfile.sh'))} {shlex.quote(os.path.abspath(cfg.hostfile))}"
    elif "SLURM_JOB_NODELIST" in env:
        script = shlex.quote(os.path.join(DISCOVERY, "slurm.sh"))
    else:
        raise ValueError(
            "--elastic needs hosts that can change: a --hostfile (re-read while the job runs), a SLURM "
            "allocation, or --host_discovery_script"
        )
    low, high = cfg.blacklist_cooldown.split(",")
    return [
        "--min-np",
        str(cfg.min_np),
        "--max-np",
        str(cfg.max_np or np_),
        "--host-discovery-script",
        script,
        "--elastic-timeout",
        str(cfg.elastic_timeout),
        "--blacklist-cooldown-range",
        low,
        high,
    ]


FORWARDED = {"PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "TF_DETERMINISTIC_OPS"}
"""Variables of the launching shell that mpirun hands to every rank (horovodrun hands them all)."""


def run_preflight(cfg: LaunchConfig, env: dict[str, str]) -> str:
    """The pre-flight check on every host (raises naming each problem); returns the interface to use ("" for a job
    on this machine alone unless --network_interface names one)."""
    hosts = resolve_hosts(cfg, env) or (Host("localhost", cfg.np or 1),)
    names = list(dict.fromkeys(h.name for h in hosts))
    interface = preflight.check(names, cfg.command, cfg.network_interface, slurm=from_slurm(cfg, env))
    print(f"dstrain launch: pre-flight check passed on {', '.join(names)}", flush=True)
    if interface is not None:
        how = "given" if cfg.network_interface else "shared by every node"
        print(
            f"dstrain launch: network interface {interface}, {how}: HOROVOD_GLOO_IFACE, NCCL_SOCKET_IFNAME, "
            + ("Open MPI btl/oob_tcp_if_include" if cfg.launcher == "mpirun" else "horovodrun --network-interfaces"),
            flush=True,
        )
        return interface.name
    return cfg.network_interface


def launch(cfg: LaunchConfig) -> int:
    interface = cfg.network_interface
    if cfg.preflight or cfg.check:
        interface = run_preflight(cfg, dict(os.environ))
    if cfg.check:
        return 0
    argv, env = build_command(cfg, dict(os.environ), os.cpu_count() or 1, interface)
    argv[0] = find_executable(argv[0])
    # Ranks started by the launcher find dstrain and Python beside it, activated or not.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if cfg.log_dir:
        os.makedirs(cfg.log_dir, exist_ok=True)
    print("+ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    if cfg.dry_run:
        return 0
    if cfg.elastic:
        return run_elastic_driver(argv, env, cfg.command, cfg.min_np, cfg.elastic_timeout)
    os.execvpe(argv[0], argv, env)  # never returns
    return 127


def run_elastic_driver(
    argv: list[str], env: dict[str, str], command: tuple[str, ...], min_np: int, timeout_s: int
) -> int:
    """horovodrun's elastic driver as a child, its output passed through; its exit status, except that a job whose
    ranks stopped on request (preemption: a checkpoint, then status 75 on every rank) exits 75 as other launches do,
    which the elastic driver does not pass on (it counts the ranks' 75s as failed workers; the run record says which
    it was), and a job that fell below --min_np for --elastic_timeout ends with one line saying so (Horovod's own is
    in a traceback)."""
    import subprocess

    driver = [sys.executable, "-m", "dstrain.launch.elastic_driver", *argv[1:]]  # horovodrun, with a hang fixed
    proc = subprocess.Popen(driver, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    too_few = False
    for line in proc.stdout:
        sys.stdout.write(line)
        too_few |= "Timed out waiting for" in line and "Horovod processes" in line
    code = proc.wait()
    run_dir = flag_value(command, "--save_checkpoint_dir") or flag_value(command, "--checkpoint_dir")
    if code and run_dir:
        from dstrain.record import read_record
        from dstrain.rundir import RunDir

        path = RunDir(run_dir).metrics_path
        events = read_record(path) if os.path.exists(path) else []
        last = next((r for r in reversed(events) if r["event"] in ("start", "reset", "stop", "final")), None)
        if last is not None and last["event"] == "stop" and last.get("exit_code"):
            print(
                f"dstrain launch: the ranks stopped on request ({last.get('signal') or last.get('reason')}) after a "
                f"checkpoint; exit status {last['exit_code']}",
                flush=True,
            )
            return int(last["exit_code"])
    if code and too_few:
        where = f" ({run_dir})" if run_dir else ""
        print(
            f"dstrain launch: error: fewer than --min_np {min_np} ranks' hosts for --elastic_timeout {timeout_s} s: "
            f"the job stopped; the same command resumes from its last checkpoint{where} once enough hosts are up",
            flush=True,
        )
    return code


def flag_value(command: tuple[str, ...] | list[str], flag: str) -> str:
    """``--flag VALUE`` or ``--flag=VALUE`` in a command line ("" when absent)."""
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return ""


def launch_argv(
    launcher: str, rank_command: list[str], np: int = 0, hostfile: str = "", log_dir: str = ""
) -> list[str]:
    """The ``dstrain launch`` command line for a job: what the k8s launcher pod, the sbatch scripts' docs and the
    tests all run, so the three cannot drift apart."""
    argv = ["dstrain", "launch", "--launcher", launcher]
    if np:
        argv += ["--np", str(np)]
    if hostfile:
        argv += ["--hostfile", hostfile]
    if log_dir:
        argv += ["--log_dir", log_dir]
    return argv + ["--"] + list(rank_command)
