"""Kubernetes manifests for dstrain: a Kubeflow MPIJob (kubeflow.org/v2beta1) for training, a Job for
preprocessing, and the ReadWriteMany volume both share.

    dstrain k8s render --workers 4 --gpus 8 --image registry/dstrain:0.1 --data /data > job.yaml

The launcher pod runs exactly ``dstrain launch --launcher mpirun --hostfile /etc/mpi/hostfile -- dstrain train
...`` (:func:`dstrain.launch.launcher.launch_argv`), the command the test suite runs under mpirun; the MPI operator
writes the hostfile (one line per worker with ``slots=GPUS``) and the SSH keys. Pods run as the image's unprivileged
``mpiuser`` (uid 1000): the workers' sshd listens on port 2222 with its own config.
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass

import yaml

from dstrain.config import option
from dstrain.launch.launcher import launch_argv

HOSTFILE = "/etc/mpi/hostfile"
USER_HOME = "/home/mpiuser"
UID = 1000


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


def _security(run_as_non_root: bool = True) -> dict:
    return {"runAsUser": UID, "runAsGroup": UID, "fsGroup": UID, "runAsNonRoot": run_as_non_root}


def _container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _data_volume(cfg: K8sConfig) -> dict:
    return {"name": "data", "persistentVolumeClaim": {"claimName": f"{cfg.name}-data"}}


def volume_claim(cfg: K8sConfig) -> dict:
    spec: dict = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": cfg.volume_size}}}
    if cfg.storage_class:
        spec["storageClassName"] = cfg.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": f"{cfg.name}-data"}, "spec": spec}


def mpijob(cfg: K8sConfig) -> dict:
    mounts = [{"name": "data", "mountPath": cfg.data}]
    launcher = {
        "name": "launcher",
        "image": cfg.image,
        "command": train_command(cfg),
        "env": [{"name": "OMPI_MCA_plm_rsh_args", "value": "-p 2222"}],  # the workers' unprivileged sshd port
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        "volumeMounts": mounts,
        "securityContext": _container_security(),
    }
    limits = {"cpu": str(cfg.cpus), "memory": cfg.memory}
    if cfg.gpus:
        limits["nvidia.com/gpu"] = str(cfg.gpus)
    worker = {
        "name": "worker",
        "image": cfg.image,
        # sshd is the container's main process and gets the pod's SIGTERM; the ranks are its sessions' children and
        # would only see the SIGKILL after the grace period. Forward the request to them as SIGUSR1 (dstrain's stop
        # signal): they checkpoint and exit 75 within the grace period.
        "command": [
            "/bin/sh",
            "-c",
            f"trap 'pkill -USR1 -f \"bin/dstrain train\"; wait' TERM; "
            f"/usr/sbin/sshd -De -f {USER_HOME}/.sshd_config & wait",
        ],
        "ports": [{"containerPort": 2222, "name": "ssh"}],
        "resources": {"requests": dict(limits), "limits": limits},
        "volumeMounts": mounts + [{"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": _container_security(),
    }
    return {
        "apiVersion": "kubeflow.org/v2beta1",
        "kind": "MPIJob",
        "metadata": {"name": f"{cfg.name}-train"},
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
                    "template": {
                        "spec": {
                            "securityContext": _security(),
                            "containers": [launcher],
                            "volumes": [_data_volume(cfg)],
                            "terminationGracePeriodSeconds": cfg.grace_period_s,
                        }
                    },
                },
                "Worker": {
                    "replicas": cfg.workers,
                    "template": {
                        "spec": {
                            "securityContext": _security(),
                            "terminationGracePeriodSeconds": cfg.grace_period_s,
                            "containers": [worker],
                            "volumes": [
                                _data_volume(cfg),
                                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}},
                            ],
                        }
                    },
                },
            },
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
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{cfg.name}-preprocess"},
        "spec": {
            # A failed pod is retried; finished chunks are kept, so a retry only does what is left.
            "backoffLimit": cfg.backoff_limit,
            "template": {
                "spec": {
                    "restartPolicy": "OnFailure",
                    "securityContext": _security(),
                    "containers": [
                        {
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
                    ],
                    "volumes": [_data_volume(cfg)],
                }
            },
        },
    }


def render(cfg: K8sConfig) -> list[dict]:
    docs = [volume_claim(cfg)]
    if cfg.preprocess_csv:
        docs.append(preprocess_job(cfg))
    docs.append(mpijob(cfg))
    return docs


def to_yaml(docs: list[dict]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=120)


def run_render(cfg: K8sConfig) -> int:
    print(to_yaml(render(cfg)), end="")
    return 0
