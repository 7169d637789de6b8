//! `PMI_process_mapping`: MPICH's "vector" description of which node each rank runs on.
//!
//! ```text
//! mapping      = "(" "vector" "," entry *( "," entry ) ")"
//! entry        = block / block-repeat
//! block        = num / "(" num "," num "," num ")"   ; (start_node, n_nodes, ranks_per_node)
//! block-repeat = "[" block *( "," block ) "]x" num
//! ```
//!
//! Ranks are assigned in order. When the list is exhausted before every rank has a node, the
//! reader starts again at the first block whose start node is 0 (the legacy rule Slurm uses for
//! cyclic layouts). MPICH derives its shared-memory groups from this map, so it must match the
//! real layout.
//!
//! ```
//! use cmpirun_pmi::mapping::{format_process_mapping, parse_process_mapping};
//!
//! let nodes = [0, 0, 1, 1, 2, 2];
//! let text = format_process_mapping(&nodes);
//! assert_eq!(text, "(vector,(0,3,2))");
//! assert_eq!(parse_process_mapping(&text, 6).unwrap(), nodes);
//! ```

/// Why a `PMI_process_mapping` string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PMI_process_mapping {text:?}: {reason}")]
pub struct MappingError {
    /// The string that was given.
    pub text: String,
    /// What was wrong with it.
    pub reason: String,
}

/// Node ids renumbered in order of first appearance, so rank 0 is on node 0 and the ids are
/// dense (MPICH uses them as array indices).
pub fn normalize_nodes(node_of_rank: &[u32]) -> Vec<u32> {
    // A map, not a search of the ids seen: a million ranks on 10,000 nodes took seconds.
    let mut seen: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    node_of_rank
        .iter()
        .map(|n| {
            let next = seen.len() as u32;
            *seen.entry(*n).or_insert(next)
        })
        .collect()
}

/// The blocks `(start_node, n_nodes, ranks_per_node)` that describe `nodes` in order.
fn blocks(nodes: &[u32]) -> Vec<(u32, u32, u32)> {
    // Runs of equal nodes, then runs of runs on consecutive nodes with equal counts.
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &n in nodes {
        match runs.last_mut() {
            Some((node, count)) if *node == n => *count += 1,
            _ => runs.push((n, 1)),
        }
    }
    let mut out: Vec<(u32, u32, u32)> = Vec::new();
    for (node, count) in runs {
        match out.last_mut() {
            Some((start, n_nodes, ppn)) if *ppn == count && *start + *n_nodes == node => {
                *n_nodes += 1
            }
            _ => out.push((node, 1, count)),
        }
    }
    out
}

/// MPICH's vector string for a rank layout given as the node of each rank.
///
/// Node ids are renumbered by first appearance ([`normalize_nodes`]). A periodic layout
/// (round-robin) is written as one period and relies on the restart rule, which keeps the
/// string short for large jobs. Returns an empty string (MPICH's "unknown") for an empty job.
pub fn format_process_mapping(node_of_rank: &[u32]) -> String {
    let nodes = normalize_nodes(node_of_rank);
    if nodes.is_empty() {
        return String::new();
    }
    // Shortest prefix whose repetition gives the whole layout; rank 0 is on node 0 after
    // normalisation, so the restart rule starts over at the first block.
    let period = shortest_period(&nodes);
    let full = blocks(&nodes);
    let periodic = blocks(&nodes[..period]);
    let chosen = if periodic.len() < full.len() {
        periodic
    } else {
        full
    };
    let mut out = String::from("(vector");
    for (start, n_nodes, ppn) in chosen {
        out.push_str(&format!(",({start},{n_nodes},{ppn})"));
    }
    out.push(')');
    out
}

/// The shortest `p` with `s[i] == s[i % p]` for every `i`: the length less the longest proper
/// prefix that is also a suffix (Knuth–Morris–Pratt's failure function), in linear time (trying
/// each `p` in turn took minutes for a million ranks with one odd node).
fn shortest_period(s: &[u32]) -> usize {
    let mut border = vec![0usize; s.len()];
    let mut k = 0;
    for i in 1..s.len() {
        while k > 0 && s[i] != s[k] {
            k = border[k - 1];
        }
        if s[i] == s[k] {
            k += 1;
        }
        border[i] = k;
    }
    s.len() - border.last().copied().unwrap_or(0)
}

struct Reader<'a> {
    text: &'a str,
    pos: usize,
}

impl Reader<'_> {
    fn err(&self, reason: impl Into<String>) -> MappingError {
        MappingError {
            text: self.text.to_owned(),
            reason: format!("{} at byte {}", reason.into(), self.pos),
        }
    }
    fn skip_ws(&mut self) {
        while self.text[self.pos..].starts_with([' ', '\t']) {
            self.pos += 1;
        }
    }
    fn eat(&mut self, s: &str) -> bool {
        self.skip_ws();
        if self.text[self.pos..].starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }
    fn expect(&mut self, s: &str) -> Result<(), MappingError> {
        if self.eat(s) {
            Ok(())
        } else {
            Err(self.err(format!("expected {s:?}")))
        }
    }
    fn num(&mut self) -> Result<u32, MappingError> {
        self.skip_ws();
        let digits = self.text[self.pos..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        let n = self.text[self.pos..self.pos + digits]
            .parse()
            .map_err(|_| self.err("expected a number"))?;
        self.pos += digits;
        Ok(n)
    }
    fn block(&mut self) -> Result<(u32, u32, u32), MappingError> {
        if self.eat("(") {
            let start = self.num()?;
            self.expect(",")?;
            let n_nodes = self.num()?;
            self.expect(",")?;
            let ppn = self.num()?;
            self.expect(")")?;
            Ok((start, n_nodes, ppn))
        } else {
            Ok((self.num()?, 1, 1))
        }
    }
}

/// Read a vector mapping and return the node of each of `size` ranks.
///
/// An empty string is an error here: it means "unknown", and the caller must decide what that
/// implies.
pub fn parse_process_mapping(text: &str, size: usize) -> Result<Vec<u32>, MappingError> {
    let mut r = Reader { text, pos: 0 };
    r.expect("(")?;
    r.expect("vector")?;
    let mut entries: Vec<(u32, u32, u32)> = Vec::new();
    while r.eat(",") {
        if r.eat("[") {
            let mut group = vec![r.block()?];
            while r.eat(",") {
                group.push(r.block()?);
            }
            r.expect("]")?;
            r.expect("x")?;
            let times = r.num()?;
            if times as usize > size.max(1) {
                return Err(r.err("repeat count larger than the job"));
            }
            for _ in 0..times {
                entries.extend_from_slice(&group);
            }
        } else {
            entries.push(r.block()?);
        }
    }
    r.expect(")")?;
    r.skip_ws();
    if r.pos != text.len() {
        return Err(r.err("trailing text"));
    }
    if entries.is_empty() {
        return Err(r.err("no blocks"));
    }
    if entries.iter().all(|&(_, n, p)| n == 0 || p == 0) {
        return Err(r.err("every block is empty"));
    }
    // The restart point must yield ranks, or the loop below would never end.
    let restart = entries
        .iter()
        .position(|&(s, _, _)| s == 0)
        .filter(|&first| entries[first..].iter().any(|&(_, n, p)| n > 0 && p > 0));
    let mut out = Vec::with_capacity(size.min(1 << 16));
    let mut i = 0;
    while out.len() < size {
        if i == entries.len() {
            match restart {
                Some(first) => i = first,
                None => {
                    return Err(r.err(format!(
                        "describes {} ranks, the job has {size}, and no block starts at node 0",
                        out.len()
                    )));
                }
            }
        }
        let (start, n_nodes, ppn) = entries[i];
        if ppn == 0 {
            // Would spin over n_nodes empty nodes (up to 2^32) without placing a rank.
            i += 1;
            continue;
        }
        'block: for node in 0..n_nodes {
            for _ in 0..ppn {
                if out.len() == size {
                    break 'block;
                }
                out.push(start.saturating_add(node));
            }
        }
        i += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_period_is_the_shortest_repeating_prefix() {
        let naive = |s: &[u32]| {
            (1..=s.len())
                .find(|&p| s.iter().enumerate().all(|(i, n)| *n == s[i % p]))
                .unwrap_or(s.len())
        };
        let cases: &[&[u32]] = &[
            &[0],
            &[0, 0, 0],
            &[0, 1, 0, 1, 0],
            &[0, 1, 0, 1, 1],
            &[0, 0, 1, 0, 0, 1, 0],
            &[0, 1, 2, 0, 1, 2],
            &[0, 1, 1, 0, 1, 1, 0, 1],
            &[0, 0, 0, 1],
        ];
        for s in cases {
            assert_eq!(shortest_period(s), naive(s), "{s:?}");
        }
    }

    #[test]
    fn a_large_job_with_one_odd_node_is_formatted_quickly() {
        // Found while fuzzing hostfiles (fuzz/fuzz_targets/hostfile.rs): `-H a:1048575,b` took
        // the period search minutes (quadratic in the ranks).
        let mut nodes = vec![0u32; 1 << 20];
        nodes.push(1);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(format_process_mapping(&nodes));
        });
        let text = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("formatted within 30 s");
        assert_eq!(text, "(vector,(0,1,1048576),(1,1,1))");
    }

    #[test]
    fn layouts_roundtrip() {
        let cases: &[(&[u32], &str)] = &[
            (&[0], "(vector,(0,1,1))"),
            (&[0, 0, 0, 0], "(vector,(0,1,4))"),
            (&[0, 1, 0, 1], "(vector,(0,2,1))"),
            (&[0, 0, 1, 1, 1], "(vector,(0,1,2),(1,1,3))"),
            (&[5, 5, 3, 3], "(vector,(0,2,2))"),
            (&[0, 0, 1, 0, 0, 1], "(vector,(0,1,2),(1,1,1))"),
        ];
        for (nodes, text) in cases {
            assert_eq!(format_process_mapping(nodes), *text);
            assert_eq!(
                parse_process_mapping(text, nodes.len()).unwrap(),
                normalize_nodes(nodes)
            );
        }
    }

    /// Random strings from the grammar's pieces: the parser ends quickly with a value or an
    /// error, never a panic.
    #[test]
    fn random_mappings_never_panic() {
        const PARTS: &[&str] = &[
            "(",
            ")",
            "vector",
            ",",
            "[",
            "]",
            "x",
            "0",
            "1",
            "7",
            "4294967295",
            "99999999999",
            " ",
            "(0,2,1)",
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut text = String::from("(vector");
            for _ in 0..(next() % 14) {
                text.push_str(PARTS[(next() % PARTS.len() as u64) as usize]);
            }
            let size = (next() % 300) as usize;
            if let Ok(nodes) = parse_process_mapping(&text, size) {
                assert_eq!(nodes.len(), size, "{text}");
            }
        }
    }

    #[test]
    fn parse_forms() {
        assert_eq!(
            parse_process_mapping("(vector,(0,4,16))", 64).unwrap()[63],
            3
        );
        assert_eq!(
            parse_process_mapping("(vector,[(0,2,1)]x2)", 4).unwrap(),
            [0, 1, 0, 1]
        );
        assert_eq!(
            parse_process_mapping("(vector, 0, 1, 2)", 3).unwrap(),
            [0, 1, 2]
        );
        assert!(parse_process_mapping("", 1).is_err());
        assert!(parse_process_mapping("(vector,(1,1,1))", 2).is_err());
        assert!(parse_process_mapping("(vector,(0,0,0))", 2).is_err());
        assert!(parse_process_mapping("(vector,(0,1,1)) x", 1).is_err());
        // Returns at once despite 4 billion empty nodes.
        assert_eq!(
            parse_process_mapping("(vector,(0,4294967295,0),(0,1,1))", 2).unwrap(),
            [0, 0]
        );
    }
}
