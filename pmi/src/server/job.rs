//! The state of one PMI job, as a plain state machine: no socket, no descriptor, no clock.
//!
//! The transport tells a [`Job`] what happened on its connections ([`Job::open`],
//! [`Job::receive`], [`Job::close`]) and what the launcher said ([`Job::rank_exited`]); the job
//! answers with a list of [`Output`]s (a reply to queue on a connection, a connection to close,
//! an [`Event`] for the launcher) and keeps the KVS, the fences and barriers, the node attributes,
//! the name service and the life of every rank. What each PMI-1/PMI-2 command does to that state
//! is in the sibling `commands` module.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::mapping::{format_process_mapping, normalize_nodes};
use crate::wire::{DEFAULT_MAX_MESSAGE, Message, Wire};

use super::error::PmiError;
use super::watch::FenceWait;

/// Limits a PMI-1 client is told (`get_maxes`); the same as hydra's.
pub(super) const KVSNAME_MAX: usize = 256;
/// See [`KVSNAME_MAX`].
pub(super) const KEYLEN_MAX: usize = 64;
/// See [`KVSNAME_MAX`].
pub(super) const VALLEN_MAX: usize = 1024;

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
    /// How long a fence (PMI-1 barrier, PMI-2 fence) may wait for ranks before the server
    /// reports it with an [`Event::FenceWaiting`], and again each time the wait has doubled;
    /// `None` never reports. The server goes on waiting either way. Default:
    /// [`DEFAULT_FENCE_REPORT`].
    pub fence_report: Option<Duration>,
}

/// The default [`JobConfig::fence_report`]: 30 s. A healthy job's ranks all reach a fence within
/// seconds of each other (256 ranks through init and a fence take about 3 s on a loaded 2-core
/// machine, `examples/bench_fence.rs`), so a longer wait is almost always a hang; a user still
/// watching a silent job gets told before giving up on it. A fence an application enters while
/// other ranks are busy (a barrier in `MPI_Finalize`, say) may wait longer for good reasons: the
/// report is a notice, and it repeats at 60, 120, 240 s … rather than every few seconds.
pub const DEFAULT_FENCE_REPORT: Duration = Duration::from_secs(30);

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
            fence_report: Some(DEFAULT_FENCE_REPORT),
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

    /// Builder: set [`JobConfig::fence_report`] (`None`: never report).
    #[must_use]
    pub fn fence_report(mut self, after: Option<Duration>) -> Self {
        self.fence_report = after;
        self
    }

    /// Builder: set [`JobConfig::appnum_of_rank`].
    #[must_use]
    pub fn appnums(mut self, appnum_of_rank: Vec<u32>) -> Self {
        self.appnum_of_rank = appnum_of_rank;
        self
    }

    /// The job size, once the configuration is known to describe a job.
    fn validate(&self) -> Result<u32, PmiError> {
        let size = u32::try_from(self.node_of_rank.len())
            .map_err(|_| PmiError::InvalidJob("too many ranks".into()))?;
        if size == 0 {
            return Err(PmiError::InvalidJob("the job has no ranks".into()));
        }
        if !self.appnum_of_rank.is_empty() && self.appnum_of_rank.len() != size as usize {
            return Err(PmiError::InvalidJob(format!(
                "{} application numbers for {size} ranks",
                self.appnum_of_rank.len()
            )));
        }
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() < KVSNAME_MAX
                && s.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b';' && b != b'=')
        };
        if !name_ok(&self.kvsname) {
            return Err(PmiError::InvalidJob(format!(
                "KVS name {:?} must be 1-255 printable characters without ';' or '='",
                self.kvsname
            )));
        }
        if self.max_message < 1024 {
            return Err(PmiError::InvalidJob(format!(
                "max_message {} is below the 1024 bytes PMI clients may send",
                self.max_message
            )));
        }
        Ok(size)
    }
}

/// Something a rank did that the launcher may need to act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The rank sent its first PMI message (or identified itself over TCP).
    Connected {
        /// The rank.
        rank: u32,
    },
    /// The rank entered a fence or barrier (its MPI has opened its network endpoints by then,
    /// to publish their addresses).
    Fenced {
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
    /// A fence has waited [`JobConfig::fence_report`] for ranks that have not entered it (and
    /// again each time the wait has doubled); the server goes on waiting. Its `Display` is the
    /// line to show a user.
    FenceWaiting(FenceWait),
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
    /// Whether the loop ended because [`ServerControl::stop`](super::ServerControl::stop) was
    /// called.
    pub stopped: bool,
}

/// A connection, as the transport numbers them; a number may be reused once closed.
pub(crate) type ConnId = usize;

/// What the job asks of the transport and the launcher, in the order it must happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Output {
    /// Queue this reply on the connection (dropped if the connection is closed by then).
    Send(ConnId, Message),
    /// Close the connection; unsent replies on it are dropped.
    Close(ConnId),
    /// Tell the launcher.
    Event(Event),
}

/// Where a rank is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Life {
    /// Not heard from yet.
    Waiting,
    /// Sent a PMI message.
    Active,
    /// Called finalize.
    Finalized,
    /// Called abort.
    Aborted,
    /// Disconnected or exited without either.
    Gone,
}

/// What a rank waits in: a PMI-1 barrier or a PMI-2 fence (they are answered differently).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pending {
    /// PMI-2 `kvs-fence`.
    Fence,
    /// PMI-1 `barrier_in`.
    Barrier,
}

/// One rank's state.
pub(super) struct RankState {
    /// Where it is in its life.
    pub(super) life: Life,
    /// Its connection, once known.
    pub(super) conn: Option<ConnId>,
    /// The fence it waits in, with the `thrid` to echo.
    pub(super) fence: Option<(Pending, Option<String>)>,
    /// The command of its last message (empty: none yet), for a report of a waiting fence.
    pub(super) last_command: String,
}

/// A deferred `info-getnodeattr;wait=TRUE` reply.
pub(super) struct NodeWaiter {
    /// The connection to answer.
    pub(super) conn: ConnId,
    /// The node whose attribute it waits for.
    pub(super) node: u32,
    /// The attribute.
    pub(super) key: String,
    /// The `thrid` to echo.
    pub(super) thrid: Option<String>,
}

/// The state of one PMI job. See the [module documentation](self).
pub(crate) struct Job {
    pub(super) config: JobConfig,
    pub(super) size: u32,
    /// The node of every rank, relabelled from 0.
    pub(super) nodes: Vec<u32>,
    /// `PMI_process_mapping` (empty: too long, so "unknown").
    pub(super) mapping: String,
    /// The rank of every open connection (`None` until a TCP client identifies itself).
    pub(super) conns: HashMap<ConnId, Option<u32>>,
    pub(super) ranks: Vec<RankState>,
    pub(super) kvs: HashMap<String, String>,
    pub(super) names: HashMap<String, String>,
    pub(super) node_attrs: HashMap<(u32, String), String>,
    pub(super) node_waiters: Vec<NodeWaiter>,
    /// Ranks waiting in the current fence.
    pub(super) in_fence: u32,
    /// Fences begun (a first rank entered), completed or not: the number of the current one.
    pub(super) fences_begun: u64,
    pub(super) report: JobReport,
}

impl Job {
    /// The job `config` describes, with every rank waiting to connect.
    pub(crate) fn new(config: JobConfig) -> Result<Self, PmiError> {
        let size = config.validate()?;
        let nodes = normalize_nodes(&config.node_of_rank);
        let mut mapping = format_process_mapping(&nodes);
        if mapping.len() > VALLEN_MAX - 1 {
            // Too long for a PMI value: "unknown" makes MPICH exchange host names instead.
            mapping.clear();
        }
        let ranks = (0..size)
            .map(|_| RankState {
                life: Life::Waiting,
                conn: None,
                fence: None,
                last_command: String::new(),
            })
            .collect();
        Ok(Self {
            config,
            size,
            nodes,
            mapping,
            conns: HashMap::new(),
            ranks,
            kvs: HashMap::new(),
            names: HashMap::new(),
            node_attrs: HashMap::new(),
            node_waiters: Vec::new(),
            in_fence: 0,
            fences_begun: 0,
            report: JobReport::default(),
        })
    }

    /// The configuration the job was made from.
    pub(crate) fn config(&self) -> &JobConfig {
        &self.config
    }

    /// The number of ranks.
    pub(crate) fn size(&self) -> u32 {
        self.size
    }

    /// The `PMI_process_mapping` value ranks are given (empty: too long, so "unknown").
    pub(crate) fn process_mapping(&self) -> &str {
        &self.mapping
    }

    /// The report, for the end of the loop.
    pub(crate) fn into_report(self) -> JobReport {
        self.report
    }

    /// Checks that `rank` may be given a connection of its own (a socketpair).
    pub(crate) fn check_free(&self, rank: u32) -> Result<(), PmiError> {
        self.check_rank(rank)?;
        if self.ranks[rank as usize].conn.is_some() {
            return Err(PmiError::RankTaken(rank));
        }
        Ok(())
    }

    /// Checks that `rank` is a rank of the job.
    pub(crate) fn check_rank(&self, rank: u32) -> Result<(), PmiError> {
        if rank >= self.size {
            return Err(PmiError::RankOutOfRange {
                rank,
                size: self.size,
            });
        }
        Ok(())
    }

    /// A new connection: of `rank` (a socketpair, after [`Job::check_free`]), or of a client
    /// that has yet to say which rank it is (TCP).
    pub(crate) fn open(&mut self, conn: ConnId, rank: Option<u32>) {
        self.conns.insert(conn, rank);
        if let Some(rank) = rank {
            self.ranks[rank as usize].conn = Some(conn);
        }
    }

    /// The rank of a connection, once known.
    pub(crate) fn rank_of(&self, conn: ConnId) -> Option<u32> {
        self.conns.get(&conn).copied().flatten()
    }

    /// Whether every rank has finalized, aborted or gone.
    pub(crate) fn is_over(&self) -> bool {
        self.ranks
            .iter()
            .all(|r| matches!(r.life, Life::Finalized | Life::Aborted | Life::Gone))
    }

    /// The ranks not heard from yet, in order.
    pub(crate) fn waiting_ranks(&self) -> Vec<u32> {
        (0..self.size)
            .filter(|&r| self.ranks[r as usize].life == Life::Waiting)
            .collect()
    }

    /// The number of the fence ranks wait in (1 for the job's first), or `None` when none
    /// waits. A fence that completes or fails is over: the next one has the next number.
    pub(crate) fn fence_in_progress(&self) -> Option<u64> {
        (self.in_fence > 0).then_some(self.fences_begun)
    }

    /// Who is where while ranks wait in the fence in progress, which has waited `waited`.
    pub(crate) fn fence_wait(&self, waited: Duration) -> FenceWait {
        let mut wait = FenceWait {
            number: self.fences_begun,
            completed: self.report.fences,
            waited,
            size: self.size,
            arrived: Vec::new(),
            never_connected: Vec::new(),
            not_in_fence: Vec::new(),
            last_command: BTreeMap::new(),
            finalized: Vec::new(),
        };
        for (rank, state) in (0..self.size).zip(&self.ranks) {
            let list = match (&state.fence, state.life) {
                (Some(_), _) => &mut wait.arrived,
                (None, Life::Waiting) => &mut wait.never_connected,
                (None, Life::Finalized) => &mut wait.finalized,
                (None, _) => {
                    let last = state.last_command.clone();
                    wait.last_command.entry(last).or_default().push(rank);
                    &mut wait.not_in_fence
                }
            };
            list.push(rank);
        }
        wait
    }

    /// The connection is gone (closed by the peer, unusable, or closed by the job): forget it;
    /// its rank, if it had neither finalized nor aborted, is gone.
    pub(crate) fn close(&mut self, conn: ConnId, out: &mut Vec<Output>) {
        let Some(rank) = self.conns.remove(&conn) else {
            return;
        };
        out.push(Output::Close(conn));
        self.node_waiters.retain(|w| w.conn != conn);
        let Some(rank) = rank else {
            return;
        };
        if self.ranks[rank as usize].conn == Some(conn) {
            self.ranks[rank as usize].conn = None;
        }
        self.mark_gone(rank, out);
    }

    /// The launcher says the process of `rank` has exited: close its connection, or, when it
    /// has none, count the rank as gone.
    pub(crate) fn rank_exited(&mut self, rank: u32, out: &mut Vec<Output>) {
        if rank >= self.size {
            return;
        }
        match self.ranks[rank as usize].conn {
            Some(conn) => self.close(conn, out),
            None => self.mark_gone(rank, out),
        }
    }

    /// A rank that had neither finalized nor aborted is gone: report it, fail the fence.
    fn mark_gone(&mut self, rank: u32, out: &mut Vec<Output>) {
        let in_fence = self.in_fence;
        let state = &mut self.ranks[rank as usize];
        if matches!(state.life, Life::Waiting | Life::Active) {
            let initialized = state.life == Life::Active;
            let own = u32::from(state.fence.take().is_some());
            self.in_fence -= own;
            state.life = Life::Gone;
            self.report.disconnected.push(rank);
            out.push(Output::Event(Event::Disconnected {
                rank,
                initialized,
                mid_fence: in_fence - own > 0,
            }));
            self.fail_fence(&format!("rank {rank} disconnected"), out);
        }
    }

    /// The rank has sent a PMI message: it is no longer waited for.
    pub(super) fn mark_active(&mut self, rank: u32, out: &mut Vec<Output>) {
        let state = &mut self.ranks[rank as usize];
        if state.life == Life::Waiting {
            state.life = Life::Active;
            out.push(Output::Event(Event::Connected { rank }));
        }
    }

    /// A TCP connection says it is `rank`.
    pub(super) fn bind(
        &mut self,
        conn: ConnId,
        rank: u32,
        out: &mut Vec<Output>,
    ) -> Result<(), String> {
        if rank >= self.size {
            return Err(format!(
                "rank {rank} is outside the job of {} ranks",
                self.size
            ));
        }
        let state = &self.ranks[rank as usize];
        if state.conn.is_some_and(|c| c != conn) || state.life != Life::Waiting {
            return Err(format!("rank {rank} is already connected"));
        }
        self.ranks[rank as usize].conn = Some(conn);
        if let Some(r) = self.conns.get_mut(&conn) {
            *r = Some(rank);
        }
        self.mark_active(rank, out);
        Ok(())
    }

    /// The rank called finalize.
    pub(super) fn finalize(&mut self, rank: u32, out: &mut Vec<Output>) {
        let state = &mut self.ranks[rank as usize];
        if state.life != Life::Finalized {
            state.life = Life::Finalized;
            self.report.finalized.push(rank);
            out.push(Output::Event(Event::Finalized { rank }));
        }
    }

    /// The rank asked for the job to be aborted; any fence fails.
    pub(super) fn abort(&mut self, rank: u32, msg: &Message, out: &mut Vec<Output>) {
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
        out.push(Output::Event(Event::Aborted {
            rank,
            exit_code,
            message,
        }));
        self.fail_fence(&format!("rank {rank} aborted"), out);
    }

    /// Whether every rank may still enter a fence (none has ended).
    fn fence_possible(&self) -> bool {
        self.ranks
            .iter()
            .all(|r| matches!(r.life, Life::Waiting | Life::Active))
    }

    /// The rank enters the fence (or barrier); the last one in releases everybody.
    pub(super) fn enter_fence(
        &mut self,
        conn: ConnId,
        rank: u32,
        kind: Pending,
        msg: &Message,
        out: &mut Vec<Output>,
    ) {
        let thrid = msg.get("thrid").map(str::to_owned);
        let state = &mut self.ranks[rank as usize];
        if state.fence.is_none() {
            if self.in_fence == 0 {
                self.fences_begun += 1;
            }
            self.in_fence += 1;
            out.push(Output::Event(Event::Fenced { rank }));
        }
        state.fence = Some((kind, thrid));
        state.conn = Some(conn);
        if !self.fence_possible() {
            self.fail_fence("a rank of the job has ended", out);
        } else if self.in_fence == self.size {
            self.report.fences += 1;
            self.release_fence(None, out);
        }
    }

    /// Answer every rank waiting in a fence: success, or the error `failure`.
    fn release_fence(&mut self, failure: Option<&str>, out: &mut Vec<Output>) {
        self.in_fence = 0;
        for r in 0..self.ranks.len() {
            let Some((kind, thrid)) = self.ranks[r].fence.take() else {
                continue;
            };
            let Some(conn) = self.ranks[r].conn else {
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
                None => reply(&query, name).with("rc", "0"),
                Some(e) => error_reply(&query, name, &format!("fence failed: {e}")),
            };
            out.push(Output::Send(conn, m));
        }
    }

    /// Fail the fence in progress, if any, with the reason `why`.
    fn fail_fence(&mut self, why: &str, out: &mut Vec<Output>) {
        if self.in_fence > 0 {
            self.release_fence(Some(why), out);
        }
    }
}

/// The reply skeleton for `query`: same wire, `thrid` echoed.
pub(super) fn reply(query: &Message, cmd: &str) -> Message {
    let mut m = Message::new(query.wire, cmd);
    if let Some(t) = query.get("thrid") {
        m.push("thrid", t);
    }
    m
}

/// A failed reply to `query`: `rc=-1` and the reason where each wire's clients look for it.
pub(super) fn error_reply(query: &Message, cmd: &str, text: &str) -> Message {
    let mut m = reply(query, cmd).with("rc", "-1");
    match query.wire {
        // PMI-1 values end at a space; old clients print msg as is.
        Wire::V1 => m.push("msg", text.replace(' ', "_")),
        Wire::V2 => m.push("errmsg", text),
    }
    m
}

#[cfg(test)]
mod tests {
    //! The job without sockets: messages in, replies and events out.

    use super::*;

    /// A job of `size` ranks on one node, rank `r` on connection `r` (socketpairs).
    fn job(size: u32) -> Job {
        let mut job = Job::new(JobConfig::single_node("kvs-test", size)).unwrap();
        for r in 0..size {
            job.check_free(r).unwrap();
            job.open(r as ConnId, Some(r));
        }
        job
    }

    fn v1(cmd: &str, pairs: &[(&str, &str)]) -> Message {
        pairs
            .iter()
            .fold(Message::new(Wire::V1, cmd), |m, (k, v)| m.with(*k, *v))
    }

    fn v2(cmd: &str, pairs: &[(&str, &str)]) -> Message {
        pairs
            .iter()
            .fold(Message::new(Wire::V2, cmd), |m, (k, v)| m.with(*k, *v))
    }

    /// What `msg` on `conn` produces.
    fn send(job: &mut Job, conn: ConnId, msg: Message) -> Vec<Output> {
        let mut out = Vec::new();
        job.receive(conn, msg, &mut out);
        out
    }

    /// The replies among `out`, by connection.
    fn replies(out: &[Output]) -> Vec<(ConnId, &Message)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(c, m) => Some((*c, m)),
                _ => None,
            })
            .collect()
    }

    fn events(out: &[Output]) -> Vec<&Event> {
        out.iter()
            .filter_map(|o| match o {
                Output::Event(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    /// The only reply in `out`.
    fn the_reply(out: &[Output]) -> &Message {
        let r = replies(out);
        assert_eq!(r.len(), 1, "{out:?}");
        r[0].1
    }

    #[test]
    fn pmi1_barrier_completes_when_every_rank_arrived_and_gets_see_every_put() {
        let mut job = job(3);
        for r in 0..3u32 {
            let out = send(
                &mut job,
                r as ConnId,
                v1(
                    "put",
                    &[
                        ("kvsname", "kvs-test"),
                        ("key", &format!("addr-{r}")),
                        ("value", &format!("host:{r}")),
                    ],
                ),
            );
            let m = the_reply(&out);
            assert_eq!((m.cmd.as_str(), m.get("rc")), ("put_result", Some("0")));
        }
        // Ranks 0 and 2 wait; nothing is answered until rank 1 arrives. Each entry is an event
        // (the launcher looks at the rank's open devices then).
        for r in [0u32, 2] {
            let out = send(&mut job, r as ConnId, v1("barrier_in", &[]));
            assert!(replies(&out).is_empty(), "{out:?}");
            assert!(
                events(&out).contains(&&Event::Fenced { rank: r }),
                "{out:?}"
            );
        }
        assert_eq!(job.report.fences, 0);
        let out = send(&mut job, 1, v1("barrier_in", &[]));
        let mut released: Vec<ConnId> = replies(&out).iter().map(|(c, _)| *c).collect();
        released.sort_unstable();
        assert_eq!(released, [0, 1, 2]);
        for (_, m) in replies(&out) {
            assert_eq!(
                (m.wire, m.cmd.as_str(), m.get("rc")),
                (Wire::V1, "barrier_out", Some("0"))
            );
        }
        assert_eq!(job.report.fences, 1);
        // After the barrier every rank reads every other rank's put.
        for r in 0..3u32 {
            let key = format!("addr-{}", (r + 1) % 3);
            let out = send(&mut job, r as ConnId, v1("get", &[("key", &key)]));
            let m = the_reply(&out);
            assert_eq!(m.cmd, "get_result");
            assert_eq!(m.get("rc"), Some("0"));
            assert_eq!(m.get("found"), Some("TRUE"));
            assert_eq!(
                m.get("value"),
                Some(format!("host:{}", (r + 1) % 3).as_str())
            );
        }
        assert_eq!(job.report.puts, 3);
        assert_eq!(job.report.gets, 3);
    }

    #[test]
    fn pmi2_fence_completes_when_every_rank_arrived_and_echoes_thrid() {
        let mut job = job(2);
        let out = send(
            &mut job,
            0,
            v2(
                "kvs-put",
                &[("thrid", "t0"), ("key", "k0"), ("value", "a;b")],
            ),
        );
        let m = the_reply(&out);
        assert_eq!(
            (m.cmd.as_str(), m.get("rc"), m.get("thrid")),
            ("kvs-put-response", Some("0"), Some("t0"))
        );
        let out = send(
            &mut job,
            1,
            v2("kvs-put", &[("key", "k1"), ("value", "v1")]),
        );
        assert_eq!(the_reply(&out).get("rc"), Some("0"));

        let out = send(&mut job, 0, v2("kvs-fence", &[("thrid", "f0")]));
        assert!(replies(&out).is_empty(), "{out:?}");
        let out = send(&mut job, 1, v2("kvs-fence", &[]));
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        for (c, m) in r {
            assert_eq!(
                (m.wire, m.cmd.as_str(), m.get("rc")),
                (Wire::V2, "kvs-fence-response", Some("0"))
            );
            assert_eq!(m.get("thrid"), (c == 0).then_some("f0"));
        }

        let out = send(&mut job, 1, v2("kvs-get", &[("key", "k0")]));
        let m = the_reply(&out);
        assert_eq!(
            (m.get("rc"), m.get("found"), m.get("value")),
            (Some("0"), Some("TRUE"), Some("a;b"))
        );
    }

    #[test]
    fn a_missing_key_is_an_error_in_pmi1_and_not_found_in_pmi2() {
        let mut job = job(1);
        let out = send(&mut job, 0, v1("get", &[("key", "nope")]));
        let m = the_reply(&out);
        assert_eq!(m.get("rc"), Some("-1"));
        assert_eq!(m.get("msg"), Some("key_nope_not_found"));
        assert_eq!(m.get("found"), Some("FALSE"));
        assert_eq!(m.get("value"), Some("unknown"));

        let out = send(&mut job, 0, v2("kvs-get", &[("key", "nope")]));
        let m = the_reply(&out);
        assert_eq!(
            (m.get("rc"), m.get("found"), m.get("value")),
            (Some("0"), Some("FALSE"), None)
        );
    }

    #[test]
    fn a_put_without_a_value_is_refused_on_both_wires() {
        let mut job = job(1);
        let out = send(&mut job, 0, v1("put", &[("key", "k")]));
        assert_eq!(the_reply(&out).get("rc"), Some("-1"));
        assert!(matches!(
            events(&out)[..],
            [
                Event::Connected { rank: 0 },
                Event::ProtocolError { rank: Some(0), .. }
            ]
        ));
        let out = send(&mut job, 0, v2("kvs-put", &[("value", "v")]));
        let m = the_reply(&out);
        assert_eq!(m.get("rc"), Some("-1"));
        assert_eq!(m.get("errmsg"), Some("kvs-put without key or value"));
        assert_eq!(job.report.puts, 0);
    }

    #[test]
    fn the_job_attributes_answer_both_wires() {
        let mut job = Job::new(JobConfig::new("kvs-test", vec![0, 0, 1])).unwrap();
        job.open(0, Some(0));
        let out = send(&mut job, 0, v1("get", &[("key", "PMI_process_mapping")]));
        assert_eq!(
            the_reply(&out).get("value"),
            Some("(vector,(0,1,2),(1,1,1))")
        );
        let out = send(
            &mut job,
            0,
            v2("info-getjobattr", &[("key", "universeSize")]),
        );
        assert_eq!(the_reply(&out).get("value"), Some("3"));
    }

    #[test]
    fn a_disconnect_fails_the_fence_the_others_wait_in() {
        let mut job = job(3);
        send(&mut job, 0, v2("kvs-fence", &[]));
        send(&mut job, 1, v1("barrier_in", &[]));
        let mut out = Vec::new();
        job.close(2, &mut out);
        assert_eq!(out[0], Output::Close(2));
        assert_eq!(
            events(&out),
            [&Event::Disconnected {
                rank: 2,
                initialized: false,
                mid_fence: true
            }]
        );
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].0, r[0].1.cmd.as_str(), r[0].1.get("rc")),
            (0, "kvs-fence-response", Some("-1"))
        );
        assert_eq!(
            r[0].1.get("errmsg"),
            Some("fence failed: rank 2 disconnected")
        );
        assert_eq!(
            (r[1].0, r[1].1.cmd.as_str(), r[1].1.get("msg")),
            (1, "barrier_out", Some("fence_failed:_rank_2_disconnected"))
        );
        assert_eq!(job.report.fences, 0);
        assert_eq!(job.report.disconnected, [2]);
        // A later fence cannot complete either: it fails at once.
        let out = send(&mut job, 0, v2("kvs-fence", &[]));
        assert_eq!(the_reply(&out).get("rc"), Some("-1"));
    }

    #[test]
    fn an_abort_fails_the_fence_and_is_reported_once() {
        let mut job = job(2);
        send(&mut job, 0, v1("barrier_in", &[]));
        let out = send(
            &mut job,
            1,
            v1("abort", &[("exitcode", "7"), ("message", "bad")]),
        );
        assert_eq!(
            events(&out),
            [
                &Event::Connected { rank: 1 },
                &Event::Aborted {
                    rank: 1,
                    exit_code: 7,
                    message: Some("bad".into())
                }
            ]
        );
        assert_eq!(the_reply(&out).get("rc"), Some("-1"));
        assert_eq!(job.report.aborted, Some((1, 7, Some("bad".into()))));
        let out = send(&mut job, 0, v1("finalize", &[]));
        assert_eq!(the_reply(&out).cmd, "finalize_ack");
        assert!(job.is_over());
    }

    #[test]
    fn a_rank_that_exits_without_connecting_is_gone() {
        let mut job = Job::new(JobConfig::single_node("kvs-test", 2)).unwrap();
        assert_eq!(job.waiting_ranks(), [0, 1]);
        let mut out = Vec::new();
        job.rank_exited(1, &mut out);
        job.rank_exited(9, &mut out);
        assert_eq!(
            out,
            [Output::Event(Event::Disconnected {
                rank: 1,
                initialized: false,
                mid_fence: false
            })]
        );
        assert_eq!(job.waiting_ranks(), [0]);
        assert!(!job.is_over());
    }

    #[test]
    fn a_tcp_client_must_say_which_rank_it_is_first() {
        let mut job = Job::new(JobConfig::single_node("kvs-test", 2)).unwrap();
        job.open(5, None);
        job.open(6, None);
        let out = send(&mut job, 5, v1("get_appnum", &[]));
        assert!(matches!(
            events(&out)[..],
            [Event::ProtocolError { rank: None, .. }]
        ));
        assert_eq!(out.last(), Some(&Output::Close(5)));

        let out = send(&mut job, 6, v1("initack", &[("pmiid", "1")]));
        let r = replies(&out);
        assert_eq!(r.len(), 4);
        assert_eq!(
            (r[0].1.cmd.as_str(), r[0].1.get("rank"), r[0].1.get("size")),
            ("initack", Some("1"), Some("2"))
        );
        assert_eq!(job.rank_of(6), Some(1));
        assert_eq!(events(&out), [&Event::Connected { rank: 1 }]);
        // Rank 1 is taken now.
        job.open(7, None);
        let out = send(&mut job, 7, v2("fullinit", &[("pmirank", "1")]));
        assert_eq!(the_reply(&out).get("rc"), Some("-1"));
    }

    #[test]
    fn a_node_attribute_get_can_wait_for_the_put() {
        let mut job = job(2);
        let out = send(
            &mut job,
            0,
            v2(
                "info-getnodeattr",
                &[("key", "shm"), ("wait", "TRUE"), ("thrid", "w")],
            ),
        );
        assert!(replies(&out).is_empty());
        let out = send(
            &mut job,
            1,
            v2("info-putnodeattr", &[("key", "shm"), ("value", "seg-1")]),
        );
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, 0);
        assert_eq!(
            (r[1].1.get("value"), r[1].1.get("thrid")),
            (Some("seg-1"), Some("w"))
        );
    }

    #[test]
    fn a_job_that_cannot_be_described_is_refused() {
        assert!(matches!(
            Job::new(JobConfig::single_node("k", 0)),
            Err(PmiError::InvalidJob(_))
        ));
        assert!(matches!(
            Job::new(JobConfig::single_node("a;b", 1)),
            Err(PmiError::InvalidJob(_))
        ));
        let job = job(1);
        assert!(matches!(job.check_free(0), Err(PmiError::RankTaken(0))));
        assert!(matches!(
            job.check_free(1),
            Err(PmiError::RankOutOfRange { rank: 1, size: 1 })
        ));
    }
}
