//! PEM keys and DSSE envelopes, as the SIF reference implementation writes them (through
//! sigstore's DSSE wrapper): payload type `application/vnd.sylabs.sif-metadata+json`, the
//! metadata JSON as payload, one signature per key over DSSE's pre-authentication encoding
//! (ed25519 over the bytes themselves; ECDSA (ASN.1 DER) and RSA PKCS #1 v1.5 over their
//! digest with the hash the signature descriptor names, SHA-256 by default), and each signature's
//! `keyid` the key's SSH SHA-256 fingerprint (`SHA256:…`).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use p256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use rsa::signature::{SignatureEncoding, Signer, Verifier};
use rsa::traits::PublicKeyParts;

use super::metadata::{DigestAlg, METADATA_MEDIA_TYPE};

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("{}: cannot read the key: {error}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// What the system said.
        error: std::io::Error,
    },
    /// The file is not a key of a supported kind.
    #[error("{}: {what}", path.display())]
    Unsupported {
        /// The key file.
        path: PathBuf,
        /// What was expected.
        what: String,
    },
}

/// A public key of one of the kinds DSSE signatures on SIF images use.
#[derive(Debug, Clone)]
pub enum PublicKey {
    /// Ed25519.
    Ed25519(ed25519_dalek::VerifyingKey),
    /// ECDSA on P-256.
    P256(p256::ecdsa::VerifyingKey),
    /// ECDSA on P-384.
    P384(p384::ecdsa::VerifyingKey),
    /// RSA (PKCS #1 v1.5 signatures).
    Rsa(rsa::RsaPublicKey),
}

impl PublicKey {
    /// The kind, as shown to users: `ed25519`, `ecdsa-p256`, `ecdsa-p384`, `rsa-4096`.
    pub fn kind(&self) -> String {
        match self {
            PublicKey::Ed25519(_) => "ed25519".into(),
            PublicKey::P256(_) => "ecdsa-p256".into(),
            PublicKey::P384(_) => "ecdsa-p384".into(),
            PublicKey::Rsa(k) => format!("rsa-{}", k.size() * 8),
        }
    }

    /// The key's SSH SHA-256 fingerprint (`SHA256:…`), which DSSE envelopes carry as `keyid`.
    pub fn fingerprint(&self) -> String {
        use ssh_key::public::{EcdsaPublicKey, Ed25519PublicKey, KeyData, RsaPublicKey};
        let data = match self {
            PublicKey::Ed25519(k) => Some(KeyData::Ed25519(Ed25519PublicKey(k.to_bytes()))),
            PublicKey::P256(k) => {
                EcdsaPublicKey::from_sec1_bytes(k.to_encoded_point(false).as_bytes())
                    .ok()
                    .map(KeyData::Ecdsa)
            }
            PublicKey::P384(k) => {
                EcdsaPublicKey::from_sec1_bytes(k.to_encoded_point(false).as_bytes())
                    .ok()
                    .map(KeyData::Ecdsa)
            }
            PublicKey::Rsa(k) => {
                let e = ssh_key::Mpint::from_positive_bytes(&k.e().to_bytes_be());
                let n = ssh_key::Mpint::from_positive_bytes(&k.n().to_bytes_be());
                match (e, n) {
                    (Ok(e), Ok(n)) => Some(KeyData::Rsa(RsaPublicKey { e, n })),
                    _ => None,
                }
            }
        };
        // Every key the PEM decoders accept encodes; an empty ID only weakens a display hint.
        data.map(|d| d.fingerprint(ssh_key::HashAlg::Sha256).to_string())
            .unwrap_or_default()
    }

    /// Whether `sig` is this key's signature of `message` (hashed with `alg` where the
    /// algorithm hashes first).
    pub fn verifies(&self, message: &[u8], sig: &[u8], alg: DigestAlg) -> bool {
        match self {
            PublicKey::Ed25519(k) => ed25519_dalek::Signature::from_slice(sig)
                .is_ok_and(|s| k.verify(message, &s).is_ok()),
            PublicKey::P256(k) => p256::ecdsa::Signature::from_der(sig)
                .is_ok_and(|s| k.verify_prehash(&alg.digest(message).value, &s).is_ok()),
            PublicKey::P384(k) => p384::ecdsa::Signature::from_der(sig)
                .is_ok_and(|s| k.verify_prehash(&alg.digest(message).value, &s).is_ok()),
            PublicKey::Rsa(k) => {
                let Ok(s) = rsa::pkcs1v15::Signature::try_from(sig) else {
                    return false;
                };
                match alg {
                    DigestAlg::Sha384 => {
                        rsa::pkcs1v15::VerifyingKey::<sha2::Sha384>::new(k.clone())
                            .verify(message, &s)
                            .is_ok()
                    }
                    DigestAlg::Sha512 => {
                        rsa::pkcs1v15::VerifyingKey::<sha2::Sha512>::new(k.clone())
                            .verify(message, &s)
                            .is_ok()
                    }
                    _ => rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(k.clone())
                        .verify(message, &s)
                        .is_ok(),
                }
            }
        }
    }
}

/// A public key and the file it came from.
#[derive(Debug, Clone)]
pub struct NamedPublicKey {
    /// The key.
    pub key: PublicKey,
    /// Its SSH SHA-256 fingerprint.
    pub fingerprint: String,
    /// The PEM file.
    pub source: PathBuf,
}

fn read_pem(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|error| KeyError::Io {
        path: path.to_owned(),
        error,
    })
}

/// Reads a public key from a PEM file (`-----BEGIN PUBLIC KEY-----`, SubjectPublicKeyInfo):
/// ed25519, ECDSA P-256 or P-384, or RSA.
pub fn load_public_key(path: &Path) -> Result<NamedPublicKey, KeyError> {
    let pem = read_pem(path)?;
    let key = if let Ok(k) = ed25519_dalek::VerifyingKey::from_public_key_pem(&pem) {
        PublicKey::Ed25519(k)
    } else if let Ok(k) = p256::ecdsa::VerifyingKey::from_public_key_pem(&pem) {
        PublicKey::P256(k)
    } else if let Ok(k) = p384::ecdsa::VerifyingKey::from_public_key_pem(&pem) {
        PublicKey::P384(k)
    } else if let Ok(k) = rsa::RsaPublicKey::from_public_key_pem(&pem) {
        PublicKey::Rsa(k)
    } else {
        return Err(KeyError::Unsupported {
            path: path.to_owned(),
            what: "not a PEM public key cmpirun can use: expected `-----BEGIN PUBLIC KEY-----` \
                   holding an ed25519, ECDSA P-256/P-384 or RSA key (`openssl pkey -pubout` \
                   writes one from a private key)"
                .into(),
        });
    };
    Ok(NamedPublicKey {
        fingerprint: key.fingerprint(),
        key,
        source: path.to_owned(),
    })
}

/// A private key to sign with.
pub enum PrivateKey {
    /// Ed25519.
    Ed25519(ed25519_dalek::SigningKey),
    /// ECDSA on P-256.
    P256(p256::ecdsa::SigningKey),
    /// ECDSA on P-384.
    P384(p384::ecdsa::SigningKey),
    /// RSA, signing PKCS #1 v1.5 with SHA-256.
    Rsa(Box<rsa::RsaPrivateKey>),
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey({})", self.public().kind())
    }
}

impl PrivateKey {
    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        match self {
            PrivateKey::Ed25519(k) => PublicKey::Ed25519(k.verifying_key()),
            PrivateKey::P256(k) => PublicKey::P256(*k.verifying_key()),
            PrivateKey::P384(k) => PublicKey::P384(*k.verifying_key()),
            PrivateKey::Rsa(k) => PublicKey::Rsa(k.to_public_key()),
        }
    }

    /// Signs `message` (the pre-authentication encoding) as the reference does with SHA-256.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let digest = || DigestAlg::Sha256.digest(message).value;
        match self {
            PrivateKey::Ed25519(k) => {
                use ed25519_dalek::Signer as _;
                Ok(k.sign(message).to_bytes().to_vec())
            }
            PrivateKey::P256(k) => {
                let s: p256::ecdsa::Signature =
                    k.sign_prehash(&digest()).map_err(|e| e.to_string())?;
                Ok(s.to_der().as_bytes().to_vec())
            }
            PrivateKey::P384(k) => {
                let s: p384::ecdsa::Signature =
                    k.sign_prehash(&digest()).map_err(|e| e.to_string())?;
                Ok(s.to_der().as_bytes().to_vec())
            }
            PrivateKey::Rsa(k) => {
                let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new((**k).clone());
                let s = signer.try_sign(message).map_err(|e| e.to_string())?;
                Ok(s.to_vec())
            }
        }
    }
}

/// Reads a private key from an unencrypted PKCS #8 PEM file (`-----BEGIN PRIVATE KEY-----`).
pub fn load_private_key(path: &Path) -> Result<PrivateKey, KeyError> {
    let pem = read_pem(path)?;
    if let Ok(k) = ed25519_dalek::SigningKey::from_pkcs8_pem(&pem) {
        Ok(PrivateKey::Ed25519(k))
    } else if let Ok(k) = p256::ecdsa::SigningKey::from_pkcs8_pem(&pem) {
        Ok(PrivateKey::P256(k))
    } else if let Ok(k) = p384::ecdsa::SigningKey::from_pkcs8_pem(&pem) {
        Ok(PrivateKey::P384(k))
    } else if let Ok(k) = rsa::RsaPrivateKey::from_pkcs8_pem(&pem) {
        Ok(PrivateKey::Rsa(Box::new(k)))
    } else {
        Err(KeyError::Unsupported {
            path: path.to_owned(),
            what: "not a private key cmpirun can sign with: expected an unencrypted PKCS #8 PEM \
                   (`-----BEGIN PRIVATE KEY-----`) holding an ed25519, ECDSA P-256/P-384 or RSA \
                   key (`openssl pkcs8 -topk8 -nocrypt` converts other forms)"
                .into(),
        })
    }
}

/// A DSSE envelope.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    /// The payload type.
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// The payload, base64.
    pub payload: String,
    /// The signatures.
    pub signatures: Vec<EnvelopeSignature>,
}

/// One signature of a DSSE envelope.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EnvelopeSignature {
    /// An unauthenticated hint naming the key.
    #[serde(default)]
    pub keyid: String,
    /// The signature, base64.
    pub sig: String,
}

/// DSSE's pre-authentication encoding of a payload.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut m = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    m.extend_from_slice(payload);
    m
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    STANDARD.decode(s).or_else(|_| URL_SAFE.decode(s)).ok()
}

/// Parses `data` as a SIF DSSE envelope; `None` if it is not one.
pub fn parse_envelope(data: &[u8]) -> Option<Envelope> {
    serde_json::from_slice::<Envelope>(data)
        .ok()
        .filter(|e| e.payload_type == METADATA_MEDIA_TYPE)
}

/// What checking an envelope's signatures against the given keys found.
#[derive(Debug, Clone)]
pub struct EnvelopeCheck {
    /// The decoded payload (authenticated only if `verified_by` is not empty).
    pub payload: Vec<u8>,
    /// The given keys that verify one of the envelope's signatures.
    pub verified_by: Vec<NamedPublicKey>,
    /// The `keyid` hints of the envelope's signatures.
    pub keyids: Vec<String>,
}

/// Checks every signature of `env` against every key of `keys`.
pub fn check_envelope(
    env: &Envelope,
    keys: &[NamedPublicKey],
    alg: DigestAlg,
) -> Result<EnvelopeCheck, String> {
    let payload = base64_decode(&env.payload).ok_or("the envelope's payload is not base64")?;
    let message = pae(&env.payload_type, &payload);
    let mut verified_by: Vec<NamedPublicKey> = Vec::new();
    for s in &env.signatures {
        let Some(sig) = base64_decode(&s.sig) else {
            continue;
        };
        for k in keys {
            if k.key.verifies(&message, &sig, alg)
                && !verified_by.iter().any(|v| v.fingerprint == k.fingerprint)
            {
                verified_by.push(k.clone());
            }
        }
    }
    Ok(EnvelopeCheck {
        payload,
        verified_by,
        keyids: env.signatures.iter().map(|s| s.keyid.clone()).collect(),
    })
}

/// Writes a DSSE envelope of `payload` signed by every key of `keys`, as the reference does.
pub fn sign_envelope(payload: &[u8], keys: &[PrivateKey]) -> Result<Vec<u8>, String> {
    let message = pae(METADATA_MEDIA_TYPE, payload);
    let mut signatures = Vec::with_capacity(keys.len());
    for k in keys {
        signatures.push(EnvelopeSignature {
            keyid: k.public().fingerprint(),
            sig: STANDARD.encode(k.sign(&message)?),
        });
    }
    let env = Envelope {
        payload_type: METADATA_MEDIA_TYPE.to_owned(),
        payload: STANDARD.encode(payload),
        signatures,
    };
    // Go's `json.Encoder` ends the document with a line end; so does the reference's envelope.
    let mut out = serde_json::to_vec(&env).map_err(|e| e.to_string())?;
    out.push(b'\n');
    Ok(out)
}
