//! The node instance: one user + mount namespace holding the container root, joined by members.
//!
//! Life of an instance, in order (each step one function):
//! 1. [`NodeInstance::create`] plans every image's root (filling the library cache) and forks
//!    the instance process from a single-threaded caller (`process.rs`).
//! 2. The instance leaves the terminal's signals to its members, enters a user and mount
//!    namespace of its own ([`crate::sys::userns::enter_user_namespace`]: identity maps), builds
//!    the root with [`crate::container::executor::execute`] (which ends in `pivot_root`), and
//!    evaluates the image's environment scripts once (`image_env.rs`). A job whose parts name
//!    different images gets one mount namespace per image in the one user namespace: before it
//!    builds the first image's root, the instance mounts the tmpfs every root binds at
//!    `/dev/shm` and forks one *holder* per further image (`holder.rs`), which unshares a mount
//!    namespace of its own, builds and enters that image's root, evaluates its scripts and stays
//!    until the instance ends.
//! 3. It hands every connection its namespace fds (the user namespace, then one mount
//!    namespace per image) and each image's environment changes (`protocol.rs`); a connection is
//!    a membership (`serve.rs`). [`NodeInstance::spawn`] forks a member (`member.rs`) that
//!    `setns()`es into the user namespace and its image's mount namespace, `chdir`s and execs.
//! 4. When the last connection closes (its holder exited or was killed), the instance kills what
//!    is left in its user namespace (`serve.rs`), stops the image server and
//!    exits; the mount namespace and everything mounted in it go with it.
//!
//! Unrelated processes of one user (the rank shims of one job step on a node) find the instance
//! of a key through [`join_or_create`], over the files of [`crate::container::rendezvous`].

mod handle;
mod holder;
mod image_env;
mod member;
mod process;
mod protocol;
mod serve;

use nix::errno::Errno;

pub use handle::{NodeInstance, join_or_create};
pub use member::{EXIT_JOIN_FAILED, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, MemberCommand};

use super::member_env::Env;
use super::rendezvous::RendezvousError;
use super::root::RootConfig;
use crate::exit::{Blame, Fault};

/// At most this many images in one node instance (one descriptor per image's mount namespace
/// travels in each membership message).
pub const MAX_IMAGES: usize = 16;

/// What a node instance is built from.
#[derive(Debug, Clone)]
pub struct InstanceConfig {
    /// The container root (of image 0).
    pub root: RootConfig,
    /// The roots of further images (1, 2, …): MPMD parts that name another image. Each is built
    /// in a mount namespace of its own inside the instance's one user namespace, and every root
    /// binds the same private `/dev/shm`.
    pub other_roots: Vec<RootConfig>,
    /// The environment the image's scripts are evaluated in (the creator's, filtered by
    /// [`super::member_env::base_environment`]).
    pub script_env: Env,
    /// What the instance does as it ends with the ranks whose starters said they exited 0
    /// ([`NodeInstance::clean_end`]), when they did: under srun and hydra, report them to the
    /// front end in one report for the node instead of one per rank
    /// ([`crate::launch::report::send_clean_ends`]).
    pub clean_ends: Option<fn(&[u32])>,
}

/// Errors from creating, joining or using a node instance.
///
/// Failures inside the instance process travel to its creator as text over its socket
/// (the failure messages of `protocol.rs`): they arrive as [`InstanceError::NoUserNamespace`],
/// [`InstanceError::Root`], [`InstanceError::ImageEnv`] or [`InstanceError::Setup`], by the kind
/// the instance gave them.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// User namespaces are not available to this user.
    #[error(
        "cannot create a user namespace ({errno}){detail}: ask the site to enable unprivileged \
         user namespaces (sysctl user.max_user_namespaces > 0; on Debian/Ubuntu kernels also \
         kernel.unprivileged_userns_clone=1 and no AppArmor userns restriction)"
    )]
    NoUserNamespace {
        /// The error from `unshare`.
        errno: Errno,
        /// What was found out about why.
        detail: String,
    },
    /// The container root cannot be built as asked (a bind source or destination the user can
    /// change): the instance's message.
    #[error("{0}")]
    Root(String),
    /// The instance could not get ready for another reason (a system call, the image mount, a
    /// holder of another image): the instance's message.
    #[error("{0}")]
    Setup(String),
    /// The image's environment scripts failed.
    #[error("the image's environment scripts (/.singularity.d/env/*.sh) failed: {0}")]
    ImageEnv(String),
    /// More images than one instance holds.
    #[error("{n} different images in one job: a node instance holds at most {MAX_IMAGES}")]
    TooManyImages {
        /// How many images were asked for.
        n: usize,
    },
    /// A member was asked for without a program.
    #[error("no command given")]
    NoCommand,
    /// A member's argument, variable or working directory holds a NUL byte.
    #[error("an argument contains a NUL byte")]
    NulByte,
    /// A member was asked for in an image the instance does not hold.
    #[error("the node instance holds {held} image(s), not image {image}")]
    NoSuchImage {
        /// How many images the instance holds.
        held: usize,
        /// The image asked for.
        image: usize,
    },
    /// A member was asked for after [`NodeInstance::release_namespaces`].
    #[error("the namespaces of this instance were already released")]
    Released,
    /// The instance's ready message was not what the protocol allows.
    #[error("malformed ready message")]
    MalformedReady,
    /// A system call on the cmpirun side failed.
    #[error("{step}: {errno}")]
    Sys {
        /// What was being done.
        step: &'static str,
        /// The system error.
        errno: Errno,
    },
    /// Talking to the instance failed.
    #[error("node instance: {step}: {error}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The error (part of the message, so not also a `source`).
        error: std::io::Error,
    },
    /// The instance went away before it was ready.
    #[error("node instance exited before it was ready")]
    Vanished,
    /// The rendezvous files of the instance's key could not be used ([`join_or_create`]).
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
}

/// The user's to fix: a root built from their binds, a key, the images and the command they
/// gave; everything else is the host's (user namespaces disabled on the host included).
impl Blame for InstanceError {
    fn fault(&self) -> Fault {
        match self {
            InstanceError::Root(_)
            | InstanceError::TooManyImages { .. }
            | InstanceError::NoCommand
            | InstanceError::NulByte => Fault::User,
            InstanceError::Rendezvous(e) => e.fault(),
            InstanceError::NoUserNamespace { .. }
            | InstanceError::Setup(_)
            | InstanceError::ImageEnv(_)
            | InstanceError::NoSuchImage { .. }
            | InstanceError::Released
            | InstanceError::MalformedReady
            | InstanceError::Sys { .. }
            | InstanceError::Io { .. }
            | InstanceError::Vanished => Fault::Host,
        }
    }
}
