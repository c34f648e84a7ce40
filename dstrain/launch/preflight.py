"""The pre-flight check of a launch: before any rank starts, every node is asked (over ssh, or srun inside a SLURM
allocation) what a multi-node job needs of it, and each failure becomes one line naming the node and the fix.

On every node:

- its hostname resolves to an address on the network interface the nodes share, not to loopback (Gloo and MPI hand
  that address to the other ranks; Debian and Ubuntu map a machine's own name to 127.0.1.1), and every node's name
  resolves there to that node's address;
- the feature stores and the run directory of the rank command are visible, and the run directory is writable and
  the same storage everywhere: a token written by the launching node is read by all, and each node's token is read
  back by the launching node;
- the same dstrain, TensorFlow, Horovod and Python versions as the launching node.

The same answers give the interface: the one every node has, with the address its hostname resolves to, on one
network. ``python -m dstrain.launch.preflight REQUEST`` is the probe each node runs (JSON in, JSON out).
"""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

TOKEN = ".dstrain-check-"
PROBE_TIMEOUT_S = 60
STORE_FLAGS = ("train_files", "dev_files", "test_files")
RUN_DIR_FLAGS = ("checkpoint_dir", "save_checkpoint_dir")


class PreflightError(ValueError):
    """Some node is not ready for the job; the message has one line per problem."""


@dataclass(frozen=True)
class Interface:
    name: str
    network: str  # 10.1.0.0/24, or "" when the nodes' addresses on it are on different networks (routed)

    def __str__(self) -> str:
        return f"{self.name} ({self.network})" if self.network else self.name


# --- what a node answers (runs on every node)
def versions() -> dict[str, str]:
    """dstrain's, TensorFlow's, Horovod's and Python's versions here (from package metadata: nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    import dstrain

    out = {"dstrain": dstrain.__version__, "python": platform.python_version()}
    for name, dists in (
        ("tensorflow", ("tensorflow", "tensorflow-cpu", "tensorflow-intel")),
        ("horovod", ("horovod",)),
    ):
        out[name] = "not installed"
        for dist in dists:
            try:
                out[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


def ipv4_addresses(name: str) -> list[str]:
    try:
        return sorted({ai[4][0] for ai in socket.getaddrinfo(name, None, socket.AF_INET)})
    except OSError:
        return []


def interfaces() -> dict[str, list[str]]:
    """Interface -> its IPv4 addresses as ``address/prefix``."""
    import psutil

    out: dict[str, list[str]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and a.netmask:
                out.setdefault(name, []).append(str(ipaddress.ip_interface(f"{a.address}/{a.netmask}")))
    return out


def probe(request: dict) -> dict:
    """This node's answers to ``request`` (made by :func:`make_request`)."""
    from dstrain.store.layout import LEGACY_MANIFEST, MANIFEST, StoreLayout

    me = request["as"]
    stores = {}
    for url in request["stores"]:
        try:
            layout = StoreLayout(url)
            found = any(layout.fs.exists(layout.url(m)) for m in (MANIFEST, LEGACY_MANIFEST))
            stores[url] = "" if found else f"no {MANIFEST} there"
        except Exception as e:  # any fsspec or OS error means: not visible from here
            stores[url] = str(e).splitlines()[0] if str(e) else type(e).__name__
    run_dirs = {}
    for path in request["run_dirs"]:
        token = os.path.join(path, TOKEN + request["token"])
        try:
            with open(token, encoding="utf-8") as f:
                seen = f.read() == request["token"]
        except OSError:
            seen = False
        if not seen:
            run_dirs[path] = "unseen"
            continue
        try:
            with open(f"{token}-{me}", "w", encoding="utf-8") as f:
                f.write(me)
            run_dirs[path] = ""
        except OSError as e:
            run_dirs[path] = f"cannot write: {e.strerror or e}"
    hostname = socket.gethostname()
    return {
        "as": me,
        "hostname": hostname,
        "resolves": ipv4_addresses(hostname),
        "interfaces": interfaces(),
        "peers": {h: ipv4_addresses(h) for h in request["hosts"]},
        "versions": versions(),
        "stores": stores,
        "run_dirs": run_dirs,
    }


# --- asking every node (runs on the launching node)
def command_paths(command: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(feature stores, run directories) named by a ``dstrain train`` command's flags (or its --config file)."""
    values: dict[str, str] = {}
    for i, arg in enumerate(command):
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq and i + 1 < len(command):
                value = command[i + 1]
            values[name] = value
    if values.get("config"):
        import yaml

        with open(values["config"], encoding="utf-8") as f:
            from_file = yaml.safe_load(f) or {}
        values = {
            **{k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in from_file.items()},
            **values,
        }
    # A memory:// store lives in one process: nothing another process could be asked about.
    stores = [s for flag in STORE_FLAGS for s in values.get(flag, "").split(",") if s and not s.startswith("memory://")]
    run_dirs = [values[f] for f in RUN_DIR_FLAGS if values.get(f) and "://" not in values[f]]
    return stores, list(dict.fromkeys(run_dirs))


def make_request(hosts: list[str], command: tuple[str, ...]) -> dict:
    stores, run_dirs = command_paths(command)
    return {"hosts": hosts, "stores": stores, "run_dirs": run_dirs, "token": uuid.uuid4().hex, "as": ""}


def is_local(host: str) -> bool:
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    mine = {a.split("/")[0] for addrs in interfaces().values() for a in addrs}
    return any(a in mine or a.startswith("127.") for a in ipv4_addresses(host))


def _probe_argv(host: str, request: dict, local: bool) -> list[str]:
    argv = [sys.executable, "-m", "dstrain.launch.preflight", json.dumps({**request, "as": host})]
    if local:
        return argv
    # What mpirun does to start a rank there: ssh without a password, with Open MPI's agent and arguments where set
    # (the Kubernetes launcher pod's workers listen on port 2222: OMPI_MCA_plm_rsh_args="-p 2222").
    agent = shlex.split(os.environ.get("OMPI_MCA_plm_rsh_agent", "ssh").split(":")[0]) or ["ssh"]
    extra = shlex.split(os.environ.get("OMPI_MCA_plm_rsh_args", ""))
    return [*agent, *extra, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", host, shlex.join(argv)]


def _run(argv: list[str]) -> dict | str:
    """A probe's answer, or why there is none."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"no answer within {PROBE_TIMEOUT_S} s"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    return (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]


def ask(
    hosts: list[str], request: dict, slurm: bool = False, local: frozenset[str] | set[str] = frozenset()
) -> dict[str, dict | str]:
    """Every host's answer (or the reason it gave none), by host name; ``local`` hosts answer without ssh."""
    if slurm:
        # Inside an allocation: one task per node through srun, as the job's own ranks start.
        argv = [
            "srun",
            f"--nodes={len(hosts)}",
            f"--ntasks={len(hosts)}",
            "--ntasks-per-node=1",
            "--kill-on-bad-exit=0",
            sys.executable,
            "-m",
            "dstrain.launch.preflight",
            json.dumps({**request, "as": "$SLURMD_NODENAME"}),
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S * 2)
        answers = {}
        for line in proc.stdout.splitlines():
            try:
                a = json.loads(line)
                answers[a["as"]] = a
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        why = (proc.stderr.strip().splitlines() or ["no answer from srun"])[-1]
        return {h: answers.get(h, why) for h in hosts}
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return dict(zip(hosts, pool.map(lambda h: _run(_probe_argv(h, request, h in local)), hosts)))


# --- judging the answers
def choose_interface(answers: dict[str, dict], wanted: str = "") -> Interface:
    """``wanted`` if every node has it; else the interface every node has, preferring the one its hostname resolves
    to and then one whose addresses share a network."""
    nodes = list(answers)
    if wanted:
        lacking = [n for n in nodes if wanted not in answers[n]["interfaces"]]
        if lacking:
            raise PreflightError(
                "\n".join(
                    f"{n}: no network interface {wanted} with an IPv4 address (it has "
                    f"{_describe(answers[n]['interfaces'])}): choose another --network_interface"
                    for n in lacking
                )
            )
        return Interface(wanted, _common_network(answers, wanted))
    common = set.intersection(*(set(a["interfaces"]) for a in answers.values()))
    candidates = [
        i
        for i in common
        if not all(ipaddress.ip_interface(x).is_loopback for a in answers.values() for x in a["interfaces"][i])
    ]

    def preference(name: str) -> tuple:
        bound = all(set(a["resolves"]) & {x.split("/")[0] for x in a["interfaces"][name]} for a in answers.values())
        return (not bound, not _common_network(answers, name), name)

    if not candidates:
        raise PreflightError(
            "no network interface with an IPv4 address is shared by every node ("
            + "; ".join(f"{n}: {_describe(answers[n]['interfaces'])}" for n in nodes)
            + "): give the one the nodes talk over with --network_interface"
        )
    best = min(candidates, key=preference)
    return Interface(best, _common_network(answers, best))


def _describe(ifaces: dict[str, list[str]]) -> str:
    return ", ".join(f"{name} {' '.join(addrs)}" for name, addrs in sorted(ifaces.items())) or "none"


def _common_network(answers: dict[str, dict], name: str) -> str:
    networks = {str(ipaddress.ip_interface(x).network) for a in answers.values() for x in a["interfaces"][name]}
    return networks.pop() if len(networks) == 1 else ""


def problems(
    answers: dict[str, dict | str], interface: Interface | None, request: dict, reference: dict[str, str]
) -> list[str]:
    """One line per problem, each naming the node and the fix."""
    out = []
    for node, a in answers.items():
        if isinstance(a, str):
            out.append(
                f"{node}: could not run the check there ({a}): the launcher needs passwordless ssh to every node "
                f"and dstrain at {sys.executable} on each"
            )
    ok = {n: a for n, a in answers.items() if isinstance(a, dict)}
    if interface is not None:
        own = {n: {x.split("/")[0] for x in a["interfaces"].get(interface.name, [])} for n, a in ok.items()}
        for node, a in ok.items():
            out += _resolution_problems(node, a, interface, own)
    for node, a in ok.items():
        for url, why in a["stores"].items():
            if why:
                out.append(
                    f"{node}: cannot see the feature store {url} ({why}): put stores on storage every node mounts "
                    "at the same path"
                )
        for path, why in a["run_dirs"].items():
            if why == "unseen":
                out.append(
                    f"{node}: does not see the file the launching node wrote in the run directory {path}: it must "
                    "be on storage shared by every node, at the same path"
                )
            elif why:
                out.append(
                    f"{node}: {why.replace('cannot write', f'cannot write in the run directory {path}')}: "
                    "every node must be able to write there (rank 0 may run on any of them)"
                )
        differ = [f"{k} {a['versions'].get(k)} (here {v})" for k, v in reference.items() if a["versions"].get(k) != v]
        if differ:
            out.append(
                f"{node}: {', '.join(differ)}: install the same dstrain, TensorFlow, Horovod and Python on every "
                "node (tools/install.sh, or one environment on shared storage)"
            )
    return out


def _resolution_problems(node: str, a: dict, interface: Interface, own: dict[str, set[str]]) -> list[str]:
    out = []
    mine = sorted(own[node])
    where = f"its {interface.name} address {' '.join(mine)}" if mine else f"an address on {interface.name}"
    loopback = [x for x in a["resolves"] if ipaddress.ip_address(x).is_loopback]
    if not a["resolves"]:
        out.append(f"{node}: its hostname {a['hostname']} does not resolve: map it to {where} in /etc/hosts or DNS")
    elif loopback:
        out.append(
            f"{node}: its hostname {a['hostname']} resolves to {' '.join(loopback)} (loopback), which Gloo and MPI "
            f"would give the other ranks: map it to {where} in /etc/hosts or DNS (Debian and Ubuntu map a "
            "machine's name to 127.0.1.1)"
        )
    elif mine and not set(a["resolves"]) & own[node]:
        out.append(
            f"{node}: its hostname {a['hostname']} resolves to {' '.join(a['resolves'])}, not to {where}: fix "
            "/etc/hosts or DNS, or choose that address's interface with --network_interface"
        )
    for peer, addrs in a["peers"].items():
        if peer != node and peer in own and own[peer] and not set(addrs) & own[peer]:
            seen = " ".join(addrs) or "nothing"
            out.append(
                f"{node}: resolves {peer} to {seen}, not to {peer}'s {interface.name} address "
                f"{' '.join(sorted(own[peer]))}: fix /etc/hosts or DNS on {node}"
            )
    return out


def check(
    hosts: list[str], command: tuple[str, ...], wanted_interface: str = "", slurm: bool = False
) -> Interface | None:
    """Asks every node; raises :class:`PreflightError` listing every problem; returns the interface the ranks should
    use (None for a job on this machine alone)."""
    request = make_request(hosts, command)
    local = {h for h in hosts if not slurm and is_local(h)}
    remote = slurm or len(local) < len(hosts)
    for path in request["run_dirs"]:
        try:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, TOKEN + request["token"]), "w", encoding="utf-8") as f:
                f.write(request["token"])
        except OSError as e:
            raise PreflightError(
                f"cannot write in the run directory {path} from this node: {e.strerror or e}"
            ) from None
    try:
        answers = ask(hosts, request, slurm, local)
        ok = {n: a for n, a in answers.items() if isinstance(a, dict)}
        interface = None
        found = []
        if remote and ok:
            try:
                interface = choose_interface(ok, wanted_interface)
            except PreflightError as e:
                found.append(str(e))
        found += problems(answers, interface, request, versions())
        for path in request["run_dirs"]:
            found += [
                f"{n}: wrote its file in the run directory {path}, but this node cannot read it: the run directory "
                "must be on storage shared by every node"
                for n, a in ok.items()
                if not a["run_dirs"].get(path)
                and not os.path.exists(os.path.join(path, f"{TOKEN}{request['token']}-{n}"))
            ]
    finally:
        _remove_tokens(request)
    if found:
        lines = "\n  ".join(found)
        raise PreflightError(f"pre-flight check failed ({len(found)} problem(s); --nopreflight skips it):\n  {lines}")
    return interface


def _remove_tokens(request: dict) -> None:
    for path in request["run_dirs"]:
        for name in (TOKEN + request["token"], *(f"{TOKEN}{request['token']}-{h}" for h in request["hosts"])):
            try:
                os.remove(os.path.join(path, name))
            except OSError:
                pass


if __name__ == "__main__":
    req = json.loads(sys.argv[1])
    if req["as"] == "$SLURMD_NODENAME":
        req["as"] = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    print(json.dumps(probe(req)))
