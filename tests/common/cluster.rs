//! The three-node test cluster started by `ci/start-cluster.sh`: nodes `n1`..`n3`, each a
//! network + UTS + IPC + mount namespace on the bridge `cmpbr0`, with a slurmd and an sshd.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use super::{TuserCommand, require_slurm_at};

/// The cluster's nodes.
pub const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// The front end's address on the cluster's bridge (the root namespace, where the tests run).
pub const FRONT_END_ADDR: &str = "10.77.0.1";

/// The running three-node cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Its folder (`$CLUSTER_DIR`, default `/run/cmpirun-test-cluster`).
    pub dir: PathBuf,
}

impl Cluster {
    /// Its `slurm.conf`.
    pub fn slurm_conf(&self) -> PathBuf {
        self.dir.join("slurm.conf")
    }

    /// The ssh wrapper hydra uses (`HYDRA_LAUNCHER_EXEC`): ssh with the cluster's key and config.
    pub fn ssh(&self) -> PathBuf {
        self.dir.join("bin/ssh")
    }

    /// The pid of the process holding node `node`'s namespaces.
    pub fn anchor(&self, node: &str) -> i32 {
        let f = self.dir.join(format!("{node}.anchor"));
        fs::read_to_string(&f)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no node {node} in the test cluster ({})", f.display()))
    }

    /// The address of node `node` (`n2` → `10.77.0.12`).
    pub fn addr(&self, node: &str) -> String {
        format!("10.77.0.1{}", node.trim_start_matches('n'))
    }

    /// Bytes the bridge port of `node` has passed both ways (the veth counters): grows when
    /// traffic really crosses between nodes.
    pub fn link_bytes(&self, node: &str) -> u64 {
        let i = node.trim_start_matches('n');
        ["rx_bytes", "tx_bytes"]
            .iter()
            .map(|c| {
                fs::read_to_string(format!("/sys/class/net/cmpv{i}/statistics/{c}"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// A path as node `node` sees it (through its anchor's root: the node's own `/tmp` and
    /// `/dev/shm`).
    pub fn node_path(&self, node: &str, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.anchor(node)))
            .join(path.trim_start_matches('/'))
    }

    /// What each node holds of the test user's jobs: its `/dev/shm` entries, its `cmpirun*`
    /// entries in `/tmp` (and inside the runtime folder `/tmp/cmpirun-UID`), and its mounts.
    pub fn node_state(&self, node: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let list = |p: PathBuf| -> Vec<String> {
            fs::read_dir(p)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        for e in list(self.node_path(node, "/dev/shm")) {
            out.insert(format!("{node}: /dev/shm/{e}"));
        }
        for e in list(self.node_path(node, "/tmp")) {
            if !e.starts_with("cmpirun") {
                continue;
            }
            let inner = list(self.node_path(node, &format!("/tmp/{e}")));
            if e.starts_with("cmpirun-") && !inner.is_empty() {
                out.extend(inner.iter().map(|i| format!("{node}: /tmp/{e}/{i}")));
            } else if !e.starts_with("cmpirun-") || e.contains('.') {
                out.insert(format!("{node}: /tmp/{e}"));
            }
        }
        let mountinfo = format!("/proc/{}/mountinfo", self.anchor(node));
        for line in fs::read_to_string(mountinfo).unwrap_or_default().lines() {
            if let Some(mp) = line.split_whitespace().nth(4) {
                out.insert(format!("{node}: mount {mp}"));
            }
        }
        out
    }

    /// [`Self::node_state`] of every node.
    pub fn state(&self) -> BTreeSet<String> {
        NODES.iter().flat_map(|n| self.node_state(n)).collect()
    }

    /// Panics, listing them, when a node holds entries that were not in `before` (waiting up to
    /// 5 s for a teardown still under way).
    pub fn assert_nothing_left(&self, before: &BTreeSet<String>) {
        self.assert_nothing_left_but(before, |_| false);
    }

    /// [`Self::assert_nothing_left`], but entries for which `allowed` is true do not count.
    pub fn assert_nothing_left_but(
        &self,
        before: &BTreeSet<String>,
        allowed: impl Fn(&str) -> bool,
    ) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let now = self.state();
            let new: Vec<&String> = now.difference(before).filter(|e| !allowed(e)).collect();
            if new.is_empty() {
                return;
            }
            if std::time::Instant::now() >= until {
                panic!("the job left things on the nodes:\n{new:#?}");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// The running three-node test cluster, after checking that it is isolated: the bridge carries
/// only the front end's address, no node has a default route or an address off the bridge, and
/// the host does not forward. Panics with the command that starts it when it is not running,
/// and with what is wrong when it is not isolated.
pub fn require_cluster() -> Cluster {
    let dir = std::env::var_os("CLUSTER_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/cmpirun-test-cluster"));
    let cluster = Cluster { dir };
    require_slurm_at(&cluster.dir).unwrap_or_else(|| {
        panic!(
            "the three-node test cluster is not running: start it with `ci/start-cluster.sh` \
             (ci/test.sh does)"
        )
    });
    check_isolated(&cluster);
    cluster
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed: {out:?}",
        args.join(" ")
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks the rules of the cluster's network (see [`require_cluster`]).
fn check_isolated(cluster: &Cluster) {
    let forward = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    assert_eq!(
        forward.trim(),
        "0",
        "the host forwards IPv4: the test cluster must not leak"
    );
    let bridge = ip(&["-o", "-4", "addr", "show", "dev", "cmpbr0"]);
    let addrs: Vec<&str> = bridge
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert_eq!(
        addrs,
        [format!("{FRONT_END_ADDR}/24")],
        "cmpbr0 carries other addresses"
    );
    for node in NODES {
        let _ = cluster.anchor(node);
        let ns = format!("cmpn{}", node.trim_start_matches('n'));
        let routes = ip(&["-n", &ns, "-4", "route", "show", "default"]);
        assert!(
            routes.trim().is_empty(),
            "node {node} has a default route: {routes}"
        );
        let addrs = ip(&["-n", &ns, "-o", "-4", "addr", "show"]);
        for line in addrs.lines() {
            let mut f = line.split_whitespace();
            let (dev, addr) = (f.nth(1).unwrap_or(""), f.nth(1).unwrap_or(""));
            let ok = (dev == "lo" && addr.starts_with("127."))
                || (dev == "eth0" && addr == format!("{}/24", cluster.addr(node)));
            assert!(ok, "node {node} has an address off the bridge: {line}");
        }
    }
}

impl TuserCommand {
    /// Points Slurm's clients at the three-node cluster, and hydra's and Open MPI's ssh
    /// launchers at its ssh.
    pub fn cluster(self, cluster: &Cluster) -> Self {
        self.env("SLURM_CONF", cluster.slurm_conf())
            .env("HYDRA_LAUNCHER_EXEC", cluster.ssh())
            .env("OMPI_MCA_plm_rsh_agent", cluster.ssh())
    }
}

/// The pid a test enters node `node` through (for [`TuserCommand::on_node`]).
pub fn node_anchor(node: &str) -> i32 {
    require_cluster().anchor(node)
}
