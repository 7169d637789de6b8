//! A minimal one-node `mpiexec` on top of the PMI server: start N copies of a program, each
//! with its own socketpair, and end the job when a rank aborts or dies before finalizing.
//!
//! `cargo run -p cmpirun-pmi --example mini_mpiexec -- -n 4 ./mpi_program args…`

use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitCode};
use std::time::Duration;

use cmpirun_pmi::server::{Event, JobConfig, PmiServer};
use cmpirun_pmi::wireup::{inherit_fd, scrub_env};

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mini_mpiexec: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (n, program) = match args.as_slice() {
        [flag, n, program, ..] if flag == "-n" => (n.parse::<u32>()?, program),
        _ => return Err("usage: mini_mpiexec -n N PROGRAM [ARGS…]".into()),
    };
    let config = JobConfig::single_node(format!("mini_{}", std::process::id()), n)
        .connect_timeout(Duration::from_secs(60));
    let mut server = PmiServer::new(config)?;
    let base = scrub_env(std::env::vars_os());
    let mut children: Vec<Child> = Vec::new();
    for rank in 0..n {
        let rank_fd = server.add_socketpair(rank)?;
        let fd = rank_fd.fd.as_raw_fd();
        let mut cmd = Command::new(program);
        cmd.args(&args[3..])
            .env_clear()
            .envs(base.iter().map(|(k, v)| (k, v)))
            .envs(rank_fd.env.iter().map(|(k, v)| (k, v)));
        // SAFETY: inherit_fd only calls fcntl, which is async-signal-safe.
        unsafe { cmd.pre_exec(move || inherit_fd(fd)) };
        children.push(
            cmd.spawn()
                .map_err(|e| format!("cannot start {program}: {e}"))?,
        );
        // rank_fd drops here: the parent's copy of the rank's end is closed.
    }
    let handle = server.start()?;
    let mut code = 0u8;
    let mut killed = false;
    for event in handle.events() {
        match event {
            Event::Aborted {
                rank,
                exit_code,
                message,
            } => {
                eprintln!(
                    "rank {rank} aborted with code {exit_code}: {}",
                    message.unwrap_or_default()
                );
                code = u8::try_from(exit_code).unwrap_or(1).max(1);
                killed = true;
                children.iter_mut().for_each(|c| drop(c.kill()));
            }
            Event::Disconnected {
                rank,
                initialized: true,
                ..
            } if !killed => {
                eprintln!("rank {rank} exited without MPI_Finalize");
                code = code.max(1);
                killed = true;
                children.iter_mut().for_each(|c| drop(c.kill()));
            }
            Event::ProtocolError { rank, error } => eprintln!("rank {rank:?}: {error}"),
            Event::FenceWaiting(wait) => eprintln!("{wait}"),
            _ => {}
        }
    }
    handle.join()?;
    for (rank, mut c) in children.into_iter().enumerate() {
        let st = c.wait()?;
        if !st.success() && !killed && code == 0 {
            eprintln!("rank {rank} exited with {st}");
            code = st
                .code()
                .map_or(128 + st.signal().unwrap_or(0) as u8, |c| c as u8);
        }
    }
    Ok(ExitCode::from(code))
}
