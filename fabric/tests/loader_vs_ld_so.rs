//! The crate's loader rules agree with glibc's own loader (`ld.so --list`) on real libraries,
//! including the RPATH-beats-LD_LIBRARY_PATH rule that Spack-built images depend on.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cmpirun_fabric::closure::dependency_closure;
use cmpirun_fabric::elf::ElfFacts;
use cmpirun_fabric::loader::{HostLoader, Via, is_glibc_library, ld_so_conf_dirs};

const LD_SO: &str = "/lib64/ld-linux-x86-64.so.2";

/// `name => path` of every non-glibc library `ld.so --list` loads for `lib`, paths made canonical.
fn ld_so_list(lib: &Path, ld_library_path: Option<&Path>) -> BTreeMap<String, PathBuf> {
    let mut cmd = Command::new(LD_SO);
    cmd.arg("--list").arg(lib).env_remove("LD_LIBRARY_PATH");
    if let Some(dir) = ld_library_path {
        cmd.env("LD_LIBRARY_PATH", dir);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().split_once(" => "))
        .filter(|(name, _)| !is_glibc_library(name))
        .map(|(name, rest)| {
            let path = rest.split(" (").next().unwrap();
            (name.to_owned(), std::fs::canonicalize(path).unwrap())
        })
        .collect()
}

fn system_loader(ld_library_path: &[&Path]) -> HostLoader {
    HostLoader {
        ld_library_path: ld_library_path
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
        cache_dirs: ld_so_conf_dirs(Path::new("/etc/ld.so.conf")),
        hwcaps: HostLoader::from_env().hwcaps,
    }
}

fn closure_map(lib: &Path, loader: &HostLoader) -> BTreeMap<String, PathBuf> {
    dependency_closure(&[lib.to_owned()], loader)
        .unwrap()
        .libraries
        .into_iter()
        .filter(|l| l.needed_by.is_some())
        .map(|l| (l.name, l.real_path))
        .collect()
}

#[test]
fn debian_libfabric_closure_matches_ld_so() {
    let lib = Path::new("/usr/lib/x86_64-linux-gnu/libfabric.so.1");
    assert_eq!(closure_map(lib, &system_loader(&[])), ld_so_list(lib, None));
}

#[test]
fn wheel_libmpi_closure_matches_ld_so() {
    let lib = std::fs::canonicalize(common::mpich_wheel_lib().join("libmpi.so.12")).unwrap();
    let ours = closure_map(&lib, &system_loader(&[]));
    assert_eq!(ours, ld_so_list(&lib, None));
    assert!(ours["libfabric.so.1"].ends_with("lib/mpich/libfabric.so.1"));
}

/// Builds `libprobe.so` needing `libfabric.so.1` with `dir` as its RPATH (`new_dtags` false) or
/// RUNPATH (true).
fn build_probe(out: &Path, dir: &Path, new_dtags: bool) -> PathBuf {
    let src = out.join("probe.c");
    std::fs::write(
        &src,
        "int fi_version(void);\nint probe(void) { return fi_version(); }\n",
    )
    .unwrap();
    let lib = out.join(if new_dtags {
        "librunpath.so"
    } else {
        "librpath.so"
    });
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg(format!("-L{}", dir.display()))
        .arg("-l:libfabric.so.1")
        .arg(if new_dtags {
            "-Wl,--enable-new-dtags"
        } else {
            "-Wl,--disable-new-dtags"
        })
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .status()
        .unwrap();
    assert!(status.success());
    lib
}

#[test]
fn rpath_beats_ld_library_path_and_runpath_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let image_fab = tmp.path().join("image");
    let host_fab = tmp.path().join("host");
    for (dir, from) in [
        (
            &image_fab,
            PathBuf::from("/usr/lib/x86_64-linux-gnu/libfabric.so.1"),
        ),
        (
            &host_fab,
            common::mpich_wheel_lib().join("mpich/libfabric.so.1"),
        ),
    ] {
        std::fs::create_dir(dir).unwrap();
        std::fs::copy(from, dir.join("libfabric.so.1")).unwrap();
    }
    let loader = system_loader(&[&host_fab]);

    let rpath_lib = build_probe(tmp.path(), &image_fab, false);
    let facts = ElfFacts::read(&rpath_lib).unwrap();
    assert_eq!(facts.rpath, [image_fab.to_string_lossy()]);
    let found = loader
        .find("libfabric.so.1", Some((&rpath_lib, &facts)))
        .unwrap();
    assert_eq!(found.via, Via::Rpath);
    assert_eq!(found.path, image_fab.join("libfabric.so.1"));
    assert_eq!(
        ld_so_list(&rpath_lib, Some(&host_fab))["libfabric.so.1"],
        image_fab.join("libfabric.so.1")
    );

    let runpath_lib = build_probe(tmp.path(), &image_fab, true);
    let facts = ElfFacts::read(&runpath_lib).unwrap();
    assert_eq!(facts.runpath, [image_fab.to_string_lossy()]);
    let found = loader
        .find("libfabric.so.1", Some((&runpath_lib, &facts)))
        .unwrap();
    assert_eq!(found.via, Via::LdLibraryPath);
    assert_eq!(found.path, host_fab.join("libfabric.so.1"));
    assert_eq!(
        ld_so_list(&runpath_lib, Some(&host_fab))["libfabric.so.1"],
        host_fab.join("libfabric.so.1")
    );
}

/// A library of another ELF class or machine earlier in the path is skipped, by glibc and by the
/// crate (a multiarch image's i386 or foreign copies must not be taken for the real one).
#[test]
fn wrong_class_or_machine_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let real = std::fs::read("/usr/lib/x86_64-linux-gnu/libfabric.so.1").unwrap();
    let good = tmp.path().join("good");
    std::fs::create_dir(&good).unwrap();
    std::fs::write(good.join("libfabric.so.1"), &real).unwrap();
    let wrong_class = tmp.path().join("class");
    let wrong_machine = tmp.path().join("machine");
    for (dir, offset, value) in [(&wrong_class, 4, 1u8), (&wrong_machine, 18, 183u8)] {
        let mut bytes = real.clone();
        bytes[offset] = value; // EI_CLASS = ELFCLASS32, or e_machine = EM_AARCH64
        std::fs::create_dir(dir).unwrap();
        std::fs::write(dir.join("libfabric.so.1"), bytes).unwrap();
    }
    // A program-less probe: the crate's loader for a library that needs libfabric.so.1.
    let probe = build_probe(tmp.path(), &good, true);
    let facts = ElfFacts::read(&probe).unwrap();
    let path = format!(
        "{}:{}:{}",
        wrong_class.display(),
        wrong_machine.display(),
        good.display()
    );
    let loader = HostLoader {
        ld_library_path: path.split(':').map(str::to_owned).collect(),
        cache_dirs: vec![],
        hwcaps: vec![],
    };
    let found = loader
        .find("libfabric.so.1", Some((&probe, &facts)))
        .unwrap();
    assert_eq!(found.path, good.join("libfabric.so.1"));
    assert_eq!(found.via, Via::LdLibraryPath);
    assert_eq!(
        ld_so_list(&probe, Some(Path::new(&path)))["libfabric.so.1"],
        good.join("libfabric.so.1")
    );
}

/// A copy in a `glibc-hwcaps` subdirectory this CPU supports wins over the one in the directory
/// itself, for glibc and for the crate.
#[test]
fn glibc_hwcaps_subdirectory_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lib");
    let hw = dir.join("glibc-hwcaps/x86-64-v2");
    std::fs::create_dir_all(&hw).unwrap();
    std::fs::copy(
        "/usr/lib/x86_64-linux-gnu/libfabric.so.1",
        dir.join("libfabric.so.1"),
    )
    .unwrap();
    std::fs::copy(
        common::mpich_wheel_lib().join("mpich/libfabric.so.1"),
        hw.join("libfabric.so.1"),
    )
    .unwrap();
    let probe = build_probe(tmp.path(), &dir, true);
    let facts = ElfFacts::read(&probe).unwrap();
    let loader = system_loader(&[]);
    assert!(!loader.hwcaps.is_empty());
    let found = loader
        .find("libfabric.so.1", Some((&probe, &facts)))
        .unwrap();
    assert_eq!(found.via, Via::Runpath);
    assert_eq!(found.path, hw.join("libfabric.so.1"));
    assert_eq!(
        ld_so_list(&probe, None)["libfabric.so.1"],
        hw.join("libfabric.so.1")
    );
}
