#!/usr/bin/env bash
# Read throughput of every file of an image through each image mount backend: the built-in FUSE
# server (fuse), squashfuse_ll on a pre-mounted fd (squashfuse), and the extracted tree bound
# read-only (extract). Each run mounts the image as the test user inside a fresh user namespace
# (`cmpirun __mount-check`) and reads every file in one thread:
#
#   cold   page cache dropped first (image file and, for extract, the extracted tree)
#   image  fresh mount, image file already in the page cache (decompression + FUSE cost)
#   warm   second pass over the same mount (kernel page cache of the mount)
#
# Runs are interleaved (squashfuse fuse extract, squashfuse fuse extract, …); medians are printed
# with ratios to squashfuse_ll. A benchmark, not a test: it asserts nothing.
#
# Usage (as root): ci/bench-mount.sh [IMAGE]     env: RUNS (default 5), TEST_USER (default tuser)
# IMAGE (SIF or squashfs) defaults to the largest test image in .cache/images, else a squashfs of
# /usr/share.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "bench-mount.sh: run as root (it drops the page cache and runs the mounts as \$TEST_USER)" >&2
    exit 1
fi
RUNS=${RUNS:-5}
TEST_USER=${TEST_USER:-tuser}
target_dir=${CARGO_TARGET_DIR:-target}

cargo build --release --quiet
work=$(mktemp -d /var/tmp/cmpirun-bench-mount-XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"
install -m 0755 "$target_dir/release/cmpirun" "$work/cmpirun"

image=${1:-}
if [ -z "$image" ]; then
    image=$(ls -S .cache/images/*.sif .cache/images/*.sqfs 2>/dev/null | head -n 1 || true)
fi
if [ -z "$image" ]; then
    echo "bench-mount.sh: no test image in .cache/images; using a squashfs of /usr/share" >&2
    mksquashfs /usr/share "$work/usr-share.sqfs" -comp gzip -quiet -no-progress >/dev/null
    image="$work/usr-share.sqfs"
fi
cp "$image" "$work/image"
chmod 0644 "$work/image"
for d in mnt cache; do
    mkdir -p "$work/$d"
    chown "$TEST_USER:" "$work/$d"
done

as_user=(setpriv --reuid="$TEST_USER" --regid="$TEST_USER" --init-groups --inh-caps=-all --bounding-set=-all)
check() { # backend passes
    "${as_user[@]}" "$work/cmpirun" __mount-check "$work/image" "$1" --target "$work/mnt" \
        --extract-cache "$work/cache" --passes "$2"
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

echo "image: $image ($(du -h "$work/image" | cut -f1)), $RUNS interleaved runs"
# The extraction happens once per node; do it before timing reads, and report its time.
drop_caches
check extract 1 >"$work/out"
head -n 1 "$work/out" >"$work/extract-first.json"

results="$work/results.tsv"
for run in $(seq "$RUNS"); do
    for backend in squashfuse fuse extract; do
        drop_caches
        check "$backend" 2 >"$work/out"
        sed -n 2p "$work/out" | sed "s/^/$backend\tcold\t/" >>"$results"
        sed -n 3p "$work/out" | sed "s/^/$backend\twarm\t/" >>"$results"
        head -n 1 "$work/out" | sed "s/^/$backend\tmount\t/" >>"$results"
        check "$backend" 1 >"$work/out"
        sed -n 2p "$work/out" | sed "s/^/$backend\timage\t/" >>"$results"
    done
    echo "run $run/$RUNS done" >&2
done

python3 - "$results" "$work/extract-first.json" <<'EOF'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    backend, kind, js = line.rstrip("\n").split("\t", 2)
    rows.setdefault((backend, kind), []).append(json.loads(js))
first = json.load(open(sys.argv[2]))
def med(backend, kind, key):
    return statistics.median(r[key] for r in rows[(backend, kind)])
backends = ["squashfuse", "fuse", "extract"]
kinds = ("cold", "image", "warm")
def rate(b, k):  # MiB/s, each backend over the bytes it read (private files differ)
    return statistics.median(r["bytes"] / r["seconds"] for r in rows[(b, k)]) / 2**20
print(f"medians of {len(rows[('fuse', 'cold')])} runs; one thread reads every file it may")
print(f"{'':10} {'files':>7} {'MiB':>8} {'cold MiB/s':>11} {'image MiB/s':>12} {'warm MiB/s':>11} {'mount ms':>9}")
for b in backends:
    files = int(med(b, "cold", "files"))
    mib = med(b, "cold", "bytes") / 2**20
    cells = [rate(b, k) for k in kinds]
    mount_ms = 1000 * med(b, "mount", "mount_seconds")
    print(f"{b:10} {files:7} {mib:8.1f} {cells[0]:11.1f} {cells[1]:12.1f} {cells[2]:11.1f} {mount_ms:9.1f}")
print("throughput ratio to squashfuse_ll (>1 is faster):")
for b in ["fuse", "extract"]:
    cells = [rate(b, k) / rate("squashfuse", k) for k in kinds]
    print(f"{b:10} {'':16} {cells[0]:11.2f} {cells[1]:12.2f} {cells[2]:11.2f}")
print(f"one-time extraction (cold): {first['mount_seconds']:.2f} s")
EOF
