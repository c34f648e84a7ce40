#!/usr/bin/env bash
# One-shot, idempotent set-up on a fresh Debian machine with Python 3.11:
# apt packages, .venv, TensorFlow 2.15, Horovod 0.28.1 built from source once
# (wheel cached outside the checkout, so a second fresh .venv reuses it), dstrain.
#
#   DSTRAIN_TF=gpu tools/install.sh   # tensorflow[and-cuda] and Horovod with NCCL allreduce (no GPU needed to build)
#   tools/install.sh --test           # also what the test suite drives: SLURM, munge, strace, TTS for corpora
#   VENV=build/venv-gpu DSTRAIN_TF=gpu tools/install.sh   # a GPU venv beside the CPU .venv the tests use
#   DSTRAIN_IMAGE=1 ...               # what the image build runs: dstrain's requirements only (its wheel comes later)
#   tools/install.sh --apt-packages [GROUP...]   # print the Debian packages of tools/packages.txt's groups, and exit
#   tools/install.sh --apt-missing GROUP...      # print those of them that are not installed, and exit
#   PYTHON=... tools/install.sh --requirements   # print setup.py's requirements for DSTRAIN_TF, and exit
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
DSTRAIN_TF=${DSTRAIN_TF:-cpu}
CACHE=${DSTRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dstrain}
STAMP="$VENV/.dstrain-installed"
. tools/versions.sh

# The Debian packages of GROUPs in tools/packages.txt, the one list of what dstrain and its tests run.
packages_of() {
  awk -v groups=" $* " '!/^#/ && NF >= 2 && index(groups, " " $1 " ") && $2 != "-" { print $2 }' tools/packages.txt \
    | sort -u | tr '\n' ' '
}
GROUPS_WANTED="base build"
# Debian's own Python needs its venv module and headers (Horovod and the decoder compile against them); another
# interpreter (pyenv's, conda's) brings both.
py_path=$(command -v "$PYTHON" || true)
case "$py_path" in ""|/usr/bin/*|/bin/*) GROUPS_WANTED="$GROUPS_WANTED python" ;; esac

# The packages of those that are not installed.
missing_of() {
  local p missing=""
  for p in $(packages_of "$@"); do
    dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing="$missing $p"
  done
  echo "$missing"
}

# setup.py's install requirements for DSTRAIN_TF, one per line, read with the interpreter $1 (it needs setuptools and
# pybind11): what the image's venv and its wheelhouse hold besides dstrain.
requirements_of() {
  local meta
  meta=$(mktemp -d)
  DSTRAIN_TF=$DSTRAIN_TF "$1" setup.py -q egg_info --egg-base "$meta" >/dev/null
  sed '/^\[/,$d' "$meta"/dstrain.egg-info/requires.txt
  rm -rf "$meta"
}

if [ "${1:-}" = --requirements ]; then requirements_of "$PYTHON"; exit 0; fi
if [ "${1:-}" = --apt-packages ]; then shift; packages_of "${@:-base build}"; echo; exit 0; fi
if [ "${1:-}" = --apt-missing ]; then shift; missing_of "$@"; exit 0; fi
if [ "${1:-}" = --test ]; then GROUPS_WANTED="$GROUPS_WANTED test"; fi

log() { printf '[install] %s\n' "$*" >&2; }

# --- apt: only when something is missing, so a second run costs nothing.
missing=$(missing_of $GROUPS_WANTED)
if [ -n "${missing// /}" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  log "apt-get install:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# --- up to date? The stamp records the inputs that decide what the venv holds (the decoder's C++ included:
# the editable install compiles it in place).
inputs=(setup.py pyproject.toml tools/install.sh tools/build_horovod.sh tools/versions.sh)
ready='import horovod.tensorflow, dstrain'
if [ -n "${DSTRAIN_IMAGE:-}" ]; then ready='import horovod.tensorflow'; else inputs+=(dstrain/decoder/*.cpp); fi
want="$(sha256sum "${inputs[@]}" | sha256sum | cut -c1-16)-$DSTRAIN_TF-${DSTRAIN_IMAGE:-0}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "$ready" 2>/dev/null; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP="$VENV/bin/python -m pip"
# shellcheck disable=SC2086
$PIP install -q --upgrade $BOOTSTRAP_REQS

TF_REQ_VAR="TF_REQ_$DSTRAIN_TF"; TF_REQ=${!TF_REQ_VAR}
log "installing $TF_REQ"
$PIP install -q "$TF_REQ" "$NUMPY_REQ"

# --- Horovod: built from source against that TensorFlow, once per machine (tools/build_horovod.sh caches it).
hvd_wheel=$(VENV=$VENV DSTRAIN_TF=$DSTRAIN_TF DSTRAIN_CACHE=$CACHE tools/build_horovod.sh)
$PIP install -q --no-deps --force-reinstall "$hvd_wheel"
# shellcheck disable=SC2086
$PIP install -q $HOROVOD_RUNTIME_REQS
check='import horovod.tensorflow as hvd; assert hvd.mpi_built() and hvd.gloo_built(), "Horovod lacks MPI or Gloo"'
[ "$DSTRAIN_TF" = gpu ] && check="$check; assert hvd.nccl_built(), \"Horovod lacks NCCL\""
"$VENV/bin/python" -c "$check" || { log "error: the Horovod installed from $hvd_wheel does not work (above)"; exit 1; }

# --- KenLM's lmplz and build_binary (dstrain scorer lm), from the same kenlm source as the Python module.
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
  # setup.py's requirements without dstrain: the image installs dstrain's own wheel in a later layer of its own.
  log "installing dstrain's requirements into $VENV"
  reqs=$(mktemp)
  requirements_of "$VENV/bin/python" > "$reqs"
  $PIP install -q -r "$reqs"
  rm -f "$reqs"
else
  log "installing dstrain (editable) and test tools"
  DSTRAIN_TF=$DSTRAIN_TF $PIP install -q --no-build-isolation -e '.[test]'
fi
echo "$want" > "$STAMP"
log "ready: $VENV"
