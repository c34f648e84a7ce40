"""The job `make demo` runs (after set-up): LDC93S1 to the exact transcript with 2 Horovod processes."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, assert_says

pytestmark = pytest.mark.slow


def test_ldc93s1_demo_prints_exact_transcript(tmp_path):
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    proc = subprocess.run(
        [str(REPO / "launch" / "run_ldc93s1.sh"), str(tmp_path / "demo")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert_says(proc.stdout, last_line="she had your dark suit in greasy wash water all year")
    # Idempotent: the second run resumes a finished job and prints the same.
    again = subprocess.run(
        [str(REPO / "launch" / "run_ldc93s1.sh"), str(tmp_path / "demo")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-5000:]
    assert_says(again.stderr, "Training already complete")
    assert_says(again.stdout, last_line="she had your dark suit in greasy wash water all year")
