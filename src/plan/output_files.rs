//! The ranks' output file names: hydra's patterns (`-outfile-pattern`, `-errfile-pattern`, and
//! Open MPI's `--output-filename` written as one), expanded for a rank by the local launcher and
//! translated into srun's words for `srun --output`/`--error`.

/// `pattern` with each `%` word replaced by what `word` gives for its letter (`None`: the word
/// is kept as written); a lone `%` at the end stays.
fn rewrite(pattern: &str, word: impl Fn(char) -> Option<String>) -> String {
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(letter) => match word(letter) {
                Some(text) => out.push_str(&text),
                None => {
                    out.push('%');
                    out.push(letter);
                }
            },
            None => out.push('%'),
        }
    }
    out
}

/// The file name of `rank` from a hydra-style `pattern`: `%r` the rank (zero-padded to `width`
/// digits), `%h` its host, `%p` its node's index, `%g` 0 (the one process group), `%%` a `%`.
pub fn expand_pattern(pattern: &str, rank: u32, width: usize, host: &str, node: u32) -> String {
    rewrite(pattern, |letter| match letter {
        'r' => Some(format!("{rank:0width$}")),
        'h' => Some(host.to_owned()),
        'p' => Some(node.to_string()),
        'g' => Some("0".to_owned()),
        '%' => Some("%".to_owned()),
        _ => None,
    })
}

/// The same pattern in srun's words (`%t` task, zero-padded to `width` digits as `%3t`; `%N`
/// node name, `%n` node index), for `srun --output`/`--error`.
pub fn srun_pattern(pattern: &str, width: usize) -> String {
    rewrite(pattern, |letter| match letter {
        'r' if width > 1 => Some(format!("%{width}t")),
        'r' => Some("%t".to_owned()),
        'h' => Some("%N".to_owned()),
        'p' => Some("%n".to_owned()),
        'g' => Some("0".to_owned()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert_eq!(
            expand_pattern("out.%r.%h.%p%g%%", 3, 0, "n1", 1),
            "out.3.n1.10%"
        );
        assert_eq!(expand_pattern("rank.%r", 7, 2, "n1", 0), "rank.07");
        assert_eq!(expand_pattern("rank.%r", 123, 2, "n1", 0), "rank.123");
        assert_eq!(srun_pattern("/o/%r/%h-%p.%%", 0), "/o/%t/%N-%n.%%");
        assert_eq!(srun_pattern("/o/rank.%r", 3), "/o/rank.%3t");
    }
}
