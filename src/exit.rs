//! Exit statuses of the `cmpirun` binary (documented in `docs/exit-status.md`), and the one way
//! an error says which of them it ends cmpirun with: [`Blame`].
//!
//! Every error type that can reach `main` implements [`Blame`]; its wrappers ask their inner
//! error. `main` turns whatever error ends it into a [`Fatal`] (with `?`), which asks [`Blame`]
//! once, and prints it and exits with [`Fatal::status`]: there is no list of error types to keep
//! up to date there.

use std::fmt;

/// Everything went well.
pub const SUCCESS: i32 = 0;
/// cmpirun itself failed at run time (a system call, a mount, an I/O error).
pub const FAILURE: i32 = 1;
/// Bad usage or bad input: a flag, a file, an image or a profile the user can fix.
pub const USAGE: i32 = 2;

/// Whose a failure is to fix; it decides cmpirun's exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The user's: a flag, a file, an image, a profile or a setting they can change ([`USAGE`]).
    User,
    /// Not the user's: a system call, a mount or an I/O error on this host, or cmpirun itself
    /// ([`FAILURE`]).
    Host,
}

impl Fault {
    /// [`Fault::User`] when `users` holds, else [`Fault::Host`].
    pub fn user_if(users: bool) -> Fault {
        if users { Fault::User } else { Fault::Host }
    }

    /// The exit status cmpirun ends with for a failure of this kind.
    pub fn status(self) -> i32 {
        match self {
            Fault::User => USAGE,
            Fault::Host => FAILURE,
        }
    }
}

/// Says whose an error is to fix. Implemented by every error type that can reach `main`; an
/// error that wraps another asks it.
pub trait Blame {
    /// Whose this error is to fix.
    fn fault(&self) -> Fault;
}

/// An error the user caused and can fix, in cmpirun's own words; the binary exits with
/// [`USAGE`] for it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl Blame for UsageError {
    fn fault(&self) -> Fault {
        Fault::User
    }
}

/// An I/O error that reaches `main` as it is (writing the output, a path) is the host's.
impl Blame for std::io::Error {
    fn fault(&self) -> Fault {
        Fault::Host
    }
}

/// A failed system call that reaches `main` as it is (`cmpirun __mount-check`) is the host's.
impl Blame for nix::errno::Errno {
    fn fault(&self) -> Fault {
        Fault::Host
    }
}

/// Writing cmpirun's own values as JSON fails only for a reason of the host's.
impl Blame for serde_json::Error {
    fn fault(&self) -> Fault {
        Fault::Host
    }
}

/// The error that ends cmpirun: built from any error that implements [`Blame`] (so `?` in
/// `main`'s functions makes one), it keeps the error and the status it ends cmpirun with.
#[derive(Debug)]
pub struct Fatal {
    error: Box<dyn std::error::Error + Send + Sync>,
    fault: Fault,
}

impl Fatal {
    /// Whose the error is to fix.
    pub fn fault(&self) -> Fault {
        self.fault
    }

    /// The exit status cmpirun ends with ([`FAILURE`] or [`USAGE`]).
    pub fn status(&self) -> i32 {
        self.fault.status()
    }
}

impl<E> From<E> for Fatal
where
    E: Blame + std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Fatal {
        Fatal {
            fault: error.fault(),
            error: Box::new(error),
        }
    }
}

/// The error on one line: its message, then that of each of its sources, joined with `": "`.
impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        let mut source = self.error.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    impl Blame for Outer {
        fn fault(&self) -> Fault {
            Fault::User
        }
    }

    #[test]
    fn fatal_keeps_the_status_and_prints_the_chain() {
        let f = Fatal::from(Outer(std::io::Error::other("inner")));
        assert_eq!(f.status(), USAGE);
        assert_eq!(f.to_string(), "outer: inner");
        let f = Fatal::from(std::io::Error::other("disk"));
        assert_eq!(f.status(), FAILURE);
        assert_eq!(f.to_string(), "disk");
        assert_eq!(Fatal::from(UsageError("x".into())).fault(), Fault::User);
    }
}
