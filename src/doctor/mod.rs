//! `cmpirun doctor`: proves that this node can run jobs, or says exactly what to fix.
//!
//! Each check is one [`Finding`] (PASS, WARN or FAIL, with the fix); the command exits with the
//! status of the worst ([`Report::exit_status`], documented in `docs/exit-status.md`). The checks
//! that create namespaces or load libraries run in forked children, so the doctor process itself
//! stays single-threaded and keeps nothing they start; the smoke test is a real 2-rank job of
//! `cmpirun` itself in a tiny image packed on the spot. `docs/doctor.md` lists every check.

mod host;
mod profile;
mod smoke;

use std::path::PathBuf;

use serde::Serialize;

use crate::exit;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Works.
    Pass,
    /// Works, but something will be slow, limited, or is worth a look.
    Warn,
    /// Jobs will fail (or will not use what the site intends) until it is fixed.
    Fail,
}

impl Verdict {
    /// `PASS`, `WARN` or `FAIL`.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        }
    }
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The check's name (`user-namespaces`, `fuse-mount`, …; see `docs/doctor.md`).
    pub check: &'static str,
    /// How it came out.
    pub verdict: Verdict,
    /// What was found.
    pub message: String,
    /// What to do about it (for WARN and FAIL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    /// A passed check.
    pub fn pass(check: &'static str, message: impl Into<String>) -> Finding {
        Finding {
            check,
            verdict: Verdict::Pass,
            message: message.into(),
            fix: None,
        }
    }

    /// A warning, with its fix.
    pub fn warn(
        check: &'static str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding::with_fix(check, Verdict::Warn, message.into(), fix.into())
    }

    /// A failure, with its fix.
    pub fn fail(
        check: &'static str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding::with_fix(check, Verdict::Fail, message.into(), fix.into())
    }

    fn with_fix(check: &'static str, verdict: Verdict, message: String, fix: String) -> Finding {
        Finding {
            check,
            verdict,
            message,
            fix: Some(fix),
        }
    }
}

/// What `cmpirun doctor` was asked.
#[derive(Debug, Clone, Default)]
pub struct DoctorOptions {
    /// Check this profile (a name or a path) instead of the one a launch would choose.
    pub profile: Option<String>,
    /// Skip the 2-rank smoke job.
    pub no_smoke: bool,
    /// The cmpirun executable the smoke job runs (default: this one).
    pub cmpirun: Option<PathBuf>,
    /// Show the smoke job's own messages (on stderr).
    pub verbose: bool,
}

/// Everything `cmpirun doctor` found on this node.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The node's name.
    pub host: String,
    /// The worst verdict (PASS when there are no findings).
    pub worst: Verdict,
    /// One finding per check, in the order they are printed.
    pub checks: Vec<Finding>,
}

impl Report {
    fn new(host: String, checks: Vec<Finding>) -> Report {
        let worst = checks
            .iter()
            .map(|f| f.verdict)
            .max()
            .unwrap_or(Verdict::Pass);
        Report {
            host,
            worst,
            checks,
        }
    }

    /// The exit status of `cmpirun doctor`: 0 when every check passed, [`WARNED`] when the
    /// worst is a warning, [`exit::FAILURE`] when a check failed.
    pub fn exit_status(&self) -> i32 {
        match self.worst {
            Verdict::Pass => exit::SUCCESS,
            Verdict::Warn => WARNED,
            Verdict::Fail => exit::FAILURE,
        }
    }

    /// The report as text: a header, then one line per check (`PASS name: message`) with the
    /// fix on the next line, then a summary line.
    pub fn render_text(&self) -> String {
        let mut text = format!("cmpirun doctor on {}\n", self.host);
        for f in &self.checks {
            text.push_str(&format!(
                "{}  {}: {}\n",
                f.verdict.label(),
                f.check,
                f.message
            ));
            if let Some(fix) = &f.fix {
                text.push_str(&format!("      fix: {fix}\n"));
            }
        }
        let count = |v: Verdict| self.checks.iter().filter(|f| f.verdict == v).count();
        text.push_str(&format!(
            "{}: {} passed, {} warned, {} failed\n",
            self.worst.label(),
            count(Verdict::Pass),
            count(Verdict::Warn),
            count(Verdict::Fail)
        ));
        text
    }
}

/// Exit status of `cmpirun doctor` when the worst result is a warning.
pub const WARNED: i32 = 3;

/// Runs every check on this node. The process must be single-threaded (the checks fork).
pub fn run(opts: &DoctorOptions) -> Report {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    let scratch = tempfile::Builder::new().prefix("cmpirun-doctor-").tempdir();
    let mut checks = Vec::new();
    checks.push(host::user_namespaces());
    let image = match &scratch {
        Ok(dir) => smoke::make_tiny_image(dir.path()),
        Err(e) => Err(format!("cannot make a scratch directory: {e}")),
    };
    checks.push(host::fuse_device());
    checks.push(match (&scratch, &image) {
        (Ok(dir), Ok(image)) => host::fuse_mount(dir.path(), &image.path),
        (_, Err(e)) => Finding::fail(
            "fuse-mount",
            format!("not tried: the test image could not be made: {e}"),
            "see the smoke-test line",
        ),
        (Err(e), _) => Finding::fail("fuse-mount", format!("not tried: {e}"), "set TMPDIR"),
    });
    checks.push(match &scratch {
        Ok(dir) => host::overlayfs(dir.path()),
        Err(e) => Finding::warn("overlayfs", format!("not tried: {e}"), "set TMPDIR"),
    });
    let (found, choice) = profile::checks(opts.profile.as_deref());
    checks.extend(found);
    checks.push(host::pmi_libraries());
    checks.extend(host::caches(choice.as_ref().map(|c| &c.profile)));
    checks.push(host::limits());
    if opts.no_smoke {
        checks.push(Finding::warn(
            "smoke-test",
            "skipped (--no-smoke)",
            "run cmpirun doctor without --no-smoke",
        ));
    } else {
        checks.push(match (&scratch, &image) {
            (Ok(dir), Ok(image)) => smoke::run_job(dir.path(), image, opts),
            (_, Err(e)) => Finding::fail(
                "smoke-test",
                format!("the test image could not be made: {e}"),
                "set TMPDIR to a writable local directory",
            ),
            (Err(e), _) => Finding::fail("smoke-test", e.to_string(), "set TMPDIR"),
        });
    }
    Report::new(host, checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_decides_the_status_and_text_lists_fixes() {
        let r = Report::new(
            "n1".into(),
            vec![
                Finding::pass("a", "fine"),
                Finding::warn("b", "slow", "do x"),
            ],
        );
        assert_eq!(r.exit_status(), WARNED);
        let text = r.render_text();
        assert!(text.contains("PASS  a: fine\n"), "{text}");
        assert!(text.contains("WARN  b: slow\n      fix: do x\n"), "{text}");
        assert!(
            text.ends_with("WARN: 1 passed, 1 warned, 0 failed\n"),
            "{text}"
        );
        let r = Report::new("n1".into(), vec![Finding::fail("c", "broken", "fix it")]);
        assert_eq!(r.exit_status(), exit::FAILURE);
        assert_eq!(Report::new("n1".into(), vec![]).exit_status(), 0);
    }
}
