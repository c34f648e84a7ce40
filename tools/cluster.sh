#!/usr/bin/env bash
# A cluster in a box: N "nodes" on this machine, for trying multi-node launches and node failures without a cluster.
#
#   tools/cluster.sh up 3 [--rate 1gbit] [--delay 0.1ms]   # node1..node3
#   tools/cluster.sh exec node1 horovodrun -np 3 -H node1:1,node2:1,node3:1 dstrain train ...
#   tools/cluster.sh kill node2        # every process of node2 dies, as in a crash; `revive node2` boots it again
#   tools/cluster.sh cut node2         # node2's link goes down, as a dead switch port; `heal node2` plugs it back
#   tools/cluster.sh shape --rate 100mbit [--delay 1ms]    # re-shape every link (no options: unshaped)
#   tools/cluster.sh slurm             # a `head` node with slurmctld, one slurmd per node (prints SLURM_CONF)
#   tools/cluster.sh status
#   tools/cluster.sh down              # removes everything; safe to repeat, and after a crash
#
# --dir DIR (before the command; default $DSTRAIN_CLUSTER_DIR or /tmp/dstrain-cluster) holds the cluster's state:
# several clusters can exist at once, one per directory. Needs root (network namespaces).
#
# Each node is a network namespace with its own UTS namespace (hostname nodeK) and mount namespace, in which
# /etc/hosts is DIR/nodeK/hosts (every node's name -> its address; edit it in place to break resolution on purpose),
# /etc/ssh/ssh_config points ssh at this cluster's key and host keys, and /run is the node's own. Every node has eth0,
# 10.213.0.(10+K)/24, on a bridge that lives in a namespace of its own: no address, interface or route is added to
# this machine's network namespace, and the bridge has no uplink, so traffic only goes between the nodes. Every node
# runs an sshd on port 22 with host and user keys made for this cluster under DIR/ssh (~/.ssh is not touched).
# The host's file systems are shared by all nodes, as NFS or Lustre would be.
set -euo pipefail

DIR=${DSTRAIN_CLUSTER_DIR:-/tmp/dstrain-cluster}
if [ "${1:-}" = --dir ]; then DIR=${2:?--dir DIR}; shift 2; fi
# A link is refused before anything follows it (state_dir): /tmp/dstrain-cluster could be anyone's link.
[ -L "$DIR" ] && { echo "cluster.sh: $DIR is a symbolic link: refusing to keep the cluster's state there; choose another with --dir" >&2; exit 1; }
DIR=$(realpath -m "$DIR")
HERE=$(cd "$(dirname "$0")" && pwd)
SUBNET=10.213.0
# Names derive from the directory, so `down` finds what `up` made even when DIR's files are gone.
ID=dsc$(printf %s "$DIR" | sha256sum | cut -c1-6)
SW=$ID-sw

die() { echo "cluster.sh: $*" >&2; exit 1; }
ns() { echo "$ID-$1"; }
addr() { case $1 in head) echo "$SUBNET.10" ;; node*) echo "$SUBNET.$((10 + ${1#node}))" ;; *) die "no node $1" ;; esac; }
nodes() { [ -f "$DIR/nodes" ] && cat "$DIR/nodes" || true; }
known() { nodes | grep -qx "$1" || die "no node $1 in $DIR (nodes: $(nodes | tr '\n' ' '))"; }
anchor() { local p; p=$(cat "$DIR/$1/anchor.pid" 2>/dev/null) && [ -d "/proc/$p" ] && echo "$p"; }
# Bounded wait for a condition (a command): 20 s in 0.05 s steps.
wait_for() { local i; for i in $(seq 400); do "$@" && return 0; sleep 0.05; done; return 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
  local exe
  for exe in ip sshd ssh-keygen nsenter unshare; do
    command -v "$exe" >/dev/null || [ -x "/usr/sbin/$exe" ] || die "$exe missing: apt-get install iproute2 openssh-server util-linux"
  done
}

# --- processes of a node: every process whose network namespace is the node's
ns_pids() {
  { stat -L -c '%i %n' /proc/[0-9]*/ns/net 2>/dev/null || true; } | awk -v ino="$1" '$1 == ino { split($2, p, "/"); print p[3] }'
}

ns_empty() { [ -z "$(ns_pids "$1")" ]; }

kill_netns() {  # freeze everything first so nothing forks while it is being killed, then SIGKILL, then wait
  local ino=$1 pids round
  for round in $(seq 20); do
    pids=$(ns_pids "$ino")
    [ -n "$pids" ] || return 0
    kill -STOP $pids 2>/dev/null || true
    [ "$(ns_pids "$ino")" = "$pids" ] || continue
    kill -KILL $pids 2>/dev/null || true
    wait_for ns_empty "$ino" && return 0
  done
  die "processes of namespace inode $ino survive SIGKILL: $(ns_pids "$ino")"
}

# --- shaping: tbf for the rate, netem for the delay (where the kernel has it)
rate_bits() {  # 1gbit, 100mbit, 500kbit, 1000000 -> bits per second
  local v=${1,,} n unit
  n=${v%%[a-z]*}; unit=${v#"$n"}
  case $unit in ""|bit) echo "$n" ;; kbit) echo $((n * 1000)) ;; mbit) echo $((n * 1000000)) ;;
    gbit) echo $((n * 1000000000)) ;; *) die "rate $1: use e.g. 1gbit, 100mbit, 500kbit" ;; esac
}

shape_link() {  # NS DEV RATE DELAY: egress of one end of a node's link
  local n=$1 dev=$2 rate=$3 delay=$4 burst
  tc -n "$n" qdisc del dev "$dev" root 2>/dev/null || true
  if [ -n "$delay" ]; then
    tc -n "$n" qdisc add dev "$dev" root netem delay "$delay" ${rate:+rate "$rate"} 2>/dev/null || {
      echo "cluster.sh: --delay needs the kernel's netem qdisc (sch_netem), which this kernel lacks; --rate works" >&2
      return 1; }
  elif [ -n "$rate" ]; then
    # 10 ms of traffic per burst, at least one 64 KiB GSO segment (veth hands tbf segments that large).
    burst=$(( $(rate_bits "$rate") / 800 )); [ "$burst" -ge 65536 ] || burst=65536
    tc -n "$n" qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 100ms
  fi
}

shape_node() {  # NODE: the rate each way (the node's eth0, its bridge port), the delay once (the node's side)
  local rate delay
  rate=$(sed -n 1p "$DIR/shape"); delay=$(sed -n 2p "$DIR/shape")
  shape_link "$(ns "$1")" eth0 "$rate" "$delay" && shape_link "$SW" "v$1" "$rate" ""
}

# --- nodes
write_hosts() {
  local n
  for n in $(nodes); do
    { printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
      for m in $(nodes); do printf '%s\t%s\n' "$(addr "$m")" "$m"; done; } > "$DIR/$n/hosts.new"
    # In place: a node's mount namespace binds this file by inode.
    cat "$DIR/$n/hosts.new" > "$DIR/$n/hosts"; rm "$DIR/$n/hosts.new"
  done
  for m in $(nodes); do echo "$m,$(addr "$m") $(cut -d' ' -f1-2 "$DIR/ssh/host_ed25519.pub")"; done > "$DIR/ssh/known_hosts"
}

make_keys() {
  mkdir -p "$DIR/ssh"
  [ -f "$DIR/ssh/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C "dstrain-cluster host" -f "$DIR/ssh/host_ed25519"
  [ -f "$DIR/ssh/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C "dstrain-cluster user" -f "$DIR/ssh/id_ed25519"
  cp "$DIR/ssh/id_ed25519.pub" "$DIR/ssh/authorized_keys"
  cat > "$DIR/ssh/sshd_config" <<EOF
Port 22
HostKey $DIR/ssh/host_ed25519
AuthorizedKeysFile $DIR/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
UseDNS no
MaxStartups 100:30:200
MaxSessions 100
ClientAliveInterval 5
ClientAliveCountMax 3
EOF
  # The nodes' /etc/ssh/ssh_config: what a cluster's admins set up, so `ssh node2` just works.
  cat > "$DIR/ssh/ssh_config" <<EOF
Host *
    IdentityFile $DIR/ssh/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $DIR/ssh/known_hosts
    GlobalKnownHostsFile $DIR/ssh/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 10
    # A node that stops answering ends the ssh sessions to it within 40-50 s: Horovod's elastic driver learns of the
    # lost worker only when its ssh exits (docs/elastic.md, "Bounds"). Not sooner than Gloo's 30 s timeout and
    # PeerWatch, which name the lost rank (horovodrun would otherwise stop the job on the ssh's exit, naming nobody).
    ServerAliveInterval 10
    ServerAliveCountMax 4
    LogLevel ERROR
EOF
}

boot_node() {  # the node's namespaces' anchor (hostname, mounts), then its sshd
  local n=$1 pid
  [ -z "$(anchor "$n")" ] || return 0
  rm -f "$DIR/$n/anchor.pid" "$DIR/$n/sshd.pid"
  # The anchor holds the node's UTS and mount namespaces for `exec`: a sleeping process, named for ps/pgrep.
  setsid nsenter --net="/run/netns/$(ns "$n")" unshare --uts --mount --propagation private bash -c '
    set -e; hostname "$1"
    mount --bind "$2/$1/hosts" /etc/hosts
    mount --bind "$2/ssh/ssh_config" /etc/ssh/ssh_config
    mount -t tmpfs -o mode=755 "$3-run" /run; mkdir -p /run/sshd
    echo $$ > "$2/$1/anchor.pid.new"; mv "$2/$1/anchor.pid.new" "$2/$1/anchor.pid"
    exec -a "$3-$1" sleep infinity' _ "$n" "$DIR" "$ID" </dev/null >>"$DIR/$n/boot.log" 2>&1 &
  wait_for test -s "$DIR/$n/anchor.pid" || die "$n did not boot; see $DIR/$n/boot.log"
  pid=$(cat "$DIR/$n/anchor.pid")
  nsenter -t "$pid" --net --uts --mount /usr/sbin/sshd -f "$DIR/ssh/sshd_config" -o "PidFile=$DIR/$n/sshd.pid" \
    -E "$DIR/$n/sshd.log" </dev/null
  wait_for test -s "$DIR/$n/sshd.pid" || die "sshd did not start on $n; see $DIR/$n/sshd.log"
}

no_ipv6() {  # IPv4 only between the nodes: no link-local addresses or router solicitations on the bridge
  nsenter --net="/run/netns/$1" sh -c 'echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6 &&
    echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6'
}

make_node() {
  local n=$1 nsn
  nsn=$(ns "$n")
  nodes | grep -qx "$n" || echo "$n" >> "$DIR/nodes"  # recorded first: `down` removes half-made nodes too
  mkdir -p "$DIR/$n"; touch "$DIR/$n/hosts"
  ip netns list | grep -qw "^$nsn" || { ip netns add "$nsn"; no_ipv6 "$nsn"; }
  stat -L -c %i "/run/netns/$nsn" > "$DIR/$n/netns.inode"
  if ! ip -n "$SW" link show "v$n" >/dev/null 2>&1; then
    ip -n "$SW" link add "v$n" type veth peer name eth0 netns "$nsn"
  fi
  ip -n "$SW" link set "v$n" master br0 up
  ip -n "$nsn" addr replace "$(addr "$n")/24" dev eth0
  ip -n "$nsn" link set eth0 up
  ip -n "$nsn" link set lo up
  shape_node "$n"
}

cmd_up() {
  local count=${1:?up N [--rate R] [--delay D]} rate="" delay="" i
  shift
  while [ $# -gt 0 ]; do
    case $1 in --rate) rate=$2; shift 2 ;; --delay) delay=$2; shift 2 ;; *) die "up: unknown option $1" ;; esac
  done
  [[ $count =~ ^[0-9]+$ ]] && [ "$count" -ge 1 ] && [ "$count" -le 200 ] || die "up: N must be 1..200"
  [ -z "$rate" ] || rate_bits "$rate" >/dev/null
  [ ! -s "$DIR/nodes" ] || die "a cluster is up in $DIR ($(nodes | tr '\n' ' ')); tools/cluster.sh --dir $DIR down first"
  mkdir -p "$DIR"
  printf '%s\n%s\n' "$rate" "$delay" > "$DIR/shape"
  trap 'rc=$?; [ $rc = 0 ] || { echo "cluster.sh: up failed; removing what it made" >&2; cmd_down >/dev/null 2>&1; exit $rc; }' EXIT
  make_keys
  ip netns list | grep -qw "^$SW" || { ip netns add "$SW"; no_ipv6 "$SW"; }
  stat -L -c %i "/run/netns/$SW" > "$DIR/sw.inode"
  ip -n "$SW" link show br0 >/dev/null 2>&1 || ip -n "$SW" link add br0 type bridge
  ip -n "$SW" link set br0 up
  for i in $(seq "$count"); do make_node "node$i"; done
  write_hosts
  for i in $(seq "$count"); do boot_node "node$i"; done
  trap - EXIT
  echo "cluster in $DIR: $(nodes | tr '\n' ' ')(tools/cluster.sh --dir $DIR exec NODE CMD...)"
}

add_node() {  # a node after `up` (the SLURM head): every node's hosts and known_hosts learn its name
  local n=$1
  nodes | grep -qx "$n" && return 0
  make_node "$n"
  write_hosts
  boot_node "$n"
}

cmd_exec() {
  local n=${1:?exec NODE CMD...} pid
  shift
  known "$n"
  pid=$(anchor "$n") || die "$n is down (killed): tools/cluster.sh revive $n"
  exec nsenter -t "$pid" --net --uts --mount --wd="$PWD" -- "$@"
}

cmd_exec_daemon() {  # NODE CMD...: a daemon that forks, whose first words go to the node's log, not our caller's pipes
  ( cmd_exec "$@" ) </dev/null >>"$DIR/$1/daemons.log" 2>&1
}

cmd_kill() {
  local n=${1:?kill NODE}
  known "$n"
  kill_netns "$(cat "$DIR/$n/netns.inode")"
  rm -f "$DIR/$n/anchor.pid" "$DIR/$n/sshd.pid"
}

cmd_revive() {
  local n=${1:?revive NODE}
  known "$n"
  [ -z "$(anchor "$n")" ] || die "$n is up; kill it first"
  boot_node "$n"
  if [ -f "$DIR/slurm/slurm.conf" ] && [ "$n" != head ]; then cmd_exec_daemon "$n" slurmd -f "$DIR/slurm/slurm.conf" -N "$n"; fi
}

cmd_link() {  # up|down NODE
  local state=$1 n=${2:?NODE} m
  known "$n"
  ip -n "$SW" link set "v$n" "$state"
  # Plugged back: forget the failed address resolutions, so the nodes reach each other again at once.
  if [ "$state" = up ]; then for m in $(nodes); do ip -n "$(ns "$m")" neigh flush all; done; fi
}

cmd_shape() {
  local rate="" delay="" n
  while [ $# -gt 0 ]; do
    case $1 in --rate) rate=$2; shift 2 ;; --delay) delay=$2; shift 2 ;; *) die "shape: unknown option $1" ;; esac
  done
  [ -s "$DIR/nodes" ] || die "no cluster in $DIR"
  [ -z "$rate" ] || rate_bits "$rate" >/dev/null
  local before
  before=$(cat "$DIR/shape")
  printf '%s\n%s\n' "$rate" "$delay" > "$DIR/shape"
  for n in $(nodes); do
    shape_node "$n" || { echo "$before" > "$DIR/shape"; for n in $(nodes); do shape_node "$n"; done; exit 1; }
  done
}

cmd_status() {
  local n pid link procs
  [ -s "$DIR/nodes" ] || { echo "no cluster in $DIR"; return 0; }
  echo "cluster in $DIR, links: rate $(sed -n 1p "$DIR/shape" | grep . || echo unlimited), delay $(sed -n 2p "$DIR/shape" | grep . || echo none)"
  for n in $(nodes); do
    pid=$(anchor "$n" || true)
    link=$(ip -n "$SW" -o link show "v$n" 2>/dev/null | grep -q 'state UP' && echo up || echo cut)
    procs=$(ns_pids "$(cat "$DIR/$n/netns.inode" 2>/dev/null || echo none)" | wc -l)
    printf '%-6s %-12s %s, link %s, %s process(es)%s\n' "$n" "$(addr "$n")" "$([ -n "$pid" ] && echo up || echo down)" "$link" "$procs" \
      "$([ -n "$pid" ] && [ -d "/proc/$(cat "$DIR/$n/sshd.pid" 2>/dev/null || echo x)" ] && echo ", sshd" || true)"
  done
}

cmd_down() {
  local f n nsn
  [ "$(id -u)" = 0 ] || die "needs root"
  # Processes first (a namespace lives on while one of its processes does), by the inodes recorded at creation.
  for f in "$DIR"/*/netns.inode "$DIR/sw.inode"; do [ -f "$f" ] && kill_netns "$(cat "$f")"; done
  # Then every namespace of this cluster, recorded or not (a crash between `ip netns add` and the record).
  for nsn in $(ip netns list | awk '{print $1}' | grep "^$ID-" || true); do
    kill_netns "$(stat -L -c %i "/run/netns/$nsn")"
    ip netns del "$nsn"
  done
  for n in "$DIR"/node[0-9]* "$DIR/head"; do [ -f "$n/netns.inode" ] || [ -f "$n/hosts" ] && rm -rf "$n"; done
  rm -rf "$DIR/ssh" "$DIR/slurm" "$DIR/nodes" "$DIR/shape" "$DIR/sw.inode"
  rmdir "$DIR" 2>/dev/null || true
  echo "cluster in $DIR: down"
}

# --- SLURM across the nodes: slurmctld (and munged) on a `head` node, one slurmd per node
cmd_slurm() {
  local n workers
  [ -s "$DIR/nodes" ] || die "no cluster in $DIR: tools/cluster.sh up N first"
  add_node head
  workers=$(nodes | grep -v '^head$')
  # The one-node cluster's configuration and daemons, with the controller on head and a slurmd per node. Nodes not
  # heard from for 10 s are down (SLURM's default is 300 s), so that a killed node's jobs are requeued soon.
  SLURM_HEAD=head SLURM_HEAD_ADDR=$(addr head) SLURM_NODES="$(for n in $workers; do printf '%s=%s ' "$n" "$(addr "$n")"; done)" \
    SLURM_ON="$0 --dir $DIR exec" SLURMD_TIMEOUT=${SLURMD_TIMEOUT:-10} "$HERE/local_slurm.sh" start "$DIR/slurm"
}

# The state holds the cluster's keys and is written by root: keep it where no other user can have placed a file or a
# link (/tmp is everyone's): one it makes 0700, or one of ours no one else may write to; anything else is refused.
state_dir() {
  mkdir -p "$(dirname "$DIR")"
  mkdir -m 700 "$DIR" 2>/dev/null || true
  { [ ! -L "$DIR" ] && [ -d "$DIR" ] && [ -O "$DIR" ]; } \
    || die "$DIR is not a directory of $(id -un) (a link, a file or another user's): refusing to keep the cluster's state there; choose another with --dir"
  case $(stat -c %a "$DIR") in
    *[2367][0-7] | *[2367]) die "$DIR is writable by other users: refusing to keep the cluster's state there; choose another with --dir" ;;
  esac
}
case ${1:-} in status | down) [ ! -e "$DIR" ] || state_dir ;; up | exec | kill | revive | cut | heal | shape | slurm) state_dir ;; esac

case ${1:-} in
  up) shift; need_root; cmd_up "$@" ;;
  exec) shift; cmd_exec "$@" ;;
  kill) shift; cmd_kill "$@" ;;
  revive) shift; need_root; cmd_revive "$@" ;;
  cut) shift; cmd_link down "$@" ;;
  heal) shift; cmd_link up "$@" ;;
  shape) shift; cmd_shape "$@" ;;
  slurm) shift; need_root; cmd_slurm "$@" ;;
  status) cmd_status ;;
  down) cmd_down ;;
  *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
