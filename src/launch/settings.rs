//! Settings of the launchers that a user may change through the environment (not the plan:
//! they say how to tear a job down, not what the job is), in one place that every launcher and
//! the rank mode read.
//!
//! | variable | default | what |
//! |---|---|---|
//! | `CMPIRUN_KILL_GRACE` | 3 | seconds ranks get between SIGTERM and SIGKILL when the job is torn down |
//! | `CMPIRUN_WIREUP_REPORT` | 30 | seconds a PMI fence of the local launcher waits for ranks before it is reported (again at each doubling; 0: never) |
//!
//! `cmpirun -v` shows them ([`log_settings`]).

use std::time::Duration;

/// The variable that sets [`kill_grace`], in seconds (a decimal number, 0 or more).
pub const KILL_GRACE_VAR: &str = "CMPIRUN_KILL_GRACE";

/// The kill grace when [`KILL_GRACE_VAR`] is unset or not a number of seconds.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(3);

/// How long ranks get between SIGTERM and SIGKILL when the job is torn down: [`KILL_GRACE_VAR`]
/// if set to a number of seconds, else [`DEFAULT_KILL_GRACE`].
pub fn kill_grace() -> Duration {
    std::env::var(KILL_GRACE_VAR)
        .ok()
        .and_then(|s| parse_seconds(&s))
        .unwrap_or(DEFAULT_KILL_GRACE)
}

/// A finite, non-negative number of seconds that a `Duration` holds.
fn parse_seconds(s: &str) -> Option<Duration> {
    s.trim()
        .parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
}

/// The variable that sets [`wireup_report`], in seconds (0: never).
pub const WIREUP_REPORT_VAR: &str = "CMPIRUN_WIREUP_REPORT";

/// After how long a PMI fence of the local launcher that waits for ranks is reported, then at
/// each doubling: [`WIREUP_REPORT_VAR`] if set to a number of seconds (a warning when it is set
/// to something else), else the PMI server's default
/// ([`cmpirun_pmi::server::DEFAULT_FENCE_REPORT`]).
pub fn wireup_report() -> Option<Duration> {
    let default = Some(cmpirun_pmi::server::DEFAULT_FENCE_REPORT);
    let Ok(text) = std::env::var(WIREUP_REPORT_VAR) else {
        return default;
    };
    match parse_seconds(&text) {
        Some(after) => Some(after),
        None => {
            tracing::warn!("{WIREUP_REPORT_VAR}={text:?} is not a number of seconds; ignored");
            default
        }
    }
}

/// Logs the launch settings at `-v` (info level), and a value that is set but not understood.
pub fn log_settings() {
    let grace = kill_grace();
    match std::env::var(KILL_GRACE_VAR) {
        Ok(s) if parse_seconds(&s).is_none() => tracing::info!(
            "{KILL_GRACE_VAR}={s:?} is not a number of seconds; kill grace {} s",
            grace.as_secs_f64()
        ),
        Ok(_) => tracing::info!(
            "kill grace {} s (from {KILL_GRACE_VAR})",
            grace.as_secs_f64()
        ),
        Err(_) => tracing::info!(
            "kill grace {} s (default; {KILL_GRACE_VAR}=SECONDS changes it)",
            grace.as_secs_f64()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_decimal_finite_and_not_negative() {
        assert_eq!(parse_seconds("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_seconds("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_seconds("0"), Some(Duration::ZERO));
        assert_eq!(parse_seconds("-1"), None);
        assert_eq!(parse_seconds("inf"), None);
        assert_eq!(parse_seconds("soon"), None);
        assert_eq!(
            parse_seconds("1e300"),
            None,
            "too long for a Duration, and no panic"
        );
    }
}
