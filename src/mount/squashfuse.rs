//! The squashfuse backend: mount `/dev/fuse` ourselves and hand the fd to `squashfuse_ll`.
//!
//! `squashfuse_ll -f IMAGE /dev/fd/N` (libfuse ≥ 3.3) serves an already-mounted FUSE fd, so
//! the mount needs no setuid helper and no capabilities in the child. The image is passed as
//! an inherited descriptor too, and `mount` returns only once the server answers, so the caller
//! may `pivot_root` at once without the server looking up a path through its own mount.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::unistd::Pid;

use super::{MountBackend, MountError, MountOptions, MountedImage, SquashfsSource};

/// Finds `squashfuse_ll` on PATH.
pub(super) fn find_binary() -> Result<PathBuf, MountError> {
    which::which("squashfuse_ll").map_err(|_| MountError::SquashfuseMissing)
}

pub(super) fn mount(
    src: &SquashfsSource,
    target: &Path,
    opts: &MountOptions,
) -> Result<MountedImage, MountError> {
    let bin = find_binary()?;
    let timeout = start_timeout()?;
    let image = File::open(&src.path)
        .map_err(|e| MountError::io(format!("open image {}", src.path.display()), e))?;
    check_magic(&image, src)?;
    let dev = super::fuse::open_dev_fuse()?;
    super::mount_fuse_fd(
        &dev,
        target,
        &src.path.to_string_lossy(),
        "squashfuse_ll",
        opts,
    )?;
    let unmount = || {
        let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
    };
    let child = match spawn(&bin, &image, &dev, src.offset) {
        Ok(c) => c,
        Err(e) => {
            unmount();
            return Err(e);
        }
    };
    // Only the server may hold the connection: if it exits, the kernel aborts the mount, and
    // the stat below fails instead of hanging.
    drop(dev);
    drop(image);
    let pid = Pid::from_raw(child.id() as i32);
    let kill_and_reap = || {
        unmount();
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        nix::sys::wait::waitpid(pid, None)
    };
    // A GETATTR of the mount root is answered only once squashfuse_ll has opened the image and
    // entered its loop.
    match wait_served(target, timeout) {
        Served::Yes => {}
        Served::No(e) => {
            let how = match kill_and_reap() {
                Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => {
                    format!("exited with status {code}")
                }
                Ok(other) => format!("ended ({other:?})"),
                Err(_) => format!("is gone ({e})"),
            };
            return Err(MountError::Server {
                backend: MountBackend::Squashfuse,
                path: src.path.clone(),
                reason: format!(
                    "{} {how} before serving the image (its own message, if any, is above)",
                    bin.display()
                ),
            });
        }
        Served::TimedOut(waiter) => {
            // Killing the server aborts the FUSE connection, which ends the waiting stat.
            let _ = kill_and_reap();
            let _ = waiter.join();
            return Err(MountError::StartTimeout {
                backend: MountBackend::Squashfuse,
                path: src.path.clone(),
                seconds: timeout.as_secs_f64(),
            });
        }
    }
    // The Child handle would not kill on drop; MountedImage owns the pid from here.
    std::mem::forget(child);
    tracing::debug!(
        "image {} served at {} by squashfuse_ll pid {pid}",
        src.path.display(),
        target.display()
    );
    Ok(MountedImage::new_served(
        target,
        MountBackend::Squashfuse,
        pid,
    ))
}

/// How long `squashfuse_ll` may take to serve the mount root when nothing says otherwise.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The environment variable that overrides [`DEFAULT_START_TIMEOUT`] (seconds, may be
/// fractional).
pub const START_TIMEOUT_ENV: &str = "CMPIRUN_MOUNT_TIMEOUT";

/// The start deadline: `$CMPIRUN_MOUNT_TIMEOUT` seconds, else [`DEFAULT_START_TIMEOUT`].
fn start_timeout() -> Result<Duration, MountError> {
    let Some(raw) = std::env::var_os(START_TIMEOUT_ENV).filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_START_TIMEOUT);
    };
    let text = raw.to_string_lossy();
    match text.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => {
            Ok(Duration::from_secs_f64(secs))
        }
        _ => Err(MountError::BadSetting {
            name: START_TIMEOUT_ENV.into(),
            value: text.into_owned(),
            expected: "a positive number of seconds, e.g. 30".into(),
        }),
    }
}

enum Served {
    Yes,
    No(nix::errno::Errno),
    /// The stat still waits in this thread; it ends once the server is killed.
    TimedOut(std::thread::JoinHandle<()>),
}

/// Stats the mount root within `timeout`. A stat waiting on a FUSE server cannot be
/// interrupted, so it runs in a short-lived thread; the caller is single-threaded again once
/// it has been joined (at once when served, after killing the server otherwise).
fn wait_served(target: &Path, timeout: Duration) -> Served {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = target.to_owned();
    let waiter = match std::thread::Builder::new()
        .name("mount-wait".into())
        .spawn(move || {
            let _ = tx.send(nix::sys::stat::stat(&path).map(drop));
        }) {
        Ok(w) => w,
        // No thread to spare: wait without a deadline, as before.
        Err(_) => {
            return match nix::sys::stat::stat(target) {
                Ok(_) => Served::Yes,
                Err(e) => Served::No(e),
            };
        }
    };
    match rx.recv_timeout(timeout) {
        Ok(result) => {
            let _ = waiter.join();
            match result {
                Ok(()) => Served::Yes,
                Err(e) => Served::No(e),
            }
        }
        Err(_) => Served::TimedOut(waiter),
    }
}

/// Refuses a file without the squashfs magic at `offset`, with a message naming the file,
/// rather than letting squashfuse_ll say "This doesn't look like a squashfs image".
fn check_magic(image: &File, src: &SquashfsSource) -> Result<(), MountError> {
    let mut magic = [0u8; 4];
    match image.read_exact_at(&mut magic, src.offset) {
        Ok(()) if &magic == b"hsqs" => Ok(()),
        Ok(()) => Err(MountError::BadImage {
            path: src.path.clone(),
            offset: src.offset,
            reason: "no squashfs superblock there".into(),
        }),
        Err(e) => Err(MountError::BadImage {
            path: src.path.clone(),
            offset: src.offset,
            reason: e.to_string(),
        }),
    }
}

fn spawn(
    bin: &Path,
    image: &File,
    dev: &OwnedFd,
    offset: u64,
) -> Result<std::process::Child, MountError> {
    let img_fd = image.as_raw_fd();
    let dev_fd = dev.as_raw_fd();
    let parent = nix::unistd::getpid();
    let mut cmd = Command::new(bin);
    cmd.arg("-f");
    if offset != 0 {
        cmd.arg("-o").arg(format!("offset={offset}"));
    }
    cmd.arg(format!("/dev/fd/{img_fd}"))
        .arg(format!("/dev/fd/{dev_fd}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: the closure only makes async-signal-safe system calls (fcntl, prctl, getppid,
    // setpgid, close_range).
    unsafe {
        cmd.pre_exec(move || {
            for fd in [img_fd, dev_fd] {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent.as_raw() {
                return Err(std::io::Error::other("the node instance exited"));
            }
            // Out of the terminal's process group: Ctrl-C goes to the job, not the image.
            libc::setpgid(0, 0);
            // Keep stdio, the image and the FUSE fd; inherited PMI sockets and pipes must not
            // be held open by the server.
            crate::sys::process::close_fds_except(3, &[img_fd, dev_fd]);
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| MountError::io(format!("start {}", bin.display()), e))
}
