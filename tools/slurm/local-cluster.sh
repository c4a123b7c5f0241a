#!/usr/bin/env bash
# A real single-node Slurm (munged + slurmctld + slurmd) on this machine, as root, for the
# tests: everything (munge key, slurm.conf, state, logs, PID files) lives in DIR.
#
#   tools/slurm/local-cluster.sh install      apt-get install slurm-wlm munge when missing
#   tools/slurm/local-cluster.sh start DIR    start the daemons; prints SLURM_CONF=DIR/slurm.conf
#   tools/slurm/local-cluster.sh stop DIR     stop them, by the PIDs in DIR
#
# When the daemons cannot run (not root, no packages, a container that forbids them), `start`
# writes the reason to DIR/unavailable and exits 0: the Slurm test then skips, printing it.
set -u
cmd=${1:-}; dir=${2:-}

unavailable() {
  echo "$*" > "$dir/unavailable"
  echo "local Slurm unavailable: $*" >&2
  exit 0
}

case "$cmd" in
install)
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then exit 0; fi
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  if ! apt-cache policy slurm-wlm 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
  fi
  echo "installing: slurm-wlm munge"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 \
    || echo "note: could not install slurm-wlm and munge; the Slurm test will be skipped" >&2
  exit 0
  ;;
start)
  [ -n "$dir" ] || { echo "usage: $0 start DIR" >&2; exit 2; }
  mkdir -p "$dir"; dir=$(realpath "$dir"); rm -f "$dir/unavailable"
  mkdir -p "$dir/state" "$dir/spool"
  [ "$(id -u)" = 0 ] || unavailable "not root (slurmd runs jobs as root here)"
  for b in munged slurmctld slurmd sbatch; do command -v $b >/dev/null || unavailable "$b is not installed (make slurm-install)"; done
  # Ports of this cluster: free ones, so clusters of parallel runs do not meet.
  port=$(python3 -c 'import socket
s=socket.socket(); s.bind(("127.0.0.1",0)); t=socket.socket(); t.bind(("127.0.0.1",0))
print(s.getsockname()[1], t.getsockname()[1])' 2>/dev/null) || port="$((20000 + RANDOM % 20000)) $((40000 + RANDOM % 20000))"
  read -r ctldport dport <<< "$port"
  dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none && chmod 400 "$dir/munge.key"
  munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" --pid-file="$dir/munged.pid" \
    --log-file="$dir/munged.log" --seed-file="$dir/munged.seed" >"$dir/munged.out" 2>&1 \
    || unavailable "munged did not start: $(tail -1 "$dir/munged.out" "$dir/munged.log" 2>/dev/null | tr '\n' ' ')"
  cpus=$(nproc)
  mem=$(( $(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo) / 1024 - 512 ))
  cat > "$dir/slurm.conf" <<CONF
ClusterName=smoe-test
SlurmctldHost=localhost
SlurmctldPort=$ctldport
SlurmdPort=$dport
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -c -f "$SLURM_CONF" >"$dir/slurmctld.out" 2>&1 \
    || unavailable "slurmctld did not start: $(tail -2 "$dir/slurmctld.log" 2>/dev/null | tr '\n' ' ')"
  slurmd -f "$SLURM_CONF" -N localhost >"$dir/slurmd.out" 2>&1 \
    || unavailable "slurmd did not start: $(tail -2 "$dir/slurmd.log" 2>/dev/null | tr '\n' ' ')"
  for _ in $(seq 1 60); do
    state=$(sinfo -h -n localhost -o %t 2>/dev/null)
    case "$state" in idle*|mix*|alloc*) echo "SLURM_CONF=$SLURM_CONF"; exit 0 ;; esac
    sleep 0.5
  done
  unavailable "the node did not come up (state '${state:-none}'): $(tail -2 "$dir/slurmd.log" 2>/dev/null | tr '\n' ' ')"
  ;;
stop)
  [ -n "$dir" ] || { echo "usage: $0 stop DIR" >&2; exit 2; }
  for d in slurmd slurmctld munged; do
    [ -f "$dir/$d.pid" ] || continue
    pid=$(cat "$dir/$d.pid")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  done
  exit 0
  ;;
*)
  echo "usage: $0 install | start DIR | stop DIR" >&2
  exit 2
  ;;
esac
