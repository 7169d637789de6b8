//! A PMI-1/PMI-2 server for one job on one node.
//!
//! The server owns the process-manager side of every rank's PMI connection and runs one
//! single-threaded `poll(2)` loop over them: no locks, and a fence is just a counter.
//!
//! Life of a job, as the launcher sees it:
//!
//! 1. [`PmiServer::new`] with a [`JobConfig`] (the rank layout, the KVS name, timeouts).
//! 2. For every rank, either [`PmiServer::add_socketpair`] (the rank inherits one end of a
//!    socketpair, `PMI_FD`) or, once, [`PmiServer::listen_tcp`] and then
//!    [`PmiServer::tcp_env`] per rank (`PMI_PORT` + `PMI_ID`).
//! 3. Fork the ranks with the environment returned for each, keeping the rank's descriptor
//!    open across `exec` ([`crate::env::inherit_fd`]), then drop the parent's copy of it so
//!    that a rank that dies is seen as a disconnect.
//! 4. [`PmiServer::start`] runs the loop on its own thread and returns a [`ServerHandle`]
//!    whose [`ServerHandle::events`] channel reports what ranks do ([`Event`]); or
//!    [`PmiServer::run`] runs it on the calling thread with a callback.
//! 5. The loop ends by itself once every rank has finalized, aborted or disconnected, when
//!    [`ServerControl::stop`] is called, or with [`PmiError::ConnectTimeout`] when a rank has not
//!    connected within [`JobConfig::connect_timeout`]. It returns a [`JobReport`].
//!
//! The server never kills anything: an abort or a disconnect is an [`Event`], and the launcher
//! decides what happens to the other ranks. The launcher tells the server when a rank's process
//! has exited ([`ServerControl::rank_exited`]): that is how a rank that never connected over TCP,
//! or whose socket a surviving child process still holds, stops being waited for.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::mapping::format_process_mapping;
use crate::wire::{DEFAULT_MAX_MESSAGE, Decoded, Message, Wire, decode};

/// Limits a PMI-1 client is told (`get_maxes`); the same as hydra's.
const KVSNAME_MAX: usize = 256;
const KEYLEN_MAX: usize = 64;
const VALLEN_MAX: usize = 1024;
/// Unsent replies a connection may accumulate before the client is declared broken.
const MAX_PENDING_OUTPUT: usize = 16 * 1024 * 1024;

/// What the server needs to know about the job.
#[derive(Clone, Debug)]
pub struct JobConfig {
    /// The KVS name / job id the ranks are told (`get_my_kvsname`, `job-getid`, `PMI_JOBID`).
    pub kvsname: String,
    /// The node of every rank; its length is the job size. Ids are relabelled in order of first
    /// appearance for `PMI_process_mapping` and node attributes.
    pub node_of_rank: Vec<u32>,
    /// The MPMD application number of every rank (`get_appnum`); empty means all 0.
    pub appnum_of_rank: Vec<u32>,
    /// Answer to `get_universe_size`; `None` means the job size.
    pub universe_size: Option<u32>,
    /// Largest message accepted from a client.
    pub max_message: usize,
    /// How long ranks may take to send their first PMI message; `None` waits forever (right
    /// for jobs whose programs might not use MPI at all).
    pub connect_timeout: Option<Duration>,
}

impl JobConfig {
    /// A job with this KVS name and layout, every rank in application 0, no connect timeout.
    pub fn new(kvsname: impl Into<String>, node_of_rank: Vec<u32>) -> Self {
        Self {
            kvsname: kvsname.into(),
            node_of_rank,
            appnum_of_rank: Vec::new(),
            universe_size: None,
            max_message: DEFAULT_MAX_MESSAGE,
            connect_timeout: None,
        }
    }

    /// `size` ranks, all on one node.
    pub fn single_node(kvsname: impl Into<String>, size: u32) -> Self {
        Self::new(kvsname, vec![0; size as usize])
    }

    /// Builder: set [`JobConfig::connect_timeout`].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Builder: set [`JobConfig::appnum_of_rank`].
    #[must_use]
    pub fn appnums(mut self, appnum_of_rank: Vec<u32>) -> Self {
        self.appnum_of_rank = appnum_of_rank;
        self
    }
}

/// Errors of the PMI server.
#[derive(Debug, thiserror::Error)]
pub enum PmiError {
    /// The [`JobConfig`] cannot describe a job.
    #[error("invalid PMI job: {0}")]
    InvalidJob(String),
    /// A rank number outside `0..size`.
    #[error("rank {rank} is outside the job of {size} ranks")]
    RankOutOfRange {
        /// The rank asked for.
        rank: u32,
        /// The job size.
        size: u32,
    },
    /// [`PmiServer::add_socketpair`] was called twice for the same rank.
    #[error("rank {0} already has a PMI connection")]
    RankTaken(u32),
    /// A system call failed.
    #[error("PMI server: {what}: {source}")]
    Io {
        /// What the server was doing.
        what: &'static str,
        /// The error from the system.
        #[source]
        source: io::Error,
    },
    /// Some ranks never sent a PMI message in time.
    #[error(
        "ranks {missing:?} did not connect to the PMI server within {timeout:?}; \
         is the program an MPI program, and does its MPI speak PMI-1 or PMI-2?"
    )]
    ConnectTimeout {
        /// The ranks that did not connect.
        missing: Vec<u32>,
        /// The timeout in force.
        timeout: Duration,
    },
    /// The server thread ended without a result (a bug).
    #[error("the PMI server thread ended unexpectedly")]
    ThreadLost,
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> PmiError {
    move |source| PmiError::Io { what, source }
}

/// Something a rank did that the launcher may need to act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The rank sent its first PMI message (or identified itself over TCP).
    Connected {
        /// The rank.
        rank: u32,
    },
    /// The rank called `PMI_Finalize`/`PMI2_Finalize`.
    Finalized {
        /// The rank.
        rank: u32,
    },
    /// The rank asked for the job to be aborted (`MPI_Abort`, or an MPI error).
    Aborted {
        /// The rank.
        rank: u32,
        /// The exit code the client gave (PMI-2 clients that give none: 1).
        exit_code: i32,
        /// The message the client gave, if any.
        message: Option<String>,
    },
    /// The rank's connection closed without `finalize` or `abort`.
    Disconnected {
        /// The rank.
        rank: u32,
        /// Whether it had sent any PMI message; a program that never did was probably not
        /// an MPI program.
        initialized: bool,
        /// Whether other ranks were waiting in a fence for it (those fences now fail).
        mid_fence: bool,
    },
    /// A client sent something the server could not accept; its connection was closed when
    /// the error makes the stream unusable.
    ProtocolError {
        /// The rank, if known (a TCP client may fail before identifying itself).
        rank: Option<u32>,
        /// What was wrong.
        error: String,
    },
    /// Ranks did not connect within the connect timeout; the server stops after this event.
    ConnectTimeout {
        /// The ranks that did not connect.
        missing: Vec<u32>,
    },
}

/// What the server saw over the job's lifetime.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobReport {
    /// KVS puts received (PMI-1 `put`, PMI-2 `kvs-put`).
    pub puts: u64,
    /// KVS and job-attribute gets answered.
    pub gets: u64,
    /// Fences/barriers completed by all ranks.
    pub fences: u64,
    /// Ranks that finalized.
    pub finalized: Vec<u32>,
    /// The first abort: rank, exit code, message.
    pub aborted: Option<(u32, i32, Option<String>)>,
    /// Ranks that disconnected without finalize or abort.
    pub disconnected: Vec<u32>,
    /// Whether the loop ended because [`ServerControl::stop`] was called.
    pub stopped: bool,
}

/// The rank's end of a socketpair, and the environment that tells the rank about it.
#[derive(Debug)]
pub struct RankFd {
    /// The rank's end (close-on-exec; see [`crate::env::inherit_fd`]). Drop it in the parent
    /// once the rank is started.
    pub fd: OwnedFd,
    /// `PMI_FD`, `PMI_RANK`, `PMI_SIZE`, `PMI_JOBID`, with `PMI_FD` naming `fd`'s number. A
    /// launcher that moves the descriptor to another number in the child (`dup2`) builds the
    /// environment for that number with [`crate::env::fd_env`] instead.
    pub env: Vec<(String, String)>,
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send_nosignal(self.fd(), buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Conn {
    stream: Stream,
    rank: Option<u32>,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    Waiting,
    Active,
    Finalized,
    Aborted,
    Gone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Fence,
    Barrier,
}

struct RankState {
    life: Life,
    conn: Option<usize>,
    fence: Option<(Pending, Option<String>)>,
}

/// A deferred `info-getnodeattr;wait=TRUE` reply.
struct NodeWaiter {
    conn: usize,
    node: u32,
    key: String,
    thrid: Option<String>,
}

enum Control {
    Stop,
    RankExited(u32),
}

/// Tells a running server about things only the launcher knows; cloneable, usable from any
/// thread, before and after the loop starts.
#[derive(Clone, Debug)]
pub struct ServerControl {
    wake: std::sync::Arc<UnixStream>,
    tx: mpsc::Sender<Control>,
}

impl ServerControl {
    fn send(&self, c: Control) {
        // A closed channel means the loop has ended, and a full wake pipe that it is about to
        // wake up: nothing to do in either case.
        let _ = self.tx.send(c);
        let _ = send_nosignal(self.wake.as_fd(), b"w");
    }

    /// Ask the loop to end; it returns its [`JobReport`] with `stopped` set.
    pub fn stop(&self) {
        self.send(Control::Stop);
    }

    /// The process of `rank` has exited. If the rank had neither finalized nor aborted, it is
    /// treated like a disconnect ([`Event::Disconnected`], fences fail), even when its socket is
    /// still open or it never connected.
    pub fn rank_exited(&self, rank: u32) {
        self.send(Control::RankExited(rank));
    }
}

/// A server running on its own thread.
#[derive(Debug)]
pub struct ServerHandle {
    events: mpsc::Receiver<Event>,
    control: ServerControl,
    thread: JoinHandle<Result<JobReport, PmiError>>,
}

impl ServerHandle {
    /// The events, in the order they happened. The channel closes when the loop ends.
    pub fn events(&self) -> &mpsc::Receiver<Event> {
        &self.events
    }

    /// A handle to stop the loop or report exited ranks.
    pub fn control(&self) -> ServerControl {
        self.control.clone()
    }

    /// Stop the loop now.
    pub fn stop(&self) {
        self.control.stop();
    }

    /// Wait for the loop to end and return what it saw.
    pub fn join(self) -> Result<JobReport, PmiError> {
        self.thread.join().map_err(|_| PmiError::ThreadLost)?
    }
}

/// The PMI server for one job. See the [module documentation](self) for the sequence of calls.
pub struct PmiServer {
    config: JobConfig,
    size: u32,
    nodes: Vec<u32>,
    mapping: String,
    conns: Vec<Option<Conn>>,
    listener: Option<TcpListener>,
    wake_rx: UnixStream,
    ctl_rx: mpsc::Receiver<Control>,
    control: ServerControl,
    ranks: Vec<RankState>,
    kvs: HashMap<String, String>,
    names: HashMap<String, String>,
    node_attrs: HashMap<(u32, String), String>,
    node_waiters: Vec<NodeWaiter>,
    in_fence: u32,
    report: JobReport,
}

impl std::fmt::Debug for PmiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PmiServer")
            .field("kvsname", &self.config.kvsname)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl PmiServer {
    /// A server for the job `config` describes. Nothing is listening yet.
    pub fn new(config: JobConfig) -> Result<Self, PmiError> {
        let size = u32::try_from(config.node_of_rank.len())
            .map_err(|_| PmiError::InvalidJob("too many ranks".into()))?;
        if size == 0 {
            return Err(PmiError::InvalidJob("the job has no ranks".into()));
        }
        if !config.appnum_of_rank.is_empty() && config.appnum_of_rank.len() != size as usize {
            return Err(PmiError::InvalidJob(format!(
                "{} application numbers for {size} ranks",
                config.appnum_of_rank.len()
            )));
        }
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() < KVSNAME_MAX
                && s.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b';' && b != b'=')
        };
        if !name_ok(&config.kvsname) {
            return Err(PmiError::InvalidJob(format!(
                "KVS name {:?} must be 1-255 printable characters without ';' or '='",
                config.kvsname
            )));
        }
        if config.max_message < 1024 {
            return Err(PmiError::InvalidJob(format!(
                "max_message {} is below the 1024 bytes PMI clients may send",
                config.max_message
            )));
        }
        let nodes = crate::mapping::normalize_nodes(&config.node_of_rank);
        let mut mapping = format_process_mapping(&nodes);
        if mapping.len() > VALLEN_MAX - 1 {
            // Too long for a PMI value: "unknown" makes MPICH exchange host names instead.
            mapping.clear();
        }
        let (wake_rx, wake_tx) = UnixStream::pair().map_err(io_err("creating the wake pipe"))?;
        wake_rx
            .set_nonblocking(true)
            .map_err(io_err("creating the wake pipe"))?;
        wake_tx
            .set_nonblocking(true)
            .map_err(io_err("creating the wake pipe"))?;
        let (tx, ctl_rx) = mpsc::channel();
        let ranks = (0..size)
            .map(|_| RankState {
                life: Life::Waiting,
                conn: None,
                fence: None,
            })
            .collect();
        Ok(Self {
            config,
            size,
            nodes,
            mapping,
            conns: Vec::new(),
            listener: None,
            wake_rx,
            ctl_rx,
            control: ServerControl {
                wake: std::sync::Arc::new(wake_tx),
                tx,
            },
            ranks,
            kvs: HashMap::new(),
            names: HashMap::new(),
            node_attrs: HashMap::new(),
            node_waiters: Vec::new(),
            in_fence: 0,
            report: JobReport::default(),
        })
    }

    /// The number of ranks.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The `PMI_process_mapping` value ranks are given (empty: too long, so "unknown").
    pub fn process_mapping(&self) -> &str {
        &self.mapping
    }

    /// A handle to stop the loop or report exited ranks; usable before and after
    /// [`PmiServer::start`].
    pub fn control(&self) -> ServerControl {
        self.control.clone()
    }

    fn check_rank(&self, rank: u32) -> Result<(), PmiError> {
        if rank >= self.size {
            return Err(PmiError::RankOutOfRange {
                rank,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Create the socketpair for `rank`: the server keeps one end, the rank gets the other.
    pub fn add_socketpair(&mut self, rank: u32) -> Result<RankFd, PmiError> {
        self.check_rank(rank)?;
        if self.ranks[rank as usize].conn.is_some() {
            return Err(PmiError::RankTaken(rank));
        }
        let (ours, theirs) = UnixStream::pair().map_err(io_err("creating a socketpair"))?;
        ours.set_nonblocking(true)
            .map_err(io_err("creating a socketpair"))?;
        let cid = self.add_conn(Stream::Unix(ours), Some(rank));
        self.ranks[rank as usize].conn = Some(cid);
        let fd: OwnedFd = theirs.into();
        let env = crate::env::fd_env(rank, self.size, &self.config.kvsname, fd.as_raw_fd());
        Ok(RankFd { fd, env })
    }

    /// Listen on an ephemeral loopback TCP port for ranks started with [`PmiServer::tcp_env`].
    /// Calling it again returns the same address.
    pub fn listen_tcp(&mut self) -> Result<SocketAddr, PmiError> {
        if let Some(l) = &self.listener {
            return l.local_addr().map_err(io_err("reading the listen address"));
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(io_err("listening on loopback TCP"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("listening on loopback TCP"))?;
        let addr = listener
            .local_addr()
            .map_err(io_err("reading the listen address"))?;
        self.listener = Some(listener);
        Ok(addr)
    }

    /// The environment for `rank` in TCP mode (`PMI_PORT`, `PMI_ID`, …); listens first if
    /// needed.
    pub fn tcp_env(&mut self, rank: u32) -> Result<Vec<(String, String)>, PmiError> {
        self.check_rank(rank)?;
        let addr = self.listen_tcp()?;
        Ok(crate::env::port_env(
            rank,
            self.size,
            &self.config.kvsname,
            &addr.to_string(),
        ))
    }

    /// Run the loop on a new thread.
    pub fn start(self) -> Result<ServerHandle, PmiError> {
        let (tx, rx) = mpsc::channel();
        let control = self.control();
        let thread = std::thread::Builder::new()
            .name(format!("pmi-{}", self.config.kvsname))
            .spawn(move || {
                self.run(|e| {
                    // A dropped receiver only means nobody listens any more.
                    let _ = tx.send(e);
                })
            })
            .map_err(io_err("starting the server thread"))?;
        Ok(ServerHandle {
            events: rx,
            control,
            thread,
        })
    }

    /// Run the loop on this thread until the job is over (see the module documentation),
    /// calling `on_event` for every [`Event`].
    pub fn run(mut self, mut on_event: impl FnMut(Event)) -> Result<JobReport, PmiError> {
        let started = Instant::now();
        let mut events = Vec::new();
        loop {
            for e in events.drain(..) {
                on_event(e);
            }
            if self.job_over() {
                return Ok(self.report);
            }
            let deadline = self
                .config
                .connect_timeout
                .filter(|_| self.ranks.iter().any(|r| r.life == Life::Waiting))
                .map(|t| started + t);
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so the loop does not spin on a sub-millisecond remainder.
                    let ms = left.as_millis().saturating_add(1).min(60_000) as u16;
                    PollTimeout::from(ms)
                }
            };
            if let Some(d) = deadline
                && Instant::now() >= d
            {
                let missing: Vec<u32> = (0..self.size)
                    .filter(|&r| self.ranks[r as usize].life == Life::Waiting)
                    .collect();
                on_event(Event::ConnectTimeout {
                    missing: missing.clone(),
                });
                return Err(PmiError::ConnectTimeout {
                    missing,
                    timeout: self.config.connect_timeout.unwrap_or_default(),
                });
            }
            let ready = self.poll_once(timeout)?;
            if ready.wake && self.take_controls(&mut events) {
                for e in events.drain(..) {
                    on_event(e);
                }
                self.report.stopped = true;
                return Ok(self.report);
            }
            if ready.accept {
                self.accept_all(&mut events);
            }
            for cid in ready.readable {
                self.read_conn(cid, &mut events);
            }
            self.flush_all(&mut events);
        }
    }

    /// Apply what the launcher sent; true when it asked to stop.
    fn take_controls(&mut self, events: &mut Vec<Event>) -> bool {
        let mut sink = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
        let mut stop = false;
        while let Ok(c) = self.ctl_rx.try_recv() {
            match c {
                Control::Stop => stop = true,
                Control::RankExited(rank) if rank < self.size => {
                    match self.ranks[rank as usize].conn {
                        Some(cid) => self.close_conn(cid, events),
                        None => self.mark_gone(rank, events),
                    }
                }
                Control::RankExited(_) => {}
            }
        }
        stop
    }

    fn job_over(&self) -> bool {
        self.ranks
            .iter()
            .all(|r| matches!(r.life, Life::Finalized | Life::Aborted | Life::Gone))
            && self.conns.iter().flatten().all(|c| c.outbuf.is_empty())
    }

    fn poll_once(&mut self, timeout: PollTimeout) -> Result<Ready, PmiError> {
        let mut ids = Vec::new();
        let mut fds = vec![PollFd::new(self.wake_rx.as_fd(), PollFlags::POLLIN)];
        if let Some(l) = &self.listener {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        let first_conn = fds.len();
        for (cid, conn) in self.conns.iter().enumerate() {
            if let Some(conn) = conn {
                let mut flags = PollFlags::POLLIN;
                if !conn.outbuf.is_empty() {
                    flags |= PollFlags::POLLOUT;
                }
                fds.push(PollFd::new(conn.stream.fd(), flags));
                ids.push(cid);
            }
        }
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(Ready::default()),
            Err(e) => {
                return Err(PmiError::Io {
                    what: "waiting for PMI clients",
                    source: e.into(),
                });
            }
        }
        let hit = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        let mut ready = Ready {
            wake: hit(&fds[0]),
            accept: self.listener.is_some() && hit(&fds[1]),
            readable: Vec::new(),
        };
        for (i, fd) in fds[first_conn..].iter().enumerate() {
            if hit(fd) {
                ready.readable.push(ids[i]);
            }
        }
        Ok(ready)
    }

    fn add_conn(&mut self, stream: Stream, rank: Option<u32>) -> usize {
        let conn = Conn {
            stream,
            rank,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
        };
        match self.conns.iter().position(Option::is_none) {
            Some(i) => {
                self.conns[i] = Some(conn);
                i
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        }
    }

    fn accept_all(&mut self, events: &mut Vec<Event>) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        events.push(Event::ProtocolError {
                            rank: None,
                            error: format!("cannot use an accepted connection: {e}"),
                        });
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    self.add_conn(Stream::Tcp(stream), None);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: report, keep serving the connections we have.
                    events.push(Event::ProtocolError {
                        rank: None,
                        error: format!("accepting a PMI connection failed: {e}"),
                    });
                    return;
                }
            }
        }
    }

    fn read_conn(&mut self, cid: usize, events: &mut Vec<Event>) {
        let mut chunk = [0u8; 16 * 1024];
        let mut eof = false;
        loop {
            let Some(conn) = self.conns[cid].as_mut() else {
                return;
            };
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    conn.inbuf.extend_from_slice(&chunk[..n]);
                    // A short read drained the socket; poll is level-triggered, so more data or
                    // the end of file wakes the loop again. This saves a WouldBlock read per
                    // message, half of the server's system calls.
                    if n < chunk.len() || conn.inbuf.len() > self.config.max_message + chunk.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // ECONNRESET and the like: the peer is gone.
                    eof = true;
                    break;
                }
            }
        }
        // Handle every whole message received, then the close.
        loop {
            let Some(conn) = self.conns[cid].as_mut() else {
                return;
            };
            match decode(&conn.inbuf, self.config.max_message) {
                Ok(Decoded::Message(msg, used)) => {
                    conn.inbuf.drain(..used);
                    self.handle(cid, msg, events);
                }
                Ok(Decoded::Incomplete) => break,
                Err(e) => {
                    let rank = conn.rank;
                    events.push(Event::ProtocolError {
                        rank,
                        error: e.to_string(),
                    });
                    self.close_conn(cid, events);
                    return;
                }
            }
        }
        if eof {
            if let Some(conn) = self.conns[cid].as_ref()
                && !conn.inbuf.is_empty()
            {
                events.push(Event::ProtocolError {
                    rank: conn.rank,
                    error: format!(
                        "connection closed in the middle of a message ({} bytes received: {:?})",
                        conn.inbuf.len(),
                        String::from_utf8_lossy(&conn.inbuf[..conn.inbuf.len().min(40)])
                    ),
                });
            }
            self.close_conn(cid, events);
        }
    }

    fn flush_all(&mut self, events: &mut Vec<Event>) {
        for cid in 0..self.conns.len() {
            let Some(conn) = self.conns[cid].as_mut() else {
                continue;
            };
            let mut broken = false;
            while !conn.outbuf.is_empty() {
                match conn.stream.write(&conn.outbuf) {
                    Ok(0) => {
                        broken = true;
                        break;
                    }
                    Ok(n) => {
                        conn.outbuf.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
            if !broken && conn.outbuf.len() > MAX_PENDING_OUTPUT {
                events.push(Event::ProtocolError {
                    rank: conn.rank,
                    error: format!(
                        "client does not read its replies ({} bytes pending)",
                        conn.outbuf.len()
                    ),
                });
                broken = true;
            }
            if broken {
                // Unsent replies cannot matter to a peer that is gone.
                conn.outbuf.clear();
                self.close_conn(cid, events);
            }
        }
    }

    fn close_conn(&mut self, cid: usize, events: &mut Vec<Event>) {
        let Some(conn) = self.conns[cid].take() else {
            return;
        };
        self.node_waiters.retain(|w| w.conn != cid);
        let Some(rank) = conn.rank else {
            return;
        };
        if self.ranks[rank as usize].conn == Some(cid) {
            self.ranks[rank as usize].conn = None;
        }
        self.mark_gone(rank, events);
    }

    /// A rank that had neither finalized nor aborted is gone: report it, fail the fence.
    fn mark_gone(&mut self, rank: u32, events: &mut Vec<Event>) {
        let in_fence = self.in_fence;
        let state = &mut self.ranks[rank as usize];
        if matches!(state.life, Life::Waiting | Life::Active) {
            let initialized = state.life == Life::Active;
            let own = u32::from(state.fence.take().is_some());
            self.in_fence -= own;
            state.life = Life::Gone;
            self.report.disconnected.push(rank);
            events.push(Event::Disconnected {
                rank,
                initialized,
                mid_fence: in_fence - own > 0,
            });
            self.fail_fence(&format!("rank {rank} disconnected"));
        }
    }

    fn send(&mut self, cid: usize, msg: &Message) {
        if let Some(conn) = self.conns[cid].as_mut() {
            conn.outbuf.extend_from_slice(&msg.encode());
        }
    }

    /// The reply skeleton for `query`: same wire, `thrid` echoed.
    fn reply(query: &Message, cmd: &str) -> Message {
        let mut m = Message::new(query.wire, cmd);
        if let Some(t) = query.get("thrid") {
            m.push("thrid", t);
        }
        m
    }

    fn error_reply(query: &Message, cmd: &str, text: &str) -> Message {
        let mut m = Self::reply(query, cmd).with("rc", "-1");
        match query.wire {
            // PMI-1 values end at a space; old clients print msg as is.
            Wire::V1 => m.push("msg", text.replace(' ', "_")),
            Wire::V2 => m.push("errmsg", text),
        }
        m
    }

    fn rank_of(&self, cid: usize) -> Option<u32> {
        self.conns[cid].as_ref().and_then(|c| c.rank)
    }

    fn bind(&mut self, cid: usize, rank: u32, events: &mut Vec<Event>) -> Result<(), String> {
        if rank >= self.size {
            return Err(format!(
                "rank {rank} is outside the job of {} ranks",
                self.size
            ));
        }
        let state = &self.ranks[rank as usize];
        if state.conn.is_some_and(|c| c != cid) || state.life != Life::Waiting {
            return Err(format!("rank {rank} is already connected"));
        }
        self.ranks[rank as usize].conn = Some(cid);
        if let Some(conn) = self.conns[cid].as_mut() {
            conn.rank = Some(rank);
        }
        self.mark_active(rank, events);
        Ok(())
    }

    fn mark_active(&mut self, rank: u32, events: &mut Vec<Event>) {
        let state = &mut self.ranks[rank as usize];
        if state.life == Life::Waiting {
            state.life = Life::Active;
            events.push(Event::Connected { rank });
        }
    }

    fn handle(&mut self, cid: usize, msg: Message, events: &mut Vec<Event>) {
        let rank = self.rank_of(cid);
        // Identification and version negotiation are the only messages allowed before the
        // server knows the rank (TCP mode).
        match (msg.wire, msg.cmd.as_str()) {
            (Wire::V1, "init") => {
                if let Some(r) = rank {
                    self.mark_active(r, events);
                }
                let (v, sub) = if msg.get_int("pmi_version") == Some(2) {
                    ("2", "0")
                } else {
                    // 1.1: no tagged/group barriers, which this server does not offer.
                    ("1", "1")
                };
                let m = Self::reply(&msg, "response_to_init")
                    .with("rc", "0")
                    .with("pmi_version", v)
                    .with("pmi_subversion", sub);
                self.send(cid, &m);
                return;
            }
            (Wire::V1, "initack") => {
                let id = msg.get_int("pmiid").and_then(|i| u32::try_from(i).ok());
                let result = match (id, rank) {
                    (Some(id), None) => self.bind(cid, id, events).map(|()| id),
                    (Some(id), Some(r)) if id == r => Ok(r),
                    (None, _) => Err("initack without a valid pmiid".to_owned()),
                    (Some(id), Some(r)) => Err(format!("pmiid {id} on the connection of rank {r}")),
                };
                match result {
                    Ok(r) => {
                        let size = self.size.to_string();
                        let rank = r.to_string();
                        let m = Self::reply(&msg, "initack")
                            .with("rc", "0")
                            .with("rank", &rank)
                            .with("size", &size)
                            .with("appnum", self.appnum(r).to_string())
                            .with("debug", "0");
                        self.send(cid, &m);
                        // Every PMI-1 client reads these three lines after initack.
                        for (k, v) in [("size", size.as_str()), ("rank", &rank), ("debug", "0")] {
                            self.send(cid, &Message::new(Wire::V1, "set").with(k, v));
                        }
                    }
                    Err(e) => self.reject(cid, &msg, "initack", &e, events),
                }
                return;
            }
            (Wire::V2, "fullinit") => {
                let claimed = ["pmirank", "pmiid", "srcid"]
                    .iter()
                    .find_map(|k| msg.get_int(k))
                    .and_then(|i| u32::try_from(i).ok());
                let result = match (rank, claimed) {
                    // The transport knows better than the client (PMI_ID may differ from rank).
                    (Some(r), _) => {
                        self.mark_active(r, events);
                        Ok(r)
                    }
                    (None, Some(c)) => self.bind(cid, c, events).map(|()| c),
                    (None, None) => Err("fullinit without pmirank on a TCP connection".into()),
                };
                match result {
                    Ok(r) => {
                        let m = Self::reply(&msg, "fullinit-response")
                            .with("rc", "0")
                            .with("pmi-version", "2")
                            .with("pmi-subversion", "0")
                            .with("rank", r.to_string())
                            .with("size", self.size.to_string())
                            .with("appnum", self.appnum(r).to_string())
                            .with("debugged", "FALSE")
                            .with("pmiverbose", "FALSE");
                        self.send(cid, &m);
                    }
                    Err(e) => self.reject(cid, &msg, "fullinit-response", &e, events),
                }
                return;
            }
            _ => {}
        }
        let Some(rank) = rank else {
            let e = format!("command {:?} before initack/fullinit", msg.cmd);
            events.push(Event::ProtocolError {
                rank: None,
                error: e,
            });
            self.close_conn(cid, events);
            return;
        };
        self.mark_active(rank, events);
        match msg.wire {
            Wire::V1 => self.handle_v1(cid, rank, msg, events),
            Wire::V2 => self.handle_v2(cid, rank, msg, events),
        }
    }

    fn reject(&mut self, cid: usize, msg: &Message, cmd: &str, e: &str, events: &mut Vec<Event>) {
        let rank = self.rank_of(cid);
        self.send(cid, &Self::error_reply(msg, cmd, e));
        events.push(Event::ProtocolError {
            rank,
            error: e.to_owned(),
        });
    }

    fn appnum(&self, rank: u32) -> u32 {
        self.config
            .appnum_of_rank
            .get(rank as usize)
            .copied()
            .unwrap_or(0)
    }

    fn universe(&self) -> u32 {
        self.config.universe_size.unwrap_or(self.size)
    }

    /// Job attributes: what `get` of a `PMI_` key and `info-getjobattr` answer.
    fn job_attr(&self, key: &str) -> Option<String> {
        match key {
            "PMI_process_mapping" if !self.mapping.is_empty() => Some(self.mapping.clone()),
            "universeSize" | "PMI_universe_size" => Some(self.universe().to_string()),
            _ => None,
        }
    }

    fn handle_v1(&mut self, cid: usize, rank: u32, msg: Message, events: &mut Vec<Event>) {
        let ok = |name: &str| Self::reply(&msg, name).with("rc", "0");
        match msg.cmd.as_str() {
            "get_maxes" => self.send(
                cid,
                &ok("maxes")
                    .with("kvsname_max", KVSNAME_MAX.to_string())
                    .with("keylen_max", KEYLEN_MAX.to_string())
                    .with("vallen_max", VALLEN_MAX.to_string()),
            ),
            "get_appnum" => {
                let m = ok("appnum").with("appnum", self.appnum(rank).to_string());
                self.send(cid, &m)
            }
            "get_my_kvsname" => {
                let m = ok("my_kvsname").with("kvsname", &self.config.kvsname);
                self.send(cid, &m)
            }
            "get_universe_size" => {
                let m = ok("universe_size").with("size", self.universe().to_string());
                self.send(cid, &m)
            }
            "put" => match (msg.get("key"), msg.get("value")) {
                (Some(k), Some(v)) if !k.is_empty() => {
                    self.report.puts += 1;
                    self.kvs.insert(k.to_owned(), v.to_owned());
                    self.send(cid, &ok("put_result").with("msg", "success"));
                }
                _ => self.reject(cid, &msg, "put_result", "put without key or value", events),
            },
            "get" => {
                let key = msg.get("key").unwrap_or_default();
                self.report.gets += 1;
                let value = if key.starts_with("PMI_") || key == "universeSize" {
                    self.job_attr(key)
                } else {
                    self.kvs.get(key).cloned()
                };
                let m = match value {
                    Some(v) => ok("get_result")
                        .with("msg", "success")
                        .with("found", "TRUE")
                        .with("value", v),
                    // Old clients test rc, new ones found; "unknown" keeps old parsers happy.
                    None => Self::reply(&msg, "get_result")
                        .with("rc", "-1")
                        .with("msg", format!("key_{key}_not_found"))
                        .with("found", "FALSE")
                        .with("value", "unknown"),
                };
                self.send(cid, &m);
            }
            "barrier_in" => self.enter_fence(cid, rank, Pending::Barrier, &msg),
            "finalize" => {
                self.finalize(rank, events);
                self.send(cid, &ok("finalize_ack"));
            }
            "abort" => self.abort(rank, &msg, events),
            "publish_name" => {
                let m = self.publish(&msg, "publish_result");
                self.send(cid, &m)
            }
            "unpublish_name" => {
                let m = self.unpublish(&msg, "unpublish_result");
                self.send(cid, &m)
            }
            "lookup_name" => {
                let m = self.lookup(&msg, "lookup_result");
                self.send(cid, &m)
            }
            "spawn" => {
                // Old clients send one mcmd block per command and read one reply after the last.
                let last = match (msg.get_int("totspawns"), msg.get_int("spawnssofar")) {
                    (Some(t), Some(s)) => s >= t,
                    _ => true,
                };
                if last {
                    let m = Self::error_reply(
                        &msg,
                        "spawn_result",
                        "MPI_Comm_spawn is not supported by this process manager",
                    );
                    self.send(cid, &m);
                }
            }
            other => {
                let e = format!("unknown PMI-1 command {other:?}");
                self.reject(cid, &msg, &format!("{other}_result"), &e, events);
            }
        }
    }

    fn handle_v2(&mut self, cid: usize, rank: u32, msg: Message, events: &mut Vec<Event>) {
        let resp = |m: &Message| format!("{}-response", m.cmd);
        let ok = |m: &Message| Self::reply(m, &resp(m)).with("rc", "0");
        match msg.cmd.as_str() {
            "job-getid" => {
                let m = ok(&msg).with("jobid", &self.config.kvsname);
                self.send(cid, &m)
            }
            "kvs-put" => match (msg.get("key"), msg.get("value")) {
                (Some(k), Some(v)) if !k.is_empty() => {
                    self.report.puts += 1;
                    self.kvs.insert(k.to_owned(), v.to_owned());
                    self.send(cid, &ok(&msg));
                }
                _ => self.reject(
                    cid,
                    &msg,
                    &resp(&msg),
                    "kvs-put without key or value",
                    events,
                ),
            },
            "kvs-get" => {
                self.report.gets += 1;
                let value = msg.get("key").and_then(|k| self.kvs.get(k)).cloned();
                let m = found_reply(ok(&msg), value);
                self.send(cid, &m)
            }
            "info-getjobattr" => {
                self.report.gets += 1;
                let value = msg.get("key").and_then(|k| self.job_attr(k));
                let m = found_reply(ok(&msg), value);
                self.send(cid, &m)
            }
            "kvs-fence" => self.enter_fence(cid, rank, Pending::Fence, &msg),
            "info-putnodeattr" => match (msg.get("key"), msg.get("value")) {
                (Some(k), Some(v)) => {
                    let node = self.nodes[rank as usize];
                    self.node_attrs.insert((node, k.to_owned()), v.to_owned());
                    self.send(cid, &ok(&msg));
                    self.release_node_waiters(node, k);
                }
                _ => self.reject(
                    cid,
                    &msg,
                    &resp(&msg),
                    "info-putnodeattr without key or value",
                    events,
                ),
            },
            "info-getnodeattr" => {
                let node = self.nodes[rank as usize];
                let key = msg.get("key").unwrap_or_default().to_owned();
                let value = self.node_attrs.get(&(node, key.clone())).cloned();
                if value.is_none() && msg.get("wait") == Some("TRUE") {
                    self.node_waiters.push(NodeWaiter {
                        conn: cid,
                        node,
                        key,
                        thrid: msg.get("thrid").map(str::to_owned),
                    });
                } else {
                    let m = found_reply(ok(&msg), value);
                    self.send(cid, &m);
                }
            }
            "name-publish" => {
                let m = self.publish(&msg, &resp(&msg));
                self.send(cid, &m)
            }
            "name-unpublish" => {
                let m = self.unpublish(&msg, &resp(&msg));
                self.send(cid, &m)
            }
            "name-lookup" => {
                let m = self.lookup(&msg, &resp(&msg));
                self.send(cid, &m)
            }
            "finalize" => {
                self.finalize(rank, events);
                self.send(cid, &ok(&msg));
            }
            "abort" => self.abort(rank, &msg, events),
            "spawn" | "job-connect" | "job-disconnect" => {
                let m = Self::error_reply(
                    &msg,
                    &resp(&msg),
                    &format!("{} is not supported by this process manager", msg.cmd),
                );
                self.send(cid, &m)
            }
            other => {
                let e = format!("unknown PMI-2 command {other:?}");
                self.reject(cid, &msg, &resp(&msg), &e, events);
            }
        }
    }

    fn publish(&mut self, msg: &Message, name: &str) -> Message {
        let service = msg.get("service").or_else(|| msg.get("name"));
        match (service, msg.get("port")) {
            (Some(s), Some(p)) if !self.names.contains_key(s) => {
                self.names.insert(s.to_owned(), p.to_owned());
                Self::reply(msg, name)
                    .with("rc", "0")
                    .with("msg", "success")
            }
            (Some(s), Some(_)) => {
                Self::error_reply(msg, name, &format!("service {s} is already published"))
            }
            _ => Self::error_reply(msg, name, "publish without service name or port"),
        }
    }

    fn unpublish(&mut self, msg: &Message, name: &str) -> Message {
        let service = msg.get("service").or_else(|| msg.get("name"));
        match service.and_then(|s| self.names.remove(s)) {
            Some(_) => Self::reply(msg, name)
                .with("rc", "0")
                .with("msg", "success"),
            None => Self::error_reply(msg, name, "service is not published"),
        }
    }

    fn lookup(&self, msg: &Message, name: &str) -> Message {
        let service = msg.get("service").or_else(|| msg.get("name"));
        match service.and_then(|s| self.names.get(s)) {
            Some(p) => {
                let mut m = Self::reply(msg, name).with("rc", "0").with("port", p);
                if msg.wire == Wire::V2 {
                    m = m.with("found", "TRUE").with("value", p);
                }
                m
            }
            None => Self::error_reply(msg, name, "service is not published"),
        }
    }

    fn release_node_waiters(&mut self, node: u32, key: &str) {
        let Some(value) = self.node_attrs.get(&(node, key.to_owned())).cloned() else {
            return;
        };
        let (ready, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.node_waiters)
            .into_iter()
            .partition(|w| w.node == node && w.key == key);
        self.node_waiters = rest;
        for w in ready {
            let mut m = Message::new(Wire::V2, "info-getnodeattr-response");
            if let Some(t) = &w.thrid {
                m.push("thrid", t);
            }
            let m = m
                .with("rc", "0")
                .with("found", "TRUE")
                .with("value", &value);
            self.send(w.conn, &m);
        }
    }

    fn finalize(&mut self, rank: u32, events: &mut Vec<Event>) {
        let state = &mut self.ranks[rank as usize];
        if state.life != Life::Finalized {
            state.life = Life::Finalized;
            self.report.finalized.push(rank);
            events.push(Event::Finalized { rank });
        }
    }

    fn abort(&mut self, rank: u32, msg: &Message, events: &mut Vec<Event>) {
        let exit_code = msg
            .get_int("exitcode")
            .and_then(|c| i32::try_from(c).ok())
            .unwrap_or(1);
        let message = msg
            .get("message")
            .or_else(|| msg.get("msg"))
            .map(str::to_owned);
        let state = &mut self.ranks[rank as usize];
        if state.fence.take().is_some() {
            self.in_fence -= 1;
        }
        state.life = Life::Aborted;
        if self.report.aborted.is_none() {
            self.report.aborted = Some((rank, exit_code, message.clone()));
        }
        events.push(Event::Aborted {
            rank,
            exit_code,
            message,
        });
        self.fail_fence(&format!("rank {rank} aborted"));
    }

    fn fence_possible(&self) -> bool {
        self.ranks
            .iter()
            .all(|r| matches!(r.life, Life::Waiting | Life::Active))
    }

    fn enter_fence(&mut self, cid: usize, rank: u32, kind: Pending, msg: &Message) {
        let thrid = msg.get("thrid").map(str::to_owned);
        let state = &mut self.ranks[rank as usize];
        if state.fence.is_none() {
            self.in_fence += 1;
        }
        state.fence = Some((kind, thrid));
        state.conn = Some(cid);
        if !self.fence_possible() {
            self.fail_fence("a rank of the job has ended");
        } else if self.in_fence == self.size {
            self.report.fences += 1;
            self.release_fence(None);
        }
    }

    /// Answer every rank waiting in a fence: success, or the error `failure`.
    fn release_fence(&mut self, failure: Option<&str>) {
        self.in_fence = 0;
        for r in 0..self.ranks.len() {
            let Some((kind, thrid)) = self.ranks[r].fence.take() else {
                continue;
            };
            let Some(cid) = self.ranks[r].conn else {
                continue;
            };
            let (wire, name) = match kind {
                Pending::Barrier => (Wire::V1, "barrier_out"),
                Pending::Fence => (Wire::V2, "kvs-fence-response"),
            };
            let mut query = Message::new(wire, "fence");
            if let Some(t) = thrid {
                query.push("thrid", t);
            }
            let m = match failure {
                None => Self::reply(&query, name).with("rc", "0"),
                Some(e) => Self::error_reply(&query, name, &format!("fence failed: {e}")),
            };
            self.send(cid, &m);
        }
    }

    fn fail_fence(&mut self, why: &str) {
        if self.in_fence > 0 {
            self.release_fence(Some(why));
        }
    }
}

/// `send(2)` with `MSG_NOSIGNAL`: a peer that has gone away is an `EPIPE` error here, never a
/// `SIGPIPE` that would kill a launcher which kept the default signal disposition.
fn send_nosignal(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    use nix::sys::socket::{MsgFlags, send};
    send(fd.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
}

fn found_reply(m: Message, value: Option<String>) -> Message {
    match value {
        Some(v) => m.with("found", "TRUE").with("value", v),
        None => m.with("found", "FALSE"),
    }
}

#[derive(Default)]
struct Ready {
    wake: bool,
    accept: bool,
    readable: Vec<usize>,
}
