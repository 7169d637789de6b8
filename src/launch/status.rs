//! How a job ended, and the exit status cmpirun reports for it (pure; documented in
//! `docs/exit-status.md`).
//!
//! The first event that ends a job decides its status: a rank that fails, a rank that calls
//! `MPI_Abort`, a signal to cmpirun, or `--timeout`. Whatever the other ranks do while they are
//! torn down does not change it, because their failures are consequences.

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

/// Exit status when `--timeout` ended the job (the status of coreutils' `timeout`).
pub const TIMEOUT: i32 = 124;

/// Added to a signal's number for the exit status of a job that a signal ended (the shell's
/// convention: 143 for SIGTERM, 137 for SIGKILL).
pub const SIGNAL_BASE: i32 = 128;

/// How one rank ended, as the process that started it saw it (the local launcher, or the rank's
/// `cmpirun __rank` task under srun and hydra, which reports it to the front end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RankEnd {
    /// It exited with this status.
    Exited(i32),
    /// This signal killed it.
    Signaled(i32),
    /// It called `MPI_Abort` with this code (seen on its PMI connection).
    Aborted(i32),
    /// Its node instance killed it because an image mount of the node ended (its server died);
    /// the report's message says which.
    MountLost,
    /// It loaded an MPI library but never spoke PMI: it ran as a singleton (the report's
    /// message is the library).
    Singleton,
}

/// `-print-all-exitcodes`: one line per rank saying how it ended (`None`: it never ended
/// as far as cmpirun saw, as when it was never reaped).
pub fn all_exit_codes(ends: &[Option<RankEnd>]) -> String {
    let mut text = String::new();
    for (rank, end) in ends.iter().enumerate() {
        let how = match end {
            Some(RankEnd::Exited(code)) => format!("exited with status {code}"),
            Some(RankEnd::Signaled(sig)) => {
                let name =
                    Signal::try_from(*sig).map_or_else(|_| sig.to_string(), |s| s.to_string());
                format!("was killed by signal {sig} ({name})")
            }
            Some(RankEnd::Aborted(code)) => format!("called MPI_Abort with code {code}"),
            Some(RankEnd::MountLost) => "ended because its image mount ended".to_owned(),
            Some(RankEnd::Singleton) => {
                "loaded an MPI library but never spoke PMI (a singleton)".to_owned()
            }
            None => "did not end".to_owned(),
        };
        text.push_str(&format!("cmpirun: rank {rank} {how}\n"));
    }
    text
}

/// What ended a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// Every rank exited with status 0.
    Success,
    /// A rank exited with a non-zero status.
    RankExited {
        /// The rank.
        rank: u32,
        /// Its exit status.
        code: i32,
    },
    /// A rank was killed by a signal that cmpirun did not send.
    RankSignaled {
        /// The rank.
        rank: u32,
        /// The signal.
        signal: Signal,
    },
    /// A rank called `MPI_Abort` (seen by the PMI server).
    Aborted {
        /// The rank.
        rank: u32,
        /// The code passed to `MPI_Abort`.
        code: i32,
    },
    /// cmpirun received a signal and passed it to the ranks.
    Interrupted(Signal),
    /// A rank loaded another libfabric than the host's the plan injects, and the job expects a
    /// provider (`--expect-provider` or the profile's expectation).
    NotInjected {
        /// The rank.
        rank: u32,
        /// The libfabric it loaded (inside the container).
        loaded: String,
        /// The host libfabric the plan binds in.
        host: String,
    },
    /// An MPI rank (it spoke PMI) reached `PMI_Finalize`, or ended, without mapping any
    /// libfabric while the job expects the host's provider: its MPI used another transport.
    NoLibfabric {
        /// The rank.
        rank: u32,
        /// The host libfabric the plan binds in.
        host: String,
        /// Where the expectation comes from (`--expect-provider tcp`, or the profile's).
        expected: String,
        /// What to run with when the image's own transport is intended (`run without
        /// --expect-provider tcp`, or `run with --no-inject` when the profile requires it).
        own_transport: String,
    },
    /// A rank loaded an MPI library, never spoke to the job's PMI server and exited with 0: it
    /// ran MPI as a singleton, a world of one, not as one of the job's ranks
    /// (`launch::singleton`).
    Singleton {
        /// The rank.
        rank: u32,
        /// The MPI library it mapped (inside the container).
        library: String,
    },
    /// `--timeout` expired.
    TimedOut {
        /// The timeout in seconds.
        secs: u64,
    },
    /// An image mount of a node ended while the job ran (its server died: killed, or chosen by
    /// the OOM killer), so the node instance ended every rank there.
    MountLost {
        /// The rank that saw it.
        rank: u32,
        /// The node instance's account (`the image mount of node n1 ended (…); the job was
        /// ended`).
        message: String,
    },
    /// The node instance ended while ranks ran (it was killed): the ranks' image and container
    /// went with it.
    InstanceLost,
    /// cmpirun's standard output or error, where the ranks' output goes, was closed by its
    /// reader (`cmpirun … | head`): the job ends as if cmpirun had been killed by SIGPIPE, as
    /// under `mpiexec.hydra`.
    OutputClosed {
        /// `standard output` or `standard error`.
        stream: &'static str,
    },
    /// The launcher ended but some ranks never reported how they ended (every rank's task
    /// reports, a clean end too): their node was lost (killed, cut off) before they could, or
    /// their task was killed. Never a success, also when the launcher exited with 0.
    RanksLost {
        /// The ranks, as a list (`4-5`, `1,3`).
        ranks: String,
        /// Their nodes.
        nodes: Vec<String>,
        /// The launcher program.
        launcher: String,
        /// Its exit status.
        code: i32,
    },
    /// srun or `mpiexec.hydra` failed and no rank reported a failure (no rank reported at all,
    /// or every rank a clean end): cmpirun exits with the launcher's status.
    Unreported {
        /// The launcher program.
        launcher: String,
        /// Its exit status (128 + the signal if a signal killed it).
        code: i32,
    },
}

impl JobEnd {
    /// What ends the job when `rank` ended as `end`: nothing for a rank that exited with 0.
    pub fn of_rank(rank: u32, end: RankEnd) -> Option<JobEnd> {
        match end {
            RankEnd::Exited(0) => None,
            RankEnd::Exited(code) => Some(JobEnd::RankExited { rank, code }),
            RankEnd::Signaled(n) => Some(match Signal::try_from(n) {
                Ok(signal) => JobEnd::RankSignaled { rank, signal },
                // A real-time signal has no name here; its status is the shell's all the same.
                Err(_) => JobEnd::RankExited {
                    rank,
                    code: SIGNAL_BASE + n,
                },
            }),
            RankEnd::Aborted(code) => Some(JobEnd::Aborted { rank, code }),
            RankEnd::MountLost => Some(JobEnd::MountLost {
                rank,
                message: "the image mount of its node ended; the job was ended".into(),
            }),
            RankEnd::Singleton => Some(JobEnd::Singleton {
                rank,
                library: "its MPI library".into(),
            }),
        }
    }

    /// [`Self::of_rank`], with the message the rank's report carried (for a lost mount, the
    /// node instance's account).
    pub fn of_report(rank: u32, end: RankEnd, message: Option<&str>) -> Option<JobEnd> {
        match (end, message) {
            (RankEnd::MountLost, Some(m)) if !m.is_empty() => Some(JobEnd::MountLost {
                rank,
                message: m.to_owned(),
            }),
            (RankEnd::Singleton, Some(m)) if !m.is_empty() => Some(JobEnd::Singleton {
                rank,
                library: m.to_owned(),
            }),
            _ => JobEnd::of_rank(rank, end),
        }
    }

    /// The exit status of cmpirun.
    pub fn exit_code(&self) -> i32 {
        match self {
            JobEnd::Success => 0,
            JobEnd::RankExited { code, .. } => *code,
            JobEnd::RankSignaled { signal, .. } | JobEnd::Interrupted(signal) => {
                SIGNAL_BASE + *signal as i32
            }
            // An abort is a failed job even when its code is 0 modulo 256 (0, 256, …).
            JobEnd::Aborted { code, .. } => match code & 0xff {
                0 => 1,
                status => status,
            },
            JobEnd::TimedOut { .. } => TIMEOUT,
            JobEnd::OutputClosed { .. } => SIGNAL_BASE + Signal::SIGPIPE as i32,
            JobEnd::NotInjected { .. }
            | JobEnd::NoLibfabric { .. }
            | JobEnd::Singleton { .. }
            | JobEnd::MountLost { .. }
            | JobEnd::InstanceLost => crate::exit::FAILURE,
            JobEnd::Unreported { code, .. } => *code,
            JobEnd::RanksLost { code, .. } => match *code {
                0 => crate::exit::FAILURE,
                c => c,
            },
        }
    }

    /// The one line cmpirun prints about it (none for success).
    pub fn message(&self, size: u32) -> Option<String> {
        Some(match self {
            JobEnd::Success => return None,
            JobEnd::RankExited { rank, code } => {
                format!("rank {rank} of {size} exited with status {code}; the job was ended")
            }
            JobEnd::RankSignaled { rank, signal } => format!(
                "rank {rank} of {size} was killed by signal {} ({signal}); the job was ended",
                *signal as i32
            ),
            JobEnd::Aborted { rank, code } => {
                format!(
                    "rank {rank} of {size} called MPI_Abort with code {code}; the job was ended"
                )
            }
            JobEnd::Interrupted(signal) => {
                format!("received {signal}; passed it to the ranks and ended the job")
            }
            JobEnd::NotInjected { rank, loaded, host } => format!(
                "rank {rank} of {size} loaded {loaded}, not the host libfabric {host}; the job \
                 was ended because it expects the host's provider"
            ),
            JobEnd::NoLibfabric {
                rank,
                host,
                expected,
                own_transport,
            } => format!(
                "rank {rank} of {size} spoke PMI but loaded no libfabric (its MPI used another \
                 transport), not the host libfabric {host}; the job was ended because it expects \
                 the host's provider ({expected}): make the image's MPI use libfabric (MPICH: -x \
                 MPIR_CVAR_CH4_NETMOD=ofi, with FI_PROVIDER), or, if the image's own transport \
                 is intended, {own_transport}"
            ),
            JobEnd::Singleton { rank, library } => format!(
                "rank {rank} of {size} loaded the MPI library {library} but never spoke to the \
                 job's PMI server: it ran MPI on its own as a singleton (a world of 1, not of \
                 {size}), and its results are not the job's; the job was ended. The image's MPI \
                 needs a PMI this launcher does not serve (Open MPI 5 speaks only PMIx; Debian's \
                 Open MPI 4 has no PMI-1/PMI-2 client): see docs/pmi.md for the launchers that \
                 serve it"
            ),
            JobEnd::TimedOut { secs } => {
                format!("the job did not end within --timeout {secs} s; it was ended")
            }
            JobEnd::MountLost { rank, message } => format!("rank {rank} of {size}: {message}"),
            JobEnd::InstanceLost => "the node instance ended while the ranks ran (killed?); \
                their image and container went with it; the job was ended"
                .to_owned(),
            JobEnd::OutputClosed { stream } => format!(
                "the reader of cmpirun's {stream} went away; the job was ended (status 141, as \
                 for SIGPIPE)"
            ),
            JobEnd::RanksLost {
                ranks,
                nodes,
                launcher,
                code,
            } => format!(
                "rank{} {ranks} of {size} on node{} {} never reported how {} ended ({launcher} \
                 ended with status {code}): the node was lost or the tasks were killed; the job \
                 did not end well",
                if ranks.contains(['-', ',']) { "s" } else { "" },
                if nodes.len() > 1 { "s" } else { "" },
                match nodes.len() {
                    0..=8 => nodes.join(","),
                    n => format!("{} and {} more", nodes[..8].join(","), n - 8),
                },
                if ranks.contains(['-', ',']) {
                    "they"
                } else {
                    "it"
                },
            ),
            JobEnd::Unreported { launcher, code } => format!(
                "{launcher} ended with status {code} and no rank reported a failure (a task \
                 killed before it could report, or a node lost); exiting with {launcher}'s status"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_ends() {
        assert_eq!(JobEnd::of_rank(0, RankEnd::Exited(0)), None);
        let codes: Vec<i32> = [
            RankEnd::Exited(3),
            RankEnd::Signaled(9),
            RankEnd::Signaled(40),
            RankEnd::Aborted(7),
            RankEnd::Aborted(0),
        ]
        .into_iter()
        .map(|e| JobEnd::of_rank(1, e).unwrap().exit_code())
        .collect();
        assert_eq!(codes, [3, 137, 168, 7, 1]);
        assert_eq!(
            serde_json::to_string(&RankEnd::Aborted(7)).unwrap(),
            r#"{"aborted":7}"#
        );
    }

    #[test]
    fn codes() {
        assert_eq!(JobEnd::Success.exit_code(), 0);
        assert_eq!(JobEnd::RankExited { rank: 1, code: 3 }.exit_code(), 3);
        assert_eq!(
            JobEnd::RankSignaled {
                rank: 0,
                signal: Signal::SIGKILL
            }
            .exit_code(),
            137
        );
        assert_eq!(JobEnd::Aborted { rank: 0, code: 7 }.exit_code(), 7);
        assert_eq!(JobEnd::Aborted { rank: 0, code: 0 }.exit_code(), 1);
        assert_eq!(JobEnd::Aborted { rank: 0, code: 256 }.exit_code(), 1);
        assert_eq!(
            JobEnd::Aborted {
                rank: 0,
                code: 256 + 5
            }
            .exit_code(),
            5
        );
        assert_eq!(JobEnd::Interrupted(Signal::SIGTERM).exit_code(), 143);
        assert_eq!(JobEnd::TimedOut { secs: 5 }.exit_code(), TIMEOUT);
        assert!(JobEnd::Success.message(4).is_none());
        let unreported = JobEnd::Unreported {
            launcher: "srun".into(),
            code: 137,
        };
        assert_eq!(unreported.exit_code(), 137);
        assert!(
            unreported
                .message(4)
                .unwrap()
                .contains("srun ended with status 137")
        );
        assert!(
            JobEnd::Aborted { rank: 2, code: 7 }
                .message(4)
                .unwrap()
                .contains("MPI_Abort with code 7")
        );
    }
}
