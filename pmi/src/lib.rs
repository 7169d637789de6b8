//! PMI-1 and PMI-2 for MPI process managers: the wire codec, a server, and a probe for host PMI
//! libraries.
//!
//! An MPI library finds its peers through PMI, the process-management interface: every rank
//! puts its address into a key-value store, waits in a fence, and reads the others'. MPICH
//! (and everything built on its "simple" PMI client, including Slurm's `libpmi2`) speaks one of
//! two small text protocols over a socket the process manager provides. This crate is the
//! process-manager side:
//!
//! - [`wire`]: the codec for both protocols, an incremental decoder over a byte buffer;
//! - [`server`]: a server for one job (KVS with fences, job and node attributes, name service,
//!   finalize and abort as events, a fence that waits too long reported with the ranks it waits
//!   for), over inherited socketpairs (`PMI_FD`) or loopback TCP (`PMI_PORT`);
//! - [`wireup`]: the wire-up variables a rank gets, and the removal of stray PMI/PMIx variables;
//! - [`mapping`]: MPICH's `PMI_process_mapping` format, both ways;
//! - [`probe`]: which PMI libraries the host has (through `dlopen`);
//! - [`pmix`]: a single-node PMIx server through the host's libpmix, loaded at run time (for
//!   Open MPI, which speaks only PMIx).
//!
//! The smallest use: a one-rank job whose rank is started with the returned environment.
//!
//! ```no_run
//! use std::os::fd::AsRawFd;
//! use std::os::unix::process::CommandExt;
//! use cmpirun_pmi::server::{JobConfig, PmiServer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut server = PmiServer::new(JobConfig::single_node("job-1", 1))?;
//! let rank0 = server.add_socketpair(0)?;
//! let fd = rank0.fd.as_raw_fd();
//! let mut cmd = std::process::Command::new("./mpi_program");
//! cmd.envs(rank0.env.iter().map(|(k, v)| (k, v)));
//! // SAFETY: inherit_fd only calls fcntl, which is async-signal-safe.
//! unsafe { cmd.pre_exec(move || cmpirun_pmi::wireup::inherit_fd(fd)) };
//! let mut child = cmd.spawn()?;
//! drop(rank0); // the parent's copy, so a dead rank reads as a disconnect
//! let handle = server.start()?;
//! for event in handle.events() {
//!     println!("{event:?}");
//! }
//! let report = handle.join()?;
//! child.wait()?;
//! println!("{} puts, {} fences", report.puts, report.fences);
//! # Ok(())
//! # }
//! ```
//!
//! `examples/mini_mpiexec.rs` builds a whole one-node `mpiexec` on this, and
//! `examples/bench_fence.rs` measures a 256-rank fence against MPICH's hydra. The protocol
//! details every client depends on are written down in `docs/pmi.md` of the repository.

pub mod mapping;
pub mod pmix;
pub mod probe;
pub mod server;
pub mod wire;
pub mod wireup;

pub use server::{
    Event, FenceWait, JobConfig, JobReport, PmiError, PmiServer, ServerControl, ServerHandle,
};
pub use wire::{Message, Wire, WireError};
