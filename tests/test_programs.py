"""tools/packages.txt is the one list of the programs dstrain, its scripts and its tests start: every program the
checkout starts is on it (read from the code, tests/programs_scan.py), and the packages that tools/install.sh and
tools/build_image.sh install from it provide every listed program in a bare Debian root (mmdebstrap minbase), so a
program that only a developer's machine had installed by hand fails here, not on a user's new machine."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import assert_says
from programs_scan import python_programs, scan, shell_programs

REPO = Path(__file__).resolve().parents[1]
PACKAGES = REPO / "tools" / "packages.txt"
# The groups apt installs from (tools/install.sh, --test, tools/build_image.sh), and Debian's essential tools.
APT_GROUPS = ("base", "build", "python", "test", "image", "core")


def listed() -> dict[str, tuple[str, str]]:
    """program -> (group, package) from tools/packages.txt."""
    programs = {}
    for line in PACKAGES.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        group, package, *names = line.split()
        programs.update({name: (group, package) for name in names if name != "-"})
    return programs


def apt_packages_printed(*groups: str) -> str:
    """What the installer installs for ``groups``, asked of the installer itself: the list it prints, its product."""
    out = subprocess.run(
        [str(REPO / "tools" / "install.sh"), "--apt-packages", *groups],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout


def apt_packages(*groups: str) -> list[str]:
    return apt_packages_printed(*groups).split()


def test_scanner_finds_programs_behind_wrappers_and_variables():
    shell = "f() { :; }\nx=$(grep -c a b | sort)\nenv A=1 timeout 5 sox a b\nf slurmd\n"
    shell += 'nsenter -t "$p" --net /usr/sbin/sshd -D\n'
    assert sorted(p for _, p in shell_programs(shell)) == ["env", "grep", "nsenter", "sort", "sox", "sshd", "timeout"]
    code = (
        "import subprocess, shutil\n"
        "def f(box):\n"
        "    argv = ['mpirun', '-np', '2']\n"
        "    subprocess.run(argv + ['x'])\n"
        "    subprocess.Popen(['lame', '--decode'])\n"
        "    subprocess.run('espeak-ng -w a.wav hi | sox - b.wav', shell=True)\n"
        "    shutil.which('strace')\n"
        "    box.run('node1', 'slurmd', '-D')\n"
        "    run(['not-a-program'])\n"
    )
    assert sorted(p for _, p in python_programs(code)) == ["espeak-ng", "lame", "mpirun", "slurmd", "sox", "strace"]


def test_every_program_the_checkout_starts_is_listed():
    known = listed()
    missing = {
        program: where
        for program, where in scan(REPO).items()
        if program not in known and not ("/" in program and not program.startswith("/"))  # the checkout's own scripts
    }
    assert not missing, (
        "started but not in tools/packages.txt (add each with the Debian package that provides it): "
        + "; ".join(f"{p} ({', '.join(w[:3])})" for p, w in sorted(missing.items()))
    )


def test_every_listed_package_exists_once_per_group():
    seen = set()
    for line in PACKAGES.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            group, package, *programs = line.split()
            assert group in APT_GROUPS + ("venv", "site"), f"unknown group {group!r}: {line}"
            assert programs, f"no program column (use '-' for a library): {line}"
            assert (group, package) not in seen, f"listed twice: {line}"
            seen.add((group, package))


def test_image_group_brings_netavarks_iptables():
    # Debian's netavark only recommends iptables and every install here runs --no-install-recommends.
    listed = apt_packages_printed("image")
    assert_says(listed, patterns=tuple(rf"(?<!\S){p}(?!\S)" for p in ("iptables", "podman", "netavark", "runc")))


def _apt_sources() -> list[str]:
    files = [
        Path("/etc/apt/sources.list"),
        *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
        *sorted(Path("/etc/apt/sources.list.d").glob("*.sources")),
    ]
    return [
        str(f)
        for f in files
        if f.is_file()
        and any(line.strip() and not line.lstrip().startswith("#") for line in f.read_text().splitlines())
    ]


def bare_root_missing(root: Path, packages: list[str], programs: list[str], cache: Path) -> list[str]:
    """Installs ``packages`` into a bare Debian 12 root at ``root`` and returns the ``programs`` not found there."""
    cache.mkdir(parents=True, exist_ok=True)
    # The downloaded .debs are kept between runs (sync-in/sync-out): the install itself is redone every time.
    subprocess.run(
        [
            "mmdebstrap",
            "--quiet",
            "--mode=root",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            "--skip=download/empty",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
            f"--setup-hook=sync-in {cache} /var/cache/apt/archives/",
            f"--customize-hook=sync-out /var/cache/apt/archives {cache}",
            "bookworm",
            str(root),
            *_apt_sources(),
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    def on_path(program: str) -> bool:  # the shell's command -v, by its exit status
        look = ["chroot", str(root), "/bin/sh", "-c", 'command -v "$1" >/dev/null', "sh", program]
        return subprocess.run(look, env={"PATH": path}, capture_output=True, timeout=60).returncode == 0

    return [p for p in programs if not on_path(p)]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_listed_programs_are_found_in_a_bare_debian_root_after_the_installers_packages(tmp_path):
    if os.geteuid() != 0 or not shutil.which("mmdebstrap"):
        pytest.skip("a bare root needs root and mmdebstrap (tools/install.sh --test installs it)")
    programs = sorted(name for name, (group, _) in listed().items() if group in APT_GROUPS)
    cache = Path(os.environ.get("DSTRAIN_CACHE", Path.home() / ".cache" / "dstrain")) / "bare-root-debs"
    root = tmp_path / "root"
    try:
        missing = bare_root_missing(root, apt_packages(*APT_GROUPS), programs, cache)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], timeout=300)
    assert not missing, f"not found in a bare Debian root with the installers' packages: {missing}"
