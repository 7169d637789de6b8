//! Waiting for what a running job does: a file to appear, its processes to start.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use super::{ProcInfo, tagged_processes};

/// Waits until `path` exists; panics when `within` passes first.
pub fn wait_for_file(path: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the processes carrying run `tag` ([`tagged_processes`]) are what `ready` wants,
/// and returns them; panics with `what` and the processes seen when `within` passes first.
pub fn wait_for_tagged(
    tag: &str,
    within: Duration,
    what: &str,
    ready: impl Fn(&[ProcInfo]) -> bool,
) -> Vec<ProcInfo> {
    let deadline = Instant::now() + within;
    loop {
        let procs = tagged_processes(tag);
        if ready(&procs) {
            return procs;
        }
        assert!(Instant::now() < deadline, "{what}: {procs:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// How many of `procs` are named `comm`.
pub fn count_named(procs: &[ProcInfo], comm: &str) -> usize {
    procs.iter().filter(|p| p.comm == comm).count()
}
