//! Container images: SIF files, plain squashfs files and unpacked directories.

pub mod rootfs;

use std::path::{Path, PathBuf};

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
    /// Placeholder until the SIF reader lands.
    #[error("{path}: image support is not built yet")]
    NotImplemented {
        /// The image path.
        path: PathBuf,
    },
}

/// Finds the root filesystem of the image at `path` (SIF, squashfs or directory) without
/// mounting it.
pub fn locate(path: &Path) -> Result<ImageLocation, ImageError> {
    Err(ImageError::NotImplemented {
        path: path.to_owned(),
    })
}
