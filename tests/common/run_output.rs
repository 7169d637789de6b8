//! What a run of the test user did, and the checks of its status.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

/// What a [`TuserCommand`](super::TuserCommand) did.
#[derive(Debug)]
pub struct RunOutput {
    /// Exit status of the program.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (lossily decoded).
    pub stdout: String,
    /// Everything it wrote to stderr (lossily decoded).
    pub stderr: String,
    /// The timeout passed and the job was killed.
    pub timed_out: bool,
    /// stdout or stderr stayed open 5 s after the program exited: some process it started kept
    /// them (a leftover); the output may be incomplete.
    pub pipes_held_open: bool,
    /// Wall-clock time from start to exit.
    pub elapsed: Duration,
    /// The value of [`TAG_VAR`](super::TAG_VAR) in this run's processes.
    pub tag: String,
    /// The command line, for messages.
    pub description: String,
}

impl RunOutput {
    /// The exit code, if the program exited (rather than being killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The signal that killed the program, if one did.
    pub fn signal(&self) -> Option<i32> {
        self.status.signal()
    }

    /// Exited with status 0, in time.
    pub fn success(&self) -> bool {
        self.status.success() && !self.timed_out
    }

    /// Panics with the command, status and output unless the run succeeded.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "expected success:\n{self}");
        self
    }

    /// Panics with the command, status and output unless the program exited with `code` in time.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert!(
            !self.timed_out && self.code() == Some(code),
            "expected exit status {code}:\n{self}"
        );
        self
    }
}

impl fmt::Display for RunOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "command: {}", self.description)?;
        writeln!(
            f,
            "status: {}{}{} after {:.2?}",
            self.status,
            if self.timed_out {
                " (TIMED OUT, killed)"
            } else {
                ""
            },
            if self.pipes_held_open {
                " (pipes held open by a leftover process)"
            } else {
                ""
            },
            self.elapsed
        )?;
        writeln!(f, "--- stdout ---\n{}", self.stdout.trim_end())?;
        write!(f, "--- stderr ---\n{}", self.stderr.trim_end())
    }
}
