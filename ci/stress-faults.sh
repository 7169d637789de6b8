#!/usr/bin/env bash
# Faults and load, repeated (issue 15's campaign). A stress run, not a test: it prints its counts
# and exits 1 when any job hung, ended with status 0 although its work was cut short, left
# anything behind, or when a job that should succeed did not.
#
# faults: ITERATIONS times per launcher (local, and srun on the one-node Slurm test cluster), start
#   a small job, wait a random delay (half the time 0 to EARLY ms, the launch itself, half the
#   time 0 to MAX_DELAY ms), then SIGKILL one victim chosen at random:
#   the front end (cmpirun), the node instance, a holder (only in a two-image MPMD job), an image's
#   FUSE server (`cmpirun-fuse`) or one rank. A victim that does not exist yet is waited for (every
#   20 ms) until the job ends; one never seen, or gone before the kill, counts as "too late". Then:
#   did the job end within TIMEOUT s, with a non-zero status and a message on stderr; is anything
#   left (the test user's processes of the job, fuse mounts, FUSE connections, /dev/shm entries,
#   /tmp/cmpirun-* and /var/tmp/cmpirun-* folders, *.tmp-* folders in the caches, cache locks still
#   held, .sock/.lock files in the runtime directory; after a grace of GRACE s); does the next job
#   of the same images succeed.
# soak: SOAK_JOBS jobs back to back (local launcher), the system-wide numbers before (after the
#   first job, which fills the caches) and after: mounts, FUSE connections, /dev/shm entries, open
#   files (/proc/sys/fs/file-nr), the test user's processes, the caches' size, the runtime
#   directory's entries, available memory; sampled every SOAK_EVERY jobs.
# concurrent: CONCURRENT first launches of one image started at once by one user, with an empty
#   library cache: all must succeed, and nothing may be left.
#
# Every job runs as $TEST_USER with a home, cache and runtime directory of its own (under a
# /var/tmp/cmpirun-faults-* stage), holding the test suite's lock (/var/tmp/cmpirun-test.lock)
# for each iteration, so that other runs of the container tests on the machine neither disturb
# the leftover checks nor are disturbed (only processes this script started are ever killed).
#
# Usage (as root, after ci/prepare.sh and ci/start-slurm.sh):
#   ci/stress-faults.sh [ITERATIONS [SOAK_JOBS]]   (defaults 200 and 1000)
#   env: PARTS (default "faults soak concurrent"), LAUNCHERS (default "local srun"),
#        TIMEOUT (30), GRACE (5; SRUN_GRACE 45 under srun: Slurm waits up to 32 s for a step
#        whose srun was killed), MAX_SECONDS (0: none; stop a launcher's faults after that long), MAX_DELAY (1500 ms), EARLY (300 ms), CONCURRENT (20), SOAK_EVERY (100),
#        SOAK_PROG (default /bin/true), SEED (RANDOM's seed), VICTIMS (default "frontend
#        instance holder fuse rank"), CMPIRUN (target/debug/cmpirun),
#        IMAGE (.cache/images/mpich4.sif), IMAGE2 (.cache/images/mpich5.sif), TEST_USER (tuser),
#        KEEP=1 keeps the stage (logs of every job) for a look afterwards.
set -uo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "stress-faults.sh: run as root (it runs every job as \$TEST_USER)" >&2
    exit 1
fi
ITERATIONS=${1:-200}
SOAK_JOBS=${2:-1000}
PARTS=${PARTS:-faults soak concurrent}
LAUNCHERS=${LAUNCHERS:-local srun}
TIMEOUT=${TIMEOUT:-30}
GRACE=${GRACE:-5}
SRUN_GRACE=${SRUN_GRACE:-45}
MAX_SECONDS=${MAX_SECONDS:-0}
MAX_DELAY=${MAX_DELAY:-1500}
EARLY=${EARLY:-300}
CONCURRENT=${CONCURRENT:-20}
SOAK_EVERY=${SOAK_EVERY:-100}
SOAK_PROG=${SOAK_PROG:-/bin/true}
TEST_USER=${TEST_USER:-tuser}
IMAGE=${IMAGE:-.cache/images/mpich4.sif}
IMAGE2=${IMAGE2:-.cache/images/mpich5.sif}
CMPIRUN=${CMPIRUN:-target/debug/cmpirun}
TEST_LOCK=/var/tmp/cmpirun-test.lock
export SLURM_CONF=${SLURM_CONF:-${SLURM_DIR:-/run/cmpirun-test-slurm}/slurm.conf}
RANDOM=${SEED:-$$}
read -r -a VICTIMS <<<"${VICTIMS:-frontend instance holder fuse rank}"

uid=$(id -u "$TEST_USER")
work=$(mktemp -d /var/tmp/cmpirun-faults-XXXXXX)
chmod 0755 "$work"
home=$work/home
mkdir -p "$home" "$work/run" "$work/logs"
chown "$TEST_USER:" "$home" "$work/run"
chmod 0700 "$work/run"
install -m 0755 "$CMPIRUN" "$work/cmpirun"
install -m 0644 "$IMAGE" "$work/a.sif"
install -m 0644 "$IMAGE2" "$work/b.sif"
# The FUSE connections are counted in fusectl: mount it if nobody has.
mounted_fusectl=
if ! mountpoint -q /sys/fs/fuse/connections; then
    mount -t fusectl none /sys/fs/fuse/connections && mounted_fusectl=1
fi
cleanup() {
    [ -n "$mounted_fusectl" ] && umount /sys/fs/fuse/connections 2>/dev/null
    if [ "${KEEP:-}" = 1 ]; then echo "stage kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
exec 9>>"$TEST_LOCK"
lock() { flock 9; }
unlock() { flock -u 9; }

as_user=(setpriv --reuid="$TEST_USER" --regid="$TEST_USER" --init-groups --inh-caps=-all
    --bounding-set=-all env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$home" USER="$TEST_USER"
    LANG=C.UTF-8 SLURM_CONF="$SLURM_CONF" XDG_RUNTIME_DIR="$work/run" CMPIRUN_KILL_GRACE=2)
# The host's user namespace: this script's (pid 1's may be unreadable in a sandbox).
init_userns=$(readlink /proc/self/ns/user)

# --- what exists: snapshots ------------------------------------------------------------------

# The test user's processes (pid and start time, which together name a process).
user_procs() {
    local p
    for p in $(pgrep -u "$TEST_USER"); do
        [ -r "/proc/$p/stat" ] && echo "$p:$(cut -d' ' -f22 "/proc/$p/stat" 2>/dev/null)"
    done | sort
}
# One line per thing that could be left; compared before and after.
snapshot() {
    {
        grep -E 'fuse|cmpirun' /proc/self/mountinfo | sed 's/^[0-9]* [0-9]* /mount /'
        ls /sys/fs/fuse/connections 2>/dev/null | sed 's/^/fuse-connection /'
        ls -A /dev/shm | sed 's/^/shm /'
        ls -d /tmp/cmpirun-* /var/tmp/cmpirun-* 2>/dev/null | grep -v "^$work\$" | sed 's/^/tmp /'
        find "$home/.cache" -maxdepth 3 -name '*.tmp-*' 2>/dev/null | sed 's/^/cache-tmp /'
        find "$work/run" -mindepth 1 \( -name '*.sock' -o -name '*.lock' \) 2>/dev/null |
            sed 's/^/runtime /'
        local l
        for l in $(find "$home/.cache" -name '*.lock' 2>/dev/null); do
            flock -n -x "$l" true 2>/dev/null || echo "held-lock $l"
        done
    } | sort
}
# The processes of the test user that appeared since the snapshot $1 (a file of user_procs) and
# belong to a job of this script (run from the stage, or with the stage's home or runtime
# directory in their environment; other engineers' processes of the same user are left alone):
# "pid comm".
new_procs() {
    local p c
    for p in $(comm -13 "$1" <(user_procs) | cut -d: -f1); do
        c=$(cat "/proc/$p/comm" 2>/dev/null) || continue
        case $(readlink "/proc/$p/exe" 2>/dev/null) in "$work"/*) echo "$p $c"; continue ;; esac
        tr '\0' '\n' 2>/dev/null <"/proc/$p/environ" | grep -qx -e "HOME=$home" \
            -e "XDG_RUNTIME_DIR=$work/run" && echo "$p $c"
    done
}
userns_of() { readlink "/proc/$1/ns/user" 2>/dev/null; }
ppid_of() { awk '{print $4}' "/proc/$1/stat" 2>/dev/null; }
state_of() { awk '{print $3}' "/proc/$1/stat" 2>/dev/null; }

# The victim's pid, or nothing. $1 victim, $2 the job's pid (timeout's), $3 launcher, $4 the
# snapshot of processes before the job.
find_victim() {
    local victim=$1 job=$2 launcher=$3 before=$4 p c ns pns cands=()
    case $victim in
        frontend)
            p=$(pgrep -P "$job" | head -1)
            [ "$launcher" = srun ] && [ -n "$p" ] && p=$(pgrep -P "$p" -x cmpirun | head -1)
            [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = cmpirun ] && echo "$p"
            return
            ;;
    esac
    while read -r p c; do
        [ -n "$p" ] || continue
        [ "$(state_of "$p")" = Z ] && continue
        ns=$(userns_of "$p")
        case $victim in
            instance | holder)
                [ "$c" = cmpirun ] && [ -n "$ns" ] && [ "$ns" != "$init_userns" ] || continue
                pns=$(userns_of "$(ppid_of "$p")")
                if [ "$victim" = instance ] && [ "$pns" = "$init_userns" ]; then cands+=("$p"); fi
                if [ "$victim" = holder ] && [ -n "$pns" ] && [ "$pns" != "$init_userns" ]; then
                    cands+=("$p")
                fi
                ;;
            fuse) [ "$c" = cmpirun-fuse ] && cands+=("$p") ;;
            rank)
                # A rank: a process in the container whose parent is on the host (the front
                # end, or the srun task).
                case $c in cmpirun | cmpirun-fuse) continue ;; esac
                [ -n "$ns" ] && [ "$ns" != "$init_userns" ] || continue
                [ "$(userns_of "$(ppid_of "$p")")" = "$init_userns" ] && cands+=("$p")
                ;;
        esac
    done < <(new_procs "$before")
    [ ${#cands[@]} -gt 0 ] && echo "${cands[RANDOM % ${#cands[@]}]}"
}

# Kills what the job left (its processes only: those that appeared since $1).
kill_new() {
    local p
    for p in $(new_procs "$1" | cut -d' ' -f1); do kill -KILL "$p" 2>/dev/null; done
}

# The job's command line: $1 launcher, $2 kind (single: two ranks of mpitest in image a, each
# followed by a sleep of 0 to 0.7 s, so that the job runs about as long as the delays reach;
# mpmd: a shell rank that sleeps 0.2 to 0.9 s in each of images a and b).
job_cmd() {
    local launcher=$1 kind=$2 job
    if [ "$kind" = mpmd ]; then
        local d=0.$((2 + RANDOM % 8))
        job=(./cmpirun --force -n 1 ./a.sif /bin/sh -c "sleep $d; echo part-done" : -n 1 ./b.sif
            /bin/sh -c "sleep $d; echo part-done")
    else
        job=(./cmpirun -n 2 ./a.sif /bin/sh -c "/usr/local/bin/mpitest && sleep 0.$((RANDOM % 8)) && echo rank-done")
    fi
    [ "$launcher" = srun ] && job=(salloc -Q -n 2 "${job[@]}")
    printf '%q ' "${job[@]}"
}
# Whether the job's output shows its work done (then a kill found nothing left to cut short).
work_done() {
    if [ "$2" = mpmd ]; then [ "$(grep -c '^part-done' "$1")" = 2 ]; else [ "$(grep -c '^rank-done' "$1")" = 2 ]; fi
}

# Runs a job in the background: sets JOB (timeout's pid). $1 log prefix, $2 command.
start_job() {
    (cd "$work" && exec 9>&- && eval "exec timeout -k 5 $TIMEOUT ${as_user[*]@Q} $2") \
        >"$1.out" 2>"$1.err" &
    JOB=$!
}

# Waits up to $3 s until nothing is left compared with snapshot $1 and processes $2; prints
# what is left.
leftovers() {
    local before=$1 procs=$2 t left
    for t in $(seq 0 $(($3 * 5))); do
        left=$( (comm -13 "$before" <(snapshot) | grep -v '^fuse-connection ' ; new_procs "$procs" |
            sed 's/^/process /') | sort -u)
        # A FUSE connection is counted only when it is still there after the grace (the kernel
        # frees it when the last reference to the superblock goes).
        if [ -z "$left" ] && [ -z "$(comm -13 "$before" <(snapshot) | grep '^fuse-connection ')" ]; then
            return
        fi
        sleep 0.2
    done
    (comm -13 "$before" <(snapshot); new_procs "$procs" | sed 's/^/process /') | sort -u
}

# --- faults ----------------------------------------------------------------------------------

declare -A N
bad=0
faults() {
    local launcher=$1 i victim kind delay log before procs cmd pid killed rc t0 el left
    local detail=$work/logs/faults-$launcher.txt
    for victim in "${VICTIMS[@]}"; do
        for k in injected late ended nonzero_msg nonzero_silent zero_done zero_bug hung left next_ok; do
            N[$victim.$k]=0
        done
    done
    local start=$SECONDS grace=$GRACE ran=0
    [ "$launcher" = srun ] && grace=$SRUN_GRACE
    for i in $(seq 1 "$ITERATIONS"); do
        if [ "$MAX_SECONDS" != 0 ] && [ $((SECONDS - start)) -ge "$MAX_SECONDS" ]; then break; fi
        ran=$i
        victim=${VICTIMS[RANDOM % ${#VICTIMS[@]}]}
        kind=single
        [ "$victim" = holder ] && kind=mpmd
        # Half the delays within the launch itself (EARLY ms: image mount, instance, ranks'
        # start, MPI_Init), half anywhere up to MAX_DELAY.
        if [ $((RANDOM % 2)) = 0 ]; then delay=$((RANDOM % (EARLY + 1))); else
            delay=$((RANDOM % (MAX_DELAY + 1)))
        fi
        log=$work/logs/$launcher-$i
        cmd=$(job_cmd "$launcher" "$kind")
        lock
        snapshot >"$log.before"
        user_procs >"$log.procs"
        t0=$(date +%s%N)
        start_job "$log" "$cmd"
        sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
        killed=
        while kill -0 "$JOB" 2>/dev/null; do
            pid=$(find_victim "$victim" "$JOB" "$launcher" "$log.procs")
            if [ -n "$pid" ]; then
                kill -KILL "$pid" 2>/dev/null && killed=$pid
                break
            fi
            sleep 0.02
        done
        rc=0
        wait "$JOB" 2>/dev/null || rc=$?
        el=$((($(date +%s%N) - t0) / 1000000))
        if [ -z "$killed" ]; then
            N[$victim.late]=$((N[$victim.late] + 1))
            echo "$i $victim delay=${delay}ms: too late (rc $rc, ${el} ms)" >>"$detail"
        else
            N[$victim.injected]=$((N[$victim.injected] + 1))
            local what
            if [ "$el" -ge $((TIMEOUT * 1000)) ]; then
                what=HUNG
                N[$victim.hung]=$((N[$victim.hung] + 1))
                kill_new "$log.procs"
                bad=$((bad + 1))
            else
                N[$victim.ended]=$((N[$victim.ended] + 1))
                if [ "$rc" != 0 ] && [ -s "$log.err" ]; then
                    what=nonzero-msg
                    N[$victim.nonzero_msg]=$((N[$victim.nonzero_msg] + 1))
                elif [ "$rc" != 0 ]; then
                    what=nonzero-silent
                    N[$victim.nonzero_silent]=$((N[$victim.nonzero_silent] + 1))
                elif work_done "$log.out" "$kind"; then
                    what=zero-work-done
                    N[$victim.zero_done]=$((N[$victim.zero_done] + 1))
                else
                    what=ZERO-CUT-SHORT
                    N[$victim.zero_bug]=$((N[$victim.zero_bug] + 1))
                    bad=$((bad + 1))
                fi
            fi
            echo "$i $victim delay=${delay}ms pid=$killed: $what rc=$rc ${el}ms stderr: $(tail -c 300 "$log.err" | tr '\n' '|')" >>"$detail"
        fi
        left=$(leftovers "$log.before" "$log.procs" "$grace")
        if [ -n "$left" ]; then
            N[$victim.left]=$((N[$victim.left] + 1))
            bad=$((bad + 1))
            echo "$i $victim: LEFT $(echo "$left" | tr '\n' '|')" >>"$detail"
            kill_new "$log.procs"
        fi
        # The next job of the same images, undisturbed.
        user_procs >"$log.procs2"
        start_job "$log.next" "$(job_cmd "$launcher" "$kind")"
        rc=0
        wait "$JOB" 2>/dev/null || rc=$?
        if [ "$rc" = 0 ]; then
            N[$victim.next_ok]=$((N[$victim.next_ok] + 1))
            rm -f "$log".*
        else
            bad=$((bad + 1))
            echo "$i $victim: NEXT JOB FAILED rc=$rc: $(tail -c 300 "$log.next.err" | tr '\n' '|')" >>"$detail"
            kill_new "$log.procs2"
        fi
        unlock
    done
    echo "faults, $launcher launcher: $ran iterations in $((SECONDS - start)) s (seed ${SEED:-$$})"
    printf '  %-9s %8s %8s %6s %11s %14s %9s %9s %5s %5s %7s\n' victim injected "too-late" ended \
        "nonzero+msg" "nonzero-silent" "0-done" "0-CUT" hung left next-ok
    for victim in "${VICTIMS[@]}"; do
        printf '  %-9s %8d %8d %6d %11d %14d %9d %9d %5d %5d %7d\n' "$victim" \
            "${N[$victim.injected]}" "${N[$victim.late]}" "${N[$victim.ended]}" \
            "${N[$victim.nonzero_msg]}" "${N[$victim.nonzero_silent]}" "${N[$victim.zero_done]}" \
            "${N[$victim.zero_bug]}" "${N[$victim.hung]}" "${N[$victim.left]}" "${N[$victim.next_ok]}"
    done
    grep -E 'HUNG|ZERO-CUT|LEFT|NEXT JOB|nonzero-silent' "$detail" | sed 's/^/  /' | head -60
}

# --- soak ------------------------------------------------------------------------------------

numbers() {
    printf 'mounts=%s fuse=%s shm=%s files=%s procs=%s cache=%s runtime=%s avail_kib=%s' \
        "$(wc -l </proc/self/mountinfo)" "$(ls /sys/fs/fuse/connections | wc -l)" \
        "$(ls -A /dev/shm | wc -l)" "$(cut -f1 /proc/sys/fs/file-nr)" \
        "$(pgrep -u "$TEST_USER" | wc -l)" "$(du -sb "$home/.cache" 2>/dev/null | cut -f1)" \
        "$(find "$work/run" -mindepth 1 | wc -l)" \
        "$(awk '/MemAvailable/ {print $2}' /proc/meminfo)"
}
soak() {
    local i rc ok=0 failed=0 start=$SECONDS first cmd
    cmd="./cmpirun -n 2 ./a.sif $SOAK_PROG"
    for i in $(seq 1 "$SOAK_JOBS"); do
        lock
        start_job "$work/logs/soak" "$cmd"
        rc=0
        wait "$JOB" 2>/dev/null || rc=$?
        unlock
        if [ "$rc" = 0 ]; then ok=$((ok + 1)); else
            failed=$((failed + 1))
            echo "  soak job $i: status $rc: $(tail -c 300 "$work/logs/soak.err" | tr '\n' '|')"
        fi
        [ "$i" = 1 ] && first=$(numbers) && echo "  after job 1:    $first"
        [ $((i % SOAK_EVERY)) = 0 ] && printf '  after job %-5d %s\n' "$i" "$(numbers)"
    done
    echo "soak: $SOAK_JOBS jobs ($cmd), $ok ok, $failed failed in $((SECONDS - start)) s"
    bad=$((bad + failed))
}

# --- concurrent first launches ---------------------------------------------------------------

concurrent() {
    local i rc ok=0 failed=0 pids=() start=$SECONDS left
    lock
    snapshot >"$work/logs/conc.before"
    user_procs >"$work/logs/conc.procs"
    rm -rf "$home/.cache/cmpirun/libraries"
    for i in $(seq 1 "$CONCURRENT"); do
        start_job "$work/logs/conc-$i" "./cmpirun -n 2 ./a.sif /usr/local/bin/mpitest"
        pids+=("$JOB")
    done
    for i in "${!pids[@]}"; do
        rc=0
        wait "${pids[$i]}" 2>/dev/null || rc=$?
        if [ "$rc" = 0 ]; then ok=$((ok + 1)); else
            failed=$((failed + 1))
            echo "  concurrent job $((i + 1)): status $rc: $(tail -c 300 "$work/logs/conc-$((i + 1)).err" | tr '\n' '|')"
        fi
    done
    left=$(leftovers "$work/logs/conc.before" "$work/logs/conc.procs" "$GRACE")
    unlock
    echo "concurrent first launches: $CONCURRENT started at once, $ok ok, $failed failed in $((SECONDS - start)) s; library cache entries: $(ls "$home/.cache/cmpirun/libraries" 2>/dev/null | grep -vc '\.lock$'), left: ${left:-nothing}"
    bad=$((bad + failed))
    [ -n "$left" ] && bad=$((bad + 1))
}

for part in $PARTS; do
    case $part in
        faults) for launcher in $LAUNCHERS; do faults "$launcher"; done ;;
        soak) soak ;;
        concurrent) concurrent ;;
        *) echo "stress-faults.sh: unknown part $part" >&2; exit 2 ;;
    esac
done
echo "problems: $bad"
[ "$bad" = 0 ]
