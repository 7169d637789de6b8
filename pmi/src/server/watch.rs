//! The fence watch: when ranks have waited in a fence long enough to tell someone, and what to
//! tell them.
//!
//! A job stuck in PMI wire-up is silent: its ranks sit in a fence (PMI-1 `barrier_in`, PMI-2
//! `kvs-fence`) for ranks that never come. The watch notices. The loop hands it the job and
//! "now" after every round; it remembers when the fence in progress began and, once the fence has
//! waited [`JobConfig::fence_report`](super::JobConfig::fence_report), returns a [`FenceWait`] to
//! report, then again each time the wait has doubled (30 s, 60 s, 120 s …). It only reports:
//! ending the job is the launcher's decision. It has no clock of its own, so its tests give it
//! the times.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use super::job::Job;

/// A fence that has waited a while, and where every rank is: the payload of
/// [`Event::FenceWaiting`](super::Event::FenceWaiting).
///
/// Its `Display` is one line for a user:
///
/// ```
/// use std::time::Duration;
/// use cmpirun_pmi::server::FenceWait;
///
/// let wait = FenceWait {
///     number: 1,
///     completed: 0,
///     waited: Duration::from_secs(30),
///     size: 8,
///     arrived: vec![0, 1, 2, 3, 6],
///     never_connected: vec![4, 5],
///     not_in_fence: vec![7],
///     last_command: [("get".to_owned(), vec![7])].into(),
///     finalized: vec![],
/// };
/// assert_eq!(
///     wait.to_string(),
///     "PMI fence 1 (0 completed) has waited 30 s for 3 of 8 ranks: arrived 0-3,6; \
///      missing 4-5,7; never connected to the PMI server: 4-5 (not in MPI_Init yet, or an MPI \
///      that does not use this PMI server); connected but not in the fence: 7 (last PMI \
///      command: get from 7)"
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FenceWait {
    /// The fence's number in the job: 1 for the first (`MPI_Init`'s wire-up).
    pub number: u64,
    /// Fences the job has completed.
    pub completed: u64,
    /// How long the fence has waited since its first rank entered.
    pub waited: Duration,
    /// The job size.
    pub size: u32,
    /// Ranks in the fence.
    pub arrived: Vec<u32>,
    /// Ranks missing that never sent a PMI message: not in `MPI_Init` yet (still starting, or
    /// stuck before it), or a rank whose MPI does not use this server's PMI.
    pub never_connected: Vec<u32>,
    /// Ranks missing that have spoken PMI but not entered the fence.
    pub not_in_fence: Vec<u32>,
    /// The ranks of `not_in_fence` by the command of the last PMI message each sent: where
    /// in its wire-up each stopped talking to the server.
    pub last_command: BTreeMap<String, Vec<u32>>,
    /// Ranks missing that have finalized (they will not enter it).
    pub finalized: Vec<u32>,
}

impl FenceWait {
    /// Every rank the fence waits for, in order.
    pub fn missing(&self) -> Vec<u32> {
        let mut missing = [
            &self.never_connected[..],
            &self.not_in_fence,
            &self.finalized,
        ]
        .concat();
        missing.sort_unstable();
        missing
    }
}

impl fmt::Display for FenceWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let missing = self.missing();
        write!(
            f,
            "PMI fence {} ({} completed) has waited {} for {} of {} ranks: arrived {}; missing {}",
            self.number,
            self.completed,
            seconds(self.waited),
            missing.len(),
            self.size,
            or_none(&self.arrived),
            rank_ranges(&missing),
        )?;
        if !self.never_connected.is_empty() {
            write!(
                f,
                "; never connected to the PMI server: {} (not in MPI_Init yet, or an MPI that \
                 does not use this PMI server)",
                rank_ranges(&self.never_connected)
            )?;
        }
        if !self.not_in_fence.is_empty() {
            let last: Vec<String> = self
                .last_command
                .iter()
                .map(|(cmd, ranks)| format!("{cmd} from {}", rank_ranges(ranks)))
                .collect();
            write!(
                f,
                "; connected but not in the fence: {} (last PMI command: {})",
                rank_ranges(&self.not_in_fence),
                last.join(", ")
            )?;
        }
        if !self.finalized.is_empty() {
            write!(f, "; finalized: {}", rank_ranges(&self.finalized))?;
        }
        Ok(())
    }
}

/// `ranks` (in increasing order) as runs: `[0, 1, 2, 3, 7]` is `0-3,7`.
pub fn rank_ranges(ranks: &[u32]) -> String {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &r in ranks {
        match runs.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(r) => *last = r,
            _ => runs.push((r, r)),
        }
    }
    let text: Vec<String> = runs
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    text.join(",")
}

fn or_none(ranks: &[u32]) -> String {
    if ranks.is_empty() {
        "none".to_owned()
    } else {
        rank_ranges(ranks)
    }
}

/// `30 s`, `2.5 s`: whole seconds from ten on, tenths below.
fn seconds(d: Duration) -> String {
    if d >= Duration::from_secs(10) {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// The fence being watched.
struct Watched {
    /// Its number ([`Job::fence_in_progress`]).
    number: u64,
    /// When the watch first saw a rank in it.
    since: Instant,
    /// The wait at which it is reported next.
    next: Duration,
}

/// Decides when a fence is reported. See the [module documentation](self).
pub(super) struct FenceWatch {
    /// The first report's wait; `None`: never report.
    first: Option<Duration>,
    watched: Option<Watched>,
}

impl FenceWatch {
    /// A watch that reports a fence once it has waited `first`, then at each doubling.
    pub(super) fn new(first: Option<Duration>) -> Self {
        Self {
            first: first.filter(|d| !d.is_zero()),
            watched: None,
        }
    }

    /// Look at `job` at `now`: the report that is due, if any. Call it after every change to
    /// the job (a fence begins when a rank enters it, as far as the watch knows, at the first
    /// call that sees it).
    pub(super) fn check(&mut self, job: &Job, now: Instant) -> Option<FenceWait> {
        let first = self.first?;
        let Some(number) = job.fence_in_progress() else {
            self.watched = None;
            return None;
        };
        let watched = match &mut self.watched {
            Some(w) if w.number == number => w,
            slot => slot.insert(Watched {
                number,
                since: now,
                next: first,
            }),
        };
        let waited = now.saturating_duration_since(watched.since);
        if waited < watched.next {
            return None;
        }
        // Past every doubling the loop may have slept through, to the next one ahead.
        while watched.next <= waited {
            watched.next = watched.next.saturating_mul(2);
        }
        Some(job.fence_wait(waited))
    }

    /// When the next report is due, if a fence is watched: the loop wakes up then.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.watched
            .as_ref()
            .and_then(|w| w.since.checked_add(w.next))
    }
}

#[cfg(test)]
mod tests {
    //! The watch over a job without sockets, with made-up times.

    use super::*;
    use crate::server::job::{ConnId, JobConfig, Output};
    use crate::wire::{Message, Wire};

    /// A job of `size` ranks of which `connected` have their socketpair and spoke PMI.
    fn job(size: u32, connected: &[u32]) -> Job {
        let mut job = Job::new(JobConfig::single_node("kvs-test", size)).unwrap();
        for r in 0..size {
            job.open(r as ConnId, Some(r));
        }
        for &r in connected {
            let mut out = Vec::new();
            job.receive(r as ConnId, Message::new(Wire::V1, "get_maxes"), &mut out);
        }
        job
    }

    fn enter(job: &mut Job, rank: u32, wire: Wire) -> Vec<Output> {
        let cmd = match wire {
            Wire::V1 => "barrier_in",
            Wire::V2 => "kvs-fence",
        };
        let mut out = Vec::new();
        job.receive(rank as ConnId, Message::new(wire, cmd), &mut out);
        out
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn ranks_are_written_as_runs() {
        assert_eq!(rank_ranges(&[]), "");
        assert_eq!(rank_ranges(&[5]), "5");
        assert_eq!(rank_ranges(&[0, 1, 2, 3, 7]), "0-3,7");
        assert_eq!(rank_ranges(&[0, 2, 4, 5]), "0,2,4-5");
        assert_eq!(
            rank_ranges(&[u32::MAX - 1, u32::MAX]),
            "4294967294-4294967295"
        );
    }

    #[test]
    fn a_fence_waiting_for_a_rank_that_never_connected_is_reported_at_30_60_120_s() {
        // Rank 1 of 2 never connects: the MPMD part that cannot start its MPI, or a rank still
        // before MPI_Init.
        let mut job = job(2, &[0]);
        let mut watch = FenceWatch::new(Some(secs(30)));
        let t0 = Instant::now();
        assert_eq!(watch.check(&job, t0), None);
        assert_eq!(watch.next_due(), None);

        enter(&mut job, 0, Wire::V1);
        assert_eq!(watch.check(&job, t0), None);
        assert_eq!(watch.next_due(), Some(t0 + secs(30)));
        assert_eq!(watch.check(&job, t0 + secs(29)), None);

        let first = watch.check(&job, t0 + secs(30)).expect("a report at 30 s");
        assert_eq!(
            first,
            FenceWait {
                number: 1,
                completed: 0,
                waited: secs(30),
                size: 2,
                arrived: vec![0],
                never_connected: vec![1],
                not_in_fence: vec![],
                last_command: BTreeMap::new(),
                finalized: vec![],
            }
        );
        assert_eq!(
            first.to_string(),
            "PMI fence 1 (0 completed) has waited 30 s for 1 of 2 ranks: arrived 0; missing 1; \
             never connected to the PMI server: 1 (not in MPI_Init yet, or an MPI that does not \
             use this PMI server)"
        );
        // Not again every round: next at 60 s, then 120 s.
        assert_eq!(watch.check(&job, t0 + secs(31)), None);
        assert_eq!(watch.check(&job, t0 + secs(59)), None);
        assert_eq!(watch.next_due(), Some(t0 + secs(60)));
        let second = watch.check(&job, t0 + secs(60)).expect("a report at 60 s");
        assert_eq!(second.waited, secs(60));
        assert_eq!(watch.next_due(), Some(t0 + secs(120)));
        assert_eq!(watch.check(&job, t0 + secs(119)), None);
        assert!(watch.check(&job, t0 + secs(120)).is_some());
    }

    #[test]
    fn a_late_look_reports_once_and_skips_the_doublings_it_slept_through() {
        let mut job = job(3, &[0, 1, 2]);
        let mut watch = FenceWatch::new(Some(secs(30)));
        let t0 = Instant::now();
        enter(&mut job, 1, Wire::V2);
        watch.check(&job, t0);
        let w = watch.check(&job, t0 + secs(100)).expect("a report");
        assert_eq!(w.waited, secs(100));
        assert_eq!((w.arrived, w.not_in_fence), (vec![1], vec![0, 2]));
        assert_eq!(
            w.last_command,
            [("get_maxes".to_owned(), vec![0, 2])].into()
        );
        assert!(w.never_connected.is_empty());
        assert_eq!(watch.next_due(), Some(t0 + secs(120)));
        assert_eq!(watch.check(&job, t0 + secs(110)), None);
    }

    #[test]
    fn every_rank_is_placed_and_the_count_of_completed_fences_is_given() {
        let mut job = job(8, &[0, 1, 2, 3, 4, 5, 6, 7]);
        for r in 0..8 {
            enter(&mut job, r, Wire::V1);
        }
        // The second fence: ranks 0-3 and 6 arrive, 7 finalized (it will never come), 4-5 busy
        // after a put and a get.
        for r in [0, 1, 2, 3, 6] {
            enter(&mut job, r, Wire::V1);
        }
        let mut out = Vec::new();
        job.receive(7, Message::new(Wire::V1, "finalize"), &mut out);
        let put = Message::new(Wire::V1, "put")
            .with("key", "k")
            .with("value", "v");
        job.receive(4, put, &mut out);
        job.receive(
            5,
            Message::new(Wire::V2, "kvs-get").with("key", "k"),
            &mut out,
        );
        let mut watch = FenceWatch::new(Some(secs(5)));
        let t0 = Instant::now();
        watch.check(&job, t0);
        let w = watch.check(&job, t0 + secs(5)).expect("a report");
        assert_eq!((w.number, w.completed), (2, 1));
        assert_eq!(w.missing(), [4, 5, 7]);
        assert_eq!(
            w.to_string(),
            "PMI fence 2 (1 completed) has waited 5.0 s for 3 of 8 ranks: arrived 0-3,6; \
             missing 4-5,7; connected but not in the fence: 4-5 (last PMI command: kvs-get from \
             5, put from 4); finalized: 7"
        );
    }

    #[test]
    fn a_completed_fence_is_forgotten_and_the_next_one_timed_from_its_own_start() {
        let mut job = job(2, &[0, 1]);
        let mut watch = FenceWatch::new(Some(secs(30)));
        let t0 = Instant::now();
        enter(&mut job, 0, Wire::V1);
        watch.check(&job, t0);
        enter(&mut job, 1, Wire::V1);
        assert_eq!(watch.check(&job, t0 + secs(20)), None);
        assert_eq!(watch.next_due(), None);
        // The next fence begins at 25 s: nothing at 50 s, a report at 55 s.
        enter(&mut job, 1, Wire::V1);
        watch.check(&job, t0 + secs(25));
        assert_eq!(watch.check(&job, t0 + secs(50)), None);
        let w = watch.check(&job, t0 + secs(55)).expect("a report");
        assert_eq!((w.number, w.completed, w.waited), (2, 1, secs(30)));
    }

    #[test]
    fn a_fence_is_not_reported_when_reports_are_off() {
        let mut job = job(2, &[0]);
        enter(&mut job, 0, Wire::V1);
        let t0 = Instant::now();
        for off in [None, Some(Duration::ZERO)] {
            let mut watch = FenceWatch::new(off);
            assert_eq!(watch.check(&job, t0), None);
            assert_eq!(watch.check(&job, t0 + secs(3600)), None);
            assert_eq!(watch.next_due(), None);
        }
    }
}
