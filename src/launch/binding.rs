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

use crate::jobspec::{BindTo, BindingSpec, Rankfile, SlotItem};

/// Why the ranks cannot be bound as asked.
#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    /// More cores (or hardware threads) asked for than this process may use.
    #[error(
        "--bind-to {to} with {per_rank} per rank needs {need} {unit}s for {ranks} rank(s), but \
         this node lets the job use {have} ({cpus}); run fewer ranks, lower --cpus-per-rank, \
         let ranks share {unit}s with --bind-to {to}:overload-allowed, or \
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
    /// hydra's `-bind-to user:…` names a set without a CPU the job may use.
    #[error(
        "-bind-to user: the set {set} holds no CPU this node lets the job use ({cpus}); name \
         CPUs among those"
    )]
    UserSet {
        /// The set as a CPU list.
        set: String,
        /// The CPUs the job may use.
        cpus: String,
    },
    /// A rank of the job has no line in the rankfile.
    #[error(
        "{path}: no line for rank {rank} (the job has {ranks} rank(s)); add `rank {rank}=HOST \
         slot=…` or run fewer ranks"
    )]
    RankfileMissing {
        /// The rankfile.
        path: std::path::PathBuf,
        /// The rank without a line.
        rank: u32,
        /// The job's ranks.
        ranks: usize,
    },
    /// A rankfile slot that this node does not have.
    #[error("{path}:{line}: slot={slot}: {message}")]
    RankfileSlot {
        /// The rankfile.
        path: std::path::PathBuf,
        /// The line.
        line: usize,
        /// The slot list as written.
        slot: String,
        /// What is wrong.
        message: String,
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
            BindingError::NotEnough { .. }
            | BindingError::UserSet { .. }
            | BindingError::RankfileMissing { .. }
            | BindingError::RankfileSlot { .. } => crate::exit::Fault::User,
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
    /// L1, L2 and L3 caches (data or unified), in that order.
    pub caches: [Vec<Vec<usize>>; 3],
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
            caches: [
                of(ObjectType::L1Cache),
                of(ObjectType::L2Cache),
                of(ObjectType::L3Cache),
            ],
            allowed,
        })
    }
}

/// The CPUs of each of `ranks` ranks on a node with `cpus`, as `binding` asks: `None` for every
/// rank when nothing is asked. A rankfile decides alone ([`rankfile_cpus`]). Otherwise ranks
/// take consecutive cores (or hardware threads), `cpus_per_rank` each (default 1); bound to a
/// cache, socket, NUMA node or the machine, a rank gets every CPU of the objects its cores are
/// in, and ranks beyond the cores wrap around (several ranks per socket is the point of socket
/// binding). Bound to cores or hardware threads, each gets its own, and asking for more than
/// there are is an error unless overload is allowed (`:overload-allowed`, not `--oversubscribe`):
/// then ranks wrap around the cores as Open MPI does, several per core. `rr` gives each rank one
/// CPU in the kernel's numbering, round-robin; `user:` sets are taken in turn.
pub fn assign(
    binding: &BindingSpec,
    cpus: &NodeCpus,
    ranks: usize,
) -> Result<Vec<Option<Vec<usize>>>, BindingError> {
    if let Some(rankfile) = &binding.rankfile {
        return rankfile_cpus(rankfile, cpus, ranks);
    }
    let to = binding.effective();
    let cycle = |sets: &[Vec<usize>]| {
        (0..ranks)
            .map(|r| Some(sets[r % sets.len()].clone()))
            .collect()
    };
    match to {
        BindTo::None => return Ok(vec![None; ranks]),
        BindTo::Machine => return Ok(vec![Some(cpus.allowed.clone()); ranks]),
        BindTo::Rr if !cpus.allowed.is_empty() => {
            let singles: Vec<Vec<usize>> = cpus.allowed.iter().map(|&c| vec![c]).collect();
            return Ok(cycle(&singles));
        }
        BindTo::User if !binding.user.is_empty() => {
            let mut sets = Vec::with_capacity(binding.user.len());
            for set in &binding.user {
                let mine: Vec<usize> = cpus
                    .allowed
                    .iter()
                    .copied()
                    .filter(|c| set.contains(c))
                    .collect();
                if mine.is_empty() {
                    return Err(BindingError::UserSet {
                        set: cpu_list(set),
                        cpus: cpu_list(&cpus.allowed),
                    });
                }
                sets.push(mine);
            }
            return Ok(cycle(&sets));
        }
        _ => {}
    }
    let per_rank = binding.cpus_per_rank.unwrap_or(1).max(1) as usize;
    let (units, unit) = match to {
        BindTo::Hwthread | BindTo::Rr => (&cpus.hwthreads, "hardware thread"),
        _ => (&cpus.cores, "core"),
    };
    // A topology without cores (a virtual machine can say so): each CPU its own core.
    let singles: Vec<Vec<usize>> = cpus.allowed.iter().map(|&c| vec![c]).collect();
    let units = if units.is_empty() { &singles } else { units };
    let need = ranks * per_rank;
    let own_units = matches!(
        to,
        BindTo::Core | BindTo::Hwthread | BindTo::Rr | BindTo::User
    );
    if own_units && need > units.len() && !binding.overload {
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
        BindTo::L1cache => &cpus.caches[0],
        BindTo::L2cache => &cpus.caches[1],
        BindTo::L3cache => &cpus.caches[2],
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
                // The object holding this core; all allowed CPUs if none does.
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

/// For `-v`: how many ranks share each core (or hardware thread) when overload let more ranks
/// than there are be bound to them; `None` when each has its own.
pub fn overload_note(binding: &BindingSpec, cpus: &NodeCpus, ranks: usize) -> Option<String> {
    let to = binding.effective();
    if !binding.overload
        || binding.rankfile.is_some()
        || !matches!(to, BindTo::Core | BindTo::Hwthread)
    {
        return None;
    }
    let per_rank = binding.cpus_per_rank.unwrap_or(1).max(1) as usize;
    let (units, unit) = match to {
        BindTo::Hwthread => (cpus.hwthreads.len(), "hardware thread"),
        _ => (cpus.cores.len(), "core"),
    };
    let units = if units == 0 {
        cpus.allowed.len()
    } else {
        units
    };
    let need = ranks * per_rank;
    (units > 0 && need > units).then(|| {
        format!(
            "overload allowed: {ranks} rank(s) with {per_rank} {unit}(s) each wrap around the {units} \
             {unit}(s) this node lets the job use, up to {} rank(s) per {unit}",
            need.div_ceil(units)
        )
    })
}

/// The CPUs of each rank from an Open MPI rankfile: rank `r` gets the CPUs of the slots on its
/// line. Socket and core numbers are logical, counted among the objects holding CPUs the job
/// may use (as Open MPI counts them); a core is all its hardware threads. A rank without a
/// line, or a slot this node lacks, is an error naming the file (and line).
pub fn rankfile_cpus(
    rankfile: &Rankfile,
    cpus: &NodeCpus,
    ranks: usize,
) -> Result<Vec<Option<Vec<usize>>>, BindingError> {
    let singles: Vec<Vec<usize>> = cpus.allowed.iter().map(|&c| vec![c]).collect();
    let cores = if cpus.cores.is_empty() {
        &singles
    } else {
        &cpus.cores
    };
    let whole = [cpus.allowed.clone()];
    let sockets: &[Vec<usize>] = if cpus.sockets.is_empty() {
        &whole
    } else {
        &cpus.sockets
    };
    let mut out = Vec::with_capacity(ranks);
    for r in 0..ranks {
        let rank = r as u32;
        let line = rankfile
            .lines
            .iter()
            .find(|l| l.rank == rank)
            .ok_or_else(|| BindingError::RankfileMissing {
                path: rankfile.path.clone(),
                rank,
                ranks,
            })?;
        let fail = |message: String| BindingError::RankfileSlot {
            path: rankfile.path.clone(),
            line: line.line,
            slot: line.slot.clone(),
            message,
        };
        let mut set = Vec::new();
        for item in line.slots().map_err(fail)? {
            match item {
                SlotItem::SocketCores { socket, cores: of } => {
                    let s = sockets.get(socket).ok_or_else(|| {
                        fail(format!(
                            "no socket {socket}: this node lets the job use {} socket(s), 0-{}",
                            sockets.len(),
                            sockets.len() - 1
                        ))
                    })?;
                    let in_socket: Vec<&Vec<usize>> = cores
                        .iter()
                        .filter(|c| c.iter().any(|cpu| s.contains(cpu)))
                        .collect();
                    match of {
                        None => set.extend(s),
                        Some(list) => {
                            for k in list {
                                let core = in_socket.get(k).ok_or_else(|| {
                                    fail(format!(
                                        "socket {socket} has no core {k}: the job may use {} \
                                         core(s) of it, 0-{}",
                                        in_socket.len(),
                                        in_socket.len().saturating_sub(1)
                                    ))
                                })?;
                                set.extend(core.iter());
                            }
                        }
                    }
                }
                SlotItem::Cores(list) => {
                    for k in list {
                        let core = cores.get(k).ok_or_else(|| {
                            fail(format!(
                                "no core {k}: this node lets the job use {} core(s), 0-{}",
                                cores.len(),
                                cores.len().saturating_sub(1)
                            ))
                        })?;
                        set.extend(core);
                    }
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
            caches: [
                (0..4).map(|k| vec![2 * k, 2 * k + 1]).collect(),
                (0..4).map(|k| vec![2 * k, 2 * k + 1]).collect(),
                vec![(0..4).collect(), (4..8).collect()],
            ],
        }
    }

    /// 2 sockets x 4 cores x 2 hardware threads, numbered as Linux numbers many Intel servers:
    /// the first threads of every core (CPUs 0-7: socket 0 has 0-3, socket 1 has 4-7), then
    /// their siblings (CPUs 8-15), so core k has CPUs k and k+8. One NUMA node and one L3 per
    /// socket; L1 and L2 per core.
    fn two_by_four_by_two() -> NodeCpus {
        let cores: Vec<Vec<usize>> = (0..8).map(|k| vec![k, k + 8]).collect();
        let sockets: Vec<Vec<usize>> = vec![
            vec![0, 1, 2, 3, 8, 9, 10, 11],
            vec![4, 5, 6, 7, 12, 13, 14, 15],
        ];
        NodeCpus {
            allowed: (0..16).collect(),
            hwthreads: cores.iter().flatten().map(|&c| vec![c]).collect(),
            cores: cores.clone(),
            sockets: sockets.clone(),
            numa: sockets.clone(),
            caches: [cores.clone(), cores, sockets],
        }
    }

    fn spec(to: Option<BindTo>, per: Option<u32>) -> BindingSpec {
        BindingSpec {
            to,
            cpus_per_rank: per,
            ..BindingSpec::default()
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
            caches: Default::default(),
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
    fn two_sockets_of_four_cores_of_two_threads() {
        let m = two_by_four_by_two();
        let a = |to, per, n| lists(assign(&spec(to, per), &m, n).unwrap());
        // A core is both its threads, which the kernel numbers 8 apart.
        assert_eq!(a(Some(BindTo::Core), None, 3), ["0,8", "1,9", "2,10"]);
        assert_eq!(a(None, Some(2), 2), ["0-1,8-9", "2-3,10-11"]);
        // Hardware threads in the topology's order: both threads of core 0 first.
        assert_eq!(a(Some(BindTo::Hwthread), None, 3), ["0", "8", "1"]);
        // Ranks 0-3 on the cores of socket 0, 4-7 on those of socket 1.
        let by_socket = a(Some(BindTo::Socket), None, 8);
        assert_eq!(by_socket[..4], ["0-3,8-11"; 4]);
        assert_eq!(by_socket[4..], ["4-7,12-15"; 4]);
        assert_eq!(a(Some(BindTo::Numa), None, 5)[4], "4-7,12-15");
        assert_eq!(
            a(Some(BindTo::L3cache), None, 5)[3..],
            ["0-3,8-11", "4-7,12-15"]
        );
        assert_eq!(a(Some(BindTo::L2cache), None, 2), ["0,8", "1,9"]);
        assert_eq!(a(Some(BindTo::L1cache), Some(2), 1), ["0-1,8-9"]);
        assert_eq!(a(Some(BindTo::Machine), None, 2), ["0-15", "0-15"]);
        // rr: the kernel's numbering, one CPU each.
        assert_eq!(a(Some(BindTo::Rr), None, 3), ["0", "1", "2"]);
        // 4 ranks of 2 cores take all 8; a ninth core is refused.
        assert_eq!(a(None, Some(2), 4)[3], "6-7,14-15");
        let e = assign(&spec(Some(BindTo::Core), None), &m, 9)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs 9 cores for 9 rank(s)") && e.contains("use 8 (0-15)"),
            "{e}"
        );
        assert!(e.contains("--bind-to core:overload-allowed"), "{e}");
    }

    #[test]
    fn overload_wraps_ranks_around_the_cores() {
        // This machine's shape: 2 cores of one thread each.
        let m = NodeCpus {
            allowed: vec![0, 1],
            hwthreads: vec![vec![0], vec![1]],
            cores: vec![vec![0], vec![1]],
            sockets: vec![vec![0, 1]],
            numa: vec![vec![0, 1]],
            caches: [
                vec![vec![0], vec![1]],
                vec![vec![0], vec![1]],
                vec![vec![0, 1]],
            ],
        };
        let mut b = spec(Some(BindTo::Core), None);
        assert!(assign(&b, &m, 4).is_err());
        assert_eq!(overload_note(&b, &m, 4), None);
        b.overload = true;
        assert_eq!(lists(assign(&b, &m, 4).unwrap()), ["0", "1", "0", "1"]);
        let note = overload_note(&b, &m, 4).unwrap();
        assert!(
            note.contains("4 rank(s)") && note.contains("up to 2 rank(s) per core"),
            "{note}"
        );
        assert_eq!(overload_note(&b, &m, 2), None);
        b.cpus_per_rank = Some(2);
        assert_eq!(lists(assign(&b, &m, 3).unwrap()), ["0-1", "0-1", "0-1"]);
        let m8 = two_by_four_by_two();
        b.cpus_per_rank = None;
        let got = lists(assign(&b, &m8, 10).unwrap());
        assert_eq!(got[8..], ["0,8", "1,9"]);
    }

    #[test]
    fn user_sets_are_taken_in_turn() {
        let m = machine();
        let mut b = spec(Some(BindTo::User), None);
        b.user = vec![vec![0, 2], vec![1, 4], vec![3]];
        assert_eq!(
            lists(assign(&b, &m, 4).unwrap()),
            ["0,2", "1,4", "3", "0,2"]
        );
        b.user = vec![vec![9]];
        let e = assign(&b, &m, 1).unwrap_err().to_string();
        assert!(e.contains("user: the set 9") && e.contains("(0-7)"), "{e}");
    }

    #[test]
    fn rankfile_slots() {
        use crate::jobspec::RankfileLine;
        let m = two_by_four_by_two();
        let line = |n: usize, rank: u32, slot: &str| RankfileLine {
            line: n,
            rank,
            host: "n1".into(),
            slot: slot.into(),
        };
        let mut rf = Rankfile {
            path: "/rf".into(),
            lines: vec![
                line(1, 0, "1:0-2"),
                line(2, 1, "0:0,1"),
                line(3, 2, "1-2"),
                line(4, 3, "0:*"),
                line(5, 4, "0:3;1:0"),
            ],
        };
        let got = lists(rankfile_cpus(&rf, &m, 5).unwrap());
        assert_eq!(
            got,
            ["4-6,12-14", "0-1,8-9", "1-2,9-10", "0-3,8-11", "3-4,11-12"]
        );
        // The binding spec hands a rankfile to it, whatever --bind-to says.
        let mut b = spec(Some(BindTo::Socket), None);
        b.rankfile = Some(rf.clone());
        assert_eq!(lists(assign(&b, &m, 1).unwrap()), ["4-6,12-14"]);
        let e = rankfile_cpus(&rf, &m, 6).unwrap_err().to_string();
        assert!(
            e.starts_with("/rf: no line for rank 5 (the job has 6 rank(s))"),
            "{e}"
        );
        rf.lines = vec![line(7, 0, "2:0")];
        let e = rankfile_cpus(&rf, &m, 1).unwrap_err().to_string();
        assert_eq!(
            e,
            "/rf:7: slot=2:0: no socket 2: this node lets the job use 2 socket(s), 0-1"
        );
        rf.lines = vec![line(3, 0, "1:4")];
        let e = rankfile_cpus(&rf, &m, 1).unwrap_err().to_string();
        assert!(e.contains("socket 1 has no core 4"), "{e}");
        rf.lines = vec![line(3, 0, "8")];
        let e = rankfile_cpus(&rf, &m, 1).unwrap_err().to_string();
        assert!(e.contains("/rf:3: slot=8: no core 8"), "{e}");
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
