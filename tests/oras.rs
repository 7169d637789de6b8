//! `oras://` images against a real registry (Debian's `docker-registry`, registry v2) started by
//! each test on a free port with its storage in a temporary folder, with images pushed by an
//! independent client (the ORAS Python SDK, `ci/fetch-wheels.sh`). cmpirun runs as the test user.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;

const SIF_LAYER: &str = "application/vnd.sylabs.sif.layer.v1.sif";

/// A registry started for one test, stopped (and its storage removed) when dropped.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts `docker-registry` with `extra` YAML appended to its configuration (an `auth:`
    /// section, TLS settings under `http:` with `http_extra`).
    fn start(http_extra: &str, extra: &str) -> Registry {
        let bin = Path::new("/usr/bin/docker-registry");
        assert!(
            bin.exists(),
            "{} is missing: run ci/install-packages.sh (Debian package docker-registry)",
            bin.display()
        );
        let dir = tempfile::tempdir().expect("temporary folder");
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{http_extra}{extra}",
                dir.path().join("data").display()
            ),
        )
        .expect("write the registry configuration");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut r = Registry { child, port, dir };
        r.wait_listening();
        r
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("docker-registry ended with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The file the registry serves blob `digest` from.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// How many times the registry has answered a GET of blob `digest` with its bytes.
    fn blob_downloads(&self, digest: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| {
                l.contains("\"GET /v2/")
                    && l.contains(&format!("/blobs/{digest} "))
                    && l.contains("\" 200 ")
            })
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on (bound and let go).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Pushes `files` (path, media type) as one image `target` (`REPO:TAG`) of `reg` with the ORAS
/// Python SDK, as `user:password` if given and trusting `ca` for HTTPS if given (plain HTTP
/// otherwise).
fn push(
    reg: &Registry,
    target: &str,
    files: &[(&Path, &str)],
    user: Option<(&str, &str)>,
    ca: Option<&Path>,
) {
    let target = format!("{}/{target}", reg.host());
    let sdk = repo_root().join(".cache/python/oras-0.2.43");
    assert!(
        sdk.is_dir(),
        "{} is missing: run ci/fetch-wheels.sh (the ORAS Python SDK)",
        sdk.display()
    );
    let script = r#"
import os, sys, oras.client
target, user, password, ca = sys.argv[1:5]
host = target.split("/")[0]
if ca:
    c = oras.client.OrasClient(hostname=host, tls_verify=ca)
else:
    c = oras.client.OrasClient(hostname=host, insecure=True)
if user:
    c.auth.set_basic_auth(user, password)
files = [f.rsplit(":", 1) for f in sys.argv[5:]]
os.chdir(os.path.dirname(files[0][0]))
names = [os.path.basename(path) + ":" + media for path, media in files]
r = c.push(target=target, files=names, disable_path_validation=True)
r.raise_for_status()
"#;
    let (u, p) = user.unwrap_or(("", ""));
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", &sdk)
        .args(["-c", script, &target, u, p])
        .arg(ca.map(|c| c.as_os_str()).unwrap_or_default());
    for (path, media) in files {
        cmd.arg(format!("{}:{media}", path.display()));
    }
    let out = cmd.output().expect("run python3");
    assert!(
        out.status.success(),
        "pushing {target} failed:\n{}{}\nregistry log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        reg.log()
    );
}

/// A copy of `src` in `dir` named `name` (pushed files are named by their base name).
fn copy_in(dir: &Path, src: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(src, &to).expect("copy a test file");
    to
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sif")
        .join(name)
}

fn small_sif() -> PathBuf {
    fixture("one-group-signed-dsse.sif")
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `cmpirun image pull` (and other commands) as the test user with the cache in `home`.
fn cmpirun_in(home: &Path) -> TuserCommand {
    TuserCommand::cmpirun()
        .env("HOME", home)
        .env("XDG_CACHE_HOME", home.join("cache"))
}

/// `cmpirun image pull --insecure REFERENCE` as the test user with the cache in `home`.
fn pull_insecure(home: &Path, reference: &str) -> RunOutput {
    cmpirun_in(home)
        .args(["image", "pull", "--insecure", reference])
        .run()
}

/// What the cache of pulled images in `home` holds (names), with nothing but entries expected.
fn cache_names(home: &Path) -> Vec<String> {
    let dir = home.join("cache/cmpirun/oras");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn assert_user_error(out: &RunOutput, words: &[&str]) {
    out.assert_code(2);
    let line = out.stderr.trim();
    assert!(
        line.lines().count() == 1 && words.iter().all(|w| line.contains(w)),
        "expected one line naming {words:?}:\n{out}"
    );
}

#[test]
fn pull_checks_every_answer_and_keeps_nothing_bad() {
    let reg = Registry::start("", "");
    let host = reg.host();
    let work = TuserDir::new();
    let files = tempfile::tempdir().expect("temporary folder");
    let small = copy_in(files.path(), &small_sif(), "small.sif");
    let small_bytes = std::fs::read(&small).expect("read the small image");
    push(&reg, "test/small:v1", &[(&small, SIF_LAYER)], None, None);

    // By tag, then by the digest it printed: the same file, from the cache.
    let out = cmpirun_in(work.path())
        .args(["image", "pull", "--insecure", "-o"])
        .arg(work.path().join("out.sif"))
        .arg(format!("oras://{host}/test/small:v1"))
        .run();
    out.assert_success();
    // No terminal: no progress bar, nothing on stderr.
    assert_eq!(out.stderr, "", "{out}");
    let layer = format!("sha256:{}", sha256_hex(&small_bytes));
    assert!(out.stdout.contains(&layer), "{out}");
    assert_eq!(
        std::fs::read(work.path().join("out.sif")).unwrap(),
        small_bytes
    );
    let cached = work
        .path()
        .join("cache/cmpirun/oras")
        .join(layer.trim_start_matches("sha256:"))
        .join("image.sif");
    assert_eq!(std::fs::read(&cached).unwrap(), small_bytes);
    let pinned = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("pinned: "))
        .expect("a pinned reference")
        .to_owned();
    assert!(pinned.contains("/test/small@sha256:"), "{out}");
    let out = pull_insecure(work.path(), &pinned);
    out.assert_success();
    assert!(out.stdout.contains(&cached.display().to_string()), "{out}");
    assert_eq!(reg.blob_downloads(&layer), 1, "{}", reg.log());
    // inspect reads it from the cache too.
    let out = cmpirun_in(work.path())
        .args(["image", "inspect", "--insecure", &pinned])
        .run();
    out.assert_success();
    assert!(out.stdout.contains(&cached.display().to_string()), "{out}");
    let good = cache_names(work.path());

    // Without --insecure the plain-HTTP registry is not spoken to in plain HTTP.
    let out = cmpirun_in(work.path())
        .args(["image", "pull", &format!("oras://{host}/test/small:v1")])
        .run();
    assert_user_error(&out, &[&host, "TLS", "--insecure"]);
    // A profile's insecure_registries is the other way to ask for plain HTTP.
    let profile = work.path().join("plainhttp.yaml");
    std::fs::write(
        &profile,
        format!("name: plainhttp\ninsecure_registries: [\"{host}\"]\n"),
    )
    .unwrap();
    chown_to_tuser(&profile);
    let out = cmpirun_in(work.path())
        .env("CMPIRUN_PROFILE", &profile)
        .args(["image", "pull", &format!("oras://{host}/test/small:v1")])
        .run();
    out.assert_success();

    // A tag or digest the registry does not have.
    let out = pull_insecure(work.path(), &format!("oras://{host}/test/small:nope"));
    assert_user_error(&out, &["small:nope", "not found", "404"]);
    let zero = format!("sha256:{}", "0".repeat(64));
    let out = pull_insecure(work.path(), &format!("oras://{host}/test/small@{zero}"));
    assert_user_error(&out, &[&zero, "not found"]);

    // A registry that is not there.
    let gone = format!("127.0.0.1:{}", free_port());
    let out = pull_insecure(work.path(), &format!("oras://{gone}/test/small:v1"));
    assert_user_error(&out, &[&gone, "cannot reach the registry"]);

    // Two layers; a layer that is not a SIF image's; a SIF layer that is not a SIF file.
    let other = copy_in(
        files.path(),
        &fixture("one-group-signed-pgp.sif"),
        "other.sif",
    );
    push(
        &reg,
        "test/two:v1",
        &[(&small, SIF_LAYER), (&other, SIF_LAYER)],
        None,
        None,
    );
    let out = pull_insecure(work.path(), &format!("oras://{host}/test/two:v1"));
    assert_user_error(&out, &["test/two:v1", "2 layers", SIF_LAYER]);
    let text = files.path().join("notes.txt");
    std::fs::write(&text, "not an image\n").unwrap();
    push(&reg, "test/text:v1", &[(&text, "text/plain")], None, None);
    let out = pull_insecure(work.path(), &format!("oras://{host}/test/text:v1"));
    assert_user_error(&out, &["test/text:v1", "media type text/plain"]);
    let fake = files.path().join("fake.sif");
    std::fs::write(&fake, vec![b'x'; 4096]).unwrap();
    push(&reg, "test/fake:v1", &[(&fake, SIF_LAYER)], None, None);
    let out = pull_insecure(work.path(), &format!("oras://{host}/test/fake:v1"));
    assert_user_error(&out, &["test/fake", "not a SIF file", "nothing was kept"]);

    // A blob the registry serves truncated, and one whose bytes changed (same size).
    let other_bytes = std::fs::read(&other).unwrap();
    push(&reg, "test/other:v1", &[(&other, SIF_LAYER)], None, None);
    let other_digest = format!("sha256:{}", sha256_hex(&other_bytes));
    std::fs::write(
        reg.blob_file(&other_digest),
        &other_bytes[..other_bytes.len() / 2],
    )
    .unwrap();
    let out = pull_insecure(work.path(), &format!("oras://{host}/test/other:v1"));
    assert_user_error(&out, &["test/other", "truncated", "nothing was kept"]);
    let mut flipped = other_bytes.clone();
    flipped[40_000] ^= 0xff;
    std::fs::write(reg.blob_file(&other_digest), &flipped).unwrap();
    let out = pull_insecure(work.path(), &format!("oras://{host}/test/other:v1"));
    assert_user_error(
        &out,
        &[&other_digest, "have digest sha256:", "nothing was kept"],
    );

    // Bad references name what is wrong.
    let out = cmpirun_in(work.path())
        .args(["image", "pull", "oras://Host_x/a:b"])
        .run();
    assert_user_error(&out, &["oras://Host_x/a:b", "registry host"]);

    // Only the good entry is in the cache: no partial download, no other entry.
    assert_eq!(cache_names(work.path()), good);
}

#[test]
fn concurrent_pulls_download_once() {
    let reg = Registry::start("", "");
    let host = reg.host();
    let work = TuserDir::new();
    let files = tempfile::tempdir().expect("temporary folder");
    let image = copy_in(files.path(), &image("mpich5"), "mpich5.sif");
    push(&reg, "test/mpich5:v1", &[(&image, SIF_LAYER)], None, None);
    let reference = format!("oras://{host}/test/mpich5:v1");
    let pulls: Vec<TuserChild> = (0..3)
        .map(|_| {
            cmpirun_in(work.path())
                .args(["image", "pull", "--insecure", &reference])
                .spawn()
        })
        .collect();
    let outs: Vec<RunOutput> = pulls.into_iter().map(|p| p.wait()).collect();
    for out in &outs {
        out.assert_success();
    }
    let digest = format!("sha256:{}", sha256_hex(&std::fs::read(&image).unwrap()));
    assert_eq!(reg.blob_downloads(&digest), 1, "{}", reg.log());
    let hex = digest.trim_start_matches("sha256:");
    assert_eq!(
        cache_names(work.path()),
        [hex.to_owned(), format!("{hex}.lock")]
    );
}

/// A token service for the registry's `auth: token:` setting: answers a request with the right
/// basic credentials with a JWT (RS256, signed by `openssl` with a certificate the registry
/// trusts, in its `x5c` header) for the scopes asked; anything else with 401.
struct TokenServer {
    port: u16,
}

impl TokenServer {
    fn start(dir: &Path, user: &str, password: &str) -> (TokenServer, PathBuf) {
        let key = dir.join("token.key");
        let cert = dir.join("token.pem");
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=cmpirun-test-token",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .expect("run openssl")
            .success();
        assert!(ok, "openssl could not make the token key");
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .expect("run openssl")
            .stdout;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the token service");
        let port = listener.local_addr().unwrap().port();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let key2 = key.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = answer_token(stream, &expected, &key2, &der);
            }
        });
        (TokenServer { port }, cert)
    }

    fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
}

fn answer_token(
    mut stream: TcpStream,
    expected: &str,
    key: &Path,
    der: &[u8],
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut authorized = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("authorization")
        {
            authorized = v.trim() == expected;
        }
    }
    if !authorized {
        return stream.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
    let query = request
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split_once('?')
        .map(|(_, q)| q.to_owned())
        .unwrap_or_default();
    let mut access = Vec::new();
    for pair in query.split('&') {
        if let Some(scope) = pair.strip_prefix("scope=") {
            let scope = percent_decode(scope);
            // repository:NAME:ACTIONS; the user may pull and push whatever was asked (the SDK
            // asks for pull, then reuses the token for its push).
            let mut parts = scope.splitn(3, ':');
            if let (Some(kind), Some(name), Some(_)) = (parts.next(), parts.next(), parts.next()) {
                access.push(serde_json::json!({
                    "type": kind, "name": name, "actions": ["pull", "push"]
                }));
            }
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [base64::engine::general_purpose::STANDARD.encode(der)]});
    let claims = serde_json::json!({
        "iss": "cmpirun-test", "sub": "alice", "aud": "cmpirun-test-registry",
        "exp": now + 3600, "nbf": now - 60, "iat": now, "jti": format!("{now}-{}", access.len()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut openssl = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    openssl
        .stdin
        .take()
        .expect("stdin")
        .write_all(signing_input.as_bytes())?;
    let mut signature = Vec::new();
    openssl
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut signature)?;
    openssl.wait()?;
    let token = format!("{signing_input}.{}", b64(&signature));
    let body = serde_json::json!({"token": token, "access_token": token}).to_string();
    stream.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes a Docker config file at `path` with credentials for `host`.
fn write_credentials(path: &Path, host: &str, user: &str, password: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    std::fs::write(
        path,
        format!(r#"{{"auths": {{"{host}": {{"auth": "{auth}"}}}}}}"#),
    )
    .unwrap();
    chown_to_tuser(path.parent().unwrap());
    chown_to_tuser(path);
}

#[test]
fn token_auth_with_the_users_credentials() {
    let keys = tempfile::tempdir().expect("temporary folder");
    let (tokens, cert) = TokenServer::start(keys.path(), "alice", "s3cret");
    let reg = Registry::start(
        "",
        &format!(
            "auth:\n  token:\n    realm: {}\n    service: cmpirun-test-registry\n    issuer: cmpirun-test\n    rootcertbundle: {}\n",
            tokens.realm(),
            cert.display()
        ),
    );
    let host = reg.host();
    let files = tempfile::tempdir().expect("temporary folder");
    let small = copy_in(files.path(), &small_sif(), "small.sif");
    push(
        &reg,
        "team/small:v1",
        &[(&small, SIF_LAYER)],
        Some(("alice", "s3cret")),
        None,
    );
    let reference = format!("oras://{host}/team/small:v1");

    // Anonymous: refused, with what to do.
    let work = TuserDir::new();
    let out = pull_insecure(work.path(), &reference);
    assert_user_error(
        &out,
        &[&host, "refused anonymous access", "team/small", "login"],
    );
    assert_eq!(cache_names(work.path()), Vec::<String>::new());

    // Docker's file with a wrong password: refused, naming the user and the file.
    let docker = work.path().join(".docker/config.json");
    write_credentials(&docker, &host, "alice", "wrong");
    let out = pull_insecure(work.path(), &reference);
    assert_user_error(&out, &[&host, "user alice", &docker.display().to_string()]);

    // Apptainer's file is read first: with the right password, the pull goes through.
    write_credentials(
        &work.path().join(".apptainer/docker-config.json"),
        &format!("https://{host}"),
        "alice",
        "s3cret",
    );
    let out = pull_insecure(work.path(), &reference);
    out.assert_success();
    assert!(out.stdout.contains("/team/small@sha256:"), "{out}");
}

#[test]
fn tls_with_a_site_ca() {
    let pki = tempfile::tempdir().expect("temporary folder");
    let sh = |script: &str| {
        let ok = Command::new("sh")
            .args(["-ec", script])
            .current_dir(pki.path())
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("run sh")
            .success();
        assert!(ok, "{script}");
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=cmpirun-test-ca -keyout ca.key -out ca.pem
        openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout srv.key -out srv.csr
        printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext
        openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out srv.pem
        chmod a+r ca.pem");
    let reg = Registry::start(
        &format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            pki.path().join("srv.pem").display(),
            pki.path().join("srv.key").display()
        ),
        "",
    );
    let host = reg.host();
    let files = tempfile::tempdir().expect("temporary folder");
    let small = copy_in(files.path(), &small_sif(), "small.sif");
    push(
        &reg,
        "test/small:v1",
        &[(&small, SIF_LAYER)],
        None,
        Some(&pki.path().join("ca.pem")),
    );
    let reference = format!("oras://{host}/test/small:v1");
    let work = TuserDir::new();
    let out = cmpirun_in(work.path())
        .args(["image", "pull", &reference])
        .run();
    assert_user_error(&out, &[&host, "TLS", "CMPIRUN_REGISTRY_CA"]);
    // The site CA, readable by the user.
    let ca = copy_in(work.path(), &pki.path().join("ca.pem"), "site-ca.pem");
    chown_to_tuser(&ca);
    let out = cmpirun_in(work.path())
        .env("CMPIRUN_REGISTRY_CA", &ca)
        .args(["image", "pull", &reference])
        .run();
    out.assert_success();
    let missing = work.path().join("no-such-ca.pem");
    let out = cmpirun_in(work.path())
        .env("CMPIRUN_REGISTRY_CA", &missing)
        .args(["image", "pull", &reference])
        .run();
    assert_user_error(
        &out,
        &[&missing.display().to_string(), "CMPIRUN_REGISTRY_CA"],
    );
}

#[test]
fn launch_a_pulled_image() {
    let _serial = exclusive();
    let reg = Registry::start("", "");
    let host = reg.host();
    let files = tempfile::tempdir().expect("temporary folder");
    let image = copy_in(files.path(), &image("mpich4"), "mpich4.sif");
    push(&reg, "test/mpich4:v1", &[(&image, SIF_LAYER)], None, None);
    let reference = format!("oras://{host}/test/mpich4:v1");
    let work = TuserDir::new();
    let before = Snapshot::take();

    let out = cmpirun_in(work.path())
        .args(["-n", "2", "--insecure", "--dry-run", &reference])
        .arg(program("mpitest"))
        .run();
    out.assert_success();
    let digest = format!("sha256:{}", sha256_hex(&std::fs::read(&image).unwrap()));
    let file = work
        .path()
        .join("cache/cmpirun/oras")
        .join(digest.trim_start_matches("sha256:"))
        .join("image.sif");
    assert!(
        out.stdout.contains("/test/mpich4@sha256:")
            && out.stdout.contains(&digest)
            && out.stdout.contains(&file.display().to_string()),
        "the dry run shows the pinned digest, the layer and the file:\n{out}"
    );

    let out = cmpirun_in(work.path())
        .args(["-n", "2", "--insecure", &reference])
        .arg(program("mpitest"))
        .run();
    assert_mpitest_ok(&out, 2);
    assert_eq!(reg.blob_downloads(&digest), 1, "{}", reg.log());
    let mut tags = vec![out.tag.clone()];

    // exec takes one too.
    let out = cmpirun_in(work.path())
        .args([
            "exec",
            "--insecure",
            &reference,
            "/bin/sh",
            "-c",
            "echo inside",
        ])
        .run();
    out.assert_success();
    assert_eq!(out.stdout, "inside\n", "{out}");
    tags.push(out.tag.clone());

    // Under Slurm every task (`cmpirun __rank`) gets the digest in the plan and finds the layer
    // in the shared cache: still one download.
    require_slurm();
    let out = salloc_cmpirun(2)
        .env("XDG_CACHE_HOME", work.path().join("cache"))
        .args(["-n", "2", "--insecure", &reference])
        .arg(program("mpitest"))
        .run();
    assert_mpitest_ok(&out, 2);
    assert_eq!(reg.blob_downloads(&digest), 1, "{}", reg.log());
    tags.push(out.tag.clone());
    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    assert_no_leftovers(&before, &tags);
}

/// What a node does with the plan's image: fetch the layer by its digest (no tag, no manifest)
/// into its own cache; a tag moved meanwhile changes nothing, and a damaged cached copy is
/// downloaded again.
#[test]
fn nodes_fetch_the_pinned_layer() {
    use cmpirun::image::oras;
    let reg = Registry::start("", "");
    let files = tempfile::tempdir().expect("temporary folder");
    let small = copy_in(files.path(), &small_sif(), "small.sif");
    let small_bytes = std::fs::read(&small).unwrap();
    push(&reg, "test/moving:v1", &[(&small, SIF_LAYER)], None, None);
    let caches = tempfile::tempdir().expect("temporary folder");
    let front = oras::pull(
        &format!("oras://{}/test/moving:v1", reg.host()),
        &oras::PullOptions {
            insecure: true,
            cache: Some(caches.path().join("front")),
            ..Default::default()
        },
    )
    .expect("pull");
    // The tag moves to another image.
    let other = copy_in(
        files.path(),
        &fixture("one-group-signed-pgp.sif"),
        "other.sif",
    );
    push(&reg, "test/moving:v1", &[(&other, SIF_LAYER)], None, None);
    let node = oras::fetch(&front.image, Some(caches.path().join("node"))).expect("fetch");
    assert_eq!(std::fs::read(&node).unwrap(), small_bytes);
    assert!(node.starts_with(caches.path().join("node")));
    assert_eq!(reg.blob_downloads(&front.image.layer), 2, "{}", reg.log());

    // A copy damaged after it was made is found by its size and fetched again (by another
    // process: this one holds its entries until it exits).
    let pull = || {
        Command::new(cmpirun_bin())
            .env("XDG_CACHE_HOME", caches.path().join("cli"))
            .args(["image", "pull", "--insecure", &front.image.reference])
            .output()
            .expect("run cmpirun")
    };
    let out = pull();
    assert!(out.status.success(), "{out:?}");
    let cached = caches
        .path()
        .join("cli/cmpirun/oras")
        .join(front.image.layer.trim_start_matches("sha256:"))
        .join("image.sif");
    std::fs::write(&cached, b"short").unwrap();
    let out = pull();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("damaged") && stderr.contains("again"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(&cached).unwrap(), small_bytes);
    assert_eq!(reg.blob_downloads(&front.image.layer), 4, "{}", reg.log());
}
