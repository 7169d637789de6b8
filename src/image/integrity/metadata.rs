//! The SIF-specific part of signing: which bytes of an image a signature covers, and the JSON
//! metadata (`application/vnd.sylabs.sif-metadata+json`) that is signed, computed exactly as the
//! reference implementation (`sylabs/sif`, `pkg/integrity`) does.
//!
//! A signature covers one object group. Its metadata holds a digest of the header's fixed fields
//! (launch script, magic, version, image ID) and, for every signed object, a digest of the
//! object's descriptor (data type, used flag, ID relative to the group's lowest ID, link, size,
//! creation time, UID, GID, name and extra field; not its offset, group or modification time)
//! and a digest of the object's bytes.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};

use sha2::digest::DynDigest;

use crate::image::sif::{Descriptor, GROUP_MASK, HashType, Header, MAGIC, SifFile};

/// The DSSE payload type of SIF signatures.
pub const METADATA_MEDIA_TYPE: &str = "application/vnd.sylabs.sif-metadata+json";

/// The only metadata version there is.
pub const METADATA_VERSION: u32 = 1;

/// A hash function a SIF signature can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestAlg {
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
    /// SHA-512/224.
    Sha512_224,
    /// SHA-512/256.
    Sha512_256,
}

impl DigestAlg {
    const ALL: [DigestAlg; 6] = [
        DigestAlg::Sha224,
        DigestAlg::Sha256,
        DigestAlg::Sha384,
        DigestAlg::Sha512,
        DigestAlg::Sha512_224,
        DigestAlg::Sha512_256,
    ];

    /// The name used in metadata digests (`sha256`).
    pub fn name(self) -> &'static str {
        match self {
            DigestAlg::Sha224 => "sha224",
            DigestAlg::Sha256 => "sha256",
            DigestAlg::Sha384 => "sha384",
            DigestAlg::Sha512 => "sha512",
            DigestAlg::Sha512_224 => "sha512_224",
            DigestAlg::Sha512_256 => "sha512_256",
        }
    }

    /// The function a signature descriptor's hash type names, if it is one of the SHA-2 family
    /// (BLAKE2 is named by the format but used by no writer).
    pub fn from_hash_type(h: HashType) -> Option<DigestAlg> {
        match h {
            HashType::Sha256 => Some(DigestAlg::Sha256),
            HashType::Sha384 => Some(DigestAlg::Sha384),
            HashType::Sha512 => Some(DigestAlg::Sha512),
            _ => None,
        }
    }

    fn hasher(self) -> Box<dyn DynDigest> {
        match self {
            DigestAlg::Sha224 => Box::new(sha2::Sha224::default()),
            DigestAlg::Sha256 => Box::new(sha2::Sha256::default()),
            DigestAlg::Sha384 => Box::new(sha2::Sha384::default()),
            DigestAlg::Sha512 => Box::new(sha2::Sha512::default()),
            DigestAlg::Sha512_224 => Box::new(sha2::Sha512_224::default()),
            DigestAlg::Sha512_256 => Box::new(sha2::Sha512_256::default()),
        }
    }

    /// The digest of `bytes`.
    pub fn digest(self, bytes: &[u8]) -> Digest {
        let mut h = self.hasher();
        h.update(bytes);
        Digest {
            alg: self,
            value: h.finalize().into_vec(),
        }
    }

    /// The digest of `len` bytes at `offset` of `r`, read in pieces.
    pub fn digest_range<R: Read + Seek>(
        self,
        r: &mut R,
        offset: u64,
        len: u64,
    ) -> io::Result<Digest> {
        self.digest_ranges(r, &[(offset, len)])
    }

    /// The digest of the byte ranges `(offset, len)` of `r`, one after another.
    pub fn digest_ranges<R: Read + Seek>(
        self,
        r: &mut R,
        ranges: &[(u64, u64)],
    ) -> io::Result<Digest> {
        let mut h = self.hasher();
        let mut buf = vec![0u8; 1 << 20];
        for &(offset, len) in ranges {
            r.seek(SeekFrom::Start(offset))?;
            let mut left = len;
            while left > 0 {
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                r.read_exact(&mut buf[..n])?;
                h.update(&buf[..n]);
                left -= n as u64;
            }
        }
        Ok(Digest {
            alg: self,
            value: h.finalize().into_vec(),
        })
    }
}

/// A digest as the metadata writes it: `sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// The hash function.
    pub alg: DigestAlg,
    /// The digest bytes.
    pub value: Vec<u8>,
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.alg.name(), hex::encode(&self.value))
    }
}

impl std::str::FromStr for Digest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, value) = s
            .split_once(':')
            .ok_or_else(|| format!("digest {s:?} is not ALGORITHM:HEX"))?;
        let alg = DigestAlg::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| format!("digest {s:?} names an unsupported hash function {name:?}"))?;
        let value = hex::decode(value).map_err(|e| format!("digest {s:?}: {e}"))?;
        if value.len() != alg.hasher().output_size() {
            return Err(format!("digest {s:?} has the wrong length for {name}"));
        }
        Ok(Digest { alg, value })
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The signed metadata of one object group (its JSON field names and order are the reference
/// implementation's, so `serde_json::to_vec` gives the same bytes as Go's `json.Marshal`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageMetadata {
    /// Always [`METADATA_VERSION`].
    pub version: u32,
    /// The header digest.
    pub header: HeaderMetadata,
    /// One entry per signed object, in ID order.
    pub objects: Vec<ObjectMetadata>,
}

/// The digest of the header's fixed fields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeaderMetadata {
    /// Digest of launch script, magic, version and ID.
    pub digest: Digest,
}

/// The digests of one signed object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectMetadata {
    /// Object ID minus the lowest object ID of its group.
    #[serde(rename = "relativeId")]
    pub relative_id: u32,
    /// Digest of the descriptor's protected fields.
    #[serde(rename = "descriptorDigest")]
    pub descriptor_digest: Digest,
    /// Digest of the object's bytes.
    #[serde(rename = "objectDigest")]
    pub object_digest: Digest,
}

/// The header bytes a signature protects: launch script, magic, version, image ID.
pub fn header_integrity_bytes(h: &Header) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + 10 + 3 + 16);
    b.extend_from_slice(&h.launch_script);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&h.version);
    b.extend_from_slice(&h.id);
    b
}

/// The descriptor bytes a signature protects, with the object's ID relative to its group.
pub fn descriptor_integrity_bytes(d: &Descriptor, relative_id: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + 1 + 4 + 4 + 8 * 4 + 128 + 384);
    b.extend_from_slice(&d.data_type.raw().to_le_bytes());
    b.push(1); // Used: only used descriptors are read.
    b.extend_from_slice(&relative_id.to_le_bytes());
    b.extend_from_slice(&d.linked_id.to_le_bytes());
    for v in [d.size, d.created_at, d.uid, d.gid] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&d.name);
    b.extend_from_slice(&d.extra);
    b
}

/// The lowest object ID among the used descriptors with `d`'s stored group ID (the reference
/// keys this by the raw group field, so "no group" objects have one too).
pub fn relative_id(sif: &SifFile, d: &Descriptor) -> u32 {
    let min = sif
        .descriptors
        .iter()
        .filter(|o| o.group_id == d.group_id)
        .map(|o| o.id)
        .min()
        .unwrap_or(d.id);
    d.id - min
}

/// The lowest object ID of group `group`, if it has objects.
pub fn group_min_id(sif: &SifFile, group: u32) -> Option<u32> {
    group_members(sif, group).first().map(|d| d.id)
}

/// Every object in group `group` (signatures in it too, as the reference signs them), by ID.
pub fn group_members(sif: &SifFile, group: u32) -> Vec<&Descriptor> {
    let mut v: Vec<&Descriptor> = sif
        .descriptors
        .iter()
        .filter(|d| d.group_id == GROUP_MASK | group && group != 0)
        .collect();
    v.sort_by_key(|d| d.id);
    v
}

/// The groups of the image, ascending.
pub fn groups(sif: &SifFile) -> Vec<u32> {
    let mut g: Vec<u32> = sif.descriptors.iter().filter_map(|d| d.group()).collect();
    g.sort_unstable();
    g.dedup();
    g
}

/// The metadata the reference signer computes for `objects` of group `group`.
pub fn image_metadata<R: Read + Seek>(
    r: &mut R,
    sif: &SifFile,
    group: u32,
    objects: &[&Descriptor],
    alg: DigestAlg,
) -> io::Result<ImageMetadata> {
    let min_id = group_min_id(sif, group).unwrap_or(0);
    let mut out = Vec::with_capacity(objects.len());
    for d in objects {
        out.push(ObjectMetadata {
            relative_id: d.id - min_id,
            descriptor_digest: alg.digest(&descriptor_integrity_bytes(d, relative_id(sif, d))),
            object_digest: alg.digest_range(r, d.offset as u64, d.size as u64)?,
        });
    }
    Ok(ImageMetadata {
        version: METADATA_VERSION,
        header: HeaderMetadata {
            digest: alg.digest(&header_integrity_bytes(&sif.header)),
        },
        objects: out,
    })
}
