//! Leftover checks: a [`Snapshot`] of processes, mounts, `/dev/shm`, temporary folders and FUSE
//! connections before a run, compared with one after it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use super::processes::list_processes;
use super::{ProcInfo, tuser};

/// The state leftovers are judged against: take one before a run, another after.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Processes of the test user, by (pid, start time).
    pub processes: BTreeMap<(i32, u64), ProcInfo>,
    /// Mounts of the test's own mount namespace: "mount point fstype source".
    pub mounts: BTreeSet<String>,
    /// Entries of `/dev/shm`.
    pub shm: BTreeSet<String>,
    /// Entries named `cmpirun*` in `/tmp` and `/var/tmp` (except the test staging folders).
    pub tmp: BTreeSet<String>,
    /// FUSE connections in `/sys/fs/fuse/connections` (empty when fusectl is not mounted).
    pub fuse_connections: BTreeSet<String>,
}

impl Snapshot {
    /// Records the current state.
    pub fn take() -> Snapshot {
        let uid = tuser().uid;
        let processes = list_processes(uid)
            .into_iter()
            .map(|p| ((p.pid, p.start), p))
            .collect();
        Snapshot {
            processes,
            mounts: read_mounts(Path::new("/proc/self/mountinfo")),
            shm: list_dir(Path::new("/dev/shm"), |_| true),
            tmp: ["/tmp", "/var/tmp"]
                .iter()
                .flat_map(|d| {
                    list_dir(Path::new(d), |n| {
                        n.starts_with("cmpirun") && !n.starts_with("cmpirun-test")
                    })
                })
                .collect(),
            fuse_connections: list_dir(Path::new("/sys/fs/fuse/connections"), |_| true),
        }
    }

    /// What exists now (in `self`) that did not exist in `before`.
    ///
    /// With `tags` empty, every new process of the test user counts. Otherwise only new processes
    /// that carry one of `tags`, or carry no tag at all and live in a user namespace other than
    /// the host's (a container's helper started with a cleared environment), count; processes of
    /// other tests or jobs running at the same time are ignored.
    pub fn leftovers_since(&self, before: &Snapshot, tags: &[&str]) -> Leftovers {
        let host_userns = fs::read_link("/proc/self/ns/user")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let processes: Vec<ProcInfo> = self
            .processes
            .iter()
            .filter(|(k, _)| !before.processes.contains_key(k))
            .map(|(_, p)| p.clone())
            .filter(|p| match p.tag.as_deref() {
                _ if tags.is_empty() => true,
                Some(t) => tags.contains(&t),
                // An untagged process is a helper started with a cleared environment; one in a
                // container (its own user namespace) counts, one in the host's user namespace
                // belongs to something else running on the machine.
                None => p.userns != host_userns,
            })
            .collect();
        // The mounts a leftover process still sees: the stale image mount is usually there.
        let mut process_mounts = Vec::new();
        let host_mntns = fs::read_link("/proc/self/ns/mnt")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut seen_ns = BTreeSet::new();
        for p in &processes {
            if p.mntns == host_mntns || !seen_ns.insert(p.mntns.clone()) {
                continue;
            }
            for m in read_mounts(&Path::new("/proc").join(p.pid.to_string()).join("mountinfo")) {
                if m.contains(" fuse") || m.contains("squashfs") || m.contains(" tmpfs") {
                    process_mounts.push(format!("{} (pid {}): {m}", p.mntns, p.pid));
                }
            }
        }
        let new = |a: &BTreeSet<String>, b: &BTreeSet<String>| {
            a.difference(b).cloned().collect::<Vec<_>>()
        };
        Leftovers {
            processes,
            process_mounts,
            mounts: new(&self.mounts, &before.mounts),
            shm: new(&self.shm, &before.shm),
            tmp: new(&self.tmp, &before.tmp),
            fuse_connections: new(&self.fuse_connections, &before.fuse_connections),
        }
    }
}

/// What a run left behind; see [`Snapshot::leftovers_since`].
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Processes of the test user that were not there before.
    pub processes: Vec<ProcInfo>,
    /// FUSE, squashfs and tmpfs mounts seen by those processes (in their own mount namespaces).
    pub process_mounts: Vec<String>,
    /// New mounts in the test's mount namespace.
    pub mounts: Vec<String>,
    /// New entries of `/dev/shm`.
    pub shm: Vec<String>,
    /// New `cmpirun*` entries of `/tmp` and `/var/tmp`.
    pub tmp: Vec<String>,
    /// New FUSE connections.
    pub fuse_connections: Vec<String>,
}

impl Leftovers {
    /// Nothing was left behind.
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
            && self.mounts.is_empty()
            && self.shm.is_empty()
            && self.tmp.is_empty()
            && self.fuse_connections.is_empty()
    }
}

impl fmt::Display for Leftovers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.processes {
            writeln!(
                f,
                "process {} (ppid {}, {}, {}, tag {:?}): {} [{}]",
                p.pid, p.ppid, p.userns, p.mntns, p.tag, p.comm, p.cmdline
            )?;
        }
        for m in &self.process_mounts {
            writeln!(f, "mount seen by a leftover process: {m}")?;
        }
        for m in &self.mounts {
            writeln!(f, "mount: {m}")?;
        }
        for s in &self.shm {
            writeln!(f, "/dev/shm entry: {s}")?;
        }
        for t in &self.tmp {
            writeln!(f, "temporary entry: {t}")?;
        }
        for c in &self.fuse_connections {
            writeln!(f, "FUSE connection: /sys/fs/fuse/connections/{c}")?;
        }
        Ok(())
    }
}

/// Panics, listing them, if the runs tagged `tags` (or anything, when `tags` is empty) left
/// processes, mounts, `/dev/shm` entries or temporary folders that were not in `before`.
///
/// Tear-down is allowed to finish asynchronously: the check is repeated for up to 5 s before it
/// fails.
pub fn assert_no_leftovers(before: &Snapshot, tags: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = Snapshot::take().leftovers_since(before, tags);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("the run left things behind:\n{left}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn read_mounts(path: &Path) -> BTreeSet<String> {
    let Ok(text) = fs::read_to_string(path) else {
        return BTreeSet::new();
    };
    text.lines()
        .filter_map(|line| {
            // mountinfo(5): "id parent maj:min root mountpoint opts [optional...] - fstype source superopts"
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            let mut r = right.split_whitespace();
            let fstype = r.next()?;
            let source = r.next().unwrap_or("");
            Some(format!("{mount_point} {fstype} {source}"))
        })
        .collect()
}

fn list_dir(dir: &Path, keep: impl Fn(&str) -> bool) -> BTreeSet<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| keep(n))
        .map(|n| dir.join(n).to_string_lossy().into_owned())
        .collect()
}
