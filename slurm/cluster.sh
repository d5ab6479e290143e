#!/usr/bin/env bash
# A real, private SLURM on this one machine, for tests and for trying `dpo-dist slurm` scripts locally.
#
#   slurm/cluster.sh start DIR [NODES]   install the Debian packages if missing, then start munged, slurmctld and NODES
#                                        slurmd (default 2) in the background; prints `export SLURM_CONF=DIR/slurm.conf`
#   slurm/cluster.sh stop DIR            cancel every job, stop the daemons by pid (munged last), wait until all are gone
#   slurm/cluster.sh status DIR          the daemons' pids and `sinfo`
#
# Everything (config, munge key and socket, state, spool, logs, pid files) lives under DIR; nothing is installed as a
# service and /etc is not changed. No systemd, no cgroups: proctrack/linuxproc, task/none. Each node's slurmd runs in
# its own UTS and mount namespace (`unshare --uts --mount`) with its own host name (node1, node2, ...), loopback
# address (127.0.0.11, 127.0.0.12, ...) and a private hosts file naming them, so the ranks of a job see different
# hosts, as on a real cluster; DIR/node-local shows each node its own DIR/nodes/<node> (a node-local disk).
# Environment: CLUSTER_CTLD_PORT (default 6817) for slurmctld, CLUSTER_NODE_PORT (default 6818) for node1, +1 for each
# next node; CLUSTER_CPUS, the CPUs each node claims (default 2).
set -euo pipefail

PKGS=(slurmctld slurmd slurm-client munge)

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
}

die() { echo "cluster.sh: $*" >&2; exit 1; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get: install ${PKGS[*]}"
  [ "$(id -u)" = 0 ] || die "SLURM is not installed: run as root, or install ${PKGS[*]} yourself"
  echo "cluster.sh: installing ${PKGS[*]} (apt-get, --no-install-recommends)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >&2 || die "apt-get install ${PKGS[*]} failed"
}

# Start "$@" detached: own session, no inherited fds (a caller capturing our output must not wait on a daemon).
spawn() {
  local log="$1"; shift
  setsid "$@" </dev/null >"$log" 2>&1 &
}

node_addr() { echo "127.0.0.$((10 + $1))"; }

write_config() {
  local dir="$1" nodes="$2" ctld_port="$3" node_port="$4" cpus="$5" i
  {
    echo "# written by slurm/cluster.sh: a private test cluster, state under $dir"
    echo "ClusterName=dpodist"
    echo "SlurmctldHost=ctld(127.0.0.1)"
    echo "SlurmctldPort=$ctld_port"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "AuthInfo=socket=$dir/munge/run/munge.sock"
    echo "StateSaveLocation=$dir/state"
    echo "SlurmdSpoolDir=$dir/spool/%n"
    echo "SlurmctldPidFile=$dir/run/slurmctld.pid"
    echo "SlurmdPidFile=$dir/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$dir/log/slurmctld.log"
    echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "SwitchType=switch/none"
    echo "MpiDefault=none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SlurmdParameters=config_overrides"
    echo "ReturnToService=2"
    echo "MailProg=/bin/true"
    echo "MinJobAge=5"
    echo "KillWait=5"
    echo "InactiveLimit=0"
    echo "SlurmctldDebug=info"
    echo "SlurmdDebug=info"
    for ((i = 1; i <= nodes; i++)); do
      echo "NodeName=node$i NodeHostname=node$i NodeAddr=$(node_addr "$i") Port=$((node_port + i - 1)) CPUs=$cpus" \
        "State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } >"$dir/slurm.conf"
  # The hosts file every daemon (and so every job) sees: this machine's entries plus the nodes'.
  {
    cat /etc/hosts
    echo "127.0.0.1 ctld"
    for ((i = 1; i <= nodes; i++)); do echo "$(node_addr "$i") node$i"; done
  } >"$dir/hosts"
}

# spawn, in a new UTS + mount namespace: host name $3, $2/hosts as /etc/hosts, and $2/nodes/$3 mounted on
# $2/node-local (a node-local folder: each node sees its own files there). The daemon replaces the shell.
spawn_host() {
  local log="$1" dir="$2" name="$3"; shift 3
  mkdir -p "$dir/nodes/$name" "$dir/node-local"
  # shellcheck disable=SC2016  # expanded by the inner shell
  spawn "$log" unshare --uts --mount sh -c \
    'hostname "$1" && mount --bind "$2" /etc/hosts && mount --bind "$3" "$4" && shift 4 && exec "$@"' \
    sh "$name" "$dir/hosts" "$dir/nodes/$name" "$dir/node-local" "$@"
}

start() {
  local dir="$1" nodes="${2:-2}"
  local ctld_port="${CLUSTER_CTLD_PORT:-6817}" node_port="${CLUSTER_NODE_PORT:-6818}" cpus="${CLUSTER_CPUS:-2}" i
  [[ "$nodes" =~ ^[1-9][0-9]?$ ]] || die "NODES must be 1..99, got '$nodes'"
  install_packages
  unshare --uts --mount true 2>/dev/null || die "unshare --uts --mount is refused here (needs root): the nodes" \
    "could not have their own host names"
  if [ -n "$(daemon_pids "$dir" 'slurm*')" ]; then
    die "a cluster is already running under $dir (stop it first)"
  fi
  mkdir -p "$dir"/{state,spool,run,log,munge/run}
  chmod 755 "$dir"
  dir="$(cd "$dir" && pwd -P)"
  write_config "$dir" "$nodes" "$ctld_port" "$node_port" "$cpus"
  export SLURM_CONF="$dir/slurm.conf"

  # munge: own key, own socket, run as the munge user (munged refuses group/world-writable or unreadable dirs).
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chown -R munge:munge "$dir/munge"
  chmod 755 "$dir/munge" "$dir/munge/run"
  chmod 600 "$dir/munge/munge.key"
  spawn "$dir/log/munged.out" setpriv --reuid=munge --regid=munge --clear-groups -- /usr/sbin/munged -F \
    --socket="$dir/munge/run/munge.sock" --key-file="$dir/munge/munge.key" --pid-file="$dir/run/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
  echo $! >"$dir/run/munged.spawned"
  wait_for 10 "munged" test -S "$dir/munge/run/munge.sock"

  spawn_host "$dir/log/slurmctld.out" "$dir" ctld /usr/sbin/slurmctld -D -f "$dir/slurm.conf"
  echo $! >"$dir/run/slurmctld.spawned"
  for ((i = 1; i <= nodes; i++)); do
    spawn_host "$dir/log/slurmd-node$i.out" "$dir" "node$i" /usr/sbin/slurmd -D -N "node$i" -f "$dir/slurm.conf"
    echo $! >"$dir/run/slurmd-node$i.spawned"
  done
  wait_for 30 "$nodes idle node(s)" nodes_idle "$nodes"
  echo "export SLURM_CONF=$dir/slurm.conf"
}

nodes_idle() {
  local n
  n="$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | grep -c . || true)"
  [ "$n" -ge "$1" ]
}

wait_for() {
  local secs="$1" what="$2"; shift 2
  local end=$((SECONDS + secs))
  until "$@"; do
    if ((SECONDS >= end)); then
      echo "cluster.sh: $what not ready after ${secs}s; logs:" >&2
      tail -n 20 "$dir"/log/*.out "$dir"/log/*.log >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.2
  done
}

# A live process (a zombie waiting for this machine's init to reap it counts as gone).
alive() {
  local st
  st="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# Pids of our daemons named $2 (a glob): what each daemon wrote, and what we spawned (the same process once started).
daemon_pids() {
  local dir="$1" name="$2" f pid
  for f in "$dir"/run/$name.pid "$dir"/run/$name.spawned; do
    [ -f "$f" ] || continue
    pid="$(cat "$f")"
    [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" && echo "$pid"
  done | sort -u
}

# Every live process in UTS namespace $1 (one our daemons were started in): job steps and ranks, found by namespace.
ns_pids() {
  local ns="$1" p
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/ns/uts" 2>/dev/null)" = "$ns" ] && alive "${p#/proc/}" && echo "${p#/proc/}"
  done
  return 0
}

# SIGTERM the pids, wait up to 5 s, SIGKILL what is left, wait until gone.
term_wait() {
  [ $# -gt 0 ] || return 0
  local pid end
  kill -TERM "$@" 2>/dev/null || true
  end=$((SECONDS + 5))
  for pid in "$@"; do
    while alive "$pid" && ((SECONDS < end)); do sleep 0.05; done
  done
  kill -KILL "$@" 2>/dev/null || true
  for pid in "$@"; do
    while alive "$pid"; do sleep 0.05; done
  done
}

stop() {
  local dir="$1" pid ns left host_ns nss=() slurm_pids=() munge_pids=() rest=()
  [ -d "$dir" ] || return 0
  dir="$(cd "$dir" && pwd -P)"
  export SLURM_CONF="$dir/slurm.conf"
  mapfile -t slurm_pids < <(daemon_pids "$dir" 'slurm*')
  mapfile -t munge_pids < <(daemon_pids "$dir" 'munged*')
  if [ -n "$(daemon_pids "$dir" slurmctld)" ]; then
    timeout 5 scancel --quiet --full --signal=KILL --user="$(id -un)" 2>/dev/null || true
    timeout 5 scancel --quiet --user="$(id -un)" 2>/dev/null || true
  fi
  host_ns="$(readlink /proc/self/ns/uts)"
  for pid in "${slurm_pids[@]+"${slurm_pids[@]}"}"; do
    ns="$(readlink "/proc/$pid/ns/uts" 2>/dev/null || true)"
    [ -n "$ns" ] && [ "$ns" != "$host_ns" ] && nss+=("$ns")
  done
  term_wait "${slurm_pids[@]+"${slurm_pids[@]}"}"   # slurmd and slurmctld
  # Anything left in the daemons' namespaces (a slurmstepd or rank of a cancelled job) goes too.
  for ns in "${nss[@]+"${nss[@]}"}"; do
    mapfile -t rest < <(ns_pids "$ns")
    term_wait "${rest[@]+"${rest[@]}"}"
  done
  term_wait "${munge_pids[@]+"${munge_pids[@]}"}"   # munged last
  rm -f "$dir"/run/*.pid "$dir"/run/*.spawned
  left="$(for ns in "${nss[@]+"${nss[@]}"}"; do ns_pids "$ns"; done)"
  [ -z "$left" ] || die "processes still alive after stop: $left"
}

status() {
  local dir="$1"
  export SLURM_CONF="$dir/slurm.conf"
  echo "slurm daemons: $(daemon_pids "$dir" 'slurm*' | tr '\n' ' ')"
  echo "munged: $(daemon_pids "$dir" 'munged*' | tr '\n' ' ')"
  sinfo 2>&1 || true
}

case "${1:-}" in
  start) [ $# -ge 2 ] || { usage; exit 2; }; start "$2" "${3:-2}" ;;
  stop) [ $# -ge 2 ] || { usage; exit 2; }; stop "$2" ;;
  status) [ $# -ge 2 ] || { usage; exit 2; }; status "$2" ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
