//! `cmpirun image inspect`: what an image is made of and what a launch needs from it.
//!
//! The SIF header and object table carry the same facts as the reference tool's `siftool header`
//! and `siftool list`, and the text form prints them in the same layout, so the two can be
//! compared line by line.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::content::ImageFacts;
use super::sif::{self, Arch, Descriptor, Extra, Link, SifFile};
use super::squash::{self, SquashfsInfo};
use super::{ImageError, ImageKind, ImageLocation};

/// Everything `image inspect` reports. Serialised as the `--json` output; field names are stable.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageReport {
    /// The image path, absolute.
    pub path: PathBuf,
    /// What kind of image it is.
    pub kind: ImageKind,
    /// The SIF header and objects (SIF images only).
    pub sif: Option<SifReport>,
    /// The root filesystem, when it could be found.
    pub root_filesystem: Option<RootFsReport>,
    /// Why the image cannot be launched on this host, if it cannot.
    pub problem: Option<String>,
    /// What the image holds that a launch needs (MPI, libfabric, glibc, environment).
    pub facts: Option<ImageFacts>,
}

/// The SIF global header and object table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SifReport {
    /// The launch script (`#!/usr/bin/env run-singularity`), without its newline.
    pub launch_script: String,
    /// Format version (`01`).
    pub version: String,
    /// Architecture of the primary partition as the header records it (`amd64`, `unknown`).
    pub primary_arch: Arch,
    /// Image UUID.
    pub id: String,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Modification time, Unix seconds.
    pub modified_at: i64,
    /// Unused descriptor slots.
    pub descriptors_free: i64,
    /// Descriptor slots.
    pub descriptors_total: i64,
    /// Offset of the descriptor table.
    pub descriptors_offset: i64,
    /// Size of the descriptor table in bytes.
    pub descriptors_size: i64,
    /// Where data starts.
    pub data_offset: i64,
    /// Bytes of data.
    pub data_size: i64,
    /// Used objects, in slot order.
    pub objects: Vec<ObjectReport>,
}

/// One SIF data object.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ObjectReport {
    /// Object ID.
    pub id: u32,
    /// Group number, `None` for no group.
    pub group: Option<u32>,
    /// Linked object ID, if linked to an object.
    pub linked_object: Option<u32>,
    /// Linked group number, if linked to a group.
    pub linked_group: Option<u32>,
    /// Data type (`FS`, `Signature`, `JSON.Generic`…).
    pub data_type: sif::DataType,
    /// The type column of `siftool list` (`FS (Squashfs/*System/amd64)`).
    pub type_label: String,
    /// Absolute offset in the file.
    pub offset: i64,
    /// Size in bytes.
    pub size: i64,
    /// Alignment padding before the object plus its size.
    pub size_with_padding: i64,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Modification time, Unix seconds.
    pub modified_at: i64,
    /// Object name.
    pub name: String,
    /// Partition filesystem type.
    pub fs_type: Option<sif::FsType>,
    /// Partition role.
    pub part_type: Option<sif::PartType>,
    /// Partition architecture.
    pub arch: Option<Arch>,
    /// Signature hash.
    pub hash_type: Option<sif::HashType>,
    /// Signing entity fingerprint, upper-case hex.
    pub entity: Option<String>,
    /// Cryptographic message format.
    pub format_type: Option<sif::FormatType>,
    /// Cryptographic message kind.
    pub message_type: Option<sif::MessageType>,
    /// SBOM format.
    pub sbom_format: Option<sif::SbomFormat>,
    /// OCI digest.
    pub digest: Option<String>,
}

/// The root filesystem: where it is and what its squashfs superblock says.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RootFsReport {
    /// The SIF object that holds it (SIF only).
    pub object_id: Option<u32>,
    /// Offset of the filesystem in the file.
    pub offset: u64,
    /// Size of the partition (or file) in bytes.
    pub size: u64,
    /// Architecture recorded in the SIF partition (SIF only).
    pub arch: Option<Arch>,
    /// Whether this host can run it (`false` only for a foreign architecture).
    pub runs_here: bool,
    /// The squashfs superblock (not for directories).
    pub squashfs: Option<SquashfsInfo>,
}

/// An inspection: the report, and the reason the image cannot be launched, if any.
#[derive(Debug)]
pub struct Inspection {
    /// What could be read.
    pub report: ImageReport,
    /// Where the root filesystem is, when it is usable here.
    pub location: Option<ImageLocation>,
    /// Why the image cannot be launched (also in `report.problem`). A foreign architecture is
    /// reported in the text but is not an error of the image.
    pub problem: Option<ImageError>,
}

/// Inspects the image at `path`. Fails only when nothing about it can be read (not an image, an
/// unreadable SIF header or descriptor table, a corrupt plain squashfs file); problems of the root
/// filesystem are returned inside the [`Inspection`] with everything that could be read.
pub fn inspect(path: &Path) -> Result<Inspection, ImageError> {
    let abs = std::path::absolute(path).map_err(|e| ImageError::io(path, e))?;
    let kind = super::identify(&abs)?;
    let mut report = ImageReport {
        path: abs.clone(),
        kind,
        sif: None,
        root_filesystem: None,
        problem: None,
        facts: None,
    };
    let mut problem = None;
    let mut location: Option<ImageLocation> = None;
    let mut readable: Option<ImageLocation> = None;
    match kind {
        ImageKind::Directory => {
            report.root_filesystem = Some(RootFsReport {
                object_id: None,
                offset: 0,
                size: 0,
                arch: None,
                runs_here: true,
                squashfs: None,
            });
            location = Some(ImageLocation {
                path: abs.clone(),
                kind,
                squashfs_offset: 0,
                squashfs_size: 0,
            });
            readable.clone_from(&location);
        }
        ImageKind::Squashfs => {
            let len = std::fs::metadata(&abs)
                .map_err(|e| ImageError::io(&abs, e))?
                .len();
            let info = squash::superblock(&abs, 0, len)?;
            report.root_filesystem = Some(RootFsReport {
                object_id: None,
                offset: 0,
                size: len,
                arch: None,
                runs_here: true,
                squashfs: Some(info),
            });
            location = Some(ImageLocation {
                path: abs.clone(),
                kind,
                squashfs_offset: 0,
                squashfs_size: len,
            });
            readable.clone_from(&location);
        }
        ImageKind::Sif => {
            let file = super::read_sif(&abs)?;
            report.sif = Some(sif_report(&file));
            match root_of_sif(&abs, &file) {
                Ok((root, loc)) => {
                    if root.runs_here {
                        location = Some(loc.clone());
                    }
                    // A foreign image cannot run here, but its files can still be read.
                    readable = Some(loc);
                    report.root_filesystem = Some(root);
                }
                Err(e) => problem = Some(e),
            }
        }
    }
    if let Some(loc) = &readable {
        match read_facts(loc) {
            Ok(facts) => report.facts = Some(facts),
            Err(e) => problem = Some(e),
        }
    }
    if let Some(root) = &report.root_filesystem
        && !root.runs_here
    {
        let arch = root.arch.unwrap_or(Arch::UNKNOWN);
        report.problem = Some(format!(
            "built for {arch}; this host ({}) cannot run it",
            Arch::host()
        ));
    }
    if let Some(e) = &problem {
        report.problem = Some(e.to_string());
    }
    Ok(Inspection {
        report,
        location,
        problem,
    })
}

/// Opens the root filesystem and reads the facts a launch needs.
fn read_facts(loc: &ImageLocation) -> Result<ImageFacts, ImageError> {
    let fs = super::open_rootfs(loc)?;
    super::content::image_facts(fs.as_ref()).map_err(|e| ImageError::Facts {
        path: loc.path.clone(),
        error: e.to_string(),
    })
}

fn root_of_sif(path: &Path, file: &SifFile) -> Result<(RootFsReport, ImageLocation), ImageError> {
    let part = super::primary_partition(path, file)?;
    // sif::read checked that every object lies inside the file, so both are non-negative.
    let (offset, size) = (part.offset as u64, part.size as u64);
    let info = squash::superblock(path, offset, size)?;
    let arch = part.partition().map_or(Arch::UNKNOWN, |(_, _, a)| a);
    Ok((
        RootFsReport {
            object_id: Some(part.id),
            offset,
            size,
            arch: Some(arch),
            runs_here: arch.runs_on(Arch::host()),
            squashfs: Some(info),
        },
        ImageLocation {
            path: path.to_owned(),
            kind: ImageKind::Sif,
            squashfs_offset: offset,
            squashfs_size: size,
        },
    ))
}

fn sif_report(file: &SifFile) -> SifReport {
    let h = &file.header;
    SifReport {
        launch_script: h.launch_script().trim_end_matches('\n').to_owned(),
        version: h.version(),
        primary_arch: h.arch,
        id: h.id_string(),
        created_at: h.created_at,
        modified_at: h.modified_at,
        descriptors_free: h.descriptors_free,
        descriptors_total: h.descriptors_total,
        descriptors_offset: h.descriptors_offset,
        descriptors_size: h.descriptors_size,
        data_offset: h.data_offset,
        data_size: h.data_size,
        objects: file.descriptors.iter().map(object_report).collect(),
    }
}

fn object_report(d: &Descriptor) -> ObjectReport {
    let mut o = ObjectReport {
        id: d.id,
        group: d.group(),
        linked_object: None,
        linked_group: None,
        data_type: d.data_type,
        type_label: d.type_label(),
        offset: d.offset,
        size: d.size,
        size_with_padding: d.size_with_padding,
        created_at: d.created_at,
        modified_at: d.modified_at,
        name: d.name(),
        fs_type: None,
        part_type: None,
        arch: None,
        hash_type: None,
        entity: None,
        format_type: None,
        message_type: None,
        sbom_format: None,
        digest: None,
    };
    match d.link() {
        Link::None => {}
        Link::Object(id) => o.linked_object = Some(id),
        Link::Group(g) => o.linked_group = Some(g),
    }
    match d.decoded_extra() {
        Extra::Partition {
            fs_type,
            part_type,
            arch,
        } => {
            o.fs_type = Some(fs_type);
            o.part_type = Some(part_type);
            o.arch = Some(arch);
        }
        Extra::Signature { hash_type, entity } => {
            o.hash_type = Some(hash_type);
            if entity.iter().any(|&b| b != 0) {
                o.entity = Some(entity.iter().map(|b| format!("{b:02X}")).collect());
            }
        }
        Extra::CryptoMessage {
            format_type,
            message_type,
        } => {
            o.format_type = Some(format_type);
            o.message_type = Some(message_type);
        }
        Extra::Sbom { format } => o.sbom_format = Some(format),
        Extra::Digest(digest) => o.digest = Some(digest),
        Extra::None => {}
    }
    o
}

/// Renders `rows` as `label:` + padding + value, aligned like Go's tabwriter in `siftool`.
fn aligned(out: &mut String, rows: &[(&str, String)], indent: &str) {
    let width = rows.iter().map(|(l, _)| l.len() + 1).max().unwrap_or(0) + 1;
    for (label, value) in rows {
        let cell = format!("{label}:");
        let _ = writeln!(out, "{indent}{cell:<width$}{value}");
    }
}

/// The `siftool header` block.
pub fn render_header(s: &SifReport) -> String {
    let mut rows = Vec::new();
    if !s.launch_script.is_empty() {
        rows.push(("Launch Script", s.launch_script.clone()));
    }
    rows.push(("Version", s.version.clone()));
    if s.primary_arch.name() != "unknown" {
        rows.push(("Primary Architecture", s.primary_arch.name().to_owned()));
    }
    if s.id != sif::uuid_string(&[0; 16]) {
        rows.push(("ID", s.id.clone()));
    }
    if s.created_at != sif::GO_ZERO_TIME {
        rows.push(("Created At", sif::format_time(s.created_at)));
    }
    if s.modified_at != sif::GO_ZERO_TIME {
        rows.push(("Modified At", sif::format_time(s.modified_at)));
    }
    rows.push(("Descriptors Free", s.descriptors_free.to_string()));
    rows.push(("Descriptors Total", s.descriptors_total.to_string()));
    rows.push(("Descriptors Offset", s.descriptors_offset.to_string()));
    rows.push((
        "Descriptors Size",
        sif::human_size(s.descriptors_size.max(0) as u64),
    ));
    rows.push(("Data Offset", s.data_offset.to_string()));
    rows.push(("Data Size", sif::human_size(s.data_size.max(0) as u64)));
    let mut out = String::new();
    aligned(&mut out, &rows, "");
    out
}

/// The `siftool list` block.
pub fn render_list(s: &SifReport) -> String {
    let rule = "-".repeat(78);
    let mut out = format!(
        "{rule}\n{:<4} |{:<7} |{:<7} |{:<25} |TYPE\n{rule}\n",
        "ID", "GROUP", "LINK", "SIF POSITION (start-end)"
    );
    for o in &s.objects {
        let group = o.group.map_or("NONE".to_owned(), |g| g.to_string());
        let link = match (o.linked_object, o.linked_group) {
            (Some(id), _) => id.to_string(),
            (_, Some(g)) => format!("{g:<3} (G)"),
            _ => "NONE".to_owned(),
        };
        let position = format!("{}-{}", o.offset, o.offset.saturating_add(o.size));
        let _ = writeln!(
            out,
            "{:<4} |{group:<7} |{link:<7} |{position:<25} |{}",
            o.id, o.type_label
        );
    }
    out
}

/// The whole text report.
pub fn render_text(r: &ImageReport) -> String {
    let mut out = String::new();
    let kind = match r.kind {
        ImageKind::Sif => "SIF",
        ImageKind::Squashfs => "squashfs file",
        ImageKind::Directory => "directory",
    };
    let _ = writeln!(out, "Image: {} ({kind})\n", r.path.display());
    if let Some(s) = &r.sif {
        out.push_str(&render_header(s));
        out.push('\n');
        out.push_str(&render_list(s));
        out.push('\n');
    }
    if let Some(root) = r
        .root_filesystem
        .as_ref()
        .filter(|_| r.kind != ImageKind::Directory)
    {
        let title = match root.object_id {
            Some(id) => format!("Root filesystem (object {id}):"),
            None => "Root filesystem:".to_owned(),
        };
        let _ = writeln!(out, "{title}");
        let mut rows = vec![
            ("Offset", root.offset.to_string()),
            (
                "Size",
                format!("{} ({})", root.size, sif::human_size(root.size)),
            ),
        ];
        if let Some(arch) = root.arch {
            let note = if root.runs_here {
                String::new()
            } else {
                format!(" (this host is {}: cannot run here)", Arch::host())
            };
            rows.push(("Architecture", format!("{arch}{note}")));
        }
        if let Some(sq) = &root.squashfs {
            rows.push(("Squashfs Version", sq.version.clone()));
            rows.push(("Compression", sq.compression.clone()));
            rows.push((
                "Block Size",
                format!(
                    "{} ({})",
                    sq.block_size,
                    sif::human_size(u64::from(sq.block_size))
                ),
            ));
            rows.push(("Inodes", sq.inode_count.to_string()));
            rows.push(("Bytes Used", sq.bytes_used.to_string()));
        }
        aligned(&mut out, &rows, "  ");
        out.push('\n');
    }
    if let Some(p) = &r.problem {
        let _ = writeln!(out, "Cannot launch: {p}\n");
    }
    if let Some(facts) = &r.facts {
        let _ = writeln!(out, "Image facts:");
        for line in facts.to_string().lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}
