//! Real PMI clients against the server, natively: Debian's MPICH 4.0.2 (PMI-1), the PyPI
//! `mpich` 5.0.2 wheel (PMI-1), and a program on Slurm's `libpmi2` (PMI-2).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use cmpirun_pmi::server::{Event, JobConfig};
use common::{Mode, client_src, compile, mpich_wheel, run_job};

const LIMIT: Duration = Duration::from_secs(120);

fn build_dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"))
}

fn mpich4_program() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let out = build_dir().path().join("allreduce-mpich4");
        let mut cmd = Command::new("mpicc.mpich");
        cmd.arg("-O1")
            .arg("-o")
            .arg(&out)
            .arg(client_src("mpi_allreduce.c"));
        compile(cmd);
        out
    })
}

fn mpich5_program() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let whl = mpich_wheel();
        let out = build_dir().path().join("allreduce-mpich5");
        let mut cmd = Command::new("cc");
        cmd.arg("-O1")
            .arg("-o")
            .arg(&out)
            .arg(client_src("mpi_allreduce.c"))
            .arg(format!("-I{}", whl.join("include").display()))
            .arg(format!("-L{}", whl.join("lib").display()))
            .arg(format!("-Wl,-rpath,{}", whl.join("lib").display()))
            .arg("-lmpi");
        compile(cmd);
        out
    })
}

fn pmi2_program() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let out = build_dir().path().join("pmi2-client");
        let mut cmd = Command::new("cc");
        cmd.arg("-O1")
            .arg("-o")
            .arg(&out)
            .arg(client_src("pmi2_client.c"))
            .arg("-lpmi2");
        compile(cmd);
        out
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
