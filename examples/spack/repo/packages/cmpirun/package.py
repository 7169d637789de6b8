# Spack package recipe for cmpirun (docs/install.md). Add the repository and install:
#
#   spack repo add /path/to/cmpirun/examples/spack/repo
#   spack develop --path /path/to/cmpirun cmpirun@main   # in an environment: build this clone
#   spack install cmpirun
#
# It builds the binary with cargo and runs the project's install.sh, so the installed prefix is
# the one `./install.sh PREFIX` makes: bin/cmpirun and share/cmpirun/profiles (the shipped site
# profiles, found relative to the binary). Site profiles go in /etc/cmpirun/profiles.d.

import os

from spack.package import *


class Cmpirun(Package):
    """Launch MPI jobs in unprivileged containers made from Apptainer/Singularity SIF images,
    one user-namespace container per node, with the host's PMI and libfabric injected."""

    # Where the site keeps cmpirun's repository; `spack develop --path` needs none of it.
    homepage = "file:///opt/src/cmpirun"
    git = "file:///opt/src/cmpirun"

    license("MIT OR Apache-2.0")

    version("main", branch="main")

    variant(
        "build_type",
        default="release",
        values=("release", "debug"),
        description="Cargo profile to build with",
    )
    variant(
        "squashfuse",
        default=False,
        description="Also install squashfuse, for --image-mount squashfuse",
    )

    depends_on("c", type="build")  # the zstd crate compiles zstd's C sources
    depends_on("rust@1.90:", type="build")  # edition 2024, the workspace's rust-version
    depends_on("squashfuse", type="run", when="+squashfuse")

    def install(self, spec, prefix):
        build_type = spec.variants["build_type"].value
        args = ["build", "--locked", "--bin", "cmpirun"]
        if build_type == "release":
            args.append("--release")
        with working_dir(self.stage.source_path):
            which("cargo")(*args)
            target = os.environ.get("CARGO_TARGET_DIR") or join_path(
                self.stage.source_path, "target"
            )
            binary = join_path(target, build_type, "cmpirun")
            install_sh = Executable(join_path(self.stage.source_path, "install.sh"))
            install_sh("--binary", binary, prefix)

    def test_version(self):
        """cmpirun --version runs and names the package version's program"""
        out = Executable(join_path(self.prefix.bin, "cmpirun"))("--version", output=str.split)
        assert "cmpirun" in out
