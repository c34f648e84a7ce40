#!/bin/sh
# Installs the Debian packages named in the arguments that are not installed yet, and nothing when all are: the
# image build runs offline on a base that already has them, and online (apt) on a plain debian:bookworm-slim.
set -eu
missing=""
for p in "$@"; do
  dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "apt-get install:$missing" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
# openssh-server's install makes host keys: none may stay in a layer (workers make theirs when they start).
rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_*
