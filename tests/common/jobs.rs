//! Job command lines several test files start the same way: a hostfile naming this machine,
//! `cmpirun -f HOSTS -n N` (through hydra) and `salloc -n N cmpirun` (through Slurm).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{RankFailure, Snapshot, TuserCommand, assert_no_leftovers, cmpirun_bin, program};

/// A hostfile `dir/hosts` naming this machine with `slots` slots, readable by the test user.
pub fn hostfile(dir: &Path, slots: u32) -> PathBuf {
    let host = nix::unistd::gethostname()
        .expect("gethostname")
        .into_string()
        .expect("a UTF-8 host name");
    let hostfile = dir.join("hosts");
    fs::write(&hostfile, format!("{host}:{slots}\n"))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", hostfile.display()));
    fs::set_permissions(&hostfile, fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", hostfile.display()));
    hostfile
}

/// `cmpirun -f HOSTS -n N` as the test user: a job through hydra. Add cmpirun's other arguments.
pub fn hydra_cmpirun(hosts: &Path, n: u32) -> TuserCommand {
    TuserCommand::cmpirun()
        .arg("-f")
        .arg(hosts)
        .args(["-n", &n.to_string()])
}

/// Runs `cmd` (cmpirun and its launcher flags) on a 4-rank job of the `abort` program in `image`
/// whose rank 1 fails as `failure` says, then checks cmpirun's status and message and that the
/// job left nothing behind. The caller holds the test lock ([`super::exclusive`]).
pub fn run_failing_abort_job(cmd: TuserCommand, image: &Path, failure: &RankFailure) {
    let before = Snapshot::take();
    let out = cmd
        .args(["-n", "4"])
        .arg(image)
        .arg(program("abort"))
        .args(failure.args)
        .run();
    assert!(!out.timed_out, "{out}");
    failure.assert_ended(&out);
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

/// `salloc -n N cmpirun` as the test user on the one-node test cluster, with a kill grace of 2 s
/// and a timeout of 180 s (salloc waits for the node while other jobs hold it). Add cmpirun's
/// arguments, its own `-n` included.
pub fn salloc_cmpirun(n: u32) -> TuserCommand {
    TuserCommand::new("salloc")
        .slurm()
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(180))
        .args(["-n", &n.to_string()])
        .arg(cmpirun_bin())
}
