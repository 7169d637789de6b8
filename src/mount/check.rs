//! Checks of a mounted image against the image itself, for tests and the mount benchmark
//! (`cmpirun __mount-check`).

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use backhand::{FilesystemReader, InnerNode};

use super::{MountError, SquashfsSource};

/// What a walk over a mounted image saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// Entries visited (directories, files, links, others).
    pub entries: u64,
    /// Regular files read to the end.
    pub files: u64,
    /// Bytes read from regular files.
    pub bytes: u64,
    /// Wall time of the walk, in seconds.
    pub seconds: f64,
    /// Differences from the image, one line each (empty when the mount is faithful).
    pub problems: Vec<String>,
}

/// Enters a new user and mount namespace as the same uid/gid (identity maps,
/// `setgroups=deny`) and makes every mount private, as a node instance does before mounting
/// ([`crate::sys::userns::enter_user_namespace`]). The caller must be single-threaded.
pub fn enter_private_namespaces() -> Result<(), MountError> {
    crate::sys::userns::enter_user_namespace()
        .map_err(|e| MountError::io("enter a user and mount namespace", std::io::Error::other(e)))
}

/// Walks the tree at `root` and reads every regular file. With `verify`, also compares each
/// entry (kind, permissions, size, link target, contents, directory listings) with the image
/// `src` as backhand reads it, which shares no data path with the built-in server.
pub fn check_mounted_tree(
    src: &SquashfsSource,
    root: &Path,
    verify: bool,
) -> Result<CheckReport, MountError> {
    if verify {
        verify_tree(src, root)
    } else {
        let start = Instant::now();
        let mut report = CheckReport::default();
        let mut buf = vec![0u8; 1 << 20];
        read_tree(root, &mut report, &mut buf)?;
        report.seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }
}

fn read_tree(dir: &Path, report: &mut CheckReport, buf: &mut [u8]) -> Result<(), MountError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        // Directories another owner keeps private (0700 root) are part of a real image.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Ok(()),
        Err(e) => return Err(MountError::io(format!("list {}", dir.display()), e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| MountError::io(format!("list {}", dir.display()), e))?;
        let path = entry.path();
        let ft = entry
            .file_type()
            .map_err(|e| MountError::io(format!("stat {}", path.display()), e))?;
        report.entries += 1;
        if ft.is_dir() {
            read_tree(&path, report, buf)?;
        } else if ft.is_file() {
            match File::open(&path) {
                Ok(mut f) => loop {
                    match f.read(buf) {
                        Ok(0) => {
                            report.files += 1;
                            break;
                        }
                        Ok(n) => report.bytes += n as u64,
                        Err(e) => {
                            report
                                .problems
                                .push(format!("{}: read: {e}", path.display()));
                            break;
                        }
                    }
                },
                // Unreadable files (mode 0600 of another owner) are part of a real image.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
                Err(e) => report
                    .problems
                    .push(format!("{}: open: {e}", path.display())),
            }
        }
    }
    Ok(())
}

fn verify_tree(src: &SquashfsSource, root: &Path) -> Result<CheckReport, MountError> {
    let start = Instant::now();
    let file = File::open(&src.path)
        .map_err(|e| MountError::io(format!("open image {}", src.path.display()), e))?;
    let fs = FilesystemReader::from_reader_with_offset(BufReader::new(file), src.offset).map_err(
        |e| MountError::BadImage {
            path: src.path.clone(),
            offset: src.offset,
            reason: e.to_string(),
        },
    )?;
    let mut report = CheckReport::default();
    let mut children: HashMap<PathBuf, BTreeSet<OsString>> = HashMap::new();
    // Device nodes and sockets cannot be extracted without privileges; their absence is fine.
    let mut optional: BTreeSet<PathBuf> = BTreeSet::new();
    for node in fs.files() {
        if let (Some(parent), Some(name)) = (node.fullpath.parent(), node.fullpath.file_name()) {
            children
                .entry(parent.to_owned())
                .or_default()
                .insert(name.to_owned());
        }
        if matches!(
            node.inner,
            InnerNode::CharacterDevice(_) | InnerNode::BlockDevice(_) | InnerNode::Socket
        ) {
            optional.insert(node.fullpath.clone());
        }
    }
    let mut problems = Vec::new();
    let me = nix::unistd::getuid().as_raw();
    let mut skip_under: Vec<PathBuf> = Vec::new();
    for node in fs.files() {
        // A real image has entries another owner keeps private (mode 0700 root:root); being
        // refused those is right, not a difference.
        let private = node.header.uid != me && u32::from(node.header.permissions) & 0o004 == 0;
        report.entries += 1;
        let rel = node.fullpath.strip_prefix("/").unwrap_or(&node.fullpath);
        let path = root.join(rel);
        let shown = node.fullpath.display();
        if skip_under.iter().any(|d| node.fullpath.starts_with(d)) {
            continue;
        }
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && optional.contains(&node.fullpath) =>
            {
                continue;
            }
            Err(e) => {
                problems.push(format!("{shown}: {e}"));
                continue;
            }
        };
        let ft = meta.file_type();
        let want_perm = u32::from(node.header.permissions) & 0o7777;
        let perm = meta.permissions().mode() & 0o7777;
        if !ft.is_symlink() && perm != want_perm {
            problems.push(format!("{shown}: mode {perm:o}, image has {want_perm:o}"));
        }
        match &node.inner {
            InnerNode::Dir(_) => {
                if !ft.is_dir() {
                    problems.push(format!("{shown}: not a directory"));
                    continue;
                }
                let seen: BTreeSet<OsString> = match std::fs::read_dir(&path) {
                    Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect(),
                    Err(e) if private && e.kind() == std::io::ErrorKind::PermissionDenied => {
                        skip_under.push(node.fullpath.clone());
                        continue;
                    }
                    Err(e) => {
                        problems.push(format!("{shown}: list: {e}"));
                        continue;
                    }
                };
                let mut want = children.remove(&node.fullpath).unwrap_or_default();
                want.retain(|n| seen.contains(n) || !optional.contains(&node.fullpath.join(n)));
                if seen != want {
                    problems.push(format!("{shown}: lists {seen:?}, image has {want:?}"));
                }
            }
            InnerNode::File(f) => {
                if !ft.is_file() {
                    problems.push(format!("{shown}: not a regular file"));
                    continue;
                }
                if meta.len() != f.file_len() as u64 {
                    problems.push(format!(
                        "{shown}: size {}, image has {}",
                        meta.len(),
                        f.file_len()
                    ));
                    continue;
                }
                let mut expected = fs.file(f).reader();
                match compare_contents(&mut expected, &path) {
                    Ok(n) => {
                        report.files += 1;
                        report.bytes += n;
                    }
                    Err(e) if private && e.starts_with("open: Permission denied") => {}
                    Err(e) => problems.push(format!("{shown}: {e}")),
                }
            }
            InnerNode::Symlink(l) => match std::fs::read_link(&path) {
                Ok(t) if t == l.link => {}
                Ok(t) => problems.push(format!(
                    "{shown}: links to {}, image has {}",
                    t.display(),
                    l.link.display()
                )),
                Err(e) => problems.push(format!("{shown}: readlink: {e}")),
            },
            InnerNode::NamedPipe => {
                if !ft.is_fifo() {
                    problems.push(format!("{shown}: not a fifo"));
                }
            }
            InnerNode::CharacterDevice(_) | InnerNode::BlockDevice(_) | InnerNode::Socket => {}
        }
    }
    report.problems = problems;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Compares `expected` with the file at `path`, returning the byte count.
fn compare_contents(expected: &mut impl Read, path: &Path) -> Result<u64, String> {
    let mut got = File::open(path).map_err(|e| format!("open: {e}"))?;
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = read_full(expected, &mut a).map_err(|e| format!("reading the image: {e}"))?;
        let m = read_full(&mut got, &mut b).map_err(|e| format!("read: {e}"))?;
        if n != m || a[..n] != b[..m] {
            let at = a[..n.min(m)]
                .iter()
                .zip(&b[..n.min(m)])
                .position(|(x, y)| x != y)
                .unwrap_or(n.min(m));
            return Err(format!("contents differ at byte {}", total + at as u64));
        }
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
