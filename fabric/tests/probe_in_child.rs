//! `HostFabric::probe_in_child` from a single-threaded process (this test has no libtest
//! harness): the answers arrive, and libfabric never gets loaded into this process.

mod common;

use std::time::Duration;

use cmpirun_fabric::host::HostFabric;
use cmpirun_fabric::libfabric::ApiVersion;
use cmpirun_fabric::loader::HostLoader;
use cmpirun_fabric::maps::mapped_files;

fn main() {
    let loader = HostLoader::from_env();
    for (core, version) in [
        (
            std::path::PathBuf::from("/usr/lib/x86_64-linux-gnu/libfabric.so.1"),
            ApiVersion {
                major: 1,
                minor: 17,
            },
        ),
        (
            common::mpich_wheel_lib().join("mpich/libfabric.so.1"),
            ApiVersion { major: 2, minor: 5 },
        ),
    ] {
        let mut host = HostFabric::inspect(&core, &loader).unwrap();
        host.probe_in_child(Duration::from_secs(60)).unwrap();
        assert_eq!(host.api_version, Some(version));
        assert_eq!(host.has_provider("tcp"), Some(true), "{}", core.display());
    }
    let maps = mapped_files(std::process::id() as i32).unwrap();
    assert!(
        !maps.iter().any(|m| m.path.contains("libfabric")),
        "libfabric was loaded into the parent"
    );

    // A child that cannot load the library reports why.
    let mut bogus = HostFabric::inspect(
        &common::mpich_wheel_lib().join("mpich/libfabric.so.1"),
        &loader,
    )
    .unwrap();
    bogus.path = "/nonexistent/libfabric.so.1".into();
    let err = bogus.probe_in_child(Duration::from_secs(60)).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/libfabric.so.1"),
        "{err}"
    );

    // From a multi-threaded process it refuses instead of forking.
    let _thread = std::thread::spawn(|| std::thread::sleep(Duration::from_secs(5)));
    let mut host = HostFabric::inspect(
        std::path::Path::new("/usr/lib/x86_64-linux-gnu/libfabric.so.1"),
        &loader,
    )
    .unwrap();
    let err = host.probe_in_child(Duration::from_secs(60)).unwrap_err();
    assert!(err.to_string().contains("threads"), "{err}");
    println!("probe_in_child: ok");
}
