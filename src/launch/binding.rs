//! CPU binding under the local launcher (`--bind-to`, `--cpus-per-rank`, `--report-bindings`).
//!
//! The node's topology (cores, packages, NUMA nodes and their CPUs) is read with hwloc and kept
//! only as lists of CPU numbers, restricted to the CPUs this process may use: its affinity,
//! which is what the cgroup cpuset, `taskset` or a Slurm step leaves it. [`assign`] then gives
//! each rank its CPUs (pure, tested on made-up machines); each rank applies its set with
//! `sched_setaffinity` after joining the container and before exec
//! ([`crate::container::instance::MemberCommand::cpus`]). Under srun and hydra, the launcher
//! binds the ranks itself (the plan passes the request on; see `docs/launch.md`).

use hwlocality::Topology;
use hwlocality::object::types::ObjectType;
use nix::sched::CpuSet;
use nix::unistd::Pid;

use crate::jobspec::{BindTo, BindingSpec};

/// Why the ranks cannot be bound as asked.
#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    /// More cores (or hardware threads) asked for than this process may use.
    #[error(
        "--bind-to {to} with {per_rank} per rank needs {need} {unit}s for {ranks} rank(s), but \
         this node lets the job use {have} ({cpus}); run fewer ranks, lower --cpus-per-rank, or \
         use --bind-to none"
    )]
    NotEnough {
        /// What was asked.
        to: &'static str,
        /// Cores or hardware threads per rank.
        per_rank: usize,
        /// How many in all.
        need: usize,
        /// `core` or `hardware thread`.
        unit: &'static str,
        /// Ranks on the node.
        ranks: usize,
        /// How many the node lets the job use.
        have: usize,
        /// The CPUs it may use.
        cpus: String,
    },
    /// hwloc could not read the node's topology.
    #[error("cannot read this node's CPU topology (hwloc): {0}")]
    Topology(String),
    /// The process's own affinity could not be read.
    #[error("cannot read this process's CPU affinity: {0}")]
    Affinity(nix::errno::Errno),
}

/// A bad binding request is the user's to fix; a topology that cannot be read is the host's.
impl crate::exit::Blame for BindingError {
    fn fault(&self) -> crate::exit::Fault {
        match self {
            BindingError::NotEnough { .. } => crate::exit::Fault::User,
            BindingError::Topology(_) | BindingError::Affinity(_) => crate::exit::Fault::Host,
        }
    }
}

/// The CPUs of a node that binding works with, each list of CPU numbers restricted to the CPUs
/// this process may use (objects left with none are dropped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeCpus {
    /// Every CPU the job may use, ascending.
    pub allowed: Vec<usize>,
    /// Hardware threads, one CPU each.
    pub hwthreads: Vec<Vec<usize>>,
    /// Cores, each with its hardware threads.
    pub cores: Vec<Vec<usize>>,
    /// Packages (sockets).
    pub sockets: Vec<Vec<usize>>,
    /// NUMA nodes.
    pub numa: Vec<Vec<usize>>,
}

impl NodeCpus {
    /// Reads this node's topology with hwloc, restricted to this process's affinity.
    pub fn read() -> Result<NodeCpus, BindingError> {
        let affinity =
            nix::sched::sched_getaffinity(Pid::from_raw(0)).map_err(BindingError::Affinity)?;
        let allowed: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| affinity.is_set(c).unwrap_or(false))
            .collect();
        let topology = Topology::new().map_err(|e| BindingError::Topology(e.to_string()))?;
        let of = |t: ObjectType| -> Vec<Vec<usize>> {
            topology
                .objects_with_type(t)
                .filter_map(|o| o.cpuset())
                .map(|set| {
                    set.iter_set()
                        .map(usize::from)
                        .filter(|c| allowed.contains(c))
                        .collect::<Vec<usize>>()
                })
                .filter(|cpus| !cpus.is_empty())
                .collect()
        };
        Ok(NodeCpus {
            hwthreads: of(ObjectType::PU),
            cores: of(ObjectType::Core),
            sockets: of(ObjectType::Package),
            numa: of(ObjectType::NUMANode),
            allowed,
        })
    }
}

/// The CPUs of each of `ranks` ranks on a node with `cpus`, as `binding` asks: `None` for every
/// rank when nothing is asked. Ranks take consecutive cores (or hardware threads),
/// `cpus_per_rank` each (default 1); bound to a socket or NUMA node, a rank gets every CPU of
/// the objects its cores are in, and ranks beyond the cores wrap around (several ranks per
/// socket is the point of socket binding). Bound to cores or hardware threads, each gets its
/// own, and asking for more than there are is an error.
pub fn assign(
    binding: &BindingSpec,
    cpus: &NodeCpus,
    ranks: usize,
) -> Result<Vec<Option<Vec<usize>>>, BindingError> {
    let to = binding.effective();
    if to == BindTo::None {
        return Ok(vec![None; ranks]);
    }
    let per_rank = binding.cpus_per_rank.unwrap_or(1).max(1) as usize;
    let (units, unit) = match to {
        BindTo::Hwthread => (&cpus.hwthreads, "hardware thread"),
        _ => (&cpus.cores, "core"),
    };
    // A topology without cores (a virtual machine can say so): each CPU its own core.
    let singles: Vec<Vec<usize>> = cpus.allowed.iter().map(|&c| vec![c]).collect();
    let units = if units.is_empty() { &singles } else { units };
    let need = ranks * per_rank;
    let own_units = matches!(to, BindTo::Core | BindTo::Hwthread);
    if own_units && need > units.len() {
        return Err(BindingError::NotEnough {
            to: to.as_str(),
            per_rank,
            need,
            unit,
            ranks,
            have: units.len(),
            cpus: cpu_list(&cpus.allowed),
        });
    }
    let containers = match to {
        BindTo::Socket => &cpus.sockets,
        BindTo::Numa => &cpus.numa,
        _ => units,
    };
    let mut out = Vec::with_capacity(ranks);
    for r in 0..ranks {
        let mut set: Vec<usize> = Vec::new();
        for u in 0..per_rank {
            let unit = &units[(r * per_rank + u) % units.len()];
            if own_units {
                set.extend(unit);
            } else {
                // The socket or NUMA node holding this core; all allowed CPUs if none does.
                match containers
                    .iter()
                    .find(|c| unit.iter().any(|cpu| c.contains(cpu)))
                {
                    Some(c) => set.extend(c),
                    None => set.extend(&cpus.allowed),
                }
            }
        }
        set.sort_unstable();
        set.dedup();
        out.push(Some(set));
    }
    Ok(out)
}

/// `0-3,8,10-11`: a list of CPU numbers as `/proc/self/status` writes `Cpus_allowed_list`.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// A kernel CPU set of `cpus`; CPU numbers beyond what the kernel set holds are left out.
pub fn cpu_set(cpus: &[usize]) -> CpuSet {
    let mut set = CpuSet::new();
    for &c in cpus {
        let _ = set.set(c);
    }
    set
}

/// `--report-bindings`: what `rank` on `host` got.
pub fn report_line(rank: u32, host: &str, cpus: Option<&[usize]>, allowed: &[usize]) -> String {
    match cpus {
        Some(c) => format!("rank {rank} on {host} bound to CPUs {}", cpu_list(c)),
        None => format!(
            "rank {rank} on {host} not bound (it may run on CPUs {})",
            cpu_list(allowed)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2 sockets x 2 cores x 2 hardware threads: CPUs 0-7, core k has CPUs 2k and 2k+1.
    fn machine() -> NodeCpus {
        NodeCpus {
            allowed: (0..8).collect(),
            hwthreads: (0..8).map(|c| vec![c]).collect(),
            cores: (0..4).map(|k| vec![2 * k, 2 * k + 1]).collect(),
            sockets: vec![(0..4).collect(), (4..8).collect()],
            numa: vec![(0..8).collect()],
        }
    }

    fn spec(to: Option<BindTo>, per: Option<u32>) -> BindingSpec {
        BindingSpec {
            to,
            cpus_per_rank: per,
            report: false,
        }
    }

    fn lists(v: Vec<Option<Vec<usize>>>) -> Vec<String> {
        v.into_iter()
            .map(|s| s.map_or("-".into(), |c| cpu_list(&c)))
            .collect()
    }

    #[test]
    fn cores_threads_sockets_and_numa() {
        let m = machine();
        let a = |to, per, n| lists(assign(&spec(to, per), &m, n).unwrap());
        assert_eq!(a(None, None, 2), ["-", "-"]);
        assert_eq!(a(Some(BindTo::None), Some(2), 2), ["-", "-"]);
        assert_eq!(a(Some(BindTo::Core), None, 3), ["0-1", "2-3", "4-5"]);
        assert_eq!(a(None, Some(2), 2), ["0-3", "4-7"]);
        assert_eq!(a(Some(BindTo::Hwthread), None, 3), ["0", "1", "2"]);
        assert_eq!(a(Some(BindTo::Hwthread), Some(3), 2), ["0-2", "3-5"]);
        assert_eq!(
            a(Some(BindTo::Socket), None, 5),
            ["0-3", "0-3", "4-7", "4-7", "0-3"]
        );
        assert_eq!(a(Some(BindTo::Numa), None, 2), ["0-7", "0-7"]);
    }

    #[test]
    fn only_the_allowed_cpus_and_never_more_than_there_are() {
        // A cpuset of CPUs 2-5: cores 1 and 2 only.
        let m = NodeCpus {
            allowed: (2..6).collect(),
            hwthreads: (2..6).map(|c| vec![c]).collect(),
            cores: vec![vec![2, 3], vec![4, 5]],
            sockets: vec![vec![2, 3], vec![4, 5]],
            numa: vec![(2..6).collect()],
        };
        let got = assign(&spec(Some(BindTo::Core), None), &m, 2).unwrap();
        assert_eq!(lists(got), ["2-3", "4-5"]);
        let e = assign(&spec(Some(BindTo::Core), Some(2)), &m, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs 4 cores for 2 rank(s)") && e.contains("use 2 (2-5)"),
            "{e}"
        );
        // No core objects: each allowed CPU counts as one.
        let flat = NodeCpus {
            allowed: vec![0, 1],
            ..NodeCpus::default()
        };
        let got = assign(&spec(Some(BindTo::Core), None), &flat, 2).unwrap();
        assert_eq!(lists(got), ["0", "1"]);
        let got = assign(&spec(Some(BindTo::Socket), None), &flat, 1).unwrap();
        assert_eq!(lists(got), ["0-1"]);
    }

    #[test]
    fn lists_as_the_kernel_writes_them() {
        assert_eq!(cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(cpu_list(&[5]), "5");
        assert_eq!(cpu_list(&[]), "");
    }

    #[test]
    fn this_node_reads() {
        let cpus = NodeCpus::read().expect("topology");
        assert!(!cpus.allowed.is_empty());
        assert!(
            cpus.cores
                .iter()
                .flatten()
                .all(|c| cpus.allowed.contains(c))
        );
    }
}
