//! One unprivileged container per node: the node instance, its root, its members.
//!
//! - [`root`]: the container root as data (pure), from a [`root::RootConfig`].
//! - [`resolve`]: symlink-safe path resolution inside the root (pure).
//! - [`executor`]: the only code that mounts the root, from the plan.
//! - [`member_env`]: the environment of a member (pure).
//! - [`instance`]: the node instance: its handle, its process and holders, its members, the
//!   socket protocol between them, and [`instance::join_or_create`].
//! - [`library_cache`]: the node's unpacked MPI stacks and loaded files, as an instance's creator
//!   uses them.
//! - [`rendezvous`]: the lock and socket files by which unrelated processes of one user find
//!   the instance of a key.
//! - [`config`]: the node instance's configuration from typed [`config::RootRequest`]s (every
//!   launcher's and `cmpirun exec`'s) and the host.
//! - [`run`]: `cmpirun exec` / `cmpirun shell`: the command line's request, one member, its
//!   exit status and signals.

pub mod accounts;
pub mod config;
pub mod executor;
pub mod instance;
pub mod library_cache;
pub mod member_env;
pub mod rendezvous;
pub mod resolve;
pub mod root;
pub mod run;

pub use instance::{InstanceConfig, InstanceError, MemberCommand, NodeInstance};
pub use root::{RootConfig, ShmMode};
