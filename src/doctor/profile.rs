//! The site profile's checks: which profile a launch here would use and why, whether the host
//! libfabric it names loads and offers its providers, and whether the devices, libraries and
//! binds it names exist.

use crate::facts::HostFacts;
use crate::jobspec::JobSpec;
use crate::profile::{self, ProfileChoice, ProfileSearch, SiteProfile};

use super::Finding;

/// The profile's findings (`profile`, `libfabric`, `profile-files`), and the profile chosen (for
/// the cache checks), when one could be.
pub fn checks(named: Option<&str>) -> (Vec<Finding>, Option<ProfileChoice>) {
    let env_profile = std::env::var("CMPIRUN_PROFILE").ok();
    let search = ProfileSearch::from_env();
    let mut ctx = profile::MatchContext::from_host();
    let choice = match profile::choose(named, env_profile.as_deref(), &search, &mut ctx) {
        Ok(c) => c,
        Err(e) => {
            return (
                vec![Finding::fail(
                    "profile",
                    e.to_string(),
                    "fix the profile file named (cmpirun profile check shows every problem)",
                )],
                None,
            );
        }
    };
    let host = HostFacts::gather(&JobSpec::default(), &choice.profile);
    let findings = vec![
        chosen(&choice),
        libfabric(&choice.profile, &host),
        files(&choice.profile, &host),
    ];
    (findings, Some(choice))
}

/// `profile`: the name, its file and why it was chosen; a named profile whose own match rules
/// do not hold here is a warning.
fn chosen(choice: &ProfileChoice) -> Finding {
    let p = &choice.profile;
    let message = format!("{} ({}): {}", p.name, p.file.display(), choice.reason);
    match &choice.outcome {
        Some(o) if !o.matched => Finding::warn(
            "profile",
            format!(
                "{message}; its match rules do not hold here: {}",
                o.reasons.join("; ")
            ),
            "check that this node is what the profile describes, or name the profile that is",
        ),
        _ => Finding::pass("profile", message),
    }
}

/// `libfabric`: the host libfabric the profile names is found, is read, loads, and offers every
/// provider in `fabric.providers`.
fn libfabric(p: &SiteProfile, host: &HostFacts) -> Finding {
    const CHECK: &str = "libfabric";
    if p.fabric.libfabric.is_empty() {
        return Finding::pass(
            CHECK,
            format!(
                "profile {} injects no host libfabric: images use their own",
                p.name
            ),
        );
    }
    let field = format!("{}: fabric.libfabric", p.file.display());
    let Some(lf) = &host.libfabric else {
        let why = host.libfabric_error.clone().unwrap_or_else(|| {
            format!(
                "none of {} exists",
                p.fabric
                    .libfabric
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
        return Finding::fail(
            CHECK,
            format!("the host libfabric of profile {}: {why}", p.name),
            format!("install the site's libfabric, or correct {field}"),
        );
    };
    if let Some(e) = &lf.probe_error {
        return Finding::fail(
            CHECK,
            format!("{} does not load: {e}", lf.path.display()),
            format!(
                "install what it needs (ldd {}), or correct {field}",
                lf.path.display()
            ),
        );
    }
    let version = lf.version.as_deref().unwrap_or("?");
    if lf.providers.is_none() {
        return Finding::pass(
            CHECK,
            format!(
                "{} found (providers not probed: profile {} expects none)",
                lf.path.display(),
                p.name
            ),
        );
    }
    let offered = lf.providers.clone().unwrap_or_default();
    let missing: Vec<&str> = p
        .fabric
        .providers
        .iter()
        .map(|x| x.as_str())
        .filter(|x| !offered.iter().any(|o| o == x))
        .collect();
    let about = format!(
        "{} (API {version}) offers {}",
        lf.path.display(),
        if offered.is_empty() {
            "no provider".to_owned()
        } else {
            offered.join(", ")
        }
    );
    if !missing.is_empty() {
        return Finding::fail(
            CHECK,
            format!("{about}; profile {} expects {}", p.name, missing.join(", ")),
            format!(
                "check the device and its driver (fi_info -p {} shows why), or the provider \
                 plugins (FI_PROVIDER_PATH, fabric.provider_dir in {})",
                missing[0],
                p.file.display()
            ),
        );
    }
    Finding::pass(CHECK, about)
}

/// `profile-files`: every device, fabric library, host PMI library and non-optional bind the
/// profile names exists here.
fn files(p: &SiteProfile, host: &HostFacts) -> Finding {
    const CHECK: &str = "profile-files";
    let named: Vec<(&str, &str)> = p
        .fabric
        .devices
        .iter()
        .map(|d| ("fabric.devices", d.as_str()))
        .chain(
            p.fabric
                .libraries
                .iter()
                .map(|l| ("fabric.libraries", l.as_str())),
        )
        .chain(
            p.pmi
                .host_libraries
                .iter()
                .map(|l| ("pmi.host_libraries", l.as_str())),
        )
        .chain(
            p.binds
                .iter()
                .filter(|b| !b.optional)
                .map(|b| ("binds", b.source.as_str())),
        )
        .collect();
    // Several candidates of one field (one per distribution's library directory) need only
    // one that exists, when they name the same file.
    let missing: Vec<String> = named
        .iter()
        .filter(|(field, pattern)| {
            let found = |pat: &str| host.paths.get(pat).is_some_and(|v| !v.is_empty());
            let another_found = || {
                field.ends_with("libraries")
                    && named.iter().any(|(f, other)| {
                        f == field && other != pattern && same_name(other, pattern) && found(other)
                    })
            };
            !found(pattern) && !another_found()
        })
        .map(|(field, pattern)| format!("{field} {pattern}"))
        .collect();
    if named.is_empty() {
        return Finding::pass(
            CHECK,
            format!("profile {} names no devices, libraries or binds", p.name),
        );
    }
    if missing.is_empty() {
        return Finding::pass(
            CHECK,
            format!(
                "the {} devices, libraries and binds profile {} names exist",
                named.len(),
                p.name
            ),
        );
    }
    Finding::fail(
        CHECK,
        format!(
            "profile {} names what this node lacks: {}",
            p.name,
            missing.join(", ")
        ),
        format!(
            "install the missing files, or correct those fields in {}",
            p.file.display()
        ),
    )
}

/// Whether two paths end in the same file name (`/usr/lib64/libibverbs.so.1` and
/// `/usr/lib/x86_64-linux-gnu/libibverbs.so.1`).
fn same_name(a: &str, b: &str) -> bool {
    std::path::Path::new(a).file_name() == std::path::Path::new(b).file_name()
}
