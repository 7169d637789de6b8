//! Helpers shared by the integration tests, one concern per file:
//!
//! - **Test images** (`images.rs`): [`image`] finds `.cache/images/<name>.sif` (built by
//!   `ci/build-images.sh`), [`staged_image`] and [`cmpirun_bin`] give copies the unprivileged test
//!   user can read, [`mksquashfs`] packs a tree into an image, [`unpack_image`] unpacks one and
//!   [`second_image`] repacks a test image with a marker, for MPMD jobs of two images.
//! - **The test user** (`user.rs`): [`tuser`] is the identity of [`TEST_USER`].
//! - **Running as the test user** (`command.rs`, `run_output.rs`): [`TuserCommand`] runs a program
//!   as `tuser` with no capabilities, a clean environment, its own process group and a timeout that
//!   kills the whole job; [`RunOutput`] is what it did.
//! - **Folders** (`scratch.rs`): [`TuserDir`], [`TestTmpfs`] and [`runtime_dir`].
//! - **Slurm** (`slurm.rs`): [`slurm_conf`] and [`require_slurm`] find the test cluster.
//! - **The three-node cluster** (`cluster.rs`): [`require_cluster`] finds `ci/start-cluster.sh`'s
//!   nodes `n1`..`n3` and checks their isolation; [`TuserCommand::cluster`] points Slurm's
//!   clients and hydra's ssh at it, [`TuserCommand::on_node`] runs a program on one node;
//!   [`Cluster`] reads what each node holds (`/tmp`, `/dev/shm`, mounts) and its link counters.
//! - **Leftovers** (`processes.rs`, `leftovers.rs`, `exclusive.rs`): [`Snapshot`] records the test
//!   user's processes, the mount table, `/dev/shm` and `/tmp/cmpirun*` before a run;
//!   [`assert_no_leftovers`] compares after it; [`exclusive`] serialises the tests that do.
//! - **The MPI test programs** (`programs.rs`): [`program`] names them, [`hello_lines`],
//!   [`fabric_lines`] and [`find_fields_all`] parse their output, [`assert_mpitest_ok`] and
//!   [`assert_bigmsg_ok`] check a job's; [`RankFailure`] names the ways the `abort` program fails
//!   a job.
//! - **Job command lines** (`jobs.rs`): [`hostfile`], [`hydra_cmpirun`] and [`salloc_cmpirun`]
//!   start the jobs several test files run the same way; [`run_failing_abort_job`] runs and checks
//!   a job whose rank fails.
//! - **Load** (`load.rs`): [`Load`] keeps the cores busy, writes to disk and evicts an image from
//!   the page cache while a test runs.
//! - **Waiting** (`wait.rs`): [`wait_for_file`] and [`wait_for_tagged`] wait for what a running
//!   job does.
//!
//! How a test uses them:
//!
//! ```ignore
//! mod common;
//! use common::*;
//!
//! #[test]
//! fn hello_in_mpich4() {
//!     let _serial = exclusive(); // only needed by tests that check host-wide leftovers
//!     let before = Snapshot::take();
//!     let out = TuserCommand::cmpirun()
//!         .args(["exec"])
//!         .arg(staged_image("mpich4"))
//!         .args(["/usr/local/bin/hello"])
//!         .run();
//!     out.assert_success();
//!     assert!(out.stdout.contains("hello: rank=0 size=1"));
//!     assert_no_leftovers(&before, &[out.tag.as_str()]);
//! }
//! ```

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

mod cluster;
mod command;
mod exclusive;
mod images;
mod jobs;
mod leftovers;
mod load;
mod processes;
mod programs;
mod run_output;
mod scratch;
mod slurm;
mod user;
mod wait;

// Every test binary uses a different subset, so some of these re-exports go unused in each.
#[allow(unused_imports)]
pub use {
    cluster::*, command::*, exclusive::*, images::*, jobs::*, leftovers::*, load::*, processes::*,
    programs::*, run_output::*, scratch::*, slurm::*, user::*, wait::*,
};
