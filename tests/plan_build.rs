//! `plan::build` is pure: these tests give it a JobSpec, a profile and facts as values and check
//! every decision (launcher, layout, commands, binds, environment, checks).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cmpirun::cli::{CliRequest, parse_launch};
use cmpirun::facts::{HostFacts, HostLibfabric, ImageLibrary, ImageSummary, LibfabricUse};
use cmpirun::jobspec::{JobSpec, LauncherKind, MountBackendKind, PmiKind};
use cmpirun::plan::{
    BindKind, BindTime, EnvAction, EnvScope, LaunchPlan, PlanError, Verdict, dry_run_text,
};
use cmpirun::profile::{self, ProfileChoice, SelectedBy};

fn spec(args: &[&str]) -> JobSpec {
    match parse_launch(args).unwrap() {
        CliRequest::Launch(s) => *s,
        other => panic!("{other:?}"),
    }
}

fn choice(yaml: &str) -> ProfileChoice {
    let loaded = profile::parse_text(Path::new("/site/test.yaml"), yaml).unwrap();
    let p = profile::single(&loaded);
    ProfileChoice {
        outcome: None,
        profile: p,
        selected_by: SelectedBy::Flag,
        reason: "named with --profile test".into(),
        candidates: vec![],
        searched: vec![],
    }
}

fn shipped(name: &str) -> ProfileChoice {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let search = profile::ProfileSearch {
        dirs: vec![dir.clone()],
    };
    let p = profile::resolve_file(&dir.join(format!("{name}.yaml")), &search).unwrap();
    ProfileChoice {
        outcome: None,
        profile: p,
        selected_by: SelectedBy::Flag,
        reason: format!("named with --profile {name}"),
        candidates: vec![],
        searched: vec![dir],
    }
}

fn host(env: &[(&str, &str)]) -> HostFacts {
    HostFacts {
        hostname: "node1".into(),
        cpus: 6,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        programs: BTreeMap::new(),
        paths: BTreeMap::new(),
        cmpirun: "/opt/cmpirun/bin/cmpirun".into(),
        libfabric: None,
        libfabric_error: None,
        pmix: None,
        pmi_libraries: BTreeMap::new(),
    }
}

fn with_programs(mut h: HostFacts, names: &[&str]) -> HostFacts {
    for n in names {
        h.programs
            .insert(n.to_string(), PathBuf::from(format!("/usr/bin/{n}")));
    }
    h
}

fn with_paths(mut h: HostFacts, paths: &[(&str, &[&str])]) -> HostFacts {
    for (pattern, found) in paths {
        h.paths.insert(
            pattern.to_string(),
            found.iter().map(PathBuf::from).collect(),
        );
    }
    h
}

fn images(s: &JobSpec) -> Vec<ImageSummary> {
    s.apps
        .iter()
        .map(|a| ImageSummary {
            path: a.image.clone(),
            kind: Some("sif".into()),
            ..ImageSummary::default()
        })
        .collect()
}

fn plan(args: &[&str], c: &ProfileChoice, h: &HostFacts) -> LaunchPlan {
    let s = spec(args);
    let p = cmpirun::plan::build(&s, c, &images(&s), h).unwrap_or_else(|e| panic!("{e}"));
    // Every plan renders and round-trips through JSON.
    let _ = dry_run_text(&p);
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(serde_json::from_str::<LaunchPlan>(&json).unwrap(), p);
    p
}

fn plan_err(args: &[&str], c: &ProfileChoice, h: &HostFacts) -> PlanError {
    let s = spec(args);
    cmpirun::plan::build(&s, c, &images(&s), h).unwrap_err()
}

fn check<'a>(p: &'a LaunchPlan, name: &str) -> Vec<&'a cmpirun::plan::Check> {
    p.checks.iter().filter(|c| c.name == name).collect()
}

fn env_of<'a>(p: &'a LaunchPlan, name: &str) -> Option<&'a EnvAction> {
    p.env.iter().find(|e| e.name == name).map(|e| &e.action)
}

const GENERIC: &str = "name: test\nlauncher:\n  kind: auto\n";

#[test]
fn local_by_default() {
    let p = plan(
        &["-n", "4", "img.sif", "hello"],
        &choice(GENERIC),
        &host(&[]),
    );
    assert_eq!(p.launcher.kind, LauncherKind::Local);
    assert_eq!(p.launcher.pmi, PmiKind::Pmi2);
    assert!(p.launcher.commands.is_empty());
    assert_eq!(p.layout.size, 4);
    assert_eq!(p.layout.nodes.len(), 1);
    assert_eq!(p.layout.nodes[0].name, "node1");
    assert_eq!(p.layout.process_mapping, "(vector,(0,1,4))");
    assert_eq!(p.layout.local_ranks(), [0, 1, 2, 3]);
    assert!(matches!(
        env_of(&p, "PMI_FD"),
        Some(EnvAction::PerRank { .. })
    ));
    assert_eq!(
        env_of(&p, "PMI_process_mapping"),
        Some(&EnvAction::Set {
            value: "(vector,(0,1,4))".into()
        })
    );
    assert_eq!(p.mount.backend, MountBackendKind::Auto);
    assert!(p.may_launch());
}

#[test]
fn local_without_n_uses_the_cpus_and_sixty_four_ranks_fit_one_node() {
    let p = plan(&["img.sif", "hello"], &choice(GENERIC), &host(&[]));
    assert_eq!(p.layout.size, 6);
    let p = plan(
        &["-n", "64", "img.sif", "hello"],
        &choice(GENERIC),
        &host(&[]),
    );
    assert_eq!(p.layout.nodes.len(), 1);
    assert_eq!(p.layout.process_mapping, "(vector,(0,1,64))");
}

#[test]
fn slurm_inside_an_allocation() {
    let h = with_programs(
        host(&[
            ("SLURM_JOB_ID", "42"),
            ("SLURM_JOB_NODELIST", "n[1-2]"),
            ("SLURM_TASKS_PER_NODE", "4(x2)"),
        ]),
        &["srun"],
    );
    let p = plan(&["img.sif", "hello"], &choice(GENERIC), &h);
    assert_eq!(p.launcher.kind, LauncherKind::Slurm);
    assert!(p.launcher.reason.contains("SLURM_JOB_ID=42"));
    assert_eq!(
        p.launcher.commands[0].argv,
        [
            "srun",
            "--mpi=pmi2",
            "-n",
            "8",
            "--kill-on-bad-exit=1",
            "/opt/cmpirun/bin/cmpirun",
            "__rank",
            "--plan",
            "{plan}"
        ]
    );
    assert_eq!(p.layout.process_mapping, "(vector,(0,2,4))");
    assert_eq!(p.layout.nodes[1].name, "n2");
    assert_eq!(check(&p, "launcher-program")[0].verdict, Verdict::Pass);
    // No PMI variables of cmpirun's own under srun.
    assert!(env_of(&p, "PMI_FD").is_none());

    let p = plan(
        &[
            "-n", "6", "-ppn", "3", "--map-by", "node", "img.sif", "hello",
        ],
        &choice(GENERIC),
        &h,
    );
    let argv = &p.launcher.commands[0].argv;
    assert!(argv.contains(&"--ntasks-per-node=3".to_owned()));
    assert!(argv.contains(&"--distribution=cyclic".to_owned()));
    assert_eq!(p.layout.node_of_rank(), [0, 1, 0, 1, 0, 1]);
    assert_eq!(p.layout.process_mapping, "(vector,(0,2,1))");

    // srun missing: a failed check, not a crash.
    let h2 = host(&[("SLURM_JOB_ID", "1"), ("SLURM_JOB_NODELIST", "a")]);
    let p = plan(&["img.sif", "x"], &choice(GENERIC), &h2);
    assert_eq!(check(&p, "launcher-program")[0].verdict, Verdict::Fail);
    assert!(!p.may_launch());
}

#[test]
fn slurm_errors() {
    let c = choice(GENERIC);
    let e = plan_err(&["--launcher", "slurm", "img.sif", "x"], &c, &host(&[]));
    assert_eq!(e, PlanError::NoAllocation);
    let h = host(&[("SLURM_JOB_ID", "1"), ("SLURM_JOB_NODELIST", "n[1-")]);
    assert!(
        plan_err(&["img.sif", "x"], &c, &h)
            .to_string()
            .contains("SLURM_JOB_NODELIST")
    );
    let h = host(&[
        ("SLURM_JOB_ID", "1"),
        ("SLURM_JOB_NODELIST", "n1"),
        ("SLURM_TASKS_PER_NODE", "x"),
    ]);
    assert!(
        plan_err(&["img.sif", "x"], &c, &h)
            .to_string()
            .contains("SLURM_TASKS_PER_NODE")
    );
}

#[test]
fn hydra_with_hosts_and_mpiexec() {
    let h = with_programs(host(&[]), &["mpiexec.hydra"]);
    let p = plan(&["-H", "a:2,b:2", "img.sif", "hello"], &choice(GENERIC), &h);
    assert_eq!(p.launcher.kind, LauncherKind::Hydra);
    assert_eq!(
        p.launcher.commands[0].argv,
        [
            "mpiexec.hydra",
            "-hosts",
            "a:2,b:2",
            "-n",
            "4",
            "/opt/cmpirun/bin/cmpirun",
            "__rank",
            "--plan",
            "{plan}"
        ]
    );
    assert_eq!(p.layout.process_mapping, "(vector,(0,2,2))");
    // A host named twice is one node with the slots added up (Open MPI's and hydra's reading).
    let p = plan(
        &["-H", "a,a,b", "-n", "3", "img.sif", "hello"],
        &choice(GENERIC),
        &h,
    );
    assert_eq!(p.layout.nodes.len(), 2);
    assert_eq!(p.layout.node_of_rank(), [0, 0, 1]);
    assert_eq!(p.launcher.commands[0].argv[2], "a:2,b:1");
    let mut s = spec(&["-n", "3", "-ppn", "1", "-rr", "img.sif", "hello"]);
    s.hosts = spec(&["-H", "a,b,c", "i", "p"]).hosts;
    s.hostfile = Some("/tmp/hosts".into());
    let p = cmpirun::plan::build(&s, &choice(GENERIC), &images(&s), &h).unwrap();
    let argv = &p.launcher.commands[0].argv;
    assert_eq!(
        &argv[..7],
        [
            "mpiexec.hydra",
            "-hosts",
            "a:1,b:1,c:1",
            "-n",
            "3",
            "-ppn",
            "1"
        ]
    );
    assert!(!argv.contains(&"-rr".to_owned()), "{argv:?}");
    // Round-robin without -ppn is hydra's -ppn 1 (hydra 4 has no -rr).
    let rr = plan(
        &["-H", "a:2,b:2", "-rr", "img.sif", "hello"],
        &choice(GENERIC),
        &h,
    );
    assert_eq!(
        &rr.launcher.commands[0].argv[..7],
        ["mpiexec.hydra", "-hosts", "a:2,b:2", "-n", "4", "-ppn", "1"]
    );
    assert_eq!(rr.layout.node_of_rank(), [0, 1, 0, 1]);
    assert_eq!(p.layout.nodes.len(), 3);
    assert_eq!(
        plan_err(
            &["--launcher", "hydra", "img.sif", "x"],
            &choice(GENERIC),
            &h
        ),
        PlanError::HydraWithoutHosts
    );
}

#[test]
fn hosts_without_hydra() {
    let c = choice(GENERIC);
    // Only this host: local, with the given slots.
    let p = plan(&["-H", "localhost:3", "img.sif", "x"], &c, &host(&[]));
    assert_eq!(p.launcher.kind, LauncherKind::Local);
    assert_eq!(p.layout.size, 3);
    let p = plan(&["-H", "node1.cluster:2", "img.sif", "x"], &c, &host(&[]));
    assert_eq!(p.launcher.kind, LauncherKind::Local);
    // Another host: an error that says what to do.
    let e = plan_err(&["-H", "node1,node2", "img.sif", "x"], &c, &host(&[]));
    assert!(matches!(e, PlanError::RemoteHostsNeedLauncher { ref host, .. } if host == "node2"));
    assert!(e.to_string().contains("mpiexec.hydra"));
}

#[test]
fn launcher_precedence_flag_profile_environment() {
    let h = with_programs(
        host(&[("SLURM_JOB_ID", "1"), ("SLURM_JOB_NODELIST", "a")]),
        &["srun", "mpiexec.hydra"],
    );
    let p = plan(
        &["--launcher", "local", "img.sif", "x"],
        &choice(GENERIC),
        &h,
    );
    assert_eq!(p.launcher.kind, LauncherKind::Local);
    assert_eq!(p.launcher.reason, "--launcher local");
    let c = choice("name: pinned\nlauncher:\n  kind: local\n");
    let p = plan(&["img.sif", "x"], &c, &h);
    assert_eq!(p.launcher.kind, LauncherKind::Local);
    assert!(p.launcher.reason.contains("profile pinned"));
}

#[test]
fn pmi_choice_and_pmix() {
    let c = choice(GENERIC);
    // The local launcher serves PMIx (through the host's libpmix); hydra does not.
    let p = plan(&["--pmi", "pmix", "img.sif", "x"], &c, &host(&[]));
    assert_eq!(p.launcher.pmi, PmiKind::Pmix);
    assert!(!p.launcher.pmix_libraries.is_empty());
    let e = plan_err(
        &[
            "--launcher",
            "hydra",
            "-H",
            "a",
            "--pmi",
            "pmix",
            "img.sif",
            "x",
        ],
        &c,
        &host(&[]),
    );
    assert!(matches!(
        e,
        PlanError::PmiUnsupported {
            launcher: "hydra",
            ..
        }
    ));
    let p = plan(&["--pmi", "pmi1", "img.sif", "x"], &c, &host(&[]));
    assert_eq!(p.launcher.pmi, PmiKind::Pmi1);

    let h = with_programs(
        host(&[
            ("SLURM_JOB_ID", "7"),
            ("SLURM_JOB_NODELIST", "n1"),
            ("SLURM_TASKS_PER_NODE", "2"),
            ("PMIX_RANK", "0"),
        ]),
        &["srun"],
    );
    let p = plan(&["img.sif", "x"], &shipped("slurm-pmix"), &h);
    assert_eq!(p.launcher.pmi, PmiKind::Pmix);
    assert_eq!(p.launcher.commands[0].argv[1], "--mpi=pmix");
    let pmix: Vec<_> = p
        .binds
        .iter()
        .filter(|b| b.when == BindTime::RankStart)
        .collect();
    assert_eq!(pmix.len(), 2);
    assert_eq!(pmix[0].source, "$PMIX_SERVER_TMPDIR");
    assert!(matches!(
        env_of(&p, "PMIX_MCA_ptl"),
        Some(EnvAction::FromLauncher { .. })
    ));
    assert!(p.env.iter().any(|e| e.name == "PMIX_MCA_gds"
        && e.action
            == EnvAction::Set {
                value: "hash".into()
            }));
    // Stray PMIx variables of the caller are scrubbed before srun.
    assert_eq!(env_of(&p, "PMIX_*"), Some(&EnvAction::UnsetMatching));
    // /run/munge is optional: skipped when missing, bound when present.
    assert_eq!(check(&p, "bind-source")[0].verdict, Verdict::Skipped);
    let h = with_paths(h, &[("/run/munge", &["/run/munge"])]);
    let p = plan(&["img.sif", "x"], &shipped("slurm-pmix"), &h);
    assert!(
        p.binds
            .iter()
            .any(|b| b.source == "/run/munge" && b.read_only)
    );
}

#[test]
fn mpmd_parts() {
    let c = choice(GENERIC);
    let p = plan(
        &[
            "-n", "2", "-env", "A", "1", "a.sif", "p1", ":", "-n", "3", "-wdir", "/w", "b.sif",
            "p2", "x",
        ],
        &c,
        &host(&[]),
    );
    assert_eq!(p.apps.len(), 2);
    assert_eq!((p.apps[0].first_rank, p.apps[0].ranks), (0, 2));
    assert_eq!((p.apps[1].first_rank, p.apps[1].ranks), (2, 3));
    assert_eq!(p.apps[1].image.path, Path::new("b.sif"));
    assert_eq!(p.apps[1].wdir.as_deref(), Some(Path::new("/w")));
    assert_eq!(p.layout.size, 5);
    let a = p.env.iter().find(|e| e.name == "A").unwrap();
    assert_eq!(a.scope, EnvScope::Part(0));
    assert_eq!(
        plan_err(
            &["-n", "1", "a.sif", "p", ":", "b.sif", "q"],
            &c,
            &host(&[])
        ),
        PlanError::MpmdCountMissing { part: 2 }
    );
}

#[test]
fn environment_changes_carry_reasons() {
    let h = host(&[("PMI_RANK", "3"), ("HOME", "/h")]);
    let p = plan(
        &[
            "-genvnone",
            "-x",
            "A=1",
            "-x",
            "HOME",
            "--mca",
            "btl",
            "self",
            "img.sif",
            "x",
        ],
        &choice("name: e\nenv:\n  set:\n    SITE: yes\n  pass: [\"LM_*\"]\n  unset: [DISPLAY]\n"),
        &h,
    );
    assert_eq!(p.env[0].action, EnvAction::ClearInherited);
    assert_eq!(env_of(&p, "PMI_*"), Some(&EnvAction::UnsetMatching));
    assert_eq!(
        env_of(&p, "SITE"),
        Some(&EnvAction::Set {
            value: "yes".into()
        })
    );
    assert_eq!(env_of(&p, "LM_*"), Some(&EnvAction::PassMatching));
    assert_eq!(env_of(&p, "DISPLAY"), Some(&EnvAction::Unset));
    assert_eq!(env_of(&p, "A"), Some(&EnvAction::Set { value: "1".into() }));
    assert_eq!(env_of(&p, "HOME"), Some(&EnvAction::Pass));
    assert_eq!(
        env_of(&p, "OMPI_MCA_btl"),
        Some(&EnvAction::Set {
            value: "self".into()
        })
    );
    assert!(p.env.iter().all(|e| !e.reason.is_empty()));
    // The command line comes after the profile, so it wins where both set a variable.
    let site = p.env.iter().position(|e| e.name == "SITE").unwrap();
    let a = p.env.iter().position(|e| e.name == "A").unwrap();
    assert!(site < a);
}

#[test]
fn slingshot_injection_without_image_facts() {
    let h = with_paths(
        with_programs(
            host(&[
                ("SLURM_JOB_ID", "1"),
                ("SLURM_JOB_NODELIST", "nid[001-002]"),
                ("SLURM_TASKS_PER_NODE", "2(x2)"),
            ]),
            &["srun"],
        ),
        &[
            (
                "/opt/cray/libfabric/*/lib64/libfabric.so.1",
                &[
                    "/opt/cray/libfabric/1.9.0/lib64/libfabric.so.1",
                    "/opt/cray/libfabric/1.22.0/lib64/libfabric.so.1",
                ],
            ),
            ("/dev/cxi*", &["/dev/cxi0", "/dev/cxi1"]),
            ("/usr/lib64/libcxi.so.1", &["/usr/lib64/libcxi.so.1"]),
        ],
    );
    let p = plan(&["img.sif", "x"], &shipped("hpe-slingshot"), &h);
    assert_eq!(p.launcher.kind, LauncherKind::Slurm);
    let lib = p
        .binds
        .iter()
        .find(|b| b.source.ends_with("libfabric.so.1"))
        .unwrap();
    assert_eq!(
        lib.source, "/opt/cray/libfabric/1.22.0/lib64/libfabric.so.1",
        "highest version"
    );
    assert_eq!(lib.destination, "/.cmpirun/lib/libfabric.so.1");
    assert_eq!(lib.kind, BindKind::Library);
    let devices: Vec<_> = p
        .binds
        .iter()
        .filter(|b| b.kind == BindKind::Device)
        .map(|b| b.source.as_str())
        .collect();
    assert_eq!(devices, ["/dev/cxi0", "/dev/cxi1"]);
    assert!(
        p.binds
            .iter()
            .any(|b| b.destination == "/.cmpirun/lib/libcxi.so.1")
    );
    assert_eq!(check(&p, "host-libfabric")[0].verdict, Verdict::Pass);
    assert_eq!(check(&p, "libfabric-target")[0].verdict, Verdict::Warn);
    // xpmem and libxpmem are missing: warnings that name them.
    assert!(
        check(&p, "fabric-device")
            .iter()
            .any(|c| c.verdict == Verdict::Warn && c.message.contains("/dev/xpmem"))
    );
    assert!(
        check(&p, "fabric-library")
            .iter()
            .any(|c| c.message.contains("libxpmem"))
    );
    assert_eq!(
        env_of(&p, "FI_PROVIDER"),
        Some(&EnvAction::Set {
            value: "cxi".into()
        })
    );
    assert_eq!(env_of(&p, "SLINGSHOT_*"), Some(&EnvAction::PassMatching));
    assert_eq!(
        env_of(&p, "LD_LIBRARY_PATH"),
        Some(&EnvAction::Prepend {
            value: "/.cmpirun/lib".into()
        })
    );
    assert_eq!(check(&p, "fabric-providers")[0].verdict, Verdict::Skipped);
    assert!(p.may_launch());
}

#[test]
fn injection_over_the_exact_file_with_image_facts() {
    let c = choice(
        "name: f\nfabric:\n  libfabric: [/host/libfabric.so.1]\n  provider_dir: /host/prov\n",
    );
    let h = with_paths(
        host(&[]),
        &[
            ("/host/libfabric.so.1", &["/host/libfabric.so.1"]),
            ("/host/prov", &["/host/prov"]),
        ],
    );
    let s = spec(&["-n", "2", "img.sif", "x"]);
    let imgs = vec![ImageSummary {
        path: "img.sif".into(),
        kind: Some("sif".into()),
        libfabric: Some("/opt/mpich/lib/libfabric.so.1".into()),
        ..ImageSummary::default()
    }];
    let p = cmpirun::plan::build(&s, &c, &imgs, &h).unwrap();
    let lib = p
        .binds
        .iter()
        .find(|b| b.kind == BindKind::Library)
        .unwrap();
    assert_eq!(
        (lib.source.as_str(), lib.destination.as_str()),
        ("/host/libfabric.so.1", "/opt/mpich/lib/libfabric.so.1")
    );
    assert!(check(&p, "libfabric-target").is_empty());
    assert!(env_of(&p, "LD_LIBRARY_PATH").is_none());
    assert_eq!(
        env_of(&p, "FI_PROVIDER_PATH"),
        Some(&EnvAction::Set {
            value: "/host/prov".into()
        })
    );
}

#[test]
fn no_inject_and_missing_host_libfabric() {
    let c = shipped("hpe-slingshot");
    let h = with_programs(
        host(&[("SLURM_JOB_ID", "1"), ("SLURM_JOB_NODELIST", "n1")]),
        &["srun"],
    );
    let p = plan(&["img.sif", "x"], &c, &h);
    let f = check(&p, "host-libfabric")[0];
    assert_eq!(f.verdict, Verdict::Fail);
    assert!(
        f.message
            .contains("/opt/cray/libfabric/*/lib64/libfabric.so.1")
            && f.message.contains("--no-inject")
    );
    assert!(!p.may_launch());
    let p = plan(&["--force", "img.sif", "x"], &c, &h);
    assert!(p.may_launch());
    let p = plan(&["--no-inject", "img.sif", "x"], &c, &h);
    assert_eq!(check(&p, "host-libfabric")[0].verdict, Verdict::Skipped);
    assert!(
        p.binds
            .iter()
            .all(|b| b.kind != BindKind::Library && b.kind != BindKind::Device)
    );
    assert!(p.may_launch());
}

#[test]
fn provider_expectations_against_probed_host_libfabric() {
    let c = choice("name: f\nfabric:\n  libfabric: [/l.so]\n  providers: [cxi]\n");
    let mut h = with_paths(host(&[]), &[("/l.so", &["/l.so"])]);
    h.libfabric = Some(HostLibfabric {
        path: "/l.so".into(),
        version: Some("1.22".into()),
        providers: Some(vec!["tcp".into()]),
        ..HostLibfabric::default()
    });
    let p = plan(&["--expect-provider", "tcp", "img.sif", "x"], &c, &h);
    let v: Vec<_> = check(&p, "fabric-providers")
        .iter()
        .map(|c| c.verdict)
        .collect();
    assert_eq!(v, [Verdict::Fail, Verdict::Pass]);
    assert!(
        check(&p, "fabric-providers")[0]
            .message
            .contains("does not offer provider cxi")
    );
}

#[test]
fn binds_from_flags_and_profile() {
    let c = choice(
        "name: b\nbinds:\n  - source: /scratch\n  - source: /opt/tools\n    destination: /tools\n    read_only: true\n  - source: /gone\n    optional: true\n",
    );
    let h = with_paths(
        host(&[]),
        &[
            ("/scratch", &["/scratch"]),
            ("/opt/tools", &["/opt/tools"]),
            ("/data", &["/data"]),
        ],
    );
    let p = plan(
        &["--bind", "/data:/d:ro", "--bind", "/nope", "img.sif", "x"],
        &c,
        &h,
    );
    let b: Vec<_> = p
        .binds
        .iter()
        .map(|b| (b.source.as_str(), b.destination.as_str(), b.read_only))
        .collect();
    assert_eq!(
        b,
        [
            ("/data", "/d", true),
            ("/scratch", "/scratch", false),
            ("/opt/tools", "/tools", true)
        ]
    );
    let v: Vec<_> = check(&p, "bind-source")
        .iter()
        .map(|c| (c.verdict, c.message.clone()))
        .collect();
    assert_eq!(v[0].0, Verdict::Fail);
    assert!(v[0].1.contains("--bind /nope"));
    assert_eq!(v[1].0, Verdict::Skipped);
    // A required profile bind that is missing fails and names the profile file.
    let c = choice("name: b\nbinds:\n  - source: /gone\n");
    let p = plan(&["img.sif", "x"], &c, &host(&[]));
    let f = check(&p, "bind-source")[0];
    assert_eq!(f.verdict, Verdict::Fail);
    assert!(f.message.contains("/site/test.yaml"));
}

#[test]
fn named_profile_that_does_not_match_fails_its_check() {
    let mut c = choice("name: m\nmatch:\n  hostnames: [\"nid*\"]\n");
    c.outcome = Some(profile::evaluate(
        c.profile.match_rules.as_ref().unwrap(),
        &profile::MatchContext {
            hostname: "laptop".into(),
            ..Default::default()
        },
    ));
    let p = plan(&["img.sif", "x"], &c, &host(&[]));
    let m = check(&p, "profile-match")[0];
    assert_eq!(m.verdict, Verdict::Fail);
    assert!(m.message.starts_with("/site/test.yaml:2:"), "{}", m.message);
    assert!(m.message.contains("\"laptop\" matches none of [\"nid*\"]"));
}

#[test]
fn image_problems_are_checks() {
    let s = spec(&["img.sif", "x"]);
    let imgs = vec![ImageSummary {
        path: "img.sif".into(),
        error: Some("img.sif: no such file".into()),
        ..ImageSummary::default()
    }];
    let p = cmpirun::plan::build(&s, &choice(GENERIC), &imgs, &host(&[])).unwrap();
    assert_eq!(check(&p, "image")[0].verdict, Verdict::Fail);
    assert!(dry_run_text(&p).contains("FAIL    image: img.sif: no such file"));
}

#[test]
fn mount_backend_precedence() {
    let c = choice("name: m\nmount: extract\n");
    let p = plan(&["img.sif", "x"], &c, &host(&[]));
    assert_eq!(p.mount.backend, MountBackendKind::Extract);
    let p = plan(
        &["--image-mount", "fuse", "--shm", "1g", "img.sif", "x"],
        &c,
        &host(&[]),
    );
    assert_eq!(p.mount.backend, MountBackendKind::Fuse);
    assert_eq!(p.mount.shm_size.as_deref(), Some("1g"));
}

#[test]
fn library_cache_precedence_environment_profile_default() {
    let cache = |p: &LaunchPlan| {
        p.mount
            .library_cache
            .clone()
            .map(|d| d.display().to_string())
    };
    let home = [("HOME", "/home/u"), ("USER", "u")];
    // The default: the user's cache folder.
    let plain = choice("name: m\n");
    let p = plan(&["img.sif", "x"], &plain, &host(&home));
    assert_eq!(
        cache(&p).as_deref(),
        Some("/home/u/.cache/cmpirun/libraries")
    );
    let p = plan(
        &["img.sif", "x"],
        &plain,
        &host(&[("XDG_CACHE_HOME", "/xdg"), ("HOME", "/home/u")]),
    );
    assert_eq!(cache(&p).as_deref(), Some("/xdg/cmpirun/libraries"));
    // The site's node-local folder, with the user's name in it.
    let site = choice("name: site\nlibrary_cache: /local/$USER/cmpirun\n");
    let p = plan(&["img.sif", "x"], &site, &host(&home));
    assert_eq!(cache(&p).as_deref(), Some("/local/u/cmpirun"));
    assert!(
        p.mount.library_cache_reason.contains("profile site"),
        "{p:?}"
    );
    // The user's setting wins over the site's.
    let mut h = host(&home);
    h.env.insert("CMPIRUN_LIBRARY_CACHE".into(), "/mine".into());
    assert_eq!(
        cache(&plan(&["img.sif", "x"], &site, &h)).as_deref(),
        Some("/mine")
    );
    h.env.insert("CMPIRUN_LIBRARY_CACHE".into(), "off".into());
    assert_eq!(cache(&plan(&["img.sif", "x"], &site, &h)), None);
    // A variable the site's path names but that is unset: the default, with a warning.
    let p = plan(&["img.sif", "x"], &site, &host(&[("HOME", "/home/u")]));
    assert_eq!(
        cache(&p).as_deref(),
        Some("/home/u/.cache/cmpirun/libraries")
    );
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("library_cache /local/$USER/cmpirun")),
        "{:?}",
        p.warnings
    );
    // Off by the site, and off for an extracted image whatever the settings.
    let off = choice("name: off\nlibrary_cache: off\n");
    let p = plan(&["img.sif", "x"], &off, &host(&home));
    assert_eq!(cache(&p), None);
    assert!(p.mount.library_cache_reason.contains("library_cache: off"));
    let p = plan(
        &["--image-mount", "extract", "img.sif", "x"],
        &site,
        &host(&home),
    );
    assert_eq!(cache(&p), None);
    // A relative path is refused where the profile is read.
    let e = profile::parse_text(
        Path::new("/site/bad.yaml"),
        "name: bad\nlibrary_cache: cache\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("/site/bad.yaml") && e.contains("library_cache") && e.contains("off"),
        "{e}"
    );
}

/// An image whose MPICH loads libfabric dynamically and needs FABRIC_1.9, with glibc 2.36.
fn mpich5_image() -> ImageSummary {
    ImageSummary {
        path: "mpich5.sif".into(),
        kind: Some("sif".into()),
        mpi_family: Some("mpich".into()),
        mpi_library: Some("/opt/mpich5/lib/libmpi.so.12.5.0".into()),
        libfabric_use: Some(LibfabricUse::Dynamic),
        libfabric: Some("/opt/mpich5/lib/libfabric.so.1.29.0".into()),
        fabric_needs: vec!["FABRIC_1.0".into(), "FABRIC_1.9".into()],
        glibc: Some("GLIBC_2.36".into()),
        glibc_file: Some("/usr/lib/x86_64-linux-gnu/libc.so.6".into()),
        ..ImageSummary::default()
    }
}

fn host_lib(versions: &[&str], glibc: &str) -> HostFacts {
    let mut h = with_paths(
        host(&[]),
        &[("/host/libfabric.so.1", &["/host/libfabric.so.1"])],
    );
    h.libfabric = Some(HostLibfabric {
        path: "/host/libfabric.so.1".into(),
        real_path: "/host/libfabric.so.1.25.0".into(),
        fabric_versions: versions.iter().map(|v| v.to_string()).collect(),
        plugin_dirs: vec!["/host/libfabric".into()],
        dependencies: vec!["/host/deps/libnl-3.so.200".into()],
        glibc_needs: Some(glibc.into()),
        glibc_needed_by: Some("/host/deps/libnl-3.so.200".into()),
        ..HostLibfabric::default()
    });
    h
}

const HOSTLIB: &str = "name: h\nfabric:\n  libfabric: [/host/libfabric.so.1]\n";

#[test]
fn compatible_host_libfabric_is_bound_over_the_image_copy_with_its_closure() {
    let s = spec(&["-n", "2", "mpich5.sif", "x"]);
    let h = host_lib(&["FABRIC_1.0", "FABRIC_1.9", "FABRIC_2.0"], "GLIBC_2.34");
    let p = cmpirun::plan::build(&s, &choice(HOSTLIB), &[mpich5_image()], &h).unwrap();
    for name in ["mpi-libfabric", "fabric-versions", "glibc", "mpi-family"] {
        assert_eq!(
            check(&p, name)[0].verdict,
            Verdict::Pass,
            "{name}: {:?}",
            check(&p, name)
        );
    }
    let over = p
        .binds
        .iter()
        .find(|b| b.source == "/host/libfabric.so.1")
        .unwrap();
    assert_eq!(over.destination, "/opt/mpich5/lib/libfabric.so.1.29.0");
    assert!(
        p.binds
            .iter()
            .any(|b| b.destination == "/.cmpirun/lib/libnl-3.so.200")
    );
    assert!(
        p.binds
            .iter()
            .any(|b| b.source == "/host/libfabric" && b.kind == BindKind::Directory)
    );
    assert_eq!(
        env_of(&p, "FI_PROVIDER_PATH"),
        Some(&EnvAction::Set {
            value: "/host/libfabric".into()
        })
    );
    assert!(p.may_launch());
}

#[test]
fn old_host_libfabric_is_refused_naming_the_fabric_version() {
    let s = spec(&["-n", "2", "mpich5.sif", "x"]);
    let h = host_lib(&["FABRIC_1.0", "FABRIC_1.6"], "GLIBC_2.34");
    let p = cmpirun::plan::build(&s, &choice(HOSTLIB), &[mpich5_image()], &h).unwrap();
    let f = check(&p, "fabric-versions")[0];
    assert_eq!(f.verdict, Verdict::Fail);
    assert!(f.message.contains("lacks FABRIC_1.9"), "{}", f.message);
    assert!(f.message.contains("up to FABRIC_1.6") && f.message.contains("--no-inject"));
    assert!(!p.may_launch());
    let s = spec(&["--force", "-n", "2", "mpich5.sif", "x"]);
    assert!(
        cmpirun::plan::build(&s, &choice(HOSTLIB), &[mpich5_image()], &h)
            .unwrap()
            .may_launch()
    );
}

#[test]
fn host_library_needing_a_newer_glibc_is_refused_naming_both_versions() {
    let s = spec(&["mpich5.sif", "x"]);
    let h = host_lib(&["FABRIC_1.9"], "GLIBC_2.38");
    let p = cmpirun::plan::build(&s, &choice(HOSTLIB), &[mpich5_image()], &h).unwrap();
    let g = check(&p, "glibc")[0];
    assert_eq!(g.verdict, Verdict::Fail);
    assert!(
        g.message.contains("needs GLIBC_2.38") && g.message.contains("has GLIBC_2.36"),
        "{}",
        g.message
    );
    assert!(g.message.contains("/host/deps/libnl-3.so.200"));
}

#[test]
fn embedded_libfabric_and_open_mpi_checks() {
    let mut img = mpich5_image();
    img.libfabric_use = Some(LibfabricUse::Embedded);
    img.libfabric = None;
    let s = spec(&["mpich5.sif", "x"]);
    let h = host_lib(&["FABRIC_1.9"], "GLIBC_2.34");
    let p = cmpirun::plan::build(&s, &choice(HOSTLIB), &[img], &h).unwrap();
    let e = check(&p, "mpi-libfabric")[0];
    assert_eq!(e.verdict, Verdict::Fail);
    assert!(e.message.contains("carries libfabric inside itself"));
    // Open MPI where only PMI-1/PMI-2 is served: its ranks would be singletons.
    let mut ompi = mpich5_image();
    ompi.mpi_family = Some("openmpi".into());
    let pmi2 = spec(&["--pmi", "pmi2", "mpich5.sif", "x"]);
    let p = cmpirun::plan::build(&pmi2, &choice(GENERIC), &[ompi], &host(&[])).unwrap();
    assert_eq!(check(&p, "mpi-family")[0].verdict, Verdict::Fail);
}

#[test]
fn open_mpi_locally_gets_pmix_and_the_versions_are_checked() {
    let mut ompi = mpich5_image();
    ompi.mpi_family = Some("openmpi".into());
    ompi.pmix_version = Some("5.0.11rc1".into());
    let s = spec(&["ompi.sif", "x"]);
    let mut h = host(&[]);
    h.pmix = Some(cmpirun::facts::HostPmix {
        path: "/usr/lib/libpmix.so.2".into(),
        version: Some("4.2.2rc2".into()),
    });
    let p = cmpirun::plan::build(&s, &choice(GENERIC), std::slice::from_ref(&ompi), &h).unwrap();
    assert_eq!(p.launcher.pmi, PmiKind::Pmix);
    assert!(
        p.launcher.pmi_reason.contains("Open MPI"),
        "{}",
        p.launcher.pmi_reason
    );
    assert_eq!(check(&p, "mpi-family")[0].verdict, Verdict::Pass);
    let c = check(&p, "pmix-server")[0];
    assert_eq!(c.verdict, Verdict::Pass, "{}", c.message);
    assert!(c.message.contains("4.2.2rc2") && c.message.contains("5.0.11rc1"));
    // A host PMIx too old for the image's client: refused, naming both versions.
    h.pmix.as_mut().unwrap().version = Some("3.1.6".into());
    let p = cmpirun::plan::build(&s, &choice(GENERIC), &[ompi], &h).unwrap();
    let c = check(&p, "pmix-server")[0];
    assert_eq!(c.verdict, Verdict::Fail);
    assert!(
        c.message.contains("3.1.6") && c.message.contains("5.0.11rc1"),
        "{}",
        c.message
    );
    assert!(!p.may_launch());
}

#[test]
fn host_pmi_libraries_over_the_image_copies() {
    let c = choice(
        "name: p\npmi:\n  inject: true\n  host_libraries:\n    - /usr/lib/x86_64-linux-gnu/libpmi2.so.0\n    - /usr/lib/x86_64-linux-gnu/libpmix.so.2\n",
    );
    let h = with_paths(
        host(&[]),
        &[
            (
                "/usr/lib/x86_64-linux-gnu/libpmi2.so.0",
                &["/usr/lib/x86_64-linux-gnu/libpmi2.so.0"],
            ),
            (
                "/usr/lib/x86_64-linux-gnu/libpmix.so.2",
                &["/usr/lib/x86_64-linux-gnu/libpmix.so.2"],
            ),
        ],
    );
    let mut img = mpich5_image();
    img.pmi_libraries = vec![ImageLibrary {
        name: "libpmi2.so.0".into(),
        real_file: "/usr/lib/x86_64-linux-gnu/libpmi2.so.0.0.0".into(),
    }];
    let s = spec(&["mpich5.sif", "x"]);
    let p = cmpirun::plan::build(&s, &c, &[img], &h).unwrap();
    let dests: Vec<(&str, &str)> = p
        .binds
        .iter()
        .map(|b| (b.source.as_str(), b.destination.as_str()))
        .collect();
    assert_eq!(
        dests,
        [
            (
                "/usr/lib/x86_64-linux-gnu/libpmi2.so.0",
                "/usr/lib/x86_64-linux-gnu/libpmi2.so.0.0.0"
            ),
            (
                "/usr/lib/x86_64-linux-gnu/libpmix.so.2",
                "/.cmpirun/lib/libpmix.so.2"
            ),
        ]
    );
    // The injection directory is on LD_LIBRARY_PATH because something went into it.
    assert_eq!(
        env_of(&p, "LD_LIBRARY_PATH"),
        Some(&EnvAction::Prepend {
            value: "/.cmpirun/lib".into()
        })
    );
    // --no-inject keeps the image's.
    let s = spec(&["--no-inject", "mpich5.sif", "x"]);
    let p = cmpirun::plan::build(&s, &c, &[mpich5_image()], &h).unwrap();
    assert!(p.binds.is_empty());
    assert_eq!(check(&p, "pmi-inject")[0].verdict, Verdict::Skipped);
}

#[test]
fn too_many_ranks_is_an_error_not_an_allocation() {
    let e = plan_err(
        &[
            "-n", "4000000", "a.sif", "p", ":", "-n", "4000000", "b.sif", "q",
        ],
        &choice(GENERIC),
        &host(&[]),
    );
    assert_eq!(e, PlanError::TooManyRanks { ranks: 8_000_000 });
    // Slot counts that overflow when added up are capped, not a crash.
    let mut s = spec(&["a.sif", "p"]);
    s.hosts = spec(&["-H", "localhost:4294967295,localhost:4294967295", "a", "p"]).hosts;
    let p = cmpirun::plan::build(&s, &choice(GENERIC), &images(&s), &host(&[])).unwrap();
    assert_eq!(p.layout.size, cmpirun::jobspec::MAX_RANKS);
}

#[test]
fn a_host_named_twice_with_huge_slot_counts_saturates() {
    // Found while fuzzing hostfiles (fuzz/fuzz_targets/hostfile.rs): the merged slots of a host
    // named twice overflowed (a panic in a debug build, a host of 0 slots in a release build).
    let h = with_programs(host(&[]), &["mpiexec.hydra"]);
    let p = plan(
        &["-H", "a:4294967295,a:1", "-n", "2", "img.sif", "hello"],
        &choice(GENERIC),
        &h,
    );
    assert_eq!(p.launcher.commands[0].argv[2], "a:4294967295");
    assert_eq!(p.layout.node_of_rank(), [0, 0]);
}

/// The plan as every task of a job of `n_nodes` × `ppn` ranks gets it (`CMPIRUN_PLAN`), built
/// from `args` with `-H` naming the nodes (hydra) or from a Slurm allocation of them.
fn kind(slurm: bool) -> LauncherKind {
    if slurm {
        LauncherKind::Slurm
    } else {
        LauncherKind::Hydra
    }
}

fn large_plan(args: &[&str], n_nodes: u32, ppn: u32, slurm: bool) -> (LaunchPlan, String) {
    let hosts: Vec<String> = (1..=n_nodes).map(|i| format!("nid{i:05}:{ppn}")).collect();
    let hosts = hosts.join(",");
    let nodelist = format!("nid[00001-{n_nodes:05}]");
    let tasks = format!("{ppn}(x{n_nodes})");
    let (h, mut all): (HostFacts, Vec<&str>) = if slurm {
        let env = [
            ("SLURM_JOB_ID", "77"),
            ("SLURM_JOB_NODELIST", nodelist.as_str()),
            ("SLURM_TASKS_PER_NODE", tasks.as_str()),
        ];
        (with_programs(host(&env), &["srun"]), vec![])
    } else {
        (
            with_programs(host(&[]), &["mpiexec.hydra"]),
            vec!["-H", hosts.as_str()],
        )
    };
    all.extend_from_slice(args);
    let p = plan(&all, &choice(GENERIC), &h);
    let encoded = cmpirun::launch::rank::encode_plan(&p).unwrap();
    (p, encoded)
}

#[test]
fn a_thousand_nodes_of_128_ranks_fit_one_environment_variable_and_every_rank_finds_its_place() {
    use cmpirun::launch::node::rank_view;
    use cmpirun::launch::rank::parse_plan;

    let mpmd = [
        "-n", "32000", "a.sif", "pa", ":", "-n", "64000", "b.sif", "pb", ":", "-n", "31999",
        "c.sif", "pc", ":", "-n", "1", "a.sif", "pd",
    ];
    let cases: [(&[&str], bool); 5] = [
        (&["-n", "128000", "img.sif", "hello"], false),
        (
            &["-n", "128000", "--map-by", "node", "img.sif", "hello"],
            false,
        ),
        (&["-n", "128000", "img.sif", "hello"], true),
        (&mpmd, false),
        (&mpmd, true),
    ];
    for (args, slurm) in cases {
        let (p, encoded) = large_plan(args, 1000, 128, slurm);
        assert_eq!(p.launcher.kind, kind(slurm));
        assert_eq!(p.layout.size, 128_000);
        assert_eq!(p.layout.nodes.len(), 1000);
        // Far under the 128 KiB of one environment string (MAX_ARG_STRLEN).
        let bytes = "CMPIRUN_PLAN=".len() + encoded.len() + 1;
        assert!(bytes < 16 * 1024, "{bytes} bytes for {args:?}");
        // What a task reads back is the plan, less what only the front end uses.
        let read = parse_plan("env:CMPIRUN_PLAN", &encoded).unwrap();
        assert_eq!(read.layout, p.layout);
        assert_eq!(read.apps, p.apps);
        assert_eq!(read.env, p.env);
        assert_eq!(read.binds, p.binds);
        assert!(read.launcher.commands.is_empty() && read.job.hosts.is_empty());
        // Each rank's view, computed by the task from the rule, is the full layout's. Every
        // rank of the first and last node, and a spread of the others.
        let places = p.layout.places();
        let by_node = p.layout.ranks_by_node();
        let mut ranks: Vec<u32> = (0..p.layout.size).step_by(61).collect();
        ranks.extend(by_node.first().unwrap());
        ranks.extend(by_node.last().unwrap());
        ranks.extend(p.apps.iter().map(|a| a.first_rank + a.ranks - 1));
        for rank in ranks {
            let v = rank_view(&read, rank).unwrap();
            let full = places[rank as usize];
            assert_eq!(
                (v.node, v.local_rank),
                (full.node, full.local_rank),
                "rank {rank}"
            );
            assert_eq!(v.node_name, format!("nid{:05}", full.node + 1));
            let part = p
                .apps
                .iter()
                .position(|a| (a.first_rank..a.first_rank + a.ranks).contains(&rank))
                .unwrap();
            assert_eq!((v.part, v.program), (part, p.apps[part].program.as_str()));
        }
        assert!(rank_view(&read, 128_000).is_none());
    }
}

#[test]
fn an_encoded_plan_of_another_format_or_damaged_is_refused_with_the_reason() {
    use cmpirun::launch::rank::parse_plan;
    use cmpirun::plan::encoding::PLAN_FORMAT;

    let (p, encoded) = large_plan(&["-n", "8", "img.sif", "hello"], 4, 2, false);
    assert!(encoded.starts_with(PLAN_FORMAT));
    assert_eq!(parse_plan("env:X", &encoded).unwrap().layout, p.layout);
    // Plain JSON (what --dry-run --json prints) is read as well.
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(parse_plan("plan.json", &json).unwrap(), p);
    let err = |text: &str| parse_plan("env:X", text).unwrap_err().to_string();
    let newer = encoded.replacen("cmpirun-plan-1:", "cmpirun-plan-2:", 1);
    assert!(
        err(&newer).contains("plan format 2 is not the one"),
        "{}",
        err(&newer)
    );
    assert!(err(&format!("{PLAN_FORMAT}@@@")).contains("not base64"));
    assert!(err(&format!("{PLAN_FORMAT}AAAA")).contains("not a deflated plan"));
    let cut = &encoded[..encoded.len() / 2];
    assert!(err(cut).contains("not a launch plan"), "{}", err(cut));
}
