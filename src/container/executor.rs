//! Carries out a [`MountOp`] list inside the node instance's mount namespace.
//!
//! This is the only code in cmpirun that calls `mount(2)` for the container root (the image
//! backends in [`crate::mount`] mount the image itself). Every failure names the step and the path.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, fstat};

use crate::exit::{Blame, Fault};
use crate::mount::{MountError, MountOptions, MountedImage, mount_squashfs};

use super::accounts::merge_account_file;
use super::resolve::{DirLookup, Lookup, Node, ResolveError, host_path, resolve_in_root};
use super::root::{AccountFile, BindSource, ImageSource, MountOp};

/// Why the container root could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// A bind source does not exist on the host.
    #[error("bind source {path} does not exist on the host")]
    SourceMissing {
        /// The host path.
        path: PathBuf,
    },
    /// A bind source exists but cannot be opened.
    #[error("cannot open bind source {path}: {errno}")]
    SourceUnreadable {
        /// The host path.
        path: PathBuf,
        /// The system error.
        errno: Errno,
    },
    /// A destination cannot be resolved inside the root.
    #[error("bind destination {0}")]
    Destination(#[from] ResolveError),
    /// A destination inside a bound host directory does not exist there.
    #[error(
        "bind destination {dst} does not exist in the host directory bound at {existing}; \
         create it on the host or choose another destination"
    )]
    DestinationMissing {
        /// The container path.
        dst: PathBuf,
        /// Its longest existing parent.
        existing: PathBuf,
    },
    /// A directory onto a file or the other way round.
    #[error(
        "cannot bind {src} onto {dst} in the container: one is a directory and the other is not"
    )]
    KindMismatch {
        /// The source.
        src: PathBuf,
        /// The container path.
        dst: PathBuf,
    },
    /// The image backend failed.
    #[error("mounting the image: {0}")]
    Image(#[from] MountError),
    /// A system call failed.
    #[error("{step} {path}: {errno}")]
    Sys {
        /// What was being done.
        step: &'static str,
        /// On which path.
        path: PathBuf,
        /// The system error.
        errno: Errno,
    },
    /// A file operation failed.
    #[error("{step} {path}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An operation came before the one it depends on (a bug in the plan).
    #[error("mount plan out of order: {0}")]
    Order(&'static str),
}

/// The user's to fix: a bind the command line or the image can change.
impl Blame for RootError {
    fn fault(&self) -> Fault {
        Fault::user_if(matches!(
            self,
            RootError::SourceMissing { .. }
                | RootError::Destination(_)
                | RootError::DestinationMissing { .. }
                | RootError::KindMismatch { .. }
        ))
    }
}

fn sys<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> RootError + 'a {
    move |errno| RootError::Sys {
        step,
        path: path.to_owned(),
        errno,
    }
}

fn io<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RootError + 'a {
    move |source| RootError::Io {
        step,
        path: path.to_owned(),
        source,
    }
}

/// What an executed plan leaves behind: the image mount, which must live as long as the instance.
#[derive(Debug)]
pub struct Assembled {
    /// The mounted image (drop it only when the instance ends).
    pub image: Option<MountedImage>,
}

/// Sees the image with the mount-point layer on top, as the overlay will.
struct LayerLookup {
    layer: DirLookup,
    image: DirLookup,
}

impl Lookup for LayerLookup {
    fn node(&self, path: &Path) -> std::io::Result<Node> {
        match self.layer.node(path)? {
            Node::Missing => self.image.node(path),
            n => Ok(n),
        }
    }
}

struct Executor {
    sources: HashMap<PathBuf, OwnedFd>,
    stage: Option<PathBuf>,
    image: Option<MountedImage>,
    root: Option<PathBuf>,
    layer_used: bool,
}

/// Runs `ops` in order. Must be called in a private mount namespace (after `unshare`), with the
/// namespace's capabilities.
pub fn execute(ops: &[MountOp]) -> Result<Assembled, RootError> {
    let mut ex = Executor {
        sources: HashMap::new(),
        stage: None,
        image: None,
        root: None,
        layer_used: false,
    };
    // Open every host source first: a missing one fails before anything is mounted, and the
    // staging tmpfs may then cover a directory that holds one.
    for op in ops {
        match op {
            MountOp::Bind {
                src: BindSource::Host(p),
                ..
            } => ex.open_source(p)?,
            MountOp::AssembleRoot { cached, .. } => {
                for dir in cached {
                    ex.open_source(dir)?;
                }
            }
            _ => {}
        }
    }
    for op in ops {
        ex.run(op)?;
    }
    Ok(Assembled { image: ex.image })
}

impl Executor {
    fn open_source(&mut self, path: &Path) -> Result<(), RootError> {
        if self.sources.contains_key(path) {
            return Ok(());
        }
        match open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()) {
            Ok(fd) => {
                self.sources.insert(path.to_owned(), fd);
                Ok(())
            }
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => Err(RootError::SourceMissing {
                path: path.to_owned(),
            }),
            Err(errno) => Err(RootError::SourceUnreadable {
                path: path.to_owned(),
                errno,
            }),
        }
    }

    fn stage(&self) -> Result<&Path, RootError> {
        self.stage
            .as_deref()
            .ok_or(RootError::Order("staging tmpfs not mounted"))
    }

    fn root(&self) -> Result<&Path, RootError> {
        self.root
            .as_deref()
            .ok_or(RootError::Order("root not assembled"))
    }

    /// The path `mount(2)` should use as source, and whether it is a directory.
    fn source(&self, src: &BindSource) -> Result<(PathBuf, bool), RootError> {
        match src {
            BindSource::Host(p) => {
                let fd = self
                    .sources
                    .get(p)
                    .ok_or(RootError::Order("bind source not opened"))?;
                let st = fstat(fd).map_err(sys("stat bind source", p))?;
                let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                Ok((
                    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
                    is_dir,
                ))
            }
            BindSource::Stage(rel) => {
                let p = self.stage()?.join(rel);
                let is_dir = p.is_dir();
                Ok((p, is_dir))
            }
        }
    }

    fn source_name(src: &BindSource) -> PathBuf {
        match src {
            BindSource::Host(p) => p.clone(),
            BindSource::Stage(p) => PathBuf::from("(generated) ").join(p),
        }
    }

    fn run(&mut self, op: &MountOp) -> Result<(), RootError> {
        match op {
            MountOp::StageTmpfs { target } => {
                mount(
                    Some("tmpfs"),
                    target,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some("mode=0700"),
                )
                .map_err(sys("mount staging tmpfs on", target))?;
                self.stage = Some(target.clone());
            }
            MountOp::MountImage {
                at,
                image,
                record_loads,
            } => {
                let target = self.stage()?.join(at);
                fs::create_dir(&target).map_err(io("create image mount point", &target))?;
                match image {
                    ImageSource::Squashfs { source, backend } => {
                        let opts = MountOptions {
                            record_loads: *record_loads,
                            ..MountOptions::default()
                        };
                        self.image = Some(mount_squashfs(source, &target, *backend, &opts)?);
                    }
                    ImageSource::Directory(dir) => {
                        mount(
                            Some(dir.as_path()),
                            &target,
                            None::<&str>,
                            MsFlags::MS_BIND | MsFlags::MS_REC,
                            None::<&str>,
                        )
                        .map_err(sys("bind image directory", dir))?;
                        remount_readonly(&target)?;
                    }
                }
            }
            MountOp::WriteAccountFile { file, entry, out } => {
                let image = DirLookup {
                    root: self.stage()?.join(super::root::STAGE_IMAGE),
                };
                let name = match file {
                    AccountFile::Passwd => "/etc/passwd",
                    AccountFile::Group => "/etc/group",
                };
                // An image file that is missing, unreadable or a symlink out of the root counts
                // as empty.
                let current = match resolve_in_root(&image, Path::new(name)) {
                    Ok(r) if r.node == Node::File => {
                        fs::read_to_string(image.host_path(&r.path)).unwrap_or_default()
                    }
                    _ => String::new(),
                };
                let out = self.stage()?.join(out);
                if let Some(parent) = out.parent() {
                    fs::create_dir_all(parent).map_err(io("create directory", parent))?;
                }
                fs::write(&out, merge_account_file(&current, entry))
                    .map_err(io("write account file", &out))?;
                fs::set_permissions(&out, fs::Permissions::from_mode(0o644))
                    .map_err(io("chmod account file", &out))?;
            }
            MountOp::MountPoint { dst, like } => {
                let stage = self.stage()?.to_owned();
                let lookup = LayerLookup {
                    layer: DirLookup {
                        root: stage.join(super::root::STAGE_LAYER),
                    },
                    image: DirLookup {
                        root: stage.join(super::root::STAGE_IMAGE),
                    },
                };
                let (_, src_dir) = self.source(like)?;
                let r = resolve_in_root(&lookup, dst)?;
                match r.node {
                    Node::Missing => {
                        let p = lookup.layer.host_path(&r.path);
                        if let Some(parent) = r.path.parent() {
                            make_layer_dirs(&lookup, parent)?;
                        }
                        if src_dir {
                            fs::create_dir(&p).map_err(io("create mount point", &p))?;
                        } else {
                            fs::OpenOptions::new()
                                .write(true)
                                .create(true)
                                .truncate(false)
                                .mode(0o644)
                                .open(&p)
                                .map_err(io("create mount point", &p))?;
                        }
                        self.layer_used = true;
                    }
                    Node::Dir if !src_dir => {
                        return Err(RootError::KindMismatch {
                            src: Self::source_name(like),
                            dst: dst.clone(),
                        });
                    }
                    Node::File if src_dir => {
                        return Err(RootError::KindMismatch {
                            src: Self::source_name(like),
                            dst: dst.clone(),
                        });
                    }
                    _ => {}
                }
            }
            MountOp::AssembleRoot {
                image,
                layer,
                cached,
                root,
            } => {
                let stage = self.stage()?.to_owned();
                let (image, layer, root) = (stage.join(image), stage.join(layer), stage.join(root));
                fs::create_dir(&root).map_err(io("create root mount point", &root))?;
                if self.layer_used || !cached.is_empty() {
                    // Kernel overlayfs with only lower layers is read-only: the tmpfs layer of
                    // mount points on top, the library cache's entries (by descriptor: the
                    // staging tmpfs may cover their path, and a path may hold a `:`) below it,
                    // the image at the bottom.
                    let mut lower = Vec::new();
                    if self.layer_used {
                        lower.push(layer.display().to_string());
                    }
                    for dir in cached {
                        let (path, _) = self.source(&BindSource::Host(dir.clone()))?;
                        lower.push(path.display().to_string());
                    }
                    lower.push(image.display().to_string());
                    let opts = format!("lowerdir={}", lower.join(":"));
                    mount(
                        Some("overlay"),
                        &root,
                        Some("overlay"),
                        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                        Some(opts.as_str()),
                    )
                    .map_err(sys(
                        "mount overlay (mount-point layer and library cache over the image) at",
                        &root,
                    ))?;
                } else {
                    mount(
                        Some(image.as_path()),
                        &root,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REC,
                        None::<&str>,
                    )
                    .map_err(sys("bind image as root at", &root))?;
                }
                self.root = Some(root);
            }
            MountOp::Bind {
                src,
                dst,
                recursive,
                readonly,
            } => {
                let root = self.root()?.to_owned();
                let (source, src_dir) = self.source(src)?;
                let target = self.destination(&root, dst, Some((src, src_dir)))?;
                let mut flags = MsFlags::MS_BIND;
                if *recursive {
                    flags |= MsFlags::MS_REC;
                }
                mount(
                    Some(source.as_path()),
                    &target,
                    None::<&str>,
                    flags,
                    None::<&str>,
                )
                .map_err(|errno| RootError::Sys {
                    step: "bind",
                    path: PathBuf::from(format!(
                        "{} onto {}",
                        Self::source_name(src).display(),
                        dst.display()
                    )),
                    errno,
                })?;
                if *readonly {
                    remount_readonly(&target)?;
                    if *recursive {
                        readonly_below(&target);
                    }
                }
            }
            MountOp::Tmpfs { dst, mode, size } => {
                let root = self.root()?.to_owned();
                let target = self.destination(&root, dst, None)?;
                let opts = super::root::tmpfs_options(*mode, size.as_deref());
                mount(
                    Some("tmpfs"),
                    &target,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some(opts.as_str()),
                )
                .map_err(sys("mount tmpfs at", dst))?;
            }
            MountOp::PivotRoot { root } => {
                let root = self.stage()?.join(root);
                nix::unistd::chdir(&root).map_err(sys("chdir to new root", &root))?;
                // pivot_root(".", ".") stacks the old root on top of the new one; detaching it
                // leaves only the container root, with no directory needed for the old one.
                nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root into", &root))?;
                umount2(".", MntFlags::MNT_DETACH)
                    .map_err(sys("detach old root", Path::new("/")))?;
                nix::unistd::chdir("/").map_err(sys("chdir to", Path::new("/")))?;
                // The image's mount point is a staging path no more: ending the instance must
                // not unmount whatever the container has at that path (a user's bind there).
                if let Some(image) = &mut self.image {
                    image.mark_pivoted();
                }
            }
        }
        Ok(())
    }

    /// The host path of a container destination, which must exist now.
    fn destination(
        &self,
        root: &Path,
        dst: &Path,
        src: Option<(&BindSource, bool)>,
    ) -> Result<PathBuf, RootError> {
        let lookup = DirLookup {
            root: root.to_owned(),
        };
        let r = resolve_in_root(&lookup, dst)?;
        let mismatch = match (&r.node, src) {
            (Node::Missing, _) => {
                return Err(RootError::DestinationMissing {
                    dst: dst.to_owned(),
                    existing: r.existing,
                });
            }
            (Node::Dir, Some((_, false))) | (Node::File, Some((_, true))) => true,
            _ => false,
        };
        if mismatch {
            let src = src.map(|s| Self::source_name(s.0)).unwrap_or_default();
            return Err(RootError::KindMismatch {
                src,
                dst: dst.to_owned(),
            });
        }
        Ok(host_path(root, &r.path))
    }
}

/// Creates the directories of `path` on the mount-point layer. Where the image has the same
/// directory, the layer's copy takes its permission bits: overlayfs shows the upper layer's
/// attributes for a merged directory, and `/` or `/home` must not turn into 0700 or lose a
/// sticky bit. (The owner cannot be copied: image files owned by ids outside the user namespace
/// have no mapping.)
fn make_layer_dirs(lookup: &LayerLookup, path: &Path) -> Result<(), RootError> {
    let mut cur = PathBuf::from("/");
    let mut dirs = vec![cur.clone()];
    for c in path.components().skip(1) {
        cur.push(c);
        dirs.push(cur.clone());
    }
    for d in dirs {
        let layer = lookup.layer.host_path(&d);
        if !layer.is_dir() {
            fs::create_dir(&layer).map_err(io("create mount point", &layer))?;
        }
        if let Ok(m) = fs::metadata(lookup.image.host_path(&d))
            && m.is_dir()
        {
            fs::set_permissions(
                &layer,
                fs::Permissions::from_mode(m.permissions().mode() & 0o7777),
            )
            .map_err(io("chmod mount point", &layer))?;
        }
    }
    Ok(())
}

/// Makes the mounts below a recursive bind read-only too (`mount_setattr` with `AT_RECURSIVE`,
/// Linux 5.12 and later); on an older kernel only the bind itself is read-only, which is logged.
fn readonly_below(target: &Path) {
    let Ok(path) = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: mount_attr is plain data; zeroed is its empty value.
    let mut attr: libc::mount_attr = unsafe { std::mem::zeroed() };
    attr.attr_set = libc::MOUNT_ATTR_RDONLY;
    // SAFETY: the path is a valid C string and `attr` a live mount_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &mut attr as *mut libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc != 0 {
        tracing::info!(
            "{}: the mounts below this read-only bind stay writable (mount_setattr: {})",
            target.display(),
            Errno::last()
        );
    }
}

/// Remounts a bind read-only, keeping the flags the kernel locked
/// ([`crate::sys::remount::remount_read_only`]).
fn remount_readonly(target: &Path) -> Result<(), RootError> {
    crate::sys::remount::remount_read_only(target, MsFlags::empty())
        .map_err(|e| sys(e.step, target)(e.errno))
}
