//! The environment a rank gets, and the cleaning of the one it would inherit.
//!
//! Process managers hand PMI to a rank in one of two ways (see `docs/pmi.md`):
//!
//! - an inherited, already connected stream socket: `PMI_FD`, with `PMI_RANK`, `PMI_SIZE`
//!   and `PMI_JOBID` (what hydra and Slurm do);
//! - a TCP address: `PMI_PORT=host:port` and `PMI_ID=<rank>`; the client connects and
//!   identifies itself (`initack`, or PMI-2 `fullinit`).
//!
//! Variables of other process managers left in the caller's environment confuse the image's
//! MPI (current MPICH aborts when it sees both `PMI_SIZE` and `PMIX_NAMESPACE`), so
//! [`scrub_env`] removes them before the PMI variables are added.

use std::ffi::{OsStr, OsString};
use std::os::fd::RawFd;

/// Environment for rank `rank` of `size` reaching PMI through the inherited descriptor `fd`.
pub fn fd_env(rank: u32, size: u32, jobid: &str, fd: RawFd) -> Vec<(String, String)> {
    vec![
        ("PMI_FD".into(), fd.to_string()),
        ("PMI_RANK".into(), rank.to_string()),
        ("PMI_SIZE".into(), size.to_string()),
        ("PMI_JOBID".into(), jobid.into()),
    ]
}

/// Environment for rank `rank` of `size` reaching PMI over TCP at `addr` (`host:port`).
///
/// `PMI_RANK`/`PMI_SIZE` are set as well: PMI-2 clients of Slurm read them even in port mode,
/// and PMI-1 clients take the values of the `initack` handshake over them.
pub fn port_env(rank: u32, size: u32, jobid: &str, addr: &str) -> Vec<(String, String)> {
    vec![
        ("PMI_PORT".into(), addr.into()),
        ("PMI_ID".into(), rank.to_string()),
        ("PMI_RANK".into(), rank.to_string()),
        ("PMI_SIZE".into(), size.to_string()),
        ("PMI_JOBID".into(), jobid.into()),
    ]
}

/// Whether `name` is wire-up state of some process manager that must not reach a rank.
///
/// Removed: every `PMI_*`, `PMI2_*`, `PMIX_*` and `PRTE_*` variable, and Open MPI's `OMPI_*`
/// launch variables. `OMPI_MCA_*` settings are user configuration and stay, except the ones
/// that describe a launch (`OMPI_MCA_orte_*`, `OMPI_MCA_ess*`, `OMPI_MCA_pmix*`,
/// `OMPI_MCA_prte*`).
pub fn is_wireup_var(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    if ["PMI_", "PMI2_", "PMIX_", "PRTE_"]
        .iter()
        .any(|p| name.starts_with(p))
    {
        return true;
    }
    match name.strip_prefix("OMPI_MCA_") {
        Some(mca) => ["orte_", "ess", "pmix", "prte"]
            .iter()
            .any(|p| mca.starts_with(p)),
        None => name.starts_with("OMPI_"),
    }
}

/// The environment `vars` without the variables [`is_wireup_var`] names.
///
/// ```
/// use cmpirun_pmi::wireup::scrub_env;
///
/// let env = [("PATH", "/bin"), ("PMIX_NAMESPACE", "x"), ("PMI_FD", "5"), ("OMPI_MCA_btl", "self")];
/// let kept: Vec<_> = scrub_env(env).into_iter().map(|(k, _)| k).collect();
/// assert_eq!(kept, ["PATH", "OMPI_MCA_btl"]);
/// ```
pub fn scrub_env<I, K, V>(vars: I) -> Vec<(OsString, OsString)>
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<OsString>,
    V: Into<OsString>,
{
    vars.into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .filter(|(k, _)| !is_wireup_var(k))
        .collect()
}

/// Let `fd` survive `exec` in the current process by clearing its close-on-exec flag.
///
/// The rank ends that [`crate::server::PmiServer::add_socketpair`] returns are close-on-exec,
/// so that one rank never inherits another rank's socket. Call this in the child between
/// `fork` and `exec` (for example in `std::os::unix::process::CommandExt::pre_exec`); it only
/// calls `fcntl`, which is async-signal-safe.
pub fn inherit_fd(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl with F_GETFD/F_SETFD touches only the descriptor flags; an invalid fd is
    // reported through errno.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wireup_vars() {
        for v in [
            "PMI_RANK",
            "PMI2_DEBUG",
            "PMIX_RANK",
            "PRTE_LAUNCHED",
            "OMPI_COMM_WORLD_RANK",
            "OMPI_MCA_orte_ess_num_procs",
            "OMPI_MCA_pmix_base_verbose",
        ] {
            assert!(is_wireup_var(OsStr::new(v)), "{v}");
        }
        for v in [
            "PATH",
            "OMPI_MCA_btl",
            "PMIXY",
            "SLURM_JOB_ID",
            "FI_PROVIDER",
        ] {
            assert!(!is_wireup_var(OsStr::new(v)), "{v}");
        }
    }
}
