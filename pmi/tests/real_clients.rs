//! Real PMI clients against the server, natively: Debian's MPICH 4.0.2 (PMI-1), the PyPI
//! `mpich` 5.0.2 wheel (PMI-1), and a program on Slurm's `libpmi2` (PMI-2).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use cmpirun_pmi::server::{Event, JobConfig};
use common::{Mode, client_src, compile, mpich_wheel, run_job, run_job_without_kill_on_disconnect};

const LIMIT: Duration = Duration::from_secs(120);

/// Compile a client into cargo's scratch folder for integration tests (inside the target
/// folder, so nothing is left in /tmp): `args` follow `-O1 -o <output>`. The output is written
/// under a temporary name and renamed, so concurrent test runs never execute a half-written file.
fn build(compiler: &str, name: &str, args: &[String]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pmi-clients");
    std::fs::create_dir_all(&dir).expect("create the client build folder");
    let out = dir.join(name);
    let tmp = dir.join(format!("{name}.{}", std::process::id()));
    let mut cmd = Command::new(compiler);
    cmd.arg("-O1").arg("-o").arg(&tmp).args(args);
    compile(cmd);
    std::fs::rename(&tmp, &out).expect("rename the compiled client");
    out
}

fn src(name: &str) -> String {
    client_src(name).display().to_string()
}

fn mpich4_program() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| build("mpicc.mpich", "allreduce-mpich4", &[src("mpi_allreduce.c")]))
}

fn mpich5_program() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let whl = mpich_wheel();
        let lib = whl.join("lib").display().to_string();
        let args = [
            src("mpi_allreduce.c"),
            format!("-I{}", whl.join("include").display()),
            format!("-L{lib}"),
            format!("-Wl,-rpath,{lib}"),
            "-lmpi".into(),
        ];
        build("cc", "allreduce-mpich5", &args)
    })
}

fn pmi2_program() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        build(
            "cc",
            "pmi2-client",
            &[src("pmi2_client.c"), "-lpmi2".into()],
        )
    })
}

/// Runs `n` ranks; with `nodes > 1` the server describes them as spread round-robin over that
/// many nodes, which makes MPICH exchange network addresses through the KVS even on one host.
fn check_mpi(program: &Path, n: u32, nodes: u32, mode: Mode, env: &[(&str, &str)]) {
    let layout = (0..n).map(|r| r % nodes).collect();
    let config = JobConfig::new(format!("kvs_{}_{n}", std::process::id()), layout)
        .connect_timeout(Duration::from_secs(60));
    let outcome = run_job(program, &[], n, mode, env, Some(config), LIMIT);
    let report = outcome.assert_success();
    for (rank, out) in outcome.outputs.iter().enumerate() {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("OK {rank}/{n} appnum=0")),
            "rank {rank}: {text}"
        );
    }
    assert_eq!(report.finalized.len(), n as usize);
    assert!(report.fences >= 1, "{report:?}");
    if n > 1 {
        // MPI_Init publishes each rank's address and reads the others'.
        assert!(report.puts >= u64::from(n), "{report:?}");
        assert!(report.gets >= 1, "{report:?}");
    }
    let connected = outcome
        .events
        .iter()
        .filter(|e| matches!(e, Event::Connected { .. }))
        .count();
    assert_eq!(connected, n as usize, "{:?}", outcome.events);
}

#[test]
fn mpich4_fd_1_2_8() {
    for n in [1, 2, 8] {
        check_mpi(mpich4_program(), n, 1, Mode::Fd, &[]);
    }
}

#[test]
fn mpich4_port_2() {
    check_mpi(mpich4_program(), 2, 1, Mode::Tcp, &[]);
}

#[test]
fn mpich5_wheel_fd_1_2_8() {
    for n in [1, 2, 8] {
        check_mpi(mpich5_program(), n, 2, Mode::Fd, &[]);
    }
}

#[test]
fn mpich5_wheel_ofi_tcp_port_2() {
    check_mpi(
        mpich5_program(),
        2,
        2,
        Mode::Tcp,
        &[("MPIR_CVAR_CH4_NETMOD", "ofi"), ("FI_PROVIDER", "tcp")],
    );
}

fn check_pmi2(n: u32, mode: Mode) {
    let outcome = run_job(pmi2_program(), &[], n, mode, &[], None, LIMIT);
    let report = outcome.assert_success();
    for (rank, out) in outcome.outputs.iter().enumerate() {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with(&format!("OK {rank}/{n} ")) && text.contains("(vector,(0,1,"),
            "rank {rank}: {text}"
        );
    }
    assert_eq!(report.puts, u64::from(n));
    assert_eq!(report.fences, 2);
    assert_eq!(report.finalized.len(), n as usize);
}

#[test]
fn slurm_libpmi2_fd_1_2_8() {
    for n in [1, 2, 8] {
        check_pmi2(n, Mode::Fd);
    }
}

#[test]
fn slurm_libpmi2_port_2() {
    check_pmi2(2, Mode::Tcp);
}

fn abort_event(program: &Path) -> (u32, i32, Option<String>) {
    let outcome = run_job(program, &["abort"], 2, Mode::Fd, &[], None, LIMIT);
    outcome
        .events
        .iter()
        .find_map(|e| match e {
            Event::Aborted {
                rank,
                exit_code,
                message,
            } => Some((*rank, *exit_code, message.clone())),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no abort event: {:?}\n{}", outcome.events, outcome.dump()))
}

#[test]
fn mpich4_abort_reports_rank_and_code() {
    // MPICH 4.0.2's PMI-1 client prints the message itself and sends only the exit code.
    let (rank, code, _) = abort_event(mpich4_program());
    assert_eq!((rank, code), (0, 7));
}

#[test]
fn mpich5_abort_reports_rank_code_and_message_field() {
    // MPICH 5 sends `message=abort`; the full text goes to the rank's stderr.
    let (rank, code, message) = abort_event(mpich5_program());
    assert_eq!((rank, code), (0, 7));
    assert_eq!(message.as_deref(), Some("abort"));
}

#[test]
fn mpich4_mpmd_appnums() {
    let config = JobConfig::single_node(format!("kvs_{}_mpmd", std::process::id()), 4)
        .appnums(vec![0, 0, 1, 1])
        .connect_timeout(Duration::from_secs(60));
    let outcome = run_job(mpich4_program(), &[], 4, Mode::Fd, &[], Some(config), LIMIT);
    outcome.assert_success();
    for (rank, out) in outcome.outputs.iter().enumerate() {
        let text = String::from_utf8_lossy(&out.stdout);
        let want = format!("OK {rank}/4 appnum={}", rank / 2);
        assert!(text.contains(&want), "rank {rank}: {text}");
    }
}

/// `source` built against Debian's MPICH 4.0.2 and against the MPICH 5.0.2 wheel.
fn both_mpich(source: &str) -> [PathBuf; 2] {
    let whl = mpich_wheel();
    let lib = whl.join("lib").display().to_string();
    let stem = source.trim_end_matches(".c");
    [
        build("mpicc.mpich", &format!("{stem}-mpich4"), &[src(source)]),
        build(
            "cc",
            &format!("{stem}-mpich5"),
            &[
                src(source),
                format!("-I{}", whl.join("include").display()),
                format!("-L{lib}"),
                format!("-Wl,-rpath,{lib}"),
                "-lmpi".into(),
            ],
        ),
    ]
}

#[test]
fn mpi_comm_spawn_gets_an_error_not_a_hang() {
    for program in both_mpich("mpi_spawn.c") {
        let outcome = run_job(&program, &[], 1, Mode::Fd, &[], None, LIMIT);
        outcome.assert_success();
        let text = String::from_utf8_lossy(&outcome.outputs[0].stdout).into_owned();
        assert!(
            text.starts_with("spawn rc=") && !text.starts_with("spawn rc=0 "),
            "{program:?}: {text}"
        );
    }
}

#[test]
fn mpi_publish_lookup_unpublish_name() {
    for program in both_mpich("mpi_names.c") {
        let outcome = run_job(&program, &[], 2, Mode::Fd, &[], None, LIMIT);
        outcome.assert_success();
        for out in &outcome.outputs {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("names OK cmpirun-test-port-42"),
                "{program:?}: {text}"
            );
        }
    }
}

#[test]
fn libpmi2_ranks_fail_cleanly_when_a_peer_leaves_before_the_fence() {
    let outcome = run_job_without_kill_on_disconnect(
        pmi2_program(),
        4,
        &[("PMI2_TEST_EXIT_RANK", "2")],
        LIMIT,
    );
    assert!(!outcome.killed, "the job hung: {}", outcome.dump());
    let report = outcome.report.as_ref().expect("server report");
    // Rank 2 leaves first; the others get a failed fence and exit without finalizing.
    assert_eq!(report.disconnected.first(), Some(&2), "{report:?}");
    assert_eq!(report.disconnected.len(), 4, "{report:?}");
    assert!(
        outcome.events.iter().any(|e| matches!(
            e,
            Event::Disconnected {
                rank: 2,
                initialized: true,
                ..
            }
        )),
        "{:?}",
        outcome.events
    );
    for (rank, out) in outcome.outputs.iter().enumerate() {
        assert!(
            !out.status.success(),
            "rank {rank} succeeded: {}",
            outcome.dump()
        );
    }
    let stderr = String::from_utf8_lossy(&outcome.outputs[0].stderr);
    assert!(stderr.contains("PMI2_KVS_Fence() failed"), "{stderr}");
}
