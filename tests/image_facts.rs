//! Image facts of the three test images (built by `ci/build-images.sh`), read through squashfs
//! without mounting anything.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use cmpirun::image::content::{ImageFacts, LibfabricLink, MpiFamily, Via, image_facts};
use cmpirun::image::{locate, open_rootfs};
use cmpirun_fabric::elf::SymbolVersion;

/// The facts of test image `name`, read once per test process.
fn facts_of(name: &str) -> ImageFacts {
    static CACHE: Mutex<BTreeMap<String, ImageFacts>> = Mutex::new(BTreeMap::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .entry(name.to_owned())
        .or_insert_with(|| {
            let location = locate(&common::image(name)).unwrap();
            let fs = open_rootfs(&location).unwrap();
            image_facts(fs.as_ref()).unwrap()
        })
        .clone()
}

fn versions(names: &[&str]) -> BTreeSet<SymbolVersion> {
    names
        .iter()
        .map(|n| SymbolVersion::parse(n).unwrap())
        .collect()
}

fn version(name: &str) -> SymbolVersion {
    SymbolVersion::parse(name).unwrap()
}

/// Every test image is a Debian 12 root.
fn assert_debian_12(facts: &ImageFacts) {
    let glibc = facts.glibc.as_ref().expect("no libc.so.6 found");
    assert_eq!(glibc.version, Some(version("GLIBC_2.36")));
    assert!(facts.notes.is_empty(), "{:?}", facts.notes);
    assert!(facts.runscript.is_some());
}

#[test]
fn mpich4_is_mpich_abi_without_libfabric() {
    let facts = facts_of("mpich4");
    assert_debian_12(&facts);
    let mpi = facts.mpi.as_ref().unwrap();
    assert_eq!(mpi.family, MpiFamily::MpichAbi);
    assert_eq!(mpi.soname.as_deref(), Some("libmpich.so.12"));
    // ch4:ucx: UCX, not libfabric.
    assert_eq!(mpi.libfabric, LibfabricLink::NotLinked);
    assert_eq!(facts.libfabric_target(), None);
    assert!(mpi.needed.iter().any(|n| n == "libucp.so.0"));
    assert!(mpi.fabric_needs.is_empty());
    // Simple PMI-1 is built into libmpich.
    assert!(mpi.pmi_libraries.is_empty());
    assert!(mpi.unresolved.is_empty(), "{:?}", mpi.unresolved);
    assert!(mpi.glibc_needs.clone().unwrap() <= version("GLIBC_2.36"));
}

#[test]
fn mpich5_finds_its_own_libfabric_by_runpath() {
    let facts = facts_of("mpich5");
    assert_debian_12(&facts);
    let mpi = facts.mpi.as_ref().unwrap();
    assert_eq!(mpi.family, MpiFamily::MpichAbi);
    assert_eq!(mpi.path, "/opt/mpich5/lib/libmpi.so.12");
    assert_eq!(mpi.runpath, ["$ORIGIN", "$ORIGIN/mpich"]);
    let LibfabricLink::Dynamic(fabric) = &mpi.libfabric else {
        panic!("libfabric: {:?}", mpi.libfabric);
    };
    assert_eq!(fabric.path, "/opt/mpich5/lib/mpich/libfabric.so.1");
    assert_eq!(fabric.via, Via::Runpath);
    assert_eq!(
        fabric.needed_by.as_deref(),
        Some("/opt/mpich5/lib/libmpi.so.12")
    );
    assert_eq!(
        mpi.fabric_needs,
        versions(&["FABRIC_1.0", "FABRIC_1.1", "FABRIC_1.9"])
    );
    // A manylinux_2_28 wheel.
    assert!(mpi.glibc_needs.clone().unwrap() <= version("GLIBC_2.28"));
    assert!(mpi.pmi_libraries.is_empty());
    assert_eq!(
        facts.other_mpi_libraries,
        ["/opt/mpich5/lib/libmpi_abi.so.1"]
    );
}

#[test]
fn openmpi4_reaches_debian_libfabric_through_mtl_ofi() {
    let facts = facts_of("openmpi4");
    assert_debian_12(&facts);
    let mpi = facts.mpi.as_ref().unwrap();
    assert_eq!(mpi.family, MpiFamily::OpenMpi);
    assert_eq!(mpi.soname.as_deref(), Some("libmpi.so.40"));
    let mtl = "/usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3/mca_mtl_ofi.so";
    assert!(
        mpi.components.iter().any(|c| c == mtl),
        "{:?}",
        mpi.components
    );
    let LibfabricLink::Dynamic(fabric) = &mpi.libfabric else {
        panic!("libfabric: {:?}", mpi.libfabric);
    };
    assert_eq!(fabric.path, "/usr/lib/x86_64-linux-gnu/libfabric.so.1");
    assert_eq!(fabric.needed_by.as_deref(), Some(mtl));
    assert_eq!(
        fabric.real_file,
        "/usr/lib/x86_64-linux-gnu/libfabric.so.1.20.0"
    );
    // Not on any RPATH/RUNPATH: the loader's cache when the image has one, else its defaults.
    let expected = if facts.ld_so_cache {
        Via::LdSoCache
    } else {
        Via::DefaultDirs
    };
    assert_eq!(fabric.via, expected);
    assert_eq!(
        mpi.fabric_needs_by_file[mtl],
        versions(&["FABRIC_1.0", "FABRIC_1.1", "FABRIC_1.3"])
    );
    // libmca_common_ofi.so.10, which mtl ofi loads, needs FABRIC_1.5: the stack's newest.
    assert_eq!(mpi.fabric_needs.last(), Some(&version("FABRIC_1.5")));
    // PMIx comes through the pmix ext3x component.
    let pmix: Vec<&str> = mpi.pmi_libraries.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(pmix, ["libpmix.so.2"]);
}

#[test]
fn facts_serialise_for_inspect_json() {
    let facts = facts_of("mpich5");
    let json = serde_json::to_value(&facts).unwrap();
    assert_eq!(json["glibc"]["version"], "GLIBC_2.36");
    assert_eq!(json["mpi"]["family"], "mpich");
    assert_eq!(json["mpi"]["libfabric"]["kind"], "dynamic");
    assert_eq!(json["mpi"]["libfabric"]["via"], "runpath");
    assert_eq!(json["mpi"]["fabric_needs"][2], "FABRIC_1.9");
}

#[test]
fn summaries_name_what_a_launch_checks() {
    for name in common::TEST_IMAGES {
        let text = facts_of(name).to_string();
        println!("{name}:\n{text}");
        assert!(text.starts_with("glibc: GLIBC_2.36 ("), "{text}");
    }
    let text = facts_of("openmpi4").to_string();
    assert!(
        text.contains("FABRIC versions needed: FABRIC_1.0, FABRIC_1.1, FABRIC_1.3, FABRIC_1.5")
    );
    assert!(
        text.contains("PMI libraries: /usr/lib/x86_64-linux-gnu/libpmix.so.2"),
        "{text}"
    );
}

#[test]
fn the_test_programs_load_the_images_mpi() {
    use cmpirun::image::content::{FactsOptions, image_facts_with};
    let options = FactsOptions {
        program: Some("/usr/local/bin/mpitest".into()),
        ..FactsOptions::default()
    };
    for (name, mpi_path, via) in [
        ("mpich4", "/usr/lib/x86_64-linux-gnu/libmpich.so.12", None),
        ("mpich5", "/opt/mpich5/lib/libmpi.so.12", Some(Via::Runpath)),
        ("openmpi4", "/usr/lib/x86_64-linux-gnu/libmpi.so.40", None),
    ] {
        let location = locate(&common::image(name)).unwrap();
        let fs = open_rootfs(&location).unwrap();
        let facts = image_facts_with(fs.as_ref(), &options).unwrap();
        assert!(facts.notes.is_empty(), "{name}: {:?}", facts.notes);
        let scanned = facts_of(name).mpi.unwrap();
        let mpi = facts.mpi.unwrap();
        assert_eq!(mpi.path, mpi_path, "{name}");
        assert_eq!(mpi.libfabric, scanned.libfabric, "{name}");
        assert_eq!(mpi.fabric_needs, scanned.fabric_needs, "{name}");
        // The root is found the way the program finds it.
        let root = &mpi.stack[0];
        assert_eq!(root.needed_by.as_deref(), Some("/usr/local/bin/mpitest"));
        if let Some(via) = via {
            assert_eq!(root.via, via, "{name}");
        }
    }
}
