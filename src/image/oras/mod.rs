//! SIF images in OCI registries (`oras://HOST[:PORT]/REPO:TAG` or `…@sha256:DIGEST`), as
//! Apptainer pushes and pulls them: a manifest with exactly one layer of media type
//! `application/vnd.sylabs.sif.layer.v1.sif` (or the `appliciation/vnd.sylabs.sif.layer.tar`
//! older Singularity wrote), whose blob is the SIF file.
//!
//! [`pull`] resolves a reference to its manifest digest and makes sure the layer is in the
//! user's cache of pulled images, content-addressed by the layer's digest: downloaded once per
//! cache folder (the extract cache's locks, [`crate::mount`]), its size and sha256 checked while
//! it streams in, and checked to be a SIF before it becomes an entry. [`fetch`] gets a layer
//! already resolved (by a launch's front end) on a node.
//!
//! The HTTP client is [`ureq`] (blocking, no async runtime, no threads) with rustls; the OCI
//! manifest types are [`oci_spec`]'s.

pub mod client;
pub mod credentials;
pub mod reference;

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use self::client::Registry;
pub use self::reference::{Reference, is_oras};
use crate::exit::{Blame, Fault};
use crate::mount::MountError;

/// The media type of the SIF layer Apptainer pushes.
pub const SIF_LAYER: &str = "application/vnd.sylabs.sif.layer.v1.sif";

/// The SIF layer's media type as Singularity's first ORAS support wrote it (sic).
pub const SIF_LAYER_OLD: &str = "appliciation/vnd.sylabs.sif.layer.tar";

/// The manifest types asked for.
const ACCEPT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// The file of a cache entry.
const ENTRY_FILE: &str = "image.sif";

/// Errors from pulling an image.
#[derive(Debug, thiserror::Error)]
pub enum OrasError {
    /// The `oras://` reference cannot be parsed.
    #[error(
        "{reference}: {reason}; the form is oras://HOST[:PORT]/REPO:TAG or oras://HOST[:PORT]/REPO@sha256:DIGEST"
    )]
    BadReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registry cannot be reached.
    #[error(
        "cannot reach the registry at {url}: {error} (check the host and port; a registry that serves plain HTTP needs --insecure)"
    )]
    Unreachable {
        /// What was asked for.
        url: String,
        /// What the connection said.
        error: String,
    },
    /// The TLS connection failed (most often: a certificate signed by a CA this host does not
    /// trust).
    #[error(
        "registry {host}: TLS failed: {error} (a site CA can be added with CMPIRUN_REGISTRY_CA=FILE.pem; a registry that serves plain HTTP needs --insecure)"
    )]
    Tls {
        /// The registry.
        host: String,
        /// What rustls said.
        error: String,
    },
    /// The registry did not let us in.
    #[error("registry {host}: {detail}")]
    Auth {
        /// The registry.
        host: String,
        /// What happened.
        detail: String,
    },
    /// The registry has no such manifest or blob.
    #[error(
        "{reference}: {what} not found in the registry (HTTP 404{message}); check the repository, tag and digest"
    )]
    NotFound {
        /// The image.
        reference: String,
        /// What was asked for.
        what: String,
        /// The registry's own words, `: …`, if any.
        message: String,
    },
    /// The registry answered an error status.
    #[error("{reference}: the registry answered HTTP {status} for the {what}{message}")]
    Registry {
        /// The image.
        reference: String,
        /// What was asked for.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The registry's own words, `: …`, if any.
        message: String,
    },
    /// The manifest is not that of a SIF image.
    #[error("{reference}: {reason}")]
    NotSifImage {
        /// The image.
        reference: String,
        /// What is wrong with the manifest.
        reason: String,
    },
    /// The layer's bytes are not what the manifest says (size or digest).
    #[error("{reference}: layer {digest}: {reason}; nothing was kept")]
    BadLayer {
        /// The image.
        reference: String,
        /// The layer's digest.
        digest: String,
        /// What differs.
        reason: String,
    },
    /// The download broke off.
    #[error("{reference}: downloading layer {digest} failed after {got} of {size} bytes: {error}")]
    Transfer {
        /// The image.
        reference: String,
        /// The layer's digest.
        digest: String,
        /// Bytes received.
        got: u64,
        /// Bytes expected.
        size: u64,
        /// What the connection said.
        error: String,
    },
    /// The layer is not a SIF file.
    #[error("{reference}: layer {digest} is not a SIF file: {reason}; nothing was kept")]
    NotSif {
        /// The image.
        reference: String,
        /// The layer's digest.
        digest: String,
        /// Why not.
        reason: String,
    },
    /// A credentials file cannot be read.
    #[error("{}: cannot read registry credentials: {reason}", file.display())]
    Credentials {
        /// The file.
        file: PathBuf,
        /// Why.
        reason: String,
    },
    /// A site CA file cannot be used.
    #[error("{}: cannot use as a CA certificate ({}): {reason}", file.display(), client::CA_ENV)]
    BadCa {
        /// The file.
        file: PathBuf,
        /// Why.
        reason: String,
    },
    /// Neither `XDG_CACHE_HOME` nor `HOME` is set.
    #[error("no cache folder for pulled images: neither XDG_CACHE_HOME nor HOME is set")]
    NoCache,
    /// The cache cannot be used.
    #[error("cache of pulled images: {0}")]
    Cache(#[from] MountError),
    /// A file cannot be written.
    #[error("{}: {error}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the system said.
        error: std::io::Error,
    },
}

impl Blame for OrasError {
    fn fault(&self) -> Fault {
        match self {
            OrasError::Registry { status, .. } => Fault::user_if(*status < 500),
            OrasError::Transfer { .. } | OrasError::NoCache => Fault::Host,
            OrasError::Cache(e) => e.fault(),
            OrasError::Write { .. } => Fault::Host,
            _ => Fault::User,
        }
    }
}

/// An image in a registry, resolved: what a launch's plan carries to every node, so that each
/// pulls the very same bytes (or finds them in its cache without asking the registry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryImage {
    /// The reference as the user gave it (`oras://host/repo:tag`).
    pub given: String,
    /// The reference pinned to the manifest's digest (`oras://host/repo@sha256:…`).
    pub reference: String,
    /// The SIF layer's digest (`sha256:…`): the cache entry's name.
    pub layer: String,
    /// The SIF layer's size in bytes.
    pub size: u64,
    /// Whether the registry is spoken to in plain HTTP (`--insecure`).
    pub insecure: bool,
}

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Speak plain HTTP to the registry (`--insecure`).
    pub insecure: bool,
    /// Registries (`HOST[:PORT]`) spoken to in plain HTTP (a profile's `insecure_registries`).
    pub insecure_hosts: Vec<String>,
    /// The cache folder (default: [`default_cache`]).
    pub cache: Option<PathBuf>,
    /// Show a progress bar on a terminal (standard error) while downloading.
    pub progress: bool,
}

/// A pulled image: the SIF file in the cache, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The SIF file (inside the cache entry, held by this process until it exits).
    pub path: PathBuf,
    /// The image, resolved.
    pub image: RegistryImage,
}

/// The default cache of pulled images: `$XDG_CACHE_HOME/cmpirun/oras`, else
/// `$HOME/.cache/cmpirun/oras`.
pub fn default_cache() -> Option<PathBuf> {
    Some(crate::mount::user_cache_in(crate::mount::env_var)?.join("oras"))
}

/// Pulls the image `given` (`oras://…`): resolves its tag to a manifest digest, checks that the
/// manifest is a SIF image's, and makes sure its layer is in the cache. The entry stays held
/// (safe from pruning) until this process exits.
pub fn pull(given: &str, opts: &PullOptions) -> Result<Pulled, OrasError> {
    let reference = Reference::parse(given)?;
    let insecure = opts.insecure || opts.insecure_hosts.contains(&reference.host);
    let mut registry = Registry::new(&reference.host, insecure)?;
    let (manifest_digest, layer, size) = resolve(&mut registry, &reference)?;
    let image = RegistryImage {
        given: given.to_owned(),
        reference: reference.pinned(&manifest_digest).to_string(),
        layer,
        size,
        insecure,
    };
    let path = cached(&image, opts, Some(registry))?;
    Ok(Pulled { path, image })
}

/// [`pull`] for each image of a job that is an `oras://` reference (`None` for the others), each
/// distinct reference once.
pub fn pull_images(
    images: &[PathBuf],
    opts: &PullOptions,
) -> Result<Vec<Option<Pulled>>, OrasError> {
    let mut pulled: Vec<Option<Pulled>> = Vec::with_capacity(images.len());
    for (i, image) in images.iter().enumerate() {
        let Some(given) = image.to_str().filter(|_| is_oras(image)) else {
            pulled.push(None);
            continue;
        };
        let earlier = images[..i]
            .iter()
            .position(|p| p == image)
            .and_then(|j| pulled[j].clone());
        pulled.push(Some(match earlier {
            Some(p) => p,
            None => pull(given, opts)?,
        }));
    }
    Ok(pulled)
}

/// The file of an image resolved elsewhere (a launch's front end): from the cache, or pulled by
/// its layer digest, without looking at tags. Held until this process exits.
pub fn fetch(image: &RegistryImage, cache: Option<PathBuf>) -> Result<PathBuf, OrasError> {
    let opts = PullOptions {
        insecure: image.insecure,
        cache,
        ..Default::default()
    };
    cached(image, &opts, None)
}

/// Asks the registry for the manifest of `reference` (choosing this host's platform from an
/// index) and checks it is a SIF image's: returns the manifest's digest and its one layer's
/// digest and size.
fn resolve(
    registry: &mut Registry,
    reference: &Reference,
) -> Result<(String, String, u64), OrasError> {
    let (digest, body) = manifest(registry, reference, reference.manifest_ref())?;
    let not_sif = |reason: String| OrasError::NotSifImage {
        reference: reference.to_string(),
        reason,
    };
    let (digest, manifest) = match serde_json::from_slice::<ImageManifest>(&body) {
        Ok(m) => (digest, m),
        Err(e) => {
            let index: ImageIndex = serde_json::from_slice(&body)
                .map_err(|_| not_sif(format!("the registry's manifest cannot be read: {e}")))?;
            let arch = crate::image::sif::Arch::host().name();
            let chosen = index
                .manifests()
                .iter()
                .find(|d| {
                    d.platform().as_ref().is_some_and(|p| {
                        p.os().to_string() == "linux" && p.architecture().to_string() == arch
                    })
                })
                .ok_or_else(|| not_sif(format!("its index lists no manifest for linux/{arch}")))?;
            let (digest, body) = manifest(registry, reference, chosen.digest().as_ref())?;
            let m = serde_json::from_slice::<ImageManifest>(&body)
                .map_err(|e| not_sif(format!("the registry's manifest cannot be read: {e}")))?;
            (digest, m)
        }
    };
    let layer = match manifest.layers().as_slice() {
        [one] => one,
        layers => {
            return Err(not_sif(format!(
                "the manifest has {} layers; a SIF image pushed with ORAS has exactly one (media type {SIF_LAYER})",
                layers.len()
            )));
        }
    };
    let media_type = layer.media_type().to_string();
    if media_type != SIF_LAYER && media_type != SIF_LAYER_OLD {
        return Err(not_sif(format!(
            "its layer is of media type {media_type}, not a SIF image ({SIF_LAYER})"
        )));
    }
    let layer_digest = layer.digest().to_string();
    reference::check_digest(&layer_digest).map_err(not_sif)?;
    tracing::info!(
        "{reference}: manifest {digest}, SIF layer {layer_digest} ({} bytes)",
        layer.size()
    );
    Ok((digest, layer_digest, layer.size()))
}

/// Fetches the manifest `which` (a tag or a digest) of `reference`'s repository; returns its
/// digest (checked against `which` when that is one) and its bytes.
fn manifest(
    registry: &mut Registry,
    reference: &Reference,
    which: &str,
) -> Result<(String, Vec<u8>), OrasError> {
    let what = format!("manifest {which}");
    let path = format!("{}/manifests/{which}", reference.repository);
    let mut resp = registry.get(&path, ACCEPT_MANIFEST, &reference.repository)?;
    check_status(&mut resp, reference, &what)?;
    let body = resp
        .body_mut()
        .with_config()
        .limit(4 << 20)
        .read_to_vec()
        .map_err(|e| OrasError::Unreachable {
            url: format!("{reference} ({what})"),
            error: e.to_string(),
        })?;
    let digest = format!("sha256:{}", hex(&Sha256::digest(&body)));
    if which.starts_with("sha256:") && digest != which {
        return Err(OrasError::NotSifImage {
            reference: reference.to_string(),
            reason: format!("the registry's manifest has digest {digest}, not {which}"),
        });
    }
    Ok((digest, body))
}

/// An error for any status but 200, with the registry's own message when it sent one.
fn check_status(
    resp: &mut ureq::http::Response<ureq::Body>,
    reference: &Reference,
    what: &str,
) -> Result<(), OrasError> {
    let status = resp.status().as_u16();
    if status == 200 {
        return Ok(());
    }
    let message = resp
        .body_mut()
        .with_config()
        .limit(64 << 10)
        .read_to_vec()
        .ok()
        .and_then(|b| serde_json::from_slice::<oci_spec::distribution::ErrorResponse>(&b).ok())
        .and_then(|r| r.detail().iter().find_map(|e| e.message().clone()))
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    Err(if status == 404 {
        OrasError::NotFound {
            reference: reference.to_string(),
            what: what.to_owned(),
            message,
        }
    } else {
        OrasError::Registry {
            reference: reference.to_string(),
            what: what.to_owned(),
            status,
            message,
        }
    })
}

/// The cached file of `image`'s layer, downloaded into the cache first when it is not there
/// (through `registry` if given, else a new client). An entry whose file has not the layer's
/// size (damaged after it was made) is removed and downloaded again when no job uses it.
fn cached(
    image: &RegistryImage,
    opts: &PullOptions,
    registry: Option<Registry>,
) -> Result<PathBuf, OrasError> {
    let cache = match &opts.cache {
        Some(c) => c.clone(),
        None => default_cache().ok_or(OrasError::NoCache)?,
    };
    let key = image.layer.trim_start_matches("sha256:").to_owned();
    let mut registry = registry;
    for attempt in 0..2 {
        let fill = |tmp: &Path| fill_entry(image, opts, registry.take(), tmp);
        let (tree, lock, _) = match crate::mount::hold_entry(&cache, &key, fill) {
            Ok(held) => held,
            Err(e) => {
                // A failed pull leaves no entry; its lock files go too unless another process
                // uses them (it then fills the entry itself).
                let _ = crate::mount::remove_entry(&cache, &cache.join(&key));
                return Err(e);
            }
        };
        let file = tree.join(ENTRY_FILE);
        let size = std::fs::metadata(&file).map(|m| m.len()).ok();
        if size == Some(image.size) {
            crate::mount::hold_until_exit(lock);
            return Ok(file);
        }
        drop(lock);
        let removed = crate::mount::remove_entry(&cache, &tree)?;
        tracing::warn!(
            "{}: the cached copy {} is damaged ({} bytes, not {}){}",
            image.given,
            file.display(),
            size.map_or("no file".into(), |s| s.to_string()),
            image.size,
            if removed {
                "; downloading it again"
            } else {
                ""
            }
        );
        if !removed || attempt == 1 {
            break;
        }
    }
    Err(OrasError::BadLayer {
        reference: image.reference.clone(),
        digest: image.layer.clone(),
        reason: format!(
            "its cached copy in {} is damaged and another job uses it; `cmpirun image cache --clear` removes it once no job does",
            cache.display()
        ),
    })
}

/// Fills the cache entry's temporary directory `tmp` with the layer of `image`: downloaded,
/// size and digest checked while it streams in, and checked to be a SIF file.
fn fill_entry(
    image: &RegistryImage,
    opts: &PullOptions,
    registry: Option<Registry>,
    tmp: &Path,
) -> Result<(), OrasError> {
    let reference = Reference::parse(&image.reference)?;
    let mut registry = match registry {
        Some(r) => r,
        None => Registry::new(&reference.host, image.insecure)?,
    };
    std::fs::create_dir(tmp).map_err(|error| OrasError::Write {
        path: tmp.to_owned(),
        error,
    })?;
    let file = tmp.join(ENTRY_FILE);
    download(&mut registry, &reference, image, &file, opts.progress)?;
    check_sif(&file).map_err(|reason| OrasError::NotSif {
        reference: image.reference.clone(),
        digest: image.layer.clone(),
        reason,
    })
}

/// Streams the layer of `image` into `dest`, hashing and counting as it comes.
fn download(
    registry: &mut Registry,
    reference: &Reference,
    image: &RegistryImage,
    dest: &Path,
    progress: bool,
) -> Result<(), OrasError> {
    let what = format!("layer {}", image.layer);
    let path = format!("{}/blobs/{}", reference.repository, image.layer);
    let mut resp = registry.get(&path, "*/*", &reference.repository)?;
    check_status(&mut resp, reference, &what)?;
    let write_err = |error| OrasError::Write {
        path: dest.to_owned(),
        error,
    };
    let mut out = File::create_new(dest).map_err(write_err)?;
    let bar = progress_bar(image, progress);
    let mut body = resp.into_body().into_reader();
    let mut hasher = Sha256::new();
    let mut got: u64 = 0;
    let mut buf = vec![0u8; 256 << 10];
    let bad = |reason: String| OrasError::BadLayer {
        reference: image.reference.clone(),
        digest: image.layer.clone(),
        reason,
    };
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                bar.abandon();
                return Err(OrasError::Transfer {
                    reference: image.reference.clone(),
                    digest: image.layer.clone(),
                    got,
                    size: image.size,
                    error: e.to_string(),
                });
            }
        };
        got += n as u64;
        if got > image.size {
            bar.abandon();
            return Err(bad(format!(
                "the registry sent more than the {} bytes the manifest says",
                image.size
            )));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(write_err)?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    if got < image.size {
        return Err(bad(format!(
            "truncated: the registry sent {got} of the {} bytes the manifest says",
            image.size
        )));
    }
    let digest = format!("sha256:{}", hex(&hasher.finalize()));
    if digest != image.layer {
        return Err(bad(format!("the bytes received have digest {digest}")));
    }
    out.sync_all().map_err(write_err)
}

/// A progress bar on standard error when it is a terminal and `wanted`; else a hidden one.
fn progress_bar(image: &RegistryImage, wanted: bool) -> indicatif::ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    indicatif::ProgressBar::with_draw_target(
        Some(image.size),
        indicatif::ProgressDrawTarget::stderr(),
    )
    .with_style(style)
    .with_message(format!("pulling {}", image.given))
}

/// Why `file` is not a SIF file whose header and object table can be read, if it is not.
fn check_sif(file: &Path) -> Result<(), String> {
    let mut head = Vec::with_capacity(128);
    File::open(file)
        .and_then(|f| f.take(128).read_to_end(&mut head))
        .map_err(|e| e.to_string())?;
    if !crate::image::sif::has_magic(&head) {
        return Err("no SIF magic at byte 32".into());
    }
    match crate::image::read_sif(file) {
        Ok(_) => Ok(()),
        Err(crate::image::ImageError::Sif { error, .. }) => Err(error.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Copies the pulled `file` to `output` (through a temporary file beside it, renamed when
/// complete: a failed copy leaves nothing).
pub fn copy_out(file: &Path, output: &Path) -> Result<(), OrasError> {
    let write_err = |error| OrasError::Write {
        path: output.to_owned(),
        error,
    };
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".cmpirun-pull-")
        .tempfile_in(dir)
        .map_err(write_err)?;
    std::fs::copy(file, tmp.path()).map_err(write_err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(write_err)?;
    tmp.persist(output).map_err(|e| write_err(e.error))?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whose_errors() {
        let reg = |status| OrasError::Registry {
            reference: "r".into(),
            what: "w".into(),
            status,
            message: String::new(),
        };
        assert_eq!(reg(400).fault(), Fault::User);
        assert_eq!(reg(503).fault(), Fault::Host);
        let unreachable = OrasError::Unreachable {
            url: "u".into(),
            error: "refused".into(),
        };
        assert_eq!(unreachable.fault(), Fault::User);
    }
}
