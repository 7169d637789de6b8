//! From a built plan to what the launchers give the container and the ranks: the binds of an
//! image's root and a rank's environment, through the functions every launcher calls.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use cmpirun::cli::{CliRequest, parse_launch};
use cmpirun::container::member_env::{Env, EnvChange};
use cmpirun::facts::{HostFacts, ImageSummary};
use cmpirun::jobspec::JobSpec;
use cmpirun::launch::node::{image_binds, rank_environment};
use cmpirun::plan::LaunchPlan;
use cmpirun::profile::{self, ProfileChoice, SelectedBy};

fn spec(args: &[&str]) -> JobSpec {
    match parse_launch(args).unwrap() {
        CliRequest::Launch(s) => *s,
        other => panic!("{other:?}"),
    }
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn plan(args: &[&str], yaml: &str, host_env: &[(&str, &str)], paths: &[&str]) -> LaunchPlan {
    let loaded = profile::parse_text(Path::new("/site/p.yaml"), yaml).unwrap();
    let choice = ProfileChoice {
        profile: profile::single(&loaded),
        selected_by: SelectedBy::Flag,
        reason: "test".into(),
        outcome: None,
        candidates: vec![],
        searched: vec![],
    };
    let host = HostFacts {
        hostname: "n1".into(),
        cpus: 2,
        env: env(host_env),
        paths: paths
            .iter()
            .map(|p| (p.to_string(), vec![PathBuf::from(p)]))
            .collect(),
        cmpirun: "/bin/cmpirun".into(),
        ..HostFacts::default()
    };
    let s = spec(args);
    let images: Vec<ImageSummary> = s
        .apps
        .iter()
        .map(|a| ImageSummary {
            path: a.image.clone(),
            kind: Some("sif".into()),
            ..Default::default()
        })
        .collect();
    cmpirun::plan::build(&s, &choice, &images, &host).unwrap()
}

fn host(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect()
}

fn get<'a>(e: &'a Env, k: &str) -> Option<&'a str> {
    e.get(OsStr::new(k)).and_then(|v| v.to_str())
}

/// The environment of a rank of `part` with no image scripts and no launcher variables.
fn rank_env(p: &LaunchPlan, part: usize, caller: &[(&str, &str)]) -> Env {
    rank_environment(p, part, host(caller), Path::new("/h"), &[], &[])
}

#[test]
fn rank_environment_applies_the_changes_in_order() {
    let caller = [
        ("HOME", "/h"),
        ("PMI_RANK", "9"),
        ("OMPI_COMM_WORLD_RANK", "9"),
        ("OMPI_MCA_btl", "self"),
        ("OMPI_MCA_ess_base_jobid", "7"),
        ("LM_LICENSE", "x"),
        ("LD_LIBRARY_PATH", "/usr/lib"),
        ("DISPLAY", ":0"),
    ];
    let p = plan(
        &[
            "-x", "A=1", "-n", "1", "-env", "B", "2", "a.sif", "p", ":", "-n", "1", "b.sif", "q",
        ],
        "name: p\nenv:\n  set:\n    SITE: s\n  unset: [DISPLAY]\nbinds:\n  - source: /x\n",
        &caller,
        &["/x"],
    );
    let e0 = rank_env(&p, 0, &caller);
    assert_eq!(get(&e0, "HOME"), Some("/h"));
    assert_eq!(get(&e0, "LM_LICENSE"), Some("x"));
    assert!(
        !e0.contains_key(OsStr::new("PMI_RANK")),
        "stray PMI state is scrubbed"
    );
    assert!(!e0.contains_key(OsStr::new("OMPI_COMM_WORLD_RANK")));
    assert!(
        !e0.contains_key(OsStr::new("OMPI_MCA_ess_base_jobid")),
        "launch state goes"
    );
    assert_eq!(get(&e0, "OMPI_MCA_btl"), Some("self"), "MCA settings stay");
    assert!(!e0.contains_key(OsStr::new("DISPLAY")));
    assert_eq!(get(&e0, "SITE"), Some("s"));
    assert_eq!(get(&e0, "A"), Some("1"));
    assert_eq!(get(&e0, "B"), Some("2"));
    assert_eq!(get(&e0, "PMI_process_mapping"), Some("(vector,(0,1,2))"));
    let e1 = rank_env(&p, 1, &caller);
    assert!(
        !e1.contains_key(OsStr::new("B")),
        "-env applies to its own part only"
    );
    assert_eq!(get(&e1, "A"), Some("1"));

    // The launcher's per-rank values win over what the caller had.
    let e = rank_environment(
        &p,
        0,
        host(&caller),
        Path::new("/h"),
        &[],
        &[("PMI_RANK".into(), "0".into())],
    );
    assert_eq!(get(&e, "PMI_RANK"), Some("0"));
}

#[test]
fn genvnone_keeps_only_what_is_passed_or_set() {
    let caller = [
        ("HOME", "/caller"),
        ("KEEP", "k"),
        ("SLINGSHOT_VNIS", "7"),
        ("OTHER", "o"),
        ("PMI_FD", "3"),
    ];
    let p = plan(
        &["-genvnone", "-x", "KEEP", "-x", "SET=v", "a.sif", "p"],
        "name: p\nenv:\n  pass: [\"SLINGSHOT_*\", \"PMI_*\"]\n",
        &[],
        &[],
    );
    let e = rank_env(&p, 0, &caller);
    assert_eq!(get(&e, "KEEP"), Some("k"));
    assert_eq!(get(&e, "SLINGSHOT_VNIS"), Some("7"));
    assert_eq!(get(&e, "SET"), Some("v"));
    assert!(!e.contains_key(OsStr::new("OTHER")));
    // Passing never lets stray wire-up state through.
    assert!(!e.contains_key(OsStr::new("PMI_FD")));
    // The container's own account, not the caller's.
    assert_eq!(get(&e, "HOME"), Some("/h"));
}

#[test]
fn ld_library_path_gets_the_injection_directory_first() {
    let p = plan(
        &["a.sif", "p"],
        "name: p\nfabric:\n  libfabric: [/host/libfabric.so.1]\n",
        &[],
        &["/host/libfabric.so.1"],
    );
    // The caller's library path names host directories: it does not cross into the container.
    let e = rank_env(&p, 0, &[("LD_LIBRARY_PATH", "/usr/lib")]);
    assert_eq!(get(&e, "LD_LIBRARY_PATH"), Some("/.cmpirun/lib"));
    // One the command line sets does, after the injection directory.
    let px = plan(
        &["-x", "LD_LIBRARY_PATH=/opt/app/lib", "a.sif", "p"],
        "name: p\nfabric:\n  libfabric: [/host/libfabric.so.1]\n",
        &[],
        &["/host/libfabric.so.1"],
    );
    let e = rank_env(&px, 0, &[("LD_LIBRARY_PATH", "/usr/lib")]);
    assert_eq!(
        get(&e, "LD_LIBRARY_PATH"),
        Some("/.cmpirun/lib:/opt/app/lib")
    );
    // Also ahead of what the image's environment scripts set.
    let scripts = [EnvChange::Set(
        "LD_LIBRARY_PATH".into(),
        "/opt/mpi/lib".into(),
    )];
    let e = rank_environment(&p, 0, host(&[]), Path::new("/h"), &scripts, &[]);
    assert_eq!(
        get(&e, "LD_LIBRARY_PATH"),
        Some("/.cmpirun/lib:/opt/mpi/lib")
    );
}

/// [`image_binds`] as `SRC:DST:ro|rw`.
fn binds(
    plan_binds: &[cmpirun::plan::Bind],
    image: &Path,
    env: &BTreeMap<String, String>,
) -> Vec<String> {
    image_binds(plan_binds, image, env)
        .expect("binds")
        .iter()
        .map(|b| {
            let mode = if b.readonly { "ro" } else { "rw" };
            format!("{}:{}:{mode}", b.src.display(), b.dst.display())
        })
        .collect()
}

#[test]
fn binds_expand_rank_start_sources() {
    let slurm = [
        ("SLURM_JOB_ID", "1"),
        ("SLURM_JOB_NODELIST", "n1"),
        ("SLURM_TASKS_PER_NODE", "2"),
    ];
    let p = plan(
        &["--launcher", "slurm", "--pmi", "pmix", "a.sif", "p"],
        "name: p\npmi:\n  pmix_dirs: [$PMIX_SERVER_TMPDIR, $PMIX_SYSTEM_TMPDIR]\nbinds:\n  - source: /scratch\n    read_only: true\n",
        &slurm,
        &["/scratch"],
    );
    let image = Path::new("a.sif");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let rw = format!("{d}:{d}:rw");

    // An unset variable leaves its bind out.
    let b = binds(&p.binds, image, &env(&[("PMIX_SERVER_TMPDIR", d)]));
    assert_eq!(b, ["/scratch:/scratch:ro".to_owned(), rw.clone()]);

    // Two variables naming one directory give one bind.
    let both = env(&[("PMIX_SERVER_TMPDIR", d), ("PMIX_SYSTEM_TMPDIR", d)]);
    let b = binds(&p.binds, image, &both);
    assert_eq!(b, ["/scratch:/scratch:ro".to_owned(), rw.clone()]);

    // A directory that does not exist on this node is left out, as is an empty variable.
    let gone = env(&[
        ("PMIX_SERVER_TMPDIR", "/nonexistent/pmix.1.0"),
        ("PMIX_SYSTEM_TMPDIR", ""),
    ]);
    let b = binds(&p.binds, image, &gone);
    assert_eq!(b, ["/scratch:/scratch:ro".to_owned()]);
}
