//! Image facts agree with the image's own dynamic loader: each test image is unpacked
//! (`unsquashfs`), and `ld.so --list` runs inside it (`bwrap`), for the MPI library and for each
//! Open MPI component. Every library of the facts' MPI stack must be the file glibc picks.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use cmpirun::image::content::image_facts;
use cmpirun::image::{locate, open_rootfs};

/// `name => path` for every library `ld.so --list FILE` loads inside the unpacked root.
fn ld_so_list(root: &Path, file: &str) -> BTreeMap<String, String> {
    let out = Command::new("bwrap")
        .arg("--bind")
        .arg(root)
        .args(["/", "--proc", "/proc", "--dev", "/dev", "--unshare-all"])
        .args(["/lib64/ld-linux-x86-64.so.2", "--list", file])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ld.so --list {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().split_once(" => "))
        .map(|(name, rest)| {
            let path = rest.split(" (").next().unwrap_or(rest);
            (name.to_owned(), path.to_owned())
        })
        .collect()
}

#[test]
fn every_stack_library_is_the_one_glibc_loads() {
    for name in common::TEST_IMAGES {
        let image = common::image(name);
        let location = locate(&image).unwrap();
        let facts = image_facts(open_rootfs(&location).unwrap().as_ref()).unwrap();
        let mpi = facts.mpi.as_ref().unwrap();

        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let status = Command::new("unsquashfs")
            .args(["-q", "-n", "-o"])
            .arg(location.squashfs_offset.to_string())
            .arg("-d")
            .arg(&root)
            .arg(&image)
            .status()
            .unwrap();
        assert!(status.success(), "unsquashfs {}", image.display());

        let mut loaded = ld_so_list(&root, &mpi.path);
        for component in &mpi.components {
            for (lib, path) in ld_so_list(&root, component) {
                loaded.entry(lib).or_insert(path);
            }
        }
        assert_eq!(
            facts.glibc.as_ref().map(|g| g.path.as_str()),
            loaded.get("libc.so.6").map(String::as_str),
            "{name}: libc.so.6"
        );
        let mut compared = 0;
        for lib in mpi.stack.iter().filter(|l| l.needed_by.is_some()) {
            assert_eq!(
                Some(&lib.path),
                loaded.get(&lib.name),
                "{name}: {} (needed by {:?})",
                lib.name,
                lib.needed_by
            );
            compared += 1;
        }
        assert!(compared >= 4, "{name}: only {compared} libraries compared");
    }
}
