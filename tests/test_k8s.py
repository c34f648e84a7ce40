"""Manifests from `dstrain k8s render` (and the examples in k8s/) against the MPIJob CRD and Kubernetes' schemas."""

import shlex
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import REPO, SHARED

from dstrain.cli import build_parser
from dstrain.config import from_args
from dstrain.launch.k8s import HOSTFILE, K8sConfig, render, train_command
from dstrain.launch.launcher import LaunchConfig, launch_argv

CRD = SHARED / "k8s" / "kubeflow.org_mpijobs.yaml"
K8S_VERSION = "1.30"


@pytest.fixture(scope="module")
def mpijob_schema() -> dict:
    if not CRD.exists():
        pytest.skip("../shared/k8s/kubeflow.org_mpijobs.yaml not present")
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v2beta1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not declare: Kubernetes would silently drop them (a typo passes jsonschema)."""
    found = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                found += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                found.append(f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def validate_all(docs: list[dict], mpijob_schema: dict) -> None:
    kinds = [d["kind"] for d in docs]
    assert kinds.count("MPIJob") == 1 and "PersistentVolumeClaim" in kinds
    for doc in docs:
        if doc["kind"] == "MPIJob":
            jsonschema.Draft7Validator(mpijob_schema).validate(doc)
            assert unknown_fields(doc, mpijob_schema) == []
            for role, replica in doc["spec"]["mpiReplicaSpecs"].items():
                # Each pod template as a core Pod, against Kubernetes' own schema.
                pod = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": role.lower()},
                    "spec": replica["template"]["spec"],
                }
                kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("workers,gpus,preprocess", [(1, 1, False), (2, 8, True), (16, 4, False), (2, 0, True)])
def test_renderings_validate(workers, gpus, preprocess, mpijob_schema):
    cfg = K8sConfig(
        workers=workers, gpus=gpus, image="r.example/dstrain:1", preprocess_csv="/data/a.csv" if preprocess else ""
    )
    docs = render(cfg)
    validate_all(docs, mpijob_schema)
    job = next(d for d in docs if d["kind"] == "MPIJob")["spec"]
    assert job["slotsPerWorker"] == max(gpus, 1)
    assert job["mpiReplicaSpecs"]["Worker"]["replicas"] == workers
    assert job["runPolicy"]["cleanPodPolicy"] == "Running" and job["runPolicy"]["backoffLimit"] == 3
    worker = job["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    limits = worker["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in worker["volumes"]
    assert worker["securityContext"]["runAsNonRoot"] is True
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert ("Job" in [d["kind"] for d in docs]) == preprocess


def test_a_typo_is_caught(mpijob_schema):
    doc = render(K8sConfig())[-1]
    doc["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert unknown_fields(doc, mpijob_schema) == [
        ".spec.mpiReplicaSpecs.Worker.template.spec.containers[0].volumeMount"
    ]
    doc = render(K8sConfig())[-1]
    doc["spec"]["slotsPerWorker"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(mpijob_schema).validate(doc)


def test_launcher_runs_the_tested_command():
    cfg = K8sConfig(workers=2, gpus=8)
    launcher = render(cfg)[-1]["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["command"]
    rank_command = launcher[launcher.index("--") + 1 :]
    # The same builder as test_distributed's mpirun run, which trains 2 ranks with it.
    assert launcher == launch_argv("mpirun", rank_command, hostfile=HOSTFILE) == train_command(cfg)
    # Every flag is one dstrain knows: the launch command and the per-rank train command both parse.
    args = build_parser().parse_args(launcher[1:])
    assert args._command == ("launch",) and args.launcher == "mpirun" and args.hostfile == HOSTFILE
    assert from_args(LaunchConfig, args).command == tuple(rank_command)
    train = build_parser().parse_args(rank_command[1:])
    assert train._command == ("train",) and train.automatic_mixed_precision is True and train.n_hidden == 2048


def test_checked_in_examples_match_the_generator(mpijob_schema, tmp_path):
    for name in ("dstrain-2x8gpu.yaml", "dstrain-8x8gpu.yaml"):
        text = (REPO / "k8s" / name).read_text()
        docs = list(yaml.safe_load_all(text))
        validate_all(docs, mpijob_schema)
        command = " ".join(line.lstrip("# ").rstrip(" \\") for line in text.splitlines()[:2])
        argv = shlex.split(command.split("Generated by:")[1].split("(regenerate")[0])
        rendered = subprocess.run(
            [str(REPO / ".venv" / "bin" / "dstrain") if (REPO / ".venv").exists() else "dstrain"] + argv[1:],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert list(yaml.safe_load_all(rendered)) == docs, f"k8s/{name} is stale: run k8s/render_examples.sh"


def test_pods_get_a_grace_period_and_forward_sigterm_to_the_ranks():
    job = render(K8sConfig(grace_period_s=1200))[-1]
    for role in ("Launcher", "Worker"):
        assert job["spec"]["mpiReplicaSpecs"][role]["template"]["spec"]["terminationGracePeriodSeconds"] == 1200
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert 'trap \'pkill -USR1 -f "bin/dstrain train"' in worker["command"][-1] and "sshd -De" in worker["command"][-1]
