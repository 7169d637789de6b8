//! The report port under a flood: during a 4-rank job under srun whose rank 1 exits 3, 200
//! connections with wrong tokens, garbage, half and huge lines and 20 slow clients (silent, or
//! one byte a second) reach the front end's port; the job still ends with status 3 and its
//! message, in about the time it takes without the flood. All traffic goes to 127.0.0.1 (the
//! one-node cluster's front end listens on loopback).

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// `salloc -n 4 cmpirun -n 4 mpich4 abort exit 3`, started.
fn failing_job() -> TuserChild {
    salloc_cmpirun(4)
        .args(["-n", "4", "--pmi", "pmi2"])
        .arg(staged_image("mpich4"))
        .arg(program("abort"))
        .args(RANK_EXITS_3.args)
        .spawn()
}

/// The front end's `CMPIRUN_REPORT` (`TOKEN@127.0.0.1:PORT`), read from the environment of the
/// job's srun, which the front end starts right after it listens.
fn report_target(child: &TuserChild) -> (String, SocketAddr) {
    let until = Instant::now() + Duration::from_secs(150);
    while Instant::now() < until && !child.has_exited() {
        for p in tagged_processes(child.tag()) {
            let Ok(env) = std::fs::read(format!("/proc/{}/environ", p.pid)) else {
                continue;
            };
            let found = env.split(|&c| c == 0).find_map(|kv| {
                kv.strip_prefix(b"CMPIRUN_REPORT=")
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            if let Some((token, addr)) = found.as_deref().and_then(|v| v.split_once('@')) {
                let addr: SocketAddr = addr.parse().expect("an IP address and port");
                assert!(addr.ip().is_loopback(), "{addr}: traffic only to 127.0.0.1");
                return (token.to_owned(), addr);
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("no process of the job carried CMPIRUN_REPORT");
}

/// Floods `addr` until `stop`, counting connections in `made`: 200 bad connections spread over
/// about 2 s and 20 slow clients
/// (10 silent, 10 sending one byte a second) that reconnect when dropped. Bounded: at most 200
/// bad connections and 20 clients of at most 30 connections each.
fn flood(
    token: String,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    made: Arc<AtomicUsize>,
) -> Vec<thread::JoinHandle<()>> {
    let connect = {
        let made = made.clone();
        move || connect_counted(addr, &made)
    };
    let mut threads = Vec::new();
    let stop2 = stop.clone();
    threads.push(thread::spawn(move || {
        let wrong = format!("{}x", &token[1..]);
        let lines: [Vec<u8>; 5] = [
            // Well formed: it would end the job with 9 if its token were taken.
            format!("{{\"token\":\"{wrong}\",\"rank\":0,\"end\":{{\"exited\":9}}}}\n").into_bytes(),
            format!("{{\"token\":\"{wrong}\",\"rank\":2,\"end\":\"garbage\"}}\n").into_bytes(),
            b"\xff\xfe\x00garbage\x01\n".to_vec(),
            format!("{{\"token\":\"{token}").into_bytes(),
            vec![b'a'; 100_000],
        ];
        for i in 0..200 {
            if stop2.load(Ordering::Relaxed) {
                return;
            }
            if let Some(mut s) = connect() {
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = s.write_all(&lines[i % lines.len()]);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }));
    for i in 0..20 {
        let stop = stop.clone();
        let made = made.clone();
        threads.push(thread::spawn(move || {
            let connect = || connect_counted(addr, &made);
            for _ in 0..30 {
                let Some(mut s) = connect() else { return };
                for b in b"{\"token\":\"" {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if i % 2 == 1 && s.write_all(&[*b]).is_err() {
                        break;
                    }
                    thread::sleep(Duration::from_secs(1));
                }
            }
        }));
    }
    threads
}

/// Connects to `addr` (1 s at most) and counts the connection in `made`.
fn connect_counted(addr: SocketAddr, made: &AtomicUsize) -> Option<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok();
    if s.is_some() {
        made.fetch_add(1, Ordering::Relaxed);
    }
    s
}

#[test]
fn a_flood_of_bad_and_slow_clients_changes_nothing() {
    let _serial = exclusive();
    require_slurm();
    runtime_dir();
    // The usual time, without a flood.
    let start = Instant::now();
    let out = failing_job().wait();
    let usual = start.elapsed();
    assert!(!out.timed_out, "{out}");
    RANK_EXITS_3.assert_ended(&out);

    let before = Snapshot::take();
    let start = Instant::now();
    let child = failing_job();
    let (token, addr) = report_target(&child);
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicUsize::new(0));
    let threads = flood(token, addr, stop.clone(), made.clone());
    let out = child.wait();
    let took = start.elapsed();
    let during = made.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert!(!out.timed_out, "{out}");
    eprintln!("{during} flood connections during the job; {took:?}, {usual:?} without");
    assert!(
        during >= 40,
        "only {during} flood connections were made during the job"
    );
    RANK_EXITS_3.assert_ended(&out);
    assert!(
        out.stderr
            .contains("cmpirun: rank 1 of 4 exited with status 3; the job was ended"),
        "{out}"
    );
    assert!(
        !out.stderr.contains("no rank reported") && !out.stderr.contains("never reported"),
        "{out}"
    );
    assert!(
        !out.stderr.contains("token"),
        "bad reports are only logged at debug: {out}"
    );
    assert!(
        took < usual + Duration::from_secs(5),
        "the flooded job took {took:?}, {usual:?} without the flood"
    );
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}
