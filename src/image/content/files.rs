//! Paths and files inside the image, read through its [`RootFs`] with symlinks resolved inside
//! the image, each failure a [`FactsError`] that names the path.

use std::io;

use crate::image::rootfs::{NodeKind, RootFs, resolve};

use super::types::FactsError;

/// The directory part of an absolute path (`/` for a top-level name).
pub(super) fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// The last component of a path.
pub(super) fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `dir/name`.
pub(super) fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// Text with invalid UTF-8 replaced.
pub(super) fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The [`FactsError`] of a failed read of `path`.
pub(super) fn io_err(path: &str, source: io::Error) -> FactsError {
    FactsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The bytes of the file at `path` (symlinks not followed).
pub(super) fn read(fs: &dyn RootFs, path: &str) -> Result<Vec<u8>, FactsError> {
    fs.read_file(path).map_err(|e| io_err(path, e))
}

/// The entries of a directory, following symlinks to it inside the image (RootFs methods never
/// follow them themselves).
pub(super) fn list_dir(fs: &dyn RootFs, path: &str) -> Result<Vec<String>, FactsError> {
    let real = resolve(fs, path)
        .map_err(|e| io_err(path, e))?
        .unwrap_or_else(|| path.to_owned());
    fs.list_dir(&real).map_err(|e| io_err(path, e))
}

/// `path` resolved inside the image, or `None` when it does not resolve. A path that cannot be
/// resolved (a symlink loop) counts as absent: the loader, failing to open such a candidate,
/// moves on to the next one too. Reading an existing file still reports its errors.
pub(super) fn resolve_candidate(fs: &dyn RootFs, path: &str) -> Option<String> {
    resolve(fs, path).ok().flatten()
}

/// `path` resolved inside the image if it names a regular file (through symlinks), else `None`.
pub(super) fn resolved_file(fs: &dyn RootFs, path: &str) -> Result<Option<String>, FactsError> {
    let Some(real) = resolve_candidate(fs, path) else {
        return Ok(None);
    };
    let meta = fs.metadata(&real).map_err(|e| io_err(&real, e))?;
    Ok(meta.filter(|m| m.kind == NodeKind::File).map(|_| real))
}

/// Whether `path` names a regular file, through symlinks.
pub(super) fn is_file(fs: &dyn RootFs, path: &str) -> Result<bool, FactsError> {
    Ok(resolved_file(fs, path)?.is_some())
}

/// Whether `path` names a directory, through symlinks.
pub(super) fn is_dir(fs: &dyn RootFs, path: &str) -> Result<bool, FactsError> {
    let Some(real) = resolve_candidate(fs, path) else {
        return Ok(false);
    };
    let meta = fs.metadata(&real).map_err(|e| io_err(&real, e))?;
    Ok(meta.is_some_and(|m| m.kind == NodeKind::Dir))
}

/// Whether a file is big enough to be a shared library: wheels cannot hold symlinks and ship
/// `libmpi.so` as a few-byte linker script instead. Decided from the size so that finding
/// candidates reads no file contents.
pub(super) fn is_library_sized(fs: &dyn RootFs, real: &str) -> Result<bool, FactsError> {
    let meta = fs.metadata(real).map_err(|e| io_err(real, e))?;
    Ok(meta.is_some_and(|m| m.size >= 1024))
}
