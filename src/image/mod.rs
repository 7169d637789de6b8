//! Container images: SIF files, plain squashfs files and unpacked directories.
//!
//! [`locate`] finds an image's root filesystem without mounting anything and refuses images that
//! cannot be launched on this host; [`open_rootfs`] then reads files inside it.

pub mod content;
pub mod dir;
pub mod inspect;
pub mod integrity;
pub mod oras;
pub mod pack;
pub mod rootfs;
pub mod sif;
pub mod squash;

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use self::rootfs::RootFs;
use self::sif::{Arch, Descriptor, FsType, SifError, SifFile};

/// The on-disk form of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// An Apptainer/Singularity SIF file whose primary system partition is squashfs.
    Sif,
    /// A plain squashfs file.
    Squashfs,
    /// An unpacked root directory.
    Directory,
}

/// Where an image's root filesystem lives: enough to mount it or read it, found without
/// mounting anything.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageLocation {
    /// The image path as the user gave it, made absolute.
    pub path: PathBuf,
    /// What kind of image this is.
    pub kind: ImageKind,
    /// For SIF and squashfs: the byte offset of the squashfs filesystem inside `path` (0 for a
    /// plain squashfs file).
    pub squashfs_offset: u64,
    /// For SIF and squashfs: the size in bytes of the squashfs filesystem.
    pub squashfs_size: u64,
}

/// Errors from opening an image; every one names the file and is the user's to fix.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be opened or read.
    #[error("{}: cannot read: {error}", path.display())]
    Io {
        /// The image path.
        path: PathBuf,
        /// What the system said.
        error: io::Error,
    },
    /// Neither a SIF file, a squashfs file nor a directory.
    #[error(
        "{}: not an image: no SIF magic at byte 32 and no squashfs magic at byte 0 (expected a SIF file, a squashfs file or a directory)",
        path.display()
    )]
    NotAnImage {
        /// The image path.
        path: PathBuf,
    },
    /// The SIF header or descriptor table is bad.
    #[error("{}: {error}", path.display())]
    Sif {
        /// The image path.
        path: PathBuf,
        /// What is wrong with it.
        error: SifError,
    },
    /// The SIF holds no primary system partition.
    #[error(
        "{}: no primary system partition: the SIF holds no root filesystem to run (rebuild it with `cmpirun image pack` or `apptainer build`)",
        path.display()
    )]
    NoPrimaryPartition {
        /// The image path.
        path: PathBuf,
    },
    /// The SIF holds more than one primary system partition.
    #[error(
        "{}: {} primary system partitions (objects {}); a SIF image must have exactly one",
        path.display(), ids.len(), join_ids(ids)
    )]
    SeveralPrimaryPartitions {
        /// The image path.
        path: PathBuf,
        /// Their object IDs.
        ids: Vec<u32>,
    },
    /// The primary partition is not squashfs.
    #[error(
        "{}: the primary partition (object {id}) is {fs_type}, not squashfs; only squashfs root filesystems can be run",
        path.display()
    )]
    PrimaryNotSquashfs {
        /// The image path.
        path: PathBuf,
        /// Its object ID.
        id: u32,
        /// Its filesystem type.
        fs_type: String,
    },
    /// The primary partition is encrypted.
    #[error(
        "{}: the primary partition (object {id}) is encrypted ({fs_type}); cmpirun cannot run encrypted images, decrypt it with apptainer first",
        path.display()
    )]
    PrimaryEncrypted {
        /// The image path.
        path: PathBuf,
        /// Its object ID.
        id: u32,
        /// Its filesystem type.
        fs_type: String,
    },
    /// The squashfs filesystem is corrupt or unsupported.
    #[error("{}: bad squashfs filesystem at offset {offset}: {reason}", path.display())]
    BadSquashfs {
        /// The image path.
        path: PathBuf,
        /// Offset of the filesystem in the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The files inside the image could not be read.
    #[error("{}: cannot read the image's files: {error}", path.display())]
    Facts {
        /// The image path.
        path: PathBuf,
        /// What went wrong.
        error: String,
    },
    /// The image is built for a CPU this host cannot run.
    #[error(
        "{}: the image is built for {image_arch}, this host is {host_arch}; use an image built for {host_arch}",
        path.display()
    )]
    WrongArch {
        /// The image path.
        path: PathBuf,
        /// The image's architecture (Go name).
        image_arch: String,
        /// The host's architecture (Go name).
        host_arch: String,
    },
}

/// An image that cannot be opened is the user's to fix.
impl crate::exit::Blame for ImageError {
    fn fault(&self) -> crate::exit::Fault {
        crate::exit::Fault::User
    }
}

fn join_ids(ids: &[u32]) -> String {
    ids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl ImageError {
    pub(crate) fn io(path: &Path, error: io::Error) -> Self {
        ImageError::Io {
            path: path.to_owned(),
            error,
        }
    }

    fn sif(path: &Path, error: SifError) -> Self {
        ImageError::Sif {
            path: path.to_owned(),
            error,
        }
    }
}

/// Determines the kind of image at `path` from its first bytes (or that it is a directory).
pub fn identify(path: &Path) -> Result<ImageKind, ImageError> {
    let meta = std::fs::metadata(path).map_err(|e| ImageError::io(path, e))?;
    if meta.is_dir() {
        return Ok(ImageKind::Directory);
    }
    let mut head = Vec::with_capacity(128);
    File::open(path)
        .and_then(|f| f.take(128).read_to_end(&mut head))
        .map_err(|e| ImageError::io(path, e))?;
    if sif::has_magic(&head) {
        return Ok(ImageKind::Sif);
    }
    if head.starts_with(&squash::MAGIC) {
        return Ok(ImageKind::Squashfs);
    }
    // A file named *.sif or starting with a launch script is meant to be SIF: report what is
    // wrong with it as SIF rather than "unknown format".
    let named_sif = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("sif"));
    if named_sif || head.starts_with(b"#!") {
        return Ok(ImageKind::Sif);
    }
    Err(ImageError::NotAnImage {
        path: path.to_owned(),
    })
}

/// Reads the header and descriptor table of the SIF file at `path`.
pub fn read_sif(path: &Path) -> Result<SifFile, ImageError> {
    let file = File::open(path).map_err(|e| ImageError::io(path, e))?;
    sif::read(&mut BufReader::new(file)).map_err(|e| ImageError::sif(path, e))
}

/// The one primary system partition of `sif`, checked to be plain squashfs.
pub fn primary_partition<'a>(path: &Path, sif: &'a SifFile) -> Result<&'a Descriptor, ImageError> {
    let prims = sif.primary_partitions();
    let d = match prims.as_slice() {
        [] => {
            return Err(ImageError::NoPrimaryPartition {
                path: path.to_owned(),
            });
        }
        [d] => *d,
        many => {
            return Err(ImageError::SeveralPrimaryPartitions {
                path: path.to_owned(),
                ids: many.iter().map(|d| d.id).collect(),
            });
        }
    };
    match d.partition() {
        Some((FsType::Squash, _, _)) => Ok(d),
        Some((fs @ (FsType::EncryptedSquashfs | FsType::GocryptfsSquashfs), _, _)) => {
            Err(ImageError::PrimaryEncrypted {
                path: path.to_owned(),
                id: d.id,
                fs_type: fs.name().to_owned(),
            })
        }
        other => Err(ImageError::PrimaryNotSquashfs {
            path: path.to_owned(),
            id: d.id,
            fs_type: other.map_or("Unknown", |(fs, _, _)| fs.name()).to_owned(),
        }),
    }
}

/// Finds the root filesystem of the image at `path` (SIF, squashfs or directory) without
/// mounting it, and checks that this host can launch it: exactly one primary system partition,
/// squashfs and not encrypted, a sane superblock, and an architecture this host runs.
pub fn locate(path: &Path) -> Result<ImageLocation, ImageError> {
    let abs = std::path::absolute(path).map_err(|e| ImageError::io(path, e))?;
    let kind = identify(&abs)?;
    let (offset, size) = match kind {
        ImageKind::Directory => (0, 0),
        ImageKind::Squashfs => {
            let len = std::fs::metadata(&abs)
                .map_err(|e| ImageError::io(&abs, e))?
                .len();
            squash::superblock(&abs, 0, len)?;
            (0, len)
        }
        ImageKind::Sif => {
            let sif = read_sif(&abs)?;
            let part = primary_partition(&abs, &sif)?;
            let arch = part.partition().map_or(Arch::UNKNOWN, |(_, _, a)| a);
            let host = Arch::host();
            if !arch.runs_on(host) {
                return Err(ImageError::WrongArch {
                    path: abs,
                    image_arch: arch_label(arch),
                    host_arch: host.name().to_owned(),
                });
            }
            // The reader checked that the partition lies inside the file, so both are >= 0.
            let (offset, size) = (part.offset as u64, part.size as u64);
            squash::superblock(&abs, offset, size)?;
            (offset, size)
        }
    };
    Ok(ImageLocation {
        path: abs,
        kind,
        squashfs_offset: offset,
        squashfs_size: size,
    })
}

/// An architecture for messages: its Go name, or its raw code when unknown.
fn arch_label(arch: Arch) -> String {
    match arch.name() {
        "unknown" => format!("an unknown architecture (code {:?})", arch.code()),
        name => name.to_owned(),
    }
}

/// Opens the root filesystem at `loc` for reading files, without mounting it.
pub fn open_rootfs(loc: &ImageLocation) -> Result<Box<dyn RootFs>, ImageError> {
    match loc.kind {
        ImageKind::Directory => Ok(Box::new(dir::DirRootFs::new(&loc.path))),
        ImageKind::Sif | ImageKind::Squashfs => Ok(Box::new(squash::SquashfsRootFs::open(
            &loc.path,
            loc.squashfs_offset,
        )?)),
    }
}
