//! The one-node Slurm test cluster started by `ci/start-slurm.sh` (and the slurmctld of the
//! three-node one, `cluster.rs`).

use std::fs;
use std::path::{Path, PathBuf};

/// The configuration file of the one-node Slurm test cluster, when `ci/start-slurm.sh` has
/// started it and slurmctld is running (`$SLURM_DIR/slurm.conf`, default
/// `/run/cmpirun-test-slurm/slurm.conf`).
pub fn slurm_conf() -> Option<PathBuf> {
    let dir = std::env::var_os("SLURM_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/cmpirun-test-slurm"));
    require_slurm_at(&dir)
}

/// `dir/slurm.conf` when the slurmctld of `dir/slurmctld.pid` is running.
pub fn require_slurm_at(dir: &Path) -> Option<PathBuf> {
    let conf = dir.join("slurm.conf");
    let pid: i32 = fs::read_to_string(dir.join("slurmctld.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    (alive && conf.is_file()).then_some(conf)
}

/// Like [`slurm_conf`], but panics with the command that starts the cluster.
pub fn require_slurm() -> PathBuf {
    slurm_conf().unwrap_or_else(|| {
        panic!("the Slurm test cluster is not running: start it with `ci/start-slurm.sh` (ci/test.sh does)")
    })
}
