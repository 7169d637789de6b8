//! `oras://HOST[:PORT]/REPO[:TAG][@sha256:DIGEST]`: an image in an OCI registry, as Apptainer
//! writes it.

use std::fmt;
use std::path::Path;

use super::OrasError;

/// The scheme that marks an image in a registry.
pub const SCHEME: &str = "oras://";

/// Whether the image argument `image` names an image in a registry (`oras://…`) rather than a
/// file.
pub fn is_oras(image: &Path) -> bool {
    image.to_str().is_some_and(|s| s.starts_with(SCHEME))
}

/// An image in a registry: where it is and which version of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The registry's host name and optional port (`registry.example.org:5000`).
    pub host: String,
    /// The repository in the registry (`team/solver`).
    pub repository: String,
    /// The tag (`latest` when neither a tag nor a digest is given).
    pub tag: Option<String>,
    /// The manifest's digest (`sha256:…`): when given, it is what is pulled.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `oras://HOST[:PORT]/REPO[:TAG][@sha256:HEX]`.
    pub fn parse(text: &str) -> Result<Reference, OrasError> {
        let bad = |reason: &str| OrasError::BadReference {
            reference: text.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = text
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("it does not start with oras://"))?;
        let (host, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("no repository after the registry host (oras://HOST/REPO:TAG)"))?;
        check_host(host).map_err(|r| bad(&r))?;
        let (name_tag, digest) = match path.split_once('@') {
            Some((n, d)) => {
                check_digest(d).map_err(|r| bad(&r))?;
                (n, Some(d.to_owned()))
            }
            None => (path, None),
        };
        let (repository, tag) = match name_tag.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
            _ => (name_tag, None),
        };
        check_repository(repository).map_err(|r| bad(&r))?;
        if let Some(tag) = tag {
            check_tag(tag).map_err(|r| bad(&r))?;
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, None) => Some("latest".to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            host: host.to_owned(),
            repository: repository.to_owned(),
            tag,
            digest,
        })
    }

    /// The manifest to ask the registry for: the digest if there is one, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// This image pinned to the manifest `digest`: what every node of a job pulls, so that a
    /// tag moved meanwhile cannot split the job across two images.
    pub fn pinned(&self, digest: &str) -> Reference {
        Reference {
            tag: None,
            digest: Some(digest.to_owned()),
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.host, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Checks a registry's `HOST[:PORT]`.
pub fn check_host(host: &str) -> Result<(), String> {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    let name_ok = !name.is_empty()
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !name_ok {
        return Err(format!(
            "{host:?} is not a registry host (a host name or address, with an optional :PORT)"
        ));
    }
    if let Some(p) = port
        && p.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(format!("{p:?} is not a port number"));
    }
    Ok(())
}

/// Checks a manifest or blob digest: `sha256:` and 64 lowercase hexadecimal digits.
pub fn check_digest(digest: &str) -> Result<(), String> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("digest {digest:?}: only sha256: digests are supported"))?;
    if hex.len() != 64 || !hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
        return Err(format!(
            "digest {digest:?}: expected sha256: and 64 lowercase hexadecimal digits"
        ));
    }
    Ok(())
}

fn check_repository(repo: &str) -> Result<(), String> {
    let component_ok = |c: &str| {
        let sep = |ch: char| matches!(ch, '.' | '_' | '-');
        !c.is_empty()
            && c.chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || sep(ch))
            && !c.starts_with(sep)
            && !c.ends_with(sep)
    };
    if repo.split('/').all(component_ok) {
        Ok(())
    } else {
        Err(format!(
            "repository {repo:?}: use lowercase letters, digits and . _ - between them, in \
             components separated by /"
        ))
    }
}

fn check_tag(tag: &str) -> Result<(), String> {
    let ok = (1..=128).contains(&tag.len())
        && !tag.starts_with(['.', '-'])
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?}: use up to 128 letters, digits, _ . and - (not starting with . or -)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_tags_digests_and_ports() {
        let r = Reference::parse("oras://reg.example.org:5000/team/solver:v1.2").unwrap();
        assert_eq!(r.host, "reg.example.org:5000");
        assert_eq!(r.repository, "team/solver");
        assert_eq!(r.tag.as_deref(), Some("v1.2"));
        assert_eq!(r.manifest_ref(), "v1.2");
        let r = Reference::parse(&format!("oras://localhost/x@{D}")).unwrap();
        assert_eq!((r.tag, r.digest.as_deref()), (None, Some(D)));
        let r = Reference::parse("oras://localhost:5000/x").unwrap();
        assert_eq!(r.manifest_ref(), "latest");
        let pinned = Reference::parse("oras://h/a/b:t").unwrap().pinned(D);
        assert_eq!(pinned.to_string(), format!("oras://h/a/b@{D}"));
        assert!(is_oras(Path::new("oras://h/x")));
        assert!(!is_oras(Path::new("./oras:/x")));
    }

    #[test]
    fn refuses_bad_references_naming_the_part() {
        for (text, part) in [
            ("oras://host", "no repository"),
            ("oras:///x:y", "not a registry host"),
            ("oras://host:99999/x", "not a port"),
            ("oras://host/Upper:t", "repository"),
            ("oras://host/x:-t", "tag"),
            ("oras://host/x@sha256:abc", "64 lowercase"),
            ("oras://host/x@md5:abc", "only sha256"),
        ] {
            let e = Reference::parse(text).unwrap_err().to_string();
            assert!(e.contains(part) && e.contains(text), "{text}: {e}");
        }
    }
}
