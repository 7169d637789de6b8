//! The plan applied: the container's binds and a rank's environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cmpirun::cli::{CliRequest, parse_launch};
use cmpirun::jobspec::JobSpec;
use cmpirun::plan::apply::{container_binds, rank_environment};
use cmpirun::plan::{HostFacts, ImageInfo, LaunchPlan, build_plan};
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
    let images: Vec<ImageInfo> = s
        .apps
        .iter()
        .map(|a| ImageInfo {
            path: a.image.clone(),
            kind: Some("sif".into()),
            ..Default::default()
        })
        .collect();
    build_plan(&s, &choice, &images, &host).unwrap()
}

#[test]
fn rank_environment_applies_the_changes_in_order() {
    let caller = env(&[
        ("HOME", "/h"),
        ("PMI_RANK", "9"),
        ("OMPI_COMM_WORLD_RANK", "9"),
        ("OMPI_MCA_btl", "self"),
        ("LM_LICENSE", "x"),
        ("LD_LIBRARY_PATH", "/usr/lib"),
        ("DISPLAY", ":0"),
    ]);
    let p = plan(
        &[
            "-x", "A=1", "-n", "1", "-env", "B", "2", "a.sif", "p", ":", "-n", "1", "b.sif", "q",
        ],
        "name: p\nenv:\n  set:\n    SITE: s\n  unset: [DISPLAY]\nbinds:\n  - source: /x\n",
        &caller
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<Vec<_>>(),
        &["/x"],
    );
    let e0 = rank_environment(&p, 0, &caller);
    assert_eq!(e0.get("HOME").map(String::as_str), Some("/h"));
    assert!(!e0.contains_key("PMI_RANK"), "stray PMI state is scrubbed");
    assert!(!e0.contains_key("OMPI_COMM_WORLD_RANK"));
    assert_eq!(
        e0.get("OMPI_MCA_btl").map(String::as_str),
        Some("self"),
        "MCA settings stay"
    );
    assert!(!e0.contains_key("DISPLAY"));
    assert_eq!(e0.get("SITE").map(String::as_str), Some("s"));
    assert_eq!(e0.get("A").map(String::as_str), Some("1"));
    assert_eq!(e0.get("B").map(String::as_str), Some("2"));
    assert_eq!(
        e0.get("PMI_process_mapping").map(String::as_str),
        Some("(vector,(0,1,2))")
    );
    let e1 = rank_environment(&p, 1, &caller);
    assert!(!e1.contains_key("B"), "-env applies to its own part only");
}

#[test]
fn genvnone_keeps_only_what_is_passed_or_set() {
    let caller = env(&[
        ("HOME", "/h"),
        ("KEEP", "k"),
        ("SLINGSHOT_VNIS", "7"),
        ("OTHER", "o"),
    ]);
    let p = plan(
        &["-genvnone", "-x", "KEEP", "a.sif", "p"],
        "name: p\nenv:\n  pass: [\"SLINGSHOT_*\"]\n",
        &[],
        &[],
    );
    let e = rank_environment(&p, 0, &caller);
    assert_eq!(e.get("KEEP").map(String::as_str), Some("k"));
    assert_eq!(e.get("SLINGSHOT_VNIS").map(String::as_str), Some("7"));
    assert!(!e.contains_key("OTHER") && !e.contains_key("HOME"));
}

#[test]
fn ld_library_path_gets_the_injection_directory_first() {
    let caller = env(&[("LD_LIBRARY_PATH", "/usr/lib")]);
    let p = plan(
        &["a.sif", "p"],
        "name: p\nfabric:\n  libfabric: [/host/libfabric.so.1]\n",
        &[],
        &["/host/libfabric.so.1"],
    );
    let e = rank_environment(&p, 0, &caller);
    assert_eq!(e["LD_LIBRARY_PATH"], "/.cmpirun/lib:/usr/lib");
    let e = rank_environment(&p, 0, &BTreeMap::new());
    assert_eq!(e["LD_LIBRARY_PATH"], "/.cmpirun/lib");
}

#[test]
fn container_binds_expand_rank_start_sources() {
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
    let b = container_binds(
        &p,
        &env(&[("PMIX_SERVER_TMPDIR", "/var/spool/slurmd/pmix.1.0")]),
    );
    let pairs: Vec<(&str, &str, bool)> = b
        .iter()
        .map(|b| (b.src.to_str().unwrap(), b.dst.to_str().unwrap(), b.readonly))
        .collect();
    assert_eq!(
        pairs,
        [
            ("/scratch", "/scratch", true),
            (
                "/var/spool/slurmd/pmix.1.0",
                "/var/spool/slurmd/pmix.1.0",
                false
            ),
        ]
    );
}
