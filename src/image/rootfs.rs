//! Read-only access to an image's root filesystem without mounting it.
//!
//! Both a squashfs partition (read through backhand at its offset inside a SIF) and an unpacked
//! directory implement [`RootFs`], so image facts are computed the same way for either.

use std::io;

/// What kind of node a path names inside an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (not followed).
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

/// Metadata of one node inside an image (symlinks not followed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMeta {
    /// The kind of node.
    pub kind: NodeKind,
    /// Permission bits (the low 12 bits of `st_mode`).
    pub mode: u32,
    /// Size in bytes for files, 0 otherwise.
    pub size: u64,
}

/// A read-only view of an image's root filesystem.
///
/// Paths are absolute paths *inside the image* (`/usr/lib/libfabric.so.1`). Symlinks are never
/// followed by these methods; [`resolve`] follows them the way the kernel would inside the
/// container root, never escaping it.
pub trait RootFs {
    /// Metadata of `path`, or `Ok(None)` if it does not exist.
    fn metadata(&self, path: &str) -> io::Result<Option<NodeMeta>>;
    /// The target of the symlink at `path`.
    fn read_link(&self, path: &str) -> io::Result<String>;
    /// The whole contents of the regular file at `path`.
    fn read_file(&self, path: &str) -> io::Result<Vec<u8>>;
    /// Up to `len` bytes of the regular file at `path` from byte `offset` (fewer only at the end
    /// of the file). Reading the parts of a library the loader looks at this way costs a few
    /// blocks instead of the whole file.
    fn read_at(&self, path: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let all = self.read_file(path)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(all.len());
        let end = start.saturating_add(len).min(all.len());
        Ok(all[start..end].to_vec())
    }
    /// The names (not paths) of the entries of the directory at `path`, sorted.
    fn list_dir(&self, path: &str) -> io::Result<Vec<String>>;
}

/// One regular file inside a [`RootFs`] as a `Read + Seek` stream, read with
/// [`RootFs::read_at`]: wrapped in an `object::ReadCache`, the ELF parser reads only the parts of
/// a library it asks for.
pub struct RangedFile<'a> {
    fs: &'a dyn RootFs,
    path: String,
    size: u64,
    pos: u64,
}

impl<'a> RangedFile<'a> {
    /// The regular file at `path` (symlinks not followed) of `fs`.
    pub fn open(fs: &'a dyn RootFs, path: &str) -> io::Result<Self> {
        match fs.metadata(path)? {
            Some(meta) if meta.kind == NodeKind::File => Ok(RangedFile {
                fs,
                path: path.to_owned(),
                size: meta.size,
                pos: 0,
            }),
            Some(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path}: not a regular file"),
            )),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{path}: no such file"),
            )),
        }
    }
}

impl io::Read for RangedFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let data = self.fs.read_at(&self.path, self.pos, buf.len())?;
        buf[..data.len()].copy_from_slice(&data);
        self.pos += data.len() as u64;
        Ok(data.len())
    }
}

impl io::Seek for RangedFile<'_> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        let new = match pos {
            io::SeekFrom::Start(n) => Some(n),
            io::SeekFrom::End(d) => self.size.checked_add_signed(d),
            io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

/// Resolves `path` inside `fs` like the kernel would inside a chroot at the image root: symlinks
/// are followed (at most 40), `..` never climbs above `/`. Returns the resolved absolute path, or
/// `Ok(None)` if some component does not exist.
pub fn resolve(fs: &dyn RootFs, path: &str) -> io::Result<Option<String>> {
    let mut pending: Vec<String> = split(path).into_iter().rev().collect();
    let mut done: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(comp) = pending.pop() {
        match comp.as_str() {
            "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let candidate = join(&done, &comp);
        let Some(meta) = fs.metadata(&candidate)? else {
            return Ok(None);
        };
        if meta.kind == NodeKind::Symlink {
            links += 1;
            if links > 40 {
                return Err(io::Error::other(format!(
                    "too many levels of symbolic links resolving {path}"
                )));
            }
            let target = fs.read_link(&candidate)?;
            if target.starts_with('/') {
                done.clear();
            }
            for c in split(&target).into_iter().rev() {
                pending.push(c);
            }
        } else {
            done.push(comp);
        }
    }
    Ok(Some(join_all(&done)))
}

fn split(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

fn join(done: &[String], comp: &str) -> String {
    let mut s = join_all(done);
    if !s.ends_with('/') {
        s.push('/');
    }
    s.push_str(comp);
    s
}

fn join_all(done: &[String]) -> String {
    if done.is_empty() {
        "/".to_owned()
    } else {
        let mut s = String::new();
        for c in done {
            s.push('/');
            s.push_str(c);
        }
        s
    }
}
