#!/usr/bin/env bash
# Stop the three-node test cluster of ci/start-cluster.sh and leave nothing of it: every process
# in the nodes (sshd, slurmd, job steps, the anchors), slurmctld, munged if the cluster started it,
# the namespaces, veths and bridge, and /run/cmpirun-test-cluster.
# Idempotent; run as root.
set -euo pipefail

C=${CLUSTER_DIR:-/run/cmpirun-test-cluster}
BR=cmpbr0

stop() {
    local pid=$1
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

# Everything that runs in a node's network namespace: sshd, slurmd, slurmstepd and the job's
# processes, the anchor. TERM first, KILL what is left.
nodes=$(ip netns list 2>/dev/null | awk '/^cmpn[0-9]+/{print $1}')
for ns in $nodes; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
[ -f "$C/slurmctld.pid" ] && stop "$(cat "$C/slurmctld.pid")"
for _ in $(seq 30); do
    left=""
    for ns in $nodes; do left="$left$(ip netns pids "$ns" 2>/dev/null)"; done
    [ -z "$left" ] && break
    sleep 0.1
done
for ns in $nodes; do ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; done
for f in "$C"/n*.anchor; do [ -f "$f" ] && stop "$(cat "$f")"; done
if [ -f "$C/munged.ours" ]; then
    [ -f /run/munge/munged.pid ] && stop "$(cat /run/munge/munged.pid)"
fi

for ns in $nodes; do ip netns del "$ns" 2>/dev/null || true; done
for v in $(ip -o link show 2>/dev/null | awk -F': ' '$2 ~ /^cmpv[0-9]+@/{split($2, a, "@"); print a[1]}'); do
    ip link del "$v" 2>/dev/null || true
done
ip link del $BR 2>/dev/null || true
[ -f "$C/sshd-dir.ours" ] && rmdir /run/sshd 2>/dev/null || true
rm -rf "$C"
echo "stop-cluster: stopped" >&2
