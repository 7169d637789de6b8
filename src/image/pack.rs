//! `cmpirun image pack`: an unpacked root directory → squashfs (written by backhand) → SIF.
//!
//! The squashfs filesystem is written straight into the output file at the offset the SIF layout
//! gives the first partition, so a 200 MiB image is never copied; the SIF header and descriptor
//! table are then written around it. The output appears under its final name only when complete
//! (written to a temporary file in the same directory, then renamed), so a failed pack leaves
//! nothing behind.

use std::fs::{self, File};
use std::io::{self, BufWriter, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use backhand::compression::{CompressionOptions, Compressor, Gzip, Lz4, Zstd};
use backhand::{CompressionExtra, ExtraXz, FilesystemCompressor, FilesystemWriter, NodeHeader};

use super::sif::{self, Arch, DataType, FsType, NewObject, ObjectData, PartType, WriteOptions};

/// Squashfs compression for `image pack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd (fast to write and read; the default).
    Zstd,
    /// gzip (what `apptainer build` writes; readable everywhere).
    Gzip,
    /// xz (smallest, slowest to write).
    Xz,
    /// lz4 (fastest, largest).
    Lz4,
}

impl Compression {
    /// The level used when none is given: chosen for packing speed (see docs/images.md).
    pub fn default_level(self) -> u32 {
        match self {
            Compression::Zstd => 3,
            Compression::Gzip => 6,
            Compression::Xz => 6,
            Compression::Lz4 => 0,
        }
    }
}

/// Options of [`pack`].
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Squashfs compression.
    pub compression: Compression,
    /// Compression level; `None` for [`Compression::default_level`].
    pub level: Option<u32>,
    /// Squashfs data block size (a power of two from 4 KiB to 1 MiB).
    pub block_size: u32,
    /// Zero UUID, Go zero time in SIF, time 0 in squashfs: equal trees give equal files.
    pub deterministic: bool,
    /// Architecture recorded in the SIF partition and header.
    pub arch: Arch,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            compression: Compression::Zstd,
            level: None,
            block_size: 128 * 1024,
            deterministic: false,
            arch: Arch::host(),
        }
    }
}

/// What [`pack`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PackReport {
    /// The SIF file.
    pub output: PathBuf,
    /// Offset of the squashfs partition.
    pub squashfs_offset: u64,
    /// Size of the squashfs partition (with its padding to 4 KiB).
    pub squashfs_size: u64,
    /// Entries packed (files, directories, links, devices), the root included.
    pub entries: u64,
    /// Bytes of regular-file data read.
    pub file_bytes: u64,
}

/// Why packing failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// The source is not a directory.
    #[error("{}: not a directory (image pack takes an unpacked root filesystem)", .0.display())]
    NotADirectory(PathBuf),
    /// A source entry could not be read.
    #[error("{}: cannot read: {error}", path.display())]
    Read {
        /// The entry.
        path: PathBuf,
        /// What the system said.
        error: io::Error,
    },
    /// A bad option.
    #[error("{0}")]
    Option(String),
    /// The output could not be written.
    #[error("{}: cannot write: {error}", path.display())]
    Write {
        /// The output path.
        path: PathBuf,
        /// What went wrong.
        error: String,
    },
}

/// The user's to fix: a bad source or option; the host's: a failure of the system while
/// writing.
impl crate::exit::Blame for PackError {
    fn fault(&self) -> crate::exit::Fault {
        crate::exit::Fault::user_if(!matches!(self, PackError::Write { .. }))
    }
}

/// Packs the directory `src` into the SIF file `out`.
pub fn pack(src: &Path, out: &Path, opts: &PackOptions) -> Result<PackReport, PackError> {
    let root_meta = fs::metadata(src).map_err(|error| PackError::Read {
        path: src.to_owned(),
        error,
    })?;
    if !root_meta.is_dir() {
        return Err(PackError::NotADirectory(src.to_owned()));
    }
    if !opts.block_size.is_power_of_two() || !(4096..=1 << 20).contains(&opts.block_size) {
        return Err(PackError::Option(format!(
            "--block-size {}: must be a power of two from 4096 to 1048576",
            opts.block_size
        )));
    }
    let write_err = |error: String| PackError::Write {
        path: out.to_owned(),
        error,
    };
    let out_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".cmpirun-pack-")
        .tempfile_in(&out_dir)
        .map_err(|e| write_err(e.to_string()))?;
    let tmp_meta = tmp
        .as_file()
        .metadata()
        .map_err(|e| write_err(e.to_string()))?;

    let mut fsw = FilesystemWriter::default();
    fsw.set_block_size(opts.block_size);
    fsw.set_time(if opts.deterministic {
        0
    } else {
        clamp_time(now())
    });
    fsw.set_root_mode(root_meta.mode() as u16 & 0o7777);
    fsw.set_root_uid(root_meta.uid());
    fsw.set_root_gid(root_meta.gid());
    fsw.set_compressor(compressor(opts)?);

    let mut counts = (1u64, 0u64);
    let skip = (tmp_meta.dev(), tmp_meta.ino());
    add_tree(&mut fsw, src, Path::new(""), skip, &mut counts)?;

    let offset = first_partition_offset(sif::DEFAULT_DESCRIPTORS);
    let file = tmp.as_file();
    let mut w = BufWriter::with_capacity(1 << 20, file);
    fsw.write_with_offset(&mut w, offset)
        .map_err(|e| write_err(format!("writing squashfs: {e}")))?;
    let mut file = w
        .into_inner()
        .map_err(|e| write_err(e.error().to_string()))?;
    let end = file
        .seek(SeekFrom::End(0))
        .map_err(|e| write_err(e.to_string()))?;
    let size = end - offset;

    let sif_opts = if opts.deterministic {
        WriteOptions::deterministic()
    } else {
        WriteOptions::now()
    };
    let objects = vec![NewObject {
        data_type: DataType::Partition,
        name: "rootfs.squashfs".to_owned(),
        extra: sif::partition_extra(FsType::Squash, PartType::PrimSys, opts.arch),
        group: Some(1),
        linked_id: 0,
        data: ObjectData::AlreadyWritten(size),
    }];
    let written =
        sif::write(&mut file, &sif_opts, objects).map_err(|e| write_err(e.to_string()))?;
    if written.descriptors.first().map(|d| d.offset) != Some(offset as i64) {
        return Err(write_err(
            "internal error: the SIF layout moved the partition".to_owned(),
        ));
    }
    file.sync_all().map_err(|e| write_err(e.to_string()))?;
    // Like `apptainer build`: the launch script makes `./image.sif` runnable.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))
        .map_err(|e| write_err(e.to_string()))?;
    tmp.persist(out)
        .map_err(|e| write_err(e.error.to_string()))?;
    Ok(PackReport {
        output: out.to_owned(),
        squashfs_offset: offset,
        squashfs_size: size,
        entries: counts.0,
        file_bytes: counts.1,
    })
}

/// Offset of the first partition in a SIF file with `slots` descriptors: the data start,
/// aligned to 4096.
pub fn first_partition_offset(slots: u32) -> u64 {
    let data = sif::DESCRIPTORS_OFFSET + u64::from(slots) * sif::DESCRIPTOR_LEN;
    data.div_ceil(sif::PARTITION_ALIGN) * sif::PARTITION_ALIGN
}

fn compressor(opts: &PackOptions) -> Result<FilesystemCompressor, PackError> {
    let level = opts.level.unwrap_or(opts.compression.default_level());
    let bad = |what: &str| PackError::Option(format!("--level {level}: {what}"));
    let (id, options) = match opts.compression {
        Compression::Zstd => {
            if !(1..=22).contains(&level) {
                return Err(bad("zstd levels are 1 to 22"));
            }
            (
                Compressor::Zstd,
                Some(CompressionOptions::Zstd(Zstd {
                    compression_level: level,
                })),
            )
        }
        Compression::Gzip => {
            if !(1..=9).contains(&level) {
                return Err(bad("gzip levels are 1 to 9"));
            }
            (
                Compressor::Gzip,
                Some(CompressionOptions::Gzip(Gzip {
                    compression_level: level,
                    window_size: 15,
                    strategies: 0,
                })),
            )
        }
        Compression::Xz => (Compressor::Xz, None),
        Compression::Lz4 => (
            Compressor::Lz4,
            Some(CompressionOptions::Lz4(Lz4 {
                version: 1,
                flags: 0,
            })),
        ),
    };
    let mut c = FilesystemCompressor::new(id, options)
        .map_err(|e| PackError::Option(format!("compression: {e}")))?;
    if opts.compression == Compression::Xz {
        let mut extra = ExtraXz::default();
        extra
            .level(level)
            .map_err(|_| bad("xz levels are 0 to 9"))?;
        c.extra(CompressionExtra::Xz(extra))
            .map_err(|e| PackError::Option(format!("compression: {e}")))?;
    }
    Ok(c)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Squashfs times are unsigned 32-bit seconds.
fn clamp_time(t: u64) -> u32 {
    u32::try_from(t).unwrap_or(u32::MAX)
}

fn header(m: &fs::Metadata) -> NodeHeader {
    NodeHeader::new(
        m.mode() as u16 & 0o7777,
        m.uid(),
        m.gid(),
        clamp_time(m.mtime().max(0) as u64),
    )
}

/// Linux `new_encode_dev`, the device number layout squashfs stores.
fn encode_dev(rdev: u64) -> u32 {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    ((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)) as u32
}

/// Adds the entries of the host directory `dir` (image path `rel`) to `fsw`, depth first.
fn add_tree(
    fsw: &mut FilesystemWriter<'_, '_, '_>,
    dir: &Path,
    rel: &Path,
    skip: (u64, u64),
    counts: &mut (u64, u64),
) -> Result<(), PackError> {
    let read_err = |path: &Path, error: io::Error| PackError::Read {
        path: path.to_owned(),
        error,
    };
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| read_err(dir, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let host = entry.path();
        let image = rel.join(entry.file_name());
        let m = fs::symlink_metadata(&host).map_err(|e| read_err(&host, e))?;
        if (m.dev(), m.ino()) == skip {
            continue;
        }
        let h = header(&m);
        let ft = m.file_type();
        let added = if ft.is_dir() {
            fsw.push_dir(&image, h)
        } else if ft.is_file() {
            // Open now, so an unreadable file is reported by name here rather than as a bare
            // I/O error in the middle of the write.
            File::open(&host).map_err(|e| read_err(&host, e))?;
            counts.1 += m.len();
            fsw.push_file_from_path(&host, &image, h)
        } else if ft.is_symlink() {
            let target = fs::read_link(&host).map_err(|e| read_err(&host, e))?;
            fsw.push_symlink(target, &image, h)
        } else if ft.is_char_device() {
            fsw.push_char_device(encode_dev(m.rdev()), &image, h)
        } else if ft.is_block_device() {
            fsw.push_block_device(encode_dev(m.rdev()), &image, h)
        } else if ft.is_fifo() {
            fsw.push_fifo(&image, h)
        } else {
            fsw.push_socket(&image, h)
        };
        added.map_err(|e| read_err(&host, io::Error::other(e.to_string())))?;
        counts.0 += 1;
        if ft.is_dir() {
            add_tree(fsw, &host, &image, skip, counts)?;
        }
    }
    Ok(())
}
