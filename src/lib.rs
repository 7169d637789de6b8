//! cmpirun: launch MPI jobs in unprivileged containers, one container per node.
//!
//! The data flow of one launch is visible in the module names:
//! `cli` (argv → JobSpec) → `image` (SIF → ImageFacts) → plan → launch.

pub mod cli;
pub mod container;
pub mod exit;
pub mod image;
pub mod jobspec;
pub mod launch;
pub mod mount;
pub mod plan;
pub mod profile;
pub mod sys;
