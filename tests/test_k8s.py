"""Manifests from `dstrain k8s render` (and the examples in k8s/) against the MPIJob CRD and Kubernetes' schemas."""

import os
import shlex
import shutil
import signal
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cluster import wait_for
from conftest import REPO, SHARED, assert_says

from dstrain.cli import build_parser
from dstrain.config import from_args
from dstrain.launch.k8s import (
    CUDA_CACHE,
    HOSTFILE,
    JOB_LABEL,
    JOB_SSH,
    KNOWN_HOSTS,
    LAUNCHER_SCRIPT,
    RANKS,
    SSH_PORT,
    WORKER_SCRIPT,
    K8sConfig,
    render,
    to_yaml,
    train_command,
)
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
    assert kinds.count("NetworkPolicy") == kinds.count("MPIJob") + kinds.count("Job")
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
    mounts = {m["mountPath"]: m["name"] for m in worker["containers"][0]["volumeMounts"]}
    assert (mounts.get(CUDA_CACHE) == "cuda-cache") == bool(gpus)  # the driver's JIT cache, on GPUs only
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert ("Job" in [d["kind"] for d in docs]) == preprocess


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """Every pod template of a rendering, by role: launcher, worker, preprocess."""
    pods = {}
    for doc in docs:
        if doc["kind"] == "MPIJob":
            pods.update({r.lower(): s["template"] for r, s in doc["spec"]["mpiReplicaSpecs"].items()})
        elif doc["kind"] == "Job":
            pods["preprocess"] = doc["spec"]["template"]
    return pods


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) == {"matchLabels"}  # what this test knows how to read
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.parametrize("gpus", [0, 8])
def test_pods_are_locked_down(gpus):
    docs = render(K8sConfig(workers=2, gpus=gpus, preprocess_csv="/data/a.csv"))
    pods = pod_templates(docs)
    assert set(pods) == {"launcher", "worker", "preprocess"}
    for role, pod in pods.items():
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False, role  # nothing in the pods talks to the API server
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, role
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
        (container,) = spec["containers"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False, role
        assert security["capabilities"] == {"drop": ["ALL"]}, role
        # Every place the container writes to is a volume: /tmp everywhere, the job's ssh files on the launcher and
        # the workers (in memory: a worker's private host key), the shared volume.
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert mounts["/tmp"]["emptyDir"] == {}, role
        assert "persistentVolumeClaim" in mounts["/data"], role
        if role != "preprocess":
            assert mounts[JOB_SSH]["emptyDir"]["medium"] == "Memory", role
        assert {m["name"] for m in container["volumeMounts"]} <= set(volumes), role


def test_network_policies_admit_only_the_jobs_own_pods():
    docs = render(K8sConfig(workers=3, gpus=8, preprocess_csv="/data/a.csv"))
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = pod_templates(docs)
    labels = {role: pod["metadata"]["labels"] for role, pod in pods.items()}
    assert labels["launcher"] == labels["worker"] == {JOB_LABEL: "dstrain-train"}
    assert labels["preprocess"] == {JOB_LABEL: "dstrain-preprocess"}
    for role, pod_labels in labels.items():
        # Exactly one policy covers each pod, it restricts ingress, and its one rule admits the pods of the same job
        # and no others, on every port (the ranks' ports are random: rank 0's peer watch, Open MPI, NCCL, Gloo).
        (policy,) = [p["spec"] for p in policies if selects(p["spec"]["podSelector"], pod_labels)]
        assert policy["policyTypes"] == ["Ingress"], role
        (rule,) = policy["ingress"]
        assert "ports" not in rule, role
        (peer,) = rule["from"]
        assert set(peer) == {"podSelector"}, role  # no namespaceSelector or ipBlock: this namespace's pods only
        admitted = {other for other, other_labels in labels.items() if selects(peer["podSelector"], other_labels)}
        assert admitted == ({"launcher", "worker"} if role != "preprocess" else {"preprocess"}), role
    # Another job rendered beside it admits none of this one's pods, nor this one any of its.
    other = pod_templates(render(K8sConfig(name="other")))["worker"]["metadata"]["labels"]
    for policy in policies:
        assert not selects(policy["spec"]["podSelector"], other)
        assert not selects(policy["spec"]["ingress"][0]["from"][0]["podSelector"], other)


def test_the_launcher_checks_the_workers_host_keys_strictly():
    launcher = pod_templates(render(K8sConfig()))["launcher"]["spec"]["containers"][0]
    script = launcher["command"][2]
    assert launcher["command"][:2] == ["/bin/sh", "-c"] and script == LAUNCHER_SCRIPT
    assert "StrictHostKeyChecking=yes" in script and f"UserKnownHostsFile={KNOWN_HOSTS}" in script
    assert "StrictHostKeyChecking=no" not in script and "/dev/null -o ConnectionAttempts" in script
    # The operator appends its own OMPI_MCA_plm_rsh_args to the container's env, and the last one wins: the script
    # sets it, the env does not.
    env = {e["name"]: e["value"] for e in launcher["env"]}
    assert "OMPI_MCA_plm_rsh_args" not in env and env["OMPI_MCA_plm_rsh_no_tree_spawn"] == "1"
    # The script reads as itself in the YAML (a literal block), and survives the round trip.
    text = to_yaml(render(K8sConfig()))
    assert "- |\n" in text and '    "$@" &\n' in text
    assert pod_templates(list(yaml.safe_load_all(text)))["launcher"]["spec"]["containers"][0] == launcher


class LauncherHere:
    """The launcher's script as its pod runs it, on this machine: ssh-keyscan answers with keys made here for two
    workers (w-1's sshd is not up at the first try), the hostfile and known_hosts are files of the test."""

    def __init__(self, tmp_path):
        self.keys, stubs = tmp_path / "keys", tmp_path / "bin"
        self.keys.mkdir()
        stubs.mkdir()
        for host in ("w-0.svc", "w-1.svc"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.keys / host)], check=True)
        (stubs / "ssh-keyscan").write_text(
            "#!/bin/sh\n"
            "for host; do :; done\n"
            f'echo "$host" >> {tmp_path}/scans\n'
            f'if [ "$host" = w-1.svc ] && [ ! -e {tmp_path}/tried ]; then touch {tmp_path}/tried; exit 1; fi\n'
            f'read -r type key _ < {self.keys}/"$host".pub && echo "[$host]:{SSH_PORT} $type $key"\n'
        )
        os.chmod(stubs / "ssh-keyscan", 0o755)
        (tmp_path / "hostfile").write_text("# the operator's\nw-0.svc slots=8\n\nw-1.svc slots=8\n")
        self.known_hosts = tmp_path / "known_hosts"
        self.script = LAUNCHER_SCRIPT.replace(KNOWN_HOSTS, str(self.known_hosts)).replace(
            HOSTFILE, str(tmp_path / "hostfile")
        )
        self.env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}")

    def start(self, command: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            ["sh", "-c", self.script, "launcher", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )

    def run(self, command: list[str]) -> subprocess.CompletedProcess:
        proc = self.start(command)
        out, err = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="no ssh-keygen here")
def test_launcher_script_collects_each_workers_key_then_runs_the_command(tmp_path):
    # The command it runs prints the ssh arguments mpirun will use.
    here = LauncherHere(tmp_path)
    proc = here.run(["sh", "-c", 'echo "ssh $OMPI_MCA_plm_rsh_args"'])
    assert proc.returncode == 0, proc.stderr
    known = here.known_hosts.read_text().splitlines()
    assert [line.split()[0] for line in known] == [f"[w-0.svc]:{SSH_PORT}", f"[w-1.svc]:{SSH_PORT}"]
    for host in ("w-0.svc", "w-1.svc"):
        fingerprint = subprocess.run(
            ["ssh-keygen", "-lf", str(here.keys / f"{host}.pub")], capture_output=True, text=True, check=True
        ).stdout.split()[1]
        assert_says(proc.stdout, f"dstrain launcher: host key of {host}: {fingerprint}\n")
    assert_says(
        proc.stdout,
        f"ssh -p {SSH_PORT} -o StrictHostKeyChecking=yes -o UserKnownHostsFile={here.known_hosts} ",
        last_line=f"ssh -p {SSH_PORT} -o StrictHostKeyChecking=yes -o UserKnownHostsFile={here.known_hosts} "
        "-o GlobalKnownHostsFile=/dev/null -o ConnectionAttempts=10",
    )


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="no ssh-keygen here")
def test_launcher_runs_a_stopped_or_broken_job_again_and_passes_other_failures_on(tmp_path):
    # As SLURM requeues: 75 (stopped to be resumed: a worker pod deleted) and 76 (a rank lost) run the job again,
    # after the workers' keys are collected afresh (a replaced worker has a new one); anything else ends the launcher.
    here = LauncherHere(tmp_path)
    runs = tmp_path / "runs"
    job = f'echo run >> {runs}; n=$(wc -l < {runs}); [ "$n" = 1 ] && exit 75; [ "$n" = 2 ] && exit 76; exit 0'
    proc = here.run(["sh", "-c", job])
    assert proc.returncode == 0, proc.stderr
    assert runs.read_text() == "run\n" * 3
    assert (tmp_path / "scans").read_text().split().count("w-0.svc") == 3  # each run's keys collected afresh
    assert_says(
        proc.stderr,
        "dstrain launcher: the job exited 75 (stopped to be resumed, or a rank lost), run 1: running it again",
        "dstrain launcher: the job exited 76 (stopped to be resumed, or a rank lost), run 2: running it again",
    )
    runs.unlink()
    failed = here.run(["sh", "-c", f"echo run >> {runs}; exit 3"])
    assert failed.returncode == 3 and runs.read_text() == "run\n", failed.stderr


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="no ssh-keygen here")
def test_the_launcher_pods_sigterm_stops_the_job_which_is_not_run_again(tmp_path):
    # mpirun turns the SIGTERM into the ranks' stop request; here the job checkpoints by writing a file and exits 75.
    here = LauncherHere(tmp_path)
    started, saved = tmp_path / "started", tmp_path / "saved"
    job = f"trap 'touch {saved}; exit 75' TERM; echo run >> {started}; while :; do sleep 0.1; done"
    proc = here.start(["sh", "-c", job])
    try:
        wait_for(lambda: started.exists() or proc.poll() is not None, 60, "the job to start")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 75 and saved.exists(), err
    assert started.read_text() == "run\n", err  # started once, never again


def test_a_deleted_worker_pod_stops_its_ranks_and_ends_once_they_have_exited(tmp_path):
    # The worker's script as its pod runs it, with stand-ins: ssh-keygen and sshd stubs, and a "rank" that takes a
    # second to checkpoint after its SIGUSR1, then exits 75. (The rank's pattern is made unique to this test: the
    # real one would signal the suite's own training ranks.)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "ssh-keygen").write_text("#!/bin/sh\nexit 0\n")
    (stubs / "sshd").write_text(
        f"#!/bin/sh\ntrap 'touch {tmp_path}/sshd-stopped; exit 0' TERM\nwhile :; do sleep 0.1; done\n"
    )
    (stubs / "dstrain").write_text(
        f"#!/bin/sh\ntrap 'sleep 1; touch {tmp_path}/checkpointed; exit 75' USR1\nwhile :; do sleep 0.1; done\n"
    )
    for stub in stubs.iterdir():
        os.chmod(stub, 0o755)
    script = (
        WORKER_SCRIPT.replace(RANKS, f"[{str(tmp_path)[0]}]{str(tmp_path)[1:]}/bin/dstrain train")
        .replace("/usr/sbin/sshd", str(stubs / "sshd"))
        .replace(JOB_SSH, str(tmp_path))
    )
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}")
    worker = subprocess.Popen(["sh", "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    rank = subprocess.Popen(["sh", str(stubs / "dstrain"), "train"], env=env)  # a session's child, not the script's
    try:
        wait_for(lambda: worker.poll() is None and _has_child(worker.pid), 30, "the worker's sshd")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, worker.stderr.read()
        assert rank.wait(timeout=5) == 75
        assert (tmp_path / "checkpointed").exists() and (tmp_path / "sshd-stopped").exists()
    finally:
        worker.kill()
        rank.kill()


def _has_child(pid: int) -> bool:
    return bool(subprocess.run(["pgrep", "-P", str(pid)], capture_output=True).stdout.strip())


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
    # /bin/sh -c SCRIPT $0 COMMAND...: the script learns the workers' host keys, then runs COMMAND ("$@").
    assert launcher[:2] == ["/bin/sh", "-c"] and launcher[2] == LAUNCHER_SCRIPT
    launcher = launcher[4:]
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
    assert worker["command"][-1] == WORKER_SCRIPT and 'pkill -USR1 -f "[b]in/dstrain train"' in WORKER_SCRIPT


def test_each_worker_makes_its_host_key_before_starting_sshd():
    worker = render(K8sConfig())[-1]["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    script = worker["command"][-1]
    remove, keygen, sshd = (script.index(s) for s in (f"rm -f {JOB_SSH}/", "ssh-keygen -q -t ed25519", "sshd -De"))
    assert remove < keygen < sshd and f"-f {JOB_SSH}/host_ed25519_key || exit 1" in script
