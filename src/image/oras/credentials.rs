//! Registry credentials from the files Apptainer and Docker users already have:
//! `~/.apptainer/docker-config.json` (`apptainer registry login`) and `$DOCKER_CONFIG/config.json`
//! or `~/.docker/config.json` (`docker login`), in that order.

use std::path::{Path, PathBuf};

use base64::Engine;

use super::OrasError;

/// A user name and password for one registry, and the file they came from.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
    /// The file they were read from (for messages).
    pub file: PathBuf,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic` header.
    pub fn basic(&self) -> String {
        let pair = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }
}

/// The credential files looked at, in order, in an environment read through `var`.
pub fn credential_files(var: impl Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty());
    let mut files = Vec::new();
    if let Some(home) = set("HOME") {
        files.push(Path::new(&home).join(".apptainer/docker-config.json"));
    }
    match set("DOCKER_CONFIG") {
        Some(dir) => files.push(Path::new(&dir).join("config.json")),
        None => {
            if let Some(home) = set("HOME") {
                files.push(Path::new(&home).join(".docker/config.json"));
            }
        }
    }
    files
}

/// The credentials for `host` (`name[:port]`) from the first of `files` that has an entry for
/// it; `None` when none has (the registry is then asked anonymously). A file that exists but is
/// not a Docker config file is an error naming it.
pub fn find(host: &str, files: &[PathBuf]) -> Result<Option<Credentials>, OrasError> {
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(OrasError::Credentials {
                    file: file.clone(),
                    reason: e.to_string(),
                });
            }
        };
        if let Some(c) = from_config(host, file, &text)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

#[derive(serde::Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The entry for `host` in the Docker config file `file` (its text `text`). Keys may be written
/// `host`, `https://host` or `https://host/v1/`.
fn from_config(host: &str, file: &Path, text: &str) -> Result<Option<Credentials>, OrasError> {
    let bad = |reason: String| OrasError::Credentials {
        file: file.to_owned(),
        reason,
    };
    let config: ConfigFile = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let Some(entry) = config.auths.iter().find_map(|(key, entry)| {
        let bare = key
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let bare = bare.split('/').next().unwrap_or(bare);
        (bare == host).then_some(entry)
    }) else {
        return Ok(None);
    };
    let (username, password) = match (&entry.auth, &entry.username, &entry.password) {
        (Some(auth), _, _) if !auth.is_empty() => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| bad(format!("auths.{host}.auth: not base64: {e}")))?;
            let pair = String::from_utf8(raw)
                .map_err(|_| bad(format!("auths.{host}.auth: not UTF-8 text")))?;
            let (u, p) = pair
                .split_once(':')
                .ok_or_else(|| bad(format!("auths.{host}.auth: no user:password in it")))?;
            (u.to_owned(), p.to_owned())
        }
        (_, Some(u), Some(p)) => (u.clone(), p.clone()),
        // An entry with only an identity token (or kept by a credential helper): nothing here
        // cmpirun can use.
        _ => {
            tracing::debug!(
                "{}: the entry for {host} has no user name and password; asking anonymously",
                file.display()
            );
            return Ok(None);
        }
    };
    Ok(Some(Credentials {
        username,
        password,
        file: file.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_entry_of_the_host_in_each_spelling() {
        let f = Path::new("/c.json");
        // "alice:s3cret"
        let text = r#"{"auths": {"https://reg.example.org:5000/v1/": {"auth": "YWxpY2U6czNjcmV0"},
                       "other": {"username": "bob", "password": "pw"}}}"#;
        let c = from_config("reg.example.org:5000", f, text)
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret")
        );
        assert_eq!(c.basic(), "Basic YWxpY2U6czNjcmV0");
        let c = from_config("other", f, text).unwrap().unwrap();
        assert_eq!(c.username, "bob");
        assert!(from_config("reg.example.org", f, text).unwrap().is_none());
        let e = from_config("x", f, r#"{"auths": {"x": {"auth": "!!"}}}"#).unwrap_err();
        assert!(e.to_string().contains("/c.json") && e.to_string().contains("base64"));
        assert!(from_config("x", f, "[").is_err());
    }

    #[test]
    fn apptainer_first_then_docker() {
        let env = |k: &str| match k {
            "HOME" => Some("/home/a".to_owned()),
            _ => None,
        };
        assert_eq!(
            credential_files(env),
            [
                PathBuf::from("/home/a/.apptainer/docker-config.json"),
                PathBuf::from("/home/a/.docker/config.json")
            ]
        );
    }
}
