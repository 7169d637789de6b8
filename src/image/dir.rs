//! An unpacked image directory read as a [`RootFs`].
//!
//! Symlinks inside the image are never followed on the host: a link such as `/lib -> /usr/lib`
//! would otherwise resolve against the host's root, not the image's. Paths whose intermediate
//! components are symlinks are reported as absent, exactly as in a squashfs image; callers resolve
//! links inside the image with [`super::rootfs::resolve`] first.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use super::rootfs::{NodeKind, NodeMeta, RootFs};

/// An unpacked root directory.
#[derive(Debug, Clone)]
pub struct DirRootFs {
    root: PathBuf,
}

impl DirRootFs {
    /// A view of the directory `root`.
    pub fn new(root: &Path) -> Self {
        DirRootFs {
            root: root.to_owned(),
        }
    }

    /// The host path of `path` inside the image, or `None` when a component is missing or an
    /// intermediate component is not a real directory (a symlink is not followed).
    fn host_path(&self, path: &str) -> io::Result<Option<PathBuf>> {
        let mut comps = Vec::new();
        for c in Path::new(path).components() {
            match c {
                Component::Normal(n) => comps.push(n),
                Component::RootDir | Component::CurDir => {}
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{path}: image paths must not contain '..'"),
                    ));
                }
            }
        }
        let mut host = self.root.clone();
        for (i, c) in comps.iter().enumerate() {
            host.push(c);
            if i + 1 < comps.len() {
                match fs::symlink_metadata(&host) {
                    Ok(m) if m.file_type().is_dir() => {}
                    Ok(_) => return Ok(None),
                    Err(e) if is_absent(&e) => return Ok(None),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(Some(host))
    }

    /// Opens the regular file at `path` without following a final symlink.
    fn open_regular(&self, path: &str) -> io::Result<File> {
        let host = self.existing(path)?;
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&host)?;
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path}: not a regular file"),
            ));
        }
        Ok(f)
    }

    fn existing(&self, path: &str) -> io::Result<PathBuf> {
        self.host_path(path)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{path}: no such file in {}", self.root.display()),
            )
        })
    }
}

fn is_absent(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

impl RootFs for DirRootFs {
    fn metadata(&self, path: &str) -> io::Result<Option<NodeMeta>> {
        let Some(host) = self.host_path(path)? else {
            return Ok(None);
        };
        let m = match fs::symlink_metadata(&host) {
            Ok(m) => m,
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let ft = m.file_type();
        let (kind, size) = if ft.is_file() {
            (NodeKind::File, m.len())
        } else if ft.is_dir() {
            (NodeKind::Dir, 0)
        } else if ft.is_symlink() {
            (NodeKind::Symlink, 0)
        } else {
            (NodeKind::Other, 0)
        };
        Ok(Some(NodeMeta {
            kind,
            mode: m.mode() & 0o7777,
            size,
        }))
    }

    fn read_link(&self, path: &str) -> io::Result<String> {
        let target = fs::read_link(self.existing(path)?)?;
        Ok(target.to_string_lossy().into_owned())
    }

    fn read_file(&self, path: &str) -> io::Result<Vec<u8>> {
        let mut f = self.open_regular(path)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn read_at(&self, path: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut f = self.open_regular(path)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = Vec::new();
        f.take(len as u64).read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn list_dir(&self, path: &str) -> io::Result<Vec<String>> {
        let host = self.existing(path)?;
        if !fs::symlink_metadata(&host)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path}: not a directory"),
            ));
        }
        let mut names = Vec::new();
        for entry in fs::read_dir(&host)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }
}
