//! `examples/slurm/mpitest.sbatch` submitted with `sbatch --wait` as the test user to the one-node
//! test cluster (`ci/start-slurm.sh`): cmpirun inside the batch job launches the image's
//! `mpitest` on every task, in one container.

mod common;

use std::fs;
use std::time::Duration;

use common::*;

#[test]
fn batch_script_runs_mpitest_on_every_task() {
    let _serial = exclusive();
    let dir = TuserDir::new();
    // The repository may be unreadable by the test user; sbatch reads the script as that user.
    let script = dir.path().join("mpitest.sbatch");
    fs::copy(repo_root().join("examples/slurm/mpitest.sbatch"), &script).unwrap();
    let output = dir.path().join("job.out");
    let out = TuserCommand::new("sbatch")
        .args(["--wait", "-n", "3", "-o"])
        .arg(&output)
        .arg(&script)
        .arg(staged_image("mpich4"))
        .env("CMPIRUN", cmpirun_bin())
        .current_dir(dir.path())
        .slurm()
        .timeout(Duration::from_secs(180))
        .run();
    let job = fs::read_to_string(&output).unwrap_or_default();
    assert!(
        out.success(),
        "sbatch failed:\n{out}\n--- job output ---\n{job}"
    );
    let hellos = hello_lines(&job);
    assert_eq!(hellos.len(), 3, "{job}");
    assert!(job.contains("mpitest: OK size=3"), "{job}");
    assert_one_container_per_host(&hellos, tuser().uid);
}
