#!/usr/bin/env bash
# Cold first launches, repeated: every try starts a job of several tasks on one node with an
# empty library cache, so the tasks race to create the node instance and fill the cache entry.
# Counts the tries that succeeded, failed and hung (did not end within TIMEOUT seconds), under
# srun (the one-node Slurm test cluster) and hydra (`-f HOSTS`), with a node-local cache (a new
# folder under /tmp per try) and a shared one (a new folder in the test user's home per try, as
# on a cluster whose homes are one network filesystem). A stress run, not a test: it prints its
# counts and exits 1 when any try hung or failed.
#
# With CLUSTER=1 every try spans the three-node test cluster (ci/start-cluster.sh): TASKS per
# node on n1..n3, `salloc -N3` and hydra over ssh (`-H n1:T,n2:T,n3:T`), the MPICH 5 image over
# ofi tcp (Debian's MPICH 4 hangs in MPI_Finalize across nodes); the "local" cache is then each
# node's own /tmp and the "shared" one the test user's home, which every node sees, so three
# nodes fill one cache folder at once.
#
# Usage (as root, after ci/prepare.sh and ci/start-slurm.sh, or ci/start-cluster.sh):
#   ci/stress-cold-launch.sh [TRIES]        env: TASKS (default 4), TIMEOUT (default 60),
#                                           IMAGE (default .cache/images/mpich4.sif),
#                                           CMPIRUN (default target/debug/cmpirun),
#                                           LAUNCHERS (default "srun hydra"),
#                                           CACHES (default "local shared"), TEST_USER (tuser),
#                                           CLUSTER (default 0)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "stress-cold-launch.sh: run as root (it runs every job as \$TEST_USER)" >&2
    exit 1
fi
TRIES=${1:-100}
TASKS=${TASKS:-4}
TIMEOUT=${TIMEOUT:-60}
TEST_USER=${TEST_USER:-tuser}
LAUNCHERS=${LAUNCHERS:-srun hydra}
CACHES=${CACHES:-local shared}
CMPIRUN=${CMPIRUN:-target/debug/cmpirun}
CLUSTER=${CLUSTER:-0}
cluster=${CLUSTER_DIR:-/run/cmpirun-test-cluster}
if [ "$CLUSTER" = 1 ]; then
    IMAGE=${IMAGE:-.cache/images/mpich5.sif}
    export SLURM_CONF=$cluster/slurm.conf
    [ -f "$SLURM_CONF" ] || { echo "stress-cold-launch.sh: start ci/start-cluster.sh first" >&2; exit 1; }
    NODES=3
    mpi=(-x FI_PROVIDER=tcp -x MPIR_CVAR_CH4_NETMOD=ofi)
    cluster_env=(HYDRA_LAUNCHER_EXEC="$cluster/bin/ssh" CMPIRUN_REPORT_ADDR=10.77.0.1)
else
    IMAGE=${IMAGE:-.cache/images/mpich4.sif}
    export SLURM_CONF=${SLURM_CONF:-${SLURM_DIR:-/run/cmpirun-test-slurm}/slurm.conf}
    NODES=1
    mpi=()
    cluster_env=()
fi
N=$((NODES * TASKS))

home=$(getent passwd "$TEST_USER" | cut -d: -f6)
work=$(mktemp -d /var/tmp/cmpirun-stress-XXXXXX)
shared=$(mktemp -d "$home/.cmpirun-stress-XXXXXX")
cleanup() {
    rm -rf "$work" "$shared"
    rm -rf /tmp/cmpirun-stress-cache-*
    if [ "$CLUSTER" = 1 ]; then
        for a in "$cluster"/n*.anchor; do rm -rf /proc/"$(cat "$a")"/root/tmp/cmpirun-stress-cache-*; done
    fi
}
trap cleanup EXIT
chmod 0755 "$work"
chown "$TEST_USER:" "$shared"
install -m 0755 "$CMPIRUN" "$work/cmpirun"
install -m 0644 "$IMAGE" "$work/image.sif"
if [ "$CLUSTER" = 1 ]; then
    printf 'n1:%s\nn2:%s\nn3:%s\n' "$TASKS" "$TASKS" "$TASKS" >"$work/hosts"
else
    echo "$(hostname):$TASKS" >"$work/hosts"
fi
chmod 0644 "$work/hosts"

as_user=(setpriv --reuid="$TEST_USER" --regid="$TEST_USER" --init-groups --inh-caps=-all
    --bounding-set=-all env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$home" USER="$TEST_USER"
    LANG=C.UTF-8 SLURM_CONF="$SLURM_CONF")

# One job: prints ok, failed (with its status) or hung.
try() {
    local launcher=$1 cache=$2 log=$3
    local job=("$work/cmpirun" -n "$N" "${mpi[@]}" "$work/image.sif" /usr/local/bin/mpitest)
    case $launcher in
        # salloc exits 0 when its command failed: its command says how it ended.
        srun) job=(salloc -Q -N "$NODES" -n "$N" sh -c '"$@"; echo "cmpirun-status=$?"' sh "${job[@]}") ;;
        hydra) job=("$work/cmpirun" -f ./hosts -n "$N" "${mpi[@]}" "$work/image.sif" /usr/local/bin/mpitest) ;;
    esac
    local rc=0
    (cd "$work" && timeout -k 5 "$TIMEOUT" "${as_user[@]}" CMPIRUN_LIBRARY_CACHE="$cache" \
        CMPIRUN_KILL_GRACE=2 "${cluster_env[@]}" "${job[@]}") >"$log" 2>&1 || rc=$?
    if [ "$launcher" = srun ] && [ "$rc" = 0 ]; then
        rc=$(sed -n 's/^cmpirun-status=//p' "$log" | tail -1)
        rc=${rc:-1}
    fi
    case $rc in
        0) echo ok ;;
        124 | 137) echo hung ;;
        *) echo "failed $rc" ;;
    esac
}

bad=0
for launcher in $LAUNCHERS; do
    for where in $CACHES; do
        ok=0 failed=0 hung=0
        start=$SECONDS
        for i in $(seq 1 "$TRIES"); do
            case $where in
                local) cache=$(mktemp -d /tmp/cmpirun-stress-cache-XXXXXX) ;;
                shared) cache=$(mktemp -d "$shared/cache-XXXXXX") ;;
            esac
            chown "$TEST_USER:" "$cache"
            rmdir "$cache" # cmpirun creates it: an empty cache, as on a new node
            log="$work/$launcher-$where-$i.log"
            result=$(try "$launcher" "$cache" "$log")
            case $result in
                ok) ok=$((ok + 1)) ;;
                hung)
                    hung=$((hung + 1))
                    echo "  $launcher/$where try $i hung; its output:" >&2
                    sed 's/^/    /' "$log" >&2
                    # What a hung job left: its processes are the test user's.
                    pkill -KILL -u "$TEST_USER" || true
                    ;;
                *)
                    failed=$((failed + 1))
                    echo "  $launcher/$where try $i: $result; its output:" >&2
                    sed 's/^/    /' "$log" >&2
                    ;;
            esac
            rm -rf "$cache"
        done
        printf '%-6s %-7s cache: %4d tries, %4d ok, %3d failed, %3d hung (%d s)\n' \
            "$launcher" "$where" "$TRIES" "$ok" "$failed" "$hung" $((SECONDS - start))
        bad=$((bad + failed + hung))
    done
done
[ "$bad" = 0 ]
