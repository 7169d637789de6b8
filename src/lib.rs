//! cmpirun: launch MPI jobs in unprivileged containers, one container per node.
//!
//! The data flow of one launch is visible in the module names: `cli` (argv → JobSpec) →
//! `profile` (SiteProfile) → `facts` (HostFacts, and each image's facts read by `image`) →
//! `plan` (LaunchPlan, pure) → `launch`.

pub mod cli;
pub mod container;
pub mod doctor;
pub mod exit;
pub mod facts;
pub mod image;
pub mod jobspec;
pub mod launch;
pub mod mount;
pub mod plan;
pub mod profile;
pub mod sys;
