#!/usr/bin/env bash
# The launch plan that srun, hydra and mpirun pass to every task (CMPIRUN_PLAN): its size against
# the job's ranks and nodes, and what it costs a task to read it and find its own rank's place.
#
# For each job shape, the front end (`cmpirun --launcher slurm -n N IMAGE /bin/true` inside a
# pretend allocation of NODES nodes: SLURM_JOB_NODELIST=nid[00001-NODES], PPN tasks each) runs a
# stand-in `srun` that keeps the plan it was given and starts nothing. Then `cmpirun __rank` is
# timed with that plan as the job's last rank, against the same with the plan of a one-node job:
# it reads and checks the plan, computes its rank's node, local rank and part (logged with -v),
# and stops at the world-size check (PMI_SIZE=1), before any container. Runs are interleaved;
# medians are printed. A benchmark, not a test: it asserts nothing.
#
# Usage: ci/bench-plan.sh [IMAGE]     env: RUNS (default 30), CMPIRUN (a cmpirun binary to use
# instead of this tree's release build). IMAGE defaults to .cache/images/mpich5.sif.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-30}
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
if [ -z "${CMPIRUN:-}" ]; then
    cargo build --release --quiet --bin cmpirun
    CMPIRUN=$target_dir/release/cmpirun
fi
image=${1:-.cache/images/mpich5.sif}
if [ ! -f "$image" ]; then
    echo "bench-plan.sh: no image $image; build the test images with ci/build-images.sh or name one" >&2
    exit 2
fi
image=$(realpath "$image")
work=$(mktemp -d /var/tmp/cmpirun-bench-plan-XXXXXX)
trap 'rm -rf "$work"' EXIT
cat >"$work/srun" <<'SRUN'
#!/bin/sh
printf %s "$CMPIRUN_PLAN" >"$PLAN_OUT"
SRUN
chmod 0755 "$work/srun"

# The plan of a job of $1 nodes × $2 ranks, into $work/plan-$1x$2.
plan_of() {
    local nodes=$1 ppn=$2 out=$work/plan-$1x$2
    PATH=$work:$PATH PLAN_OUT=$out CMPIRUN_REPORT_ADDR=127.0.0.1 SLURM_JOB_ID=1 \
        SLURM_JOB_NODELIST="nid[00001-$(printf %05d "$nodes")]" SLURM_TASKS_PER_NODE="$ppn(x$nodes)" \
        "$CMPIRUN" --launcher slurm -n $((nodes * ppn)) "$image" /bin/true >/dev/null 2>&1 || true
    [ -s "$out" ] || { echo "bench-plan.sh: no plan for $nodes x $ppn" >&2; exit 1; }
}

shapes=${SHAPES:-"1x8 16x128 63x128 1000x128 4000x128 10000x128"}
for s in $shapes; do plan_of "${s%x*}" "${s#*x}"; done

CMPIRUN=$CMPIRUN WORK=$work RUNS=$RUNS SHAPES=$shapes python3 - <<'PY'
import os, statistics, subprocess, time
cmpirun, work, runs = os.environ["CMPIRUN"], os.environ["WORK"], int(os.environ["RUNS"])
shapes = os.environ["SHAPES"].split()
def task(shape):
    nodes, ppn = map(int, shape.split("x"))
    plan = open(f"{work}/plan-{shape}").read()
    env = dict(os.environ, CMPIRUN_PLAN=plan, PMI_RANK=str(nodes * ppn - 1), PMI_SIZE="1")
    env.pop("CMPIRUN_REPORT", None)
    return [cmpirun, "__rank", "--plan", "env:CMPIRUN_PLAN"], env
times = {s: [] for s in shapes}
# One round first, not counted: it brings the binary into the page cache.
for i in range(runs + 1):
    for s in shapes:
        argv, env = task(s)
        t = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i > 0:
            times[s].append((time.perf_counter() - t) * 1000)
print(f"{'nodes x ranks':>16} {'ranks':>9} {'CMPIRUN_PLAN bytes':>19} {'__rank ms (median)':>19}")
base = statistics.median(times[shapes[0]])
for s in shapes:
    nodes, ppn = map(int, s.split("x"))
    size = len("CMPIRUN_PLAN=") + os.path.getsize(f"{work}/plan-{s}") + 1
    m = statistics.median(times[s])
    print(f"{s:>16} {nodes * ppn:>9} {size:>19} {m:>12.2f} ({m - base:+.2f})")
PY
