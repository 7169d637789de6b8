//! The node instance's configuration, built in one place from typed requests: every launcher
//! (from the launch plan's binds, [`crate::launch::node`]) and `cmpirun exec` (from its
//! command line, [`super::run`]) describe each root as a [`RootRequest`], and
//! [`instance_config`] adds what the host says: the image's location and mount backend, the
//! user's account, the working directory, the host files and directories every root binds, and
//! the staging directory.

use std::fs;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};

use crate::exit::{Blame, Fault};
use crate::image::{ImageKind, locate};
use crate::mount::{MountBackend, MountError, SquashfsSource, choose_backend};

use super::instance::InstanceConfig;
use super::member_env::base_environment;
use super::root::{Account, HostBind, ImageSource, LibraryCache, RootConfig, ShmMode};

/// One root of a node instance, as a launcher or `cmpirun exec` asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootRequest {
    /// The image path.
    pub image: PathBuf,
    /// Binds beyond the built-in ones, in order (sources absolute and on this host).
    pub binds: Vec<HostBind>,
    /// The mount backend asked for (`None`: FUSE where usable, else extraction).
    pub backend: Option<MountBackend>,
    /// What `/dev/shm` is.
    pub shm: ShmMode,
    /// With [`ShmMode::Private`]: the size limit of `/dev/shm` (a tmpfs `size=` value, the job's
    /// `--shm SIZE`); `None` keeps tmpfs's default.
    pub shm_size: Option<String>,
    /// The image files to serve from the node's library cache (`None`: off).
    pub library_cache: Option<LibraryCache>,
}

/// Why a node instance cannot be configured.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The image cannot be used.
    #[error("image {}: {message}", path.display())]
    Image {
        /// The image as given.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The image is not one cmpirun can read.
    #[error(transparent)]
    Unreadable(crate::image::ImageError),
    /// No image mount backend can work here.
    #[error(transparent)]
    Backend(MountError),
    /// No root was asked for.
    #[error("no image given")]
    NoImage,
    /// The working directory cannot be read.
    #[error("cannot read the working directory: {0}")]
    WorkingDirectory(std::io::Error),
    /// Every staging candidate holds something a root needs.
    #[error(
        "no host directory to stage the container root on (tried {tried}; each holds the image, \
         a bind source, the home or the working directory)"
    )]
    NoStage {
        /// The candidates, comma-separated.
        tried: String,
    },
}

impl Blame for ConfigError {
    fn fault(&self) -> Fault {
        match self {
            ConfigError::Image { .. } | ConfigError::Unreadable(_) | ConfigError::NoImage => {
                Fault::User
            }
            ConfigError::Backend(e) => e.fault(),
            ConfigError::WorkingDirectory(_) | ConfigError::NoStage { .. } => Fault::Host,
        }
    }
}

/// The image's root filesystem, checked to exist and be readable.
pub fn image_source(
    path: &Path,
    backend: Option<MountBackend>,
) -> Result<ImageSource, ConfigError> {
    let bad = |message: String| ConfigError::Image {
        path: path.to_owned(),
        message,
    };
    match fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad("no such file or directory".into()));
        }
        Err(e) => return Err(bad(e.to_string())),
        Ok(m) if m.is_dir() => {
            fs::read_dir(path).map_err(|e| bad(e.to_string()))?;
        }
        Ok(_) => {
            fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        }
    }
    let loc = locate(path).map_err(ConfigError::Unreadable)?;
    Ok(match loc.kind {
        ImageKind::Directory => ImageSource::Directory(loc.path),
        ImageKind::Sif | ImageKind::Squashfs => ImageSource::Squashfs {
            source: SquashfsSource {
                path: loc.path,
                offset: loc.squashfs_offset,
                size: loc.squashfs_size,
            },
            backend: choose_backend(backend).map_err(ConfigError::Backend)?,
        },
    })
}

/// The current user as the container's `/etc/passwd` should show them.
pub fn current_account() -> Account {
    let uid = Uid::current();
    let gid = Gid::current();
    let user = User::from_uid(uid).ok().flatten();
    let group = Group::from_gid(gid)
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| format!("group{gid}"));
    match user {
        Some(u) => Account {
            name: u.name,
            uid: uid.as_raw(),
            gid: gid.as_raw(),
            group,
            gecos: u.gecos.to_string_lossy().into_owned(),
            home: u.dir,
            shell: u.shell,
        },
        None => Account {
            name: std::env::var("USER").unwrap_or_else(|_| format!("user{uid}")),
            uid: uid.as_raw(),
            gid: gid.as_raw(),
            group,
            gecos: String::new(),
            home: std::env::var_os("HOME").map_or_else(|| "/".into(), PathBuf::from),
            shell: "/bin/sh".into(),
        },
    }
}

/// Host directories the staging tmpfs may cover, in order of preference: ones a container never
/// needs from the host.
pub const STAGE_CANDIDATES: &[&str] = &[
    "/mnt", "/media", "/srv", "/opt", "/boot", "/run", "/var/tmp", "/tmp",
];

/// Picks the host directory to cover with the staging tmpfs: one that holds none of `avoid`
/// (the image, bind sources, home, working directory, extract cache) and is not inside one.
pub fn pick_stage(avoid: &[PathBuf]) -> Option<PathBuf> {
    STAGE_CANDIDATES
        .iter()
        .map(Path::new)
        .filter(|c| c.is_dir())
        .find(|c| !avoid.iter().any(|a| a.starts_with(c) || c.starts_with(a)))
        .map(Path::to_owned)
}

/// Builds the configuration of a node instance that holds one root per request (the first is
/// [`InstanceConfig::root`]), from the host. Every root is staged on the same host directory,
/// one that holds none of what any root needs: the instance mounts the `/dev/shm` all roots
/// share there before it builds them.
pub fn instance_config(requests: &[RootRequest]) -> Result<InstanceConfig, ConfigError> {
    let cwd = std::env::current_dir().map_err(ConfigError::WorkingDirectory)?;
    let account = current_account();
    let mut avoid: Vec<PathBuf> = vec![account.home.clone(), cwd.clone()];
    avoid.extend(crate::mount::default_extract_cache());
    let mut images = Vec::with_capacity(requests.len());
    for req in requests {
        let image = image_source(&req.image, req.backend)?;
        avoid.push(req.image.clone());
        avoid.push(image.path().to_owned());
        avoid.extend(req.binds.iter().map(|b| b.src.clone()));
        images.push(image);
    }
    let host_dirs: Vec<PathBuf> = ["/tmp", "/var/tmp"]
        .iter()
        .filter(|p| Path::new(p).is_dir())
        .map(PathBuf::from)
        .collect();
    // Binds take the mounts below their sources with them, so the staging tmpfs must not be
    // mounted inside one.
    avoid.extend(host_dirs.iter().cloned());
    let stage = pick_stage(&avoid).ok_or_else(|| ConfigError::NoStage {
        tried: STAGE_CANDIDATES.join(", "),
    })?;
    let host_files: Vec<PathBuf> = ["/etc/hosts", "/etc/resolv.conf", "/etc/localtime"]
        .iter()
        .filter(|p| Path::new(p).exists())
        .map(PathBuf::from)
        .collect();
    let mut roots = requests.iter().zip(images).map(|(req, image)| RootConfig {
        image,
        stage: stage.clone(),
        bind_home: account.home.is_dir(),
        account: account.clone(),
        cwd: Some(cwd.clone()),
        host_files: host_files.clone(),
        host_dirs: host_dirs.clone(),
        binds: req.binds.clone(),
        // Bind sources must not depend on the working directory of whoever opens them.
        library_cache: req.library_cache.as_ref().map(|c| LibraryCache {
            dir: std::path::absolute(&c.dir).unwrap_or_else(|_| c.dir.clone()),
            files: c.files.clone(),
        }),
        cached: Vec::new(),
        record_loads: None,
        shm: req.shm,
        shared_shm: None,
        shm_size: req.shm_size.clone(),
    });
    let root = roots.next().ok_or(ConfigError::NoImage)?;
    let other_roots: Vec<RootConfig> = roots.collect();
    let script_env = base_environment(std::env::vars_os(), &root.account.home);
    Ok(InstanceConfig {
        root,
        other_roots,
        script_env,
        clean_ends: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_avoids_what_the_container_needs() {
        let s = pick_stage(&[]).unwrap();
        assert!(STAGE_CANDIDATES.contains(&s.to_str().unwrap()));
        let all: Vec<PathBuf> = STAGE_CANDIDATES.iter().map(PathBuf::from).collect();
        assert_eq!(pick_stage(&all), None);
        let avoid = vec![s.join("x/image.sif")];
        assert_ne!(pick_stage(&avoid), Some(s.clone()));
        assert_ne!(pick_stage(&[PathBuf::from("/")]), Some(s));
    }

    #[test]
    fn whose_errors() {
        assert!(ConfigError::NoImage.fault() == Fault::User);
        assert!(
            ConfigError::Image {
                path: "/x".into(),
                message: "no such file or directory".into()
            }
            .fault()
                == Fault::User
        );
        assert!(
            ConfigError::NoStage {
                tried: String::new()
            }
            .fault()
                != Fault::User
        );
    }
}
