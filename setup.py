"""dstrain: distributed DeepSpeech-style training with Horovod.

The TensorFlow flavour is chosen when installing: tensorflow-cpu by default,
``DSTRAIN_TF=gpu`` selects ``tensorflow[and-cuda]`` for GPU hosts.
Horovod 0.28.1 must be built from source against that TensorFlow
(``tools/install.sh`` does it and caches the wheel). Building needs pybind11 installed first (the CTC decoder's
compiled search).
"""
import os
import shlex

from pybind11.setup_helpers import Pybind11Extension
from setuptools import find_packages, setup


def versions() -> dict[str, str]:
    """tools/versions.sh's KEY=VALUE lines: the one place the installer, the image build and this file take versions
    from."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = {}
    with open(os.path.join(here, "tools", "versions.sh")) as f:
        for line in f:
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#"):
                out[key] = shlex.split(value)[0] if value else ""
    return out


V = versions()
TF = {"cpu": V["TF_REQ_cpu"], "gpu": V["TF_REQ_gpu"]}
flavour = os.environ.get("DSTRAIN_TF", "cpu")
if flavour not in TF:
    raise SystemExit(f"DSTRAIN_TF={flavour!r}: expected one of {sorted(TF)}")

setup(
    name="dstrain",
    version="0.1.0",
    description="Distributed DeepSpeech-style CTC training with Horovod",
    python_requires=">=3.10,<3.12",
    packages=find_packages(include=["dstrain", "dstrain.*"]),
    package_data={"dstrain": ["data/*.wav", "data/*.txt", "launch/discover/*.sh"]},
    install_requires=[
        TF[flavour],
        V["NUMPY_REQ"].replace("numpy", "numpy>=1.23,", 1),
        f"horovod=={V['HOROVOD_VERSION']}",
        "mpi4py>=3.1",
        "soundfile>=0.12",
        "soxr>=0.3",
        "pyarrow>=17,<22",  # 22+ needs NumPy 2; TensorFlow 2.15 needs NumPy 1
        "fsspec>=2023.6",
        f"kenlm=={V['KENLM_VERSION']}",  # tools/install.sh builds lmplz/build_binary from the same source
        "tqdm>=4.60",
        "optuna>=3",
        "rapidfuzz>=3,<4",
        "matplotlib>=3.7,<4",  # dstrain report
        "webrtcvad-wheels>=2.0.11",  # dstrain transcribe: long recordings split at pauses
        "psutil>=5",  # dstrain launch: network interfaces of each node
    ],
    extras_require={
        "bench": ["pyctcdecode"],
        "test": ["pytest>=7", "pytest-timeout>=2", "pytest-xdist>=3.5", "ruff>=0.8,<0.9", "pandas>=2,<2.3", "jsonschema>=4", "kubernetes-validate>=1.28", "pyyaml>=6"],  # pandas 2.3+ wheels want NumPy 2
    },
    ext_modules=[
        Pybind11Extension(
            "dstrain.decoder._ctc_search",
            ["dstrain/decoder/_ctc_search.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ],
    entry_points={"console_scripts": ["dstrain = dstrain.cli:main"]},
)
