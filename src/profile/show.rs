//! `cmpirun profile show|check`: the chosen profile, why it matched, and whether every profile
//! in the search path is valid.

use std::fmt::Write;

use super::{ProfileChoice, ProfileError, ProfileSearch, SelectedBy};

/// Renders the choice for people: which profile, why, what else was considered, and the merged
/// settings as YAML.
pub fn render_choice(choice: &ProfileChoice) -> String {
    let mut o = String::new();
    let p = &choice.profile;
    let _ = writeln!(o, "profile: {}", p.name);
    let _ = writeln!(o, "file: {}", p.file.display());
    if let Some(d) = &p.description {
        let _ = writeln!(o, "description: {d}");
    }
    let how = match choice.selected_by {
        SelectedBy::Flag => "--profile",
        SelectedBy::EnvVar => "$CMPIRUN_PROFILE",
        SelectedBy::Match => "match rules",
    };
    let _ = writeln!(o, "chosen by: {how}");
    let _ = writeln!(o, "why: {}", choice.reason);
    if let Some(out) = &choice.outcome {
        let _ = writeln!(
            o,
            "its match rules on this host: {} (weight {})",
            if out.matched { "hold" } else { "do NOT hold" },
            out.weight
        );
        for r in &out.reasons {
            let _ = writeln!(o, "  - {r}");
        }
    }
    if p.chain.len() > 1 {
        let _ = writeln!(o, "extends (base first):");
        for f in &p.chain {
            let _ = writeln!(o, "  - {}", f.display());
        }
    }
    if !choice.candidates.is_empty() {
        let _ = writeln!(o, "considered:");
        for c in &choice.candidates {
            let verdict = match &c.outcome {
                None => "no match rules (used only when named)".to_owned(),
                Some(out) if out.matched => format!("matches, weight {}", out.weight),
                Some(out) => format!("does not match: {}", out.reasons.join("; ")),
            };
            let _ = writeln!(o, "  - {} ({}): {verdict}", c.name, c.file.display());
        }
    }
    let searched: Vec<String> = choice
        .searched
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    let _ = writeln!(o, "search path: {}", searched.join(", "));
    let mut value = serde_json::json!({
        "launcher": p.launcher,
        "pmi": p.pmi,
        "fabric": p.fabric,
        "binds": p.binds,
        "env": p.env,
        "mount": p.mount,
        "library_cache": p.library_cache,
        "verify": p.verify,
        "verify_keys": p.verify_keys,
        "insecure_registries": p.insecure_registries,
    });
    prune(&mut value);
    let settings = serde_yaml::to_string(&value).unwrap_or_default();
    let _ = writeln!(o, "settings (merged):");
    for line in settings.lines() {
        let _ = writeln!(o, "  {line}");
    }
    o
}

/// Drops nulls, empty lists and empty maps, so the merged settings show what is set.
fn prune(v: &mut serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => false,
        serde_json::Value::Array(a) => {
            a.retain_mut(prune);
            !a.is_empty()
        }
        serde_json::Value::Object(m) => {
            m.retain(|_, x| prune(x));
            !m.is_empty()
        }
        _ => true,
    }
}

/// Parses every profile in the search path (with its `extends:` chain); returns one line per
/// file and the errors.
pub fn validate_all(search: &ProfileSearch) -> (Vec<String>, Vec<ProfileError>) {
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    for file in search.all() {
        match super::resolve_file(&file, search) {
            Ok(p) => lines.push(format!("ok      {} ({})", p.name, file.display())),
            Err(e) => {
                lines.push(format!("invalid {e}"));
                errors.push(e);
            }
        }
    }
    (lines, errors)
}
