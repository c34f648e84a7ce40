"""Nothing outside a job can stop it: during a 2-rank run, every TCP port the job's processes listen on (the
launcher's, Horovod's and Open MPI's, Gloo's, rank 0's peer watch) gets a connection that closes at once, one that
stays open and silent until the end, and one that sends random bytes; the run finishes with the weights of an
undisturbed one."""

import random
import subprocess

import pytest
from cluster import Output
from conftest import final_digests, synthetic_store, wait_record
from probe import PROBES, listeners, probe
from test_training import descendants, env, horovodrun, mpirun, run, train_cmd

pytestmark = pytest.mark.slow
EPOCHS = 4


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return synthetic_store(tmp_path_factory.mktemp("foreign") / "s", 24, frames=(40, 90), seed=5)


@pytest.mark.timeout(600)
# mpirun is not here yet: under this harness an mpirun job hung with and without the probes (see issue 28's note).
@pytest.mark.parametrize("launcher", ["horovodrun"])
def test_foreign_connections_to_every_port_of_a_job_change_nothing(launcher, store, tmp_path):
    command = horovodrun if launcher == "horovodrun" else mpirun
    deterministic = env(TF_DETERMINISTIC_OPS="1")
    undisturbed = run(
        command() + train_cmd(store, tmp_path / "quiet", "--dropout_rate", "0", epochs=EPOCHS), env=deterministic
    )
    assert undisturbed.returncode == 0, undisturbed.stdout[-3000:]

    work = tmp_path / "probed"
    proc = subprocess.Popen(
        command() + train_cmd(store, work, "--dropout_rate", "0", epochs=EPOCHS),
        env=deterministic,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out, held, rng = Output(proc), [], random.Random(7)
    try:
        wait_record(work, "epoch", timeout=300, proc=proc)
        ports = listeners([proc.pid, *descendants(proc.pid)])
        assert ports, "the job listens on no port?"
        for listener in ports:
            for kind in PROBES:
                sock = probe(listener, kind, rng)
                if sock is not None:
                    held.append(sock)
        print(f"{launcher}: probed {len(ports)} listening ports: {ports}")
        code = out.finish(300)
    finally:
        for sock in held:
            sock.close()
        if proc.poll() is None:
            proc.kill()
    assert code == 0, out.text[-4000:]
    assert final_digests(work) == final_digests(tmp_path / "quiet")
