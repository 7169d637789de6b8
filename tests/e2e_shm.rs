//! End-to-end tests of `--shm SIZE`: the size of the node's private `/dev/shm` as a rank sees
//! it, run as the test user under the local launcher, with one image and with two (whose roots
//! share one tmpfs).

mod common;

use std::time::Duration;

use common::*;

/// The size in bytes of `/dev/shm` as each rank of `cmpirun FLAGS -n 1 A stat … [: -n 1 B stat …]`
/// reports it (one line per rank, in any order).
fn shm_sizes(flags: &[&str], images: &[&str]) -> Vec<u64> {
    let stat = ["stat", "-f", "-c", "%b %S", "/dev/shm"];
    let mut cmd = TuserCommand::cmpirun()
        .timeout(Duration::from_secs(120))
        .args(flags);
    for (i, image) in images.iter().enumerate() {
        if i > 0 {
            cmd = cmd.arg(":");
        }
        cmd = cmd.args(["-n", "1"]).arg(staged_image(image)).args(stat);
    }
    let out = cmd.run();
    out.assert_success();
    let sizes: Vec<u64> = out
        .stdout
        .lines()
        .map(|l| {
            let (blocks, bsize) = l
                .split_once(' ')
                .expect("stat prints blocks and block size");
            blocks.parse::<u64>().unwrap() * bsize.parse::<u64>().unwrap()
        })
        .collect();
    assert_eq!(sizes.len(), images.len(), "{}", out.stdout);
    sizes
}

/// tmpfs's default size: half the node's memory, in whole pages.
fn half_the_memory() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024 / 2
}

#[test]
fn shm_size_limits_the_private_dev_shm() {
    assert_eq!(shm_sizes(&["--shm", "64m"], &["mpich4"]), [64 << 20]);
    assert_eq!(shm_sizes(&["--shm", "1G"], &["mpich4"]), [1 << 30]);
    // Without --shm, tmpfs's default.
    let [default] = shm_sizes(&[], &["mpich4"])[..] else {
        unreachable!()
    };
    let half = half_the_memory();
    assert!(
        default.abs_diff(half) <= 4096,
        "/dev/shm is {default} bytes without --shm; half the memory is {half}"
    );
    // A percentage of the node's memory.
    let [tenth] = shm_sizes(&["--shm", "10%"], &["mpich4"])[..] else {
        unreachable!()
    };
    assert!(tenth.abs_diff(half / 5) <= 4096, "10% gave {tenth} bytes");
}

#[test]
fn shm_size_limits_the_dev_shm_every_image_shares() {
    // --force: the two images' MPI builds could not wire up with each other (the mpmd-mpi
    // check), which `stat` does not need.
    assert_eq!(
        shm_sizes(&["--force", "--shm", "32m"], &["mpich4", "mpich5"]),
        [32 << 20, 32 << 20]
    );
}
