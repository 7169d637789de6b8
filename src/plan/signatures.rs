//! The launch-time signature policy (`--verify`, the profile's `verify:` and `verify_keys:`)
//! and the `image-signature` check it adds to the plan, from verifications done on the front
//! end (by [`crate::image::integrity::verify_images`]) before any node mounts an image.

use std::path::PathBuf;

use super::types::{Check, Verdict};
use crate::image::integrity::ImageVerification;
use crate::jobspec::{JobSpec, VerifyPolicy};
use crate::profile::SiteProfile;

/// The name of the check.
pub const CHECK: &str = "image-signature";

/// What a launch asks of its images' signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignaturePolicy {
    /// `--verify`, else the profile's `verify:`, else off.
    pub policy: VerifyPolicy,
    /// The profile's `verify_keys:`, then every `--verify-key`.
    pub keys: Vec<PathBuf>,
}

/// The policy of `spec` under `profile`.
pub fn policy(spec: &JobSpec, profile: &SiteProfile) -> SignaturePolicy {
    let mut keys: Vec<PathBuf> = profile
        .verify_keys
        .iter()
        .map(|k| PathBuf::from(k.as_str()))
        .collect();
    for k in &spec.verify_keys {
        if !keys.contains(k) {
            keys.push(k.clone());
        }
    }
    SignaturePolicy {
        policy: spec.verify.or(profile.verify).unwrap_or(VerifyPolicy::Off),
        keys,
    }
}

/// The `image-signature` checks for `results` (one per distinct image): a pass per verified
/// image, and per image that is not, a failure under `require` or a warning under `warn`.
pub fn checks(policy: &SignaturePolicy, results: &[ImageVerification]) -> Vec<Check> {
    let missed = match policy.policy {
        VerifyPolicy::Off => return Vec::new(),
        VerifyPolicy::Require => Verdict::Fail,
        VerifyPolicy::Warn => Verdict::Warn,
    };
    let how = match policy.policy {
        VerifyPolicy::Require => "--verify require",
        _ => "--verify warn",
    };
    if policy.keys.is_empty() {
        return vec![Check {
            name: CHECK.into(),
            verdict: missed,
            message: format!(
                "{how} but no key to verify with: name PEM public keys with --verify-key or the \
                 profile's verify_keys"
            ),
        }];
    }
    results
        .iter()
        .map(|r| match &r.outcome {
            Ok(report) if report.verified => {
                let mut signers: Vec<String> = report
                    .signatures
                    .iter()
                    .flat_map(|s| &s.verified_by)
                    .map(|k| format!("{} ({})", k.fingerprint, k.source.display()))
                    .collect();
                signers.dedup();
                Check {
                    name: CHECK.into(),
                    verdict: Verdict::Pass,
                    message: format!(
                        "{}: signed by {}, every object verified{}",
                        r.image.display(),
                        signers.join(", "),
                        if r.cached {
                            " (by an earlier launch: the image file and the keys are unchanged)"
                        } else {
                            ""
                        }
                    ),
                }
            }
            Ok(report) => Check {
                name: CHECK.into(),
                verdict: missed,
                message: format!(
                    "{}: not verified ({how}): {}; sign it with `cmpirun image sign IMAGE --key PEM`, see `cmpirun image verify`",
                    r.image.display(),
                    report.failure_summary()
                ),
            },
            Err(e) => Check {
                name: CHECK.into(),
                verdict: missed,
                message: format!("{e} ({how})"),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::integrity::VerifyReport;

    fn report(verified: bool) -> VerifyReport {
        VerifyReport {
            image: "a.sif".into(),
            verified,
            groups: Vec::new(),
            signatures: Vec::new(),
            problems: if verified {
                Vec::new()
            } else {
                vec!["unsigned".into()]
            },
        }
    }

    fn result(outcome: Result<VerifyReport, String>) -> ImageVerification {
        ImageVerification {
            image: "a.sif".into(),
            outcome,
            cached: false,
        }
    }

    #[test]
    fn the_flag_wins_over_the_profile_and_keys_add_up() {
        let mut profile = SiteProfile {
            verify: Some(VerifyPolicy::Require),
            ..Default::default()
        };
        profile.verify_keys = vec!["/etc/site.pem".to_owned().try_into().unwrap()];
        let mut spec = JobSpec::default();
        assert_eq!(policy(&spec, &profile).policy, VerifyPolicy::Require);
        spec.verify = Some(VerifyPolicy::Warn);
        spec.verify_keys = vec!["/home/u/k.pem".into(), "/etc/site.pem".into()];
        let p = policy(&spec, &profile);
        assert_eq!(p.policy, VerifyPolicy::Warn);
        assert_eq!(
            p.keys,
            [PathBuf::from("/etc/site.pem"), "/home/u/k.pem".into()]
        );
        assert_eq!(
            policy(&JobSpec::default(), &SiteProfile::default()).policy,
            VerifyPolicy::Off
        );
    }

    #[test]
    fn verdicts_follow_the_policy() {
        let keyed = |policy| SignaturePolicy {
            policy,
            keys: vec!["/k.pem".into()],
        };
        let verdicts = |p: &SignaturePolicy, r: Vec<ImageVerification>| -> Vec<Verdict> {
            checks(p, &r).into_iter().map(|c| c.verdict).collect()
        };
        let require = keyed(VerifyPolicy::Require);
        assert_eq!(
            verdicts(&require, vec![result(Ok(report(true)))]),
            [Verdict::Pass]
        );
        assert_eq!(
            verdicts(&require, vec![result(Ok(report(false)))]),
            [Verdict::Fail]
        );
        assert_eq!(
            verdicts(&require, vec![result(Err("not a SIF".into()))]),
            [Verdict::Fail]
        );
        let warn = keyed(VerifyPolicy::Warn);
        assert_eq!(
            verdicts(&warn, vec![result(Ok(report(false)))]),
            [Verdict::Warn]
        );
        assert!(verdicts(&keyed(VerifyPolicy::Off), vec![result(Ok(report(false)))]).is_empty());
        let keyless = SignaturePolicy {
            policy: VerifyPolicy::Require,
            keys: Vec::new(),
        };
        let c = checks(&keyless, &[result(Ok(report(true)))]);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].verdict, Verdict::Fail);
        assert!(c[0].message.contains("--verify-key"));
    }
}
