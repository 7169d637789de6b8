//! Exit statuses of the `cmpirun` binary (documented in `docs/exit-status.md`).

/// Everything went well.
pub const SUCCESS: i32 = 0;
/// cmpirun itself failed at run time (a system call, a mount, an I/O error).
pub const FAILURE: i32 = 1;
/// Bad usage or bad input: a flag, a file, an image or a profile the user can fix.
pub const USAGE: i32 = 2;

/// An error the user caused and can fix; the binary exits with [`USAGE`] for it.
///
/// Library errors that are the user's to fix are wrapped in this (or convert into it) so that
/// `main` can choose the exit status without matching on every error type.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);
