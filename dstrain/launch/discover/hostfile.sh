#!/bin/sh
# Horovod host discovery (horovodrun --host-discovery-script) from a hostfile an operator edits while the job runs:
# prints one "host:slots" line per host. Reads MPI ("host slots=N") and Horovod ("host:N") lines and "#" comments;
# a bare host has $DSTRAIN_SLOTS slots (default 1). Horovod runs this every second: keep it cheap.
#
#   dstrain/launch/discover/hostfile.sh /shared/jobs/a/hosts
f=${1:?usage: hostfile.sh HOSTFILE}
# A file that is not there (being replaced) is a transient failure the driver retries, not "every host is gone".
[ -r "$f" ] || { echo "hostfile.sh: cannot read $f" >&2; exit 1; }
sed 's/#.*//' "$f" | awk -v slots="${DSTRAIN_SLOTS:-1}" '
  NF {
    host = $1; n = slots
    if (host ~ /:/) { split(host, p, ":"); host = p[1]; n = p[2] }
    for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, q, "="); n = q[2] }
    print host ":" n
  }'
