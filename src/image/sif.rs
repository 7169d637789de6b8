//! The SIF container format (Apptainer/Singularity Image Format), read and written from its byte
//! layout.
//!
//! A SIF file is a 128-byte little-endian header, a table of fixed 585-byte descriptors at
//! `descriptors_offset`, and data objects wherever each descriptor's own `offset` says. The reader
//! never assumes where data starts (legacy writers began at 32768, current ones at 32176) and skips
//! unused descriptor slots wherever they are, because deleting an object leaves a hole.
//!
//! [`read`] is a pure function over a `Read + Seek` source so that it can be fuzzed; it validates
//! everything it reports (every used object lies inside the file) and never allocates more than the
//! descriptor table the file itself holds.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};

/// Size of the global header.
pub const HEADER_LEN: u64 = 128;
/// Size of one descriptor.
pub const DESCRIPTOR_LEN: u64 = 585;
/// The magic at byte 32, all ten bytes compared.
pub const MAGIC: [u8; 10] = *b"SIF_MAGIC\0";
/// The only SIF version there is.
pub const VERSION: [u8; 3] = *b"01\0";
/// The launch script Apptainer writes, which makes `./image.sif` runnable.
pub const LAUNCH_SCRIPT: &str = "#!/usr/bin/env run-singularity\n";
/// Default descriptor capacity.
pub const DEFAULT_DESCRIPTORS: u32 = 48;
/// Where the descriptor table starts in current writers.
pub const DESCRIPTORS_OFFSET: u64 = 4096;
/// Alignment of partition objects.
pub const PARTITION_ALIGN: u64 = 4096;
/// Created/modified time written by deterministic builds: Go's zero `time.Time` in Unix seconds.
pub const GO_ZERO_TIME: i64 = -62_135_596_800;
/// Group IDs are stored with this mask set; `GROUP_MASK` alone means "no group".
pub const GROUP_MASK: u32 = 0xF000_0000;

/// Upper bound on the descriptor table a reader accepts. Real images have 48 slots; the limit only
/// keeps a corrupt header from making the reader allocate gigabytes.
const MAX_DESCRIPTORS: i64 = 1 << 16;

/// Why bytes are not a SIF file the reader accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SifError {
    /// Fewer than 128 bytes.
    #[error("truncated: {len} bytes, shorter than the 128-byte SIF header")]
    TruncatedHeader {
        /// File length.
        len: u64,
    },
    /// The ten bytes at offset 32 are not `SIF_MAGIC\0`.
    #[error("not a SIF file: bytes 32..42 are {found:?}, not \"SIF_MAGIC\"")]
    BadMagic {
        /// The bytes found, printable.
        found: String,
    },
    /// The version is not `01`.
    #[error("unsupported SIF version {found:?} (only \"01\" exists)")]
    BadVersion {
        /// The version bytes found, printable.
        found: String,
    },
    /// A header field holds an impossible value.
    #[error("corrupt SIF header: {field} is {value}")]
    BadHeaderField {
        /// The field name as in the SIF specification.
        field: &'static str,
        /// Its value.
        value: i64,
    },
    /// The descriptor table does not fit in the file.
    #[error(
        "truncated or corrupt: the descriptor table ({total} slots at offset {offset}, {size} bytes) ends past the end of the file ({len} bytes)"
    )]
    DescriptorsPastEnd {
        /// DescriptorsOffset.
        offset: u64,
        /// Slot count.
        total: u64,
        /// Bytes the table needs.
        size: u64,
        /// File length.
        len: u64,
    },
    /// A used object lies (partly) outside the file.
    #[error(
        "truncated or corrupt: object {id} ({kind}) at offset {offset} with size {size} ends past the end of the file ({len} bytes)"
    )]
    ObjectPastEnd {
        /// Object ID.
        id: u32,
        /// Its data type.
        kind: String,
        /// Its offset.
        offset: i64,
        /// Its size.
        size: i64,
        /// File length.
        len: u64,
    },
    /// Reading failed.
    #[error("read error: {0}")]
    Io(String),
}

impl From<io::Error> for SifError {
    fn from(e: io::Error) -> Self {
        SifError::Io(e.to_string())
    }
}

macro_rules! int_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $val:expr, $text:expr;)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $var,)*
            /// A value this reader does not know, kept as found.
            Unknown(i32),
        }
        impl $name {
            /// The value as stored in the file.
            pub fn raw(self) -> i32 {
                match self {
                    $($name::$var => $val,)*
                    $name::Unknown(v) => v,
                }
            }
            /// The enumeration member for a stored value.
            pub fn from_raw(v: i32) -> Self {
                match v {
                    $(x if x == $val => $name::$var,)*
                    other => $name::Unknown(other),
                }
            }
            /// The name the reference tool (`siftool`) prints.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$var => $text,)*
                    $name::Unknown(_) => "Unknown",
                }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self {
                    $name::Unknown(v) => s.serialize_str(&format!("Unknown({v})")),
                    other => s.serialize_str(other.name()),
                }
            }
        }
    };
}

int_enum!(
    /// What a data object holds.
    DataType {
        /// Definition file.
        Deffile = 0x4001, "Def.FILE";
        /// Environment variables.
        EnvVar = 0x4002, "Env.Vars";
        /// JSON labels.
        Labels = 0x4003, "JSON.Labels";
        /// A filesystem partition.
        Partition = 0x4004, "FS";
        /// A signature.
        Signature = 0x4005, "Signature";
        /// Generic JSON.
        GenericJson = 0x4006, "JSON.Generic";
        /// Generic raw data.
        Generic = 0x4007, "Generic/Raw";
        /// A cryptographic message.
        CryptoMessage = 0x4008, "Cryptographic Message";
        /// A software bill of materials.
        Sbom = 0x4009, "SBOM";
        /// An OCI root index.
        OciRootIndex = 0x400A, "OCI.RootIndex";
        /// An OCI blob.
        OciBlob = 0x400B, "OCI.Blob";
    }
);

int_enum!(
    /// Filesystem type of a partition.
    FsType {
        /// Squashfs.
        Squash = 1, "Squashfs";
        /// Ext3 (deprecated).
        Ext3 = 2, "Ext3";
        /// Immutable object archive.
        ImmuObj = 3, "Archive";
        /// Raw data.
        Raw = 4, "Raw";
        /// Encrypted squashfs.
        EncryptedSquashfs = 5, "Encrypted squashfs";
        /// Squashfs inside gocryptfs.
        GocryptfsSquashfs = 6, "Gocryptfs squashfs";
    }
);

int_enum!(
    /// Role of a partition.
    PartType {
        /// An operating system.
        System = 1, "System";
        /// The primary operating system: the container's root filesystem.
        PrimSys = 2, "*System";
        /// Data only.
        Data = 3, "Data";
        /// An overlay.
        Overlay = 4, "Overlay";
    }
);

int_enum!(
    /// Hash function of a signature.
    HashType {
        /// SHA-256.
        Sha256 = 1, "SHA-256";
        /// SHA-384.
        Sha384 = 2, "SHA-384";
        /// SHA-512.
        Sha512 = 3, "SHA-512";
        /// BLAKE2s.
        Blake2s = 4, "BLAKE2s";
        /// BLAKE2b.
        Blake2b = 5, "BLAKE2b";
    }
);

int_enum!(
    /// Format of a cryptographic message.
    FormatType {
        /// OpenPGP.
        OpenPgp = 1, "OpenPGP";
        /// PEM.
        Pem = 2, "PEM";
    }
);

int_enum!(
    /// Kind of a cryptographic message.
    MessageType {
        /// A clear signature.
        ClearSignature = 0x100, "Clear Signature";
        /// RSA-OAEP.
        RsaOaep = 0x200, "RSA-OAEP";
    }
);

int_enum!(
    /// Format of an SBOM.
    SbomFormat {
        /// CycloneDX JSON.
        CycloneDxJson = 1, "cyclonedx-json";
        /// CycloneDX XML.
        CycloneDxXml = 2, "cyclonedx-xml";
        /// GitHub JSON.
        GithubJson = 3, "github-json";
        /// SPDX JSON.
        SpdxJson = 4, "spdx-json";
        /// SPDX RDF.
        SpdxRdf = 5, "spdx-rdf";
        /// SPDX tag-value.
        SpdxTagValue = 6, "spdx-tag-value";
        /// SPDX YAML.
        SpdxYaml = 7, "spdx-yaml";
        /// Syft JSON.
        SyftJson = 8, "syft-json";
    }
);

/// A CPU architecture code as stored in SIF: two ASCII digits and a NUL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch(pub [u8; 3]);

const ARCHES: &[(&[u8; 2], &str)] = &[
    (b"00", "unknown"),
    (b"01", "386"),
    (b"02", "amd64"),
    (b"03", "arm"),
    (b"04", "arm64"),
    (b"05", "ppc64"),
    (b"06", "ppc64le"),
    (b"07", "mips"),
    (b"08", "mipsle"),
    (b"09", "mips64"),
    (b"10", "mips64le"),
    (b"11", "s390x"),
    (b"12", "riscv64"),
    (b"13", "loong64"),
];

impl Arch {
    /// "Unknown/unsupported", `00`.
    pub const UNKNOWN: Arch = Arch(*b"00\0");

    /// The Go architecture name (`amd64`, `arm64`, …), or `unknown`.
    pub fn name(self) -> &'static str {
        ARCHES
            .iter()
            .find(|(code, _)| code[..] == self.0[..2])
            .map_or("unknown", |(_, name)| name)
    }

    /// The code for a Go architecture name.
    pub fn from_name(name: &str) -> Option<Arch> {
        ARCHES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(code, _)| Arch([code[0], code[1], 0]))
    }

    /// The architecture of the running host.
    pub fn host() -> Arch {
        let name = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "arm" => "arm",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "powerpc64" => "ppc64",
            "mips" if cfg!(target_endian = "little") => "mipsle",
            "mips" => "mips",
            "mips64" if cfg!(target_endian = "little") => "mips64le",
            "mips64" => "mips64",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            "loongarch64" => "loong64",
            _ => "unknown",
        };
        Arch::from_name(name).unwrap_or(Arch::UNKNOWN)
    }

    /// Whether binaries for `self` run natively on a host of arch `host`. `unknown` is accepted
    /// because old writers left it unset.
    pub fn runs_on(self, host: Arch) -> bool {
        self == host || self == Arch::UNKNOWN || (host.name() == "amd64" && self.name() == "386")
    }

    /// The stored code as text (`02`).
    pub fn code(self) -> String {
        printable(&self.0)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Arch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// The 128-byte global header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The `#!` line, NUL-padded.
    pub launch_script: [u8; 32],
    /// Version bytes (`01\0`).
    pub version: [u8; 3],
    /// Architecture of the primary partition.
    pub arch: Arch,
    /// Image UUID bytes, RFC 4122 order.
    pub id: [u8; 16],
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Modification time, Unix seconds.
    pub modified_at: i64,
    /// Unused descriptor slots.
    pub descriptors_free: i64,
    /// Descriptor slots.
    pub descriptors_total: i64,
    /// Where the descriptor table starts.
    pub descriptors_offset: i64,
    /// Size of the descriptor table.
    pub descriptors_size: i64,
    /// Where data starts.
    pub data_offset: i64,
    /// Bytes of data.
    pub data_size: i64,
}

impl Header {
    /// The launch script up to the first NUL.
    pub fn launch_script(&self) -> String {
        printable(&self.launch_script)
    }

    /// The version up to the first NUL (`01`).
    pub fn version(&self) -> String {
        printable(&self.version)
    }

    /// The image UUID in its canonical text form.
    pub fn id_string(&self) -> String {
        uuid_string(&self.id)
    }

    fn parse(b: &[u8; HEADER_LEN as usize]) -> Header {
        Header {
            launch_script: arr(&b[0..32]),
            version: arr(&b[42..45]),
            arch: Arch(arr(&b[45..48])),
            id: arr(&b[48..64]),
            created_at: i64_at(b, 64),
            modified_at: i64_at(b, 72),
            descriptors_free: i64_at(b, 80),
            descriptors_total: i64_at(b, 88),
            descriptors_offset: i64_at(b, 96),
            descriptors_size: i64_at(b, 104),
            data_offset: i64_at(b, 112),
            data_size: i64_at(b, 120),
        }
    }

    /// The 128 bytes of this header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..32].copy_from_slice(&self.launch_script);
        b[32..42].copy_from_slice(&MAGIC);
        b[42..45].copy_from_slice(&self.version);
        b[45..48].copy_from_slice(&self.arch.0);
        b[48..64].copy_from_slice(&self.id);
        for (off, v) in [
            (64, self.created_at),
            (72, self.modified_at),
            (80, self.descriptors_free),
            (88, self.descriptors_total),
            (96, self.descriptors_offset),
            (104, self.descriptors_size),
            (112, self.data_offset),
            (120, self.data_size),
        ] {
            b[off..off + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// Type-specific descriptor metadata (the 384-byte Extra field), decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extra {
    /// A filesystem partition.
    Partition {
        /// Filesystem type.
        fs_type: FsType,
        /// Partition role.
        part_type: PartType,
        /// Architecture.
        arch: Arch,
    },
    /// A signature.
    Signature {
        /// Hash function.
        hash_type: HashType,
        /// The signing entity (the first 20 bytes are an OpenPGP fingerprint).
        entity: [u8; 20],
    },
    /// A cryptographic message.
    CryptoMessage {
        /// Message format.
        format_type: FormatType,
        /// Message kind.
        message_type: MessageType,
    },
    /// An SBOM.
    Sbom {
        /// SBOM format.
        format: SbomFormat,
    },
    /// An OCI blob or root index.
    Digest(String),
    /// Nothing type-specific (or a type this reader does not decode).
    None,
}

/// One used descriptor: a data object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Slot index in the table (0-based).
    pub slot: u32,
    /// What the object holds.
    pub data_type: DataType,
    /// Object ID.
    pub id: u32,
    /// Group ID as stored (`GROUP_MASK | group`).
    pub group_id: u32,
    /// Linked object or group (`GROUP_MASK | group`), 0 for none.
    pub linked_id: u32,
    /// Absolute file offset of the object.
    pub offset: i64,
    /// Object size.
    pub size: i64,
    /// Alignment padding before the object plus its size.
    pub size_with_padding: i64,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Modification time, Unix seconds.
    pub modified_at: i64,
    /// Deprecated owner.
    pub uid: i64,
    /// Deprecated group.
    pub gid: i64,
    /// Name, NUL-padded.
    pub name: [u8; 128],
    /// Raw Extra bytes.
    pub extra: [u8; 384],
}

impl Descriptor {
    /// The name up to the first NUL.
    pub fn name(&self) -> String {
        printable(&self.name)
    }

    /// The group number, or `None` for "no group".
    pub fn group(&self) -> Option<u32> {
        match self.group_id & !GROUP_MASK {
            0 => None,
            g => Some(g),
        }
    }

    /// The link: `None`, an object ID, or a group.
    pub fn link(&self) -> Link {
        if self.linked_id == 0 {
            Link::None
        } else if self.linked_id & GROUP_MASK == GROUP_MASK {
            Link::Group(self.linked_id & !GROUP_MASK)
        } else {
            Link::Object(self.linked_id)
        }
    }

    /// The decoded Extra field.
    pub fn decoded_extra(&self) -> Extra {
        let e = &self.extra;
        match self.data_type {
            DataType::Partition => Extra::Partition {
                fs_type: FsType::from_raw(i32_at(e, 0)),
                part_type: PartType::from_raw(i32_at(e, 4)),
                arch: Arch(arr(&e[8..11])),
            },
            DataType::Signature => Extra::Signature {
                hash_type: HashType::from_raw(i32_at(e, 0)),
                entity: arr(&e[4..24]),
            },
            DataType::CryptoMessage => Extra::CryptoMessage {
                format_type: FormatType::from_raw(i32_at(e, 0)),
                message_type: MessageType::from_raw(i32_at(e, 4)),
            },
            DataType::Sbom => Extra::Sbom {
                format: SbomFormat::from_raw(i32_at(e, 0)),
            },
            DataType::OciBlob | DataType::OciRootIndex => Extra::Digest(printable(e)),
            _ => Extra::None,
        }
    }

    /// Partition metadata, if this is a partition.
    pub fn partition(&self) -> Option<(FsType, PartType, Arch)> {
        match self.decoded_extra() {
            Extra::Partition {
                fs_type,
                part_type,
                arch,
            } => Some((fs_type, part_type, arch)),
            _ => None,
        }
    }

    /// The type column of `siftool list`: `FS (Squashfs/*System/amd64)`, `Signature (SHA-256)`…
    pub fn type_label(&self) -> String {
        let t = self.data_type.name();
        match self.decoded_extra() {
            Extra::Partition {
                fs_type,
                part_type,
                arch,
            } => format!("{t} ({fs_type}/{part_type}/{arch})"),
            Extra::Signature { hash_type, .. } => format!("{t} ({hash_type})"),
            Extra::CryptoMessage {
                format_type,
                message_type,
            } => format!("{t} ({format_type}/{message_type})"),
            Extra::Sbom { format } => format!("{t} ({format})"),
            _ => t.to_owned(),
        }
    }

    fn parse(slot: u32, d: &[u8]) -> Descriptor {
        Descriptor {
            slot,
            data_type: DataType::from_raw(i32_at(d, 0)),
            id: u32_at(d, 5),
            group_id: u32_at(d, 9),
            linked_id: u32_at(d, 13),
            offset: i64_at(d, 17),
            size: i64_at(d, 25),
            size_with_padding: i64_at(d, 33),
            created_at: i64_at(d, 41),
            modified_at: i64_at(d, 49),
            uid: i64_at(d, 57),
            gid: i64_at(d, 65),
            name: arr(&d[73..201]),
            extra: arr(&d[201..585]),
        }
    }

    /// The 585 bytes of this descriptor (always marked used).
    pub fn to_bytes(&self) -> [u8; DESCRIPTOR_LEN as usize] {
        let mut d = [0u8; DESCRIPTOR_LEN as usize];
        d[0..4].copy_from_slice(&self.data_type.raw().to_le_bytes());
        d[4] = 1;
        d[5..9].copy_from_slice(&self.id.to_le_bytes());
        d[9..13].copy_from_slice(&self.group_id.to_le_bytes());
        d[13..17].copy_from_slice(&self.linked_id.to_le_bytes());
        for (off, v) in [
            (17, self.offset),
            (25, self.size),
            (33, self.size_with_padding),
            (41, self.created_at),
            (49, self.modified_at),
            (57, self.uid),
            (65, self.gid),
        ] {
            d[off..off + 8].copy_from_slice(&v.to_le_bytes());
        }
        d[73..201].copy_from_slice(&self.name);
        d[201..585].copy_from_slice(&self.extra);
        d
    }
}

/// What a descriptor links to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Nothing.
    None,
    /// An object by ID.
    Object(u32),
    /// A group by number.
    Group(u32),
}

/// A parsed SIF file: its header and its used descriptors in slot order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SifFile {
    /// The global header.
    pub header: Header,
    /// Used descriptors, in slot order.
    pub descriptors: Vec<Descriptor>,
    /// Length of the file.
    pub file_len: u64,
}

impl SifFile {
    /// The in-use partitions whose part type is PrimSys.
    pub fn primary_partitions(&self) -> Vec<&Descriptor> {
        self.descriptors
            .iter()
            .filter(|d| matches!(d.partition(), Some((_, PartType::PrimSys, _))))
            .collect()
    }
}

/// Whether `bytes` (the start of a file) carry the SIF magic at offset 32.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.get(32..42) == Some(&MAGIC[..])
}

/// Reads and validates the header and descriptor table of a SIF file.
///
/// Checks the magic and version, that the descriptor table lies inside the file, and that every
/// used object lies inside the file. Object contents are not read.
pub fn read<R: Read + Seek>(r: &mut R) -> Result<SifFile, SifError> {
    let len = r.seek(SeekFrom::End(0))?;
    if len < HEADER_LEN {
        return Err(SifError::TruncatedHeader { len });
    }
    r.seek(SeekFrom::Start(0))?;
    let mut hb = [0u8; HEADER_LEN as usize];
    r.read_exact(&mut hb)?;
    if !has_magic(&hb) {
        return Err(SifError::BadMagic {
            found: printable_all(&hb[32..42]),
        });
    }
    if hb[42..45] != VERSION {
        return Err(SifError::BadVersion {
            found: printable_all(&hb[42..45]),
        });
    }
    let header = Header::parse(&hb);
    if !(0..=MAX_DESCRIPTORS).contains(&header.descriptors_total) {
        return Err(SifError::BadHeaderField {
            field: "DescriptorsTotal",
            value: header.descriptors_total,
        });
    }
    if header.descriptors_offset < 0 {
        return Err(SifError::BadHeaderField {
            field: "DescriptorsOffset",
            value: header.descriptors_offset,
        });
    }
    // Both checked non-negative above, and the product is below 2^26.
    let total = header.descriptors_total as u64;
    let table_off = header.descriptors_offset as u64;
    let table_size = total * DESCRIPTOR_LEN;
    if table_off
        .checked_add(table_size)
        .is_none_or(|end| end > len)
    {
        return Err(SifError::DescriptorsPastEnd {
            offset: table_off,
            total,
            size: table_size,
            len,
        });
    }
    r.seek(SeekFrom::Start(table_off))?;
    let mut table = vec![0u8; table_size as usize];
    r.read_exact(&mut table)?;
    let mut descriptors = Vec::new();
    for (slot, d) in table.chunks_exact(DESCRIPTOR_LEN as usize).enumerate() {
        if d[4] == 0 {
            continue;
        }
        let desc = Descriptor::parse(slot as u32, d);
        let inside = desc.offset >= 0
            && desc.size >= 0
            && desc
                .offset
                .checked_add(desc.size)
                .is_some_and(|end| end as u64 <= len);
        if !inside {
            return Err(SifError::ObjectPastEnd {
                id: desc.id,
                kind: desc.data_type.name().to_owned(),
                offset: desc.offset,
                size: desc.size,
                len,
            });
        }
        descriptors.push(desc);
    }
    Ok(SifFile {
        header,
        descriptors,
        file_len: len,
    })
}

/// One object to put into a new SIF file.
#[derive(Debug)]
pub struct NewObject<'a> {
    /// What the object holds.
    pub data_type: DataType,
    /// Name (at most 128 bytes).
    pub name: String,
    /// Encoded Extra field (see [`partition_extra`]).
    pub extra: [u8; 384],
    /// Group number (1 by default); `None` for no group.
    pub group: Option<u32>,
    /// Linked ID as stored (0 for none).
    pub linked_id: u32,
    /// Where the bytes come from and how many there are.
    pub data: ObjectData<'a>,
}

/// The bytes of a new object.
pub enum ObjectData<'a> {
    /// In memory.
    Bytes(&'a [u8]),
    /// A reader with a known length, copied in.
    Reader(&'a mut dyn Read, u64),
    /// This many bytes already written at the offset the layout gives the object (the caller
    /// computed it; [`write`] returns the layout so the caller can check). Lets a large
    /// filesystem be written into place instead of copied.
    AlreadyWritten(u64),
}

impl fmt::Debug for ObjectData<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectData::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            ObjectData::Reader(_, n) => write!(f, "Reader({n} bytes)"),
            ObjectData::AlreadyWritten(n) => write!(f, "AlreadyWritten({n} bytes)"),
        }
    }
}

impl ObjectData<'_> {
    fn len(&self) -> u64 {
        match self {
            ObjectData::Bytes(b) => b.len() as u64,
            ObjectData::Reader(_, n) | ObjectData::AlreadyWritten(n) => *n,
        }
    }
}

/// The Extra field of a partition descriptor.
pub fn partition_extra(fs_type: FsType, part_type: PartType, arch: Arch) -> [u8; 384] {
    let mut e = [0u8; 384];
    e[0..4].copy_from_slice(&fs_type.raw().to_le_bytes());
    e[4..8].copy_from_slice(&part_type.raw().to_le_bytes());
    e[8..11].copy_from_slice(&arch.0);
    e
}

/// Options for [`write`].
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// The launch script (at most 31 bytes).
    pub launch_script: String,
    /// Image UUID bytes.
    pub id: [u8; 16],
    /// Creation (and modification) time, Unix seconds.
    pub time: i64,
    /// Descriptor slots.
    pub descriptors: u32,
}

impl WriteOptions {
    /// Reproducible output: zero UUID and Go's zero time, so equal inputs give equal files.
    pub fn deterministic() -> Self {
        WriteOptions {
            launch_script: LAUNCH_SCRIPT.to_owned(),
            id: [0; 16],
            time: GO_ZERO_TIME,
            descriptors: DEFAULT_DESCRIPTORS,
        }
    }

    /// A fresh random UUID (v4) and the current time.
    pub fn now() -> Self {
        let mut id = [0u8; 16];
        if getrandom(&mut id).is_err() {
            // Without randomness fall back to time-derived bytes: the ID only needs to differ
            // between builds, it is not a secret.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            id.copy_from_slice(&t.to_le_bytes());
        }
        id[6] = (id[6] & 0x0f) | 0x40;
        id[8] = (id[8] & 0x3f) | 0x80;
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        WriteOptions {
            launch_script: LAUNCH_SCRIPT.to_owned(),
            id,
            time,
            descriptors: DEFAULT_DESCRIPTORS,
        }
    }
}

fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// Why a SIF file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The launch script is 32 bytes or longer.
    #[error("launch script is {0} bytes; it must be shorter than 32")]
    LaunchScriptTooLong(usize),
    /// An object name is longer than 128 bytes.
    #[error("object name {0:?} is longer than 128 bytes")]
    NameTooLong(String),
    /// More objects than descriptor slots.
    #[error("{objects} objects do not fit in {slots} descriptor slots")]
    TooManyObjects {
        /// Objects given.
        objects: usize,
        /// Slots available.
        slots: u32,
    },
    /// Two primary system partitions.
    #[error("a SIF image can hold only one primary system partition")]
    SecondPrimary,
    /// A reader gave fewer bytes than announced.
    #[error("object {name:?}: expected {expected} bytes, got {got}")]
    ShortObject {
        /// Object name.
        name: String,
        /// Announced length.
        expected: u64,
        /// Bytes read.
        got: u64,
    },
    /// Writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Writes a SIF file holding `objects` to `w`, laid out as the reference implementation does:
/// descriptors at 4096, data from `4096 + slots × 585`, partitions aligned to 4096, object IDs
/// from 1 in order, the header arch taken from the primary system partition.
pub fn write<W: Write + Seek>(
    w: &mut W,
    opts: &WriteOptions,
    objects: Vec<NewObject<'_>>,
) -> Result<SifFile, WriteError> {
    let script = opts.launch_script.as_bytes();
    if script.len() >= 32 {
        return Err(WriteError::LaunchScriptTooLong(script.len()));
    }
    if objects.len() > opts.descriptors as usize {
        return Err(WriteError::TooManyObjects {
            objects: objects.len(),
            slots: opts.descriptors,
        });
    }
    let descriptors_size = i64::from(opts.descriptors) * DESCRIPTOR_LEN as i64;
    let data_offset = DESCRIPTORS_OFFSET as i64 + descriptors_size;
    let mut header = Header {
        launch_script: arr_padded(script),
        version: VERSION,
        arch: Arch::UNKNOWN,
        id: opts.id,
        created_at: opts.time,
        modified_at: opts.time,
        descriptors_free: i64::from(opts.descriptors),
        descriptors_total: i64::from(opts.descriptors),
        descriptors_offset: DESCRIPTORS_OFFSET as i64,
        descriptors_size,
        data_offset,
        data_size: 0,
    };
    let mut descriptors = Vec::new();
    let mut primary_seen = false;
    for (i, obj) in objects.into_iter().enumerate() {
        if obj.name.len() > 128 {
            return Err(WriteError::NameTooLong(obj.name));
        }
        let unaligned = data_offset + header.data_size;
        let align = if obj.data_type == DataType::Partition {
            PARTITION_ALIGN as i64
        } else {
            1
        };
        let offset = (unaligned + align - 1) / align * align;
        let n = obj.data.len() as i64;
        match obj.data {
            ObjectData::AlreadyWritten(_) => {}
            ObjectData::Bytes(b) => {
                w.seek(SeekFrom::Start(offset as u64))?;
                w.write_all(b)?
            }
            ObjectData::Reader(r, expected) => {
                w.seek(SeekFrom::Start(offset as u64))?;
                let got = io::copy(&mut r.take(expected), w)?;
                if got != expected {
                    return Err(WriteError::ShortObject {
                        name: obj.name,
                        expected,
                        got,
                    });
                }
            }
        }
        let desc = Descriptor {
            slot: i as u32,
            data_type: obj.data_type,
            id: i as u32 + 1,
            group_id: GROUP_MASK | obj.group.unwrap_or(0),
            linked_id: obj.linked_id,
            offset,
            size: n,
            size_with_padding: offset - unaligned + n,
            created_at: opts.time,
            modified_at: opts.time,
            uid: 0,
            gid: 0,
            name: arr_padded(obj.name.as_bytes()),
            extra: obj.extra,
        };
        if let Some((_, PartType::PrimSys, arch)) = desc.partition() {
            if primary_seen {
                return Err(WriteError::SecondPrimary);
            }
            primary_seen = true;
            header.arch = arch;
        }
        header.data_size += desc.size_with_padding;
        header.descriptors_free -= 1;
        descriptors.push(desc);
    }
    let mut table = vec![0u8; descriptors_size as usize];
    for d in &descriptors {
        let at = d.slot as usize * DESCRIPTOR_LEN as usize;
        table[at..at + DESCRIPTOR_LEN as usize].copy_from_slice(&d.to_bytes());
    }
    w.seek(SeekFrom::Start(DESCRIPTORS_OFFSET))?;
    w.write_all(&table)?;
    w.seek(SeekFrom::Start(0))?;
    w.write_all(&header.to_bytes())?;
    // The gap between header and table must be zeros; a fresh file already is, but a reused
    // buffer might not be.
    w.write_all(&vec![0u8; (DESCRIPTORS_OFFSET - HEADER_LEN) as usize])?;
    w.flush()?;
    let file_len = (data_offset + header.data_size) as u64;
    Ok(SifFile {
        header,
        descriptors,
        file_len,
    })
}

/// Formats a byte count like the reference tool: `0 B`, `847 B`, `27 KiB`, `265 KiB`, `3 MiB`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut div: u128 = 1;
    while unit + 1 < UNITS.len() && u128::from(n) >= div * 1024 {
        div *= 1024;
        unit += 1;
    }
    let rounded = (u128::from(n) + div / 2) / div;
    format!("{rounded} {}", UNITS[unit])
}

/// Formats Unix seconds as `2020-06-30 00:01:56 +0000 UTC`.
pub fn format_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} +0000 UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// UUID bytes as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn uuid_string(id: &[u8; 16]) -> String {
    let h: Vec<String> = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// Bytes up to the first NUL, lossily as text.
fn printable(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// All bytes, escaped, for error messages about garbage.
fn printable_all(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

fn arr_padded<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    let n = b.len().min(N);
    a[..n].copy_from_slice(&b[..n]);
    a
}

fn i64_at(b: &[u8], off: usize) -> i64 {
    i64::from_le_bytes(arr(&b[off..off + 8]))
}

fn i32_at(b: &[u8], off: usize) -> i32 {
    i32::from_le_bytes(arr(&b[off..off + 4]))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(arr(&b[off..off + 4]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_render_like_siftool() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(847), "847 B");
        assert_eq!(human_size(28080), "27 KiB");
        assert_eq!(human_size(8784), "9 KiB");
        assert_eq!(human_size(270_928), "265 KiB");
    }

    #[test]
    fn times_render_like_siftool() {
        assert_eq!(format_time(1_593_475_316), "2020-06-30 00:01:56 +0000 UTC");
        assert_eq!(format_time(GO_ZERO_TIME), "0001-01-01 00:00:00 +0000 UTC");
    }

    #[test]
    fn arch_names_round_trip() {
        for (code, name) in ARCHES {
            let a = Arch::from_name(name).unwrap();
            assert_eq!(&a.0[..2], &code[..]);
            assert_eq!(a.name(), *name);
        }
        assert_eq!(Arch(*b"99\0").name(), "unknown");
    }
}
