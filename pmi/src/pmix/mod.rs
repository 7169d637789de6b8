//! PMIx for a single-node job: cmpirun's PMIx server, through the host's libpmix loaded at run
//! time (`libloading`), for MPI libraries that speak only PMIx (Open MPI).
//!
//! PMIx is too large to speak by hand, so unlike [`crate::server`] this module does not
//! implement the protocol: it drives the host's OpenPMIx *server* library, which does, and
//! answers its upcalls (a client connected or finalized, an abort, a fence, job control).
//!
//! - [`ffi`]: the few C types and entry points needed, written by hand and checked against
//!   the headers;
//! - [`info`]: `pmix_info_t` arrays built from Rust values;
//! - [`server`]: the server of one job, meant for a process of its own ([`server::serve`]),
//!   reporting to the launcher as JSON lines ([`server::ServerMessage`]);
//! - [`version`]: a library file's OpenPMIx version, and whether a server serves a client.
//!
//! ```no_run
//! use std::os::unix::net::UnixStream;
//! use cmpirun_pmi::pmix::server::{PmixJob, serve};
//!
//! let job = PmixJob {
//!     nspace: "job-1".into(),
//!     hostname: "node1".into(),
//!     appnums: vec![0, 0],
//!     wdirs: vec!["/".into()],
//!     tmpdir: "/tmp/pmix-job-1".into(),
//!     uid: 1000,
//!     gid: 1000,
//!     cpus: 2,
//!     deadline: std::time::Duration::from_secs(10),
//! };
//! let (launcher, server) = UnixStream::pair()?;
//! // In a process of its own (forked while single-threaded): serve until `launcher` closes.
//! let status = serve(&["libpmix.so.2".into()], &job, server);
//! # drop(launcher); let _ = status;
//! # Ok::<(), std::io::Error>(())
//! ```

pub mod ffi;
pub mod info;
pub mod server;
pub mod version;

/// Where a host libpmix is looked for when the profile names none: the usual install
/// locations, then the dynamic linker's search (`libpmix.so.2`).
pub const SYSTEM_LIBRARIES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so.2",
    "/usr/lib/x86_64-linux-gnu/libpmix.so.2",
    "/usr/lib64/libpmix.so.2",
    "/usr/lib/libpmix.so.2",
    "/usr/local/lib/libpmix.so.2",
    "/opt/pmix/lib/libpmix.so.2",
    "libpmix.so.2",
];
