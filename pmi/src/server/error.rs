//! The errors of the PMI server: a job it cannot describe, a rank it cannot place, a system call
//! of its transport that failed, ranks that never connected.

use std::io;
use std::time::Duration;

/// Errors of the PMI server.
#[derive(Debug, thiserror::Error)]
pub enum PmiError {
    /// The [`JobConfig`](super::JobConfig) cannot describe a job.
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
    /// [`PmiServer::add_socketpair`](super::PmiServer::add_socketpair) was called twice for the
    /// same rank.
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

/// The [`PmiError::Io`] of a failed step `what`, for `map_err`.
pub(crate) fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> PmiError {
    move |source| PmiError::Io { what, source }
}
