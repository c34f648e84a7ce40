#!/usr/bin/env bash
# Builds dstrain's OCI images from k8s/Containerfile here, with no registry and no Docker daemon (podman/buildah):
#
#   tools/build_image.sh cpu|gpu|all     build what is missing; prints one image reference per variant
#   tools/build_image.sh ref cpu|gpu     print the reference the current checkout builds, build nothing
#   tools/build_image.sh check           rerun the gpu image's check (below) on the image of this checkout
#   tools/build_image.sh conf            print the containers.conf path that podman needs on this machine
#   podman save localhost/dstrain:cpu | ...   # or podman push --creds ... localhost/dstrain:cpu REGISTRY/dstrain:TAG
#
# Every step is cached by its inputs, so a second run costs seconds:
#   1. two base images made from Debian 12's packages with mmdebstrap, from this machine's own apt sources: the
#      runtime packages of k8s/image-packages.txt, and those plus what tools/install.sh compiles with;
#   2. a wheelhouse on the host (pip download/wheel): the container build itself runs with --network none;
#   3. podman build, tagged localhost/dstrain:VARIANT-HASH where HASH covers every file the build reads (the
#      checkout less .dockerignore, the base images, the variant); skipped when that tag exists. Horovod's and
#      KenLM's builds are shared with tools/install.sh through the mounted DSTRAIN_CACHE.
# The gpu variant is then checked on this machine, GPU or not: TensorFlow and Horovod import and Horovod lists NCCL.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CACHE=${DSTRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dstrain}
IMAGE=${DSTRAIN_IMAGE_NAME:-localhost/dstrain}
SUITE=bookworm
export CONTAINERS_CONF=${CONTAINERS_CONF:-$REPO/build/containers.conf}

log() { printf '[image] %s\n' "$*" >&2; }
die() { printf '[image] error: %s\n' "$*" >&2; exit 1; }
hash_of() { sha256sum | cut -c1-12; }
packages() { grep -v '^#' k8s/image-packages.txt | tr -s ' \n' ' '; }

# podman's defaults do not fit every machine: crun refuses hybrid cgroup hierarchies, and podman 4.3 asks for
# 1048576 open files per container, above many machines' hard limit. Written for this machine, read through
# CONTAINERS_CONF by podman and buildah alone (nothing system-wide changes).
write_conf() {
  mkdir -p "$(dirname "$CONTAINERS_CONF")"
  local nofile nproc
  nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
  nproc=$(ulimit -Hu); { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
  cat > "$CONTAINERS_CONF.tmp" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
EOF
  mv "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"
}

# What podman needs here: tools/packages.txt's image group (netavark's iptables included, which Debian's netavark
# only recommends: without it `podman run --network NAME` fails with "netavark: No such file or directory").
need_tools() {
  local missing
  missing=$(tools/install.sh --apt-missing image)
  [ -z "${missing// /}" ] && return 0
  [ "$(id -u)" = 0 ] || die "missing:$missing (apt-get install them, as root)"
  log "apt-get install$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# The apt sources this machine uses (no mirror is named here); the security suite keeps the base patched.
apt_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && grep -qv '^\s*#' "$f" && printf '%s\n' "$f"
  done
}

# Base image from Debian's packages: NAME and packages -> localhost/dstrain-base:NAME-HASH.
base_image() {
  local name=$1; shift
  # The hooks' text is part of the hash: a base made by other hooks is another base.
  local hooks=('rm -rf "$1"/var/lib/apt/lists/*' 'rm -f "$1"/etc/ssh/ssh_host_*')
  local ref="$IMAGE-base:$name-$(printf '%s\n' "$SUITE" "$@" "${hooks[@]}" | hash_of)"
  if ! podman image exists "$ref"; then
    local t0=$SECONDS sources
    mapfile -t sources < <(apt_sources)
    [ ${#sources[@]} -gt 0 ] || die "no apt sources found in /etc/apt"
    log "making the $name base from Debian $SUITE's packages (mmdebstrap): $*"
    # minbase: no docs, manuals or translations; apt lists removed (the image never runs apt offline); no ssh host
    # keys (openssh-server's install makes them: a key in a layer is every pod's and everyone's who pulls the image).
    mmdebstrap --quiet --variant=minbase --include="$(IFS=,; echo "$*")" \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
      --dpkgopt='path-exclude=/usr/share/info/*' --customize-hook="${hooks[0]}" --customize-hook="${hooks[1]}" \
      "$SUITE" - "${sources[@]}" | podman import --quiet - "$ref" >/dev/null
    log "$name base: $ref ($((SECONDS - t0)) s)"
  fi
  echo "$ref"
}

# Every wheel the build stage installs, fetched on the host: the build runs without a network. The requirements are
# tools/versions.sh's, the installer's own, so the two cannot drift apart.
wheelhouse() {
  local flavour=$1 key dir
  # shellcheck disable=SC1091
  . tools/versions.sh
  local tf_var="TF_REQ_$flavour" extra=()
  [ "$flavour" = gpu ] && read -ra extra <<< "$CUDA_BUILD_REQS"
  local reqs boot runtime
  read -ra boot <<< "$BOOTSTRAP_REQS"; read -ra runtime <<< "$HOROVOD_RUNTIME_REQS"
  reqs=("${boot[@]}" "${!tf_var}" "$NUMPY_REQ" "${runtime[@]}" "${extra[@]}")
  # Fetched again when a requirement changes: dstrain's (setup.py) or the installer's (tools/versions.sh).
  key=$({ cat setup.py tools/versions.sh; printf '%s\n' "${reqs[@]}"; } | hash_of)
  dir="$CACHE/wheelhouse-$flavour"
  if [ "$(cat "$dir/.key" 2>/dev/null)" != "$key" ]; then
    local t0=$SECONDS py="$CACHE/wheelhouse-venv/bin/python"
    log "fetching the $flavour wheelhouse into $dir"
    [ -x "$py" ] || python3 -m venv "$CACHE/wheelhouse-venv"
    "$py" -m pip install -q --upgrade "${boot[@]}"
    rm -rf "$dir"; mkdir -p "$dir"
    "$py" -m pip download -q -d "$dir" "${reqs[@]}"
    # Sources install.sh compiles (Horovod, KenLM's tools) if the mounted cache lacks their builds.
    # (--no-build-isolation: their metadata read with our setuptools, not with a cmake built from source.)
    "$py" -m pip download -q -d "$dir" --no-deps --no-build-isolation --no-binary :all: \
      "horovod==$HOROVOD_VERSION" "kenlm==$KENLM_VERSION"
    # dstrain's other requirements, sdists built into wheels here (same Debian 12, same cp311 ABI as the image).
    # Horovod is not among them: built here it would be built without TensorFlow (no ops), and a wheel of it in
    # the wheelhouse is what the offline build would then install.
    local reqfile
    reqfile=$(mktemp)
    DSTRAIN_TF=$flavour PYTHON=$py tools/install.sh --requirements | grep -iv '^horovod' > "$reqfile"
    "$py" -m pip wheel -q -w "$dir" -r "$reqfile"
    rm -f "$reqfile"
    ! ls "$dir"/horovod-*.whl >/dev/null 2>&1 || die "a Horovod wheel got into $dir"
    echo "$key" > "$dir/.key"
    log "wheelhouse: $(du -sh "$dir" | cut -f1) ($((SECONDS - t0)) s)"
  fi
  echo "$dir"
}

# Hash of the build context: the checkout's files (tracked and untracked, not git-ignored) less .dockerignore.
context_hash() {
  python3 - <<'EOF'
import fnmatch, hashlib, os, subprocess
patterns = [l.strip() for l in open(".dockerignore") if l.strip() and not l.startswith("#")]
def ignored(path):
    parts = path.split("/")
    for p in patterns:
        p = p.removeprefix("**/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), p) or fnmatch.fnmatch(parts[i - 1], p) for i in range(1, len(parts) + 1)):
            return True
    return False
try:
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], check=True, capture_output=True).stdout.decode().split("\0")
except (OSError, subprocess.CalledProcessError):
    files = [os.path.relpath(os.path.join(d, f)) for d, _, fs in os.walk(".") for f in fs]
h = hashlib.sha256()
for f in sorted(x for x in files if x and not ignored(x) and os.path.lexists(x)):
    h.update(f.encode() + b"\0")
    h.update(os.readlink(f).encode() if os.path.islink(f) else open(f, "rb").read())
    h.update(b"\0%d\0" % (os.stat(f).st_mode & 0o111 if not os.path.islink(f) else 0))
print(h.hexdigest())
EOF
}

# Sets RUNTIME_BASE and BUILD_BASE, making them if missing.
bases() {
  RUNTIME_BASE=$(base_image runtime $(packages))
  BUILD_BASE=$(base_image build $(packages) $(tools/install.sh --apt-packages base build python))
}

image_ref() {
  echo "$IMAGE:$1-$( { context_hash; podman image inspect --format '{{.Id}}' "$RUNTIME_BASE" "$BUILD_BASE"; echo "$1"; } | hash_of)"
}

check_gpu_image() {
  local ref=$1
  log "checking $ref on this machine: TensorFlow and Horovod import, NCCL built in"
  podman run --rm --network none -i --entrypoint python "$ref" - <<'EOF' || die "$ref: the import check failed (output above)"
import tensorflow as tf
import horovod.tensorflow as hvd
assert tf.test.is_built_with_cuda(), "TensorFlow is not the CUDA build"
assert hvd.nccl_built(), "Horovod was built without NCCL"
assert hvd.mpi_built() and hvd.gloo_built()
print(f"tensorflow {tf.__version__} (CUDA {tf.sysconfig.get_build_info()['cuda_version']}), horovod with NCCL, MPI, Gloo")
EOF
  podman run --rm --network none --entrypoint horovodrun "$ref" --check-build | tee /dev/stderr | grep -q '\[X\] NCCL' \
    || die "$ref: horovodrun --check-build does not list NCCL"
}

build() {
  local flavour=$1 ref t0=$SECONDS
  bases
  ref=$(image_ref "$flavour")
  if podman image exists "$ref"; then
    log "$ref is up to date"
  else
    local wh
    wh=$(wheelhouse "$flavour")
    mkdir -p "$CACHE"
    log "building $ref (log: $CACHE/build-$flavour.log)"
    # The build's own output goes to a log, shown when it fails; an image or layer this build left behind on
    # failure (the build stage's, 0.8 GB and more) is removed, images that were there before are not touched.
    local before
    before=$(podman images -qa --no-trunc | sort -u)
    local args=(--network none --force-rm -f k8s/Containerfile --build-arg BASE="$RUNTIME_BASE"
      --build-arg BUILD_BASE="$BUILD_BASE" --build-arg DSTRAIN_TF="$flavour" --build-arg WHEELHOUSE=/wheels
      -v "$wh:/wheels:ro" -v "$CACHE:/cache")
    # The stages without dstrain's sources (its requirements' venv, the runtime stage that holds it) are tagged
    # first, so that the prune below keeps their layers as the next build's cache: a change to dstrain's sources
    # then costs its wheel, not a new 1.9 GB venv.
    if ! { podman build "${args[@]}" --target deps -t "$IMAGE-deps:build-$flavour" . \
          && podman build "${args[@]}" --target runtime -t "$IMAGE-deps:runtime-$flavour" . \
          && podman build "${args[@]}" -t "$ref" .; } > "$CACHE/build-$flavour.log" 2>&1; then
      tail -n 60 "$CACHE/build-$flavour.log" >&2
      comm -13 <(echo "$before") <(podman images -qa --no-trunc | sort -u) | xargs -r podman rmi -f >/dev/null 2>&1 || true
      die "podman build of the $flavour image failed: the last lines of its log are above ($CACHE/build-$flavour.log)"
    fi
    if [ "$flavour" = gpu ]; then check_gpu_image "$ref" >&2; fi
    # Keep one image per variant: earlier tags and the build stage's layers only take disk. :VARIANT moves first,
    # so that it no longer holds the previous image and the prune removes that too (each rebuild left one untagged
    # image behind otherwise, 5 GB for the gpu variant).
    podman tag "$ref" "$IMAGE:$flavour"
    podman images --format '{{.Repository}}:{{.Tag}}' "$IMAGE" | grep -x "$IMAGE:$flavour-.*" | grep -vx "$ref" \
      | xargs -r podman rmi >/dev/null || true
    podman image prune -f >/dev/null
    log "built $ref in $((SECONDS - t0)) s"
  fi
  podman tag "$ref" "$IMAGE:$flavour"
  log "$ref: $(podman image inspect --format '{{.Size}}' "$ref" | awk '{printf "%.2f GB", $1 / 1e9}')"
  echo "$ref"
}

case "${1:-}" in
  conf) write_conf; echo "$CONTAINERS_CONF" ;;
  ref) need_tools; write_conf; bases; image_ref "${2:?cpu or gpu}" ;;
  check) need_tools; write_conf; bases; check_gpu_image "$(image_ref gpu)" ;;
  cpu|gpu) need_tools; write_conf; build "$1" ;;
  all) need_tools; write_conf; build cpu; build gpu ;;
  *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
