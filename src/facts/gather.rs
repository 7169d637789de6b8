//! The facts of a job's images, gathered without leaving threads or memory in cmpirun.
//!
//! The facts of an image seen before come from the user's facts cache
//! ([`FactsCache`]), read in this process: nothing else is read from the image.
//! The others are read in a forked child, which sends them back as JSON and exits: the local
//! launcher must still be single-threaded when it forks the node instance and the ranks, and
//! whatever reading an image allocates or starts (backhand's file reader starts rayon threads;
//! the facts reader does not use it, but a decompressor or a future reader might) goes with the
//! child. The parent then writes them to the cache.

use std::io::{Read, Write};
use std::path::PathBuf;

use nix::sys::wait::{WaitStatus, waitpid};

use super::cache::FactsCache;
use super::image::ImageSummary;

/// [`ImageSummary::read`] for every path, through the user's facts cache
/// ([`FactsCache::from_env`]).
pub fn gather_images(paths: &[PathBuf]) -> Vec<ImageSummary> {
    gather_images_with(paths, FactsCache::from_env().as_ref())
}

/// [`ImageSummary::read`] for every path: from `cache` where it has the image's facts, else in a
/// child process, keeping what was read in `cache`. Falls back to reading them in this process
/// (which may then have threads) if the child cannot be used, so a launch still gets the facts;
/// [`crate::launch::local`] refuses to fork a threaded process and says so.
pub fn gather_images_with(paths: &[PathBuf], cache: Option<&FactsCache>) -> Vec<ImageSummary> {
    // Keys are taken before the images are read: an image replaced meanwhile has another
    // identity, so what is stored under the old one is never used for it.
    let keys: Vec<_> = paths
        .iter()
        .map(|p| cache.and_then(|_| FactsCache::key(p)))
        .collect();
    let mut infos: Vec<Option<ImageSummary>> = paths
        .iter()
        .zip(&keys)
        .map(|(p, k)| cache?.load(p, k.as_ref()?))
        .collect();
    // Each image not in the cache is read once, even when several parts of the job run it.
    let mut missing: Vec<PathBuf> = Vec::new();
    for (p, i) in paths.iter().zip(&infos) {
        if i.is_none() && !missing.contains(p) {
            missing.push(p.clone());
        }
    }
    if missing.is_empty() {
        return infos.into_iter().flatten().collect();
    }
    let read = match read_in_child(&missing) {
        Some(read) if read.len() == missing.len() => read,
        _ => missing.iter().map(|p| ImageSummary::read(p)).collect(),
    };
    for ((slot, key), path) in infos.iter_mut().zip(&keys).zip(paths) {
        if slot.is_none() {
            let info = missing
                .iter()
                .position(|m| m == path)
                .and_then(|i| read.get(i))
                .cloned()
                .unwrap_or_else(|| ImageSummary::read(path));
            if let (Some(cache), Some(key)) = (cache, key) {
                cache.store(key, &info);
            }
            *slot = Some(info);
        }
    }
    infos.into_iter().flatten().collect()
}

/// [`ImageSummary::read`] for every path in a forked child, which sends them back as JSON;
/// `None` when the child could not be started or did not answer.
fn read_in_child(paths: &[PathBuf]) -> Option<Vec<ImageSummary>> {
    let (mut rd, wr) = std::io::pipe().ok()?;
    // SAFETY: called while cmpirun is single-threaded (before any image is read), so the child
    // may do anything: it reads files, writes to the pipe and ends.
    let child = unsafe {
        crate::sys::process::fork_child(move || {
            let mut wr = wr;
            let infos: Vec<ImageSummary> = paths.iter().map(|p| ImageSummary::read(p)).collect();
            match serde_json::to_vec(&infos) {
                Ok(json) => i32::from(wr.write_all(&json).is_err()),
                Err(_) => 1,
            }
        })
    }
    .ok()?;
    // The parent's copy of the write end went with the closure: the read ends with the child.
    let mut json = Vec::new();
    let read = rd.read_to_end(&mut json);
    let status = loop {
        match waitpid(child, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    match (read, status) {
        (Ok(_), Ok(WaitStatus::Exited(_, 0))) => serde_json::from_slice(&json).ok(),
        _ => None,
    }
}
