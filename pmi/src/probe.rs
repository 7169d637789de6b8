//! Which PMI client libraries the host has: `libpmi`, `libpmi2`, `libpmix`.
//!
//! Site profiles use this to decide whether the host's PMI library can be injected into an
//! image. Each library is opened with `dlopen` (through `libloading`), by soname or by path,
//! its entry points are looked up, and for PMIx the version string of `PMIx_Get_version()` is
//! read. Nothing is initialised: no `PMI_Init` is ever called.
//!
//! ```no_run
//! let report = cmpirun_pmi::probe::probe_host();
//! for lib in report.libraries.iter().filter(|l| l.loaded) {
//!     println!("{} {:?} {:?}", lib.name, lib.path, lib.pmix_version);
//! }
//! ```

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Sonames tried by [`probe_host`], unversioned first (the development link) and then the
/// runtime sonames Slurm and OpenPMIx install.
pub const SONAMES: &[&str] = &[
    "libpmi.so",
    "libpmi.so.0",
    "libpmi2.so",
    "libpmi2.so.0",
    "libpmix.so",
    "libpmix.so.2",
];

/// Entry points looked up in every library.
pub const SYMBOLS: &[&str] = &["PMI_Init", "PMI2_Init", "PMIx_Init", "PMIx_Get_version"];

/// What was found for one library name or path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibraryProbe {
    /// The soname or path that was opened.
    pub name: String,
    /// Whether `dlopen` succeeded.
    pub loaded: bool,
    /// The file the dynamic linker loaded (from `dladdr`), when known.
    pub path: Option<PathBuf>,
    /// The `dlopen` error, when it failed.
    pub error: Option<String>,
    /// For every name in [`SYMBOLS`], whether the library defines it.
    pub symbols: BTreeMap<String, bool>,
    /// `PMIx_Get_version()`, e.g. `"OpenPMIx 4.2.2rc2, repo rev: …"`.
    pub pmix_version: Option<String>,
}

/// The result of probing a set of libraries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// One entry per name or path tried, in order.
    pub libraries: Vec<LibraryProbe>,
}

impl ProbeReport {
    /// The first loaded library that defines `symbol`.
    pub fn provider_of(&self, symbol: &str) -> Option<&LibraryProbe> {
        self.libraries
            .iter()
            .find(|l| l.loaded && l.symbols.get(symbol) == Some(&true))
    }
}

/// Probe every soname in [`SONAMES`] through the dynamic linker's search path.
pub fn probe_host() -> ProbeReport {
    ProbeReport {
        libraries: SONAMES.iter().map(|n| probe_library(n)).collect(),
    }
}

/// Probe libraries given by path (or soname).
pub fn probe_paths<P: AsRef<Path>>(paths: &[P]) -> ProbeReport {
    ProbeReport {
        libraries: paths
            .iter()
            .map(|p| probe_library(&p.as_ref().to_string_lossy()))
            .collect(),
    }
}

/// Probe one library by soname or path.
pub fn probe_library(name: &str) -> LibraryProbe {
    let mut probe = LibraryProbe {
        name: name.to_owned(),
        loaded: false,
        path: None,
        error: None,
        symbols: BTreeMap::new(),
        pmix_version: None,
    };
    // SAFETY: loading a PMI library runs its ELF constructors; PMI libraries (Slurm's libpmi,
    // libpmi2, OpenPMIx) do no more than register static state in them.
    let lib = match unsafe { libloading::Library::new(name) } {
        Ok(lib) => lib,
        Err(e) => {
            // libloading's Display is generic ("dlopen failed"); the cause holds dlerror().
            let mut text = e.to_string();
            if let Some(cause) = std::error::Error::source(&e) {
                text = format!("{text}: {cause}");
            }
            probe.error = Some(text);
            return probe;
        }
    };
    probe.loaded = true;
    for sym in SYMBOLS {
        // SAFETY: the symbol is only looked up as an address, never called here.
        let addr = unsafe { lib.get::<*const ()>(sym.as_bytes()) }
            .ok()
            .map(|s| *s);
        probe.symbols.insert((*sym).to_owned(), addr.is_some());
        if probe.path.is_none()
            && let Some(a) = addr
        {
            probe.path = loaded_from(a);
        }
    }
    type GetVersion = unsafe extern "C" fn() -> *const c_char;
    // SAFETY: PMIx_Get_version is declared `const char *PMIx_Get_version(void)` in pmix.h and
    // may be called before PMIx_Init; it returns a static string.
    if let Ok(f) = unsafe { lib.get::<GetVersion>(b"PMIx_Get_version") } {
        // SAFETY: as above: a call with no arguments that returns a static string.
        let p = unsafe { f() };
        if !p.is_null() {
            // SAFETY: non-null, NUL-terminated static string from the library.
            let s = unsafe { CStr::from_ptr(p) };
            probe.pmix_version = Some(s.to_string_lossy().into_owned());
        }
    }
    probe
}

/// The file that defines the address `addr`.
fn loaded_from(addr: *const ()) -> Option<PathBuf> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr only reads the address and fills `info`.
    let rc = unsafe { libc::dladdr(addr.cast(), info.as_mut_ptr()) };
    if rc == 0 {
        return None;
    }
    // SAFETY: dladdr returned non-zero, so `info` is initialised.
    let info = unsafe { info.assume_init() };
    if info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the dynamic linker.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    Some(PathBuf::from(name.to_string_lossy().into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_is_reported_not_fatal() {
        let p = probe_library("/nonexistent/libpmi2.so.0");
        assert!(!p.loaded);
        assert!(p.error.is_some());
    }
}
