#!/usr/bin/env bash
# A real one-node SLURM on localhost for the tests (docs/design.md section 5).
#   slurm/local_cluster.sh start    install (apt) if missing, start munged/slurmctld/slurmd, wait until idle
#   slurm/local_cluster.sh stop     stop ONLY the daemons this script started (pids in the state dir)
#   slurm/local_cluster.sh status   exit 0 if the partition answers and the node is usable
# Needs root and Debian packages slurmctld slurmd slurm-client munge.  No systemd: the daemons
# are started by hand.  No accounting, so `sacct` fails: slurm/bin/sacct answers from
# `scontrol show job` (the harness puts it on PATH when the real one fails).
# The state is wiped on start, so job ids restart at 1: use a fresh submitit folder per sweep.
set -uo pipefail
STATE=${D2C_SLURM_STATE:-/var/tmp/d2c-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by d2c-bench slurm/local_cluster.sh"

die() { echo "local_cluster: could not start: $*" >&2; exit 1; }

up() {
  timeout 10 sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'
}

install() {
  local need=()
  for c in slurmctld slurmd sbatch munged; do command -v "$c" >/dev/null || need+=("$c"); done
  [ ${#need[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing ${need[*]} and not root (apt-get install slurmctld slurmd slurm-client munge)"
  echo "local_cluster: installing slurmctld slurmd slurm-client munge" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge) >"$STATE/apt.log" 2>&1 || die "apt-get failed (see $STATE/apt.log)"
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching a real cluster's config"
  fi
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 3 / 4 ))
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
  cat >"$CONF" <<CONF
$MARK
ClusterName=d2clocal
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
ReturnToService=2
MinJobAge=3600
KillWait=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
  mkdir -p "$STATE"
  if up; then echo "local_cluster: already up (not started by this call)"; exit 0; fi
  install
  write_conf
  # munge: key + /run/munge owned by munge
  if [ ! -s /etc/munge/munge.key ]; then
    (command -v mungekey >/dev/null && mungekey -c -f -k /etc/munge/munge.key) \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge; chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged --force || die "munged did not start"
    for _ in $(seq 1 20); do [ -s /run/munge/munged.pid ] && break; sleep 0.25; done
    [ -s /run/munge/munged.pid ] || die "munged wrote no pid file"
    cp /run/munge/munged.pid "$STATE/munged.started"
    munge -n | unmunge >/dev/null 2>&1 || die "munge does not work"
  fi
  # fresh state: stale jobs from an earlier run must not come back
  rm -rf "$STATE/ctld" "$STATE/d"; mkdir -p "$STATE/ctld" "$STATE/d"
  rm -f "$STATE/slurmctld.pid" "$STATE/slurmd.pid"
  slurmctld -i || die "slurmctld failed (see $STATE/slurmctld.log)"
  slurmd -N localhost || die "slurmd failed (see $STATE/slurmd.log)"
  for _ in $(seq 1 60); do
    [ -s "$STATE/slurmctld.pid" ] && cp "$STATE/slurmctld.pid" "$STATE/slurmctld.started"
    [ -s "$STATE/slurmd.pid" ] && cp "$STATE/slurmd.pid" "$STATE/slurmd.started"
    if up && [ -s "$STATE/slurmd.started" ] && [ -s "$STATE/slurmctld.started" ]; then
      echo "local_cluster: up (partition debug, $(nproc) CPUs)"; exit 0
    fi
    scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  tail -5 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 2>/dev/null
  die "node not idle after 30 s (logs in $STATE)"
}

stop() {
  local f pid
  for f in slurmd slurmctld munged; do
    [ -s "$STATE/$f.started" ] || continue
    pid=$(cat "$STATE/$f.started")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$STATE/$f.started"
  done
  echo "local_cluster: stopped what it had started"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if up; then echo "local_cluster: up"; exit 0; else echo "local_cluster: down"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
