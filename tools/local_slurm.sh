#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying dstrain's sbatch scripts and for its tests.
#
#   tools/local_slurm.sh start DIR    # writes DIR/slurm.conf, starts munged, slurmctld, slurmd; prints exports
#   tools/local_slurm.sh stop DIR
#   export SLURM_CONF=DIR/slurm.conf  # then sbatch/srun/squeue talk to it
#
# Needs root (the daemons run as root here) and Debian's slurm-wlm and munge packages.
set -euo pipefail
cmd=${1:?start|stop}; dir=$(realpath -m "${2:?state directory}")
export SLURM_CONF="$dir/slurm.conf"

stop() {
  [ -f "$dir/slurmd.pid" ] && kill "$(cat "$dir/slurmd.pid")" 2>/dev/null || true
  [ -f "$dir/slurmctld.pid" ] && kill "$(cat "$dir/slurmctld.pid")" 2>/dev/null || true
  [ -f "$dir/munged.pid" ] && kill "$(cat "$dir/munged.pid")" 2>/dev/null || true
  sleep 1
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0: needs root (slurmd runs jobs as their users)" >&2; exit 2; }
for exe in slurmctld slurmd munged mungekey; do
  command -v "$exe" >/dev/null || { echo "$0: $exe missing: apt-get install slurm-wlm munge" >&2; exit 2; }
done
stop
mkdir -p "$dir"/{spool,state,munge,log}
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))

# munge: its own key, socket and pid file under DIR, so nothing system-wide is touched.
[ -f "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" --force
chmod 600 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
       --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"

cat > "$SLURM_CONF" <<CONF
ClusterName=dstrain-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
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
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:${FAKE_GPUS:-4} State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

# Stand-in GPUs (character devices like /dev/null): the project's sbatch scripts keep their --gres=gpu lines on
# a CPU-only machine. SLURM only counts them and sets CUDA_VISIBLE_DEVICES; TensorFlow finds no GPU and uses CPUs.
gpus=${FAKE_GPUS:-4}
for i in $(seq 0 $((gpus - 1))); do [ -e "$dir/fakegpu$i" ] || mknod "$dir/fakegpu$i" c 1 3; done
echo "NodeName=$host Name=gpu File=$dir/fakegpu[0-$((gpus - 1))]" > "$dir/gres.conf"

slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  state=$(sinfo -h -o %T 2>/dev/null || true)
  case "$state" in idle*|mixed*|allocated*) echo "export SLURM_CONF=$SLURM_CONF"; exit 0 ;; esac
  sleep 0.5
done
echo "$0: the node did not come up; see $dir/log" >&2
tail -n 5 "$dir"/log/*.log >&2
exit 1
