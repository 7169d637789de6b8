//! Signatures on SIF images: `cmpirun image verify` and `cmpirun image sign`.
//!
//! A current SIF signature is a `Signature` object, in no group, linked to an object group. It
//! holds the group's metadata ([`metadata::ImageMetadata`]: digests of the header's fixed
//! fields, of each object's descriptor and of each object's bytes) either in a DSSE envelope
//! signed with PEM keys ([`dsse`]) or as an OpenPGP clear-signed message ([`openpgp`]). A legacy
//! signature (Singularity ≤ 3.5) is a clear-signed `SIFHASH:` line: one digest of one object's
//! bytes or of a group's bytes, nothing of the header or descriptors; it is reported and trusted
//! only when asked.
//!
//! [`verify`] recomputes every digest from the image and reports, per signature, which objects
//! it covers and which given key made it, and per group whether verified signatures cover every
//! object. [`sign`] appends one DSSE signature object per group, laid out as the reference
//! implementation lays it out.

pub mod cache;
pub mod dsse;
pub mod metadata;
pub mod openpgp;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use self::dsse::{KeyError, NamedPublicKey, PrivateKey};
use self::metadata::{Digest, DigestAlg, ImageMetadata};
use self::openpgp::{Clearsigned, Keyring};
use crate::exit::{Blame, Fault};
use crate::image::sif::{
    self, DESCRIPTOR_LEN, DataType, Descriptor, Extra, GO_ZERO_TIME, GROUP_MASK, HashType, Link,
    SifError, SifFile,
};

/// A signature object larger than this is not read (real ones are a few KiB).
const MAX_SIGNATURE_BYTES: i64 = 16 << 20;

/// The plaintext prefix of legacy signatures.
const LEGACY_PREFIX: &str = "SIFHASH:\n";

/// Why an image could not be verified or signed at all (a verification that ran and found the
/// image wanting is a [`VerifyReport`] whose `verified` is false).
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    /// The image could not be opened, read or written.
    #[error("{}: cannot {what}: {error}", path.display())]
    Io {
        /// The image path.
        path: PathBuf,
        /// Read or write.
        what: &'static str,
        /// What the system said.
        error: io::Error,
    },
    /// The file is not a SIF image.
    #[error("{}: {error} (only SIF images carry signatures)", path.display())]
    Sif {
        /// The image path.
        path: PathBuf,
        /// What is wrong with it.
        error: SifError,
    },
    /// A key file is unusable.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The image cannot be signed as it is.
    #[error("{}: cannot sign: {reason}", path.display())]
    CannotSign {
        /// The image path.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
}

impl Blame for IntegrityError {
    fn fault(&self) -> Fault {
        match self {
            IntegrityError::Io { error, .. } => Fault::user_if(matches!(
                error.kind(),
                io::ErrorKind::NotFound
                    | io::ErrorKind::PermissionDenied
                    | io::ErrorKind::IsADirectory
            )),
            _ => Fault::User,
        }
    }
}

/// The keys a verification accepts.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// PEM public keys for DSSE signatures.
    pub keys: Vec<NamedPublicKey>,
    /// An OpenPGP keyring for clear-signed (and legacy) signatures.
    pub keyring: Option<Keyring>,
    /// Trust legacy signatures (object bytes only) as well.
    pub legacy: bool,
}

/// The format of a signature object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureFormat {
    /// A DSSE envelope of the metadata (PEM keys).
    Dsse,
    /// OpenPGP clear-signed metadata.
    Pgp,
    /// A legacy OpenPGP clear-signed `SIFHASH:` digest.
    Legacy,
    /// Neither.
    Unknown,
}

/// What became of one signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureStatus {
    /// Made by a given key, and everything it signed is unchanged.
    Verified,
    /// Made by a given key (or malformed), and the image differs from what it signed.
    Failed,
    /// No given key made it.
    Unverified,
    /// No key of its kind was given.
    NoKey,
    /// A legacy signature, not considered without `--legacy`.
    Untrusted,
}

/// A key that verified a signature.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignerReport {
    /// SSH SHA-256 fingerprint of a PEM key, or an OpenPGP primary-key fingerprint.
    pub fingerprint: String,
    /// `ed25519`, `ecdsa-p256`, `rsa-4096`, `openpgp`.
    pub kind: String,
    /// The key file.
    pub source: PathBuf,
}

/// One signature object and what checking it found.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SignatureReport {
    /// The signature's object ID.
    pub id: u32,
    /// Its format.
    pub format: SignatureFormat,
    /// The group it is linked to, if any.
    pub group: Option<u32>,
    /// The object it is linked to, if any (legacy per-object signatures).
    pub object: Option<u32>,
    /// The hash its descriptor names (`SHA-256`).
    pub hash: String,
    /// Who the signature says made it (DSSE key IDs, OpenPGP fingerprints): unauthenticated.
    pub claimed_signers: Vec<String>,
    /// The given keys that verified it.
    pub verified_by: Vec<SignerReport>,
    /// The objects whose bytes (and, for DSSE/PGP, descriptors) it was found to cover.
    pub covers: Vec<u32>,
    /// For DSSE and PGP, whether the header's fixed fields were checked as well.
    pub covers_header: bool,
    /// The outcome.
    pub status: SignatureStatus,
    /// Why it is not verified.
    pub reason: Option<String>,
}

/// Whether verified signatures cover one object group.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GroupReport {
    /// The group number.
    pub group: u32,
    /// Its objects that need covering (all but signatures).
    pub objects: Vec<u32>,
    /// The verified signatures covering some of them.
    pub signatures: Vec<u32>,
    /// Objects no verified signature covers.
    pub uncovered: Vec<u32>,
}

/// The result of [`verify`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    /// The image.
    pub image: PathBuf,
    /// Every group is covered by verified signatures, no signature failed, and no object lies
    /// outside a group.
    pub verified: bool,
    /// Per group.
    pub groups: Vec<GroupReport>,
    /// Per signature object, by ID.
    pub signatures: Vec<SignatureReport>,
    /// Image-wide reasons it is not verified.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// One line saying why the image is not verified (empty when it is).
    pub fn failure_summary(&self) -> String {
        let mut why: Vec<String> = self.problems.clone();
        for s in &self.signatures {
            if s.status == SignatureStatus::Failed {
                why.push(format!(
                    "signature {} failed: {}",
                    s.id,
                    s.reason.as_deref().unwrap_or("")
                ));
            }
        }
        for g in &self.groups {
            if !g.uncovered.is_empty() {
                let because: Vec<String> = self
                    .signatures
                    .iter()
                    .filter(|s| {
                        s.group == Some(g.group) || s.object.is_some_and(|o| g.objects.contains(&o))
                    })
                    .filter(|s| s.status != SignatureStatus::Failed)
                    .filter_map(|s| {
                        s.reason
                            .as_ref()
                            .map(|r| format!("signature {}: {r}", s.id))
                    })
                    .collect();
                why.push(format!(
                    "object group {} (objects {}) is not covered by a verified signature{}",
                    g.group,
                    list(&g.uncovered),
                    if because.is_empty() {
                        " (no signature covers them)".to_owned()
                    } else {
                        format!(" ({})", because.join("; "))
                    }
                ));
            }
        }
        why.join("; ")
    }
}

fn list(ids: &[u32]) -> String {
    ids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn open_sif(path: &Path, write: bool) -> Result<(File, SifFile), IntegrityError> {
    let io = |what, error| IntegrityError::Io {
        path: path.to_owned(),
        what,
        error,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| io(if write { "open for writing" } else { "read" }, e))?;
    let sif = sif::read(&mut file).map_err(|error| IntegrityError::Sif {
        path: path.to_owned(),
        error,
    })?;
    Ok((file, sif))
}

fn read_object(file: &mut File, d: &Descriptor) -> io::Result<Vec<u8>> {
    let mut data = vec![0u8; d.size as usize];
    file.seek(SeekFrom::Start(d.offset as u64))?;
    file.read_exact(&mut data)?;
    Ok(data)
}

/// Checks every signature of the SIF image at `path` against the keys in `opts`.
pub fn verify(path: &Path, opts: &VerifyOptions) -> Result<VerifyReport, IntegrityError> {
    let file = std::fs::File::open(path).map_err(|error| IntegrityError::Io {
        path: path.to_owned(),
        what: "read",
        error,
    })?;
    verify_file(path, file, opts)
}

/// [`verify`] of the image open as `file` (`path` for messages): what is checked is that file,
/// whatever `path` names by now.
fn verify_file(
    path: &Path,
    mut file: File,
    opts: &VerifyOptions,
) -> Result<VerifyReport, IntegrityError> {
    let sif = sif::read(&mut file).map_err(|error| IntegrityError::Sif {
        path: path.to_owned(),
        error,
    })?;
    let mut problems = Vec::new();
    for d in &sif.descriptors {
        if d.group().is_none() && d.data_type != DataType::Signature {
            problems.push(format!(
                "object {} ({}) is in no object group, so no signature can cover it",
                d.id,
                d.data_type.name()
            ));
        }
    }
    let mut signatures = Vec::new();
    let mut sig_descs: Vec<&Descriptor> = sif
        .descriptors
        .iter()
        .filter(|d| d.data_type == DataType::Signature)
        .collect();
    sig_descs.sort_by_key(|d| d.id);
    for d in sig_descs {
        let data = if d.size > MAX_SIGNATURE_BYTES {
            None
        } else {
            Some(
                read_object(&mut file, d).map_err(|error| IntegrityError::Io {
                    path: path.to_owned(),
                    what: "read",
                    error,
                })?,
            )
        };
        let mut check = SignatureCheck {
            file: &mut file,
            sif: &sif,
            opts,
        };
        signatures.push(
            check
                .check(d, data.as_deref())
                .map_err(|error| IntegrityError::Io {
                    path: path.to_owned(),
                    what: "read",
                    error,
                })?,
        );
    }
    let groups: Vec<GroupReport> = metadata::groups(&sif)
        .into_iter()
        .map(|g| group_report(&sif, g, &signatures))
        .collect();
    if groups.is_empty() {
        problems.push("the image holds no object group, so nothing in it is signed".into());
    }
    let verified = problems.is_empty()
        && groups.iter().all(|g| g.uncovered.is_empty())
        && signatures
            .iter()
            .all(|s| s.status != SignatureStatus::Failed);
    Ok(VerifyReport {
        image: path.to_owned(),
        verified,
        groups,
        signatures,
        problems,
    })
}

fn group_report(sif: &SifFile, group: u32, signatures: &[SignatureReport]) -> GroupReport {
    let objects: Vec<u32> = metadata::group_members(sif, group)
        .into_iter()
        .filter(|d| d.data_type != DataType::Signature)
        .map(|d| d.id)
        .collect();
    let by: Vec<&SignatureReport> = signatures
        .iter()
        .filter(|s| s.status == SignatureStatus::Verified)
        .filter(|s| s.covers.iter().any(|o| objects.contains(o)))
        .collect();
    let uncovered = objects
        .iter()
        .copied()
        .filter(|o| !by.iter().any(|s| s.covers.contains(o)))
        .collect();
    GroupReport {
        group,
        objects,
        signatures: by.iter().map(|s| s.id).collect(),
        uncovered,
    }
}

/// Checking one signature object.
struct SignatureCheck<'a> {
    file: &'a mut File,
    sif: &'a SifFile,
    opts: &'a VerifyOptions,
}

impl SignatureCheck<'_> {
    fn check(&mut self, d: &Descriptor, data: Option<&[u8]>) -> io::Result<SignatureReport> {
        let (hash_type, entity) = match d.decoded_extra() {
            Extra::Signature { hash_type, entity } => (hash_type, entity),
            _ => (HashType::Unknown(0), [0; 20]),
        };
        let (group, object) = match d.link() {
            Link::Group(g) => (Some(g), None),
            Link::Object(o) => (None, Some(o)),
            Link::None => (None, None),
        };
        let r = SignatureReport {
            id: d.id,
            format: SignatureFormat::Unknown,
            group,
            object,
            hash: hash_type.name().to_owned(),
            claimed_signers: Vec::new(),
            verified_by: Vec::new(),
            covers: Vec::new(),
            covers_header: false,
            status: SignatureStatus::Unverified,
            reason: None,
        };
        let entity_fp = (entity != [0; 20]).then(|| hex::encode_upper(entity));
        let Some(data) = data else {
            return Ok(r.fail(format!(
                "the signature object is {} bytes, too large to be one",
                d.size
            )));
        };
        let Some(alg) = DigestAlg::from_hash_type(hash_type) else {
            let why = format!(
                "its descriptor names hash {}, which is not supported",
                r.hash
            );
            return Ok(r.fail(why));
        };
        match dsse::parse_envelope(data) {
            Some(env) => self.check_dsse(r, &env, alg),
            None => self.check_clearsigned(r, data, entity_fp, alg),
        }
    }

    /// A DSSE envelope: made by a given PEM key, then its metadata.
    fn check_dsse(
        &mut self,
        mut r: SignatureReport,
        env: &dsse::Envelope,
        alg: DigestAlg,
    ) -> io::Result<SignatureReport> {
        r.format = SignatureFormat::Dsse;
        r.claimed_signers = env.signatures.iter().map(|s| s.keyid.clone()).collect();
        if self.opts.keys.is_empty() {
            return Ok(r.with(
                SignatureStatus::NoKey,
                "a DSSE signature; give its signer's public key with --key PEM".into(),
            ));
        }
        let checked = match dsse::check_envelope(env, &self.opts.keys, alg) {
            Ok(c) => c,
            Err(e) => return Ok(r.fail(e)),
        };
        if checked.verified_by.is_empty() {
            let given: Vec<String> = self
                .opts
                .keys
                .iter()
                .map(|k| k.fingerprint.clone())
                .collect();
            let why = format!(
                "none of the given keys ({}) made it; it names key(s) {}",
                given.join(", "),
                r.claimed_signers.join(", ")
            );
            return Ok(r.with(SignatureStatus::Unverified, why));
        }
        r.verified_by = checked
            .verified_by
            .iter()
            .map(|k| SignerReport {
                fingerprint: k.fingerprint.clone(),
                kind: k.key.kind(),
                source: k.source.clone(),
            })
            .collect();
        self.check_metadata(r, &checked.payload)
    }

    /// An OpenPGP clear-signed message: metadata, or a legacy `SIFHASH:` digest.
    fn check_clearsigned(
        &mut self,
        mut r: SignatureReport,
        data: &[u8],
        entity_fp: Option<String>,
        alg: DigestAlg,
    ) -> io::Result<SignatureReport> {
        if !openpgp::is_clearsigned(data) {
            return Ok(r.with(
                SignatureStatus::Unverified,
                "neither a DSSE envelope of SIF metadata nor an OpenPGP clear-signed message"
                    .into(),
            ));
        }
        let cs = match Clearsigned::parse(data) {
            Ok(cs) => cs,
            Err(e) => return Ok(r.fail(e)),
        };
        let plaintext = cs.plaintext();
        let legacy = plaintext.starts_with(LEGACY_PREFIX);
        r.format = if legacy {
            SignatureFormat::Legacy
        } else {
            SignatureFormat::Pgp
        };
        r.claimed_signers = entity_fp.clone().map_or_else(|| cs.issuers(), |f| vec![f]);
        if legacy && !self.opts.legacy {
            return Ok(r.with(
                SignatureStatus::Untrusted,
                "a legacy signature (object bytes only, not the header or descriptors); not \
                 trusted without --legacy"
                    .into(),
            ));
        }
        let Some(ring) = &self.opts.keyring else {
            return Ok(r.with(
                SignatureStatus::NoKey,
                "an OpenPGP signature; give its signer's public key with --keyring FILE".into(),
            ));
        };
        let Some(fp) = cs.verified_by(ring) else {
            let why = format!(
                "no key in {} made it; it names {}",
                ring.source.display(),
                r.claimed_signers.join(", ")
            );
            return Ok(r.with(SignatureStatus::Unverified, why));
        };
        if let Some(claimed) = entity_fp.filter(|c| *c != fp) {
            return Ok(r.fail(format!(
                "its descriptor names key {claimed}, but key {fp} made it"
            )));
        }
        r.verified_by = vec![SignerReport {
            fingerprint: fp,
            kind: "openpgp".into(),
            source: ring.source.clone(),
        }];
        if legacy {
            self.check_legacy(r, &plaintext, alg)
        } else {
            self.check_metadata(r, plaintext.as_bytes())
        }
    }

    /// Checks signed metadata against the image: the header, then each object's descriptor and
    /// bytes.
    fn check_metadata(
        &mut self,
        mut r: SignatureReport,
        payload: &[u8],
    ) -> io::Result<SignatureReport> {
        let Some(group) = r.group else {
            return Ok(r.fail("a metadata signature must be linked to an object group".into()));
        };
        let md: ImageMetadata = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(e) => return Ok(r.fail(format!("the signed metadata is not valid: {e}"))),
        };
        if md.version != metadata::METADATA_VERSION {
            return Ok(r.fail(format!("unknown signed metadata version {}", md.version)));
        }
        let Some(min_id) = metadata::group_min_id(self.sif, group) else {
            return Ok(r.fail(format!("object group {group} is not in the image")));
        };
        let header = metadata::header_integrity_bytes(&self.sif.header);
        if md.header.digest.alg.digest(&header) != md.header.digest {
            return Ok(r.fail(
                "the header changed: its launch script, magic, version or image ID differ from \
                 what was signed"
                    .into(),
            ));
        }
        r.covers_header = true;
        let members = metadata::group_members(self.sif, group);
        let mut covers = Vec::new();
        for om in &md.objects {
            let id = min_id.saturating_add(om.relative_id);
            let Some(d) = members.iter().find(|d| d.id == id) else {
                return Ok(r.fail(format!(
                    "signed object {id} is no longer in object group {group}"
                )));
            };
            let bytes = metadata::descriptor_integrity_bytes(d, metadata::relative_id(self.sif, d));
            if om.descriptor_digest.alg.digest(&bytes) != om.descriptor_digest {
                return Ok(r.fail(format!(
                    "the descriptor of object {id} ({}) changed: its type, link, size, time, name \
                     or extra field differ from what was signed",
                    d.data_type.name()
                )));
            }
            let got =
                om.object_digest
                    .alg
                    .digest_range(self.file, d.offset as u64, d.size as u64)?;
            if got != om.object_digest {
                return Ok(r.fail(object_changed(d, &om.object_digest, &got)));
            }
            covers.push(id);
        }
        r.covers = covers;
        r.status = SignatureStatus::Verified;
        Ok(r)
    }

    /// Checks a legacy `SIFHASH:` digest: of the linked object's bytes, or of the linked group's
    /// objects' bytes one after another.
    fn check_legacy(
        &mut self,
        mut r: SignatureReport,
        plaintext: &str,
        alg: DigestAlg,
    ) -> io::Result<SignatureReport> {
        let hexdigest = plaintext
            .trim_start_matches(LEGACY_PREFIX)
            .trim_end_matches('\n');
        let Ok(want) = format!("{}:{hexdigest}", alg.name()).parse::<Digest>() else {
            let why = format!("the signed text {plaintext:?} is not a {} digest", r.hash);
            return Ok(r.fail(why));
        };
        let objects: Vec<&Descriptor> = match (r.group, r.object) {
            (Some(g), _) => metadata::group_members(self.sif, g),
            (None, Some(o)) => self.sif.descriptors.iter().filter(|d| d.id == o).collect(),
            (None, None) => Vec::new(),
        };
        if objects.is_empty() {
            return Ok(r.fail("it is linked to no object of the image".into()));
        }
        let ranges: Vec<(u64, u64)> = objects
            .iter()
            .map(|d| (d.offset as u64, d.size as u64))
            .collect();
        let got = alg.digest_ranges(self.file, &ranges)?;
        if got != want {
            let ids: Vec<u32> = objects.iter().map(|d| d.id).collect();
            return Ok(r.fail(format!(
                "the bytes of object(s) {} changed: their {} digest is {got}, the signed one {want}",
                list(&ids),
                alg.name()
            )));
        }
        r.covers = objects.iter().map(|d| d.id).collect();
        r.status = SignatureStatus::Verified;
        Ok(r)
    }
}

fn object_changed(d: &Descriptor, want: &Digest, got: &Digest) -> String {
    format!(
        "object {} ({}) changed: its bytes hash to {got}, the signed digest is {want}",
        d.id,
        d.data_type.name()
    )
}

impl SignatureReport {
    fn with(mut self, status: SignatureStatus, reason: String) -> Self {
        self.status = status;
        self.reason = Some(reason);
        self
    }

    fn fail(self, reason: String) -> Self {
        self.with(SignatureStatus::Failed, reason)
    }
}

/// Renders a [`VerifyReport`] as text.
pub fn render_text(r: &VerifyReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: {}",
        r.image.display(),
        if r.verified {
            "verified"
        } else {
            "NOT verified"
        }
    );
    for sig in &r.signatures {
        let target = match (sig.group, sig.object) {
            (Some(g), _) => format!("object group {g}"),
            (None, Some(o)) => format!("object {o}"),
            (None, None) => "nothing".into(),
        };
        let format = match sig.format {
            SignatureFormat::Dsse => "DSSE",
            SignatureFormat::Pgp => "OpenPGP",
            SignatureFormat::Legacy => "legacy OpenPGP",
            SignatureFormat::Unknown => "unknown format",
        };
        let status = match sig.status {
            SignatureStatus::Verified => "verified",
            SignatureStatus::Failed => "FAILED",
            SignatureStatus::Unverified => "not verified",
            SignatureStatus::NoKey => "not checked",
            SignatureStatus::Untrusted => "legacy, not trusted",
        };
        let _ = writeln!(
            s,
            "signature {} ({format}, {}) for {target}: {status}",
            sig.id, sig.hash
        );
        if !sig.covers.is_empty() {
            let what = if sig.covers_header {
                "the header, and the descriptors and bytes of objects"
            } else {
                "the bytes (only) of objects"
            };
            let _ = writeln!(s, "  covers {what} {}", list(&sig.covers));
        }
        for k in &sig.verified_by {
            let _ = writeln!(
                s,
                "  signed by {} ({}, {})",
                k.fingerprint,
                k.kind,
                k.source.display()
            );
        }
        if sig.verified_by.is_empty() && !sig.claimed_signers.is_empty() {
            let _ = writeln!(s, "  names signer(s) {}", sig.claimed_signers.join(", "));
        }
        if let Some(why) = &sig.reason {
            let _ = writeln!(s, "  {why}");
        }
    }
    for g in &r.groups {
        if g.uncovered.is_empty() {
            let _ = writeln!(
                s,
                "object group {} (objects {}): covered by signature(s) {}",
                g.group,
                list(&g.objects),
                list(&g.signatures)
            );
        } else {
            let _ = writeln!(
                s,
                "object group {} (objects {}): objects {} not covered by a verified signature",
                g.group,
                list(&g.objects),
                list(&g.uncovered)
            );
        }
    }
    for p in &r.problems {
        let _ = writeln!(s, "{p}");
    }
    s
}

/// The verification of one image for a launch.
#[derive(Debug, Clone)]
pub struct ImageVerification {
    /// The image as given.
    pub image: PathBuf,
    /// Its report, or why it could not be verified (a key, a non-SIF image, a read error).
    pub outcome: Result<VerifyReport, String>,
    /// The report is an earlier launch's, from the cache of verified images: the image file
    /// and the keys are unchanged since ([`cache`]).
    pub cached: bool,
}

/// Verifies each distinct image of a launch with the PEM public keys `keys` (legacy
/// signatures are not trusted), through the user's cache of verified images
/// ([`cache::VerifiedCache::from_env`]). Nothing is mounted; every error becomes an outcome.
pub fn verify_images(images: &[PathBuf], keys: &[PathBuf]) -> Vec<ImageVerification> {
    verify_images_with(images, keys, cache::VerifiedCache::from_env().as_ref())
}

/// [`verify_images`] with the cache `cache` (none: every image is hashed). An image whose file
/// and keys are as when an earlier launch verified it is taken from the cache; an image
/// verified now is kept there, unless its file changed while it was read.
pub fn verify_images_with(
    images: &[PathBuf],
    keys: &[PathBuf],
    cache: Option<&cache::VerifiedCache>,
) -> Vec<ImageVerification> {
    let mut distinct: Vec<&PathBuf> = Vec::new();
    for i in images {
        if !distinct.contains(&i) {
            distinct.push(i);
        }
    }
    let opts = keys
        .iter()
        .map(|k| dsse::load_public_key(k))
        .collect::<Result<Vec<_>, _>>()
        .map(|keys| VerifyOptions {
            keys,
            keyring: None,
            legacy: false,
        })
        .map_err(|e| e.to_string());
    distinct
        .into_iter()
        .map(|image| match &opts {
            Ok(o) => verify_one(image, o, cache),
            Err(e) => ImageVerification {
                image: image.clone(),
                outcome: Err(e.clone()),
                cached: false,
            },
        })
        .collect()
}

/// One image of [`verify_images_with`]: the file is opened once, and its identity, the cache's
/// key and the bytes hashed are all that open file's.
fn verify_one(
    image: &Path,
    opts: &VerifyOptions,
    cache: Option<&cache::VerifiedCache>,
) -> ImageVerification {
    let done = |outcome, cached| ImageVerification {
        image: image.to_owned(),
        outcome,
        cached,
    };
    let file = match std::fs::File::open(image) {
        Ok(f) => f,
        Err(error) => {
            let e = IntegrityError::Io {
                path: image.to_owned(),
                what: "read",
                error,
            };
            return done(Err(e.to_string()), false);
        }
    };
    let key = cache.and_then(|_| cache::VerifiedKey::of(&file, opts));
    if let (Some(c), Some(k)) = (cache, &key)
        && let Some(report) = c.load(image, k)
    {
        return done(Ok(report), true);
    }
    let checked = file.try_clone();
    let started = std::time::SystemTime::now();
    let outcome = verify_file(image, file, opts).map_err(|e| e.to_string());
    if let (Some(c), Some(k), Ok(report), Ok(f)) = (cache, &key, &outcome, &checked)
        && k.settled_before(started)
        && cache::VerifiedKey::of(f, opts).as_ref() == Some(k)
    {
        c.store(k, report);
    }
    done(outcome, false)
}

/// What [`sign`] added.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SignReport {
    /// The image.
    pub image: PathBuf,
    /// One entry per signed group: (group, new signature object ID).
    pub signatures: Vec<(u32, u32)>,
    /// The signing keys' fingerprints.
    pub keys: Vec<String>,
}

/// Adds one DSSE signature by `keys` for every object group of the SIF image at `path`, in
/// place, as the reference implementation does: a `Signature` object (SHA-256, no group, linked
/// to the group) appended after the last object, in the first free descriptor slot.
pub fn sign(path: &Path, keys: &[PrivateKey]) -> Result<SignReport, IntegrityError> {
    let (mut file, mut sif) = open_sif(path, true)?;
    let io_err = |what, error| IntegrityError::Io {
        path: path.to_owned(),
        what,
        error,
    };
    let cannot = |reason: String| IntegrityError::CannotSign {
        path: path.to_owned(),
        reason,
    };
    if keys.is_empty() {
        return Err(cannot("no key given (--key PEM)".into()));
    }
    let groups = metadata::groups(&sif);
    if groups.is_empty() {
        return Err(cannot("the image holds no object group to sign".into()));
    }
    // A deterministic image (Go's zero time) stays deterministic, as with the reference's
    // `OptSignDeterministic`; otherwise the new objects carry the current time.
    let time = if sif.header.created_at == GO_ZERO_TIME {
        GO_ZERO_TIME
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    };
    let mut added = Vec::new();
    for g in groups {
        let members = metadata::group_members(&sif, g);
        let md = metadata::image_metadata(&mut file, &sif, g, &members, DigestAlg::Sha256)
            .map_err(|e| io_err("read", e))?;
        let payload = serde_json::to_vec(&md).map_err(|e| cannot(e.to_string()))?;
        let envelope = dsse::sign_envelope(&payload, keys).map_err(cannot)?;
        let id =
            append_signature(&mut file, &mut sif, g, &envelope, time).map_err(|e| match e {
                AppendError::Full(total) => cannot(format!(
                    "all {total} descriptor slots are used; there is no room for a signature"
                )),
                AppendError::Io(e) => io_err("write", e),
            })?;
        added.push((g, id));
    }
    file.sync_all().map_err(|e| io_err("write", e))?;
    Ok(SignReport {
        image: path.to_owned(),
        signatures: added,
        keys: keys.iter().map(|k| k.public().fingerprint()).collect(),
    })
}

enum AppendError {
    Full(i64),
    Io(io::Error),
}

/// Appends a signature object for group `group` holding `data`, then its descriptor, then the
/// header (so an interrupted write leaves the image as it was, plus unreferenced bytes).
fn append_signature(
    file: &mut File,
    sif: &mut SifFile,
    group: u32,
    data: &[u8],
    time: i64,
) -> Result<u32, AppendError> {
    let h = &sif.header;
    let slot = (0..h.descriptors_total.max(0) as u32)
        .find(|s| !sif.descriptors.iter().any(|d| d.slot == *s))
        .ok_or(AppendError::Full(h.descriptors_total))?;
    let data_end = sif
        .descriptors
        .iter()
        .map(|d| d.offset + d.size)
        .fold(h.data_offset, i64::max);
    let mut extra = [0u8; 384];
    extra[0..4].copy_from_slice(&HashType::Sha256.raw().to_le_bytes());
    let desc = Descriptor {
        slot,
        data_type: DataType::Signature,
        id: slot + 1,
        group_id: GROUP_MASK,
        linked_id: GROUP_MASK | group,
        offset: data_end,
        size: data.len() as i64,
        size_with_padding: data.len() as i64,
        created_at: time,
        modified_at: time,
        uid: 0,
        gid: 0,
        name: [0; 128],
        extra,
    };
    let write = |file: &mut File, at: u64, bytes: &[u8]| -> io::Result<()> {
        file.seek(SeekFrom::Start(at))?;
        file.write_all(bytes)
    };
    write(file, data_end as u64, data).map_err(AppendError::Io)?;
    let table_at = h.descriptors_offset as u64 + u64::from(slot) * DESCRIPTOR_LEN;
    write(file, table_at, &desc.to_bytes()).map_err(AppendError::Io)?;
    let mut header = sif.header.clone();
    header.data_size = data_end + desc.size - header.data_offset;
    header.descriptors_free -= 1;
    header.modified_at = time;
    write(file, 0, &header.to_bytes()).map_err(AppendError::Io)?;
    sif.header = header;
    sif.file_len = sif.file_len.max((data_end + desc.size) as u64);
    sif.descriptors.push(desc);
    sif.descriptors.sort_by_key(|d| d.slot);
    Ok(slot + 1)
}
