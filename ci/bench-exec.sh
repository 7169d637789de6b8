#!/usr/bin/env bash
# Start-up cost of one container: `cmpirun exec IMAGE /bin/true` with each image mount backend,
# next to two baselines measured in the same run:
#
#   bwrap      bubblewrap over an unpacked copy of the image (no image mount at all)
#   shell      a per-call wrapper: unshare -Urm, squashfuse_ll -f at the image offset, rbind
#              /proc /sys /dev, chroot, /bin/true, kill the server (what a script does by hand)
#
# Everything runs as the unprivileged test user. Runs are interleaved (one call of each method per
# round), medians are printed with ratios to bwrap. A benchmark, not a test: it asserts nothing.
#
# Usage (as root): ci/bench-exec.sh [IMAGE]     env: RUNS (default 30), TEST_USER (default tuser)
# IMAGE defaults to .cache/images/mpich4.sif (or .sqfs).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "bench-exec.sh: run as root (it runs every method as \$TEST_USER)" >&2
    exit 1
fi
RUNS=${RUNS:-30}
TEST_USER=${TEST_USER:-tuser}
target_dir=${CARGO_TARGET_DIR:-target}

cargo build --release --quiet
work=$(mktemp -d /var/tmp/cmpirun-bench-exec-XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"
install -m 0755 "$target_dir/release/cmpirun" "$work/cmpirun"

image=${1:-}
if [ -z "$image" ]; then
    image=$(ls .cache/images/mpich4.sif .cache/images/mpich4.sqfs 2>/dev/null | head -n 1 || true)
fi
if [ -z "$image" ] || [ ! -f "$image" ]; then
    echo "bench-exec.sh: no image; build the test images with ci/build-images.sh or name one" >&2
    exit 2
fi
install -m 0644 "$image" "$work/image"
offset=$("$work/cmpirun" image inspect --json "$work/image" | jq -r '.root_filesystem.offset // 0')
mkdir "$work/rootfs" "$work/cache"
unsquashfs -q -n -f -d "$work/rootfs" -o "$offset" "$work/image" >/dev/null
chown -R "$TEST_USER:" "$work/cache" "$work/rootfs"
uid=$(id -u "$TEST_USER")
gid=$(id -g "$TEST_USER")

as_user=(setpriv --reuid="$TEST_USER" --regid="$TEST_USER" --init-groups --inh-caps=-all --bounding-set=-all
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$work" XDG_CACHE_HOME="$work/cache" CMPIRUN_LOG=error)

run_method() {
    case $1 in
    fuse | squashfuse | extract)
        "${as_user[@]}" "$work/cmpirun" exec --image-mount "$1" "$work/image" /bin/true ;;
    bwrap)
        "${as_user[@]}" bwrap --unshare-user --uid "$uid" --gid "$gid" --ro-bind "$work/rootfs" / \
            --proc /proc --dev /dev --ro-bind /sys /sys --bind /tmp /tmp /bin/true ;;
    shell)
        "${as_user[@]}" unshare -Urm sh -c '
            mount -t tmpfs tmpfs /mnt && mkdir /mnt/r
            squashfuse_ll -f -o offset="$2" "$1" /mnt/r & server=$!
            while ! mountpoint -q /mnt/r; do sleep 0.002; done
            for d in proc sys dev; do mount --rbind /$d /mnt/r/$d; done
            chroot /mnt/r /bin/true; rc=$?
            kill -9 $server; exit $rc' sh "$work/image" "$offset" ;;
    esac
}

methods=(bwrap shell fuse squashfuse extract)
# Warm-up: the page cache, and the one-time extraction of the extract backend.
for m in "${methods[@]}"; do run_method "$m" >/dev/null; done

results="$work/results.tsv"
for run in $(seq "$RUNS"); do
    for m in "${methods[@]}"; do
        t0=$EPOCHREALTIME
        run_method "$m" >/dev/null
        t1=$EPOCHREALTIME
        echo -e "$m\t$t0\t$t1" >>"$results"
    done
done

echo "image: $image ($(du -h "$work/image" | cut -f1)), $RUNS interleaved runs, median ms per call"
python3 - "$results" "${methods[@]}" <<'EOF'
import statistics, sys
times = {}
for line in open(sys.argv[1]):
    m, t0, t1 = line.split("\t")
    times.setdefault(m, []).append((float(t1) - float(t0)) * 1000)
base = statistics.median(times["bwrap"])
print(f"{'method':<28}{'median ms':>10}{'vs bwrap':>10}")
labels = {
    "bwrap": "bwrap (unpacked copy)",
    "shell": "unshare+squashfuse+chroot",
    "fuse": "cmpirun exec (fuse)",
    "squashfuse": "cmpirun exec (squashfuse)",
    "extract": "cmpirun exec (extract)",
}
for m in sys.argv[2:]:
    med = statistics.median(times[m])
    print(f"{labels[m]:<28}{med:>10.1f}{med / base:>9.2f}x")
EOF
