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

/// Where every rank runs, described by its rule rather than listed rank by rank: the job's
/// size, the mapping, and the nodes with their slots per round. A task computes its own rank's
/// place ([`RankLayout::locate`]) from it, so the plan every task gets does not grow with the
/// number of ranks (only with the number of nodes).
///
/// Placement: block: each node takes its `slots` ranks in turn; if ranks remain once every node
/// is full, placement goes round again (as hydra does), so a job larger than its slots still
/// runs. Cyclic: consecutive ranks go to consecutive nodes, skipping a node once it holds its
/// slots in the current round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "LayoutFields")]
pub struct RankLayout {
    /// Total number of ranks.
    pub size: u32,
    /// Block or cyclic.
    pub mapping: Mapping,
    /// The nodes that run at least one rank, in node-id order (the order given; those the job
    /// does not reach are left out), each with its ranks per round (at least 1).
    pub nodes: Vec<NodeSlots>,
    /// The `PMI_process_mapping` value (MPICH's `(vector,(start,count,ranks),…)` grammar), or
    /// empty when it is longer than a PMI value may be ([`PROCESS_MAPPING_MAX`]): MPICH then
    /// finds the ranks that share a node by exchanging host names.
    pub process_mapping: String,
}

/// The longest `PMI_process_mapping` kept: a PMI value holds at most 1024 bytes with its NUL
/// (cmpirun's PMI server gives "unknown" beyond, as hydra does).
pub const PROCESS_MAPPING_MAX: usize = 1023;

/// Where one rank runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankPlace {
    /// Its node id (an index into [`RankLayout::nodes`]).
    pub node: u32,
    /// Its index among the ranks of its node.
    pub local_rank: u32,
}

/// [`RankLayout`] as it is read, checked before use: a plan comes from another process.
#[derive(Deserialize)]
struct LayoutFields {
    size: u32,
    mapping: Mapping,
    nodes: Vec<NodeSlots>,
    process_mapping: String,
}

impl TryFrom<LayoutFields> for RankLayout {
    type Error = String;

    fn try_from(f: LayoutFields) -> Result<Self, String> {
        if let Some(n) = f.nodes.iter().find(|n| n.slots == 0) {
            return Err(format!("layout: node {:?} has 0 slots", n.name));
        }
        if f.size > 0 && f.nodes.is_empty() {
            return Err(format!("layout: {} ranks on no node", f.size));
        }
        if f.nodes.len() > f.size as usize {
            return Err(format!(
                "layout: {} nodes for {} ranks (every node listed runs a rank)",
                f.nodes.len(),
                f.size
            ));
        }
        Ok(RankLayout {
            size: f.size,
            mapping: f.mapping,
            nodes: f.nodes,
            process_mapping: f.process_mapping,
        })
    }
}

impl RankLayout {
    /// Places `size` ranks on `nodes` (see the [type's documentation](RankLayout)); nodes no
    /// rank reaches are left out.
    ///
    /// `nodes` must not be empty and no node may have 0 slots; callers guarantee both (an empty
    /// list is read as one unnamed node, 0 slots as 1).
    pub fn place(size: u32, nodes: &[NodeSlots], mapping: Mapping) -> RankLayout {
        let mut nodes: Vec<NodeSlots> = nodes
            .iter()
            .map(|n| NodeSlots {
                name: n.name.clone(),
                slots: n.slots.max(1),
            })
            .collect();
        if nodes.is_empty() {
            nodes.push(NodeSlots {
                name: String::new(),
                slots: size.max(1),
            });
        }
        // Nodes are reached in the order given; those whose first rank would be past the job's
        // last are not reached at all.
        let mut first = 0u64;
        let used = nodes
            .iter()
            .take_while(|n| {
                let reached = first < u64::from(size);
                first += match mapping {
                    Mapping::Block => u64::from(n.slots),
                    Mapping::Cyclic => 1,
                };
                reached
            })
            .count();
        nodes.truncate(used);
        let mut layout = RankLayout {
            size,
            mapping,
            nodes,
            process_mapping: String::new(),
        };
        let mapping = process_mapping(&layout.node_of_rank());
        if mapping.len() <= PROCESS_MAPPING_MAX {
            layout.process_mapping = mapping;
        }
        layout
    }

    /// Where `rank` runs, computed from the rule alone: what a task needs for its own rank,
    /// in time linear in the number of nodes (and their sort, for cyclic), whatever the job's
    /// size. `None` past the job's last rank.
    pub fn locate(&self, rank: u32) -> Option<RankPlace> {
        if rank >= self.size || self.nodes.is_empty() {
            return None;
        }
        let slots = |i: usize| u64::from(self.nodes[i].slots.max(1));
        let capacity: u64 = (0..self.nodes.len()).map(slots).sum();
        let (round, offset) = (u64::from(rank) / capacity, u64::from(rank) % capacity);
        let (node, in_round) = match self.mapping {
            Mapping::Block => {
                let mut start = 0u64;
                let mut found = None;
                for i in 0..self.nodes.len() {
                    if offset < start + slots(i) {
                        found = Some((i, offset - start));
                        break;
                    }
                    start += slots(i);
                }
                found?
            }
            Mapping::Cyclic => {
                // A round is made of passes: pass k gives one rank to every node with more than
                // k slots, in order. Between two distinct slot counts the passes are alike.
                let n = self.nodes.len();
                let mut sorted: Vec<u64> = (0..n).map(slots).collect();
                sorted.sort_unstable();
                let (mut base, mut below) = (0u64, 0u64);
                let mut found = None;
                for (j, &v) in sorted.iter().enumerate() {
                    if v == below {
                        continue;
                    }
                    // Passes `below..v` each give one rank to the `n - j` nodes with `v` slots
                    // or more.
                    let width = (n - j) as u64;
                    let span = (v - below) * width;
                    if offset < base + span {
                        let pass = below + (offset - base) / width;
                        let nth = ((offset - base) % width) as usize;
                        found = (0..n)
                            .filter(|&i| slots(i) > pass)
                            .nth(nth)
                            .map(|i| (i, pass));
                        break;
                    }
                    base += span;
                    below = v;
                }
                found?
            }
        };
        Some(RankPlace {
            node: node as u32,
            local_rank: u32::try_from(round * slots(node) + in_round).ok()?,
        })
    }

    /// Every rank's place, in rank order, by running the placement rank by rank (what the
    /// front end needs for the whole job: the dry run, the nodes of ranks that never reported);
    /// time linear in the job's size.
    pub fn places(&self) -> Vec<RankPlace> {
        let size = self.size;
        let mut out = Vec::with_capacity(size as usize);
        if self.nodes.is_empty() {
            return out;
        }
        let mut held = vec![0u32; self.nodes.len()];
        // Per round, the ranks each node still takes.
        let mut room: Vec<u32> = Vec::new();
        let mut put = |i: usize, out: &mut Vec<RankPlace>| {
            out.push(RankPlace {
                node: i as u32,
                local_rank: held[i],
            });
            held[i] += 1;
        };
        while (out.len() as u64) < u64::from(size) {
            if room.iter().all(|&r| r == 0) {
                room = self.nodes.iter().map(|n| n.slots.max(1)).collect();
            }
            for (i, r) in room.iter_mut().enumerate() {
                match self.mapping {
                    Mapping::Block => {
                        while *r > 0 && (out.len() as u64) < u64::from(size) {
                            put(i, &mut out);
                            *r -= 1;
                        }
                    }
                    Mapping::Cyclic => {
                        if *r > 0 && (out.len() as u64) < u64::from(size) {
                            put(i, &mut out);
                            *r -= 1;
                        }
                    }
                }
            }
        }
        out
    }

    /// Every rank's node id, in rank order.
    pub fn node_of_rank(&self) -> Vec<u32> {
        self.places().iter().map(|p| p.node).collect()
    }

    /// Every rank's local rank, in rank order.
    pub fn local_ranks(&self) -> Vec<u32> {
        self.places().iter().map(|p| p.local_rank).collect()
    }

    /// The ranks of every node, ascending, in node-id order.
    pub fn ranks_by_node(&self) -> Vec<Vec<u32>> {
        let mut out = vec![Vec::new(); self.nodes.len()];
        for (rank, p) in self.places().iter().enumerate() {
            out[p.node as usize].push(rank as u32);
        }
        out
    }

    /// The name of the node `rank` runs on.
    pub fn node_name(&self, rank: u32) -> Option<&str> {
        let p = self.locate(rank)?;
        self.nodes.get(p.node as usize).map(|n| n.name.as_str())
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
        assert_eq!(l.local_ranks()[17], 1);
        assert_eq!(l.node_of_rank()[63], 3);
    }

    #[test]
    fn block_with_uneven_slots_and_wraparound() {
        let l = RankLayout::place(5, &nodes(&[2, 1]), Mapping::Block);
        assert_eq!(l.node_of_rank(), [0, 0, 1, 0, 0]);
        assert_eq!(l.local_ranks(), [0, 1, 0, 2, 3]);
        // Ranks 3 and 4 come from the restart rule: the list starts over at (0,1,2).
        assert_eq!(l.process_mapping, "(vector,(0,1,2),(1,1,1))");
    }

    #[test]
    fn cyclic_is_round_robin() {
        let l = RankLayout::place(4, &nodes(&[2, 2]), Mapping::Cyclic);
        assert_eq!(l.node_of_rank(), [0, 1, 0, 1]);
        assert_eq!(l.process_mapping, "(vector,(0,2,1))");
        let l = RankLayout::place(5, &nodes(&[4, 1]), Mapping::Cyclic);
        assert_eq!(l.node_of_rank(), [0, 1, 0, 0, 0]);
        assert_eq!(l.local_ranks(), [0, 0, 1, 2, 3]);
    }

    #[test]
    fn unused_nodes_are_dropped() {
        let l = RankLayout::place(2, &nodes(&[4, 4]), Mapping::Block);
        assert_eq!(l.nodes.len(), 1);
        assert_eq!(l.process_mapping, "(vector,(0,1,2))");
        let l = RankLayout::place(2, &nodes(&[1, 1, 1]), Mapping::Cyclic);
        assert_eq!(l.nodes.len(), 2);
        assert_eq!(l.ranks_by_node(), [vec![0], vec![1]]);
    }

    #[test]
    fn a_process_mapping_longer_than_a_pmi_value_is_unknown() {
        // Alternating slot counts leave nothing to fold: one block per node.
        let slots: Vec<u32> = (0..300).map(|i| 1 + i % 2).collect();
        let l = RankLayout::place(450, &nodes(&slots), Mapping::Block);
        assert_eq!(l.process_mapping, "");
        assert!(process_mapping(&l.node_of_rank()).len() > PROCESS_MAPPING_MAX);
    }

    /// A small deterministic generator (xorshift), so that failures repeat.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[test]
    fn each_ranks_place_by_rule_is_the_one_the_placement_gives() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..150 {
            let n_nodes = 1 + rng.below(40) as usize;
            let slots: Vec<u32> = (0..n_nodes)
                .map(|_| match rng.below(3) {
                    0 => 1 + rng.below(4) as u32,
                    1 => 1 + rng.below(130) as u32,
                    _ => 64,
                })
                .collect();
            let capacity: u32 = slots.iter().sum();
            // Below, at and beyond the slots (wraparound).
            let size = match case % 3 {
                0 => 1 + rng.below(u64::from(capacity)) as u32,
                1 => capacity,
                _ => capacity + 1 + rng.below(u64::from(capacity) * 2) as u32,
            };
            for mapping in [Mapping::Block, Mapping::Cyclic] {
                let l = RankLayout::place(size, &nodes(&slots), mapping);
                let places = l.places();
                assert_eq!(places.len(), size as usize);
                let mut held = vec![0u32; l.nodes.len()];
                for (rank, p) in places.iter().enumerate() {
                    assert_eq!(
                        l.locate(rank as u32),
                        Some(*p),
                        "rank {rank} of {size}, {mapping:?}, slots {slots:?}"
                    );
                    // Local ranks count a node's ranks in rank order.
                    assert_eq!(p.local_rank, held[p.node as usize]);
                    held[p.node as usize] += 1;
                }
                // Every node listed runs a rank.
                assert!(held.iter().all(|&h| h > 0), "{slots:?} {size} {mapping:?}");
                assert_eq!(l.locate(size), None);
            }
        }
    }

    #[test]
    fn a_layout_read_from_a_plan_is_checked() {
        let read = |text: &str| serde_json::from_str::<RankLayout>(text).map_err(|e| e.to_string());
        let ok = r#"{"size":3,"mapping":"cyclic","nodes":[{"name":"a","slots":2},{"name":"b","slots":1}],"process_mapping":""}"#;
        let l = read(ok).unwrap();
        assert_eq!(l.node_of_rank(), [0, 1, 0]);
        let zero = ok.replace(r#""slots":1"#, r#""slots":0"#);
        assert!(read(&zero).unwrap_err().contains("0 slots"));
        let none = r#"{"size":3,"mapping":"block","nodes":[],"process_mapping":""}"#;
        assert!(read(none).unwrap_err().contains("no node"));
        let many = ok.replace(r#""size":3"#, r#""size":1"#);
        assert!(read(&many).unwrap_err().contains("2 nodes for 1 ranks"));
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
