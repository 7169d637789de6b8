//! The MPI test programs of `examples/mpi/`, built with the host's Debian MPICH and run natively
//! under its `mpiexec.hydra` as the test user: they pass, fail as documented, and print what the
//! test helpers parse. (The same programs run inside the test images in the container and launch
//! tests.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;

/// The programs, compiled once per test process into a folder of the staging area the test user
/// can read (replaced by every test run, so nothing accumulates).
fn built() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = stage_dir().join("examples-native");
        std::fs::create_dir_all(&dir).unwrap();
        for p in PROGRAMS {
            let src = repo_root().join("examples/mpi").join(format!("{p}.c"));
            let status = Command::new("mpicc.mpich")
                .args(["-O2", "-Wall", "-Werror", "-o"])
                .arg(dir.join(p))
                .arg(&src)
                .status()
                .expect("mpicc.mpich (install it with ci/install-packages.sh)");
            assert!(status.success(), "mpicc.mpich {} failed", src.display());
        }
        dir
    })
}

fn hydra(n: u32, args: &[&str]) -> RunOutput {
    TuserCommand::new("mpiexec.hydra")
        .args(["-n", &n.to_string()])
        .arg(built().join(args[0]))
        .args(&args[1..])
        .current_dir(built())
        .timeout(Duration::from_secs(60))
        .run()
}

#[test]
fn mpitest_passes_and_reports_one_namespace_set() {
    for n in [1, 3] {
        let out = hydra(n, &["mpitest"]);
        let hellos = assert_mpitest_ok(&out, n);
        // Natively every rank is in the host's namespaces, which is one set per host.
        assert_one_container_per_host(&hellos, tuser().uid);
        assert!(
            hellos
                .iter()
                .all(|h| h.userns.is_some() && h.mntns.is_some()),
            "{out}"
        );
    }
}

#[test]
fn mpitest_reports_no_libfabric_for_debian_mpich() {
    // Debian's MPICH is ch4:ucx and never maps libfabric: the report must say so, not invent one.
    let out = TuserCommand::new("mpiexec.hydra")
        .args(["-n", "2", "-genv", "MPITEST_FABRIC", "1"])
        .arg(built().join("mpitest"))
        .timeout(Duration::from_secs(60))
        .run();
    assert_mpitest_ok(&out, 2);
    let fabric = fabric_lines(&out.stdout);
    assert_eq!(fabric.len(), 2, "{out}");
    assert!(fabric.iter().all(|f| f.path == "none"), "{out}");
}

#[test]
fn bigmsg_passes() {
    assert_bigmsg_ok(&hydra(2, &["bigmsg"]), 2);
}

#[test]
fn hello_prints_every_rank() {
    let out = hydra(2, &["hello"]);
    out.assert_success();
    let mut ranks: Vec<u32> = hello_lines(&out.stdout).iter().map(|h| h.rank).collect();
    ranks.sort();
    assert_eq!(ranks, vec![0, 1], "{out}");
}

#[test]
fn abort_fails_the_job_the_documented_way() {
    // hydra returns the MPI_Abort code, and the other ranks are torn down. (hydra may drop the
    // failing rank's last output line when it tears the job down, so only the status is checked.)
    let out = hydra(3, &["abort"]);
    assert_eq!(out.code(), Some(7), "{out}");
    let out = hydra(2, &["abort", "exit"]);
    assert!(!out.success() && !out.timed_out, "{out}");
    let out = hydra(2, &["abort", "signal", "15"]);
    assert!(!out.success() && !out.timed_out, "{out}");
    let out = hydra(1, &["abort", "bogus"]);
    assert!(!out.success() && !out.timed_out, "{out}");
}

#[test]
fn pingpong_prints_latency_and_bandwidth() {
    let out = hydra(2, &["pingpong", "50"]);
    out.assert_success();
    let lines = find_fields_all(&out.stdout, "pingpong: ");
    let sizes: Vec<&str> = lines
        .iter()
        .filter_map(|f| f.get("bytes").map(String::as_str))
        .collect();
    assert_eq!(sizes, ["8", "1048576", "4194304"], "{out}");
    assert!(
        lines
            .iter()
            .all(|f| f.contains_key("latency_us") && f.contains_key("bandwidth_MBps"))
    );
}

#[test]
fn parsers_ignore_rank_tags() {
    let text = "[0] hello: rank=0 size=2 host=a uid=1001 gid=1001 userns=11 mntns=22 pid=5\n\
                1: hello: rank=1 size=2 host=a uid=1001 gid=1001 userns=11 mntns=22 pid=6\n\
                fabric: rank=0 path=/x/libfabric.so.1 dev=3 ino=4 fi_version=2.5\n";
    let hellos = hello_lines(text);
    assert_eq!(hellos.len(), 2);
    assert_eq!(hellos[1].rank, 1);
    assert_eq!(hellos[1].userns, Some(11));
    assert_one_container_per_host(&hellos, 1001);
    let fabric = fabric_lines(text);
    assert_eq!(fabric[0].fi_version.as_deref(), Some("2.5"));
    assert_eq!(fabric[0].ino, Some(4));
}
