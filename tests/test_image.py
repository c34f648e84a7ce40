"""dstrain's images (tools/build_image.sh from k8s/Containerfile) run as they are meant to, under podman:

- the CPU image trains LDC93S1 with 2 ranks in one container, as the unprivileged user, on a mounted volume;
- an MPIJob as the MPI operator runs it: a launcher and two workers on a private container network, the workers
  running only the image's sshd, the launcher the command `dstrain k8s render` puts in the manifest;
- the GPU image (built and checked by `make image`) imports TensorFlow and Horovod with NCCL on a CPU-only machine
  and trains the same LDC93S1 job there (TensorFlow's CUDA build on CPU, Horovod's NCCL build over Gloo).

The CPU image is built on first use and cached by content (a second run reuses it). Every container and network
is named after this test run and removed afterwards, pass or fail; containers reach nothing outside the machine.
"""

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import DATA, REPO, assert_says, records

from dstrain.launch.k8s import HOST_KEY, HOSTFILE, JOB_SSH, USER_HOME, K8sConfig, render

BUILD = REPO / "tools" / "build_image.sh"
TRANSCRIPT = "she had your dark suit in greasy wash water all year"
UID = 1000
# A first build on a fresh machine makes the Debian bases, fetches the wheels and installs the venv (~15 min on 2
# cores); later runs find the image by its content hash.
# One worker of `make test` runs this file: the image is built once, by one podman at a time.
pytestmark = pytest.mark.xdist_group("image")
BUILD_TIMEOUT = 2400


def _podman_env() -> dict[str, str]:
    conf = subprocess.run([str(BUILD), "conf"], capture_output=True, text=True, check=True).stdout.strip()
    return dict(os.environ, CONTAINERS_CONF=conf)


@pytest.fixture(scope="module")
def podman_env() -> dict[str, str]:
    if os.geteuid() != 0:
        pytest.skip("the image tests need root: rootful podman, mmdebstrap, volumes owned by uid 1000")
    if not shutil.which("podman") and not shutil.which("apt-get"):
        pytest.skip("no podman, and no apt-get to install it: this machine cannot run containers")
    return _podman_env()


@pytest.fixture(scope="module")
def cpu_image(podman_env) -> str:
    proc = subprocess.run([str(BUILD), "cpu"], capture_output=True, text=True, timeout=BUILD_TIMEOUT, env=podman_env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def gpu_image(podman_env) -> str:
    # Built and checked by `make image` (the GPU variant's wheels and NCCL build do not fit CI's time with the
    # rest of the suite); the tests use the image of this checkout when one was built here.
    ref = subprocess.run([str(BUILD), "ref", "gpu"], capture_output=True, text=True, env=podman_env, timeout=1800)
    assert ref.returncode == 0, ref.stderr[-3000:]
    image = ref.stdout.strip()
    if subprocess.run(["podman", "image", "exists", image], env=podman_env).returncode != 0:
        pytest.skip(f"{image} not built here: `make image` builds the GPU image and runs its check")
    return image


class Containers:
    """Containers and networks of one test, named after it, all removed at the end whatever happened."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.prefix = f"dstrain-test-{os.getpid()}-{secrets.token_hex(3)}"
        self.containers: list[str] = []
        self.networks: list[str] = []

    def name(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=self.env)
        if check:
            assert proc.returncode == 0, f"podman {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def network(self, role: str) -> str:
        # --internal: a bridge with no route out and no masquerading; the containers reach each other only.
        name = self.name(role)
        self.networks.append(name)
        self.podman("network", "create", "--internal", name)
        return name

    def run(
        self,
        role: str,
        image: str,
        argv: list[str],
        *,
        entrypoint: str | None = None,
        network: str = "none",
        volumes: dict[str, str] = {},
        env: dict[str, str] = {},
        options: list[str] = [],
        detach: bool = False,
        timeout: float = 600,
    ):
        name = self.name(role)
        self.containers.append(name)
        args = ["run", "--name", name, "--hostname", name, "--network", network, *options]
        args += ["--detach"] if detach else []
        for host, inside in volumes.items():
            args += ["-v", f"{host}:{inside}"]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        if entrypoint is not None:
            args += ["--entrypoint", entrypoint]
        return self.podman(*args, image, *argv, timeout=timeout, check=detach)

    def running(self, role: str) -> bool:
        (info,) = json.loads(self.podman("inspect", self.name(role)).stdout)
        return info["State"]["Running"]

    def wait_listening(self, role: str, port: int, timeout: float = 60) -> None:
        """Until the container accepts connections on ``port`` (bash's /dev/tcp inside it, by exit status); fails
        with its log if it exits first."""
        deadline = time.monotonic() + timeout
        probe = ["exec", self.name(role), "bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"]
        while self.podman(*probe, check=False).returncode != 0:
            if not self.running(role) or time.monotonic() > deadline:
                logs = self.podman("logs", self.name(role), check=False)
                pytest.fail(f"{role}: nothing listening on port {port}:\n{logs.stdout}{logs.stderr}")
            time.sleep(0.2)

    def remove_all(self) -> None:
        for name in self.containers:
            self.podman("rm", "--force", "--time", "0", name, check=False)
        for name in self.networks:
            self.podman("network", "rm", "--force", name, check=False)
        left = json.loads(self.podman("ps", "--all", "--filter", f"name={self.prefix}", "--format", "json").stdout)
        assert not left, f"containers left behind: {[c['Names'] for c in left]}"


@pytest.fixture
def containers(podman_env):
    c = Containers(podman_env)
    try:
        yield c
    finally:
        c.remove_all()


def as_in_the_pod(pod: dict) -> list[str]:
    """podman's options for the pod spec's container: its securityContext (read-only root filesystem, no
    capabilities, no privilege escalation; podman's default seccomp profile stands for RuntimeDefault) and its emptyDir
    volumes as tmpfs, executable and the container user's (U: podman gives a tmpfs the mode of the image's folder
    there, and root as owner; Kubernetes gives an emptyDir to the pod's fsGroup); /dev/shm is podman's own."""
    (container,) = pod["containers"]
    security = container["securityContext"]
    options = ["--read-only", "--read-only-tmpfs=false"] if security.get("readOnlyRootFilesystem") else []
    options += [f"--cap-drop={c.lower()}" for c in security.get("capabilities", {}).get("drop", [])]
    options += ["--security-opt=no-new-privileges"] if security.get("allowPrivilegeEscalation") is False else []
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    for mount in container["volumeMounts"]:
        if mount["name"] in empty and mount["mountPath"] != "/dev/shm":
            options.append(f"--tmpfs={mount['mountPath']}:rw,exec,U")
    return options


def volume(path: Path) -> str:
    """A host folder for the containers' unprivileged user (Kubernetes does this with fsGroup)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, UID)
    return str(path)


def test_containerfile_is_the_installer_offline_with_the_pods_user_and_sshd():
    text = (REPO / "k8s" / "Containerfile").read_text()
    assert (REPO / "k8s" / "Dockerfile").resolve() == (REPO / "k8s" / "Containerfile")  # the old name still works
    assert "tools/install.sh" in text and "DSTRAIN_IMAGE=1" in text and "FROM $BASE" in text
    assert 'ENTRYPOINT ["dstrain"]' in text and f"USER {UID}" in text and "Port 2222" in text
    assert "CUDA_CACHE_PATH=" in text and "COPY --from=deps /opt/venv /opt/venv" in text
    # The worker pods start this sshd config, as the image's user, with the operator's keys in ~/.ssh.
    worker = render(K8sConfig())[-1]["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert f"-f {USER_HOME}/.sshd_config" in worker["command"][-1] and f"{USER_HOME}/.sshd_config" in text
    assert f"AuthorizedKeysFile {USER_HOME}/.ssh/authorized_keys" in text
    # Trust per job: no host key made at build (each worker makes its own, into the pod's volume), the ssh client's
    # host key checking left on, no user environment through sshd.
    assert f"HostKey {HOST_KEY}" in text and HOST_KEY.startswith(JOB_SSH + "/") and "rm -f /etc/ssh/ssh_host_*" in text
    assert "ssh-keygen" not in text and "/etc/ssh/ssh_config" not in text
    assert "StrictHostKeyChecking" not in text and "UserKnownHostsFile" not in text
    assert "PermitUserEnvironment" not in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "build"} <= set(ignored)


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 1200)
def test_cpu_image_trains_ldc93s1_as_the_unprivileged_user(cpu_image, containers, tmp_path):
    _trains_ldc93s1_as_the_unprivileged_user(cpu_image, containers, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_gpu_image_trains_ldc93s1_on_a_machine_without_a_gpu(gpu_image, containers, tmp_path):
    # What the GPU image does on a node without a GPU (a CPU node pool, a node without its driver): the CUDA build
    # of TensorFlow falls back to the CPU and Horovod's NCCL build reduces host tensors over Gloo.
    _trains_ldc93s1_as_the_unprivileged_user(gpu_image, containers, tmp_path)


def _trains_ldc93s1_as_the_unprivileged_user(image: str, containers: "Containers", tmp_path: Path) -> None:
    data = volume(tmp_path / "data")
    # make demo's job script, run by the image's dstrain: 2 Horovod ranks (Gloo) inside one container, no network.
    proc = containers.run(
        "demo",
        image,
        ["/data/demo"],
        entrypoint="/src/launch/run_ldc93s1.sh",
        volumes={str(REPO / "launch"): "/src/launch:ro", str(DATA): "/src/dstrain/data:ro", data: "/data"},
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert_says(proc.stdout, last_line=TRANSCRIPT)  # the job's product: the transcript
    run = tmp_path / "data" / "demo"
    assert (run / "shards" / "_manifest.json").exists() and (run / "checkpoints" / "train.log").exists()
    assert {"saved_model.pb", "dstrain_export.json"} <= set(os.listdir(run / "export"))
    # Everything the job wrote belongs to the image's user: nothing ran as root.
    owners = {p.stat().st_uid for p in run.rglob("*")}
    assert owners == {UID}, f"files owned by {owners}"
    ident = containers.run("id", image, ["-u"], entrypoint="id")
    assert_says(ident.stdout, exactly=f"{UID}\n")


def _mpijob_config(data: str) -> K8sConfig:
    return K8sConfig(
        workers=2,
        gpus=0,
        cpus=1,
        data=data,
        preprocess_csv=f"{data}/ldc93s1/ldc93s1.csv",
        train_args=(
            "--n_hidden",
            "16",
            "--epochs",
            "2",
            "--train_batch_size",
            "1",
            "--inter_op_parallelism_threads",
            "1",
            "--intra_op_parallelism_threads",
            "1",
        ),
    )


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 900)
def test_mpijob_launcher_trains_across_two_worker_containers(cpu_image, containers, tmp_path):
    cfg = _mpijob_config("/data")
    docs = {d["kind"]: d for d in yaml.safe_load_all(yaml.safe_dump_all(render(cfg)))}
    specs = docs["MPIJob"]["spec"]["mpiReplicaSpecs"]
    launcher_pod, worker_pod = specs["Launcher"]["template"]["spec"], specs["Worker"]["template"]["spec"]
    preprocess_pod = docs["Job"]["spec"]["template"]["spec"]
    (launcher,), (worker,), (preprocess,) = (p["containers"] for p in (launcher_pod, worker_pod, preprocess_pod))
    assert worker["ports"] == [{"containerPort": 2222, "name": "ssh"}]
    data = volume(tmp_path / "data")

    # The shared volume's content, made by the image: the LDC93S1 CSV, then the manifest's preprocessing Job.
    shutil.copy(DATA / "alphabet.txt", tmp_path / "data" / "alphabet.txt")
    assert (
        containers.run("import", cpu_image, ["import", "ldc93s1", "/data/ldc93s1"], volumes={data: "/data"}).returncode
        == 0
    )
    proc = containers.run(
        "preprocess",
        cpu_image,
        preprocess["command"][1:],
        entrypoint=preprocess["command"][0],
        volumes={data: "/data"},
        options=as_in_the_pod(preprocess_pod),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stores = tmp_path / "data" / "stores"
    for split in ("dev", "test"):
        (stores / split).symlink_to("train")

    # What the operator mounts: its SSH key pair (sshAuthMountPath) and the hostfile, one worker per line.
    ssh = volume(tmp_path / "ssh")
    containers.run(
        "keygen",
        cpu_image,
        ["-q", "-t", "ecdsa", "-N", "", "-f", "/ssh/id_rsa"],
        entrypoint="ssh-keygen",
        volumes={ssh: "/ssh"},
    )
    shutil.copy(tmp_path / "ssh" / "id_rsa.pub", tmp_path / "ssh" / "authorized_keys")
    os.chown(tmp_path / "ssh" / "authorized_keys", UID, UID)
    workers = [containers.name(f"worker-{i}") for i in range(cfg.workers)]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{w} slots={docs['MPIJob']['spec']['slotsPerWorker']}\n" for w in workers))

    # The pods as the manifest makes them: read-only images, the emptyDir volumes, no capabilities.
    net = containers.network("net")
    mounts = {data: cfg.data, ssh: f"{USER_HOME}/.ssh:ro"}
    for i in range(cfg.workers):
        containers.run(
            f"worker-{i}",
            cpu_image,
            worker["command"][1:],
            entrypoint=worker["command"][0],
            network=net,
            volumes=mounts,
            options=as_in_the_pod(worker_pod),
            detach=True,
        )
    for i in range(cfg.workers):  # the operator's launcherCreationPolicy: WaitForWorkersReady
        containers.wait_listening(f"worker-{i}", 2222)
    # Each worker made a host key of its own when it started.
    fingerprints = [
        containers.podman("exec", w, "ssh-keygen", "-lf", f"{HOST_KEY}.pub").stdout.split()[1] for w in workers
    ]
    assert len(set(fingerprints)) == cfg.workers and all(f.startswith("SHA256:") for f in fingerprints), fingerprints

    env = {e["name"]: e["value"] for e in launcher["env"]}
    proc = containers.run(
        "launcher",
        cpu_image,
        launcher["command"][1:],
        entrypoint=launcher["command"][0],
        network=net,
        volumes={**mounts, str(hostfile): f"{HOSTFILE}:ro"},
        env=env,
        options=as_in_the_pod(launcher_pod),
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # The launcher trusted exactly the keys its workers made (and mpirun's ssh, checking strictly, accepted them).
    for name, fingerprint in zip(workers, fingerprints):
        assert_says(proc.stdout, f"dstrain launcher: host key of {name}: {fingerprint}\n")
    # Rank 0 (on worker-0) wrote the run record, the checkpoint and the export to the shared volume.
    ckpt = tmp_path / "data" / "checkpoints" / cfg.name
    (start,) = records(ckpt, "start")
    assert start["world_size"] == 2 and start["controller"] == "mpi", start
    assert start["hosts"] == workers, start  # mpirun placed one rank on each worker, rank 0 on worker-0
    assert [(r["number"], r["epochs"]) for r in records(ckpt, "epoch")] == [(1, 2), (2, 2)]
    assert (ckpt / "train.log").exists()
    assert json.loads((ckpt / "config.json").read_text())
    assert "saved_model.pb" in os.listdir(tmp_path / "data" / "exports" / cfg.name)
    # The workers ran the ranks: each one's sshd served a session that started orted.
    for i in range(cfg.workers):
        top = containers.podman("logs", containers.name(f"worker-{i}"), check=False)
        assert_says(top.stdout + top.stderr, "Accepted publickey for mpiuser")  # sshd's log, to an administrator


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_cpu_image_holds_no_host_key_and_checks_host_keys(cpu_image, containers):
    # Anything that looks like an ssh host key, anywhere in the image's filesystem (as root, to see every folder).
    proc = containers.run(
        "find",
        cpu_image,
        [
            "/",
            "-xdev",
            "(",
            "-name",
            "ssh_host_*",
            "-o",
            "-name",
            "host_*_key",
            "-o",
            "-name",
            "host_*_key.pub",
            ")",
            "-print",
        ],
        entrypoint="find",
        options=["--user", "0"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_says(proc.stdout, exactly="")
    listing = containers.run("ls", cpu_image, ["-A", JOB_SSH], entrypoint="ls")
    assert_says(listing.stdout, exactly="")  # the folder the workers' keys are made in, empty in the image
    # The ssh client's settings for any host, as the image ships them: host keys are checked (Debian's default).
    config = containers.run("ssh", cpu_image, ["-G", "dstrain-train-worker-0"], entrypoint="ssh")
    assert_says(config.stdout, "stricthostkeychecking ask\n", lacks=("userknownhostsfile /dev/null", "port 2222"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_image_imports_tensorflow_and_horovod_with_nccl(gpu_image, podman_env):
    # `make image` ran this check when it built the image; rerun on the image of this checkout.
    proc = subprocess.run([str(BUILD), "check", "gpu"], capture_output=True, text=True, env=podman_env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_says(proc.stderr, "[X] NCCL")  # horovodrun --check-build's table
    assert_says(proc.stdout, "horovod with NCCL, MPI, Gloo")  # build_image.sh's verdict
