//! A launcher may keep SIGPIPE at its default (terminate); the server must still survive peers
//! that have gone away. In its own test binary because it changes a process-wide setting.

use std::os::unix::net::UnixStream;

use cmpirun_pmi::server::{JobConfig, PmiServer};

#[test]
fn writes_to_departed_peers_do_not_raise_sigpipe() {
    // SAFETY: restoring the default disposition of one signal in a test process.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };

    let mut server = PmiServer::new(JobConfig::single_node("kvs_p", 2)).unwrap();
    let mut c0 = UnixStream::from(server.add_socketpair(0).unwrap().fd);
    let c1 = UnixStream::from(server.add_socketpair(1).unwrap().fd);
    let control = server.control();
    let h = server.start().unwrap();
    // Rank 0 waits in a barrier, then goes away; when rank 1 disconnects the server answers
    // rank 0's barrier with an error on a socket whose peer is closed.
    std::io::Write::write_all(&mut c0, b"cmd=barrier_in\n").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(c0);
    drop(c1);
    let report = h.join().unwrap();
    assert_eq!(report.disconnected.len(), 2);
    // The loop has ended and its end of the wake pipe is closed.
    control.stop();
    control.rank_exited(0);
}
