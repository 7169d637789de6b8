#![allow(dead_code)]
//! Where the tests find the PyPI wheels: fetched by `ci/fetch-wheels.sh` as CI does.

use std::path::PathBuf;
use std::process::Command;

/// The `lib` folder of the unpacked mpich 5.0.2 wheel.
pub fn mpich_wheel_lib() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let lib = root.join(".cache/wheels/mpich-5.0.2/mpich-5.0.2.data/data/lib");
    if !lib.is_dir() {
        let status = Command::new(root.join("ci/fetch-wheels.sh"))
            .status()
            .unwrap();
        assert!(status.success(), "ci/fetch-wheels.sh failed");
    }
    lib
}
