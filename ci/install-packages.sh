#!/usr/bin/env bash
# Install every Debian package the build, the test images and the tests need. Idempotent: when all
# packages are installed and the package lists exist it does nothing (the lists are also what
# ci/build-images.sh downloads image packages from). Run as root.
set -euo pipefail

PACKAGES=(
    # build
    gcc make pkg-config ca-certificates python3
    # CPU topology for --bind-to (hwloc, through the hwlocality crate; udev for its static link line)
    libhwloc-dev libudev-dev
    # MPI stacks, native and as the source of the test images
    mpich libmpich-dev openmpi-bin libopenmpi-dev libfabric-bin libfabric-dev hwloc
    # PMI libraries of the host (Slurm's PMI-2, PMIx)
    libpmix-dev libpmi2-0-dev
    # images and mounts
    squashfs-tools squashfuse fuse3
    # the test user and its namespaces (setpriv, unshare, nsenter), process listing
    util-linux procps passwd
    # Slurm single-node cluster for the launch tests
    slurm-wlm slurmctld slurmd slurm-client munge
    # the three-node test cluster: namespaces and a bridge, an sshd per node for hydra
    iproute2 openssh-server openssh-client
    # baseline for the container start-up benchmark
    bubblewrap
    # an OCI registry (v2) the oras:// pull tests start on a free port
    docker-registry
)

if [ "$(id -u)" != 0 ]; then
    echo "install-packages.sh: must run as root" >&2
    exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

# The image builder resolves and downloads packages from the lists, so they must exist even when
# nothing is missing on the host.
have_lists=false
if compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    have_lists=true
fi

if [ ${#missing[@]} -eq 0 ] && $have_lists; then
    echo "install-packages.sh: all ${#PACKAGES[@]} packages already installed"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-packages.sh: installing ${missing[*]}"
    # No service may start on installation (openssh-server's sshd): the test cluster starts its
    # own, one per node.
    policy=/usr/sbin/policy-rc.d
    made_policy=false
    if [ ! -e $policy ]; then
        printf '#!/bin/sh\nexit 101\n' >$policy
        chmod 0755 $policy
        made_policy=true
    fi
    apt-get install -y -q "${missing[@]}"
    if $made_policy; then rm -f $policy; fi
fi

# pip3 fetches the MPICH 5 wheel (ci/fetch-wheels.sh); a machine without a Python installation of
# its own gets Debian's.
if ! command -v pip3 >/dev/null 2>&1; then
    apt-get install -y -q --no-install-recommends python3-pip
fi
echo "install-packages.sh: done"
