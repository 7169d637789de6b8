//! The MPI test programs in the images (`examples/mpi/`) and parsers and checks of their output.

use std::collections::{BTreeMap, BTreeSet};

use super::RunOutput;

/// The MPI test programs every test image holds in `/usr/local/bin` (see `examples/mpi/`).
pub const PROGRAMS: [&str; 5] = ["mpitest", "bigmsg", "hello", "abort", "pingpong"];

/// The path of test program `name` inside a test image.
pub fn program(name: &str) -> String {
    format!("/usr/local/bin/{name}")
}

/// One way rank 1 of a 4-rank job of the `abort` test program fails while the other ranks wait
/// in a barrier: only a teardown ends such a job. The status and message are cmpirun's, the same
/// under every launcher (`docs/exit-status.md`).
#[derive(Debug, Clone, Copy)]
pub struct RankFailure {
    /// The arguments of `abort`.
    pub args: [&'static str; 2],
    /// The status cmpirun ends the job with.
    pub code: i32,
    /// What cmpirun's stderr says about the rank.
    pub message: &'static str,
}

/// `abort exit 3`: rank 1 exits with status 3, and so does the job.
pub const RANK_EXITS_3: RankFailure = RankFailure {
    args: ["exit", "3"],
    code: 3,
    message: "cmpirun: rank 1 of 4 exited with status 3",
};

/// `abort signal 9`: rank 1 is killed by SIGKILL; the job ends with 128 + 9.
pub const RANK_KILLED_BY_SIGKILL: RankFailure = RankFailure {
    args: ["signal", "9"],
    code: 137,
    message: "cmpirun: rank 1 of 4 was killed by signal 9 (SIGKILL)",
};

/// `abort abort 7`: rank 1 calls `MPI_Abort` with code 7, the job's status.
pub const RANK_CALLS_MPI_ABORT_7: RankFailure = RankFailure {
    args: ["abort", "7"],
    code: 7,
    message: "cmpirun: rank 1 of 4 called MPI_Abort with code 7",
};

impl RankFailure {
    /// Checks that the job `out` ended with this failure's status and message.
    pub fn assert_ended(&self, out: &RunOutput) {
        out.assert_code(self.code);
        assert!(out.stderr.contains(self.message), "{out}");
    }
}

/// One `hello:` line of `mpitest` (or `hello`, which prints only rank, size and host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloLine {
    /// `rank=`
    pub rank: u32,
    /// `size=`
    pub size: u32,
    /// `host=`
    pub host: String,
    /// `uid=` (mpitest only)
    pub uid: Option<u32>,
    /// `userns=`: inode of the rank's user namespace (mpitest only).
    pub userns: Option<u64>,
    /// `mntns=`: inode of the rank's mount namespace (mpitest only).
    pub mntns: Option<u64>,
    /// `pid=` as the rank sees it (mpitest only).
    pub pid: Option<u32>,
}

/// The `key=value` fields of the first line of `text` that contains `prefix` (for instance
/// `"mpitest: OK"`), or of every such line with [`find_fields_all`]. A rank tag a launcher puts in
/// front of the line (`[1] `, `1: `) is ignored because the search starts at `prefix`.
pub fn find_fields(text: &str, prefix: &str) -> Option<BTreeMap<String, String>> {
    find_fields_all(text, prefix).into_iter().next()
}

/// The `key=value` fields of every line of `text` that contains `prefix`.
pub fn find_fields_all(text: &str, prefix: &str) -> Vec<BTreeMap<String, String>> {
    text.lines()
        .filter_map(|line| line.find(prefix).map(|at| &line[at + prefix.len()..]))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// Every `hello:` line in `stdout`, in the order printed.
pub fn hello_lines(stdout: &str) -> Vec<HelloLine> {
    find_fields_all(stdout, "hello: ")
        .into_iter()
        .filter_map(|f| {
            let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok());
            Some(HelloLine {
                rank: num("rank")? as u32,
                size: num("size")? as u32,
                host: f.get("host")?.clone(),
                uid: num("uid").map(|v| v as u32),
                userns: num("userns"),
                mntns: num("mntns"),
                pid: num("pid").map(|v| v as u32),
            })
        })
        .collect()
}

/// Checks the output of an `mpitest` job of `n` ranks: every rank said hello exactly once with
/// size `n`, the ring and the allreduce passed, and rank 0 printed `mpitest: OK size=n`. Returns
/// the hello lines, sorted by rank, for further checks (uid, namespaces).
pub fn assert_mpitest_ok(out: &RunOutput, n: u32) -> Vec<HelloLine> {
    out.assert_success();
    let mut hellos = hello_lines(&out.stdout);
    hellos.sort_by_key(|h| h.rank);
    let ranks: Vec<u32> = hellos.iter().map(|h| h.rank).collect();
    assert_eq!(
        ranks,
        (0..n).collect::<Vec<_>>(),
        "every rank must say hello once:\n{out}"
    );
    assert!(
        hellos.iter().all(|h| h.size == n),
        "a rank saw the wrong size:\n{out}"
    );
    assert!(out.stdout.contains("ring: OK"), "no ring result:\n{out}");
    assert!(
        out.stdout
            .contains(&format!("allreduce: OK sum={}", n * (n + 1) / 2)),
        "no checked allreduce:\n{out}"
    );
    assert!(
        out.stdout.contains(&format!("mpitest: OK size={n}")),
        "{out}"
    );
    hellos
}

/// Checks that all ranks that said hello on one host share one user and one mount namespace
/// (one container per node) and run as `uid`.
pub fn assert_one_container_per_host(hellos: &[HelloLine], uid: u32) {
    // (user namespace, mount namespace) inodes seen on each host.
    type Namespaces = BTreeSet<(Option<u64>, Option<u64>)>;
    let mut per_host: BTreeMap<&str, Namespaces> = BTreeMap::new();
    for h in hellos {
        assert_eq!(
            h.uid,
            Some(uid),
            "rank {} runs as uid {:?}, not {uid}",
            h.rank,
            h.uid
        );
        per_host
            .entry(&h.host)
            .or_default()
            .insert((h.userns, h.mntns));
    }
    for (host, namespaces) in per_host {
        assert_eq!(
            namespaces.len(),
            1,
            "ranks on {host} are in different (user, mount) namespaces: {namespaces:?}"
        );
    }
}

/// Checks the output of a `bigmsg` job of `n` ranks.
pub fn assert_bigmsg_ok(out: &RunOutput, n: u32) {
    out.assert_success();
    assert!(
        out.stdout
            .contains(&format!("bigmsg: OK size={n} bytes=16777216")),
        "{out}"
    );
}

/// One `fabric:` line of `mpitest` under `MPITEST_FABRIC=1`: the libfabric a rank has mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FabricLine {
    /// `rank=`
    pub rank: u32,
    /// `path=`: the file as the rank sees it, or `none` when no libfabric is mapped.
    pub path: String,
    /// `dev=`: `st_dev` of that path inside the rank's root.
    pub dev: Option<u64>,
    /// `ino=`: `st_ino` of that path.
    pub ino: Option<u64>,
    /// `fi_version=` of the mapped copy, e.g. `1.17` or `2.5`.
    pub fi_version: Option<String>,
}

/// Every `fabric:` line in `stdout`.
pub fn fabric_lines(stdout: &str) -> Vec<FabricLine> {
    find_fields_all(stdout, "fabric: ")
        .into_iter()
        .filter_map(|f| {
            Some(FabricLine {
                rank: f.get("rank")?.parse().ok()?,
                path: f.get("path")?.clone(),
                dev: f.get("dev").and_then(|v| v.parse().ok()),
                ino: f.get("ino").and_then(|v| v.parse().ok()),
                fi_version: f.get("fi_version").cloned(),
            })
        })
        .collect()
}
