#!/usr/bin/env bash
# Create the unprivileged test user and check that it can do what cmpirun needs:
# unprivileged user namespaces and FUSE. Idempotent; run as root.
#
#   TEST_USER (default tuser), TEST_UID (default 1001)
set -euo pipefail

TEST_USER=${TEST_USER:-tuser}
TEST_UID=${TEST_UID:-1001}

if [ "$(id -u)" != 0 ]; then
    echo "setup-test-user.sh: must run as root" >&2
    exit 1
fi

if ! id "$TEST_USER" >/dev/null 2>&1; then
    useradd --uid "$TEST_UID" --user-group --create-home --shell /bin/bash "$TEST_USER"
    echo "setup-test-user.sh: created $TEST_USER (uid $TEST_UID)"
fi
home=$(getent passwd "$TEST_USER" | cut -d: -f6)
if [ ! -d "$home" ]; then
    mkdir -p "$home"
    chown "$TEST_USER:" "$home"
fi
chmod 0755 "$home"

# Unprivileged FUSE needs /dev/fuse readable and writable by everyone, as udev sets it on a normal
# Debian host; this VM image ships it 0600. It stays 0666 afterwards, like a real cluster node.
if [ -e /dev/fuse ]; then
    chmod 0666 /dev/fuse
else
    echo "setup-test-user.sh: warning: /dev/fuse does not exist; FUSE mounts will fall back to extraction" >&2
fi

as_user=(setpriv --reuid="$TEST_USER" --regid="$TEST_USER" --init-groups --inh-caps=-all --bounding-set=-all)

if ! "${as_user[@]}" unshare -Urm true; then
    echo "setup-test-user.sh: $TEST_USER cannot create a user namespace (unshare -Urm)." >&2
    echo "  check: sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone, AppArmor userns restrictions" >&2
    exit 1
fi
if [ -e /dev/fuse ] && ! "${as_user[@]}" test -r /dev/fuse -a -w /dev/fuse; then
    echo "setup-test-user.sh: $TEST_USER cannot open /dev/fuse" >&2
    exit 1
fi
echo "setup-test-user.sh: $TEST_USER (uid $(id -u "$TEST_USER")) can create user namespaces and open /dev/fuse"
