//! The rank layout: which node each rank runs on, its local rank, and the `PMI_process_mapping`
//! string that tells MPICH-family MPIs which ranks share a node.
//!
//! Also reads Slurm's allocation from `SLURM_JOB_NODELIST` and `SLURM_TASKS_PER_NODE` (given as
//! data, not read from the process environment here).

use serde::{Deserialize, Serialize};

use crate::jobspec::Mapping;

/// A node and the number of ranks it takes in one round of placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSlots {
    /// The node's name.
    pub name: String,
    /// Ranks per round (slots, Slurm tasks, or `-ppn`).
    pub slots: u32,
}

/// Where every rank runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankLayout {
    /// Total number of ranks.
    pub size: u32,
    /// Block or cyclic.
    pub mapping: Mapping,
    /// The nodes that run at least one rank, in node-id order, with their ranks.
    pub nodes: Vec<NodeRanks>,
    /// For each rank, its node id (an index into `nodes`).
    pub node_of_rank: Vec<u32>,
    /// For each rank, its index among the ranks of its node.
    pub local_rank: Vec<u32>,
    /// The `PMI_process_mapping` value (MPICH's `(vector,(start,count,ranks),…)` grammar).
    pub process_mapping: String,
}

/// One node of a layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRanks {
    /// The node's name.
    pub name: String,
    /// Its ranks, ascending.
    pub ranks: Vec<u32>,
}

impl RankLayout {
    /// Places `size` ranks on `nodes`.
    ///
    /// Block: each node takes its `slots` ranks in turn; if ranks remain once every node is full,
    /// placement goes round again (as hydra does), so a job larger than its slots still runs.
    /// Cyclic: consecutive ranks go to consecutive nodes, skipping a node once it holds its
    /// slots in the current round.
    ///
    /// `nodes` must not be empty and no node may have 0 slots; callers guarantee both.
    pub fn place(size: u32, nodes: &[NodeSlots], mapping: Mapping) -> RankLayout {
        let mut node_of_rank = Vec::with_capacity(size as usize);
        let n_nodes = nodes.len().max(1);
        let mut placed = 0u32;
        // Per round, the ranks each node still takes.
        let mut room: Vec<u32> = Vec::new();
        while placed < size {
            if room.iter().all(|&r| r == 0) {
                room = nodes.iter().map(|n| n.slots.max(1)).collect();
                if room.is_empty() {
                    room = vec![size];
                }
            }
            match mapping {
                Mapping::Block => {
                    for (i, r) in room.iter_mut().enumerate() {
                        while *r > 0 && placed < size {
                            node_of_rank.push(i as u32);
                            *r -= 1;
                            placed += 1;
                        }
                    }
                }
                Mapping::Cyclic => {
                    for (i, r) in room.iter_mut().enumerate().take(n_nodes) {
                        if *r > 0 && placed < size {
                            node_of_rank.push(i as u32);
                            *r -= 1;
                            placed += 1;
                        }
                    }
                }
            }
        }
        Self::from_node_of_rank(node_of_rank, nodes, mapping)
    }

    /// Builds the layout from each rank's index into `nodes`, renumbering so node ids follow
    /// first use and unused nodes disappear.
    fn from_node_of_rank(assigned: Vec<u32>, nodes: &[NodeSlots], mapping: Mapping) -> RankLayout {
        let mut id_of: Vec<Option<u32>> = vec![None; nodes.len().max(1)];
        let mut out_nodes: Vec<NodeRanks> = Vec::new();
        let mut node_of_rank = Vec::with_capacity(assigned.len());
        let mut local_rank = Vec::with_capacity(assigned.len());
        for (rank, &i) in assigned.iter().enumerate() {
            let id = match id_of[i as usize] {
                Some(id) => id,
                None => {
                    let id = out_nodes.len() as u32;
                    id_of[i as usize] = Some(id);
                    out_nodes.push(NodeRanks {
                        name: nodes
                            .get(i as usize)
                            .map(|n| n.name.clone())
                            .unwrap_or_default(),
                        ranks: Vec::new(),
                    });
                    id
                }
            };
            let node = &mut out_nodes[id as usize];
            local_rank.push(node.ranks.len() as u32);
            node.ranks.push(rank as u32);
            node_of_rank.push(id);
        }
        let process_mapping = process_mapping(&node_of_rank);
        RankLayout {
            size: assigned.len() as u32,
            mapping,
            nodes: out_nodes,
            node_of_rank,
            local_rank,
            process_mapping,
        }
    }
}

/// Encodes node ids per rank in MPICH's `PMI_process_mapping` grammar, with the same encoder
/// cmpirun's PMI server uses (`cmpirun_pmi::mapping`), so the plan shows what ranks will read.
pub fn process_mapping(node_of_rank: &[u32]) -> String {
    cmpirun_pmi::mapping::format_process_mapping(node_of_rank)
}

/// A malformed Slurm variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("${var}={value:?}: {message}")]
pub struct SlurmVarError {
    /// The variable.
    pub var: &'static str,
    /// Its value.
    pub value: String,
    /// What is wrong.
    pub message: String,
}

/// Expands a Slurm host list such as `nid[001-003,007],login1` into host names.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, SlurmVarError> {
    let err = |message: &str| SlurmVarError {
        var: "SLURM_JOB_NODELIST",
        value: list.to_owned(),
        message: message.to_owned(),
    };
    let mut hosts = Vec::new();
    // Split at commas outside brackets.
    let mut depth = 0i32;
    let mut start = 0;
    let mut items = Vec::new();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(err("unbalanced brackets"));
        }
    }
    if depth != 0 {
        return Err(err("unbalanced brackets"));
    }
    items.push(&list[start..]);
    for item in items.into_iter().filter(|s| !s.is_empty()) {
        let Some(open) = item.find('[') else {
            hosts.push(item.to_owned());
            continue;
        };
        let close = item.rfind(']').ok_or_else(|| err("unbalanced brackets"))?;
        let (prefix, suffix) = (&item[..open], &item[close + 1..]);
        if suffix.contains('[') {
            return Err(err("only one bracket range per host name is supported"));
        }
        for range in item[open + 1..close].split(',') {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            let (a, b) = match (lo.parse::<u64>(), hi.parse::<u64>()) {
                (Ok(a), Ok(b)) if a <= b => (a, b),
                _ => return Err(err("a bracket range must be N or N-M with N <= M")),
            };
            if b - a > 1_000_000 {
                return Err(err("the range is too large"));
            }
            let width = lo.len();
            for n in a..=b {
                hosts.push(format!("{prefix}{n:0width$}{suffix}"));
            }
        }
    }
    if hosts.is_empty() {
        return Err(err("no host names"));
    }
    Ok(hosts)
}

/// Expands `SLURM_TASKS_PER_NODE` such as `2(x3),1` into one count per node.
pub fn expand_tasks_per_node(value: &str) -> Result<Vec<u32>, SlurmVarError> {
    let err = |message: &str| SlurmVarError {
        var: "SLURM_TASKS_PER_NODE",
        value: value.to_owned(),
        message: message.to_owned(),
    };
    let mut out = Vec::new();
    for item in value.split(',') {
        let (count, times) = match item.split_once("(x") {
            Some((c, rest)) => {
                let t = rest
                    .strip_suffix(')')
                    .and_then(|t| t.parse::<u32>().ok())
                    .ok_or_else(|| err("expected N or N(xM)"))?;
                (c, t)
            }
            None => (item, 1),
        };
        let c = count
            .parse::<u32>()
            .map_err(|_| err("expected N or N(xM)"))?;
        if times > 1_000_000 {
            return Err(err("the repeat count is too large"));
        }
        out.extend(std::iter::repeat_n(c, times as usize));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(slots: &[u32]) -> Vec<NodeSlots> {
        slots
            .iter()
            .enumerate()
            .map(|(i, &s)| NodeSlots {
                name: format!("n{i}"),
                slots: s,
            })
            .collect()
    }

    #[test]
    fn block_fills_slots_in_order() {
        let l = RankLayout::place(64, &nodes(&[16, 16, 16, 16]), Mapping::Block);
        assert_eq!(l.process_mapping, "(vector,(0,4,16))");
        assert_eq!(l.local_rank[17], 1);
        assert_eq!(l.node_of_rank[63], 3);
    }

    #[test]
    fn block_with_uneven_slots_and_wraparound() {
        let l = RankLayout::place(5, &nodes(&[2, 1]), Mapping::Block);
        assert_eq!(l.node_of_rank, [0, 0, 1, 0, 0]);
        assert_eq!(l.local_rank, [0, 1, 0, 2, 3]);
        // Ranks 3 and 4 come from the restart rule: the list starts over at (0,1,2).
        assert_eq!(l.process_mapping, "(vector,(0,1,2),(1,1,1))");
    }

    #[test]
    fn cyclic_is_round_robin() {
        let l = RankLayout::place(4, &nodes(&[2, 2]), Mapping::Cyclic);
        assert_eq!(l.node_of_rank, [0, 1, 0, 1]);
        assert_eq!(l.process_mapping, "(vector,(0,2,1))");
        let l = RankLayout::place(5, &nodes(&[4, 1]), Mapping::Cyclic);
        assert_eq!(l.node_of_rank, [0, 1, 0, 0, 0]);
    }

    #[test]
    fn unused_nodes_are_dropped() {
        let l = RankLayout::place(2, &nodes(&[4, 4]), Mapping::Block);
        assert_eq!(l.nodes.len(), 1);
        assert_eq!(l.process_mapping, "(vector,(0,1,2))");
    }

    #[test]
    fn slurm_variables() {
        assert_eq!(
            expand_nodelist("nid[001-003,007],login1").unwrap(),
            ["nid001", "nid002", "nid003", "nid007", "login1"]
        );
        assert_eq!(expand_nodelist("a[9-10]b").unwrap(), ["a9b", "a10b"]);
        assert!(expand_nodelist("nid[1-").is_err());
        assert_eq!(expand_tasks_per_node("2(x3),1").unwrap(), [2, 2, 2, 1]);
        assert!(expand_tasks_per_node("2(x").is_err());
    }
}
