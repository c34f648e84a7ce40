#!/bin/sh
# Horovod host discovery (horovodrun --host-discovery-script) inside a SLURM allocation: the job's nodes, minus those
# SLURM reports down, drained, draining, failing or not responding, one "host:slots" line each. Slots per node:
# $DSTRAIN_SLOTS, else $SLURM_NTASKS_PER_NODE, else 1.
#
#   dstrain/launch/discover/slurm.sh
: "${SLURM_JOB_NODELIST:?slurm.sh: not inside a SLURM allocation (no SLURM_JOB_NODELIST)}"
slots=${DSTRAIN_SLOTS:-${SLURM_NTASKS_PER_NODE:-1}}
nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || exit 1
gone=$(sinfo -h -N -n "$SLURM_JOB_NODELIST" -t down,drain,drained,draining,fail,failing,no_respond -o %N) || exit 1
# grep -vxF with no pattern line would drop every node: only filter when something is gone.
if [ -n "$gone" ]; then nodes=$(printf '%s\n' "$nodes" | grep -vxF "$(printf '%s\n' "$gone" | sort -u)"); fi
printf '%s\n' "$nodes" | sed -n "s/^\(..*\)\$/\1:$slots/p"
