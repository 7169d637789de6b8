#!/usr/bin/env bash
# cmpirun's benchmarks in one command (as root): launch time, memory, communication, image I/O and
# PMI, each against its baseline (native MPI, one container per rank, squashfuse_ll, hydra's PMI
# server), with the compared commands run in turn in the same invocation. Prints medians and
# ratios; writes nothing outside a temporary folder it removes. See BENCHMARKS.md for the figures
# and ci/bench/bench.py for what each case runs.
#
#   ci/bench.sh [--quick] [--only launch,startup,memory,comm,io,pmi,openmpi,multinode] [--runs N] [--markdown FILE]
#
# --quick: few runs and N up to 16, to check the harness (its timings mean little).
# env: CMPIRUN=path uses that cmpirun binary instead of building this tree's; TEST_USER (tuser).
# Measure on an otherwise idle machine: the load average is printed at the start and the end.
# The multinode case needs the three-node test cluster: started here if it is not running (and
# stopped again at the end); a running one is used and left running.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "bench.sh: run as root (everything runs as the unprivileged \$TEST_USER; the I/O case drops page caches)" >&2
    exit 1
fi
target_dir=${CARGO_TARGET_DIR:-$PWD/target}

ci/setup-test-user.sh >/dev/null
ci/fetch-wheels.sh >/dev/null
cargo build --release --quiet --bin cmpirun
cargo build --release --quiet -p cmpirun-pmi --example mini_mpiexec
CMPIRUN=${CMPIRUN:-$target_dir/release/cmpirun} ci/build-images.sh

only=launch,startup,memory,comm,io,pmi,openmpi,multinode
prev=
for a in "$@"; do
    case $prev in --only) only=$a ;; esac
    case $a in --only=*) only=${a#--only=} ;; esac
    prev=$a
done
case ",$only," in
*,multinode,*)
    if ! SLURM_CONF=${CLUSTER_DIR:-/run/cmpirun-test-cluster}/slurm.conf sinfo -h >/dev/null 2>&1; then
        ci/start-cluster.sh
        trap 'ci/stop-cluster.sh' EXIT
    fi
    ;;
esac

status=0
BENCH_CMPIRUN=${CMPIRUN:-$target_dir/release/cmpirun} \
BENCH_MINI_MPIEXEC=$target_dir/release/examples/mini_mpiexec \
BENCH_MPICH5=$PWD/.cache/wheels/mpich-5.0.2/mpich-5.0.2.data/data \
    python3 ci/bench/bench.py "$@" || status=$?
exit $status
