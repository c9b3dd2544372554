#!/usr/bin/env bash
# Used by tests/test_workflow_slurm.py. Stop the daemons started by tests/slurm/up.sh, by pid, in reverse order.
set -uo pipefail
STATE=${SLURM_CI_STATE:-/tmp/slurm-ci}
[ -f "$STATE/pids" ] || { echo "no $STATE/pids"; exit 0; }
command -v scancel >/dev/null && scancel --user=root 2>/dev/null   # cancel leftover jobs
tac "$STATE/pids" | while read -r name pid; do
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { echo "$name ($pid) still alive, sending KILL"; kill -KILL "$pid"; }
    echo "stopped $name ($pid)"
  fi
done
rm -f "$STATE/pids"
