//! The server against hand-written clients on real sockets: protocol corners that the real
//! client libraries do not reach, and faults (malformed, oversized and truncated messages, a
//! disconnect in the middle of a fence, ranks that never connect).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cmpirun_pmi::server::{Event, JobConfig, PmiError, PmiServer, ServerHandle};
use cmpirun_pmi::wire::{Decoded, Message, Wire, decode};

const T: Duration = Duration::from_secs(20);

struct Client {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    /// Errors are ignored: a fault test may have the server close the socket mid-write.
    fn send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }
    fn v1(&mut self, line: &str) {
        self.send(format!("{line}\n").as_bytes());
    }
    fn v2(&mut self, body: &str) {
        self.send(format!("{:<6}{body}", body.len()).as_bytes());
    }
    fn recv(&mut self) -> Message {
        loop {
            if let Decoded::Message(m, n) = decode(&self.buf, 1 << 20).unwrap() {
                self.buf.drain(..n);
                return m;
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).unwrap();
            assert!(n > 0, "server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
    /// Whether the server closed its end (end of file, or a reset when it dropped unread
    /// bytes).
    fn closed_by_server(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        match self.s.read(&mut chunk) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

fn job(config: JobConfig) -> (ServerHandle, Vec<Client>) {
    let mut server = PmiServer::new(config).unwrap();
    let clients = (0..server.size())
        .map(|r| {
            let s = UnixStream::from(server.add_socketpair(r).unwrap().fd);
            s.set_read_timeout(Some(T)).unwrap();
            Client { s, buf: Vec::new() }
        })
        .collect();
    (server.start().unwrap(), clients)
}

fn events_until(h: &ServerHandle, done: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let e = h.events().recv_timeout(T).expect("event");
        let last = done(&e);
        seen.push(e);
        if last {
            return seen;
        }
    }
}

#[test]
fn pmi1_session_with_attributes_and_names() {
    let config = JobConfig::new("kvs_a", vec![7, 7, 9]).appnums(vec![0, 0, 1]);
    let (h, mut c) = job(config);
    c[2].v1("cmd=init pmi_version=1 pmi_subversion=1");
    let m = c[2].recv();
    assert_eq!(
        (m.cmd.as_str(), m.get("rc")),
        ("response_to_init", Some("0"))
    );
    c[2].v1("cmd=get_appnum");
    assert_eq!(c[2].recv().get("appnum"), Some("1"));
    c[2].v1("cmd=get_my_kvsname");
    assert_eq!(c[2].recv().get("kvsname"), Some("kvs_a"));
    c[2].v1("cmd=get_universe_size");
    assert_eq!(c[2].recv().get("size"), Some("3"));
    c[2].v1("cmd=get kvsname=kvs_a key=PMI_process_mapping");
    assert_eq!(c[2].recv().get("value"), Some("(vector,(0,1,2),(1,1,1))"));
    c[2].v1("cmd=get kvsname=kvs_a key=nothing");
    let m = c[2].recv();
    assert_eq!((m.get("rc"), m.get("found")), (Some("-1"), Some("FALSE")));
    c[2].v1("cmd=publish_name service=svc port=tag#0$");
    assert_eq!(c[2].recv().get("rc"), Some("0"));
    c[1].v1("cmd=lookup_name service=svc");
    assert_eq!(c[1].recv().get("port"), Some("tag#0$"));
    c[1].v1("cmd=unpublish_name service=svc");
    assert_eq!(c[1].recv().get("rc"), Some("0"));
    c[1].v1("cmd=lookup_name service=svc");
    assert_eq!(c[1].recv().get("rc"), Some("-1"));
    // Spawn: one reply after the last block, an error.
    c[0].send(b"mcmd=spawn\nnprocs=1\nexecname=x\ntotspawns=2\nspawnssofar=1\nendcmd\n");
    c[0].send(b"mcmd=spawn\nnprocs=1\nexecname=x\ntotspawns=2\nspawnssofar=2\nendcmd\n");
    let m = c[0].recv();
    assert_eq!((m.cmd.as_str(), m.get("rc")), ("spawn_result", Some("-1")));
    for cl in c.iter_mut() {
        cl.v1("cmd=finalize");
        assert_eq!(cl.recv().cmd, "finalize_ack");
    }
    let report = h.join().unwrap();
    assert_eq!(report.finalized.len(), 3);
}

#[test]
fn pmi2_fence_thrid_nodeattr_and_both_paddings() {
    let (h, mut c) = job(JobConfig::new("kvs_b", vec![0, 0]));
    for (r, cl) in c.iter_mut().enumerate() {
        cl.v1("cmd=init pmi_version=2 pmi_subversion=0");
        let m = cl.recv();
        assert_eq!((m.wire, m.get("pmi_version")), (Wire::V1, Some("2")));
        // Left-padded length (old clients) and right-padded (MPICH >= 4.1).
        let body = format!("cmd=fullinit;pmijobid=kvs_b;pmirank={r};threaded=TRUE;");
        if r == 0 {
            cl.v2(&body);
        } else {
            cl.send(format!("{:>6}{body}", body.len()).as_bytes());
        }
        let m = cl.recv();
        assert_eq!(m.get("rank"), Some(r.to_string().as_str()));
        assert_eq!(m.get("size"), Some("2"));
        for k in ["pmi-version", "pmi-subversion", "appnum", "pmiverbose"] {
            assert!(m.get(k).is_some(), "{k} missing in {m:?}");
        }
    }
    // A waiting getnodeattr is answered when the value is put by another rank on the node.
    c[1].v2("cmd=info-getnodeattr;key=shm;wait=TRUE;thrid=0xabc;");
    c[0].v2("cmd=info-putnodeattr;key=shm;value=seg;;1;");
    assert_eq!(c[0].recv().get("rc"), Some("0"));
    let m = c[1].recv();
    assert_eq!(
        (m.get("thrid"), m.get("found"), m.get("value")),
        (Some("0xabc"), Some("TRUE"), Some("seg;1"))
    );
    c[0].v2("cmd=kvs-put;key=a;value=x;;y;thrid=t0;");
    assert_eq!(c[0].recv().get("thrid"), Some("t0"));
    c[0].v2("cmd=kvs-fence;thrid=f0;");
    c[1].v2("cmd=kvs-fence;");
    let m0 = c[0].recv();
    let m1 = c[1].recv();
    assert_eq!(
        (m0.cmd.as_str(), m0.get("thrid")),
        ("kvs-fence-response", Some("f0"))
    );
    assert_eq!(
        (m1.cmd.as_str(), m1.get("rc")),
        ("kvs-fence-response", Some("0"))
    );
    c[1].v2("cmd=kvs-get;jobid=kvs_b;srcid=0;key=a;");
    assert_eq!(c[1].recv().get("value"), Some("x;y"));
    c[1].v2("cmd=info-getjobattr;key=PMI_process_mapping;");
    assert_eq!(c[1].recv().get("value"), Some("(vector,(0,1,2))"));
    c[1].v2("cmd=spawn;ncmds=1;subcmd=x;maxprocs=1;argc=0;");
    let m = c[1].recv();
    assert_eq!(
        (m.get("rc"), m.cmd.as_str()),
        (Some("-1"), "spawn-response")
    );
    assert!(m.get("errmsg").is_some());
    for cl in c.iter_mut() {
        cl.v2("cmd=finalize;");
        assert_eq!(cl.recv().cmd, "finalize-response");
    }
    assert_eq!(h.join().unwrap().fences, 1);
}

#[test]
fn abort_is_an_event_with_code_and_message() {
    let (h, mut c) = job(JobConfig::single_node("kvs_c", 1));
    c[0].v2("cmd=abort;isworld=TRUE;exitcode=3;message=bad input;");
    let ev = events_until(&h, |e| matches!(e, Event::Aborted { .. }));
    assert_eq!(
        ev.last(),
        Some(&Event::Aborted {
            rank: 0,
            exit_code: 3,
            message: Some("bad input".into())
        })
    );
    assert_eq!(
        h.join().unwrap().aborted,
        Some((0, 3, Some("bad input".into())))
    );
}

fn expect_protocol_error(bytes: &[u8], needle: &str) {
    let (h, mut c) = job(JobConfig::single_node("kvs_d", 1));
    c[0].send(bytes);
    let ev = events_until(&h, |e| matches!(e, Event::Disconnected { .. }));
    let error = ev
        .iter()
        .find_map(|e| match e {
            Event::ProtocolError { rank, error } => Some((*rank, error.clone())),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no protocol error in {ev:?}"));
    assert_eq!(error.0, Some(0));
    assert!(error.1.contains(needle), "{error:?}");
    assert!(c[0].closed_by_server());
    let report = h.join().unwrap();
    assert_eq!(report.disconnected, [0]);
}

#[test]
fn malformed_message_is_a_protocol_error() {
    expect_protocol_error(b"GET / HTTP/1.1\r\n\r\n", "malformed");
    expect_protocol_error(b"    14xyz=1;cmd=abc;", "malformed");
}

#[test]
fn oversized_messages_are_refused_without_allocating() {
    expect_protocol_error(b"999999cmd=kvs-put;", "exceeds the limit");
    let mut line = b"cmd=put kvsname=k key=a value=".to_vec();
    line.resize(200_000, b'x');
    expect_protocol_error(&line, "exceeds the limit");
}

#[test]
fn truncated_message_then_close_is_reported() {
    let (h, mut c) = job(JobConfig::single_node("kvs_e", 1));
    c[0].send(b"    40cmd=kvs-put;key=a;");
    c.clear(); // close the client's end
    let ev = events_until(&h, |e| matches!(e, Event::Disconnected { .. }));
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::ProtocolError { error, .. }
            if error.contains("middle of a message"))),
        "{ev:?}"
    );
    h.join().unwrap();
}

#[test]
fn disconnect_mid_fence_fails_the_fence() {
    let (h, mut c) = job(JobConfig::single_node("kvs_f", 3));
    c[0].v1("cmd=barrier_in");
    c[1].v2("cmd=kvs-fence;");
    let _ = events_until(&h, |e| matches!(e, Event::Connected { rank: 1 }));
    // Rank 2 dies before reaching the fence.
    let gone = c.pop().unwrap();
    drop(gone);
    let m0 = c[0].recv();
    assert_eq!((m0.cmd.as_str(), m0.get("rc")), ("barrier_out", Some("-1")));
    let m1 = c[1].recv();
    assert_eq!(
        (m1.cmd.as_str(), m1.get("rc")),
        ("kvs-fence-response", Some("-1"))
    );
    assert!(m1.get("errmsg").unwrap().contains("rank 2"));
    let ev = events_until(&h, |e| matches!(e, Event::Disconnected { .. }));
    assert_eq!(
        ev.last(),
        Some(&Event::Disconnected {
            rank: 2,
            initialized: false,
            mid_fence: true
        })
    );
    // A later fence fails at once instead of hanging.
    c[0].v1("cmd=barrier_in");
    assert_eq!(c[0].recv().get("rc"), Some("-1"));
    h.stop();
    assert!(h.join().unwrap().stopped);
}

#[test]
fn ranks_that_never_connect_time_out() {
    let config = JobConfig::single_node("kvs_g", 2).connect_timeout(Duration::from_millis(300));
    let (h, mut c) = job(config);
    c[0].v1("cmd=init pmi_version=1 pmi_subversion=1");
    c[0].recv();
    let ev = events_until(&h, |e| matches!(e, Event::ConnectTimeout { .. }));
    assert_eq!(ev.last(), Some(&Event::ConnectTimeout { missing: vec![1] }));
    match h.join() {
        Err(PmiError::ConnectTimeout { missing, .. }) => assert_eq!(missing, [1]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_fence_that_waits_is_reported_with_its_missing_ranks_and_still_completes() {
    let config = JobConfig::single_node("kvs_w", 3).fence_report(Some(Duration::from_millis(200)));
    let (h, mut c) = job(config);
    c[0].v1("cmd=init pmi_version=1 pmi_subversion=1");
    c[0].recv();
    c[1].v1("cmd=init pmi_version=1 pmi_subversion=1");
    c[1].recv();
    c[0].v1("cmd=barrier_in");
    let started = std::time::Instant::now();
    let ev = events_until(&h, |e| matches!(e, Event::FenceWaiting(_)));
    assert!(started.elapsed() >= Duration::from_millis(200));
    let Some(Event::FenceWaiting(wait)) = ev.last() else {
        panic!("{ev:?}")
    };
    assert_eq!((wait.number, wait.completed), (1, 0));
    assert_eq!(wait.arrived, [0]);
    assert_eq!(wait.not_in_fence, [1]);
    assert_eq!(wait.never_connected, [2]);
    // The next report comes when the wait has doubled.
    let ev = events_until(&h, |e| matches!(e, Event::FenceWaiting(_)));
    let Some(Event::FenceWaiting(again)) = ev.last() else {
        panic!("{ev:?}")
    };
    assert!(again.waited >= Duration::from_millis(400), "{again:?}");
    // Reported, not failed: the fence completes when the others arrive.
    c[1].v1("cmd=barrier_in");
    c[2].v1("cmd=init pmi_version=1 pmi_subversion=1");
    c[2].recv();
    c[2].v1("cmd=barrier_in");
    for client in &mut c {
        let m = client.recv();
        assert_eq!((m.cmd.as_str(), m.get("rc")), ("barrier_out", Some("0")));
    }
    h.stop();
    assert_eq!(h.join().unwrap().fences, 1);
}

#[test]
fn tcp_clients_identify_with_initack_or_fullinit() {
    let mut server = PmiServer::new(JobConfig::single_node("kvs_h", 2)).unwrap();
    let env = server.tcp_env(1).unwrap();
    let addr = &env.iter().find(|(k, _)| k == "PMI_PORT").unwrap().1;
    let h = server.start().unwrap();
    let s1 = TcpStream::connect(addr).unwrap();
    s1.set_read_timeout(Some(T)).unwrap();
    let mut r1 = std::io::BufReader::new(s1.try_clone().unwrap());
    (&s1).write_all(b"cmd=initack pmiid=1\n").unwrap();
    let mut lines = String::new();
    for _ in 0..4 {
        std::io::BufRead::read_line(&mut r1, &mut lines).unwrap();
    }
    assert_eq!(
        lines,
        "cmd=initack rc=0 rank=1 size=2 appnum=0 debug=0\ncmd=set size=2\ncmd=set rank=1\ncmd=set debug=0\n"
    );
    let mut s0 = TcpStream::connect(addr).unwrap();
    s0.set_read_timeout(Some(T)).unwrap();
    s0.write_all(b"cmd=init pmi_version=2 pmi_subversion=0\n")
        .unwrap();
    let body = "cmd=fullinit;pmirank=0;";
    s0.write_all(format!("{:>6}{body}", body.len()).as_bytes())
        .unwrap();
    let mut got = Vec::new();
    let msg = loop {
        let mut chunk = [0u8; 512];
        let n = s0.read(&mut chunk).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&chunk[..n]);
        if let Ok(Decoded::Message(_, used)) = decode(&got, 4096)
            && let Ok(Decoded::Message(m, _)) = decode(&got[used..], 4096)
        {
            break m;
        }
    };
    assert_eq!(
        (msg.cmd.as_str(), msg.get("rank")),
        ("fullinit-response", Some("0"))
    );
    // A second connection claiming rank 1 is refused.
    let mut dup = TcpStream::connect(addr).unwrap();
    dup.set_read_timeout(Some(T)).unwrap();
    dup.write_all(b"cmd=initack pmiid=1\n").unwrap();
    let mut reply = [0u8; 256];
    let n = dup.read(&mut reply).unwrap();
    assert!(String::from_utf8_lossy(&reply[..n]).contains("rc=-1"));
    drop((s0, s1, dup, r1));
    let report = h.join().unwrap();
    assert_eq!(report.disconnected.len(), 2);
}

#[test]
fn exited_ranks_stop_being_waited_for() {
    // Rank 0 holds its socket open (as a leftover child process would) and rank 1 never
    // connects over TCP; the launcher's exit reports end the job.
    let mut server = PmiServer::new(JobConfig::single_node("kvs_i", 2)).unwrap();
    let _held = server.add_socketpair(0).unwrap();
    server.tcp_env(1).unwrap();
    let control = server.control();
    let h = server.start().unwrap();
    control.rank_exited(0);
    control.rank_exited(1);
    control.rank_exited(7); // out of range: ignored
    let report = h.join().unwrap();
    assert_eq!(report.disconnected, [0, 1]);
    assert!(!report.stopped);
}

#[test]
fn a_rank_alone_in_a_fence_is_not_mid_fence_for_others() {
    let (h, mut c) = job(JobConfig::single_node("kvs_j", 2));
    c[0].v1("cmd=barrier_in");
    let _ = events_until(&h, |e| matches!(e, Event::Connected { rank: 0 }));
    c.remove(0);
    let ev = events_until(&h, |e| matches!(e, Event::Disconnected { .. }));
    assert_eq!(
        ev.last(),
        Some(&Event::Disconnected {
            rank: 0,
            initialized: true,
            mid_fence: false
        })
    );
    h.stop();
    h.join().unwrap();
}
