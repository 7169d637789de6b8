//! The container root as data: a plain [`RootConfig`] in, a list of [`MountOp`]s out.
//!
//! Nothing here touches the system, so every rule (what is bound, in which order, what is skipped)
//! is unit-tested. [`super::executor`] carries the list out and is the only code that calls
//! `mount(2)`.

use std::path::{Path, PathBuf};

use crate::mount::{MountBackend, SquashfsSource};

use super::resolve::normalize;

/// Where the image's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A squashfs filesystem (plain file or SIF partition), mounted by a backend.
    Squashfs {
        /// Where the squashfs lives.
        source: SquashfsSource,
        /// How to mount it.
        backend: MountBackend,
    },
    /// An unpacked root directory, bound read-only.
    Directory(PathBuf),
}

impl ImageSource {
    /// The image file or directory, for messages.
    pub fn path(&self) -> &Path {
        match self {
            ImageSource::Squashfs { source, .. } => &source.path,
            ImageSource::Directory(d) => d,
        }
    }
}

/// The mount options of a tmpfs whose root has permission bits `mode` and whose size is
/// limited to `size` (a tmpfs `size=` value such as `4g` or `50%`), if given.
pub fn tmpfs_options(mode: u32, size: Option<&str>) -> String {
    match size {
        Some(size) => format!("mode={mode:o},size={size}"),
        None => format!("mode={mode:o}"),
    }
}

/// What `/dev/shm` is inside the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShmMode {
    /// A tmpfs private to the node instance, shared by its members, gone with it.
    #[default]
    Private,
    /// The host's `/dev/shm`.
    Host,
}

/// One bind of a host path into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// The host path.
    pub src: PathBuf,
    /// The absolute path inside the container.
    pub dst: PathBuf,
    /// Make the bind read-only.
    pub readonly: bool,
    /// Bind the whole tree of mounts below `src` (`/proc`, `/sys`, `/dev`).
    pub recursive: bool,
}

/// The user the container runs as, as it should appear in the container's `/etc/passwd` and
/// `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// User id (the same inside and outside).
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Name of the primary group.
    pub group: String,
    /// GECOS field.
    pub gecos: String,
    /// Home directory.
    pub home: PathBuf,
    /// Login shell.
    pub shell: PathBuf,
}

impl Account {
    /// The `/etc/passwd` line for this user.
    pub fn passwd_line(&self) -> String {
        format!(
            "{}:x:{}:{}:{}:{}:{}",
            self.name,
            self.uid,
            self.gid,
            self.gecos,
            self.home.display(),
            self.shell.display()
        )
    }

    /// The `/etc/group` line for this user's primary group.
    pub fn group_line(&self) -> String {
        format!("{}:x:{}:{}", self.group, self.gid, self.name)
    }
}

/// Everything that decides the container root, gathered from the command line and the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootConfig {
    /// The image.
    pub image: ImageSource,
    /// A host directory the instance mounts its private staging tmpfs over, inside its own mount
    /// namespace only (nothing is created on the host). Bind sources are opened before it is
    /// covered, so it may be one of them (e.g. `/tmp`).
    pub stage: PathBuf,
    /// The user.
    pub account: Account,
    /// Bind the user's home (false when it does not exist on the host).
    pub bind_home: bool,
    /// The working directory to make visible, if any.
    pub cwd: Option<PathBuf>,
    /// Host files bound read-only at the same path (`/etc/hosts`, …), only those that exist.
    pub host_files: Vec<PathBuf>,
    /// Host directories bound read-write at the same path (`/tmp`, `/var/tmp`), only those that
    /// exist.
    pub host_dirs: Vec<PathBuf>,
    /// `--bind` values, in command-line order.
    pub binds: Vec<HostBind>,
    /// The image files to serve from the node's library cache (`None`: the cache is off). The
    /// instance's creator alone fills the cache entry and turns this into [`Self::cached`]
    /// ([`super::library_cache`]), so the ranks that join an instance never touch the cache.
    pub library_cache: Option<LibraryCache>,
    /// Library-cache entries (host directories, topmost first), each holding copies of image
    /// files at their image paths: read-only overlay layers between the mount-point layer and
    /// the image, so their copies stand in for the image's own (same content) at no cost per
    /// file. Every bind lands on top of them, so an injected host library or a bound host
    /// directory wins over a copy.
    pub cached: Vec<PathBuf>,
    /// A file descriptor the image's FUSE server records the ELF files it serves and the names
    /// it looks up to (see [`crate::mount::MountOptions::record_loads`]), kept by the node
    /// instance.
    pub record_loads: Option<std::os::fd::RawFd>,
    /// What `/dev/shm` is.
    pub shm: ShmMode,
    /// With [`ShmMode::Private`]: a directory (as the node instance sees it before any root is
    /// built) bound at `/dev/shm` instead of a fresh tmpfs. A node instance holding the roots of
    /// several images mounts one tmpfs there and binds it into every root, so MPI shared-memory
    /// segments are visible to the ranks of every image.
    pub shared_shm: Option<PathBuf>,
    /// With [`ShmMode::Private`]: the size limit of the `/dev/shm` tmpfs (`--shm SIZE`, a tmpfs
    /// `size=` value); `None` keeps tmpfs's default, half the node's memory.
    pub shm_size: Option<String>,
}

/// What a root asks of the node's library cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryCache {
    /// The cache folder (absolute).
    pub dir: PathBuf,
    /// Files of the image (absolute paths inside it: the MPI stack the image facts name).
    pub files: Vec<PathBuf>,
}

/// Where a bind's source is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindSource {
    /// A host path (opened before anything is mounted).
    Host(PathBuf),
    /// A path inside the instance's staging tmpfs, relative to it.
    Stage(PathBuf),
}

/// Which account file to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountFile {
    /// `/etc/passwd`.
    Passwd,
    /// `/etc/group`.
    Group,
}

/// One step of building the root. Container paths are absolute paths inside the container;
/// staging paths are relative to the staging tmpfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOp {
    /// Mount the private staging tmpfs over this host directory.
    StageTmpfs {
        /// The host directory covered (inside the instance's mount namespace only).
        target: PathBuf,
    },
    /// Mount the image read-only at a staging path.
    MountImage {
        /// Staging path of the mount point.
        at: PathBuf,
        /// The image.
        image: ImageSource,
        /// Where its FUSE server records the ELF files it serves and the names it looks up, if
        /// anywhere.
        record_loads: Option<std::os::fd::RawFd>,
    },
    /// Write the image's account file plus the user's entry to a staging path.
    WriteAccountFile {
        /// Which file.
        file: AccountFile,
        /// The user's line.
        entry: String,
        /// Staging path written.
        out: PathBuf,
    },
    /// Make sure a bind destination exists in the image, creating it on the tmpfs layer if not.
    MountPoint {
        /// Container path.
        dst: PathBuf,
        /// Where the bind will come from (decides directory or file).
        like: BindSource,
    },
    /// Make the root: the image alone, or the image under the library cache's entries and the
    /// tmpfs layer of mount points.
    AssembleRoot {
        /// Staging path of the image.
        image: PathBuf,
        /// Staging path of the mount-point layer.
        layer: PathBuf,
        /// Library-cache entries stacked over the image (host directories, topmost first).
        cached: Vec<PathBuf>,
        /// Staging path of the root.
        root: PathBuf,
    },
    /// Bind a source at a container path.
    Bind {
        /// The source.
        src: BindSource,
        /// Container path.
        dst: PathBuf,
        /// Include sub-mounts.
        recursive: bool,
        /// Remount read-only (keeping the locked flags).
        readonly: bool,
    },
    /// Mount a fresh tmpfs at a container path.
    Tmpfs {
        /// Container path.
        dst: PathBuf,
        /// Permission bits of its root.
        mode: u32,
        /// Its `size=` option, if limited.
        size: Option<String>,
    },
    /// Make the assembled root the root of the mount namespace.
    PivotRoot {
        /// Staging path of the root.
        root: PathBuf,
    },
}

/// A `--bind` value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BindSpecError {
    /// Empty source.
    #[error("--bind {0:?}: the source is empty (use SRC[:DST[:ro|rw]])")]
    EmptySource(String),
    /// Relative destination.
    #[error("--bind {0:?}: the destination must be an absolute path")]
    RelativeDestination(String),
    /// Unknown option.
    #[error("--bind {spec:?}: unknown option {option:?} (use ro or rw)")]
    UnknownOption {
        /// The whole value.
        spec: String,
        /// The option.
        option: String,
    },
    /// Too many fields.
    #[error("--bind {0:?}: too many ':' fields (use SRC[:DST[:ro|rw]])")]
    TooManyFields(String),
    /// A destination that climbs above `/`.
    #[error("--bind {0:?}: the destination climbs above / with '..'")]
    Climbs(String),
    /// The container root itself.
    #[error("--bind {0:?}: cannot bind over the container root /")]
    Root(String),
}

/// Parses one `--bind SRC[:DST[:ro|rw]]` value; a relative source is taken relative to `cwd`.
pub fn parse_bind(spec: &str, cwd: &Path) -> Result<HostBind, BindSpecError> {
    let fields: Vec<&str> = spec.split(':').collect();
    if fields.len() > 3 {
        return Err(BindSpecError::TooManyFields(spec.into()));
    }
    let src = fields[0];
    if src.is_empty() {
        return Err(BindSpecError::EmptySource(spec.into()));
    }
    let src = cwd.join(src);
    let dst = match fields.get(1) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => src.clone(),
    };
    let readonly = match fields.get(2) {
        None | Some(&"rw") => false,
        Some(&"ro") => true,
        Some(o) => {
            return Err(BindSpecError::UnknownOption {
                spec: spec.into(),
                option: (*o).into(),
            });
        }
    };
    HostBind::new(src, &dst, readonly, spec)
}

impl HostBind {
    /// A bind of host path `src` at container path `dst`, which must be absolute and not `/`
    /// (`.` and `..` are resolved), with the mounts below `src`, as the host directories are
    /// (see `plan_root`). `spec` names the bind in errors.
    pub fn new(
        src: PathBuf,
        dst: &Path,
        readonly: bool,
        spec: &str,
    ) -> Result<HostBind, BindSpecError> {
        if !dst.is_absolute() {
            return Err(BindSpecError::RelativeDestination(spec.into()));
        }
        let dst = normalize(dst).map_err(|_| BindSpecError::Climbs(spec.into()))?;
        if dst == Path::new("/") {
            return Err(BindSpecError::Root(spec.into()));
        }
        Ok(HostBind {
            src,
            dst,
            readonly,
            recursive: true,
        })
    }
}

/// Staging path of the image mount.
pub const STAGE_IMAGE: &str = "image";
/// Staging path of the mount-point layer.
pub const STAGE_LAYER: &str = "layer";
/// Staging path of the assembled root.
pub const STAGE_ROOT: &str = "root";
/// Staging path of generated files.
pub const STAGE_FILES: &str = "files";

/// Directories whose host copy must never be bound over the image's as the working directory.
const SYSTEM_DIRS: &[&str] = &[
    "/bin", "/boot", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/sbin", "/usr",
];

fn is_under(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// Computes the mount operations that build the container root described by `cfg`.
pub fn plan_root(cfg: &RootConfig) -> Vec<MountOp> {
    let mut binds: Vec<(BindSource, PathBuf, bool, bool)> = Vec::new();
    for d in ["/proc", "/sys", "/dev"] {
        binds.push((BindSource::Host(d.into()), d.into(), true, false));
    }
    // Host directories are bound with the mounts below them: in a user namespace the kernel
    // refuses (EINVAL) a plain bind of a directory that has mounts inside it (an automounted
    // project folder in a home, a tmpfs in /var/tmp), since it would uncover what they hide.
    for d in &cfg.host_dirs {
        binds.push((BindSource::Host(d.clone()), d.clone(), true, false));
    }
    let home = cfg.account.home.clone();
    if cfg.bind_home && home != Path::new("/") && !binds.iter().any(|b| is_under(&home, &b.1)) {
        binds.push((BindSource::Host(home.clone()), home, true, false));
    }
    if let Some(cwd) = &cfg.cwd {
        let covered = binds.iter().any(|b| is_under(cwd, &b.1))
            || cwd == Path::new("/")
            || SYSTEM_DIRS.iter().any(|d| is_under(cwd, Path::new(d)));
        if !covered {
            binds.push((BindSource::Host(cwd.clone()), cwd.clone(), true, false));
        }
    }
    for f in &cfg.host_files {
        binds.push((BindSource::Host(f.clone()), f.clone(), false, true));
    }
    let files = PathBuf::from(STAGE_FILES);
    for (name, _) in [
        ("passwd", AccountFile::Passwd),
        ("group", AccountFile::Group),
    ] {
        binds.push((
            BindSource::Stage(files.join(name)),
            PathBuf::from("/etc").join(name),
            false,
            true,
        ));
    }
    // A user bind replaces a built-in one at the same destination.
    for b in &cfg.binds {
        binds.retain(|x| x.1 != b.dst);
        binds.push((
            BindSource::Host(b.src.clone()),
            b.dst.clone(),
            b.recursive,
            b.readonly,
        ));
    }
    // Parents before children, so a bind below another one lands in the bound tree; stable, so
    // equal depths keep their order.
    binds.sort_by_key(|b| b.1.components().count());

    let mut ops = vec![
        MountOp::StageTmpfs {
            target: cfg.stage.clone(),
        },
        MountOp::MountImage {
            at: STAGE_IMAGE.into(),
            image: cfg.image.clone(),
            record_loads: cfg.record_loads,
        },
        MountOp::WriteAccountFile {
            file: AccountFile::Passwd,
            entry: cfg.account.passwd_line(),
            out: files.join("passwd"),
        },
        MountOp::WriteAccountFile {
            file: AccountFile::Group,
            entry: cfg.account.group_line(),
            out: files.join("group"),
        },
    ];
    for (i, (src, dst, ..)) in binds.iter().enumerate() {
        // A destination inside an earlier bind is found in that bound tree, not in the image.
        if binds[..i]
            .iter()
            .any(|b| dst != &b.1 && is_under(dst, &b.1))
        {
            continue;
        }
        ops.push(MountOp::MountPoint {
            dst: dst.clone(),
            like: src.clone(),
        });
    }
    ops.push(MountOp::AssembleRoot {
        image: STAGE_IMAGE.into(),
        layer: STAGE_LAYER.into(),
        cached: cfg.cached.clone(),
        root: STAGE_ROOT.into(),
    });
    let shm_bound = binds.iter().any(|b| {
        b.1 == Path::new("/dev/shm")
            || is_under(Path::new("/dev/shm"), &b.1) && b.1 != Path::new("/dev")
    });
    for (src, dst, recursive, readonly) in binds {
        let is_dev = dst == Path::new("/dev");
        ops.push(MountOp::Bind {
            src,
            dst,
            recursive,
            readonly,
        });
        if is_dev && cfg.shm == ShmMode::Private && !shm_bound {
            ops.push(match &cfg.shared_shm {
                Some(dir) => MountOp::Bind {
                    src: BindSource::Host(dir.clone()),
                    dst: "/dev/shm".into(),
                    recursive: false,
                    readonly: false,
                },
                None => MountOp::Tmpfs {
                    dst: "/dev/shm".into(),
                    mode: 0o1777,
                    size: cfg.shm_size.clone(),
                },
            });
        }
    }
    ops.push(MountOp::PivotRoot {
        root: STAGE_ROOT.into(),
    });
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> Account {
        Account {
            name: "tuser".into(),
            uid: 1001,
            gid: 1001,
            group: "tuser".into(),
            gecos: "".into(),
            home: "/home/tuser".into(),
            shell: "/bin/bash".into(),
        }
    }

    fn cfg() -> RootConfig {
        RootConfig {
            image: ImageSource::Directory("/img".into()),
            stage: "/tmp".into(),
            account: account(),
            bind_home: true,
            cwd: Some("/work/job".into()),
            host_files: vec!["/etc/hosts".into(), "/etc/resolv.conf".into()],
            host_dirs: vec!["/tmp".into(), "/var/tmp".into()],
            binds: vec![],
            library_cache: None,
            cached: vec![],
            record_loads: None,
            shm: ShmMode::Private,
            shared_shm: None,
            shm_size: None,
        }
    }

    fn binds(ops: &[MountOp]) -> Vec<(String, bool, bool)> {
        ops.iter()
            .filter_map(|o| match o {
                MountOp::Bind {
                    dst,
                    recursive,
                    readonly,
                    ..
                } => Some((dst.display().to_string(), *recursive, *readonly)),
                _ => None,
            })
            .collect()
    }

    fn mount_points(ops: &[MountOp]) -> Vec<String> {
        ops.iter()
            .filter_map(|o| match o {
                MountOp::MountPoint { dst, .. } => Some(dst.display().to_string()),
                _ => None,
            })
            .collect()
    }

    fn index(ops: &[MountOp], f: impl Fn(&MountOp) -> bool) -> usize {
        ops.iter().position(f).unwrap()
    }

    #[test]
    fn default_root() {
        let ops = plan_root(&cfg());
        assert_eq!(
            ops[0],
            MountOp::StageTmpfs {
                target: "/tmp".into()
            }
        );
        assert!(matches!(ops[1], MountOp::MountImage { .. }));
        assert_eq!(
            binds(&ops),
            vec![
                ("/proc".into(), true, false),
                ("/sys".into(), true, false),
                ("/dev".into(), true, false),
                ("/tmp".into(), true, false),
                ("/var/tmp".into(), true, false),
                ("/home/tuser".into(), true, false),
                ("/work/job".into(), true, false),
                ("/etc/hosts".into(), false, true),
                ("/etc/resolv.conf".into(), false, true),
                ("/etc/passwd".into(), false, true),
                ("/etc/group".into(), false, true),
            ]
        );
        assert!(matches!(ops.last(), Some(MountOp::PivotRoot { .. })));
        // The tmpfs /dev/shm comes right after /dev.
        let dev = index(
            &ops,
            |o| matches!(o, MountOp::Bind { dst, .. } if dst == Path::new("/dev")),
        );
        assert_eq!(
            ops[dev + 1],
            MountOp::Tmpfs {
                dst: "/dev/shm".into(),
                mode: 0o1777,
                size: None,
            }
        );
        // Mount points are made before the root is assembled, binds after.
        let asm = index(&ops, |o| matches!(o, MountOp::AssembleRoot { .. }));
        let last_mp = ops
            .iter()
            .rposition(|o| matches!(o, MountOp::MountPoint { .. }))
            .unwrap();
        assert!(last_mp < asm && asm < dev);
        assert_eq!(mount_points(&ops).len(), 11);
    }

    #[test]
    fn account_files_come_from_the_stage() {
        let ops = plan_root(&cfg());
        assert!(ops.contains(&MountOp::WriteAccountFile {
            file: AccountFile::Passwd,
            entry: "tuser:x:1001:1001::/home/tuser:/bin/bash".into(),
            out: "files/passwd".into(),
        }));
        assert!(ops.contains(&MountOp::Bind {
            src: BindSource::Stage("files/group".into()),
            dst: "/etc/group".into(),
            recursive: false,
            readonly: true,
        }));
    }

    #[test]
    fn cwd_is_skipped_when_already_visible_or_a_system_dir() {
        for (cwd, bound) in [
            ("/home/tuser/src", false),
            ("/tmp/x", false),
            ("/", false),
            ("/usr/lib", false),
            ("/etc", false),
            ("/proc/1", false),
            ("/scratch/run", true),
            ("/usrdata", true),
        ] {
            let mut c = cfg();
            c.cwd = Some(cwd.into());
            let got = binds(&plan_root(&c)).iter().any(|b| b.0 == cwd);
            assert_eq!(got, bound, "{cwd}");
        }
    }

    #[test]
    fn home_at_root_or_under_tmp_is_not_bound_again() {
        let mut c = cfg();
        c.account.home = "/".into();
        assert!(!binds(&plan_root(&c)).iter().any(|b| b.0 == "/"));
        c.account.home = "/tmp/home".into();
        assert!(!binds(&plan_root(&c)).iter().any(|b| b.0 == "/tmp/home"));
    }

    #[test]
    fn user_binds_replace_built_ins_and_nest_after_parents() {
        let mut c = cfg();
        c.binds = vec![
            parse_bind("/data/in:/home/tuser/in:ro", Path::new("/")).unwrap(),
            parse_bind("/scratch:/tmp", Path::new("/")).unwrap(),
            parse_bind("/opt/sw", Path::new("/")).unwrap(),
        ];
        let ops = plan_root(&c);
        let b = binds(&ops);
        let pos = |d: &str| b.iter().position(|x| x.0 == d).unwrap();
        assert!(pos("/home/tuser") < pos("/home/tuser/in"));
        assert_eq!(
            b[pos("/home/tuser/in")],
            ("/home/tuser/in".into(), true, true)
        );
        assert_eq!(b.iter().filter(|x| x.0 == "/tmp").count(), 1);
        assert!(ops.contains(&MountOp::Bind {
            src: BindSource::Host("/scratch".into()),
            dst: "/tmp".into(),
            recursive: true,
            readonly: false,
        }));
        // No mount point is made in the image for a destination inside another bind.
        let mps = mount_points(&ops);
        assert!(!mps.contains(&"/home/tuser/in".to_string()));
        assert!(mps.contains(&"/opt/sw".to_string()));
    }

    #[test]
    fn library_cache_entries_are_layers_under_every_bind() {
        let mut c = cfg();
        c.cached = vec!["/cache/loads".into(), "/cache/stack".into()];
        c.binds = vec![
            // An injected host library over the image's copy.
            parse_bind(
                "/host/libfabric.so.1:/usr/lib/libfabric.so.1.20.0:ro",
                Path::new("/"),
            )
            .unwrap(),
        ];
        let ops = plan_root(&c);
        let asm = index(&ops, |o| {
            matches!(o, MountOp::AssembleRoot { cached, .. }
                if cached == &[PathBuf::from("/cache/loads"), PathBuf::from("/cache/stack")])
        });
        // Every bind (the injected library among them) is mounted after the root is assembled,
        // so it lands on top of the cache's layers; the cache itself needs no bind.
        let injected = index(
            &ops,
            |o| matches!(o, MountOp::Bind { dst, .. } if dst == Path::new("/usr/lib/libfabric.so.1.20.0")),
        );
        assert!(asm < injected);
        assert!(!ops.iter().any(|o| matches!(o,
            MountOp::Bind { src: BindSource::Host(p), .. } if p.starts_with("/cache"))));
    }

    #[test]
    fn host_shm_keeps_dev_shm() {
        let mut c = cfg();
        c.shm = ShmMode::Host;
        assert!(
            !plan_root(&c)
                .iter()
                .any(|o| matches!(o, MountOp::Tmpfs { .. }))
        );
        // A user bind at /dev/shm wins over the private tmpfs.
        let mut c = cfg();
        c.binds = vec![parse_bind("/dev/shm", Path::new("/")).unwrap()];
        assert!(
            !plan_root(&c)
                .iter()
                .any(|o| matches!(o, MountOp::Tmpfs { .. }))
        );
    }

    #[test]
    fn shm_size_limits_the_private_tmpfs() {
        let mut c = cfg();
        c.shm_size = Some("64m".into());
        let tmpfs: Vec<MountOp> = plan_root(&c)
            .into_iter()
            .filter(|o| matches!(o, MountOp::Tmpfs { .. }))
            .collect();
        assert_eq!(
            tmpfs,
            [MountOp::Tmpfs {
                dst: "/dev/shm".into(),
                mode: 0o1777,
                size: Some("64m".into()),
            }]
        );
        assert_eq!(tmpfs_options(0o1777, Some("64m")), "mode=1777,size=64m");
        assert_eq!(tmpfs_options(0o1777, None), "mode=1777");
    }

    #[test]
    fn shared_shm_is_bound_instead_of_a_fresh_tmpfs() {
        let mut c = cfg();
        c.shared_shm = Some("/mnt".into());
        let ops = plan_root(&c);
        assert!(!ops.iter().any(|o| matches!(o, MountOp::Tmpfs { .. })));
        let dev = index(
            &ops,
            |o| matches!(o, MountOp::Bind { dst, .. } if dst == Path::new("/dev")),
        );
        assert_eq!(
            ops[dev + 1],
            MountOp::Bind {
                src: BindSource::Host("/mnt".into()),
                dst: "/dev/shm".into(),
                recursive: false,
                readonly: false,
            }
        );
        // /dev/shm lies inside the /dev bind: no mount point is made for it in the image.
        assert!(!mount_points(&ops).contains(&"/dev/shm".to_string()));
        // --shm host keeps the host's, shared or not.
        c.shm = ShmMode::Host;
        assert!(!binds(&plan_root(&c)).iter().any(|b| b.0 == "/dev/shm"));
    }

    #[test]
    fn bind_specs() {
        let cwd = Path::new("/work");
        let b = parse_bind("data", cwd).unwrap();
        assert_eq!(
            (b.src.as_path(), b.dst.as_path()),
            (Path::new("/work/data"), Path::new("/work/data"))
        );
        assert!(!b.readonly);
        let b = parse_bind("/a:/b/./c:ro", cwd).unwrap();
        assert_eq!((b.dst.as_path(), b.readonly), (Path::new("/b/c"), true));
        assert!(!parse_bind("/a::rw", cwd).unwrap().readonly);
        assert_eq!(parse_bind("/a::rw", cwd).unwrap().dst, PathBuf::from("/a"));
        assert!(matches!(
            parse_bind("", cwd),
            Err(BindSpecError::EmptySource(_))
        ));
        assert!(matches!(
            parse_bind("/a:b", cwd),
            Err(BindSpecError::RelativeDestination(_))
        ));
        assert!(matches!(
            parse_bind("/a:/b:rx", cwd),
            Err(BindSpecError::UnknownOption { .. })
        ));
        assert!(matches!(
            parse_bind("/a:/b:ro:x", cwd),
            Err(BindSpecError::TooManyFields(_))
        ));
        assert!(matches!(
            parse_bind("/a:/../..", cwd),
            Err(BindSpecError::Climbs(_))
        ));
        assert!(matches!(
            parse_bind("/a:/", cwd),
            Err(BindSpecError::Root(_))
        ));
    }
}
