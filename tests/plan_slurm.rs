//! Inside a real allocation of the one-node Slurm test cluster (`ci/start-slurm.sh`), run as the
//! unprivileged test user: cmpirun picks the slurm launcher and a Slurm profile from the
//! allocation's own variables and plans the `srun` line and the rank layout from them.

mod common;

use std::time::Duration;

use common::{TuserCommand, TuserDir};

/// Copies the shipped profiles where the test user can read them.
fn profiles(dir: &TuserDir) -> String {
    let dst = dir.path().join("profiles");
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(common::repo_root().join("profiles")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst.display().to_string()
}

/// `salloc -n TASKS cmpirun --dry-run --json ARGS` as the test user.
fn plan_in_allocation(tasks: &str, env: &[(&str, &str)], args: &[&str]) -> serde_json::Value {
    let dir = TuserDir::new();
    let profiles = profiles(&dir);
    let mut cmd = TuserCommand::new("salloc")
        .args(["-n", tasks, "--quiet"])
        .arg(common::cmpirun_bin())
        .args(["--dry-run", "--json"])
        .args(args)
        .env("CMPIRUN_PROFILE_DIRS", &profiles)
        .current_dir(dir.path())
        .slurm()
        .timeout(Duration::from_secs(60));
    for (k, v) in env {
        cmd = cmd.env(k, v);
    }
    let out = cmd.run();
    out.assert_success();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The plan's `srun` command line.
fn srun_argv(plan: &serde_json::Value) -> Vec<&str> {
    plan["launcher"]["commands"][0]["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

#[test]
fn slurm_pmi2_inside_salloc() {
    let img = common::staged_image("mpich4");
    let p = plan_in_allocation("2", &[], &[img.to_str().unwrap(), "hello"]);
    assert_eq!(p["profile"]["name"], "slurm-pmi2");
    assert_eq!(p["launcher"]["kind"], "slurm");
    // Chosen because the allocation set $SLURM_JOB_ID.
    let why = p["profile"]["reason"].as_str().unwrap();
    assert!(why.contains("$SLURM_JOB_ID="), "{why}");
    let argv = srun_argv(&p);
    // Without -n the job fills the allocation's tasks.
    assert_eq!(&argv[..4], ["srun", "--mpi=pmi2", "-n", "2"]);
    assert_eq!(p["layout"]["size"], 2);
    assert_eq!(p["layout"]["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(p["layout"]["process_mapping"], "(vector,(0,1,2))");
}

#[test]
fn slurm_pmix_when_the_allocation_asks_for_it() {
    let img = common::staged_image("openmpi4");
    let p = plan_in_allocation(
        "2",
        &[("SLURM_MPI_TYPE", "pmix")],
        &["-n", "2", img.to_str().unwrap(), "hello"],
    );
    assert_eq!(p["profile"]["name"], "slurm-pmix");
    assert_eq!(p["launcher"]["pmi"], "pmix");
    assert_eq!(p["launcher"]["commands"][0]["argv"][1], "--mpi=pmix");
    assert_eq!(p["apps"][0]["image"]["mpi_family"], "openmpi");
    let family = p["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "mpi-family")
        .unwrap();
    assert_eq!(family["verdict"], "pass", "{family}");
}

/// HPE Cray PMI as an option: the hpe-slingshot-cray-pmi profile starts the ranks with
/// `srun --mpi=cray_shasta` and injects the host's Cray PMI library, which this host lacks (a
/// failed check naming the file and the field).
#[test]
fn cray_pmi_profile_plans_srun_mpi_cray_shasta() {
    let img = common::staged_image("mpich4");
    let p = plan_in_allocation(
        "2",
        &[],
        &[
            "--profile",
            "hpe-slingshot-cray-pmi",
            img.to_str().unwrap(),
            "hello",
        ],
    );
    assert_eq!(p["profile"]["name"], "hpe-slingshot-cray-pmi");
    let argv = srun_argv(&p);
    assert_eq!(&argv[..2], ["srun", "--mpi=cray_shasta"], "{argv:?}");
    let why = p["launcher"]["commands"][0]["why"].as_str().unwrap();
    assert!(why.contains("Slurm's cray_shasta plugin"), "{why}");
    let failed: Vec<String> = p["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == "fail")
        .map(|c| c["message"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        failed.iter().any(|m| m
            .contains("/opt/cray/pe/pmi/default/lib/libpmi2.so.0: no such file on this host")
            && m.contains("pmi.host_libraries")),
        "{failed:#?}"
    );
}
