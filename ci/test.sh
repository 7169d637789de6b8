#!/usr/bin/env bash
# Run all tests, as root (the container tests run their programs as the unprivileged user tuser):
# prepares what is missing (ci/prepare.sh), starts the one-node Slurm cluster and the three-node
# test cluster if they are not running (and stops them afterwards), then `cargo test --workspace`.
# Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

ci/prepare.sh

slurm_conf=${SLURM_DIR:-/run/cmpirun-test-slurm}/slurm.conf
started_slurm=false
if ! { [ -f "$slurm_conf" ] && SLURM_CONF=$slurm_conf sinfo -h >/dev/null 2>&1; }; then
    ci/start-slurm.sh
    started_slurm=true
fi
# The three-node cluster of the multi-node tests, likewise.
cluster_conf=${CLUSTER_DIR:-/run/cmpirun-test-cluster}/slurm.conf
started_cluster=false
if ! { [ -f "$cluster_conf" ] && SLURM_CONF=$cluster_conf sinfo -h >/dev/null 2>&1; }; then
    ci/start-cluster.sh
    started_cluster=true
fi
cleanup() {
    if $started_cluster; then ci/stop-cluster.sh || true; fi
    if $started_slurm; then ci/stop-slurm.sh || true; fi
}
trap cleanup EXIT

echo "== cargo test" >&2
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
export SLURM_CONF=$slurm_conf
cargo test --locked --workspace --no-fail-fast "$@"
