#!/usr/bin/env bash
# Build everything (ci/prepare.sh), then run the demo job: `cmpirun -n 4` on the MPICH test image
# with the MPI test program (hello from every rank with its user and namespaces, a token ring, a
# checked allreduce), as the unprivileged user tuser when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

ci/prepare.sh >&2
cargo build --quiet --locked --bin cmpirun >&2
bin=${CARGO_TARGET_DIR:-target}/debug/cmpirun
image=.cache/images/mpich4.sif
[ -f "$image" ] || image=.cache/images/mpich4.sqfs
job=(-n 4 "$image" /usr/local/bin/mpitest)

if [ "$(id -u)" = 0 ] && id tuser >/dev/null 2>&1; then
    # The build and the image may sit where tuser cannot read them (a clone under /root): run
    # copies from a folder of its own, removed afterwards.
    stage=$(mktemp -d /var/tmp/cmpirun-demo.XXXXXX)
    trap 'rm -rf "$stage"' EXIT
    chmod 755 "$stage"
    # Laid out as an install: bin/cmpirun beside share/cmpirun/profiles, where cmpirun looks for
    # the shipped site profiles (the clone's profiles/ may be unreadable for tuser too).
    mkdir -p "$stage/bin" "$stage/share/cmpirun"
    cp "$bin" "$stage/bin/cmpirun"
    cp -r profiles "$stage/share/cmpirun/profiles"
    ln "$image" "$stage/" 2>/dev/null || cp "$image" "$stage/"
    chmod -R a+rX "$stage"
    job=(-n 4 "$stage/$(basename "$image")" /usr/local/bin/mpitest)
    echo "== (as tuser) cmpirun ${job[*]}" >&2
    cd "$stage"
    setpriv --reuid=tuser --regid=tuser --init-groups --inh-caps=-all --bounding-set=-all -- \
        env -i PATH=/usr/bin:/bin HOME="$(getent passwd tuser | cut -d: -f6)" USER=tuser \
        "$stage/bin/cmpirun" "${job[@]}"
else
    echo "== cmpirun ${job[*]}" >&2
    exec "$bin" "${job[@]}"
fi
