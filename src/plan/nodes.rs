//! The nodes a job runs on and the ranks each takes per round, by launcher: this host (local),
//! the `-H`/hostfile list (hydra), the Slurm allocation (slurm).

use super::PlanError;
use super::layout::{self, NodeSlots};
use crate::facts::HostFacts;
use crate::jobspec::{JobSpec, LauncherKind};

/// The nodes of a job that `kind` starts; a note for the user goes to `warnings`.
pub(super) fn nodes(
    spec: &JobSpec,
    kind: LauncherKind,
    host: &HostFacts,
    warnings: &mut Vec<String>,
) -> Result<Vec<NodeSlots>, PlanError> {
    let has_hosts = !spec.hosts.is_empty();
    Ok(match kind {
        LauncherKind::Local => {
            if let Some(other) = spec
                .hosts
                .iter()
                .find(|h| !is_this_host(&h.name, &host.hostname))
            {
                return Err(PlanError::RemoteHostsNeedLauncher {
                    origin: host_origin(spec),
                    host: other.name.clone(),
                    this: host.hostname.clone(),
                });
            }
            let slots = spec
                .ppn
                .or_else(|| {
                    let s = spec
                        .hosts
                        .iter()
                        .fold(0u32, |a, h| a.saturating_add(h.slots.unwrap_or(1)));
                    (s > 0).then_some(s)
                })
                .unwrap_or(host.cpus.max(1));
            vec![NodeSlots {
                name: host.hostname.clone(),
                slots,
            }]
        }
        LauncherKind::Mpirun if has_hosts => merged_hosts(spec)
            .into_iter()
            .map(|h| NodeSlots {
                slots: spec.ppn.unwrap_or(h.slots),
                name: h.name,
            })
            .collect(),
        LauncherKind::Mpirun => vec![NodeSlots {
            name: host.hostname.clone(),
            slots: spec.ppn.unwrap_or(host.cpus.max(1)),
        }],
        LauncherKind::Hydra => {
            if !has_hosts {
                return Err(PlanError::HydraWithoutHosts);
            }
            merged_hosts(spec)
                .into_iter()
                .map(|h| NodeSlots {
                    slots: spec.ppn.unwrap_or(h.slots),
                    name: h.name,
                })
                .collect()
        }
        LauncherKind::Slurm => {
            let list = host
                .env
                .get("SLURM_JOB_NODELIST")
                .or_else(|| host.env.get("SLURM_NODELIST"))
                .ok_or(PlanError::NoAllocation)?;
            let names = layout::expand_nodelist(list)?;
            let tasks = match host.env.get("SLURM_TASKS_PER_NODE") {
                Some(t) => layout::expand_tasks_per_node(t)?,
                None => vec![1; names.len()],
            };
            if has_hosts {
                warnings.push(format!(
                    "{} is ignored under Slurm: srun places ranks on the allocation's nodes",
                    host_origin(spec)
                ));
            }
            names
                .into_iter()
                .enumerate()
                .map(|(i, name)| NodeSlots {
                    name,
                    slots: spec
                        .ppn
                        .unwrap_or_else(|| tasks.get(i).copied().unwrap_or(1))
                        .max(1),
                })
                .collect()
        }
    })
}

/// Where the job's host list comes from, as the user wrote it.
pub(super) fn host_origin(spec: &JobSpec) -> String {
    match &spec.hostfile {
        Some(f) => format!("hostfile {}", f.display()),
        None => "-H".to_owned(),
    }
}

/// The hosts of `-H`/the hostfile, each once, in order of first appearance, with their slots
/// added up: Open MPI and hydra read `-H a,a,b` as two slots on `a`, not two nodes.
fn merged_hosts(spec: &JobSpec) -> Vec<NodeSlots> {
    let mut out: Vec<NodeSlots> = Vec::new();
    // Where each name is in `out`: thousands of hosts are looked up in constant time.
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for h in &spec.hosts {
        let slots = h.slots.unwrap_or(1);
        match index.get(h.name.as_str()) {
            Some(&i) => out[i].slots = out[i].slots.saturating_add(slots),
            None => {
                index.insert(&h.name, out.len());
                out.push(NodeSlots {
                    name: h.name.clone(),
                    slots,
                });
            }
        }
    }
    out
}

/// The host list as `mpiexec.hydra -hosts` takes it: `name:slots,…`.
pub(super) fn hydra_hosts(spec: &JobSpec) -> String {
    merged_hosts(spec)
        .iter()
        .map(|h| format!("{}:{}", h.name, h.slots))
        .collect::<Vec<_>>()
        .join(",")
}

/// Under the local launcher, every host a rankfile names must be this one.
pub(super) fn rankfile_hosts(spec: &JobSpec, host: &HostFacts) -> Result<(), PlanError> {
    let Some(rf) = &spec.binding.rankfile else {
        return Ok(());
    };
    match rf
        .lines
        .iter()
        .find(|l| !is_this_host(&l.host, &host.hostname))
    {
        Some(l) => Err(PlanError::RankfileHost {
            path: rf.path.clone(),
            line: l.line,
            rank: l.rank,
            host: l.host.clone(),
            this: host.hostname.clone(),
        }),
        None => Ok(()),
    }
}

/// Whether a host name from `-H`/a hostfile means this machine.
fn is_this_host(name: &str, hostname: &str) -> bool {
    let short = |s: &str| s.split('.').next().unwrap_or(s).to_owned();
    name == "localhost" || name == "127.0.0.1" || name == hostname || short(name) == short(hostname)
}
