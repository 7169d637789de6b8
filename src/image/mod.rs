//! Container images: SIF files, plain squashfs files and unpacked directories.

pub mod rootfs;
