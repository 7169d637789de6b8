//! Reading image facts without leaving threads in cmpirun.
//!
//! Reading a squashfs with backhand starts rayon's worker threads, which stay for the life of
//! the process; but the local launcher must still be single-threaded when it forks the node
//! instance and the ranks. So the facts are read in a forked child, which sends them back as
//! JSON and exits, taking its threads with it.

use std::io::{Read, Write};
use std::path::PathBuf;

use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};

use crate::plan::ImageInfo;

/// [`ImageInfo::gather`] for every path, in a child process. Falls back to reading them in this
/// process (which then has threads) if the child cannot be used, so a launch still gets the
/// facts; [`super::local`] refuses to fork a threaded process and says so.
pub fn gather_images(paths: &[PathBuf]) -> Vec<ImageInfo> {
    match in_child(paths) {
        Some(infos) if infos.len() == paths.len() => infos,
        _ => paths.iter().map(|p| ImageInfo::gather(p)).collect(),
    }
}

fn in_child(paths: &[PathBuf]) -> Option<Vec<ImageInfo>> {
    let (mut rd, wr) = std::io::pipe().ok()?;
    // SAFETY: called while cmpirun is single-threaded (before any image is read); the child only
    // reads files, writes to the pipe and exits with _exit.
    match unsafe { fork() }.ok()? {
        ForkResult::Child => {
            drop(rd);
            let infos: Vec<ImageInfo> = paths.iter().map(|p| ImageInfo::gather(p)).collect();
            let code = match serde_json::to_vec(&infos) {
                Ok(json) => {
                    let mut wr = wr;
                    i32::from(wr.write_all(&json).is_err())
                }
                Err(_) => 1,
            };
            // SAFETY: leaves the child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(wr);
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
    }
}
