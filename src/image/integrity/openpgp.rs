//! OpenPGP keyrings and clear-signed SIF metadata (the format `apptainer sign` wrote before DSSE,
//! and the legacy per-object `SIFHASH` signatures), verified with rPGP.

use std::path::{Path, PathBuf};

use pgp::composed::{CleartextSignedMessage, PublicOrSecret, SignedPublicKey};
use pgp::crypto::hash::HashAlgorithm;
use pgp::types::KeyDetails;

use super::dsse::KeyError;

/// The first line of a clear-signed message.
const CLEARSIGN_BEGIN: &[u8] = b"-----BEGIN PGP SIGNED MESSAGE-----";

/// OpenPGP public keys to verify clear-signed signatures with.
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: Vec<SignedPublicKey>,
    /// The file they came from.
    pub source: PathBuf,
}

impl Keyring {
    /// The primary-key fingerprints (upper-case hex) of the keys, in file order.
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| hex::encode_upper(k.primary_key.fingerprint().as_bytes()))
            .collect()
    }
}

/// Reads an OpenPGP keyring: armored or binary, one or more public keys (a secret key block is
/// read for its public part). A key whose self-signatures do not verify is refused.
pub fn load_keyring(path: &Path) -> Result<Keyring, KeyError> {
    let bytes = std::fs::read(path).map_err(|error| KeyError::Io {
        path: path.to_owned(),
        error,
    })?;
    let bad = |what: String| KeyError::Unsupported {
        path: path.to_owned(),
        what,
    };
    let (iter, _) = PublicOrSecret::from_reader_many(&bytes[..])
        .map_err(|e| bad(format!("not an OpenPGP keyring (armored or binary): {e}")))?;
    let mut keys = Vec::new();
    for k in iter {
        let k = k.map_err(|e| bad(format!("not an OpenPGP keyring: {e}")))?;
        k.verify_bindings().map_err(|e| {
            bad(format!(
                "the key's self-signatures do not verify ({e}); export it again with `gpg --export`"
            ))
        })?;
        keys.push(match k {
            PublicOrSecret::Public(p) => p,
            PublicOrSecret::Secret(s) => s.to_public_key(),
        });
    }
    if keys.is_empty() {
        return Err(bad("holds no OpenPGP key".into()));
    }
    Ok(Keyring {
        keys,
        source: path.to_owned(),
    })
}

/// Whether `data` is a clear-signed message.
pub fn is_clearsigned(data: &[u8]) -> bool {
    data.starts_with(CLEARSIGN_BEGIN)
}

/// A parsed clear-signed message.
#[derive(Debug)]
pub struct Clearsigned {
    msg: CleartextSignedMessage,
}

impl Clearsigned {
    /// Parses `data` as a clear-signed message.
    pub fn parse(data: &[u8]) -> Result<Clearsigned, String> {
        let text = std::str::from_utf8(data).map_err(|_| "the signature is not text".to_owned())?;
        let (msg, _) = CleartextSignedMessage::from_string(text)
            .map_err(|e| format!("not a valid clear-signed message: {e}"))?;
        Ok(Clearsigned { msg })
    }

    /// The signed text as the signer wrote it (line ends `\n`).
    pub fn plaintext(&self) -> String {
        self.msg.signed_text().replace("\r\n", "\n")
    }

    /// The issuer fingerprints (or key IDs, when only those are named) the signatures claim,
    /// upper-case hex; unauthenticated.
    pub fn issuers(&self) -> Vec<String> {
        let mut v = Vec::new();
        for s in self.msg.signatures() {
            let fps = s.issuer_fingerprint();
            if fps.is_empty() {
                v.extend(
                    s.issuer_key_id()
                        .iter()
                        .map(|k| hex::encode_upper(k.as_ref())),
                );
            } else {
                v.extend(fps.iter().map(|f| hex::encode_upper(f.as_bytes())));
            }
        }
        v
    }

    /// The primary fingerprint (upper-case hex) of the first key of `ring` (its primary key or a
    /// subkey) that made one of the signatures with a hash the reference accepts (SHA-224,
    /// SHA-256, SHA-384, SHA-512), if any.
    pub fn verified_by(&self, ring: &Keyring) -> Option<String> {
        let text = self.msg.signed_text();
        for sig in self.msg.signatures() {
            let strong = matches!(
                sig.hash_alg(),
                Some(
                    HashAlgorithm::Sha224
                        | HashAlgorithm::Sha256
                        | HashAlgorithm::Sha384
                        | HashAlgorithm::Sha512
                )
            );
            if !strong {
                continue;
            }
            for key in &ring.keys {
                let primary = hex::encode_upper(key.primary_key.fingerprint().as_bytes());
                if sig.verify(&key.primary_key, text.as_bytes()).is_ok()
                    || key
                        .public_subkeys
                        .iter()
                        .any(|sk| sig.verify(&sk.key, text.as_bytes()).is_ok())
                {
                    return Some(primary);
                }
            }
        }
        None
    }
}
