"""The synthetic Common Voice recipe end to end at a reduced size (the README's table comes from its full size)."""
import os
import re
import subprocess

import pytest

from conftest import REPO, SHARED

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_synthetic_common_voice_recipe_end_to_end(tmp_path):
    work = tmp_path / "cv"
    env = dict(os.environ, CLIPS="160", TRAIN_SECONDS="50", TRIALS="4", SHARED=str(SHARED))
    proc = subprocess.run([str(REPO / "recipes" / "synth_cv.sh"), str(work)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=880)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    for name in ("greedy_dev", "greedy_test", "scorer_dev", "scorer_test"):
        text = (work / f"{name}.txt").read_text()
        m = re.search(r"WER: ([\d.]+), CER: ([\d.]+), loss: ([\d.]+), (\d+) samples", text)
        assert m and int(m[4]) > 0 and 0 <= float(m[2]) <= 1.5, (name, text[:500])
    # The stop after TRAIN_SECONDS went through the preemption path: a checkpoint, then exit 75 on both ranks.
    log = (work / "run" / "train.log").read_text()
    assert "Stop requested (SIGUSR1)" in log and "Best params: lm_alpha=" in (work / "lm_optimize.txt").read_text()
    assert (work / "run" / "report" / "index.html").exists()
