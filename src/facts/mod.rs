//! The facts a launch is planned from, gathered at the edge so that [`crate::plan`] stays pure:
//! what the host offers ([`HostFacts`]) and what each image of the job is ([`ImageSummary`]).
//!
//! This is where a launch reads files, probes the host libfabric and reads images; it mounts
//! and starts nothing that outlives it. It calls [`crate::image::content`], which
//! reads what one image holds ([`crate::image::content::ImageFacts`]), for
//! every image of a job and keeps what the plan decides on.
//!
//! - [`host`]: the host's name, CPUs, environment, launcher programs, existing profile paths and
//!   libfabric ([`HostFacts::gather`]).
//! - [`patterns`]: host path patterns (`$VAR`s, globs) as profiles and `--bind` write them.
//! - [`image`]: what the plan records of one image ([`ImageSummary`]) and reading it.
//! - [`gather`]: the summaries of a job's images, from the [`cache`] or read in a child
//!   process, so that cmpirun stays single-threaded until it forks the ranks.
//! - [`cache`]: the per-user facts cache ([`FactsCache`]).

pub mod cache;
pub mod gather;
pub mod host;
pub mod image;
pub mod patterns;

pub use cache::{FactsCache, FactsCacheKey};
pub use gather::{gather_images, gather_images_with};
pub use host::{HostFacts, HostLibfabric, HostPmiLibrary, HostPmix};
pub use image::{ImageLibrary, ImageSummary, LibfabricUse};
pub use patterns::expand_vars;
