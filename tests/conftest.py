import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dstrain" / "data"
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).parent  # the venv's bin: dstrain, horovodrun


@pytest.fixture(scope="session")
def alphabet_path() -> str:
    return str(DATA / "alphabet.txt")


@pytest.fixture(scope="session")
def ldc93s1_csv(tmp_path_factory) -> str:
    from dstrain.prep.importers.ldc93s1 import import_ldc93s1

    return import_ldc93s1(str(tmp_path_factory.mktemp("ldc93s1")))


@pytest.fixture(scope="session")
def ldc93s1_store(tmp_path_factory, ldc93s1_csv, alphabet_path) -> str:
    from dstrain.prep.pipeline import PreprocessConfig, preprocess

    out = str(tmp_path_factory.mktemp("store") / "shards")
    preprocess(PreprocessConfig(csv_files=(ldc93s1_csv,), alphabet_path=alphabet_path, output=out), progress=False)
    return out


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found next to {sys.executable} nor on PATH: run tools/install.sh")
    return found
