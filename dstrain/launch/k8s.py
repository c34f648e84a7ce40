"""Kubernetes manifests for dstrain: a Kubeflow MPIJob (kubeflow.org/v2beta1) for training, a Job for
preprocessing, the ReadWriteMany volume both share, and a NetworkPolicy per job.

    dstrain k8s render --workers 4 --gpus 8 --image registry/dstrain:0.1 --data /data > job.yaml

The launcher pod runs exactly ``dstrain launch --launcher mpirun --hostfile /etc/mpi/hostfile -- dstrain train
...`` (:func:`dstrain.launch.launcher.launch_argv`), the command the test suite runs under mpirun, once a short
script (:data:`LAUNCHER_SCRIPT`) has collected the workers' host keys; the MPI operator
writes the hostfile (one line per worker with ``slots=GPUS``) and the job's SSH client key. Pods run as the image's
unprivileged ``mpiuser`` (uid 1000) with a read-only root filesystem: the workers' sshd listens on port 2222 with its
own config and a host key each worker makes when it starts; the launcher trusts exactly the keys its job's workers
present (``ssh-keyscan`` of the hostfile's hosts, then strict host key checking). A NetworkPolicy admits traffic to
the job's pods from the job's pods only. docs/clusters.md, "Trust between the pods", says what that does and does not
protect against.
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass

import yaml

from dstrain.config import option
from dstrain.distributed.peer_watch import EXIT_PEER_LOST
from dstrain.launch.launcher import launch_argv
from dstrain.preemption import EXIT_PREEMPTED

HOSTFILE = "/etc/mpi/hostfile"
USER_HOME = "/home/mpiuser"
UID = 1000
SSH_PORT = 2222
JOB_SSH = f"{USER_HOME}/.ssh-job"
"""This pod's own SSH files, made for its job on a memory volume (never in the image): a worker's host key, the
launcher's known_hosts. ~/.ssh is the operator's read-only Secret (the job's client key pair)."""
HOST_KEY = f"{JOB_SSH}/host_ed25519_key"
"""The workers' sshd's host key (k8s/Containerfile's sshd config names it)."""
KNOWN_HOSTS = f"{JOB_SSH}/known_hosts"
JOB_LABEL = "dstrain/job"
"""Pod label naming the job a pod belongs to; the NetworkPolicy selects on it."""
CUDA_CACHE = "/var/cache/cuda"
"""CUDA_CACHE_PATH in the image: the kernels the driver JIT-compiles on Hopper."""

RANKS = "[b]in/dstrain train"
"""The ranks' command lines, as a regular expression that does not match itself: the script that holds it (the
pod's first process) must not count as a rank."""
# The worker's command. sshd is the container's main process and gets the pod's SIGTERM; the ranks are its sessions'
# children and would only see the SIGKILL after the grace period. Forward the request to them as SIGUSR1 (dstrain's
# stop signal): they checkpoint together and exit 75; once none is left, sshd and the pod go, within seconds of the
# save instead of at the end of the grace period. The host key is made here, at each start of the container: an
# image that carried one would give every pod of every job, and everyone who pulls it, the same key.
WORKER_SCRIPT = f"""stop() {{
  pkill -USR1 -f "{RANKS}"
  while pgrep -f "{RANKS}" >/dev/null; do sleep 1; done
  kill "$sshd" 2>/dev/null
  wait "$sshd"
  exit 0
}}
trap stop TERM
rm -f {HOST_KEY} {HOST_KEY}.pub
ssh-keygen -q -t ed25519 -N '' -f {HOST_KEY} || exit 1
/usr/sbin/sshd -De -f {USER_HOME}/.sshd_config &
sshd=$!
wait "$sshd"
"""

FIRST_KEY_WAIT_S = 120
"""How long the launcher waits for each worker's sshd at the job's start (the operator started the launcher once the
workers were up)."""
RERUN_KEY_WAIT_S = 1800
"""...and before a rerun, when a worker pod may have been replaced and be waiting for a node."""

# The launcher's command runs this, then the tested `dstrain launch` command ("$@"). It learns the host key of each
# worker in the operator's hostfile, inside the job's own pod network (sshd may still be starting, hence the retries),
# and logs its fingerprint; mpirun's and the pre-flight check's ssh then accept those keys and no others
# (StrictHostKeyChecking=yes: a changed or unknown key is refused, not learned). OMPI_MCA_plm_rsh_args is set here,
# not in the pod's env: the operator appends its own OMPI_MCA_plm_rsh_args (-o ConnectionAttempts=10) after the
# container's env, and the last one wins.
# A job that exits 75 (a stop request: a worker pod deleted, its ranks checkpointed) or 76 (a rank lost) runs again
# here, as SLURM requeues it: the MPIJob API has no pod failure policy, and its backoffLimit would count these. The
# keys are collected again first (a replaced worker has a new one). The launcher pod's own SIGTERM goes to the job,
# which checkpoints and exits 75, and the script exits with it.
LAUNCHER_SCRIPT = f"""set -eu
collect_host_keys() {{
  : > {KNOWN_HOSTS}
  while read -r host _ || [ -n "$host" ]; do
    case $host in ''|'#'*) continue ;; esac
    tries=0
    until key=$(ssh-keyscan -T 5 -p {SSH_PORT} -t ed25519 "$host" 2>/dev/null) && [ -n "$key" ]; do
      tries=$((tries + 1))
      if [ "$tries" -ge $(($1 / 2)) ]; then
        echo "dstrain launcher: error: no ssh host key from $host port {SSH_PORT} within $1 s" >&2
        exit 1
      fi
      sleep 2
    done
    printf '%s\\n' "$key" >> {KNOWN_HOSTS}
    echo "dstrain launcher: host key of $host: $(printf '%s\\n' "$key" | ssh-keygen -lf - | cut -d' ' -f2)"
  done < {HOSTFILE}
}}
export OMPI_MCA_plm_rsh_args="-p {SSH_PORT} -o StrictHostKeyChecking=yes -o UserKnownHostsFile={KNOWN_HOSTS} \\
-o GlobalKnownHostsFile=/dev/null -o ConnectionAttempts=10"
stopping=0 job=
trap 'stopping=1; [ -z "$job" ] || kill -TERM "$job" 2>/dev/null || true' TERM
wait_s={FIRST_KEY_WAIT_S}
runs=0
while :; do
  collect_host_keys "$wait_s"
  [ "$stopping" = 0 ] || exit 143
  "$@" &
  job=$!
  # (a wait the trap interrupted returns 143 while the job is still there: wait again)
  until status=0; wait "$job" || status=$?; [ "$status" -le 128 ] || ! kill -0 "$job" 2>/dev/null; do :; done
  runs=$((runs + 1))
  case $status:$stopping in
    {EXIT_PREEMPTED}:0|{EXIT_PEER_LOST}:0)
      echo "dstrain launcher: the job exited $status (stopped to be resumed, or a rank lost), run $runs:" \\
        "running it again once every worker answers" >&2 ;;
    *) exit "$status" ;;
  esac
  wait_s={RERUN_KEY_WAIT_S}
done
"""


@dataclass(frozen=True)
class K8sConfig:
    """dstrain k8s render: print the manifests as YAML (kubectl apply -f -)"""

    name: str = "dstrain"
    """Prefix of every object's name."""
    image: str = "dstrain:latest"
    """Image built from k8s/Containerfile (make image)."""
    workers: int = 2
    """Worker pods (nodes)."""
    gpus: int = 8
    """GPUs per worker = MPI slots per worker = ranks per worker."""
    data: str = "/data"
    """Mount path of the shared ReadWriteMany volume; stores, checkpoints and exports live below it."""
    volume_size: str = "1Ti"
    """Size of the shared volume claim."""
    storage_class: str = ""
    """ReadWriteMany storage class (NFS, CephFS, Filestore, EFS...); empty: the cluster default."""
    shm_size: str = "16Gi"
    """/dev/shm per worker: NCCL's shared-memory transport needs more than the container default of 64 MiB."""
    cpus: int = 64
    """CPUs per worker."""
    memory: str = "480Gi"
    """Memory per worker."""
    train_args: tuple[str, ...] = option(
        ("--epochs", "30", "--train_batch_size", "32", "--automatic_mixed_precision"), parse=shlex.split
    )
    """Extra dstrain train flags, one string."""
    preprocess_csv: str = ""
    """CSV(s) to preprocess into DATA/stores/train in a Job; empty leaves out the preprocessing Job."""
    backoff_limit: int = 3
    """Retries of a failed training or preprocessing pod."""
    grace_period_s: int = 900
    """terminationGracePeriodSeconds of the pods: time between SIGTERM and SIGKILL, longer than a checkpoint save
    on the shared volume (the ranks save, wait for each other and exit 75)."""

    def __post_init__(self) -> None:
        if self.workers < 1 or self.gpus < 0:
            raise ValueError(f"need workers >= 1 and gpus >= 0, got {self.workers}, {self.gpus}")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.data, *parts)


def train_command(cfg: K8sConfig) -> list[str]:
    rank_command = [
        "dstrain",
        "train",
        "--train_files",
        cfg.path("stores", "train"),
        "--dev_files",
        cfg.path("stores", "dev"),
        "--test_files",
        cfg.path("stores", "test"),
        "--alphabet_config_path",
        cfg.path("alphabet.txt"),
        "--checkpoint_dir",
        cfg.path("checkpoints", cfg.name),
        "--export_dir",
        cfg.path("exports", cfg.name),
        *cfg.train_args,
    ]
    return launch_argv("mpirun", rank_command, hostfile=HOSTFILE)


def launcher_command(cfg: K8sConfig) -> list[str]:
    """The launcher container's command: :data:`LAUNCHER_SCRIPT`, then :func:`train_command` as its arguments."""
    return ["/bin/sh", "-c", LAUNCHER_SCRIPT, "dstrain-launcher", *train_command(cfg)]


def worker_command() -> list[str]:
    return ["/bin/sh", "-c", WORKER_SCRIPT]


def _security() -> dict:
    # RuntimeDefault: the container runtime's syscall filter (Kubernetes runs pods unconfined unless told).
    return {
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict:
    # Nothing writes to the image: what the containers write goes to the volumes of _pod (and the shared volume).
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}


def _pod(job: str, containers: list[dict], volumes: list[dict], **spec) -> dict:
    """A pod template: the job's label, no service account token (nothing in the pods talks to the API server), the
    security context, and /tmp as a volume of its own (Open MPI's session directory, Python's temporary files)."""
    containers[0]["volumeMounts"].append({"name": "tmp", "mountPath": "/tmp"})
    return {
        "metadata": {"labels": {JOB_LABEL: job}},
        "spec": {
            **spec,
            "automountServiceAccountToken": False,
            "securityContext": _security(),
            "containers": containers,
            "volumes": volumes + [{"name": "tmp", "emptyDir": {}}],
        },
    }


def _job_ssh_volume() -> dict:
    # In memory: the worker's private host key never reaches the node's disk.
    return {"name": "ssh-job", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}


def _data_volume(cfg: K8sConfig) -> dict:
    return {"name": "data", "persistentVolumeClaim": {"claimName": f"{cfg.name}-data"}}


def volume_claim(cfg: K8sConfig) -> dict:
    spec: dict = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": cfg.volume_size}}}
    if cfg.storage_class:
        spec["storageClassName"] = cfg.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": f"{cfg.name}-data"}, "spec": spec}


def mpijob(cfg: K8sConfig) -> dict:
    job = f"{cfg.name}-train"
    launcher = {
        "name": "launcher",
        "image": cfg.image,
        "command": launcher_command(cfg),
        "env": [
            # The workers hold no known_hosts: mpirun starts every worker's daemon itself rather than through a tree
            # of workers (which Open MPI does beyond 64 workers).
            {"name": "OMPI_MCA_plm_rsh_no_tree_spawn", "value": "1"},
            # RuntimeDefault's syscall filter refuses process_vm_readv without CAP_SYS_PTRACE: Open MPI's shared
            # memory transport between the ranks of a worker copies through its buffers instead.
            {"name": "OMPI_MCA_btl_vader_single_copy_mechanism", "value": "none"},
        ],
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": cfg.data}, {"name": "ssh-job", "mountPath": JOB_SSH}],
        "securityContext": _container_security(),
    }
    limits = {"cpu": str(cfg.cpus), "memory": cfg.memory}
    if cfg.gpus:
        limits["nvidia.com/gpu"] = str(cfg.gpus)
    worker = {
        "name": "worker",
        "image": cfg.image,
        "command": worker_command(),
        "ports": [{"containerPort": SSH_PORT, "name": "ssh"}],
        "resources": {"requests": dict(limits), "limits": limits},
        "volumeMounts": [
            {"name": "data", "mountPath": cfg.data},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "ssh-job", "mountPath": JOB_SSH},
        ],
        "securityContext": _container_security(),
    }
    worker_volumes = [
        _data_volume(cfg),
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}},
        _job_ssh_volume(),
    ]
    if cfg.gpus:
        # The driver's JIT cache, for the pod's life (a hostPath instead keeps it for the node's next pods).
        worker["volumeMounts"].append({"name": "cuda-cache", "mountPath": CUDA_CACHE})
        worker_volumes.append({"name": "cuda-cache", "emptyDir": {}})
    return {
        "apiVersion": "kubeflow.org/v2beta1",
        "kind": "MPIJob",
        "metadata": {"name": job},
        "spec": {
            "slotsPerWorker": cfg.gpus or 1,
            "mpiImplementation": "OpenMPI",
            "sshAuthMountPath": f"{USER_HOME}/.ssh",
            "launcherCreationPolicy": "WaitForWorkersReady",
            "runPolicy": {
                "cleanPodPolicy": "Running",
                "backoffLimit": cfg.backoff_limit,
                "ttlSecondsAfterFinished": 86400,
            },
            "mpiReplicaSpecs": {
                "Launcher": {
                    "replicas": 1,
                    "restartPolicy": "OnFailure",
                    "template": _pod(
                        job,
                        [launcher],
                        [_data_volume(cfg), _job_ssh_volume()],
                        terminationGracePeriodSeconds=cfg.grace_period_s,
                    ),
                },
                "Worker": {
                    "replicas": cfg.workers,
                    "template": _pod(job, [worker], worker_volumes, terminationGracePeriodSeconds=cfg.grace_period_s),
                },
            },
        },
    }


def network_policy(cfg: K8sConfig, job: str) -> dict:
    """Ingress to the job's pods from the job's pods only, on every port: besides the workers' sshd (port 2222) the
    ranks listen on ports picked at random when they start (rank 0's peer watch, Open MPI's daemons and transports,
    NCCL's and Gloo's sockets), and the workers' daemons connect back to mpirun in the launcher. Egress is left open
    (DNS, the shared volume's servers, a registry). It needs a network plugin that enforces NetworkPolicy."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": job},
        "spec": {
            "podSelector": {"matchLabels": {JOB_LABEL: job}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {JOB_LABEL: job}}}]}],
        },
    }


def preprocess_job(cfg: K8sConfig) -> dict:
    command = [
        "dstrain",
        "preprocess",
        "--csv",
        cfg.preprocess_csv,
        "--alphabet",
        cfg.path("alphabet.txt"),
        "--output",
        cfg.path("stores", "train"),
        "--workers",
        str(cfg.cpus),
    ]
    container = {
        "name": "preprocess",
        "image": cfg.image,
        "command": command,
        "resources": {
            "requests": {"cpu": str(cfg.cpus), "memory": cfg.memory},
            "limits": {"cpu": str(cfg.cpus), "memory": cfg.memory},
        },
        "volumeMounts": [{"name": "data", "mountPath": cfg.data}],
        "securityContext": _container_security(),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{cfg.name}-preprocess"},
        "spec": {
            # A failed pod is retried; finished chunks are kept, so a retry only does what is left.
            "backoffLimit": cfg.backoff_limit,
            # ...and a pod stopped to be resumed (exit 75: its SIGTERM) or disrupted (preempted, evicted, its node
            # drained) is replaced without counting against backoffLimit, as SLURM requeues. (A pod failure policy
            # needs restartPolicy Never: each retry is a new pod.)
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "Ignore",
                        "onExitCodes": {"containerName": "preprocess", "operator": "In", "values": [EXIT_PREEMPTED]},
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                ]
            },
            "template": _pod(f"{cfg.name}-preprocess", [container], [_data_volume(cfg)], restartPolicy="Never"),
        },
    }


def render(cfg: K8sConfig) -> list[dict]:
    docs = [volume_claim(cfg)]
    if cfg.preprocess_csv:
        docs += [network_policy(cfg, f"{cfg.name}-preprocess"), preprocess_job(cfg)]
    docs += [network_policy(cfg, f"{cfg.name}-train"), mpijob(cfg)]
    return docs


class _Dumper(yaml.SafeDumper):
    """Scripts (strings of several lines) as literal blocks, which read as the script itself."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        return self.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Dumper.add_representer(str, _Dumper.represent_str)


def to_yaml(docs: list[dict]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def run_render(cfg: K8sConfig) -> int:
    print(to_yaml(render(cfg)), end="")
    return 0
