//! After start: a rank that loaded an MPI library but never spoke to the job's PMI server ran
//! MPI on its own, as a *singleton* (an `MPI_COMM_WORLD` of one), not as one of the job's ranks.
//! Its output looks like success (`rank=0 size=1`, once per rank) unless something notices.
//!
//! How cmpirun knows: an MPI library is mapped into the rank before its `main` runs (the
//! program is linked against it), so the rank's memory map (`/proc/PID/maps`) shows a file named
//! `libmpi.so*` (Open MPI, MPICH 5), `libmpich.so*` (MPICH ≤ 4) or `libmpi_abi.so*` (the MPI
//! ABI) soon after the exec. cmpirun looks at the map of every rank that has neither spoken PMI
//! nor shown an MPI library, at growing intervals ([`Looks`]); a rank that showed one is an
//! MPI rank, and one that then ends without having spoken PMI was a singleton. A program that
//! maps no MPI library (`hostname`, a shell) is not an MPI rank and is never failed for this.

use std::path::Path;
use std::time::{Duration, Instant};

use cmpirun_fabric::maps::{MappedFile, mapped_files};

/// The file names an MPI library has (the part before the version).
const MPI_LIBRARIES: [&str; 3] = ["libmpi.so", "libmpich.so", "libmpi_abi.so"];

/// The line said about rank `rank` that loaded `library`, never connected to the job's PMI server,
/// and failed: its MPI did not find the server, or the server refused it.
pub fn never_connected(rank: u32, library: &str) -> String {
    format!(
        "cmpirun: rank {rank} loaded the MPI library {library} but never connected to the job's PMI server before it failed (its MPI did not find the server, or the server refused it)\n"
    )
}

/// The first MPI library among the files a process mapped, by its path in the container.
pub fn mpi_library(maps: &[MappedFile]) -> Option<&str> {
    maps.iter().map(|m| m.path.as_str()).find(|p| {
        Path::new(p).file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            MPI_LIBRARIES.iter().any(|l| {
                n.strip_prefix(l)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
            })
        })
    })
}

/// The MPI library process `pid` has mapped, if it has one now (`None` also when the map cannot
/// be read: the process ended).
pub fn look(pid: i32) -> Option<String> {
    mapped_files(pid)
        .ok()
        .and_then(|m| mpi_library(&m).map(str::to_owned))
}

/// Pause before the first look (the rank is still being exec'd), the longest pause during
/// [`FAST_FOR`], and the longest after it (a program that never maps an MPI library).
const FIRST_LOOK: Duration = Duration::from_millis(5);
const FAST_PAUSE: Duration = Duration::from_millis(40);
const FAST_FOR: Duration = Duration::from_secs(5);
const LONGEST_PAUSE: Duration = Duration::from_millis(500);

/// When to look again at the ranks not yet known to be MPI ranks: one schedule for the job,
/// backing off from [`FIRST_LOOK`] to [`LONGEST_PAUSE`].
#[derive(Debug, Clone)]
pub struct Looks {
    started: Instant,
    pause: Duration,
    next: Instant,
}

impl Looks {
    /// The schedule of a job whose ranks were started at `now`.
    pub fn new(now: Instant) -> Looks {
        Looks {
            started: now,
            pause: FIRST_LOOK,
            next: now + FIRST_LOOK,
        }
    }

    /// When the next look is due.
    pub fn next(&self) -> Instant {
        self.next
    }

    /// Whether a look is due at `now`; if so, the following one is scheduled.
    pub fn due(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        let longest = if now.duration_since(self.started) < FAST_FOR {
            FAST_PAUSE
        } else {
            LONGEST_PAUSE
        };
        self.pause = (self.pause * 2).min(longest);
        self.next = now + self.pause;
        true
    }
}

/// What is known of each rank: whether it spoke PMI, and the MPI library it was seen to map.
#[derive(Debug, Clone)]
pub struct SingletonWatch {
    spoke: Vec<bool>,
    library: Vec<Option<String>>,
    looks: Looks,
}

impl SingletonWatch {
    /// A watch over `size` ranks started at `now`.
    pub fn new(size: u32, now: Instant) -> SingletonWatch {
        SingletonWatch {
            spoke: vec![false; size as usize],
            library: vec![None; size as usize],
            looks: Looks::new(now),
        }
    }

    /// Rank `rank` spoke to the PMI server: it is part of the job's world.
    pub fn spoke(&mut self, rank: u32) {
        if let Some(s) = self.spoke.get_mut(rank as usize) {
            *s = true;
        }
    }

    /// Whether rank `rank` is still to be looked at.
    fn undecided(&self, rank: usize) -> bool {
        !self.spoke[rank] && self.library[rank].is_none()
    }

    /// When to look next (`None`: every rank is decided).
    pub fn next(&self, live: impl Fn(u32) -> bool) -> Option<Instant> {
        (0..self.spoke.len())
            .any(|r| self.undecided(r) && live(r as u32))
            .then(|| self.looks.next())
    }

    /// Looks at the undecided live ranks if a look is due at `now`; `pid_of` gives a live rank's
    /// process.
    pub fn tick(&mut self, now: Instant, pid_of: impl Fn(u32) -> Option<i32>) {
        if !(0..self.spoke.len()).any(|r| self.undecided(r)) || !self.looks.due(now) {
            return;
        }
        for r in 0..self.spoke.len() {
            if self.undecided(r)
                && let Some(pid) = pid_of(r as u32)
            {
                self.library[r] = look(pid);
            }
        }
    }

    /// Records that rank `rank` was seen to map `library` (for a last look before its end).
    pub fn saw(&mut self, rank: u32, library: Option<String>) {
        if let Some(l) = self.library.get_mut(rank as usize)
            && l.is_none()
        {
            *l = library;
        }
    }

    /// The MPI library of rank `rank` if it ran MPI as a singleton: it mapped one and never
    /// spoke PMI. Asked when the rank has ended.
    pub fn singleton(&self, rank: u32) -> Option<&str> {
        let r = rank as usize;
        if *self.spoke.get(r)? {
            return None;
        }
        self.library.get(r)?.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(paths: &[&str]) -> Vec<MappedFile> {
        paths
            .iter()
            .map(|p| MappedFile {
                path: (*p).into(),
                dev_major: 0,
                dev_minor: 1,
                inode: 2,
            })
            .collect()
    }

    #[test]
    fn finds_the_mpi_libraries_of_each_family() {
        for lib in [
            "/usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4",
            "/usr/lib/x86_64-linux-gnu/libmpich.so.12",
            "/opt/mpich5/lib/libmpi.so.12",
            "/opt/abi/lib/libmpi_abi.so.0",
            "/opt/x/libmpi.so",
        ] {
            let m = maps(&["/usr/lib/x86_64-linux-gnu/libc.so.6", lib]);
            assert_eq!(mpi_library(&m), Some(lib), "{lib}");
        }
        // Not MPI libraries: Open MPI's helpers, C++ bindings, other names.
        let m = maps(&[
            "/usr/lib/x86_64-linux-gnu/libopen-pal.so.40",
            "/usr/lib/x86_64-linux-gnu/libmpi_cxx.so.40",
            "/usr/lib/x86_64-linux-gnu/libmpifort.so.12",
            "/usr/bin/hostname",
        ]);
        assert_eq!(mpi_library(&m), None);
    }

    #[test]
    fn a_rank_that_mapped_mpi_and_never_spoke_pmi_is_a_singleton() {
        let now = Instant::now();
        let mut w = SingletonWatch::new(3, now);
        w.saw(0, Some("/usr/lib/libmpi.so.40".into()));
        w.saw(1, Some("/usr/lib/libmpi.so.40".into()));
        w.spoke(1);
        assert_eq!(w.singleton(0), Some("/usr/lib/libmpi.so.40"));
        assert_eq!(w.singleton(1), None, "it spoke PMI");
        assert_eq!(w.singleton(2), None, "no MPI library seen: not an MPI rank");
        assert_eq!(w.singleton(9), None);
        // Only rank 2 is still looked at, and only while it runs.
        assert!(w.next(|_| true).is_some());
        assert!(w.next(|r| r != 2).is_none());
    }

    #[test]
    fn looks_back_off() {
        let t0 = Instant::now();
        let mut l = Looks::new(t0);
        assert!(!l.due(t0));
        let mut t = l.next();
        let mut pauses = Vec::new();
        for _ in 0..6 {
            assert!(l.due(t));
            pauses.push(l.next() - t);
            t = l.next();
        }
        assert_eq!(pauses[0], Duration::from_millis(10));
        assert_eq!(*pauses.last().unwrap(), FAST_PAUSE);
        let late = t0 + FAST_FOR + Duration::from_secs(1);
        assert!(l.due(late));
        assert!(l.next() - late <= LONGEST_PAUSE);
    }
}
