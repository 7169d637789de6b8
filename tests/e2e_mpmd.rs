//! End-to-end tests of MPMD jobs whose parts name different images: `cmpirun -n 2 A.sif prog :
//! -n 2 B.sif prog`. Every rank on the node runs in one user namespace (so CMA works between
//! them) and the ranks of each image in that image's own mount namespace, with one private
//! `/dev/shm` shared by all (so MPI's shared-memory segments are found by name across images).
//!
//! Under the local launcher, under hydra (`-f hostfile`), and under Slurm (`srun --mpi=pmi2`
//! inside `salloc`, on the one-node test cluster of `ci/start-slurm.sh`).
//!
//! The second image is the MPICH 4 test image repacked with a marker file and its own
//! environment script value ([`second_image`]), so both parts run the same MPI.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;

/// `mpich4` unpacked into a directory image whose environment scripts fail (a script that the
/// image's shell must run, and that exits 3). Made once into the stage folder.
fn failing_env_image() -> PathBuf {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let out = stage_dir().join("mpich4-badenv");
        if out.join(".singularity.d/env/99-fail.sh").is_file() {
            return out;
        }
        let tmp = stage_dir().join(format!(".mpich4-badenv.{}", std::process::id()));
        unpack_image(&image("mpich4"), &tmp);
        fs::write(
            tmp.join(".singularity.d/env/99-fail.sh"),
            "if true; then exit 3; fi\n",
        )
        .unwrap();
        let _ = fs::remove_dir_all(&out);
        fs::rename(&tmp, &out).unwrap();
        out
    })
    .clone()
}

fn cmpirun() -> TuserCommand {
    TuserCommand::cmpirun()
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(120))
}

/// `-n N A PROG ARGS : -n M B PROG ARGS` with both images.
fn two_parts(n: u32, program: &str, args: &[&str], flags: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    for img in [staged_image("mpich4"), second_image("mpich4")] {
        if v.len() > flags.len() {
            v.push(":".into());
        }
        v.extend(["-n".into(), n.to_string(), img.display().to_string()]);
        v.push(program.into());
        v.extend(args.iter().map(|s| s.to_string()));
    }
    v
}

/// Checks a 2+2 mpitest run: passed; one user namespace for all four ranks, not the host's; one
/// mount namespace per image.
fn check_mpitest(out: &RunOutput) {
    out.assert_success();
    check_mpitest_output(&out.stdout, &out.to_string());
}

/// [`check_mpitest`] on the ranks' output `stdout` (`what` describes the run on failure).
fn check_mpitest_output(stdout: &str, what: &str) {
    assert!(stdout.contains("mpitest: OK size=4"), "{what}");
    assert!(stdout.contains("allreduce: OK sum=10"), "{what}");
    assert!(stdout.contains("ring: OK token=6"), "{what}");
    let ns = hello_lines(stdout);
    assert_eq!(ns.len(), 4, "one hello line per rank:\n{what}");
    let users: BTreeSet<_> = ns.iter().map(|h| h.userns).collect();
    assert_eq!(users.len(), 1, "every rank in one user namespace:\n{what}");
    let userns = ns[0].userns.unwrap().to_string();
    let host = fs::read_link("/proc/self/ns/user").unwrap();
    assert!(!host.to_string_lossy().contains(&userns), "{what}");
    let mnt_of = |r: u32| ns.iter().find(|h| h.rank == r).unwrap().mntns;
    assert_eq!(
        mnt_of(0),
        mnt_of(1),
        "part 1 shares a mount namespace:\n{what}"
    );
    assert_eq!(
        mnt_of(2),
        mnt_of(3),
        "part 2 shares a mount namespace:\n{what}"
    );
    assert_ne!(
        mnt_of(0),
        mnt_of(2),
        "one mount namespace per image:\n{what}"
    );
}

#[test]
fn two_images_run_one_mpi_job_in_one_user_namespace() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let out = cmpirun()
        .args(two_parts(2, "/usr/local/bin/mpitest", &[], &[]))
        .run();
    check_mpitest(&out);
    // MPICH's shared-memory transport opens its segments by name in /dev/shm; UCX (MPICH 4's
    // netmod) with only shared-memory and self transports, and segments found by name rather
    // than through /proc: both need the one /dev/shm of every image.
    let out2 = cmpirun()
        .args(two_parts(
            2,
            "/usr/local/bin/mpitest",
            &[],
            &["-x", "UCX_TLS=self,sm", "-x", "UCX_POSIX_USE_PROC_LINK=n"],
        ))
        .run();
    check_mpitest(&out2);
    // Each rank's MPI_APPNUM is its part's number.
    let dir = TuserDir::new();
    let app = appnum_program(dir.path()).display().to_string();
    let out3 = cmpirun()
        .args(two_parts(
            2,
            &app,
            &[],
            &["-B", &dir.path().display().to_string()],
        ))
        .run();
    out3.assert_success();
    for (rank, part) in [(0, 0), (1, 0), (2, 1), (3, 1)] {
        assert!(
            out3.stdout
                .contains(&format!("appnum: rank={rank} appnum={part}")),
            "{out3}"
        );
    }
    assert_no_leftovers(
        &before,
        &[out.tag.as_str(), out2.tag.as_str(), out3.tag.as_str()],
    );
}

#[test]
fn each_image_has_its_own_root_and_scripts_and_all_share_dev_shm() {
    let _serial = exclusive();
    let before = Snapshot::take();
    // Part 1 (image A) writes a file into /dev/shm; part 2 (image B) waits for it. Each reports
    // what its image's script set and whether it sees the marker only B has.
    let a = "echo \"A image=$CMPIRUN_TEST_IMAGE marker=$(cat /etc/mpmd-marker 2>/dev/null || echo none) \
             user=$(readlink /proc/self/ns/user) mnt=$(readlink /proc/self/ns/mnt) part=$PART\"; \
             echo from-a > /dev/shm/mpmd-probe; sleep 2";
    let b = "for i in $(seq 50); do [ -f /dev/shm/mpmd-probe ] && break; sleep 0.1; done; \
             echo \"B image=$CMPIRUN_TEST_IMAGE marker=$(cat /etc/mpmd-marker) \
             user=$(readlink /proc/self/ns/user) mnt=$(readlink /proc/self/ns/mnt) part=$PART \
             shm=$(cat /dev/shm/mpmd-probe)\"";
    let out = cmpirun()
        .args(["-n", "1", "-env", "PART", "one"])
        .arg(staged_image("mpich4"))
        .args(["/bin/sh", "-c", a, ":", "-n", "1", "-env", "PART", "two"])
        .arg(second_image("mpich4"))
        .args(["/bin/sh", "-c", b])
        .run();
    out.assert_success();
    let line = |p: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no {p} line:\n{out}"))
            .to_owned()
    };
    let (la, lb) = (line("A "), line("B "));
    assert!(
        la.contains("image=mpich4 ") && la.contains("marker=none") && la.contains("part=one"),
        "{out}"
    );
    assert!(
        lb.contains("image=mpich4-mpmd ")
            && lb.contains(&format!("marker={MPMD_MARKER}"))
            && lb.contains("part=two")
            && lb.contains("shm=from-a"),
        "{out}"
    );
    let field = |l: &str, k: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(field(&la, "user="), field(&lb, "user="), "{out}");
    assert_ne!(field(&la, "mnt="), field(&lb, "mnt="), "{out}");
    // The probe lived in the job's private /dev/shm, not the host's.
    assert!(!Path::new("/dev/shm/mpmd-probe").exists());
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn dry_run_shows_each_part_with_its_image() {
    let args = two_parts(2, "/usr/local/bin/mpitest", &[], &["--dry-run"]);
    let out = cmpirun().args(&args).run();
    out.assert_success();
    let b = second_image("mpich4").display().to_string();
    assert!(
        out.stdout.contains(&format!(
            "part 2: ranks 2-3 (2): /usr/local/bin/mpitest in {b}"
        )),
        "{out}"
    );
    assert!(
        out.stdout.contains(&format!("    image: {b} (sif, mpich")),
        "{out}"
    );
    assert!(out.stdout.contains("mount namespace 2 of 2"), "{out}");
    assert!(out.stdout.contains("pass    mpmd-mpi:"), "{out}");
    let mut json_args = vec!["--json".to_string()];
    json_args.extend(args);
    let out = cmpirun().args(&json_args).run();
    out.assert_success();
    let plan: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let images: Vec<&str> = plan["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["image"]["path"].as_str().unwrap())
        .collect();
    assert_eq!(images.len(), 2);
    assert_eq!(images[1], b);
    assert_ne!(images[0], images[1]);
}

/// The host libfabric the `ci` profile injects in these tests.
const HOST_LIBFABRIC: &str = "/usr/lib/x86_64-linux-gnu/libfabric.so.1";

#[test]
fn each_image_gets_the_host_library_over_its_own_mpis_file() {
    let _serial = exclusive();
    let before = Snapshot::take();
    // MPICH 4 (ch4:ucx) does not load libfabric, so the host copy goes into its injection
    // directory; MPICH 5 loads /opt/mpich5/lib/mpich/libfabric.so.1 (RUNPATH), and only its root
    // gets the host copy there.
    let cmd = || {
        cmpirun()
            .env("CMPIRUN_CI_LIBFABRIC", HOST_LIBFABRIC)
            .args(["--profile", "ci"])
    };
    let parts = |prog: &[&str]| -> Vec<String> {
        let mut v = vec!["-n".to_string(), "1".into()];
        v.push(staged_image("mpich4").display().to_string());
        v.extend(prog.iter().map(|s| s.to_string()));
        v.extend([":".into(), "-n".into(), "1".into()]);
        v.push(staged_image("mpich5").display().to_string());
        v.extend(prog.iter().map(|s| s.to_string()));
        v
    };
    let plan = cmd().arg("--dry-run").args(parts(&["/bin/true"])).run();
    plan.assert_success();
    let a = staged_image("mpich4").display().to_string();
    let b = staged_image("mpich5").display().to_string();
    assert!(
        plan.stdout.contains(&format!(
            "{HOST_LIBFABRIC} -> /.cmpirun/lib/libfabric.so.1 [library, ro, only in image {a}]"
        )),
        "{plan}"
    );
    assert!(
        plan.stdout.contains(&format!(
            "{HOST_LIBFABRIC} -> /opt/mpich5/lib/mpich/libfabric.so.1 [library, ro, only in image {b}]"
        )),
        "{plan}"
    );
    // MPICH 4 over UCX and MPICH 5 over libfabric do not wire up with each other: refused
    // unless --force.
    assert!(plan.stdout.contains("FAIL    mpmd-mpi:"), "{plan}");
    let refused = cmd().args(parts(&["/bin/true"])).run();
    refused.assert_code(2);
    assert!(
        refused.stderr.contains("mpmd-mpi")
            && refused
                .stderr
                .contains("different versions (library files)")
            && refused
                .stderr
                .contains("libmpich.so.12.2.2 with ucx against libmpi.so.12 with ofi+ucx"),
        "{refused}"
    );
    // Launched (--force: the host libfabric is older than MPICH 5's), each root has its own.
    let probe = "echo \"$CMPIRUN_TEST_IMAGE inject=$(stat -L -c '%d:%i' /.cmpirun/lib/libfabric.so.1 2>/dev/null || echo none) \
                 over=$(stat -L -c '%d:%i' /opt/mpich5/lib/mpich/libfabric.so.1 2>/dev/null || echo none)\"";
    let out = cmd()
        .arg("--force")
        .args(parts(&["/bin/sh", "-c", probe]))
        .run();
    out.assert_success();
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(HOST_LIBFABRIC).unwrap();
    let host = format!(
        "{}:{}",
        nix::sys::stat::makedev(
            nix::sys::stat::major(m.dev()),
            nix::sys::stat::minor(m.dev())
        ),
        m.ino()
    );
    let line = |img: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{img} ")))
            .unwrap_or_else(|| panic!("no line of {img}:\n{out}"))
            .to_owned()
    };
    assert_eq!(
        line("mpich4"),
        format!("mpich4 inject={host} over=none"),
        "{out}"
    );
    assert_eq!(
        line("mpich5"),
        format!("mpich5 inject=none over={host}"),
        "{out}"
    );
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn different_mpi_families_are_refused_unless_forced() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let out = cmpirun()
        .args(["-n", "1"])
        .arg(staged_image("mpich4"))
        .args(["/usr/local/bin/hello", ":", "-n", "1"])
        .arg(staged_image("openmpi4"))
        .arg("/usr/local/bin/hello")
        .run();
    out.assert_code(2);
    assert!(
        out.stderr.contains("mpmd-mpi") && out.stderr.contains("different MPI families"),
        "{out}"
    );
    // Forced, the two images still share one node instance; the programs need not be MPI.
    let out = cmpirun()
        .args(["--force", "-n", "1"])
        .arg(staged_image("mpich4"))
        .args([
            "/bin/sh",
            "-c",
            "readlink /proc/self/ns/user",
            ":",
            "-n",
            "1",
        ])
        .arg(staged_image("openmpi4"))
        .args(["/bin/sh", "-c", "readlink /proc/self/ns/user"])
        .run();
    out.assert_success();
    let users: BTreeSet<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("user:"))
        .collect();
    assert_eq!(users.len(), 1, "{out}");
    assert_eq!(
        out.stdout
            .lines()
            .filter(|l| l.starts_with("user:"))
            .count(),
        2
    );
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn sigkill_of_cmpirun_during_a_two_image_job_leaves_nothing() {
    let _serial = exclusive();
    let before = Snapshot::take();
    // Both parts write into the shared /dev/shm and then wait; cmpirun is killed meanwhile.
    let wait = "echo x > /dev/shm/mpmd-$PMI_RANK; echo started; sleep 60";
    let child = cmpirun()
        .args(["-n", "1"])
        .arg(staged_image("mpich4"))
        .args(["/bin/sh", "-c", wait, ":", "-n", "1"])
        .arg(second_image("mpich4"))
        .args(["/bin/sh", "-c", wait])
        .spawn();
    let tag = child.tag().to_owned();
    // Until both ranks run (the images are mounted and both parts started).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let n = Snapshot::take()
            .leftovers_since(&before, &[tag.as_str()])
            .processes
            .iter()
            .filter(|p| p.comm == "sleep")
            .count();
        if n >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.signal(nix::sys::signal::Signal::SIGKILL);
    let out = child.wait();
    assert_eq!(out.signal(), Some(9), "{out}");
    assert_no_leftovers(&before, &[tag.as_str()]);
}

/// `salloc -n 4 cmpirun ARGS` as the test user on the one-node test cluster.
fn salloc(args: &[String]) -> RunOutput {
    salloc_cmpirun(4).args(args).run()
}

#[test]
fn two_images_through_srun_pmi2_share_one_instance() {
    let _serial = exclusive();
    runtime_dir();
    let before = Snapshot::take();
    // srun starts four `cmpirun __rank` tasks; the instance key is the job step alone, so the
    // tasks of both parts join the one instance the first of them creates, which holds both
    // images.
    let plan = salloc(&two_parts(
        2,
        "/usr/local/bin/mpitest",
        &[],
        &["--pmi", "pmi2", "--dry-run"],
    ));
    plan.assert_success();
    assert!(plan.stdout.contains("launcher: slurm"), "{plan}");
    assert!(
        plan.stdout.contains("command: srun --mpi=pmi2 -n 4"),
        "{plan}"
    );
    let out = salloc(&two_parts(
        2,
        "/usr/local/bin/mpitest",
        &[],
        &["--pmi", "pmi2"],
    ));
    check_mpitest(&out);
    let out2 = salloc(&two_parts(
        2,
        "/usr/local/bin/mpitest",
        &[],
        &[
            "--pmi",
            "pmi2",
            "-x",
            "UCX_TLS=self,sm",
            "-x",
            "UCX_POSIX_USE_PROC_LINK=n",
        ],
    ));
    check_mpitest(&out2);
    assert_no_leftovers(&before, &[out.tag.as_str(), out2.tag.as_str()]);
}

/// A program printing each rank's `MPI_APPNUM` (its MPMD part), built on the host with MPICH's
/// `mpicc` (the host's Debian MPICH is the images' MPICH 4) into `dir`.
fn appnum_program(dir: &Path) -> PathBuf {
    let src = dir.join("appnum.c");
    fs::write(
        &src,
        r#"#include <mpi.h>
#include <stdio.h>
int main(int argc, char **argv) {
    int rank, flag, *appnum;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_APPNUM, &appnum, &flag);
    printf("appnum: rank=%d appnum=%d\n", rank, flag ? *appnum : -1);
    MPI_Finalize();
    return 0;
}
"#,
    )
    .unwrap();
    let bin = dir.join("appnum");
    let st = Command::new("mpicc.mpich")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("mpicc.mpich (libmpich-dev) must be installed");
    assert!(st.success(), "mpicc.mpich failed");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

#[test]
fn two_images_through_mpiexec_hydra_share_one_instance() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let hosts = hostfile(dir.path(), 4);
    let appnum = appnum_program(dir.path());
    let before = Snapshot::take();
    // Under hydra the instance key is the proxy that starts the node's ranks: the ranks of both
    // parts join one instance.
    let mut args = vec!["-f".to_string(), hosts.display().to_string()];
    args.extend(two_parts(2, "/usr/local/bin/mpitest", &[], &[]));
    let plan = cmpirun().arg("--dry-run").args(&args).run();
    plan.assert_success();
    assert!(plan.stdout.contains("launcher: hydra"), "{plan}");
    // One hydra section per part, so each rank learns its part's number.
    assert!(
        plan.stdout.contains("__rank --plan {plan} : -n 2 "),
        "{plan}"
    );
    let out = cmpirun().args(&args).run();
    check_mpitest(&out);
    let mut args = vec![
        "-f".to_string(),
        hosts.display().to_string(),
        "-B".into(),
        dir.path().display().to_string(),
    ];
    let app = appnum.display().to_string();
    args.extend(two_parts(2, &app, &[], &[]));
    let out2 = cmpirun().args(&args).run();
    out2.assert_success();
    for (rank, part) in [(0, 0), (1, 0), (2, 1), (3, 1)] {
        assert!(
            out2.stdout
                .contains(&format!("appnum: rank={rank} appnum={part}")),
            "{out2}"
        );
    }
    assert_no_leftovers(&before, &[out.tag.as_str(), out2.tag.as_str()]);
}

#[test]
fn two_images_in_an_sbatch_job() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let script = dir.path().join("mpmd.sbatch");
    let args: Vec<String> = two_parts(2, "/usr/local/bin/mpitest", &[], &["--pmi", "pmi2"]);
    fs::write(
        &script,
        format!("#!/bin/sh\nexec \"$CMPIRUN\" {}\n", args.join(" ")),
    )
    .unwrap();
    let output = dir.path().join("job.out");
    let before = Snapshot::take();
    let out = TuserCommand::new("sbatch")
        .args(["--wait", "-n", "4", "-o"])
        .arg(&output)
        .arg(&script)
        .env("CMPIRUN", cmpirun_bin())
        .current_dir(dir.path())
        .slurm()
        .timeout(Duration::from_secs(180))
        .run();
    let job = fs::read_to_string(&output).unwrap_or_default();
    assert!(
        out.success(),
        "sbatch failed:\n{out}\n--- job output ---\n{job}"
    );
    check_mpitest_output(&job, &job);
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn a_second_image_that_fails_ends_the_launch_cleanly() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let out = cmpirun()
        .args(["-n", "1"])
        .arg(staged_image("mpich4"))
        .args(["/usr/local/bin/hello", ":", "-n", "1"])
        .arg(failing_env_image())
        .arg("/usr/local/bin/hello")
        .run();
    out.assert_code(1);
    assert!(
        out.stderr.contains(&format!(
            "image {}: /bin/sh exited with status 3",
            failing_env_image().display()
        )),
        "{out}"
    );
    assert!(!out.stdout.contains("hello: rank="), "{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}
