//! Squashfs filesystems inside a file (a plain squashfs file or a SIF partition), read through
//! backhand without mounting anything.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use backhand::compression::Compressor;
use backhand::kind::{Kind, LE_V4_0};
use backhand::{FilesystemReader, InnerNode, Node, Squashfs, SquashfsFileReader};

use super::ImageError;
use super::rootfs::{NodeKind, NodeMeta, RootFs};

/// The squashfs magic, `hsqs`, at byte 0 of the superblock.
pub const MAGIC: [u8; 4] = *b"hsqs";

/// Facts from a squashfs superblock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SquashfsInfo {
    /// Byte offset of the superblock in the file.
    pub offset: u64,
    /// Bytes the filesystem uses (`bytes_used`).
    pub bytes_used: u64,
    /// Compression (`gzip`, `xz`, `zstd`, `lz4`, `lzo`, `lzma`).
    pub compression: String,
    /// Data block size in bytes.
    pub block_size: u32,
    /// Format version, `major.minor` (4.0).
    pub version: String,
    /// Number of inodes.
    pub inode_count: u32,
    /// Number of fragment entries.
    pub fragment_count: u32,
    /// Number of distinct uids/gids.
    pub id_count: u16,
    /// Creation time, Unix seconds.
    pub mod_time: u32,
}

/// Reads and checks the squashfs superblock at `offset` of `file`; `limit` is the number of bytes
/// the filesystem may use (the SIF partition size, or the file size).
pub fn superblock(path: &Path, offset: u64, limit: u64) -> Result<SquashfsInfo, ImageError> {
    let file = File::open(path).map_err(|e| ImageError::io(path, e))?;
    let mut r = BufReader::new(file);
    let bad = |reason: String| ImageError::BadSquashfs {
        path: path.to_owned(),
        offset,
        reason,
    };
    if limit < 96 {
        return Err(bad(format!(
            "{limit} bytes, shorter than a squashfs superblock (96 bytes)"
        )));
    }
    r.seek(SeekFrom::Start(offset))
        .map_err(|e| ImageError::io(path, e))?;
    let mut raw = [0u8; 96];
    r.read_exact(&mut raw)
        .map_err(|e| ImageError::io(path, e))?;
    if raw[0..4] != MAGIC {
        return Err(bad(format!(
            "no squashfs magic (found \"{}\", expected \"hsqs\")",
            raw[0..4].escape_ascii()
        )));
    }
    let major = u16::from_le_bytes([raw[28], raw[29]]);
    let minor = u16::from_le_bytes([raw[30], raw[31]]);
    if major != 4 {
        return Err(bad(format!(
            "squashfs version {major}.{minor} is not supported (only 4.0)"
        )));
    }
    let comp_id = u16::from_le_bytes([raw[20], raw[21]]);
    let compression = match comp_id {
        1 => "gzip",
        2 => "lzma",
        3 => "lzo",
        4 => "xz",
        5 => "lz4",
        6 => "zstd",
        other => return Err(bad(format!("unknown compression id {other}"))),
    };
    r.seek(SeekFrom::Start(offset))
        .map_err(|e| ImageError::io(path, e))?;
    let kind = Kind::from_const(LE_V4_0).map_err(bad)?;
    let (sb, _) = Squashfs::superblock_and_compression_options(&mut r, &kind)
        .map_err(|e| bad(e.to_string()))?;
    if sb.bytes_used > limit {
        return Err(bad(format!(
            "the superblock says the filesystem uses {} bytes, but only {limit} are there (truncated?)",
            sb.bytes_used
        )));
    }
    Ok(SquashfsInfo {
        offset,
        bytes_used: sb.bytes_used,
        compression: compression.to_owned(),
        block_size: sb.block_size,
        version: format!("{major}.{minor}"),
        inode_count: sb.inode_count,
        fragment_count: sb.frag_count,
        id_count: sb.id_count,
        mod_time: sb.mod_time,
    })
}

/// A file's `frag_index` when its tail is not in a fragment block.
const NO_FRAGMENT: usize = 0xffff_ffff;
/// How many decompressed blocks [`SquashfsRootFs`] keeps (at most 2 MiB with 128 KiB blocks):
/// enough that a library's first block, read when it is found, is usually still there when it
/// is parsed, and that its header, section headers and dynamic section are decompressed once
/// (the Open MPI image: 52 block reads for 45 distinct blocks, against 66 when 8 are kept).
const KEPT_BLOCKS: usize = 16;

/// A squashfs filesystem opened with backhand: the whole directory tree is in memory. File data
/// is read with `pread` and decompressed here, one block at a time, only for the blocks a read
/// covers (backhand's own file reader decompresses several blocks ahead on rayon threads).
pub struct SquashfsRootFs {
    path: PathBuf,
    file: File,
    offset: u64,
    compressor: Compressor,
    fs: FilesystemReader<'static>,
    /// The last decompressed blocks and fragment blocks, by position, most recent last.
    blocks: Mutex<Vec<(u64, Arc<[u8]>)>>,
}

impl std::fmt::Debug for SquashfsRootFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SquashfsRootFs")
            .field("path", &self.path)
            .field("nodes", &self.fs.root.nodes.len())
            .finish()
    }
}

impl SquashfsRootFs {
    /// Opens the squashfs at `offset` of `path`.
    pub fn open(path: &Path, offset: u64) -> Result<Self, ImageError> {
        let file = File::open(path).map_err(|e| ImageError::io(path, e))?;
        let reader = file.try_clone().map_err(|e| ImageError::io(path, e))?;
        let bad = |e: backhand::BackhandError| ImageError::BadSquashfs {
            path: path.to_owned(),
            offset,
            reason: e.to_string(),
        };
        let squashfs =
            Squashfs::from_reader_with_offset(BufReader::new(reader), offset).map_err(bad)?;
        let compressor = squashfs.superblock.compressor;
        let fs = squashfs.into_filesystem_reader().map_err(bad)?;
        Ok(SquashfsRootFs {
            path: path.to_owned(),
            file,
            offset,
            compressor,
            fs,
            blocks: Mutex::new(Vec::new()),
        })
    }

    /// The backhand reader, for callers that walk the whole tree.
    pub fn reader(&self) -> &FilesystemReader<'static> {
        &self.fs
    }

    fn node(&self, path: &str) -> io::Result<Option<&Node<SquashfsFileReader>>> {
        let key = normalize(path)?;
        Ok(self
            .fs
            .root
            .nodes
            .binary_search_by(|n| path_order(&n.fullpath, &key))
            .ok()
            .map(|i| &self.fs.root.nodes[i]))
    }

    /// Up to `len` bytes of `f` from `offset`, decompressing only the blocks they are in.
    fn read_range(&self, f: &SquashfsFileReader, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let size = f.file_len() as u64;
        if offset >= size {
            return Ok(Vec::new());
        }
        let end = size.min(offset.saturating_add(len as u64));
        // The size comes from the image: reserve no more than 64 MiB up front on its word.
        let mut out = Vec::with_capacity(((end - offset) as usize).min(1 << 26));
        let bs = u64::from(self.fs.block_size);
        let sizes = f.block_sizes();
        let mut pos = offset;
        while pos < end {
            let index = usize::try_from(pos / bs).map_err(|_| corrupt("file too large"))?;
            let within = (pos % bs) as usize;
            let want = ((end - pos) as usize).min(bs as usize - within);
            let (block, from) = if let Some(ds) = sizes.get(index) {
                if ds.size() == 0 {
                    // A hole: zeros, nothing stored.
                    out.resize(out.len() + want, 0);
                    pos += want as u64;
                    continue;
                }
                let start = f.blocks_start()
                    + sizes[..index]
                        .iter()
                        .map(|d| u64::from(d.size()))
                        .sum::<u64>();
                (self.block(start, ds.size(), ds.uncompressed())?, within)
            } else {
                let frag = f.frag_index();
                let fragment = (frag != NO_FRAGMENT)
                    .then(|| self.fs.fragments.as_ref()?.get(frag))
                    .flatten()
                    .ok_or_else(|| corrupt("file data ends before its size"))?;
                let block = self.block(
                    fragment.start,
                    fragment.size.size(),
                    fragment.size.uncompressed(),
                )?;
                (block, f.block_offset() as usize + within)
            };
            let part = block
                .get(from..from + want)
                .ok_or_else(|| corrupt("block shorter than the file says"))?;
            out.extend_from_slice(part);
            pos += want as u64;
        }
        Ok(out)
    }

    /// The decompressed block stored at `start` (relative to the superblock) in `size` bytes.
    fn block(&self, start: u64, size: u32, uncompressed: bool) -> io::Result<Arc<[u8]>> {
        let mut kept = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = kept.iter().position(|(at, _)| *at == start) {
            let hit = kept.remove(i);
            let data = Arc::clone(&hit.1);
            kept.push(hit);
            return Ok(data);
        }
        if size > self.fs.block_size {
            return Err(corrupt("block larger than the block size"));
        }
        tracing::trace!(start, size, "squashfs block read for image facts");
        let mut raw = vec![0u8; size as usize];
        self.file.read_exact_at(&mut raw, self.offset + start)?;
        let data: Arc<[u8]> = if uncompressed {
            raw.into()
        } else {
            let mut out = Vec::with_capacity(self.fs.block_size as usize);
            // This thread's decompression context: creating one per block cost about a third
            // of an image's first `--dry-run`.
            crate::mount::decompress_block(&raw, &mut out, self.compressor)?;
            if out.len() > self.fs.block_size as usize {
                return Err(corrupt("block decompresses past the block size"));
            }
            out.into()
        };
        if kept.len() >= KEPT_BLOCKS {
            kept.remove(0);
        }
        kept.push((start, Arc::clone(&data)));
        Ok(data)
    }

    fn existing(&self, path: &str) -> io::Result<&Node<SquashfsFileReader>> {
        self.node(path)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{path}: no such file in {}", self.path.display()),
            )
        })
    }
}

/// The order of `Path::cmp` (component by component) for normalised absolute paths, computed on
/// the bytes: with `/` counted below every other byte, comparing the bytes compares the
/// components. `Path::cmp` splits both paths into components on every call, which made lookups
/// a good part of reading an image's facts.
fn path_order(a: &Path, b: &Path) -> std::cmp::Ordering {
    use std::os::unix::ffi::OsStrExt;
    let rank = |c: &u8| if *c == b'/' { 0 } else { u16::from(*c) + 1 };
    a.as_os_str()
        .as_bytes()
        .iter()
        .map(rank)
        .cmp(b.as_os_str().as_bytes().iter().map(rank))
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt squashfs: {what}"),
    )
}

/// `path` as backhand keys its nodes: absolute, no `.`/`..`/empty components.
fn normalize(path: &str) -> io::Result<PathBuf> {
    let mut out = PathBuf::from("/");
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{path}: image paths must not contain '..'"),
                ));
            }
        }
    }
    Ok(out)
}

impl RootFs for SquashfsRootFs {
    fn metadata(&self, path: &str) -> io::Result<Option<NodeMeta>> {
        Ok(self.node(path)?.map(|n| {
            let (kind, size) = match &n.inner {
                InnerNode::File(f) => (NodeKind::File, f.file_len() as u64),
                InnerNode::Dir(_) => (NodeKind::Dir, 0),
                InnerNode::Symlink(_) => (NodeKind::Symlink, 0),
                _ => (NodeKind::Other, 0),
            };
            NodeMeta {
                kind,
                mode: u32::from(n.header.permissions) & 0o7777,
                size,
            }
        }))
    }

    fn read_link(&self, path: &str) -> io::Result<String> {
        match &self.existing(path)?.inner {
            InnerNode::Symlink(s) => Ok(s.link.to_string_lossy().into_owned()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path}: not a symbolic link"),
            )),
        }
    }

    fn read_file(&self, path: &str) -> io::Result<Vec<u8>> {
        self.read_at(path, 0, usize::MAX)
    }

    fn read_at(&self, path: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        match &self.existing(path)?.inner {
            InnerNode::File(f) => self
                .read_range(f, offset, len)
                .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}"))),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path}: not a regular file"),
            )),
        }
    }

    fn list_dir(&self, path: &str) -> io::Result<Vec<String>> {
        let key = normalize(path)?;
        let nodes = &self.fs.root.nodes;
        let Ok(i) = nodes.binary_search_by(|n| path_order(&n.fullpath, &key)) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{path}: no such directory in {}", self.path.display()),
            ));
        };
        if !matches!(nodes[i].inner, InnerNode::Dir(_)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path}: not a directory"),
            ));
        }
        // Nodes are sorted by path, so a directory's descendants follow it contiguously.
        let mut names: Vec<String> = nodes[i + 1..]
            .iter()
            .take_while(|n| n.fullpath.starts_with(&key))
            .filter(|n| n.fullpath.parent() == Some(key.as_path()))
            .filter_map(|n| n.fullpath.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::path_order;
    use std::path::Path;

    #[test]
    fn byte_order_is_path_order() {
        let paths = [
            "/",
            "/a",
            "/a-b",
            "/a/b",
            "/a/b/c",
            "/a.b",
            "/a0",
            "/ab",
            "/b",
            "/a/bc",
            "/a/b-c",
            "/\u{e9}t\u{e9}",
            "/usr/lib",
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib64",
            "/usr/lib.d",
        ];
        for a in paths {
            for b in paths {
                let (a, b) = (Path::new(a), Path::new(b));
                assert_eq!(
                    path_order(a, b),
                    a.cmp(b),
                    "{} vs {}",
                    a.display(),
                    b.display()
                );
            }
        }
    }
}
