#!/usr/bin/env bash
# Build everything (ci/prepare.sh), then show the demo: cmpirun's view of the MPICH test image.
set -euo pipefail
cd "$(dirname "$0")/.."

ci/prepare.sh >&2
image=.cache/images/mpich4.sif
[ -f "$image" ] || image=.cache/images/mpich4.sqfs
echo "== cmpirun image inspect $image" >&2
exec cargo run --quiet --locked --bin cmpirun -- image inspect "$image"
