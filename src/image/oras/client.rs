//! A small blocking client for the OCI distribution API (registry v2): GET a manifest or a blob,
//! answering the registry's `WWW-Authenticate` challenge (anonymous and bearer tokens, or basic
//! credentials).
//!
//! TLS is rustls with the system's roots (`rustls-native-certs`: the distribution's bundle, or
//! `SSL_CERT_FILE`/`SSL_CERT_DIR`) plus the site CAs in `CMPIRUN_REGISTRY_CA`; plain HTTP only
//! when the caller asks for it (`--insecure`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ureq::http::Response;
use ureq::tls::{Certificate, RootCerts, TlsConfig};
use ureq::{Agent, Body};

use super::OrasError;
use super::credentials::{self, Credentials};

/// The environment variable naming extra CA certificates (PEM files, separated by `:`) that
/// registries' TLS certificates may be signed by, on top of the system's.
pub const CA_ENV: &str = "CMPIRUN_REGISTRY_CA";

/// The largest manifest or token response read (registries answer a few KiB).
const SMALL_BODY: u64 = 4 << 20;

/// One registry, with what it took to be let in (a token per repository, or basic credentials).
pub struct Registry {
    agent: Agent,
    host: String,
    base: String,
    credentials: Option<Credentials>,
    /// The `Authorization` header that worked, reused for the next requests.
    authorization: Option<String>,
}

impl Registry {
    /// A client for `host` (`name[:port]`): HTTPS, or plain HTTP when `insecure`. Reads the
    /// user's credentials for it; connects to nothing yet.
    pub fn new(host: &str, insecure: bool) -> Result<Registry, OrasError> {
        let env = |k: &str| std::env::var(k).ok();
        let credentials = credentials::find(host, &credentials::credential_files(env))?;
        let mut config = Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(concat!("cmpirun/", env!("CARGO_PKG_VERSION")))
            // No resolve (or global) timeout: ureq resolves a name in this thread then, where with
            // one it would start a thread (and a launch forks its ranks from this process).
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .timeout_per_read(Some(Duration::from_secs(120)))
            .max_redirects(10)
            // A blob may be served from elsewhere (object storage): the registry's credentials
            // follow a redirect to the same host only.
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost);
        if !insecure {
            config = config.https_only(true).tls_config(tls_config()?);
        }
        let scheme = if insecure { "http" } else { "https" };
        Ok(Registry {
            agent: config.build().new_agent(),
            host: host.to_owned(),
            base: format!("{scheme}://{host}"),
            credentials,
            authorization: None,
        })
    }

    /// GET `/v2/{path}` with `accept`, authenticating when the registry asks; returns the
    /// response whatever its status (after authentication), or why the registry could not be
    /// asked. `scope` is the repository the token is for.
    pub fn get(
        &mut self,
        path: &str,
        accept: &str,
        repository: &str,
    ) -> Result<Response<Body>, OrasError> {
        let url = format!("{}/v2/{path}", self.base);
        let resp = self.send(&url, accept, self.authorization.clone())?;
        if resp.status() != 401 {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let authorization = self.answer(&challenge, repository)?;
        let resp = self.send(&url, accept, Some(authorization.clone()))?;
        if resp.status() == 401 || resp.status() == 403 {
            return Err(self.refused(repository, resp.status().as_u16()));
        }
        self.authorization = Some(authorization);
        Ok(resp)
    }

    fn send(
        &self,
        url: &str,
        accept: &str,
        authorization: Option<String>,
    ) -> Result<Response<Body>, OrasError> {
        let mut req = self.agent.get(url).header("Accept", accept);
        if let Some(a) = authorization {
            req = req.header("Authorization", a);
        }
        req.call().map_err(|e| self.transport_error(url, e))
    }

    /// The `Authorization` header that answers `challenge` (a `WWW-Authenticate` value).
    fn answer(&self, challenge: &str, repository: &str) -> Result<String, OrasError> {
        let (scheme, params) = parse_challenge(challenge);
        match scheme.to_ascii_lowercase().as_str() {
            "bearer" => self.token(&params, repository),
            "basic" => match &self.credentials {
                Some(c) => Ok(c.basic()),
                None => Err(self.refused(repository, 401)),
            },
            _ => Err(OrasError::Auth {
                host: self.host.clone(),
                detail: format!(
                    "the registry asks for authentication cmpirun does not speak ({challenge:?})"
                ),
            }),
        }
    }

    /// Fetches a bearer token from the challenge's realm (with the user's credentials, if any).
    fn token(&self, params: &[(String, String)], repository: &str) -> Result<String, OrasError> {
        let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let realm = param("realm").ok_or_else(|| OrasError::Auth {
            host: self.host.clone(),
            detail: "its bearer challenge names no realm to get a token from".into(),
        })?;
        let scope = param("scope").unwrap_or_else(|| format!("repository:{repository}:pull"));
        let mut req = self.agent.get(&realm).query("scope", &scope);
        if let Some(service) = param("service") {
            req = req.query("service", &service);
        }
        if let Some(c) = &self.credentials {
            req = req.header("Authorization", c.basic());
        }
        let mut resp = req.call().map_err(|e| self.transport_error(&realm, e))?;
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            return Err(self.refused(repository, status));
        }
        if status != 200 {
            return Err(OrasError::Auth {
                host: self.host.clone(),
                detail: format!("its token service {realm} answered HTTP {status}"),
            });
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(SMALL_BODY)
            .read_to_vec()
            .map_err(|e| self.transport_error(&realm, e))?;
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| OrasError::Auth {
            host: self.host.clone(),
            detail: format!("its token service {realm} answered no token: {e}"),
        })?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .map(|t| format!("Bearer {t}"))
            .ok_or_else(|| OrasError::Auth {
                host: self.host.clone(),
                detail: format!("its token service {realm} answered no token"),
            })
    }

    fn refused(&self, repository: &str, status: u16) -> OrasError {
        let detail = match &self.credentials {
            Some(c) => format!(
                "it refused access to {repository} (HTTP {status}) with the credentials of user {} \
                 from {}; check them (`apptainer registry login` or `docker login` writes them)",
                c.username,
                c.file.display()
            ),
            None => format!(
                "it refused anonymous access to {repository} (HTTP {status}); log in first \
                 (`apptainer registry login oras://{}` or `docker login {}`)",
                self.host, self.host
            ),
        };
        OrasError::Auth {
            host: self.host.clone(),
            detail,
        }
    }

    fn transport_error(&self, url: &str, e: ureq::Error) -> OrasError {
        match e {
            ureq::Error::Rustls(e) => OrasError::Tls {
                host: self.host.clone(),
                error: e.to_string(),
            },
            ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => OrasError::Tls {
                host: self.host.clone(),
                error: e.to_string(),
            },
            e => OrasError::Unreachable {
                url: url.to_owned(),
                error: e.to_string(),
            },
        }
    }
}

/// The TLS settings: the system's roots and the site's extra CAs ([`CA_ENV`]).
fn tls_config() -> Result<TlsConfig, OrasError> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::debug!("system CA certificates: {e}");
    }
    let mut roots: Vec<Certificate<'static>> = found
        .certs
        .into_iter()
        .map(|c| Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    for file in site_ca_files() {
        let bad = |reason: String| OrasError::BadCa {
            file: file.clone(),
            reason,
        };
        let pem = std::fs::read(&file).map_err(|e| bad(e.to_string()))?;
        let before = roots.len();
        for item in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
            let cert: rustls_pki_types::CertificateDer<'_> =
                item.map_err(|e| bad(e.to_string()))?;
            roots.push(Certificate::from_der(cert.as_ref()).to_owned());
        }
        if roots.len() == before {
            return Err(bad("no PEM certificate in it".into()));
        }
    }
    // ring, not aws-lc-rs: no C++/cmake build, and an image pull needs no post-quantum key
    // exchange (the reason rustls now marks ring's provider deprecated).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(provider)
        .build())
}

/// The files named by [`CA_ENV`].
fn site_ca_files() -> Vec<PathBuf> {
    std::env::var_os(CA_ENV)
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Splits a `WWW-Authenticate` value into its scheme and its `name="value"` parameters.
pub fn parse_challenge(header: &str) -> (String, Vec<(String, String)>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if name.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        params.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    (scheme.to_owned(), params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example.org/token",service="registry.example.org",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(s, "Bearer");
        let get = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("realm"), Some("https://auth.example.org/token"));
        assert_eq!(get("service"), Some("registry.example.org"));
        assert_eq!(get("scope"), Some("repository:a/b:pull,push"));
        let (s, p) = parse_challenge(r#"Basic realm="basic-realm""#);
        assert_eq!((s.as_str(), p.len()), ("Basic", 1));
    }
}
