//! A libfabric core library loaded into this process, asked what it is and which providers
//! answer on this node; and the provider plugins that come with it.
//!
//! Loading a libfabric runs its initialisers and `fi_getinfo` probes the node's devices, and either
//! may start threads. A process that must stay single-threaded (to `unshare` a user namespace
//! later) should probe in a child process.
//!
//! ```no_run
//! use cmpirun_fabric::libfabric::HostLibfabric;
//!
//! let fabric = HostLibfabric::load("/usr/lib/x86_64-linux-gnu/libfabric.so.1".as_ref())?;
//! println!("libfabric {}", fabric.version());
//! for provider in fabric.providers()? {
//!     println!("{} {}", provider.name, provider.version);
//! }
//! # Ok::<(), cmpirun_fabric::libfabric::LibfabricError>(())
//! ```

use std::collections::BTreeSet;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::elf::{ElfFacts, ReadError};

/// Why a libfabric could not be loaded or asked.
#[derive(Debug, thiserror::Error)]
pub enum LibfabricError {
    /// `dlopen` failed (missing file, wrong architecture, unresolved dependency).
    #[error("{path}: cannot load it as libfabric: {source}")]
    Load {
        /// The library.
        path: PathBuf,
        /// The loader's message.
        source: libloading::Error,
    },
    /// The library loaded but lacks a function every libfabric has.
    #[error("{path}: not a libfabric: it has no {symbol}()")]
    MissingSymbol {
        /// The library.
        path: PathBuf,
        /// The function that is missing.
        symbol: &'static str,
    },
    /// `fi_getinfo` returned an error other than "no providers".
    #[error("{path}: fi_getinfo failed: {message} ({code})")]
    GetInfo {
        /// The library.
        path: PathBuf,
        /// The negative `FI_E*` code.
        code: i32,
        /// `fi_strerror` of it.
        message: String,
    },
    /// Listing a provider directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The core library's ELF facts could not be read.
    #[error(transparent)]
    Elf(#[from] ReadError),
}

/// A libfabric API version as `FI_VERSION(major, minor)` encodes it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ApiVersion {
    /// `FI_MAJOR(version)`.
    pub major: u32,
    /// `FI_MINOR(version)`.
    pub minor: u32,
}

impl ApiVersion {
    /// Decodes `(major << 16) | minor`.
    pub fn from_raw(raw: u32) -> Self {
        Self {
            major: raw >> 16,
            minor: raw & 0xffff,
        }
    }

    /// Encodes as `FI_VERSION(major, minor)`.
    pub fn raw(self) -> u32 {
        (self.major << 16) | (self.minor & 0xffff)
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// One provider that answered `fi_getinfo`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Provider {
    /// The provider name (`tcp`, `shm`, `cxi`); a layered provider is listed as
    /// `core;utility` (`tcp;ofi_rxm`), as libfabric reports it.
    pub name: String,
    /// The provider's version (`prov_version`, encoded like an API version).
    pub version: ApiVersion,
    /// The fabric names it offers (`fabric_attr->name`), for example an IP subnet for tcp.
    pub fabrics: BTreeSet<String>,
}

impl Provider {
    /// The providers named in [`Provider::name`]: `["tcp", "ofi_rxm"]` for `tcp;ofi_rxm`.
    pub fn parts(&self) -> impl Iterator<Item = &str> {
        self.name.split(';')
    }
}

// The prefix of `struct fi_info` and `struct fi_fabric_attr` from rdma/fabric.h that this module
// reads. Both have kept this layout since libfabric 1.0 (2.x keeps the FABRIC_1.x ABI); fields past
// `fabric_attr` are never touched, so later additions do not matter.
#[repr(C)]
struct FiInfo {
    next: *mut FiInfo,
    caps: u64,
    mode: u64,
    addr_format: u32,
    src_addrlen: usize,
    dest_addrlen: usize,
    src_addr: *mut c_void,
    dest_addr: *mut c_void,
    handle: *mut c_void,
    tx_attr: *mut c_void,
    rx_attr: *mut c_void,
    ep_attr: *mut c_void,
    domain_attr: *mut c_void,
    fabric_attr: *mut FiFabricAttr,
}

#[repr(C)]
struct FiFabricAttr {
    fabric: *mut c_void,
    name: *mut c_char,
    prov_name: *mut c_char,
    prov_version: u32,
    api_version: u32,
}

type FiVersionFn = unsafe extern "C" fn() -> u32;
type FiGetinfoFn = unsafe extern "C" fn(
    version: u32,
    node: *const c_char,
    service: *const c_char,
    flags: u64,
    hints: *const FiInfo,
    info: *mut *mut FiInfo,
) -> c_int;
type FiFreeinfoFn = unsafe extern "C" fn(info: *mut FiInfo);
type FiStrerrorFn = unsafe extern "C" fn(errnum: c_int) -> *const c_char;

/// `ENODATA`: `fi_getinfo`'s answer when no provider matches.
const FI_ENODATA: c_int = 61;

/// A libfabric core library loaded from a given path.
pub struct HostLibfabric {
    path: PathBuf,
    version: ApiVersion,
    get_info: FiGetinfoFn,
    free_info: FiFreeinfoFn,
    strerror: Option<FiStrerrorFn>,
    // Keeps the function pointers above valid; dropped last.
    _library: libloading::Library,
}

impl fmt::Debug for HostLibfabric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostLibfabric")
            .field("path", &self.path)
            .field("version", &self.version)
            .finish()
    }
}

impl HostLibfabric {
    /// Loads the libfabric at `path` (by path, so it need not be the one the loader would pick)
    /// and reads its `fi_version()`.
    pub fn load(path: &Path) -> Result<Self, LibfabricError> {
        // SAFETY: loading runs the library's initialisers; the caller names a libfabric, whose
        // initialisers only set up its own state.
        let library =
            unsafe { libloading::Library::new(path) }.map_err(|source| LibfabricError::Load {
                path: path.to_owned(),
                source,
            })?;
        let missing = |symbol| LibfabricError::MissingSymbol {
            path: path.to_owned(),
            symbol,
        };
        // SAFETY: the signatures are those of rdma/fabric.h and rdma/fi_errno.h; the pointers are
        // only used while `library` is alive (it is stored alongside them).
        let (fi_version, get_info, free_info, strerror) = unsafe {
            let v: FiVersionFn = *library
                .get::<FiVersionFn>(b"fi_version\0")
                .map_err(|_| missing("fi_version"))?;
            let g: FiGetinfoFn = *library
                .get::<FiGetinfoFn>(b"fi_getinfo\0")
                .map_err(|_| missing("fi_getinfo"))?;
            let f: FiFreeinfoFn = *library
                .get::<FiFreeinfoFn>(b"fi_freeinfo\0")
                .map_err(|_| missing("fi_freeinfo"))?;
            let s: Option<FiStrerrorFn> = library
                .get::<FiStrerrorFn>(b"fi_strerror\0")
                .ok()
                .map(|s| *s);
            (v, g, f, s)
        };
        // SAFETY: fi_version takes no arguments and returns a plain integer.
        let version = ApiVersion::from_raw(unsafe { fi_version() });
        Ok(Self {
            path: path.to_owned(),
            version,
            get_info,
            free_info,
            strerror,
            _library: library,
        })
    }

    /// The path it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its `fi_version()`: the newest API it implements (`2.5` for libfabric 2.5.1).
    pub fn version(&self) -> ApiVersion {
        self.version
    }

    /// The providers that answer `fi_getinfo` on this node without hints, at the library's own
    /// API version, in the order libfabric ranks them, each listed once. Honours `FI_PROVIDER`
    /// and `FI_PROVIDER_PATH` from this process's environment, as the MPI would.
    pub fn providers(&self) -> Result<Vec<Provider>, LibfabricError> {
        let mut head: *mut FiInfo = std::ptr::null_mut();
        // SAFETY: NULL node, service and hints are allowed; `head` receives a list that is freed
        // below with fi_freeinfo exactly once.
        let rc = unsafe {
            (self.get_info)(
                self.version.raw(),
                std::ptr::null(),
                std::ptr::null(),
                0,
                std::ptr::null(),
                &mut head,
            )
        };
        if rc == -FI_ENODATA {
            return Ok(Vec::new());
        }
        if rc != 0 {
            return Err(LibfabricError::GetInfo {
                path: self.path.clone(),
                code: rc,
                message: self.strerror(-rc),
            });
        }
        let list = InfoList {
            head,
            free: self.free_info,
        };
        let mut providers: Vec<Provider> = Vec::new();
        let mut node = list.head;
        while !node.is_null() {
            // SAFETY: `node` is an element of the list libfabric returned and has not been freed.
            let info = unsafe { &*node };
            if !info.fabric_attr.is_null() {
                // SAFETY: non-null fabric_attr points at the element's fabric attributes.
                let attr = unsafe { &*info.fabric_attr };
                let name = c_string(attr.prov_name);
                let fabric = c_string(attr.name);
                let version = ApiVersion::from_raw(attr.prov_version);
                match providers.iter_mut().find(|p| p.name == name) {
                    Some(p) => {
                        p.fabrics.insert(fabric);
                    }
                    None => providers.push(Provider {
                        name,
                        version,
                        fabrics: BTreeSet::from([fabric]),
                    }),
                }
            }
            node = info.next;
        }
        drop(list);
        Ok(providers)
    }

    fn strerror(&self, errnum: c_int) -> String {
        match self.strerror {
            // SAFETY: fi_strerror returns a static string for any errnum.
            Some(f) => c_string(unsafe { f(errnum) } as *mut c_char),
            None => io::Error::from_raw_os_error(errnum).to_string(),
        }
    }
}

/// Frees a `fi_getinfo` result when dropped.
struct InfoList {
    head: *mut FiInfo,
    free: FiFreeinfoFn,
}

impl Drop for InfoList {
    fn drop(&mut self) {
        if !self.head.is_null() {
            // SAFETY: `head` came from fi_getinfo of the same library and is freed once.
            unsafe { (self.free)(self.head) };
        }
    }
}

fn c_string(p: *mut c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: libfabric's strings are NUL-terminated and outlive this call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// A provider plugin (`lib<name>-fi.so`) that a core library would load.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProviderPlugin {
    /// The provider name (`efa` for `libefa-fi.so`).
    pub name: String,
    /// The plugin file.
    pub path: PathBuf,
}

/// The provider plugins that come with the core library at `core`: the files `lib*-fi.so` in
/// `<libdir>/libfabric/` (libfabric's default provider path, next to both the path given and the
/// file it resolves to) and in the directories of the core library's `DT_RUNPATH`/`DT_RPATH`
/// (the PyPI wheels find theirs through `$ORIGIN/libfabric`). Each directory that holds plugins
/// is what `FI_PROVIDER_PATH` should name when the core library is injected.
pub fn provider_plugins(core: &Path) -> Result<Vec<ProviderPlugin>, LibfabricError> {
    let facts = ElfFacts::read(core)?;
    let mut dirs: Vec<PathBuf> = Vec::new();
    let given_dir = core.parent().unwrap_or(Path::new("/")).to_owned();
    dirs.push(given_dir.join("libfabric"));
    if let Ok(real) = std::fs::canonicalize(core)
        && let Some(real_dir) = real.parent()
    {
        dirs.push(real_dir.join("libfabric"));
    }
    let origin = given_dir.to_string_lossy().into_owned();
    for d in facts.runpath.iter().chain(&facts.rpath) {
        let d = d.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin);
        dirs.push(PathBuf::from(d));
    }
    let mut seen_dirs = BTreeSet::new();
    let mut seen_files = BTreeSet::new();
    let mut plugins = Vec::new();
    for dir in dirs {
        let Ok(real_dir) = std::fs::canonicalize(&dir) else {
            continue;
        };
        if !real_dir.is_dir() || !seen_dirs.insert(real_dir) {
            continue;
        }
        let entries = std::fs::read_dir(&dir).map_err(|source| LibfabricError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| LibfabricError::Io {
                path: dir.clone(),
                source,
            })?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        for file in names {
            let Some(name) = file
                .strip_prefix("lib")
                .and_then(|n| n.strip_suffix("-fi.so"))
            else {
                continue;
            };
            let path = dir.join(&file);
            let real = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            if real.is_file() && seen_files.insert(real) {
                plugins.push(ProviderPlugin {
                    name: name.to_owned(),
                    path,
                });
            }
        }
    }
    Ok(plugins)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions() {
        let v = ApiVersion::from_raw((2 << 16) | 5);
        assert_eq!(v, ApiVersion { major: 2, minor: 5 });
        assert_eq!(v.to_string(), "2.5");
        assert_eq!(v.raw(), 0x2_0005);
        assert!(v > ApiVersion::from_raw((1 << 16) | 17));
    }

    #[test]
    fn struct_prefix_matches_fabric_h() {
        // On LP64, fabric_attr sits after 2 pointers + 2 u64 + u32 (padded) + 2 size_t + 7
        // pointers.
        assert_eq!(std::mem::offset_of!(FiInfo, fabric_attr), 13 * 8);
        assert_eq!(std::mem::offset_of!(FiFabricAttr, prov_name), 16);
        assert_eq!(std::mem::offset_of!(FiFabricAttr, prov_version), 24);
    }

    #[test]
    fn loading_a_non_libfabric_says_so() {
        let err = HostLibfabric::load("/lib/x86_64-linux-gnu/libz.so.1".as_ref()).unwrap_err();
        assert!(matches!(
            err,
            LibfabricError::MissingSymbol {
                symbol: "fi_version",
                ..
            }
        ));
        assert!(err.to_string().contains("has no fi_version()"), "{err}");
        let err = HostLibfabric::load("/nonexistent/libfabric.so.1".as_ref()).unwrap_err();
        assert!(
            err.to_string().starts_with("/nonexistent/libfabric.so.1: "),
            "{err}"
        );
    }
}
