//! How the `cmpirun __rank` tasks under srun and hydra tell the front end how their rank ended,
//! so that the job ends with the status the local launcher would give (`docs/exit-status.md`)
//! rather than srun's or hydra's.
//!
//! The front end listens on a TCP socket and passes `TOKEN@HOST:PORT` to every task in
//! [`REPORT_VAR`] (srun and hydra pass the environment on, as they do the plan). A task whose rank
//! failed on its own (a non-zero exit, a signal the task did not pass on, `MPI_Abort`) connects,
//! sends one JSON line and waits for `ok` before it exits or lets the abort through. srun and hydra
//! only learn of a failure when that task exits (or the abort reaches them), so the first real
//! failure is in the front end's hands before any teardown starts: reports are kept in arrival
//! order and the first one wins. Ranks ended by the teardown (the task got SIGTERM or SIGKILL
//! from srun or hydra) do not report at all.
//!
//! The port is open to anyone who can reach it, so the front end trusts nothing that arrives
//! there but a line with the job's token (16 random bytes, compared in constant time), and never
//! lets a connection hold it up: the listener and every connection are non-blocking and read
//! only when `poll` says so, a connection must deliver its line within [`CONN_DEADLINE`] of being
//! accepted and in at most [`MAX_LINE`] bytes, at most [`MAX_CONNS`] connections are held (one
//! more drops the oldest), and one call of [`Collector::service`] accepts at most
//! [`ACCEPTS_PER_ROUND`]. Whatever else arrives (a wrong token, garbage, half or huge lines,
//! silent or slow clients) is dropped with a debug log; a task whose connection was dropped in a
//! flood tries again ([`CLIENT_ATTEMPTS`]). `tests/report_port.rs` floods a job's port.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::status::RankEnd;

/// The variable that carries the front end's address and token to every task.
pub const REPORT_VAR: &str = "CMPIRUN_REPORT";

/// Overrides the address the front end listens on (an IP address of this host that the compute
/// nodes can reach).
pub const ADDR_VAR: &str = "CMPIRUN_REPORT_ADDR";

/// How long a task tries to reach the front end and waits for its answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

/// How often a task tries when the front end closed its connection without an answer (it drops
/// its oldest connection when too many are open).
const CLIENT_ATTEMPTS: u32 = 3;

/// Longest report line the front end accepts.
const MAX_LINE: usize = 4096;

/// How long after its accept a connection may take to deliver its line (a task writes it as soon
/// as it is connected).
const CONN_DEADLINE: Duration = Duration::from_secs(2);

/// Most report connections the front end holds open at once; accepting one more drops the
/// oldest.
const MAX_CONNS: usize = 128;

/// Most connections one [`Collector::service`] call accepts, so that a flood of connections
/// cannot keep the front end in its accept loop.
const ACCEPTS_PER_ROUND: usize = 64;

/// One report: which rank, how it ended, and (for an abort) its message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The job's token (from [`REPORT_VAR`]).
    pub token: String,
    /// The rank.
    pub rank: u32,
    /// How it ended.
    pub end: RankEnd,
    /// The abort message, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// A node's report of its ranks' clean ends ([`Target::send_clean_ends`]): those ranks
    /// (`0-3,8`), each of which exited 0; `rank` is the first of them and `end` says exited 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<String>,
}

impl Report {
    /// The ranks this report stands for, those below `size`: `rank` alone, or the ranks of a
    /// node's report of clean ends (`None` when that list is malformed, or claims another end
    /// than exited 0).
    pub fn ranks_below(&self, size: u32) -> Option<Vec<u32>> {
        let Some(list) = &self.ranks else {
            return Some(vec![self.rank].into_iter().filter(|&r| r < size).collect());
        };
        if self.end != RankEnd::Exited(0) {
            return None;
        }
        parse_rank_list(list, size)
    }
}

/// `[1, 2, 3, 5]` (sorted) as `1-3,5`.
pub(crate) fn rank_list(ranks: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ranks.len() {
        let mut j = i;
        while j + 1 < ranks.len() && ranks[j + 1] == ranks[j] + 1 {
            j += 1;
        }
        parts.push(if j > i {
            format!("{}-{}", ranks[i], ranks[j])
        } else {
            ranks[i].to_string()
        });
        i = j + 1;
    }
    parts.join(",")
}

/// The ranks of a [`rank_list`] that are below `size` (a range is cut there, so a line of a few
/// bytes cannot make the front end count to four billion); `None` if it is not such a list, or
/// names more ranks than `size` (a node's list names each of its ranks once).
fn parse_rank_list(list: &str, size: u32) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in list.split(',') {
        if out.len() > size as usize {
            return None;
        }
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let r = part.parse::<u32>().ok()?;
                (r, r)
            }
        };
        if a > b {
            return None;
        }
        out.extend(a.min(size)..b.saturating_add(1).min(size));
    }
    Some(out)
}

/// Longest rank list one report of clean ends carries, so that its line stays well under
/// [`MAX_LINE`] with the token and the rest; a node with more sends several.
const CLEAN_ENDS_PER_LINE: usize = 3000;

/// What a node instance does as it ends under srun or hydra: reports the clean ends its members
/// told it of ([`crate::container::InstanceConfig::clean_ends`]) to the front end whose address
/// this process inherited ([`REPORT_VAR`]), in one report (or a few, for very many ranks)
/// instead of one per rank.
pub fn send_clean_ends(ranks: &[u32]) {
    if let Some(t) = Target::from_env() {
        t.send_clean_ends(ranks);
    }
}

/// Why the front end ignored a report line.
#[derive(Debug, thiserror::Error)]
pub enum BadReport {
    /// The line is not a report.
    #[error("a malformed rank report was ignored: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The line is a report with another token.
    #[error("a rank report with a wrong token was ignored")]
    WrongToken,
}

/// What the front end makes of one line a task sent (without its newline): the report, if it
/// carries the job's `token`.
pub fn parse_line(line: &[u8], token: &str) -> Result<Report, BadReport> {
    let report: Report = serde_json::from_slice(line)?;
    if !same_token(&report.token, token) {
        return Err(BadReport::WrongToken);
    }
    Ok(report)
}

/// Where a task reports to, parsed from [`REPORT_VAR`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The job's token.
    pub token: String,
    /// `HOST:PORT` (an IP address, or a name the task resolves).
    pub address: String,
}

impl Target {
    /// Parses `TOKEN@HOST:PORT`.
    pub fn parse(value: &str) -> Option<Target> {
        let (token, address) = value.split_once('@')?;
        if token.is_empty() || address.rsplit_once(':').is_none() {
            return None;
        }
        Some(Target {
            token: token.to_owned(),
            address: address.to_owned(),
        })
    }

    /// The target this task was given, if any.
    pub fn from_env() -> Option<Target> {
        std::env::var(REPORT_VAR)
            .ok()
            .and_then(|v| Target::parse(&v))
    }

    /// Sends the report of `rank` and waits for the front end's answer. Failures are logged,
    /// not returned: the front end then falls back to the launcher's status.
    pub fn send(&self, rank: u32, end: RankEnd, message: Option<String>) {
        let report = Report {
            token: self.token.clone(),
            rank,
            end,
            message,
            ranks: None,
        };
        match self.try_send(&report) {
            Ok(()) => tracing::debug!("reported rank {rank} {end:?} to {}", self.address),
            Err(e) => tracing::warn!(
                "could not report how rank {rank} ended to cmpirun at {}: {e}",
                self.address
            ),
        }
    }

    /// Reports that each of `ranks` exited 0, in as few lines as fit [`MAX_LINE`], one
    /// connection each. Failures are logged: the front end then counts those ranks as never
    /// reported, and fails the job naming their node.
    pub fn send_clean_ends(&self, ranks: &[u32]) {
        let mut ranks = ranks.to_vec();
        ranks.sort_unstable();
        ranks.dedup();
        let mut rest = ranks.as_slice();
        while let Some(&first) = rest.first() {
            // As many ranks as make a list of at most CLEAN_ENDS_PER_LINE bytes.
            let (mut take, mut list) = (rest.len(), rank_list(rest));
            while list.len() > CLEAN_ENDS_PER_LINE && take > 1 {
                take = take.div_ceil(2);
                list = rank_list(&rest[..take]);
            }
            let report = Report {
                token: self.token.clone(),
                rank: first,
                end: RankEnd::Exited(0),
                message: None,
                ranks: Some(list),
            };
            match self.try_send(&report) {
                Ok(()) => tracing::debug!(
                    "reported the clean end of ranks {} to {}",
                    report.ranks.as_deref().unwrap_or_default(),
                    self.address
                ),
                Err(e) => tracing::warn!(
                    "could not report the clean end of ranks {} to cmpirun at {}: {e}",
                    report.ranks.as_deref().unwrap_or_default(),
                    self.address
                ),
            }
            rest = &rest[take..];
        }
    }

    fn try_send(&self, report: &Report) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(report).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut attempt = 1;
        loop {
            match self.send_once(&line) {
                Err(e) if attempt < CLIENT_ATTEMPTS && dropped_by_peer(&e) => {
                    tracing::debug!("the report connection was dropped ({e}); trying again");
                    std::thread::sleep(Duration::from_millis(100) * attempt);
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// The socket addresses to try, in order: `HOST:PORT` resolved; with `a,b:PORT` each of
    /// the listed hosts; with `*:PORT` the address srun gave this task for its launch node
    /// ([`LAUNCH_NODE_VARS`]).
    fn candidates(&self) -> std::io::Result<Vec<SocketAddr>> {
        self.candidates_with(|v| std::env::var(v).ok())
    }

    /// [`Self::candidates`], with the task's environment read through `env`.
    fn candidates_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> std::io::Result<Vec<SocketAddr>> {
        let bad = || std::io::Error::new(ErrorKind::InvalidInput, "no port in the address");
        let (hosts, port) = self.address.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let hosts: Vec<String> = if hosts == LAUNCH_NODE {
            LAUNCH_NODE_VARS
                .iter()
                .filter_map(|v| env(v).filter(|h| !h.is_empty()))
                .collect()
        } else {
            hosts.split(',').map(str::to_owned).collect()
        };
        let mut out = Vec::new();
        for h in hosts {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            match (h, port).to_socket_addrs() {
                Ok(addrs) => out.extend(addrs.filter(|a| !out.contains(a)).collect::<Vec<_>>()),
                Err(e) => tracing::debug!("report address {h}: {e}"),
            }
        }
        Ok(out)
    }

    fn send_once(&self, line: &[u8]) -> std::io::Result<()> {
        let mut last = std::io::Error::new(ErrorKind::NotFound, "the address does not resolve");
        for addr in self.candidates()? {
            match TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT) {
                Ok(mut s) => {
                    s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
                    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
                    s.write_all(line)?;
                    let mut ack = [0u8; 3];
                    s.read_exact(&mut ack)?;
                    return if &ack == b"ok\n" {
                        Ok(())
                    } else {
                        Err(std::io::Error::other("unexpected answer"))
                    };
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// Whether the front end closed a report connection without answering (what it does to its
/// oldest connection when too many are open).
fn dropped_by_peer(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
    )
}

/// Compares two tokens in a time that does not depend on where they differ.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Whether `name` (a node of the layout) is this host.
fn is_this_host(name: &str, host: &str) -> bool {
    let short = |n: &str| n.split('.').next().unwrap_or(n).to_owned();
    name == host
        || name == "localhost"
        || short(name) == short(host)
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host part of the report address that tells a task under srun to use its launch node's
/// address ([`LAUNCH_NODE_VARS`]).
const LAUNCH_NODE: &str = "*";

/// What srun tells every task about the node it was launched from (where srun, and so the front
/// end, runs), in the order a task tries them: addresses the nodes reach it at, since slurmd
/// connects back to srun through them.
pub const LAUNCH_NODE_VARS: [&str; 2] = ["SLURM_LAUNCH_NODE_IPADDR", "SLURM_SRUN_COMM_HOST"];

/// Where the front end listens, and the host part of the address it hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Choice {
    /// The address to bind.
    listen: SocketAddr,
    /// An IP address, [`LAUNCH_NODE`], or a comma-separated list of IP addresses.
    advertised: String,
    /// Why, for the debug log.
    reason: &'static str,
    /// Whether a node of the job is another host.
    remote: bool,
}

/// The address to listen on and the one to hand out, never a name or address that is loopback
/// when a task may run on another node:
///
/// 1. [`ADDR_VAR`], if set;
/// 2. loopback when every node is this host;
/// 3. the address this host uses to reach another node of the job (the route to it), when the
///    node names resolve here;
/// 4. under srun ([`LAUNCH_NODE`]): every address, handed out as `*`, which a task replaces with
///    the launch node's address srun gave it;
/// 5. a non-loopback address the host name resolves to;
/// 6. every address, handed out as the list of this host's non-loopback addresses (a task tries
///    each).
fn choose_address(nodes: &[String], srun: bool) -> Choice {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    let remote = nodes.iter().any(|n| !is_this_host(n, &host));
    let one = |ip: IpAddr, reason| Choice {
        listen: SocketAddr::new(ip, 0),
        advertised: ip.to_string(),
        reason,
        remote,
    };
    let every = |advertised: String, reason| Choice {
        listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        advertised,
        reason,
        remote,
    };
    if let Ok(v) = std::env::var(ADDR_VAR) {
        match v.parse::<IpAddr>() {
            Ok(ip) => return one(ip, "CMPIRUN_REPORT_ADDR"),
            Err(_) => tracing::warn!("{ADDR_VAR}={v:?} is not an IP address; ignored"),
        }
    }
    let others: Vec<&String> = nodes.iter().filter(|n| !is_this_host(n, &host)).collect();
    if others.is_empty() {
        return one(IpAddr::V4(Ipv4Addr::LOCALHOST), "every node is this host");
    }
    if let Some(ip) = route_to(&others) {
        return one(ip, "the route to another node of the job");
    }
    if srun {
        return every(LAUNCH_NODE.to_owned(), "srun's launch node address");
    }
    if let Ok(addrs) = (host.as_str(), 0).to_socket_addrs()
        && let Some(a) = addrs.into_iter().find(|a| !a.ip().is_loopback())
    {
        return one(a.ip(), "the host name's address");
    }
    let mine: Vec<String> = nix::ifaddrs::getifaddrs()
        .map(|ifs| {
            ifs.filter_map(|i| i.address?.as_sockaddr_in().map(|a| IpAddr::V4(a.ip())))
                .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
                .map(|ip| ip.to_string())
                .collect()
        })
        .unwrap_or_default();
    let mut mine_unique: Vec<String> = Vec::new();
    for a in mine {
        if !mine_unique.contains(&a) {
            mine_unique.push(a);
        }
    }
    if mine_unique.is_empty() {
        // No address but loopback: nothing else could reach this host anyway.
        return one(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "this host has no other address",
        );
    }
    every(mine_unique.join(","), "this host's addresses")
}

/// The address this host uses to reach one of `others` (the kernel's route to it), for the
/// first few of them whose names resolve here.
fn route_to(others: &[&String]) -> Option<IpAddr> {
    for node in others.iter().take(4) {
        let Ok(addrs) = (node.as_str(), 9).to_socket_addrs() else {
            continue;
        };
        for a in addrs {
            let unspec: SocketAddr = match a {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            // Connecting a UDP socket sends nothing: it only asks the kernel for the route.
            let local =
                UdpSocket::bind(unspec).and_then(|s| s.connect(a).and_then(|()| s.local_addr()));
            if let Ok(l) = local
                && !l.ip().is_loopback()
                && !l.ip().is_unspecified()
            {
                return Some(l.ip());
            }
        }
    }
    None
}

/// The queue of connections the kernel completes before cmpirun accepts them: the end of a large
/// job brings a node's tasks' reports at once, and every node's. The standard library's 128
/// drops the connections beyond (their tasks try again a second later); the kernel caps this
/// at `net.core.somaxconn` (4096 by default).
const LISTEN_BACKLOG: i32 = 4096;

/// A TCP listener on `addr` with a backlog of [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket,
        sockopt,
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    let backlog = Backlog::new(LISTEN_BACKLOG).unwrap_or(Backlog::MAXCONN);
    nix::sys::socket::listen(&fd, backlog)?;
    Ok(TcpListener::from(fd))
}

fn token() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// One report connection being read.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    accepted: Instant,
}

impl Conn {
    /// Reads what the connection has without blocking; returns whether to keep it open (no
    /// complete line yet, within its deadline and size). A line with the token is answered `ok`
    /// and pushed to `reports`; anything else is dropped with a debug log.
    fn step(&mut self, token: &str, now: Instant, reports: &mut Vec<Report>) -> bool {
        let mut chunk = [0u8; 1024];
        let mut closed = false;
        while !self.buf.contains(&b'\n') && self.buf.len() <= MAX_LINE {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!("rank reports: a connection failed: {e}");
                    return false;
                }
            }
        }
        let Some(end) = self.buf.iter().position(|&b| b == b'\n') else {
            let why = if self.buf.len() > MAX_LINE {
                "sent a line too long"
            } else if closed {
                "closed before a full line"
            } else if now.saturating_duration_since(self.accepted) >= CONN_DEADLINE {
                "sent no full line in time"
            } else {
                return true;
            };
            tracing::debug!("rank reports: a connection {why}; dropped");
            return false;
        };
        match parse_line(&self.buf[..end], token) {
            Ok(r) => {
                // Three bytes to a socket nothing was written to yet fit its send buffer: this
                // non-blocking write does not fail for want of room.
                let _ = self.stream.write_all(b"ok\n");
                reports.push(r);
            }
            Err(e) => tracing::debug!("rank reports: {e}"),
        }
        false
    }
}

/// The front end's side: the listening socket and the reports received, in arrival order.
pub struct Collector {
    listener: TcpListener,
    token: String,
    advertised: String,
    conns: Vec<Conn>,
    reachable: Option<IpAddr>,
    remote: bool,
}

impl Collector {
    /// Listens on an address the job's `nodes` can reach (see [`choose_address`]); `srun`: the
    /// tasks are srun's, which tells them its launch node's address.
    pub fn bind(nodes: &[String], srun: bool) -> std::io::Result<Collector> {
        let choice = choose_address(nodes, srun);
        let listener = listen(choice.listen)?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let advertised = match choice.advertised.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port).to_string(),
            Err(_) => format!("{}:{port}", choice.advertised),
        };
        tracing::debug!(
            "rank reports: listening on {}, handed out as {advertised} ({})",
            SocketAddr::new(choice.listen.ip(), port),
            choice.reason
        );
        let ip = choice.listen.ip();
        Ok(Collector {
            listener,
            token: token()?,
            advertised,
            conns: Vec::new(),
            reachable: (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip),
            remote: choice.remote,
        })
    }

    /// The one address of this host the job's other nodes reach it at, when it is known (set,
    /// or the route to them): what hydra's proxies are told to connect back to (`-localhost`).
    pub fn reachable(&self) -> Option<IpAddr> {
        self.reachable
    }

    /// Whether a node of the job is another host than this one.
    pub fn remote(&self) -> bool {
        self.remote
    }

    /// The value of [`REPORT_VAR`] for the tasks.
    pub fn env_value(&self) -> String {
        format!("{}@{}", self.token, self.advertised)
    }

    /// The descriptors to poll for reading: the listener, then each open connection.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        std::iter::once(self.listener.as_fd())
            .chain(self.conns.iter().map(|c| c.stream.as_fd()))
            .collect()
    }

    /// Reads whatever is ready and accepts new connections, without blocking; returns the
    /// complete reports, in the order they arrived. Connections past their deadline are closed.
    pub fn service(&mut self) -> Vec<Report> {
        let now = Instant::now();
        let mut reports = Vec::new();
        let token = self.token.as_str();
        // What waits in open connections is read before any of them is judged late.
        self.conns.retain_mut(|c| c.step(token, now, &mut reports));
        for _ in 0..ACCEPTS_PER_ROUND {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if self.conns.len() >= MAX_CONNS {
                        tracing::debug!(
                            "rank reports: {MAX_CONNS} connections open; the oldest was dropped"
                        );
                        self.conns.remove(0);
                    }
                    let mut c = Conn {
                        stream,
                        buf: Vec::new(),
                        accepted: now,
                    };
                    if c.step(token, now, &mut reports) {
                        self.conns.push(c);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors: the oldest connection gives its one back.
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
                        && !self.conns.is_empty()
                    {
                        tracing::debug!("rank reports: {e}; the oldest connection was dropped");
                        self.conns.remove(0);
                    }
                    break;
                }
            }
        }
        reports
    }

    /// Reads what is still on its way for up to `wait` (the launcher has exited; every task
    /// that reported was answered before it exited, so this only catches stragglers).
    pub fn drain(&mut self, wait: Duration) -> Vec<Report> {
        let until = Instant::now() + wait;
        let mut out = self.service();
        while !self.conns.is_empty() && Instant::now() < until {
            let mut pfds: Vec<nix::poll::PollFd> = self
                .fds()
                .into_iter()
                .map(|fd| nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN))
                .collect();
            let ms = until
                .saturating_duration_since(Instant::now())
                .as_millis()
                .clamp(1, 1000) as u16;
            let _ = nix::poll::poll(&mut pfds, ms);
            drop(pfds);
            out.extend(self.service());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("abc@127.0.0.1:4000").unwrap();
        assert_eq!(
            (t.token.as_str(), t.address.as_str()),
            ("abc", "127.0.0.1:4000")
        );
        assert_eq!(
            Target::parse("abc@[::1]:4000").unwrap().address,
            "[::1]:4000"
        );
        assert_eq!(Target::parse("@h:1"), None);
        assert_eq!(Target::parse("abc"), None);
        assert_eq!(Target::parse("abc@host"), None);
    }

    #[test]
    fn candidate_addresses() {
        let t = |a: &str| Target {
            token: "t".into(),
            address: a.into(),
        };
        let none = |_: &str| None;
        let srun = |v: &str| match v {
            "SLURM_LAUNCH_NODE_IPADDR" => Some("10.77.0.1".to_owned()),
            "SLURM_SRUN_COMM_HOST" => Some("10.77.0.2".to_owned()),
            _ => None,
        };
        let addrs = |a: &str, env: &dyn Fn(&str) -> Option<String>| -> Vec<String> {
            t(a).candidates_with(env)
                .unwrap()
                .iter()
                .map(|a| a.to_string())
                .collect()
        };
        assert_eq!(addrs("*:4000", &srun), ["10.77.0.1:4000", "10.77.0.2:4000"]);
        assert!(addrs("*:4000", &none).is_empty());
        assert_eq!(
            addrs("192.0.2.2,10.77.0.1,192.0.2.2:9", &none),
            ["192.0.2.2:9", "10.77.0.1:9"]
        );
        assert_eq!(addrs("[::1]:9", &none), ["[::1]:9"]);
        assert!(t("*").candidates_with(none).is_err());
    }

    #[test]
    fn a_job_on_other_nodes_never_gets_a_loopback_address() {
        // Names that do not resolve here: srun's launch node, or this host's addresses.
        let nodes = ["cmpirun-no-such-node-1".to_owned()];
        let srun = choose_address(&nodes, true);
        assert_eq!(srun.advertised, LAUNCH_NODE);
        assert!(srun.remote && srun.listen.ip().is_unspecified());
        let other = choose_address(&nodes, false);
        assert!(other.remote);
        for a in other.advertised.split(',') {
            let ip: IpAddr = a.parse().unwrap();
            // Loopback only on a host that has no other address at all.
            assert!(!ip.is_loopback() || other.reason == "this host has no other address");
        }
    }

    #[test]
    fn this_host() {
        assert!(is_this_host("vm", "vm"));
        assert!(is_this_host("vm.example.org", "vm"));
        assert!(is_this_host("localhost", "vm"));
        assert!(is_this_host("127.0.0.1", "vm"));
        assert!(!is_this_host("node2", "vm"));
    }

    #[test]
    fn a_one_node_job_listens_on_loopback() {
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        let c = choose_address(&[host], false);
        assert!(c.listen.ip().is_loopback(), "{c:?}");
        assert_eq!(c.advertised, "127.0.0.1");
    }

    #[test]
    fn reports_arrive_in_order_and_need_the_token() {
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        let mut c = Collector::bind(&[host], false).unwrap();
        let target = Target::parse(&c.env_value()).unwrap();
        let wrong = Target {
            token: "nope".into(),
            address: target.address.clone(),
        };
        let senders = std::thread::spawn(move || {
            target.send(1, RankEnd::Aborted(7), Some("MPI_Abort".into()));
            wrong.send(2, RankEnd::Exited(3), None);
            target.send(3, RankEnd::Signaled(15), None);
        });
        let mut got = Vec::new();
        let until = Instant::now() + Duration::from_secs(20);
        while got.len() < 2 && Instant::now() < until {
            got.extend(c.drain(Duration::from_millis(50)));
        }
        senders.join().unwrap();
        let ends: Vec<(u32, RankEnd)> = got.iter().map(|r| (r.rank, r.end)).collect();
        assert_eq!(ends, [(1, RankEnd::Aborted(7)), (3, RankEnd::Signaled(15))]);
        assert_eq!(got[0].message.as_deref(), Some("MPI_Abort"));
    }

    #[test]
    fn rank_lists_round_trip_and_are_cut_at_the_job_size() {
        let ranks = [0, 1, 2, 3, 8, 10, 11];
        assert_eq!(rank_list(&ranks), "0-3,8,10-11");
        assert_eq!(parse_rank_list("0-3,8,10-11", 100).unwrap(), ranks);
        assert_eq!(parse_rank_list("5-4294967295", 8).unwrap(), [5, 6, 7]);
        assert_eq!(parse_rank_list("4294967295", 8).unwrap(), Vec::<u32>::new());
        // Overlapping ranges cannot multiply the work: more ranks than the job has is no list.
        let overlapping = vec!["0-4294967295"; 300].join(",");
        assert_eq!(parse_rank_list(&overlapping, 1000), None);
        for bad in ["", "3-1", "a", "1-", "-1", "1,,2", "1-2-3"] {
            assert_eq!(parse_rank_list(bad, 8), None, "{bad:?}");
        }
        let report = |end, ranks: Option<&str>| Report {
            token: String::new(),
            rank: 9,
            end,
            message: None,
            ranks: ranks.map(str::to_owned),
        };
        assert_eq!(
            report(RankEnd::Exited(3), None).ranks_below(10),
            Some(vec![9])
        );
        assert_eq!(
            report(RankEnd::Exited(3), None).ranks_below(9),
            Some(vec![])
        );
        assert_eq!(
            report(RankEnd::Exited(0), Some("1-2")).ranks_below(10),
            Some(vec![1, 2])
        );
        // A list stands only for clean ends.
        assert_eq!(
            report(RankEnd::Exited(3), Some("1-2")).ranks_below(10),
            None
        );
    }

    #[test]
    fn a_node_reports_its_clean_ends_in_few_lines() {
        let (mut c, target) = loopback();
        // 128 ranks of a node placed cyclically on 1,000 nodes: no two consecutive, long numbers.
        let ranks: Vec<u32> = (0..128).map(|i| 7 + i * 1000).collect();
        let many: Vec<u32> = (0..2000).map(|i| 200_000 + 2 * i).collect();
        let sender = {
            let (t, ranks, many) = (target.clone(), ranks.clone(), many.clone());
            std::thread::spawn(move || {
                t.send_clean_ends(&ranks);
                t.send_clean_ends(&many);
            })
        };
        let got = while_running(&mut c, sender);
        let lines: Vec<&Report> = got.iter().collect();
        assert!(lines.iter().all(|r| r.end == RankEnd::Exited(0)));
        let seen: Vec<u32> = lines
            .iter()
            .flat_map(|r| r.ranks_below(u32::MAX).unwrap())
            .collect();
        let mut want = ranks.clone();
        want.extend(&many);
        assert_eq!(seen, want);
        // One line for the node of 128; the 2,000 (14 KiB of list) in a few.
        assert_eq!(lines[0].ranks_below(u32::MAX).unwrap(), ranks);
        assert!(lines.len() <= 9, "{} lines", lines.len());
    }

    /// A collector on loopback and the target its tasks get.
    fn loopback() -> (Collector, Target) {
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        let c = Collector::bind(&[host], false).unwrap();
        let t = Target::parse(&c.env_value()).unwrap();
        assert!(t.address.starts_with("127.0.0.1:"), "{}", t.address);
        (c, t)
    }

    /// Services `c` until `want` reports arrived or `limit` passed; returns them and the longest
    /// single `service` call.
    fn collect(c: &mut Collector, want: usize, limit: Duration) -> (Vec<Report>, Duration) {
        let until = Instant::now() + limit;
        let (mut got, mut longest) = (Vec::new(), Duration::ZERO);
        while got.len() < want && Instant::now() < until {
            let t = Instant::now();
            got.extend(c.service());
            longest = longest.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(5));
        }
        (got, longest)
    }

    /// Services `c` until `work` has finished (at most 30 s); returns the reports.
    fn while_running(c: &mut Collector, work: std::thread::JoinHandle<()>) -> Vec<Report> {
        let until = Instant::now() + Duration::from_secs(30);
        let mut got = Vec::new();
        while !work.is_finished() && Instant::now() < until {
            got.extend(c.service());
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(work.is_finished(), "the clients did not finish");
        work.join().unwrap();
        got
    }

    #[test]
    fn a_thousand_tasks_ending_at_once_all_get_their_report_in() {
        // Every task reports its end, a clean one too: at the end of a job they all arrive at
        // once, many more than the connections the front end holds.
        let (mut c, target) = loopback();
        let n = 1000u32;
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(n as usize));
        let clients: Vec<_> = (0..n)
            .map(|rank| {
                let t = target.clone();
                let b = barrier.clone();
                std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        b.wait();
                        t.send(rank, RankEnd::Exited(0), None);
                    })
                    .unwrap()
            })
            .collect();
        let start = Instant::now();
        let (got, _) = collect(&mut c, n as usize, Duration::from_secs(60));
        let took = start.elapsed();
        for t in clients {
            t.join().unwrap();
        }
        let ranks: std::collections::BTreeSet<u32> = got.iter().map(|r| r.rank).collect();
        assert_eq!(
            ranks.len(),
            n as usize,
            "{} of {n} reports in {took:?}",
            ranks.len()
        );
    }

    #[test]
    fn wrong_tokens_garbage_half_and_huge_lines_are_dropped() {
        let (mut c, target) = loopback();
        let addr = target.address.clone();
        let token = target.token.clone();
        let flood = std::thread::spawn(move || {
            let send = |bytes: &[u8]| {
                let a: SocketAddr = addr.parse().unwrap();
                if let Ok(mut s) = TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                    let _ = s.write_all(bytes);
                }
            };
            for i in 0..40u32 {
                let bad = Report {
                    token: format!("{token}{i}"),
                    rank: i,
                    end: RankEnd::Exited(9),
                    message: None,
                    ranks: None,
                };
                let mut line = serde_json::to_vec(&bad).unwrap();
                line.push(b'\n');
                send(&line);
                let mut wrong_same_length = bad.clone();
                wrong_same_length.token = "0".repeat(token.len());
                let mut line = serde_json::to_vec(&wrong_same_length).unwrap();
                line.push(b'\n');
                send(&line);
                send(b"\xff\xfe garbage \x00\x01\n");
                send(br#"{"token":"half"#);
                send(&vec![b'{'; 64 * 1024]);
            }
        });
        let early = while_running(&mut c, flood);
        assert!(early.is_empty(), "{early:?}");
        let sender = std::thread::spawn(move || target.send(2, RankEnd::Exited(3), None));
        let (got, longest) = collect(&mut c, 1, Duration::from_secs(10));
        sender.join().unwrap();
        // Nothing else arrives later either.
        let (more, _) = collect(&mut c, 1, Duration::from_millis(300));
        let ends: Vec<(u32, RankEnd)> = got.iter().chain(&more).map(|r| (r.rank, r.end)).collect();
        assert_eq!(ends, [(2, RankEnd::Exited(3))]);
        assert!(
            longest < Duration::from_millis(500),
            "a service call took {longest:?}"
        );
    }

    #[test]
    fn silent_and_slow_clients_neither_delay_a_report_nor_stay_open() {
        let (mut c, target) = loopback();
        let silent: Vec<TcpStream> = (0..20)
            .map(|_| TcpStream::connect(&target.address).unwrap())
            .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let slow: Vec<_> = (0..5)
            .map(|_| {
                let mut s = TcpStream::connect(&target.address).unwrap();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    // One byte a second, for at most 5 s.
                    for b in br#"{"token":"#.iter().take(5) {
                        if stop.load(std::sync::atomic::Ordering::Relaxed)
                            || s.write_all(&[*b]).is_err()
                        {
                            return;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                })
            })
            .collect();
        let _ = collect(&mut c, 1, Duration::from_millis(200));
        let sent = Instant::now();
        let sender = std::thread::spawn(move || target.send(1, RankEnd::Signaled(9), None));
        let (got, longest) = collect(&mut c, 1, Duration::from_secs(10));
        let took = sent.elapsed();
        sender.join().unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].rank, got[0].end), (1, RankEnd::Signaled(9)));
        assert!(took < Duration::from_secs(1), "the report took {took:?}");
        assert!(
            longest < Duration::from_millis(500),
            "a service call took {longest:?}"
        );
        // Past their deadline the silent and slow connections are closed by the front end.
        std::thread::sleep(CONN_DEADLINE + Duration::from_millis(200));
        let _ = c.service();
        assert!(
            c.conns.is_empty(),
            "{} connections still open",
            c.conns.len()
        );
        for mut s in silent {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut b = [0u8; 1];
            assert!(
                matches!(s.read(&mut b), Ok(0) | Err(_)),
                "a silent client was answered"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in slow {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_flood_of_connections_is_capped_and_a_report_still_arrives() {
        let (mut c, target) = loopback();
        let addr = target.address.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let flood = std::thread::spawn(move || {
            for _ in 0..(MAX_CONNS + 72) {
                tx.send(TcpStream::connect(&addr).unwrap()).unwrap();
            }
        });
        let early = while_running(&mut c, flood);
        let held: Vec<TcpStream> = rx.try_iter().collect();
        assert!(early.is_empty() && held.len() == MAX_CONNS + 72);
        assert!(c.conns.len() <= MAX_CONNS, "{} connections", c.conns.len());
        let sent = Instant::now();
        let sender = std::thread::spawn(move || target.send(3, RankEnd::Aborted(7), None));
        let (got, _) = collect(&mut c, 1, Duration::from_secs(10));
        sender.join().unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "{:?}",
            sent.elapsed()
        );
        assert!(same_token("abc", "abc") && !same_token("abc", "abd") && !same_token("ab", "abc"));
    }
}
