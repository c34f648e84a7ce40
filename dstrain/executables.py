"""Finding the programs dstrain runs (horovodrun, mpirun, lmplz, build_binary)."""

from __future__ import annotations

import os
import shutil
import sys


def find_executable(name: str) -> str:
    """``name`` beside the running Python first (the venv's, activated or not), then on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} nor on PATH: run tools/install.sh")
    return found
