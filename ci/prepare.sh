#!/usr/bin/env bash
# Everything the demo and the tests need, from a fresh clone on a fresh Debian 12 machine, as root:
# system packages, the unprivileged test user, the MPICH wheel, the cmpirun binary, the test images.
# Each step is idempotent and fast when there is nothing to do.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "== $*" >&2; }

step "system packages";  ci/install-packages.sh
step "test user";        ci/setup-test-user.sh
step "wheels";           ci/fetch-wheels.sh
step "cargo build";      cargo build --locked --bin cmpirun
step "test images";      ci/build-images.sh
