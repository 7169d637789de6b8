//! Host path patterns as profiles and `--bind` write them: `$VAR` expansion from an
//! environment, then a glob over this host's files, sorted by version.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Expands `$VAR`/`${VAR}` from `env` and the glob in `pattern`; returns the existing paths,
/// sorted so that version numbers compare as numbers (`1.22.0` after `1.9.0`). An unset
/// variable makes the pattern name nothing.
pub fn existing_host_paths(pattern: &str, env: &BTreeMap<String, String>) -> Vec<PathBuf> {
    let Some(expanded) = expand_vars(pattern, env) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = match glob::glob(&expanded) {
        Ok(paths) => paths
            .filter_map(Result::ok)
            .filter(|p| p.exists())
            .collect(),
        Err(_) => Vec::new(),
    };
    found.sort_by(|a, b| version_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    found
}

/// Replaces `$VAR` and `${VAR}`; `None` if a variable is unset or empty.
pub fn expand_vars(s: &str, env: &BTreeMap<String, String>) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, tail) = if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}')?;
            (&inner[..end], &inner[end + 1..])
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        let value = env.get(name).filter(|v| !v.is_empty())?;
        out.push_str(value);
        rest = tail;
    }
    out.push_str(rest);
    Some(out)
}

/// Compares strings with digit runs compared as numbers.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (trim_zeros(&a[..na]), trim_zeros(&b[..nb]));
                let ord = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if ord != std::cmp::Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|&&c| c == b'0').count();
    &d[n.min(d.len().saturating_sub(1))..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vars_and_versions() {
        let env: BTreeMap<String, String> = [("A".to_owned(), "/x".to_owned())].into();
        assert_eq!(expand_vars("$A/lib", &env).as_deref(), Some("/x/lib"));
        assert_eq!(expand_vars("${A}lib", &env).as_deref(), Some("/xlib"));
        assert_eq!(expand_vars("$B/lib", &env), None);
        assert_eq!(
            version_cmp("/opt/1.9.0/lib", "/opt/1.22.0/lib"),
            std::cmp::Ordering::Less
        );
    }
}
