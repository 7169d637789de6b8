//! Fence benchmark: N ranks (default 256) go through PMI-1 init, 4 puts each, one fence, a get
//! of every other rank's key and finalize.
//!
//! Three runs of each, best time printed:
//! - `threads`: N threads in this process speaking the wire over socketpairs (server cost only);
//! - `procs`: N processes of the C client `tests/clients/pmi1_wire.c` under this server;
//! - `hydra`: the same C client under Debian's `mpiexec.hydra -n N` (skipped if absent).
//!
//! `cargo run --release -p cmpirun-pmi --example bench_fence [-- N]`

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cmpirun_pmi::server::{JobConfig, PmiServer};
use cmpirun_pmi::wireup::inherit_fd;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const PUTS: usize = 4;
const RUNS: usize = 3;

fn main() -> Res<()> {
    let n: u32 = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .map_err(|_| format!("rank count {a:?} is not a number"))?,
        None => 256,
    };
    let dir = tempfile::tempdir()?;
    let client = dir.path().join("pmi1_wire");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/pmi1_wire.c");
    let st = Command::new("cc")
        .arg("-O2")
        .arg("-o")
        .arg(&client)
        .arg(&src)
        .status()?;
    if !st.success() {
        return Err(format!("cc {} failed", src.display()).into());
    }

    println!(
        "{n} ranks: init, {PUTS} puts, fence, {} gets, finalize; best of {RUNS}",
        n - 1
    );
    let threads = best(|| threads_run(n))?;
    println!(
        "cmpirun server, {n} client threads:   {:>8.1} ms",
        ms(threads)
    );
    let procs = best(|| procs_run(n, &client))?;
    println!(
        "cmpirun server, {n} client processes: {:>8.1} ms",
        ms(procs)
    );
    match which_hydra() {
        Some(hydra) => {
            let h = best(|| hydra_run(&hydra, n, &client))?;
            println!("mpiexec.hydra -n {n}, same client:    {:>8.1} ms", ms(h));
            println!(
                "ratio hydra / cmpirun (processes): {:.2}",
                h.as_secs_f64() / procs.as_secs_f64()
            );
        }
        None => println!("mpiexec.hydra not found; no comparison"),
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn best(mut f: impl FnMut() -> Res<Duration>) -> Res<Duration> {
    let mut times = Vec::new();
    for _ in 0..RUNS {
        times.push(f()?);
    }
    Ok(times.into_iter().min().unwrap_or_default())
}

fn config(n: u32) -> JobConfig {
    JobConfig::single_node("bench", n).connect_timeout(Duration::from_secs(120))
}

/// One simulated rank: the same exchange as the C client.
fn simulated_rank(s: UnixStream, rank: u32, n: u32) -> Res<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let mut ask = |q: String, expect: &str| -> Res<String> {
        w.write_all(q.as_bytes())?;
        line.clear();
        r.read_line(&mut line)?;
        if !line.starts_with(&format!("cmd={expect}")) {
            return Err(format!("rank {rank}: expected {expect}, got {line:?}").into());
        }
        Ok(line.clone())
    };
    ask(
        "cmd=init pmi_version=1 pmi_subversion=1\n".into(),
        "response_to_init",
    )?;
    ask("cmd=get_maxes\n".into(), "maxes")?;
    ask("cmd=get_my_kvsname\n".into(), "my_kvsname")?;
    for i in 0..PUTS {
        ask(
            format!("cmd=put kvsname=bench key=r{rank}-k{i} value=v{rank}-{i}\n"),
            "put_result",
        )?;
    }
    ask("cmd=barrier_in\n".into(), "barrier_out")?;
    for other in (0..n).filter(|&o| o != rank) {
        let reply = ask(
            format!("cmd=get kvsname=bench key=r{other}-k0\n"),
            "get_result",
        )?;
        if !reply.contains(&format!("value=v{other}-0")) {
            return Err(format!("rank {rank}: bad reply {reply:?}").into());
        }
    }
    ask("cmd=finalize\n".into(), "finalize_ack")?;
    Ok(())
}

fn threads_run(n: u32) -> Res<Duration> {
    let mut server = PmiServer::new(config(n))?;
    let mut socks = Vec::new();
    for r in 0..n {
        socks.push(UnixStream::from(server.add_socketpair(r)?.fd));
    }
    let t0 = Instant::now();
    let handle = server.start()?;
    let workers: Vec<_> = socks
        .into_iter()
        .enumerate()
        .map(|(r, s)| {
            std::thread::spawn(move || simulated_rank(s, r as u32, n).map_err(|e| e.to_string()))
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "client thread panicked")??;
    }
    let report = handle.join()?;
    let t = t0.elapsed();
    check(&report, n)?;
    Ok(t)
}

fn procs_run(n: u32, client: &Path) -> Res<Duration> {
    let t0 = Instant::now();
    let mut server = PmiServer::new(config(n))?;
    let mut children = Vec::new();
    for r in 0..n {
        let rank = server.add_socketpair(r)?;
        let fd = rank.fd.as_raw_fd();
        let mut cmd = Command::new(client);
        cmd.envs(rank.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        // SAFETY: inherit_fd only calls fcntl.
        unsafe { cmd.pre_exec(move || inherit_fd(fd)) };
        children.push(cmd.spawn()?);
    }
    let handle = server.start()?;
    for mut c in children {
        let st = c.wait()?;
        if !st.success() {
            return Err(format!("a client failed: {st}").into());
        }
    }
    let report = handle.join()?;
    let t = t0.elapsed();
    check(&report, n)?;
    Ok(t)
}

fn check(report: &cmpirun_pmi::JobReport, n: u32) -> Res<()> {
    let want_gets = u64::from(n) * u64::from(n - 1);
    if report.fences != 1 || report.puts != u64::from(n) * PUTS as u64 || report.gets != want_gets {
        return Err(format!("unexpected report {report:?}").into());
    }
    Ok(())
}

fn which_hydra() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("mpiexec.hydra"))
            .find(|f| f.is_file())
    })
}

fn hydra_run(hydra: &Path, n: u32, client: &Path) -> Res<Duration> {
    let t0 = Instant::now();
    let st = Command::new(hydra)
        .arg("-n")
        .arg(n.to_string())
        .arg(client)
        .stdin(Stdio::null())
        .status()?;
    let t = t0.elapsed();
    if !st.success() {
        return Err(format!("mpiexec.hydra failed: {st}").into());
    }
    Ok(t)
}
