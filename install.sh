#!/bin/sh
# Installs cmpirun into a prefix: PREFIX/bin/cmpirun and the shipped site profiles in
# PREFIX/share/cmpirun/profiles (where cmpirun looks for them, relative to its own executable),
# plus the documentation in PREFIX/share/doc/cmpirun. Site profiles belong in
# /etc/cmpirun/profiles.d, which this never touches (see docs/install.md).
#
#   ./install.sh /opt/cmpirun                         # cargo build --release, then install
#   ./install.sh --binary target/release/cmpirun /usr/local
#   DESTDIR=/tmp/stage ./install.sh /usr              # staged install, for packages
set -eu

usage() {
    echo "usage: $0 [--binary FILE] PREFIX" >&2
    echo "  --binary FILE  install this built cmpirun instead of running cargo build --release" >&2
    exit 2
}

binary=
while [ $# -gt 0 ]; do
    case "$1" in
        --binary)
            [ $# -ge 2 ] || usage
            binary=$2
            shift 2
            ;;
        --binary=*)
            binary=${1#--binary=}
            shift
            ;;
        -h | --help) usage ;;
        -*)
            echo "$0: unknown option $1" >&2
            usage
            ;;
        *) break ;;
    esac
done
[ $# -eq 1 ] || usage
prefix=$1
case "$prefix" in
    /*) ;;
    *) echo "$0: PREFIX must be an absolute path (cmpirun finds its profiles from it): $prefix" >&2; exit 2 ;;
esac

src=$(cd "$(dirname "$0")" && pwd)
if [ -z "$binary" ]; then
    (cd "$src" && cargo build --release --locked --bin cmpirun)
    binary=${CARGO_TARGET_DIR:-$src/target}/release/cmpirun
fi
if [ ! -x "$binary" ]; then
    echo "$0: $binary: not an executable file (build cmpirun first, or drop --binary)" >&2
    exit 2
fi

root=${DESTDIR:-}$prefix
bin=$root/bin
profiles=$root/share/cmpirun/profiles
doc=$root/share/doc/cmpirun
mkdir -p "$bin" "$profiles" "$doc/docs"
install -m 0755 "$binary" "$bin/cmpirun"
# The shipped profiles are the package's own: ones it no longer ships go too.
rm -f "$profiles"/*.yaml
install -m 0644 "$src"/profiles/*.yaml "$profiles/"
install -m 0644 "$src/README.md" "$doc/"
install -m 0644 "$src"/docs/*.md "$doc/docs/"
echo "installed $bin/cmpirun and $(ls "$profiles" | wc -l) profiles in $profiles"
echo "site profiles go in /etc/cmpirun/profiles.d; check a node with: $prefix/bin/cmpirun doctor"
