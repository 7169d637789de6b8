//! The ranks' output file names: hydra's patterns (`-outfile-pattern`, `-errfile-pattern`, and
//! Open MPI's `--output-filename` written as one), expanded for a rank by the local launcher and
//! translated into srun's words for `srun --output`/`--error`.

/// The file name of `rank` from a hydra-style `pattern`: `%r` the rank, `%h` its host, `%p` its
/// node's index, `%g` 0 (the one process group), `%%` a `%`.
pub fn expand_pattern(pattern: &str, rank: u32, host: &str, node: u32) -> String {
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('r') => out.push_str(&rank.to_string()),
            Some('h') => out.push_str(host),
            Some('p') => out.push_str(&node.to_string()),
            Some('g') => out.push('0'),
            Some('%') | None => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
        }
    }
    out
}

/// The same pattern in srun's words (`%t` task, `%N` node name, `%n` node index), for
/// `srun --output`/`--error`.
pub fn srun_pattern(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('r') => out.push_str("%t"),
            Some('h') => out.push_str("%N"),
            Some('p') => out.push_str("%n"),
            Some('g') => out.push('0'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push_str("%%"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert_eq!(
            expand_pattern("out.%r.%h.%p%g%%", 3, "n1", 1),
            "out.3.n1.10%"
        );
        assert_eq!(srun_pattern("/o/%r/%h-%p.%%"), "/o/%t/%N-%n.%%");
    }
}
