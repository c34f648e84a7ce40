"""tools/cluster.sh, the cluster in a box the multi-node tests run on: nodes with their own names, addresses and sshd
on a private bridge; kill/revive, cut/heal, shaping; `down` that finds everything, twice or after a crash."""

import json
import signal
import subprocess

import pytest
from cluster import CLUSTER_SH, box, cluster_id, leftovers, netns_names, track, unavailable, wait_for
from conftest import assert_says

pytestmark = pytest.mark.timeout(180)


def host_network() -> str:
    """This machine's own interfaces/addresses and routes, as ip lists them (the cluster must not add to them)."""
    addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    return "\n".join(sorted(line.split("\\")[0] for line in addrs.splitlines())) + "\n" + routes


def test_nodes_have_their_own_names_addresses_and_sshd(tmp_path):
    before = host_network()
    with box(tmp_path / "c", 3) as c:
        # (What the commands below print is their product: a name, an address, a route.)
        assert_says(host_network(), exactly=before)  # the cluster changed none of this machine's interfaces or routes
        for node in c.nodes:
            assert_says(c.run(node, "hostname").stdout, exactly=f"{node}\n")
            # Its own name resolves to its address on the bridge (not loopback), and so do the others'.
            resolved = c.run(node, "getent", "ahostsv4", *c.nodes).stdout
            assert_says(resolved, *(f"{c.address(other)} " for other in c.nodes), *c.nodes)
            own = c.run(node, "python3", "-c", "import socket; print(socket.gethostbyname(socket.gethostname()))")
            assert_says(own.stdout, exactly=f"{c.address(node)}\n")
            routes = c.run(node, "ip", "route").stdout
            assert_says(routes, lacks=("default",), patterns=(r"\A10\.213\.0\.0/24 dev eth0",))
        # ssh between nodes with the cluster's own keys (no password, host keys known).
        out = c.run("node1", "ssh", "node3", "hostname; ip -o -4 addr show eth0")
        assert out.returncode == 0, out.stdout
        assert_says(out.stdout, c.address("node3"), patterns=(r"\Anode3\n",))
        # What cluster.sh status tells a person: every node up, with its sshd.
        assert_says(c.sh("status").stdout, patterns=tuple(rf"^{n} +\S+ +up, .*, sshd$" for n in c.nodes))


def test_kill_then_revive(tmp_path):
    with box(tmp_path / "c", 2) as c:
        sleeper = c.popen("node2", "sleep", "600")
        wait_for(lambda: sleeper.pid in c.pids("node2"), 10, "the sleeper on node2")
        c.kill("node2")
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
        assert c.pids("node2") == [], "a process of the killed node survived"
        refused = c.run("node1", "ssh", "node2", "true")
        assert refused.returncode == 255
        assert_says(refused.stdout, "refused")  # ssh's message
        on_dead = c.run("node2", "true")
        assert on_dead.returncode != 0
        assert_says(on_dead.stdout, "node2 is down")  # cluster.sh's message
        assert c.pids("node1"), "killing node2 touched node1"
        c.revive("node2")
        back = c.run("node1", "ssh", "node2", "hostname")
        assert back.returncode == 0
        assert_says(back.stdout, exactly="node2\n")


def test_cut_then_heal(tmp_path):
    with box(tmp_path / "c", 2) as c:
        c.cut("node2")
        assert_says(c.sh("status").stdout, patterns=(r"^node2 .*, link cut,",))
        out = c.run("node1", "ssh", "-o", "ConnectTimeout=2", "node2", "true")
        assert out.returncode == 255
        assert_says(out.stdout, "timed out")  # ssh's message
        assert c.pids("node2"), "a cut node keeps running"
        c.heal("node2")
        assert_says(c.run("node1", "ssh", "node2", "hostname").stdout, exactly="node2\n")


# The receiver writes its file (the host's file systems are every node's) once it listens, and both print JSON.
RECEIVE = (
    "import json, socket, sys; s = socket.create_server(('0.0.0.0', 5999)); open(sys.argv[1], 'w').close()\n"
    "c, _ = s.accept(); n = 0\n"
    "while (b := c.recv(1 << 20)): n += len(b)\nc.sendall(b'k'); print(json.dumps({'received': n}))"
)
SEND = (
    "import json, socket, sys, time; s = socket.create_connection(('node2', 5999)); t = time.monotonic()\n"
    "s.sendall(b'x' * int(sys.argv[1])); s.shutdown(socket.SHUT_WR); s.recv(1)\n"
    "print(json.dumps({'mbit_per_s': int(sys.argv[1]) * 8 / (time.monotonic() - t) / 1e6}))"
)


def send_mbit_per_s(c, nbytes: int) -> float:
    """One bounded transfer node1 -> node2, in Mbit/s."""
    listening = c.dir / "receiver.listening"
    listening.unlink(missing_ok=True)
    receiver = c.popen("node2", "timeout", "60", "python3", "-c", RECEIVE, str(listening))
    wait_for(lambda: listening.exists() or receiver.poll() is not None, 20, "the receiver")
    sent = c.run("node1", "timeout", "60", "python3", "-c", SEND, str(nbytes))
    assert receiver.wait(timeout=60) == 0 and json.loads(receiver.stdout.read()) == {"received": nbytes}
    return json.loads(sent.stdout)["mbit_per_s"]


def test_shape_limits_the_links_and_can_be_lifted(tmp_path):
    with box(tmp_path / "c", 2, "--rate", "20mbit") as c:
        # 2.5 MB at 20 Mbit/s: about a second; the limit holds whatever the machine's load.
        assert send_mbit_per_s(c, 2_500_000) < 20 * 1.15
        c.sh("shape")
        assert_says(c.sh("status").stdout, "rate unlimited")
        assert send_mbit_per_s(c, 2_500_000) > 20 * 1.5
        delayed = c.sh("shape", "--delay", "1ms", check=False)
        if delayed.returncode:  # kernels without netem say so, and keep the links as they were
            assert_says(delayed.stderr, "netem")
            assert_says(c.sh("status").stdout, "rate unlimited, delay none")


def test_down_is_safe_twice_and_after_a_crash(tmp_path):
    if unavailable():
        pytest.skip(unavailable())
    state = tmp_path / "c"
    prefix = cluster_id(state) + "-"
    track(state)
    # `up` killed half-way: after some of its namespaces exist.
    up = subprocess.Popen(
        [str(CLUSTER_SH), "--dir", str(state), "up", "3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(
            lambda: prefix + "node2" in netns_names(),
            30,
            "up to make node2's namespace",
            poll=0.005,
        )
    finally:
        up.send_signal(signal.SIGKILL)
        up.wait()
    # Its state directory lost too (a crash that took /tmp): down still finds the namespaces by their names.
    subprocess.run(["rm", "-rf", str(state / "nodes")], check=True)
    for _ in range(2):
        out = subprocess.run(
            [str(CLUSTER_SH), "--dir", str(state), "down"], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
    assert not [n for n in netns_names() if n.startswith(prefix)]
    assert not state.exists()


def test_leftovers_are_found(tmp_path):
    with box(tmp_path / "c", 1) as c:
        found = leftovers()
        assert any(cluster_id(c.dir) in f for f in found) and any("sshd" in f for f in found), found
    assert not [f for f in leftovers() if cluster_id(c.dir) in f]


def test_state_only_where_no_other_user_can_place_files(tmp_path):
    # The state holds the cluster's keys and root writes it: a link (someone's, in /tmp) is refused before anything
    # follows it, and so is a directory others may write to or another user's; one it makes is 0700.
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(target)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    subprocess.run(["chown", "65534", str(theirs)], check=True)
    for state, says in (
        (tmp_path / "link", "is a symbolic link"),
        (open_dir, "is writable by other users"),
        (theirs, "is not a directory of"),
    ):
        proc = subprocess.run(
            [str(CLUSTER_SH), "--dir", str(state), "exec", "node1", "true"], capture_output=True, text=True
        )
        assert proc.returncode == 1
        assert_says(proc.stderr, str(state), says, "choose another with --dir")
    assert (target.stat().st_mode & 0o777) == 0o755 and not any(target.iterdir())
    made = tmp_path / "made"
    subprocess.run([str(CLUSTER_SH), "--dir", str(made), "exec", "node1", "true"], capture_output=True, text=True)
    assert made.is_dir() and (made.stat().st_mode & 0o777) == 0o700
