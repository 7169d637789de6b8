//! Facts about fabric libraries, for injecting a host's libfabric into a container.
//!
//! An MPI inside a container reaches the host's network only through the host's `libfabric.so.1`
//! and its providers. Before binding the host library over the image's copy, a launcher needs to
//! know what each side offers and needs:
//!
//! - [`elf`]: the loader's facts about a shared library, read from its bytes (so files inside an
//!   image can be read without mounting it): `DT_SONAME`, `DT_NEEDED`, `DT_RPATH`, `DT_RUNPATH`,
//!   the symbol versions it defines (`FABRIC_1.9`) and the ones it needs, per library
//!   (`libc.so.6` → `GLIBC_2.34`), and numeric ordering of such versions.
//! - [`libfabric`]: a host libfabric loaded by path: its `fi_version()`, the providers that answer
//!   `fi_getinfo` on this node, and its provider plugins (`lib<name>-fi.so`).
//! - [`loader`]: the dynamic loader's search order (RPATH, `LD_LIBRARY_PATH`, RUNPATH,
//!   `ld.so.cache`, default directories), the list of glibc's own libraries, and the
//!   `ld.so.conf` parser, over the host's files or any others ([`loader::ConfFiles`]).
//! - [`closure`]: the libraries a set of host libraries pulls in, without glibc's, each with the
//!   newest `GLIBC_x.y` it needs.
//! - [`host`]: all of the above for one host libfabric, in one serialisable value.
//! - [`maps`]: the files a running process has mapped (device and inode), to confirm that a rank
//!   loaded the injected library.
//!
//! The smallest use: does the host libfabric define every `FABRIC_x.y` an MPI library needs?
//!
//! ```no_run
//! use cmpirun_fabric::elf::ElfFacts;
//!
//! let host = ElfFacts::read("/usr/lib/x86_64-linux-gnu/libfabric.so.1".as_ref())?;
//! let mpi = ElfFacts::read("/opt/mpich5/lib/libmpi.so.12".as_ref())?;
//! let missing: Vec<_> = mpi
//!     .versions_needed_from("libfabric.so.1")
//!     .difference(&host.version_definitions)
//!     .cloned()
//!     .collect();
//! if !missing.is_empty() {
//!     eprintln!("the host libfabric lacks {}", missing.join(", "));
//! }
//! # Ok::<(), cmpirun_fabric::elf::ReadError>(())
//! ```

pub mod child;
pub mod closure;
pub mod elf;
pub mod host;
pub mod libfabric;
pub mod loader;
pub mod maps;
