//! Never a silent singleton: an image whose MPI needs a PMI the launcher does not serve is
//! refused before launch, and a job whose MPI ranks never spoke to the PMI server (each ran as a
//! world of one) fails after launch, under the local launcher and under hydra. Real images, as
//! the test user.

mod common;

use std::time::Duration;

use common::*;

/// The lines every singleton failure prints (rank 0, 1 or any: whichever ended first).
fn assert_singleton_failure(out: &RunOutput, size: u32) {
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(
        out.stderr
            .contains("loaded the MPI library /usr/lib/x86_64-linux-gnu/libmpi.so.40")
            && out.stderr.contains("never spoke to the job's PMI server")
            && out
                .stderr
                .contains(&format!("as a singleton (a world of 1, not of {size})")),
        "{out}"
    );
}

#[test]
fn open_mpi_under_pmi2_is_refused_before_launch() {
    let _serial = exclusive();
    let out = TuserCommand::cmpirun()
        .timeout(Duration::from_secs(60))
        .args(["--pmi", "pmi2", "-n", "2"])
        .arg(staged_image("openmpi4"))
        .arg("/usr/local/bin/hello")
        .run();
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("mpi-family:")
            && out.stderr.contains("needs a PMIx server")
            && out.stderr.contains("--force"),
        "{out}"
    );
    assert!(!out.stdout.contains("hello:"), "nothing may start: {out}");
    // hydra serves no PMIx: the way out named is one that serves it, not --pmi pmix.
    let out = TuserCommand::cmpirun()
        .timeout(Duration::from_secs(60))
        .args(["--launcher", "hydra", "-H", "localhost", "-n", "2"])
        .arg(staged_image("openmpi4"))
        .arg("/usr/local/bin/hello")
        .run();
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("needs a PMIx server")
            && out.stderr.contains("--launcher mpirun")
            && !out.stderr.contains("--pmi pmix ("),
        "{out}"
    );
    assert!(!out.stdout.contains("hello:"), "nothing may start: {out}");
}

#[test]
fn singletons_under_the_local_launcher_fail_the_job() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let out = TuserCommand::cmpirun()
        .timeout(Duration::from_secs(120))
        .env("CMPIRUN_KILL_GRACE", "2")
        .args(["--force", "--pmi", "pmi2", "-n", "2"])
        .arg(staged_image("openmpi4"))
        .arg("/usr/local/bin/hello")
        .run();
    assert_singleton_failure(&out, 2);
    assert_no_leftovers(&before, &[out.tag.as_str()]);
    // A program that is no MPI program never spoke PMI either, and is fine.
    let out = TuserCommand::cmpirun()
        .timeout(Duration::from_secs(120))
        .args(["--force", "--pmi", "pmi2", "-n", "2"])
        .arg(staged_image("openmpi4"))
        .arg("/bin/true")
        .run();
    out.assert_success();
}

#[test]
fn singletons_under_hydra_fail_the_job() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let hosts = hostfile(dir.path(), 2);
    let before = Snapshot::take();
    let out = hydra_cmpirun(&hosts, 2)
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(120))
        .arg("--force")
        .arg(staged_image("openmpi4"))
        .arg("/usr/local/bin/hello")
        .run();
    assert_singleton_failure(&out, 2);
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}
