//! The PyPI mpich wheel's libfabric 2.5.1 loaded from its path, with its plugin providers.

mod common;

use cmpirun_fabric::closure::dependency_closure;
use cmpirun_fabric::libfabric::{ApiVersion, HostLibfabric, provider_plugins};
use cmpirun_fabric::loader::{HostLoader, Via};

#[test]
fn version_and_providers() {
    let core = common::mpich_wheel_lib().join("mpich/libfabric.so.1");
    let fabric = HostLibfabric::load(&core).unwrap();
    assert_eq!(fabric.version(), ApiVersion { major: 2, minor: 5 });
    assert_eq!(fabric.path(), core);
    let providers = fabric.providers().unwrap();
    let names: Vec<&str> = providers.iter().flat_map(|p| p.parts()).collect();
    for expected in ["tcp", "shm"] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[test]
fn plugins_through_runpath_origin() {
    let lib = common::mpich_wheel_lib();
    let core = lib.join("mpich/libfabric.so.1");
    let plugins = provider_plugins(&core).unwrap();
    let names: Vec<&str> = plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["efa", "psmx2", "verbs"]);
    assert!(
        plugins
            .iter()
            .all(|p| p.path.parent() == Some(lib.join("mpich/libfabric").as_path()))
    );
}

#[test]
fn closure_of_core_and_plugins() {
    let lib = common::mpich_wheel_lib();
    let core = lib.join("mpich/libfabric.so.1");
    let mut roots = vec![core.clone()];
    roots.extend(provider_plugins(&core).unwrap().into_iter().map(|p| p.path));
    let closure = dependency_closure(&roots, &HostLoader::from_env()).unwrap();
    assert_eq!(closure.libraries[0].path, core);
    assert_eq!(
        closure
            .libraries
            .iter()
            .filter(|l| l.via == Via::Scan)
            .count(),
        4
    );
    // manylinux_2_28: the wheel's own files load with glibc 2.28; the verbs and efa plugins
    // also pull in this host's rdma-core, which is built for the host's newer glibc.
    for l in closure
        .libraries
        .iter()
        .filter(|l| l.path.starts_with(&lib))
    {
        let needs = l.glibc_needs.clone().unwrap();
        assert!(
            needs.numbers <= vec![2, 28],
            "{}: {needs}",
            l.path.display()
        );
    }
    let verbs = closure
        .libraries
        .iter()
        .find(|l| l.name == "libibverbs.so.1")
        .unwrap();
    assert!(!verbs.path.starts_with(&lib));
    assert!(
        verbs
            .needed_by
            .as_ref()
            .unwrap()
            .starts_with(lib.join("mpich/libfabric"))
    );
    assert!(closure.glibc_needs >= verbs.glibc_needs);
}

#[test]
fn host_fabric_facts_round_trip() {
    use cmpirun_fabric::host::HostFabric;
    let lib = common::mpich_wheel_lib();
    let core = lib.join("mpich/libfabric.so.1");
    let mut host = HostFabric::inspect(&core, &HostLoader::from_env()).unwrap();
    assert_eq!(host.fabric_versions.len(), 10);
    assert_eq!(host.plugin_dirs, [lib.join("mpich/libfabric")]);
    assert_eq!(host.has_provider("tcp"), None);
    host.probe().unwrap();
    assert_eq!(host.api_version, Some(ApiVersion { major: 2, minor: 5 }));
    assert_eq!(host.has_provider("tcp"), Some(true));
    let names = host.provider_names();
    assert!(
        names.iter().any(|n| n == "tcp") && names.iter().any(|n| n == "shm"),
        "{names:?}"
    );
    let json = serde_json::to_string(&host).unwrap();
    let back: HostFabric = serde_json::from_str(&json).unwrap();
    assert_eq!(back, host);
}

#[test]
fn loaded_library_shows_in_this_process_maps() {
    use cmpirun_fabric::maps::{mapped_files, same_file};
    let core = common::mpich_wheel_lib().join("mpich/libfabric.so.1");
    let _fabric = HostLibfabric::load(&core).unwrap();
    let meta = std::fs::metadata(&core).unwrap();
    let maps = mapped_files(std::process::id() as i32).unwrap();
    assert!(
        maps.iter().any(|m| same_file(m, &meta)),
        "{} not mapped",
        core.display()
    );
}
