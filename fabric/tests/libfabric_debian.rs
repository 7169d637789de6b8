//! Debian's libfabric 1.17 loaded for real (its own process: one libfabric per test binary, as two
//! copies with the same soname in one process would share provider state).

use std::path::Path;

use cmpirun_fabric::closure::dependency_closure;
use cmpirun_fabric::libfabric::{ApiVersion, HostLibfabric, provider_plugins};
use cmpirun_fabric::loader::{HostLoader, Via, is_glibc_library};

const CORE: &str = "/usr/lib/x86_64-linux-gnu/libfabric.so.1";

#[test]
fn version_and_providers() {
    let fabric = HostLibfabric::load(Path::new(CORE)).unwrap();
    assert_eq!(
        fabric.version(),
        ApiVersion {
            major: 1,
            minor: 17
        }
    );
    let providers = fabric.providers().unwrap();
    let names: Vec<&str> = providers.iter().flat_map(|p| p.parts()).collect();
    for expected in ["tcp", "udp", "shm", "sockets"] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let tcp = providers.iter().find(|p| p.name == "tcp").unwrap();
    assert_eq!(
        tcp.version,
        ApiVersion {
            major: 117,
            minor: 0
        }
    );
    assert!(!tcp.fabrics.is_empty());
}

#[test]
fn no_plugin_directory_in_debian() {
    // Debian builds every provider into the core library.
    assert!(provider_plugins(Path::new(CORE)).unwrap().is_empty());
}

#[test]
fn closure_leaves_glibc_behind() {
    let loader = HostLoader::from_env();
    let closure = dependency_closure(&[CORE.into()], &loader).unwrap();
    assert_eq!(closure.libraries[0].path, Path::new(CORE));
    assert_eq!(
        closure.libraries[0].soname.as_deref(),
        Some("libfabric.so.1")
    );
    assert!(closure.missing.is_empty(), "{:?}", closure.missing);
    assert!(closure.libraries.iter().all(|l| !is_glibc_library(&l.name)));
    assert!(closure.glibc_libraries.contains("libc.so.6"));
    // Debian's libfabric pulls in rdma-core and libnl for verbs/efa.
    let names: Vec<&str> = closure.libraries.iter().map(|l| l.name.as_str()).collect();
    assert!(names.contains(&"libibverbs.so.1"), "{names:?}");
    assert!(names.contains(&"libnl-3.so.200"), "{names:?}");
    let ibverbs = closure
        .libraries
        .iter()
        .find(|l| l.name == "libibverbs.so.1")
        .unwrap();
    assert_ne!(ibverbs.via, Via::Scan);
    assert_eq!(ibverbs.needed_by.as_deref(), Some(Path::new(CORE)));
    let (lib, newest) = closure.newest_glibc_need().unwrap();
    assert_eq!(Some(newest), closure.glibc_needs.as_ref());
    assert!(
        newest.numbers[0] == 2 && newest.numbers[1] <= 36,
        "{} {newest}",
        lib.path.display()
    );
}

#[test]
fn host_fabric_refuses_what_is_not_libfabric() {
    use cmpirun_fabric::host::{HostFabric, HostFabricError};
    let err = HostFabric::inspect(
        Path::new("/lib/x86_64-linux-gnu/libz.so.1"),
        &HostLoader::from_env(),
    )
    .unwrap_err();
    assert!(matches!(err, HostFabricError::NotLibfabric { .. }));
    assert!(
        err.to_string()
            .starts_with("/lib/x86_64-linux-gnu/libz.so.1: not a libfabric"),
        "{err}"
    );
}
