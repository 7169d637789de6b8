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
//!    open across `exec` ([`crate::wireup::inherit_fd`]), then drop the parent's copy of it so
//!    that a rank that dies is seen as a disconnect.
//! 4. [`PmiServer::start`] runs the loop on its own thread and returns a [`ServerHandle`]
//!    whose [`ServerHandle::events`] channel reports what ranks do ([`Event`]); or
//!    [`PmiServer::run`] runs it on the calling thread with a callback.
//! 5. The loop ends by itself once every rank has finalized, aborted or disconnected, when
//!    [`ServerControl::stop`] is called, or with [`PmiError::ConnectTimeout`] when a rank has not
//!    connected within [`JobConfig::connect_timeout`]. It returns a [`JobReport`]. A fence that
//!    waits longer than [`JobConfig::fence_report`] is reported ([`Event::FenceWaiting`]: which
//!    ranks it waits for), again each time its wait has doubled, and waited for still.
//!
//! The server never kills anything: an abort or a disconnect is an [`Event`], and the launcher
//! decides what happens to the other ranks. The launcher tells the server when a rank's process
//! has exited ([`ServerControl::rank_exited`]): that is how a rank that never connected over TCP,
//! or whose socket a surviving child process still holds, stops being waited for.
//!
//! Inside, the server is two parts with a narrow interface between them: the transport
//! (`transport.rs`: sockets, the wake pipe, `poll(2)`, bytes in and out, the wire codec) and the
//! job (`job.rs` and `commands.rs`: the KVS, fences and barriers, node attributes, the name
//! service, the life of every rank), a plain state machine that takes whole messages and
//! returns the replies to queue, the connections to close and the events to report. The fence
//! watch (`watch.rs`) is given the job and the time after every round and says when a fence has
//! waited long enough to report. This module runs the loop that joins them.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use nix::poll::PollTimeout;

mod commands;
mod error;
mod job;
mod transport;
mod watch;

pub use error::PmiError;
use error::io_err;
use job::{ConnId, Job, Output};
pub use job::{DEFAULT_FENCE_REPORT, Event, JobConfig, JobReport};
use transport::{End, Transport, send_nosignal};
use watch::FenceWatch;
pub use watch::{FenceWait, rank_ranges};

/// The rank's end of a socketpair, and the environment that tells the rank about it.
#[derive(Debug)]
pub struct RankFd {
    /// The rank's end (close-on-exec; see [`crate::wireup::inherit_fd`]). Drop it in the parent
    /// once the rank is started.
    pub fd: OwnedFd,
    /// `PMI_FD`, `PMI_RANK`, `PMI_SIZE`, `PMI_JOBID`, with `PMI_FD` naming `fd`'s number. A
    /// launcher that moves the descriptor to another number in the child (`dup2`) builds the
    /// environment for that number with [`crate::wireup::fd_env`] instead.
    pub env: Vec<(String, String)>,
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
    job: Job,
    transport: Transport,
    ctl_rx: mpsc::Receiver<Control>,
    control: ServerControl,
}

impl std::fmt::Debug for PmiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PmiServer")
            .field("kvsname", &self.job.config().kvsname)
            .field("size", &self.job.size())
            .finish_non_exhaustive()
    }
}

impl PmiServer {
    /// A server for the job `config` describes. Nothing is listening yet.
    pub fn new(config: JobConfig) -> Result<Self, PmiError> {
        let job = Job::new(config)?;
        let (wake_rx, wake_tx) = UnixStream::pair().map_err(io_err("creating the wake pipe"))?;
        wake_rx
            .set_nonblocking(true)
            .map_err(io_err("creating the wake pipe"))?;
        wake_tx
            .set_nonblocking(true)
            .map_err(io_err("creating the wake pipe"))?;
        let (tx, ctl_rx) = mpsc::channel();
        let transport = Transport::new(wake_rx, job.config().max_message);
        Ok(Self {
            job,
            transport,
            ctl_rx,
            control: ServerControl {
                wake: std::sync::Arc::new(wake_tx),
                tx,
            },
        })
    }

    /// The number of ranks.
    pub fn size(&self) -> u32 {
        self.job.size()
    }

    /// The `PMI_process_mapping` value ranks are given (empty: too long, so "unknown").
    pub fn process_mapping(&self) -> &str {
        self.job.process_mapping()
    }

    /// A handle to stop the loop or report exited ranks; usable before and after
    /// [`PmiServer::start`].
    pub fn control(&self) -> ServerControl {
        self.control.clone()
    }

    /// Create the socketpair for `rank`: the server keeps one end, the rank gets the other.
    pub fn add_socketpair(&mut self, rank: u32) -> Result<RankFd, PmiError> {
        self.job.check_free(rank)?;
        let (cid, theirs) = self.transport.add_socketpair()?;
        self.job.open(cid, Some(rank));
        let fd: OwnedFd = theirs.into();
        let config = self.job.config();
        let env = crate::wireup::fd_env(rank, self.job.size(), &config.kvsname, fd.as_raw_fd());
        Ok(RankFd { fd, env })
    }

    /// Listen on an ephemeral loopback TCP port for ranks started with [`PmiServer::tcp_env`].
    /// Calling it again returns the same address.
    pub fn listen_tcp(&mut self) -> Result<SocketAddr, PmiError> {
        self.transport.listen_tcp()
    }

    /// The environment for `rank` in TCP mode (`PMI_PORT`, `PMI_ID`, …); listens first if
    /// needed.
    pub fn tcp_env(&mut self, rank: u32) -> Result<Vec<(String, String)>, PmiError> {
        self.job.check_rank(rank)?;
        let addr = self.listen_tcp()?;
        Ok(crate::wireup::port_env(
            rank,
            self.job.size(),
            &self.job.config().kvsname,
            &addr.to_string(),
        ))
    }

    /// Run the loop on a new thread.
    pub fn start(self) -> Result<ServerHandle, PmiError> {
        let (tx, rx) = mpsc::channel();
        let control = self.control();
        let thread = std::thread::Builder::new()
            .name(format!("pmi-{}", self.job.config().kvsname))
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
        let mut watch = FenceWatch::new(self.job.config().fence_report);
        let mut events = Vec::new();
        loop {
            for e in events.drain(..) {
                on_event(e);
            }
            if self.job.is_over() && self.transport.all_sent() {
                return Ok(self.job.into_report());
            }
            if let Some(wait) = watch.check(&self.job, Instant::now()) {
                on_event(Event::FenceWaiting(wait));
            }
            let deadline = self.connect_deadline(started);
            if let Some(d) = deadline
                && Instant::now() >= d
            {
                let missing = self.job.waiting_ranks();
                on_event(Event::ConnectTimeout {
                    missing: missing.clone(),
                });
                return Err(PmiError::ConnectTimeout {
                    missing,
                    timeout: self.job.config().connect_timeout.unwrap_or_default(),
                });
            }
            let wake_at = deadline.into_iter().chain(watch.next_due()).min();
            let ready = self.transport.poll(poll_timeout(wake_at))?;
            if ready.wake && self.take_controls(&mut events) {
                for e in events.drain(..) {
                    on_event(e);
                }
                let mut report = self.job.into_report();
                report.stopped = true;
                return Ok(report);
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

    /// When the connect timeout runs out, while some rank has not been heard from.
    fn connect_deadline(&self, started: Instant) -> Option<Instant> {
        self.job
            .config()
            .connect_timeout
            .filter(|_| !self.job.waiting_ranks().is_empty())
            .map(|t| started + t)
    }

    /// Carry out what the job asked for, in order.
    fn apply(&mut self, out: Vec<Output>, events: &mut Vec<Event>) {
        for o in out {
            match o {
                Output::Send(cid, msg) => self.transport.send(cid, &msg),
                Output::Close(cid) => self.transport.close(cid),
                Output::Event(e) => events.push(e),
            }
        }
    }

    /// Close `cid` in the job and the transport.
    fn close_conn(&mut self, cid: ConnId, events: &mut Vec<Event>) {
        let mut out = Vec::new();
        self.job.close(cid, &mut out);
        // A connection the job never knew (none today) still goes.
        self.transport.close(cid);
        self.apply(out, events);
    }

    /// Apply what the launcher sent; true when it asked to stop.
    fn take_controls(&mut self, events: &mut Vec<Event>) -> bool {
        self.transport.drain_wake();
        let mut stop = false;
        while let Ok(c) = self.ctl_rx.try_recv() {
            match c {
                Control::Stop => stop = true,
                Control::RankExited(rank) => {
                    let mut out = Vec::new();
                    self.job.rank_exited(rank, &mut out);
                    self.apply(out, events);
                }
            }
        }
        stop
    }

    /// Take every pending TCP connection; its rank is known once it identifies itself.
    fn accept_all(&mut self, events: &mut Vec<Event>) {
        for accepted in self.transport.accept_all() {
            match accepted {
                Ok(cid) => self.job.open(cid, None),
                Err(error) => events.push(Event::ProtocolError { rank: None, error }),
            }
        }
    }

    /// Hand every whole message `cid` sent to the job, then its end if it ended.
    fn read_conn(&mut self, cid: ConnId, events: &mut Vec<Event>) {
        let received = self.transport.read(cid);
        for msg in received.messages {
            if !self.transport.is_open(cid) {
                return;
            }
            let mut out = Vec::new();
            self.job.receive(cid, msg, &mut out);
            self.apply(out, events);
        }
        if let Some(end) = received.end
            && self.transport.is_open(cid)
        {
            self.end_conn(cid, end, events);
        }
    }

    /// Write the queued replies; close the connections that cannot take them.
    fn flush_all(&mut self, events: &mut Vec<Event>) {
        for (cid, end) in self.transport.flush_all() {
            self.end_conn(cid, end, events);
        }
    }

    /// The connection is over: report why when it is the client's fault, then close it.
    fn end_conn(&mut self, cid: ConnId, end: End, events: &mut Vec<Event>) {
        let error = match end {
            End::Invalid(e) => Some(e.to_string()),
            End::Truncated(e) | End::Stalled(e) => Some(e),
            End::Closed | End::Broken => None,
        };
        if let Some(error) = error {
            let rank = self.job.rank_of(cid);
            events.push(Event::ProtocolError { rank, error });
        }
        self.close_conn(cid, events);
    }
}

/// How long one poll may wait: until `deadline`, or for ever.
fn poll_timeout(deadline: Option<Instant>) -> PollTimeout {
    match deadline {
        None => PollTimeout::NONE,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            // Round up so the loop does not spin on a sub-millisecond remainder.
            let ms = left.as_millis().saturating_add(1).min(60_000) as u16;
            PollTimeout::from(ms)
        }
    }
}
