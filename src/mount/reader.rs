//! A read-only squashfs index for serving and extracting images.
//!
//! backhand parses the superblock, id table, inode and directory tables; the tree is then built
//! straight from those tables (backhand's own tree makes a path per node and sorts them all,
//! half the mount time of an image with many files) and kept in a compact table whose
//! positions are the inode numbers (root = 1, as FUSE wants). File data
//! is read with `pread` and decompressed here, behind a small LRU of decompressed blocks and
//! fragments, because backhand serialises all reads through one mutex and never evicts
//! fragments.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::BufReader;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use backhand::Squashfs;
use backhand::compression::{CompressionAction, Compressor, DefaultCompressor};

use super::{MountError, SquashfsSource};

/// A file's `frag_index` when its tail is not in a fragment block.
const NO_FRAGMENT: u32 = 0xffff_ffff;
/// A data size flag: the block is stored uncompressed.
const STORED_UNCOMPRESSED: u32 = 1 << 24;

/// What an entry is, with what is needed to serve it.
#[derive(Debug)]
pub(crate) enum EntryKind {
    /// A directory; children are entry indices sorted by name.
    Dir { children: Vec<u32> },
    /// A regular file.
    File(FileData),
    /// A symbolic link and its target.
    Symlink(OsString),
    /// A character device and its device number.
    CharDevice(u32),
    /// A block device and its device number.
    BlockDevice(u32),
    /// A named pipe.
    Fifo,
    /// A socket.
    Socket,
}

/// Where a regular file's bytes are.
#[derive(Debug)]
pub(crate) struct FileData {
    /// Size in bytes.
    pub size: u64,
    /// Offset of each whole block inside the squashfs, and its on-disk size word.
    blocks: Box<[(u64, u32)]>,
    /// Fragment index and offset inside the fragment block of the file's tail.
    fragment: Option<(u32, u32)>,
}

/// One file, directory or other node of the image.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The last path component ("" for the root).
    pub name: OsString,
    /// Index of the parent directory (the root is its own parent).
    pub parent: u32,
    /// Permission bits (`0o7777`).
    pub perm: u16,
    /// Owner uid as stored in the image.
    pub uid: u32,
    /// Owner gid as stored in the image.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u32,
    /// What it is.
    pub kind: EntryKind,
}

/// A squashfs image opened for random reads.
pub(crate) struct SquashImage {
    path: PathBuf,
    file: File,
    offset: u64,
    /// Size of a data block.
    pub block_size: u32,
    compressor: Compressor,
    fragments: Vec<(u64, u32)>,
    /// All entries; entry `i` has inode number `i + 1`.
    pub entries: Vec<Entry>,
    /// Bytes used by the squashfs.
    pub bytes_used: u64,
    cache: BlockCache,
}

impl std::fmt::Debug for SquashImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SquashImage")
            .field("path", &self.path)
            .field("offset", &self.offset)
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl SquashImage {
    /// Opens and indexes the squashfs `src`, keeping up to `cache_bytes` of decompressed data
    /// (but at least four blocks).
    pub(crate) fn open(src: &SquashfsSource, cache_bytes: usize) -> Result<Self, MountError> {
        let file = File::open(&src.path)
            .map_err(|e| MountError::io(format!("open image {}", src.path.display()), e))?;
        let bad = |reason: String| MountError::BadImage {
            path: src.path.clone(),
            offset: src.offset,
            reason,
        };
        let reader = file
            .try_clone()
            .map_err(|e| MountError::io(format!("open image {}", src.path.display()), e))?;
        // backhand is not hardened against every corrupt image; a panic in its parser must
        // become an error naming the file, not a crash of the node instance.
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut sq = Squashfs::from_reader_with_offset(BufReader::new(reader), src.offset)
                .map_err(|e| e.to_string())?;
            let entries = walk_tree(&sq)?;
            Ok::<_, String>((sq.superblock, sq.fragments.take(), entries))
        }))
        .map_err(|_| bad("the squashfs parser failed on it (corrupt image?)".into()))?
        .map_err(bad)?;
        let (sb, fragments, entries) = parsed;
        let compressor = sb.compressor;
        if !matches!(
            compressor,
            Compressor::Gzip | Compressor::Xz | Compressor::Zstd | Compressor::Lz4
        ) {
            return Err(bad(format!(
                "compression {compressor:?} is not supported (use gzip, xz, zstd or lz4)"
            )));
        }
        let block_size = sb.block_size;
        let fragments = fragments
            .unwrap_or_default()
            .into_iter()
            .map(|f| {
                (
                    f.start,
                    f.size.size() | (f.size.uncompressed() as u32 * STORED_UNCOMPRESSED),
                )
            })
            .collect();
        Ok(SquashImage {
            path: src.path.clone(),
            file,
            offset: src.offset,
            block_size,
            compressor,
            fragments,
            entries,
            bytes_used: sb.bytes_used,
            cache: BlockCache::new(cache_bytes.max(4 * block_size as usize)),
        })
    }

    /// The image file's descriptor (kept open by a server child that closes the rest).
    pub(crate) fn raw_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.file.as_raw_fd()
    }

    /// The image file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The entry with inode number `ino`.
    pub(crate) fn entry(&self, ino: u64) -> Option<&Entry> {
        let idx = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.entries.get(idx)
    }

    /// The child `name` of directory `parent` (inode numbers).
    pub(crate) fn lookup(&self, parent: u64, name: &OsStr) -> Option<u64> {
        let EntryKind::Dir { children } = &self.entry(parent)?.kind else {
            return None;
        };
        children
            .binary_search_by(|&c| {
                self.entries[c as usize]
                    .name
                    .as_bytes()
                    .cmp(name.as_bytes())
            })
            .ok()
            .map(|i| u64::from(children[i]) + 1)
    }

    /// The full path of entry `idx` inside the image (for messages and checks).
    pub(crate) fn path_of(&self, idx: usize) -> PathBuf {
        path_in(&self.entries, idx)
    }

    /// Reads up to `len` bytes of `file` from `offset` into `out` (cleared first).
    pub(crate) fn read(
        &self,
        file: &FileData,
        offset: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        out.clear();
        if offset >= file.size {
            return Ok(());
        }
        let end = file.size.min(offset.saturating_add(len as u64));
        out.reserve((end - offset) as usize);
        let bs = u64::from(self.block_size);
        let mut pos = offset;
        while pos < end {
            let index = pos / bs;
            let within = (pos % bs) as usize;
            let want = ((end - pos) as usize).min(bs as usize - within);
            if let Some(&(start, word)) =
                usize::try_from(index).ok().and_then(|i| file.blocks.get(i))
            {
                if word & !STORED_UNCOMPRESSED == 0 {
                    // A hole: all zeros, nothing stored.
                    out.resize(out.len() + want, 0);
                } else {
                    let block = self.block(start, word)?;
                    copy_part(&block, within, want, out)?;
                }
            } else {
                let Some((frag_index, frag_offset)) = file.fragment else {
                    return Err(corrupt("file data ends before its size"));
                };
                let &(start, word) = self
                    .fragments
                    .get(frag_index as usize)
                    .ok_or_else(|| corrupt("fragment index out of range"))?;
                let block = self.block(start, word)?;
                copy_part(&block, frag_offset as usize + within, want, out)?;
            }
            pos += want as u64;
        }
        Ok(())
    }

    /// One decompressed block or fragment block, from the cache or the image.
    fn block(&self, start: u64, word: u32) -> std::io::Result<Block> {
        if let Some(hit) = self.cache.get(start) {
            return Ok(hit);
        }
        let size = (word & !STORED_UNCOMPRESSED) as usize;
        if size > self.block_size as usize {
            return Err(corrupt("block larger than the block size"));
        }
        let mut out = Vec::with_capacity(self.block_size as usize);
        if word & STORED_UNCOMPRESSED != 0 {
            out.resize(size, 0);
            self.file.read_exact_at(&mut out, self.offset + start)?;
        } else {
            // The compressed bytes go to a buffer kept per thread: allocating and zeroing one
            // per block cost time and left freed blocks scattered over the heap.
            RAW.with(|cell| {
                let mut raw = cell.borrow_mut();
                raw.clear();
                raw.resize(size, 0);
                self.file.read_exact_at(&mut raw, self.offset + start)?;
                decompress(&raw, &mut out, self.compressor)
            })?;
            if out.len() > self.block_size as usize {
                return Err(corrupt("block decompresses past the block size"));
            }
        }
        let data: Block = Arc::new(out);
        self.cache.put(start, data.clone());
        Ok(data)
    }
}

/// Largest read the kernel's FUSE driver asks for at once.
const FUSE_READ: usize = 128 << 10;

/// Opens the squashfs `src` as the FUSE server does and reads what it would serve: every
/// entry, its path, its lookup by name in its directory, and up to `max_file_bytes` of each
/// file in FUSE-sized requests (a failed read ends that file, as the server answers `EIO` and
/// goes on). Returns the bytes read. For the fuzz target `squashfs_read` (docs/fuzzing.md).
pub fn read_through(src: &SquashfsSource, max_file_bytes: u64) -> Result<u64, MountError> {
    let image = SquashImage::open(src, 0)?;
    let mut total = 0u64;
    let mut buf = Vec::new();
    for (idx, entry) in image.entries.iter().enumerate() {
        let _ = image.path_of(idx);
        if idx > 0 {
            let _ = image.lookup(u64::from(entry.parent) + 1, &entry.name);
        }
        let EntryKind::File(file) = &entry.kind else {
            continue;
        };
        let mut offset = 0u64;
        while offset < file.size.min(max_file_bytes) {
            if image.read(file, offset, FUSE_READ, &mut buf).is_err() || buf.is_empty() {
                break;
            }
            offset += buf.len() as u64;
            total += buf.len() as u64;
        }
    }
    Ok(total)
}

/// A decompressed block, shared between the cache and the readers copying from it (a `Vec`
/// rather than `[u8]`, so that making it shareable does not copy it).
type Block = Arc<Vec<u8>>;

thread_local! {
    /// The compressed bytes of the block being read, per server thread (at most a block).
    static RAW: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A zstd context per server thread: creating one per block costs about half as much as
    /// decompressing the block.
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    /// The same for zlib (gzip images), reset between blocks.
    static ZLIB: std::cell::RefCell<Option<flate2::Decompress>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses one block into `out` (empty, with the block size as capacity), with this
/// thread's zstd or zlib context (the image facts' reader uses it too).
pub(crate) fn decompress(
    raw: &[u8],
    out: &mut Vec<u8>,
    compressor: Compressor,
) -> std::io::Result<()> {
    let fail = |e: &dyn std::fmt::Display| corrupt(&format!("decompressing a block: {e}"));
    if compressor == Compressor::Zstd {
        return ZSTD.with(|cell| {
            let mut slot = cell.borrow_mut();
            let ctx = match &mut *slot {
                Some(ctx) => ctx,
                None => slot.insert(zstd::bulk::Decompressor::new().map_err(|e| fail(&e))?),
            };
            ctx.decompress_to_buffer(raw, out)
                .map(drop)
                .map_err(|e| fail(&e))
        });
    }
    if compressor == Compressor::Gzip {
        return ZLIB.with(|cell| {
            let mut slot = cell.borrow_mut();
            let z = slot.get_or_insert_with(|| flate2::Decompress::new(true));
            z.reset(true);
            // Room past a full block, so a full block ends the stream rather than the buffer.
            out.reserve(64);
            match z.decompress_vec(raw, out, flate2::FlushDecompress::Finish) {
                Ok(flate2::Status::StreamEnd) => Ok(()),
                Ok(_) => Err(corrupt("a block decompresses past the block size")),
                Err(e) => Err(fail(&e)),
            }
        });
    }
    DefaultCompressor
        .decompress(raw, out, compressor)
        .map_err(|e| fail(&e))
}

fn copy_part(block: &[u8], from: usize, len: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
    let part = block
        .get(from..from + len)
        .ok_or_else(|| corrupt("block shorter than the file says"))?;
    out.extend_from_slice(part);
    Ok(())
}

fn corrupt(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("corrupt squashfs: {what}"),
    )
}

/// Builds the entry table from backhand's parsed tables: breadth first from the root, so a
/// directory always comes before what it holds, each directory's children sorted by name.
fn walk_tree(sq: &Squashfs<'_>) -> Result<Vec<Entry>, String> {
    let mut entries: Vec<Entry> = Vec::with_capacity(sq.inodes.len() + 1);
    entries.push(make_entry(sq, &sq.root_inode, OsString::new(), 0)?);
    if !matches!(entries[0].kind, EntryKind::Dir { .. }) {
        return Err("the root is not a directory".into());
    }
    let mut queue = std::collections::VecDeque::from([(0u32, &sq.root_inode)]);
    let mut visited = std::collections::HashSet::new();
    while let Some((idx, dir)) = queue.pop_front() {
        // A corrupt image can list a directory twice (or inside itself): never walk one again.
        if !visited.insert(dir.header.inode_number) {
            return Err(format!(
                "directory {} is listed more than once (corrupt image?)",
                path_in(&entries, idx as usize).display()
            ));
        }
        let mut children = Vec::new();
        for (name, key) in dir_listing(sq, dir).map_err(|e| {
            format!(
                "directory {}: {e}",
                path_in(&entries, idx as usize).display()
            )
        })? {
            let at = || path_in(&entries, idx as usize).join(OsStr::from_bytes(&name));
            // A name that could climb out of a directory must never reach an extraction.
            if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
                return Err(format!("entry {} has an invalid name", at().display()));
            }
            let inode = sq
                .inodes
                .get(&key)
                .ok_or_else(|| format!("entry {} names a missing inode {key}", at().display()))?;
            let child = u32::try_from(entries.len()).map_err(|_| "too many entries".to_string())?;
            let entry = make_entry(sq, inode, OsString::from_vec(name), idx)?;
            if matches!(entry.kind, EntryKind::Dir { .. }) {
                queue.push_back((child, inode));
            }
            entries.push(entry);
            children.push(child);
        }
        // Squashfs sorts directories by name, and lookups depend on it: make sure rather than
        // trust the image.
        let name = |c: &u32| entries[*c as usize].name.as_bytes();
        if !children.is_sorted_by(|a, b| name(a) <= name(b)) {
            children.sort_by(|a, b| name(a).cmp(name(b)));
        }
        if let EntryKind::Dir { children: slot } = &mut entries[idx as usize].kind {
            *slot = children;
        }
    }
    Ok(entries)
}

/// The path of entry `idx` of `entries` inside the image.
fn path_in(entries: &[Entry], idx: usize) -> PathBuf {
    let mut parts = Vec::new();
    let mut i = idx;
    while i != 0 {
        parts.push(entries[i].name.as_os_str());
        i = entries[i].parent as usize;
    }
    let mut p = PathBuf::from("/");
    for part in parts.iter().rev() {
        p.push(part);
    }
    p
}

/// One entry from its inode.
fn make_entry(
    sq: &Squashfs<'_>,
    inode: &backhand::Inode,
    name: OsString,
    parent: u32,
) -> Result<Entry, String> {
    use backhand::v4::inode::InodeInner as I;
    let header = backhand::NodeHeader::from_inode(inode.header, &sq.id)
        .map_err(|e| format!("inode {}: {e}", inode.header.inode_number))?;
    let kind = match &inode.inner {
        I::BasicDirectory(_) | I::ExtendedDirectory(_) => EntryKind::Dir {
            children: Vec::new(),
        },
        I::BasicFile(f) => EntryKind::File(file_data(
            u64::from(f.blocks_start),
            &f.block_sizes,
            f.frag_index,
            f.block_offset,
            u64::from(f.file_size),
        )),
        I::ExtendedFile(f) => EntryKind::File(file_data(
            f.blocks_start,
            &f.block_sizes,
            f.frag_index,
            f.block_offset,
            f.file_size,
        )),
        I::BasicSymlink(l) => EntryKind::Symlink(OsString::from_vec(l.target_path.clone())),
        I::ExtendedSymlink(l) => EntryKind::Symlink(OsString::from_vec(l.target_path.clone())),
        I::BasicCharacterDevice(d) => EntryKind::CharDevice(d.device_number),
        I::ExtendedCharacterDevice(d) => EntryKind::CharDevice(d.device_number),
        I::BasicBlockDevice(d) => EntryKind::BlockDevice(d.device_number),
        I::ExtendedBlockDevice(d) => EntryKind::BlockDevice(d.device_number),
        I::BasicNamedPipe(_) | I::ExtendedNamedPipe(_) => EntryKind::Fifo,
        I::BasicSocket(_) | I::ExtendedSocket(_) => EntryKind::Socket,
    };
    Ok(Entry {
        name,
        parent,
        perm: header.permissions & 0o7777,
        uid: header.uid,
        gid: header.gid,
        mtime: header.mtime,
        kind,
    })
}

/// The entries of directory `dir`: each name and the number of its inode. Read here from the
/// directory table backhand decompressed (its own reader of it is private). The layout, little
/// endian: a header (entry count - 1, start of the inodes' metadata block, base inode number:
/// three u32) followed by its entries (offset in that block: u16, inode number - base: i16,
/// type: u16, name length - 1: u16, the name), repeated until the listing's size.
fn dir_listing(sq: &Squashfs<'_>, dir: &backhand::Inode) -> Result<Vec<(Vec<u8>, u32)>, String> {
    use backhand::v4::inode::InodeInner as I;
    let (block_index, file_size, block_offset) = match &dir.inner {
        I::BasicDirectory(d) => (
            u64::from(d.block_index),
            u32::from(d.file_size),
            usize::from(d.block_offset),
        ),
        I::ExtendedDirectory(d) => (
            u64::from(d.block_index),
            d.file_size,
            usize::from(d.block_offset),
        ),
        _ => return Err("not a directory".into()),
    };
    // The size counts 3 bytes for the "." and ".." entries that are not stored.
    if file_size < 4 {
        return Ok(Vec::new());
    }
    let truncated = || "directory table entry out of range (corrupt image?)".to_string();
    let start = *sq.dir_blocks.0.get(&block_index).ok_or_else(truncated)? as usize;
    let bytes = sq
        .dir_blocks
        .1
        .get(start..)
        .and_then(|b| b.get(block_offset..))
        .and_then(|b| b.get(..file_size as usize - 3))
        .ok_or_else(truncated)?;
    let u16_at = |p: usize| {
        bytes
            .get(p..p + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |p: usize| {
        bytes
            .get(p..p + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 12 <= bytes.len() {
        let count = u32_at(pos).ok_or_else(truncated)?;
        let base = u32_at(pos + 8).ok_or_else(truncated)?;
        if count >= 256 {
            return Err(format!(
                "a directory header counts {} entries (at most 256)",
                count + 1
            ));
        }
        pos += 12;
        for _ in 0..=count {
            let delta = u16_at(pos + 2).ok_or_else(truncated)? as i16;
            let len = usize::from(u16_at(pos + 6).ok_or_else(truncated)?) + 1;
            let name = bytes.get(pos + 8..pos + 8 + len).ok_or_else(truncated)?;
            let key = i64::from(base) + i64::from(delta);
            let key = u32::try_from(key).map_err(|_| "inode number out of range".to_string())?;
            out.push((name.to_vec(), key));
            pos += 8 + len;
        }
    }
    Ok(out)
}

/// Where a file's bytes are, from its inode: where its blocks start, their sizes, the
/// fragment holding its tail (or none) and its size.
fn file_data(
    blocks_start: u64,
    sizes: &[backhand::DataSize],
    frag_index: u32,
    block_offset: u32,
    size: u64,
) -> FileData {
    let mut pos = blocks_start;
    let blocks = sizes
        .iter()
        .map(|ds| {
            let word = ds.size() | (ds.uncompressed() as u32 * STORED_UNCOMPRESSED);
            let here = pos;
            pos += u64::from(ds.size());
            (here, word)
        })
        .collect();
    FileData {
        size,
        blocks,
        fragment: (frag_index != NO_FRAGMENT).then_some((frag_index, block_offset)),
    }
}

/// A byte-bounded least-recently-used cache of decompressed blocks, keyed by their position.
struct BlockCache {
    inner: Mutex<CacheInner>,
    limit: usize,
}

#[derive(Default)]
struct CacheInner {
    map: HashMap<u64, (Block, u64)>,
    order: BTreeMap<u64, u64>,
    tick: u64,
    bytes: usize,
}

impl BlockCache {
    fn new(limit: usize) -> Self {
        BlockCache {
            inner: Mutex::new(CacheInner::default()),
            limit,
        }
    }

    fn get(&self, key: u64) -> Option<Block> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let c = &mut *guard;
        c.tick += 1;
        let tick = c.tick;
        let (data, stamp) = c.map.get_mut(&key)?;
        c.order.remove(stamp);
        *stamp = tick;
        c.order.insert(tick, key);
        Some(data.clone())
    }

    fn put(&self, key: u64, data: Block) {
        if data.len() > self.limit {
            return;
        }
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let c = &mut *guard;
        c.tick += 1;
        let tick = c.tick;
        let len = data.len();
        if let Some((old, stamp)) = c.map.insert(key, (data, tick)) {
            c.order.remove(&stamp);
            c.bytes -= old.len();
        }
        c.order.insert(tick, key);
        c.bytes += len;
        while c.bytes > self.limit {
            let Some((_, victim)) = c.order.pop_first() else {
                break;
            };
            if let Some((old, _)) = c.map.remove(&victim) {
                c.bytes -= old.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_evicts_least_recently_used_within_its_budget() {
        let cache = BlockCache::new(10);
        cache.put(1, Arc::new(vec![0u8; 4]));
        cache.put(2, Arc::new(vec![0u8; 4]));
        assert!(cache.get(1).is_some());
        cache.put(3, Arc::new(vec![0u8; 4]));
        assert!(cache.get(2).is_none(), "2 was least recently used");
        assert!(cache.get(1).is_some());
        assert!(cache.get(3).is_some());
        cache.put(4, Arc::new(vec![0u8; 11]));
        assert!(cache.get(4).is_none(), "larger than the whole budget");
    }
}
