#!/usr/bin/env bash
# Used by tests/test_workflow_slurm.py; adapted from the team's notes (slurm-single-node.md).
# Bring up a single-node SLURM cluster on this machine (Debian bookworm, root, no systemd).
# Usage:  SLURM_ACCOUNTING=none|dbd SLURM_CI_STATE=DIR bash tests/slurm/up.sh   (root, apt)
#   dbd  (default): munge + MariaDB + slurmdbd + slurmctld + slurmd -> sacct works,
#                   snakemake-executor-plugin-slurm runs with its defaults.
#   none          : munge + slurmctld + slurmd only -> sacct fails ("Slurm accounting
#                   storage is disabled"); run snakemake with --slurm-status-command squeue.
# Daemon pids are written to $STATE/pids; stop them with tests/slurm/down.sh.
set -euo pipefail
MODE=${SLURM_ACCOUNTING:-none}
STATE=${SLURM_CI_STATE:-/tmp/slurm-ci}
mkdir -p "$STATE"; : > "$STATE/pids"

wait_for() {  # wait_for <seconds> <description> <command...>
  local t=$1 what=$2; shift 2
  for _ in $(seq $((t * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "timed out waiting for $what" >&2; return 1
}
record() { echo "$1 $(cat "$2")" >> "$STATE/pids"; }

pkgs="slurmctld slurmd slurm-client munge"
[ "$MODE" = dbd ] && pkgs="$pkgs slurmdbd mariadb-server"
need=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"; done
if [ -n "$need" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

# ---- munge ----
[ -s /etc/munge/munge.key ] || runuser -u munge -- /usr/sbin/mungekey --create
install -d -o munge -g munge -m 0755 /run/munge
runuser -u munge -- /usr/sbin/munged           # daemonizes, writes /run/munge/munged.pid
wait_for 10 munged bash -c 'munge -n | unmunge'
record munged /run/munge/munged.pid

# ---- directories ----
install -d -o slurm -g slurm /var/spool/slurmctld /var/log/slurm /run/slurm
install -d /var/spool/slurmd

HOST=$(hostname -s)
MEM=$(free -m | awk '/^Mem:/{print $2}')
NCPU=$(nproc)

# ---- MariaDB + slurmdbd ----
if [ "$MODE" = dbd ]; then
  install -d -o mysql -g mysql /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
  setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
      --socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 \
      >"$STATE/mariadbd.log" 2>&1 </dev/null &
  wait_for 60 mariadb mariadb-admin ping
  wait_for 10 mariadb-pidfile test -s /run/mysqld/mysqld.pid
  record mariadbd /run/mysqld/mysqld.pid
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurmpw
EOF
  chown slurm:slurm /etc/slurm/slurmdbd.conf; chmod 600 /etc/slurm/slurmdbd.conf
  slurmdbd                                       # daemonizes
  wait_for 30 slurmdbd bash -c 'test -s /run/slurm/slurmdbd.pid && (exec 3<>/dev/tcp/127.0.0.1/6819)'
  record slurmdbd /run/slurm/slurmdbd.pid
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux"
else
  ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

# ---- slurm.conf ----
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobCompType=jobcomp/none
${ACCT}
# keep finished jobs visible to squeue for 5 min (plugin needs >= 3x its first status-check delay)
MinJobAge=300
InactiveLimit=0
KillWait=30
Waittime=0
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${NCPU} RealMemory=$((MEM - 512)) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld                                        # daemonizes
wait_for 30 slurmctld scontrol ping
record slurmctld /run/slurm/slurmctld.pid
slurmd                                           # daemonizes
wait_for 60 "node idle" bash -c '[ "$(sinfo -h -o %T)" = idle ]'
record slurmd /run/slurm/slurmd.pid
if [ "$MODE" = dbd ]; then
  wait_for 30 "cluster in slurmdbd" bash -c 'sacctmgr -n -P show cluster format=cluster | grep -qx ci'
fi
sinfo
echo "SLURM up (mode=$MODE); pids in $STATE/pids:"; cat "$STATE/pids"
