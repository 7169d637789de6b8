//! After start: confirm from a rank's memory map (`/proc/PID/maps`) that the libfabric it
//! loaded is the host file the plan binds in (same device and inode), whatever path the
//! container shows for it. Every launcher uses this: the local launcher looks when a rank first
//! speaks PMI and when it finalizes; under srun and hydra, each rank's `cmpirun __rank` watches
//! its own rank ([`RankWatch`]).
//!
//! With an expected provider (`--expect-provider`, or the profile's `fabric.providers`), a rank
//! that loaded another libfabric fails the job instead of running slowly over whatever that one
//! offers; otherwise it is a warning. An MPI rank (one that spoke PMI) that reaches
//! `PMI_Finalize`, or ends, without having mapped any libfabric used another transport (UCX,
//! shared memory, sockets): that fails the job only when using the host libfabric is required
//! (`--expect-provider`, or the profile's `fabric.required`); under a profile that merely
//! expects providers, rank 0 warns and says how to make the site's intent explicit, since an
//! image may rightly use UCX on an InfiniBand node. A program that never spoke PMI (`hostname`)
//! is not an MPI rank and is never failed for that; where PMI is not visible
//! (`srun --mpi=pmix`), such a rank is only reported.

use std::path::Path;
use std::time::{Duration, Instant};

use cmpirun_fabric::maps::{MappedFile, mapped_files, same_file};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::plan::checks::REQUIRED_CHECK;
use crate::plan::{BindKind, LaunchPlan};

use super::output::{Stream, write_out};
use super::status::JobEnd;

/// The host libfabric the plan binds into the container, to be found in each rank's memory map.
#[derive(Debug, Clone)]
pub struct InjectedLibfabric {
    /// The host file.
    pub source: String,
    /// Its metadata: its device and inode show in a rank's map.
    meta: std::fs::Metadata,
    /// Whether a rank that loaded another libfabric fails the job (a provider is expected).
    pub strict: bool,
    /// Whether an MPI rank that loaded no libfabric at all fails the job (`--expect-provider`,
    /// or the profile's `fabric.required`).
    pub required: bool,
    /// Where the expectation comes from, for the message (`--expect-provider tcp`).
    expected: String,
    /// What lets a job whose image's own transport is intended run: dropping
    /// `--expect-provider`, or, when the profile requires the provider, `--no-inject`.
    own_transport: String,
    /// The profile's name and file, for the warning that says how to require the provider.
    profile: (String, String),
}

/// What one look at a rank's memory map decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// No libfabric mapped yet (or the map could not be read): look again later.
    Undecided,
    /// The rank mapped the host file.
    Host(MappedFile),
    /// The rank mapped another libfabric (the path inside the container).
    Other(String),
    /// The rank ended without mapping any libfabric (only after its last look).
    NoLibfabric,
}

fn is_libfabric(path: &str) -> bool {
    Path::new(path)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("libfabric.so"))
}

/// What a job whose MPI rank loaded no libfabric while the host's provider is required runs
/// with when the image's own transport is intended: without `--expect-provider`, the job would
/// go on, unless the profile requires the provider (`fabric.required`); then only
/// `--no-inject` (nothing injected, nothing checked) lets it run.
fn own_transport(
    expect_provider: Option<&str>,
    profile_requires: bool,
    profile: &str,
    file: &Path,
) -> String {
    match expect_provider {
        Some(p) if !profile_requires => format!("run without --expect-provider {p}"),
        _ => format!(
            "run with --no-inject (profile {profile} requires the host's provider: \
             fabric.required in {})",
            file.display()
        ),
    }
}

impl InjectedLibfabric {
    /// The host libfabric `plan` injects, if it injects one whose file can be read here.
    pub fn from_plan(plan: &LaunchPlan) -> Option<InjectedLibfabric> {
        let bind = plan.binds.iter().find(|b| {
            b.kind == BindKind::Library
                && Path::new(&b.source)
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libfabric.so"))
        })?;
        let meta = std::fs::metadata(&bind.source).ok()?;
        let has_check = |name: &str| plan.checks.iter().any(|c| c.name == name);
        let expected = match &plan.job.expect_provider {
            Some(p) => format!("--expect-provider {p}"),
            None if has_check(REQUIRED_CHECK) => {
                format!("profile {}'s fabric.required", plan.profile.name)
            }
            None => format!("profile {}'s fabric.providers", plan.profile.name),
        };
        let explicit = plan.job.expect_provider.is_some();
        let own_transport = own_transport(
            plan.job.expect_provider.as_deref(),
            has_check(REQUIRED_CHECK),
            &plan.profile.name,
            &plan.profile.file,
        );
        Some(InjectedLibfabric {
            own_transport,
            source: bind.source.clone(),
            meta,
            strict: explicit || has_check("fabric-providers") || has_check(REQUIRED_CHECK),
            required: explicit || has_check(REQUIRED_CHECK),
            expected,
            profile: (
                plan.profile.name.clone(),
                plan.profile.file.display().to_string(),
            ),
        })
    }

    /// Looks at the memory map of process `pid`. `last`: the rank is about to end, so a map
    /// without any libfabric is final.
    pub fn look(&self, pid: Pid, last: bool) -> Finding {
        match mapped_files(pid.as_raw()) {
            // A process that has exited (a zombie) maps nothing at all: its last map is lost.
            Ok(maps) if !maps.is_empty() => self.decide(&maps, last),
            _ if last => Finding::NoLibfabric,
            _ => Finding::Undecided,
        }
    }

    /// Decides from the files a process has mapped.
    pub fn decide(&self, maps: &[MappedFile], last: bool) -> Finding {
        let mut libfabric = maps.iter().filter(|m| is_libfabric(&m.path)).peekable();
        let first = libfabric.peek().map(|m| m.path.clone());
        if let Some(m) = libfabric.find(|m| same_file(m, &self.meta)) {
            return Finding::Host(m.clone());
        }
        match first {
            Some(path) => Finding::Other(path),
            None if last => Finding::NoLibfabric,
            None => Finding::Undecided,
        }
    }

    /// The line that reports `finding` for `rank` (`None` for an undecided one; `mpi`: the rank
    /// spoke PMI), and whether it is a warning rather than information for `-v`. A failure is
    /// reported by the job's end ([`JobEnd::NotInjected`]) instead, see
    /// [`InjectedLibfabric::job_end`].
    pub fn report(&self, rank: u32, finding: &Finding, mpi: bool) -> Option<(String, bool)> {
        match finding {
            Finding::Undecided => None,
            Finding::Host(m) => Some((
                format!(
                    "rank {rank} loaded the host libfabric {} (as {}, device {}:{} inode {})",
                    self.source, m.path, m.dev_major, m.dev_minor, m.inode
                ),
                false,
            )),
            Finding::Other(path) => Some((
                format!(
                    "rank {rank} loaded {path}, not the host libfabric {}",
                    self.source
                ),
                true,
            )),
            // Once per job (rank 0), not once per rank: the expected providers went unused.
            Finding::NoLibfabric if self.strict && !self.required && mpi && rank == 0 => {
                let (name, file) = &self.profile;
                Some((
                    format!(
                        "rank 0 spoke PMI but loaded no libfabric (its MPI used another transport, \
                         such as UCX), so the host libfabric {} and the providers profile {name} \
                         expects were not used; the job goes on. If every job on this system must \
                         use them, set fabric.required: true in {file} (or run with \
                         --expect-provider NAME); if the image's own transport is intended, run \
                         with --no-inject",
                        self.source
                    ),
                    true,
                ))
            }
            Finding::NoLibfabric => {
                Some((format!("rank {rank} did not load any libfabric"), false))
            }
        }
    }

    /// How the job ends because of `finding`, when it does, while a provider is expected: a
    /// rank that loaded another libfabric, or an MPI rank (`mpi`: it spoke PMI) that loaded none.
    pub fn job_end(&self, rank: u32, finding: &Finding, mpi: bool) -> Option<JobEnd> {
        match finding {
            Finding::Other(loaded) if self.strict => Some(JobEnd::NotInjected {
                rank,
                loaded: loaded.clone(),
                host: self.source.clone(),
            }),
            Finding::NoLibfabric if self.required && mpi => Some(JobEnd::NoLibfabric {
                rank,
                host: self.source.clone(),
                expected: self.expected.clone(),
                own_transport: self.own_transport.clone(),
            }),
            _ => None,
        }
    }
}

/// The device files through which `provider`'s endpoints reach the hardware (path prefixes):
/// a rank that holds one open uses the provider, where a mapped libfabric only proves it was
/// loaded. From libfabric's provider manuals: `fi_cxi(7)` (`/dev/cxi*`), `fi_efa(7)` and
/// `fi_verbs(7)` (through libibverbs, `/dev/infiniband/uverbs*`). Providers without a device
/// (`tcp`, `shm`) have none.
pub fn provider_devices(provider: &str) -> &'static [&'static str] {
    match provider {
        "cxi" => &["/dev/cxi"],
        "efa" | "verbs" => &["/dev/infiniband/uverbs"],
        _ => &[],
    }
}

/// The proof that ranks use the device providers the job expects: each rank, while its MPI is
/// wired up (at its PMI fences, when its endpoints are open to publish their addresses), holds
/// a device of one of them open (`/proc/PID/fd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceProof {
    /// Each expected device provider and its device prefixes.
    providers: Vec<(String, &'static [&'static str])>,
}

impl DeviceProof {
    /// The proof `plan` calls for: when it injects a host libfabric and expects (profile or
    /// `--expect-provider`) a provider that has devices.
    pub fn from_plan(plan: &LaunchPlan) -> Option<DeviceProof> {
        InjectedLibfabric::from_plan(plan)?;
        let providers: Vec<(String, &'static [&'static str])> = plan
            .profile
            .providers
            .iter()
            .chain(plan.job.expect_provider.iter())
            .filter_map(|p| {
                let devices = provider_devices(p);
                (!devices.is_empty()).then(|| (p.clone(), devices))
            })
            .collect();
        (!providers.is_empty()).then_some(DeviceProof { providers })
    }

    /// The provider and device that `open` (a process's open files) shows in use, if any.
    pub fn held(&self, open: &[String]) -> Option<(String, String)> {
        self.providers.iter().find_map(|(p, prefixes)| {
            open.iter()
                .find(|f| prefixes.iter().any(|d| f.starts_with(d)))
                .map(|f| (p.clone(), f.clone()))
        })
    }

    /// Looks at the open files of process `pid` (none when they cannot be read).
    pub fn look(&self, pid: Pid) -> Option<(String, String)> {
        cmpirun_fabric::maps::open_files(pid.as_raw())
            .ok()
            .and_then(|open| self.held(&open))
    }

    /// The line that reports what rank `rank` was seen holding (`None`: no device at any look,
    /// told once the rank finalized), and whether it is a warning (rank 0 only, once per job)
    /// rather than information for `-v`.
    pub fn report(&self, rank: u32, held: Option<&(String, String)>) -> (String, bool) {
        match held {
            Some((provider, device)) => (
                format!("rank {rank} uses provider {provider}: it holds {device} open"),
                false,
            ),
            None => {
                let expected: Vec<String> = self
                    .providers
                    .iter()
                    .map(|(p, d)| format!("{p} ({}*)", d.join("*, ")))
                    .collect();
                (
                    format!(
                        "rank {rank} loaded the host libfabric but held no device of {} open \
                         while it was wired up: its MPI did not use that provider (check \
                         FI_PROVIDER and the MPI's network module)",
                        expected.join(" or ")
                    ),
                    rank == 0,
                )
            }
        }
    }
}

/// Pauses between two looks at a rank's map. libfabric is mapped at exec (an MPI linked against
/// it) or in `MPI_Init` (a component that loads it, such as Open MPI's `mtl ofi`, which is
/// unloaded again in `MPI_Finalize`: a short job maps it for well under a second). So the looks
/// come at most [`FAST_PAUSE`] apart for the first [`FAST_FOR`], then back off to
/// [`LONGEST_PAUSE`] for a program that never maps it.
const FIRST_LOOK: Duration = Duration::from_millis(5);
const FAST_PAUSE: Duration = Duration::from_millis(20);
const FAST_FOR: Duration = Duration::from_secs(5);
const LONGEST_PAUSE: Duration = Duration::from_millis(250);

/// The check as `cmpirun __rank` runs it: it is the rank's parent and looks at the rank's map
/// between signals until it has decided; a rank that fails the check is ended (SIGTERM, SIGKILL
/// after the grace period) and the rank mode exits with [`crate::exit::FAILURE`].
#[derive(Debug)]
pub struct RankWatch {
    injected: InjectedLibfabric,
    rank: u32,
    size: u32,
    pid: Pid,
    verbose: bool,
    pause: Duration,
    started: Instant,
    decided: bool,
    /// The rank spoke PMI (the relay saw its first command): it is an MPI rank.
    mpi: bool,
    /// The look found the host libfabric in the rank's map.
    host_loaded: bool,
    /// The device providers whose use the rank must prove, if the plan expects any.
    devices: Option<DeviceProof>,
    /// The rank was seen holding such a device, or was reported at its finalize without.
    device_decided: bool,
    failed: Option<Instant>,
    killed: bool,
    grace: Duration,
}

impl RankWatch {
    /// Watches `pid`, rank `rank` of the job of `plan`, if the plan injects a host libfabric.
    pub fn new(plan: &LaunchPlan, rank: u32, pid: Pid) -> Option<RankWatch> {
        Some(RankWatch {
            injected: InjectedLibfabric::from_plan(plan)?,
            rank,
            size: plan.layout.size,
            pid,
            verbose: plan.job.verbose > 0,
            pause: FIRST_LOOK,
            started: Instant::now(),
            decided: false,
            mpi: false,
            host_loaded: false,
            devices: DeviceProof::from_plan(plan),
            device_decided: false,
            failed: None,
            killed: false,
            grace: super::settings::kill_grace(),
        })
    }

    /// Looks once more if still undecided; ends the rank if it failed. Returns when to be called
    /// again (`None`: not before the next signal).
    pub fn tick(&mut self) -> Option<Duration> {
        if let Some(at) = self.failed {
            if self.killed {
                return None;
            }
            let left = self.grace.saturating_sub(at.elapsed());
            if left.is_zero() {
                let _ = kill(self.pid, Signal::SIGKILL);
                self.killed = true;
                return None;
            }
            return Some(left);
        }
        if self.decided {
            return None;
        }
        let finding = self.injected.look(self.pid, false);
        if finding == Finding::Undecided {
            let pause = self.pause;
            let longest = if self.started.elapsed() < FAST_FOR {
                FAST_PAUSE
            } else {
                LONGEST_PAUSE
            };
            self.pause = (self.pause * 2).min(longest);
            return Some(pause);
        }
        self.conclude(finding, true)
    }

    /// Acts on a decided `finding`: ends the job or reports. `alive`: the rank still runs and
    /// must be ended when it failed.
    fn conclude(&mut self, finding: Finding, alive: bool) -> Option<Duration> {
        self.decided = true;
        self.host_loaded = matches!(finding, Finding::Host(_));
        if let Some(end) = self.injected.job_end(self.rank, &finding, self.mpi) {
            if let Some(msg) = end.message(self.size) {
                say(&msg);
            }
            self.failed = Some(Instant::now());
            if !alive {
                self.killed = true;
                return None;
            }
            let _ = kill(self.pid, Signal::SIGTERM);
            return Some(self.grace);
        }
        if let Some((line, warning)) = self.injected.report(self.rank, &finding, self.mpi)
            && (warning || self.verbose)
        {
            say(&line);
        }
        None
    }

    /// The rank sent PMI command `cmd` (seen by the relay before the server gets it): the rank
    /// is an MPI rank. At `finalize` the rank waits for the server's answer, so its map is
    /// looked at a last time: libfabric may have been loaded late, and a rank that has mapped
    /// none by now never used it.
    ///
    /// At each fence (`barrier_in`, `kvs-fence`) until seen, and at `finalize`, the rank's open
    /// files show whether it uses an expected device provider ([`DeviceProof`]).
    pub fn pmi_command(&mut self, cmd: &str) {
        self.mpi = true;
        if cmd == "finalize" && !self.decided {
            let finding = self.injected.look(self.pid, true);
            self.conclude(finding, true);
        }
        match cmd {
            "barrier_in" | "kvs-fence" => self.check_devices(false),
            "finalize" => self.check_devices(true),
            _ => {}
        }
    }

    /// Looks whether the rank holds an expected provider's device open; `last` (its finalize):
    /// a rank that loaded the host libfabric and was never seen with one is reported.
    fn check_devices(&mut self, last: bool) {
        let Some(proof) = &self.devices else { return };
        if self.device_decided || self.failed.is_some() {
            return;
        }
        let held = proof.look(self.pid);
        if held.is_none() && !last {
            return;
        }
        self.device_decided = true;
        if held.is_none() && !self.host_loaded {
            return;
        }
        let (line, warning) = proof.report(self.rank, held.as_ref());
        if warning || self.verbose {
            say(&line);
        }
    }

    /// Whether the rank failed the check (the rank mode then exits with
    /// [`crate::exit::FAILURE`], whatever the rank did when it was ended).
    pub fn failed(&self) -> bool {
        self.failed.is_some()
    }

    /// After the rank ended (`ok`: with status 0, by itself) without any look having found a
    /// libfabric: an MPI rank fails the check when a provider is expected (then
    /// [`RankWatch::failed`]); otherwise `-v` says that it never mapped one.
    pub fn finish(&mut self, ok: bool) {
        if self.decided {
            return;
        }
        // A rank that failed by itself ends the job already, with its own status.
        if ok || !self.mpi {
            self.conclude(Finding::NoLibfabric, false);
        } else if self.verbose {
            say(&format!("rank {} did not load any libfabric", self.rank));
        }
    }
}

/// Prints `cmpirun: LINE` in one write: the rank modes of a node share srun's or hydra's stderr,
/// and their lines must not mix.
fn say(line: &str) {
    write_out(Stream::Stderr, format!("cmpirun: {line}\n").as_bytes());
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// A real file stands in for the host libfabric: only its device and inode matter.
    const HOST: &str = "/proc/self/exe";

    /// `strict`: a provider is expected (and, here, required: `--expect-provider tcp`).
    fn injected(strict: bool) -> InjectedLibfabric {
        InjectedLibfabric {
            source: "/host/libfabric.so.1".into(),
            meta: std::fs::metadata(HOST).unwrap(),
            strict,
            required: strict,
            expected: "--expect-provider tcp".into(),
            own_transport: "run without --expect-provider tcp".into(),
            profile: ("ib".into(), "/etc/cmpirun/profiles.d/ib.yaml".into()),
        }
    }

    /// The way out offered when a rank loaded no libfabric is one that lets the job run: not
    /// --no-inject while --expect-provider would still end it, not "without" a profile setting.
    #[test]
    fn the_way_out_for_an_image_s_own_transport_helps() {
        let file = Path::new("/etc/cmpirun/profiles.d/ib.yaml");
        assert_eq!(
            own_transport(Some("tcp"), false, "ib", file),
            "run without --expect-provider tcp"
        );
        let required = "run with --no-inject (profile ib requires the host's provider: \
                        fabric.required in /etc/cmpirun/profiles.d/ib.yaml)";
        assert_eq!(own_transport(None, true, "ib", file), required);
        assert_eq!(own_transport(Some("tcp"), true, "ib", file), required);
        let line = injected(true)
            .job_end(1, &Finding::NoLibfabric, true)
            .unwrap()
            .message(2)
            .unwrap();
        assert!(
            line.ends_with(
                "(--expect-provider tcp): make the image's MPI use libfabric (MPICH: -x \
                 MPIR_CVAR_CH4_NETMOD=ofi, with FI_PROVIDER), or, if the image's own transport \
                 is intended, run without --expect-provider tcp"
            ),
            "{line}"
        );
    }

    /// A mapping of `path` on the host file's device (minor + `other_minor`), inode `inode`
    /// (0: the host file's).
    fn mapped(path: &str, other_minor: u32, inode: u64) -> MappedFile {
        let meta = std::fs::metadata(HOST).unwrap();
        MappedFile {
            path: path.into(),
            dev_major: libc::major(meta.dev()),
            dev_minor: libc::minor(meta.dev()) + other_minor,
            inode: if inode == 0 { meta.ino() } else { inode },
        }
    }

    #[test]
    fn decides_by_device_and_inode() {
        let inj = injected(true);
        let libc = mapped("/lib/x86_64-linux-gnu/libc.so.6", 0, 7);
        let host = mapped("/usr/lib/x86_64-linux-gnu/libfabric.so.1.20.0", 0, 0);
        let same_inode_other_dev = mapped("/opt/lib/libfabric.so.1", 1, 0);
        assert_eq!(
            inj.decide(std::slice::from_ref(&libc), false),
            Finding::Undecided
        );
        assert_eq!(
            inj.decide(std::slice::from_ref(&libc), true),
            Finding::NoLibfabric
        );
        assert_eq!(
            inj.decide(&[libc.clone(), host.clone()], false),
            Finding::Host(host.clone())
        );
        let other = inj.decide(&[libc, same_inode_other_dev], false);
        assert_eq!(other, Finding::Other("/opt/lib/libfabric.so.1".into()));
        assert!(matches!(
            inj.job_end(3, &other, false),
            Some(JobEnd::NotInjected { rank: 3, .. })
        ));
        assert_eq!(injected(false).job_end(3, &other, true), None);
        // No libfabric at all fails only an MPI rank, and only when a provider is expected.
        assert!(matches!(
            inj.job_end(2, &Finding::NoLibfabric, true),
            Some(JobEnd::NoLibfabric { rank: 2, .. })
        ));
        assert_eq!(inj.job_end(2, &Finding::NoLibfabric, false), None);
        assert_eq!(
            injected(false).job_end(2, &Finding::NoLibfabric, true),
            None
        );
        let (line, warning) = inj.report(3, &other, true).unwrap();
        assert!(warning);
        assert_eq!(
            line,
            "rank 3 loaded /opt/lib/libfabric.so.1, not the host libfabric /host/libfabric.so.1"
        );
        let (line, warning) = inj.report(0, &Finding::Host(host), true).unwrap();
        assert!(!warning);
        assert!(
            line.starts_with("rank 0 loaded the host libfabric /host/libfabric.so.1 (as "),
            "{line}"
        );
    }

    #[test]
    fn expected_but_not_required_providers_only_warn_once_for_a_rank_without_libfabric() {
        let inj = InjectedLibfabric {
            required: false,
            ..injected(true)
        };
        // Another libfabric than the host's still ends the job: the injection did not work.
        let other = Finding::Other("/opt/lib/libfabric.so.1".into());
        assert!(inj.job_end(1, &other, true).is_some());
        // No libfabric at all (UCX): the job goes on, rank 0 warns with the way to require it.
        assert_eq!(inj.job_end(0, &Finding::NoLibfabric, true), None);
        let (line, warning) = inj.report(0, &Finding::NoLibfabric, true).unwrap();
        assert!(warning);
        assert!(
            line.contains("set fabric.required: true in /etc/cmpirun/profiles.d/ib.yaml"),
            "{line}"
        );
        assert!(line.contains("--no-inject"), "{line}");
        // Other ranks, and programs that never spoke PMI, are reported with -v only.
        assert!(!inj.report(1, &Finding::NoLibfabric, true).unwrap().1);
        assert!(!inj.report(0, &Finding::NoLibfabric, false).unwrap().1);
    }

    #[test]
    fn device_providers_are_proven_by_an_open_device() {
        let proof = DeviceProof {
            providers: vec![("cxi".into(), provider_devices("cxi"))],
        };
        let open = |files: &[&str]| files.iter().map(|f| f.to_string()).collect::<Vec<_>>();
        assert_eq!(proof.held(&open(&["/dev/null", "socket:[12]"])), None);
        assert_eq!(
            proof.held(&open(&["/dev/null", "/dev/cxi0"])),
            Some(("cxi".into(), "/dev/cxi0".into()))
        );
        // /dev/xpmem (intra-node copies) does not prove the cxi provider.
        assert_eq!(proof.held(&open(&["/dev/xpmem"])), None);
        assert_eq!(provider_devices("verbs"), ["/dev/infiniband/uverbs"]);
        assert_eq!(provider_devices("efa"), ["/dev/infiniband/uverbs"]);
        assert!(provider_devices("tcp").is_empty());
        let (line, warning) = proof.report(0, None);
        assert!(warning);
        assert_eq!(
            line,
            "rank 0 loaded the host libfabric but held no device of cxi (/dev/cxi*) open while it \
             was wired up: its MPI did not use that provider (check FI_PROVIDER and the MPI's \
             network module)"
        );
        assert!(!proof.report(1, None).1, "once per job");
        let held = ("cxi".to_owned(), "/dev/cxi0".to_owned());
        assert_eq!(
            proof.report(3, Some(&held)),
            (
                "rank 3 uses provider cxi: it holds /dev/cxi0 open".into(),
                false
            )
        );
    }

    /// The open files are read from a real process: one that holds a device open shows it.
    #[test]
    fn open_files_of_a_process_show_its_devices() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::fs::File::open("/dev/zero").unwrap())
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        let proof = DeviceProof {
            providers: vec![("zero".into(), &["/dev/zero"])],
        };
        let seen = proof.look(pid);
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(seen, Some(("zero".into(), "/dev/zero".into())));
    }
}
