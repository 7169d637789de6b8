#!/usr/bin/env bash
# Stop the test cluster started by ci/start-slurm.sh: slurmd, slurmctld and (unless --keep-munge)
# munged, each by its pid file. Idempotent; run as root.
set -euo pipefail

S=${SLURM_DIR:-/run/cmpirun-test-slurm}
keep_munge=false
[ "${1:-}" = --keep-munge ] && keep_munge=true

stop() {
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

stop "$S/slurmd.pid"
stop "$S/slurmctld.pid"
if ! $keep_munge; then
    stop /run/munge/munged.pid
fi
echo "stop-slurm: stopped" >&2
