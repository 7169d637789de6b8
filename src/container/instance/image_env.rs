//! The image's environment scripts (`/.singularity.d/env/*.sh`), evaluated once per image by the
//! node instance (or the image's holder) inside the image's root.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

use crate::container::member_env::{
    Env, EnvChange, eval_simple_scripts, image_changes, parse_environ, without_shell_noise,
};
use crate::sys::process::fork_child;

/// Why the image's environment scripts could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ImageEnvError {
    /// The shell that sources them could not be started.
    #[error("fork: {0}")]
    Fork(Errno),
    /// Waiting for the shell failed.
    #[error("waitpid: {0}")]
    Wait(Errno),
    /// The shell exited (a script failed, or exited).
    #[error("/bin/sh exited with status {0}")]
    Exited(i32),
    /// The shell was killed.
    #[error("/bin/sh was killed by {0}")]
    Killed(Signal),
    /// The environment the scripts left could not be read.
    #[error("read the environment: {0}")]
    ReadEnviron(std::io::Error),
}

/// The shell text that sources every script, then stops in a second shell so that the
/// environment they left can be read from `/proc/<pid>/environ`.
const SOURCE_ALL: &std::ffi::CStr =
    c"for f in /.singularity.d/env/*.sh; do if [ -f \"$f\" ]; then . \"$f\"; fi; done; \
                          exec /bin/sh -c 'kill -STOP $$'";

/// Applies the image's `/.singularity.d/env/*.sh` once, in lexical order, and returns what they
/// changed. Scripts made only of plain assignments are evaluated here ([`eval_simple_scripts`]);
/// otherwise the image's `/bin/sh` sources them and ends by exec'ing a second shell that stops
/// itself, so the result is read from `/proc/<pid>/environ` with no tool from the image but
/// `/bin/sh`.
pub fn eval_image_env(before: &Env) -> Result<Vec<EnvChange>, ImageEnvError> {
    let scripts = image_scripts();
    if scripts.is_empty() {
        return Ok(Vec::new());
    }
    let texts: Vec<String> = scripts
        .iter()
        .filter_map(|p| fs::read(p).ok().and_then(|b| String::from_utf8(b).ok()))
        .collect();
    if texts.len() == scripts.len() {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        if let Some(after) = eval_simple_scripts(&refs, before) {
            return Ok(image_changes(before, &after));
        }
    }
    if !Path::new("/bin/sh").exists() {
        tracing::warn!(
            "the image's environment scripts need a shell and it has no /bin/sh; not applied"
        );
        return Ok(Vec::new());
    }
    let after = source_in_shell(before)?;
    Ok(image_changes(before, &after))
}

/// The image's scripts, sorted by their bytes.
fn image_scripts() -> Vec<PathBuf> {
    let mut scripts: Vec<PathBuf> = match fs::read_dir("/.singularity.d/env") {
        Ok(d) => d
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sh") && p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    scripts.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    scripts
}

/// Sources every script in the image's `/bin/sh`, started with `before`, and returns the
/// environment the scripts left.
fn source_in_shell(before: &Env) -> Result<Env, ImageEnvError> {
    let argv = [c"sh".to_owned(), c"-c".to_owned(), SOURCE_ALL.to_owned()];
    let envp: Vec<CString> = before
        .iter()
        .filter_map(|(k, v)| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            CString::new(e).ok()
        })
        .collect();
    // SAFETY: the instance may have image-server threads by now; the child only calls
    // async-signal-safe functions (sigprocmask, execve) on data prepared before the fork.
    let child = unsafe {
        fork_child(|| {
            // A failure leaves signals blocked in the shell, which only matters to a script
            // that waits for one; there is nobody to tell from here.
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            let _ = nix::unistd::execve(c"/bin/sh", &argv, &envp);
            127
        })
    }
    .map_err(ImageEnvError::Fork)?;
    loop {
        match waitpid(child, Some(WaitPidFlag::WUNTRACED)) {
            Ok(WaitStatus::Stopped(_, _)) => {
                let block = fs::read(format!("/proc/{child}/environ"));
                // The shell is stopped and ours: killing and reaping it cannot fail.
                let _ = kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                let block = block.map_err(ImageEnvError::ReadEnviron)?;
                return Ok(without_shell_noise(parse_environ(&block)));
            }
            Ok(WaitStatus::Exited(_, code)) => return Err(ImageEnvError::Exited(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Err(ImageEnvError::Killed(sig)),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(ImageEnvError::Wait(e)),
        }
    }
}
