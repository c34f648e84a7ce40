#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying dstrain's sbatch scripts and for its tests.
#
#   tools/local_slurm.sh start DIR    # writes DIR/slurm.conf, starts munged, slurmctld, slurmd; prints exports
#   tools/local_slurm.sh stop DIR
#   export SLURM_CONF=DIR/slurm.conf  # then sbatch/srun/squeue talk to it
#
# Needs root (the daemons run as root here) and Debian's slurm-wlm and munge packages.
# tools/cluster.sh slurm starts the same daemons across the nodes of a cluster in a box, through:
#   SLURM_NODES="node1=ADDR node2=ADDR"  the nodes (default: this host on 127.0.0.1)
#   SLURM_HEAD=NAME SLURM_HEAD_ADDR=ADDR the controller's host (default: this host)
#   SLURM_ON="CMD"                       runs "CMD NODE COMMAND..." on a node (default: here)
#   SLURMD_TIMEOUT=S                     seconds before an unresponsive node is down (default 300, SLURM's)
set -euo pipefail
cmd=${1:?start|stop}; dir=$(realpath -m "${2:?state directory}")
export SLURM_CONF="$dir/slurm.conf"
host=$(hostname -s)
head=${SLURM_HEAD:-$host}
nodes=${SLURM_NODES:-$host=127.0.0.1}
on() { local node=$1; shift; if [ -n "${SLURM_ON:-}" ]; then $SLURM_ON "$node" "$@"; else "$@"; fi; }

stop() {
  local f
  for f in "$dir"/slurmd*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 1
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0: needs root (slurmd runs jobs as their users)" >&2; exit 2; }
for exe in slurmctld slurmd munged mungekey; do
  command -v "$exe" >/dev/null || { echo "$0: $exe missing: apt-get install slurm-wlm munge" >&2; exit 2; }
done
stop
mkdir -p "$dir"/{spool,state,munge,log,tmp}
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))

# munge: its own key, socket and pid file under DIR, so nothing system-wide is touched.
[ -f "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" --force
chmod 600 "$dir/munge/munge.key"
on "$head" munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
       --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"

cat > "$SLURM_CONF" <<CONF
ClusterName=dstrain-local
SlurmctldHost=$head(${SLURM_HEAD_ADDR:-127.0.0.1})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
TmpFS=$dir/tmp/%n
SlurmdTimeout=${SLURMD_TIMEOUT:-300}
SlurmctldPort=$(( 6817 + RANDOM % 1000 ))
SlurmdPort=$(( 7817 + RANDOM % 1000 ))
GresTypes=gpu
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
$(for n in $nodes; do echo "NodeName=${n%%=*} NodeAddr=${n#*=} CPUs=$cpus RealMemory=$mem Gres=gpu:${FAKE_GPUS:-4} State=UNKNOWN"; done)
PartitionName=debug Nodes=$(for n in $nodes; do printf '%s,' "${n%%=*}"; done | sed 's/,$//') Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

# Stand-in GPUs (character devices like /dev/null): the project's sbatch scripts keep their --gres=gpu lines on
# a CPU-only machine. SLURM only counts them and sets CUDA_VISIBLE_DEVICES; TensorFlow finds no GPU and uses CPUs.
gpus=${FAKE_GPUS:-4}
for i in $(seq 0 $((gpus - 1))); do [ -e "$dir/fakegpu$i" ] || mknod "$dir/fakegpu$i" c 1 3; done
for n in $nodes; do echo "NodeName=${n%%=*} Name=gpu File=$dir/fakegpu[0-$((gpus - 1))]"; done > "$dir/gres.conf"

on "$head" slurmctld -c -f "$SLURM_CONF"
for n in $nodes; do mkdir -p "$dir/spool/${n%%=*}" "$dir/tmp/${n%%=*}"; on "${n%%=*}" slurmd -f "$SLURM_CONF" -N "${n%%=*}"; done
for _ in $(seq 60); do
  up=$(on "$head" sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)' || true)
  if [ "$up" = "$(echo "$nodes" | wc -w)" ]; then echo "export SLURM_CONF=$SLURM_CONF"; exit 0; fi
  sleep 0.5
done
echo "$0: the node did not come up; see $dir/log" >&2
tail -n 5 "$dir"/log/*.log >&2
exit 1
