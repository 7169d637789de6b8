//! `cmpirun --dry-run` through the real binary, for every shipped profile, as text and JSON:
//! launcher choice, command lines, layouts, MPMD, binds, environment and checks.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// Runs cmpirun with a clean launcher environment plus `env`.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cmpirun"));
    c.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("SLURM_") || k.starts_with("PMI") || k.starts_with("CMPIRUN_") {
            c.env_remove(k);
        }
    }
    // Only the shipped profiles, whatever the machine's /etc or the user's config holds.
    c.env(
        "CMPIRUN_PROFILE_DIRS",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles"),
    );
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run cmpirun")
}

fn text(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["--dry-run"];
    all.extend_from_slice(args);
    let out = run(&all, env);
    assert!(
        out.status.success(),
        "{all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str], env: &[(&str, &str)]) -> Value {
    let mut all = vec!["--dry-run", "--json"];
    all.extend_from_slice(args);
    let out = run(&all, env);
    assert!(
        out.status.success(),
        "{all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An unpacked directory image (enough for planning, which does not mount it).
fn image(dir: &Path) -> String {
    let img = dir.join("image");
    std::fs::create_dir_all(img.join("usr/bin")).unwrap();
    img.display().to_string()
}

/// The first command line of a JSON plan, its words joined by spaces.
fn argv_line(j: &Value) -> String {
    j["launcher"]["commands"][0]["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect::<Vec<_>>()
        .join(" ")
}

fn verdict(plan: &Value, name: &str) -> Vec<String> {
    plan["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == name)
        .map(|c| c["verdict"].as_str().unwrap().to_owned())
        .collect()
}

const SLURM: [(&str, &str); 3] = [
    ("SLURM_JOB_ID", "4242"),
    ("SLURM_JOB_NODELIST", "nid[001-002]"),
    ("SLURM_TASKS_PER_NODE", "2(x2)"),
];

#[test]
fn generic_profile_local_launch() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let out = text(&["-n", "4", &img, "/usr/bin/hello", "a b"], &[]);
    assert!(out.starts_with("profile: generic ("), "{out}");
    assert!(
        out.contains("launcher: local\n  why: no allocation and no host list: one node"),
        "{out}"
    );
    assert!(out.contains("pmi: pmi2"), "{out}");
    assert!(
        out.contains("part 1: ranks 0-3 (4): /usr/bin/hello 'a b' in "),
        "{out}"
    );
    assert!(
        out.contains("PMI_process_mapping: (vector,(0,1,4))"),
        "{out}"
    );
    assert!(out.contains("pass    image: "), "{out}");
    assert!(out.contains("result: ready to launch"), "{out}");
    let j = json(&["-n", "4", &img, "/usr/bin/hello"], &[]);
    assert_eq!(j["profile"]["name"], "generic");
    assert_eq!(j["launcher"]["kind"], "local");
    assert_eq!(j["layout"]["size"], 4);
    assert_eq!(j["apps"][0]["image"]["kind"], "directory");
    assert_eq!(j["job"]["apps"][0]["np"], 4);
    assert_eq!(verdict(&j, "profile-match"), ["pass"]);
}

#[test]
fn slurm_pmi2_profile() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    // Chosen automatically inside an allocation.
    let j = json(&[&img, "hello"], &SLURM);
    assert_eq!(j["profile"]["name"], "slurm-pmi2");
    assert_eq!(j["launcher"]["kind"], "slurm");
    let argv: Vec<&str> = j["launcher"]["commands"][0]["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        &argv[..5],
        ["srun", "--mpi=pmi2", "-n", "4", "--kill-on-bad-exit=1"]
    );
    assert_eq!(&argv[6..], ["__rank", "--plan", "{plan}"]);
    assert!(argv[5].ends_with("cmpirun"));
    assert_eq!(j["layout"]["process_mapping"], "(vector,(0,2,2))");
    assert_eq!(j["layout"]["nodes"][1]["name"], "nid002");
    let out = text(&["--profile", "slurm-pmi2", &img, "hello"], &SLURM);
    assert!(
        out.contains("command: srun --mpi=pmi2 -n 4 --kill-on-bad-exit=1 "),
        "{out}"
    );
    assert!(out.contains("node 1 nid002: ranks 2-3"), "{out}");
}

#[test]
fn slurm_pmix_profile() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let mut env = SLURM.to_vec();
    env.push(("SLURM_MPI_TYPE", "pmix_v4"));
    let j = json(&["-n", "3", &img, "hello"], &env);
    assert_eq!(j["profile"]["name"], "slurm-pmix");
    assert_eq!(j["launcher"]["pmi"], "pmix");
    assert_eq!(j["launcher"]["commands"][0]["argv"][1], "--mpi=pmix");
    let binds = j["binds"].as_array().unwrap();
    assert!(
        binds
            .iter()
            .any(|b| b["source"] == "$PMIX_SERVER_TMPDIR" && b["when"] == "rank-start")
    );
    let out = text(&["-n", "3", &img, "hello"], &env);
    assert!(
        out.contains(
            "$PMIX_SERVER_TMPDIR -> $PMIX_SERVER_TMPDIR [directory, resolved at rank start]"
        ),
        "{out}"
    );
    assert!(out.contains("PMIX_MCA_gds=hash"), "{out}");
    // PMIx under hydra is refused before anything runs (the local launcher serves it).
    let out = run(
        &[
            "--dry-run",
            "--launcher",
            "hydra",
            "-H",
            "a",
            "--pmi",
            "pmix",
            &img,
            "hello",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the hydra launcher cannot serve pmix"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hpe_slingshot_profile() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    // Off a Slingshot system its files are missing: the dry run says so, check by check.
    let j = json(&["--profile", "hpe-slingshot", &img, "hello"], &SLURM);
    assert_eq!(j["profile"]["name"], "hpe-slingshot");
    assert_eq!(j["launcher"]["kind"], "slurm");
    assert_eq!(verdict(&j, "profile-match"), ["fail"]);
    assert_eq!(verdict(&j, "host-libfabric"), ["fail"]);
    assert!(verdict(&j, "fabric-device").iter().all(|v| v == "warn"));
    let out = text(&["--profile", "hpe-slingshot", &img, "hello"], &SLURM);
    assert!(out.contains("FAIL    host-libfabric: no host libfabric at /opt/cray/libfabric/*/lib64/libfabric.so.1"), "{out}");
    assert!(out.contains("FI_PROVIDER=cxi"), "{out}");
    assert!(out.contains("SLINGSHOT_* passed through"), "{out}");
    assert!(out.contains("result: 2 check(s) failed"), "{out}");
    // With --no-inject only the match check fails.
    let j = json(
        &["--profile", "hpe-slingshot", "--no-inject", &img, "hello"],
        &SLURM,
    );
    assert_eq!(verdict(&j, "host-libfabric"), ["skipped"]);
}

#[test]
fn aws_efa_and_infiniband_profiles() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    for (name, provider) in [("aws-efa", "efa"), ("infiniband-verbs", "verbs")] {
        let j = json(&["--profile", name, "-n", "2", &img, "hello"], &[]);
        assert_eq!(j["profile"]["name"], name);
        assert_eq!(j["launcher"]["kind"], "local");
        let fi = j["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "FI_PROVIDER")
            .unwrap()
            .clone();
        assert_eq!(fi["value"], provider);
        let out = text(&["--profile", name, "-n", "2", &img, "hello"], &[]);
        // Skipped where the library is missing, probed where it exists (Debian's libfabric
        // is at the infiniband-verbs profile's path on Debian hosts).
        assert!(
            out.lines()
                .any(|l| l.contains("fabric-providers:") && l.contains(provider)),
            "{out}"
        );
    }
}

#[test]
fn ci_profile_injects_the_named_libfabric_copy() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let lib = t.path().join("host/lib/libfabric.so.1");
    std::fs::create_dir_all(lib.parent().unwrap()).unwrap();
    std::fs::write(&lib, b"").unwrap();
    let lib = lib.display().to_string();
    let j = json(
        &["--profile", "ci", "-n", "2", &img, "hello"],
        &[("CMPIRUN_CI_LIBFABRIC", &lib)],
    );
    assert_eq!(verdict(&j, "host-libfabric"), ["pass"]);
    let bind = j["binds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["kind"] == "library")
        .unwrap()
        .clone();
    assert_eq!(bind["source"], lib.as_str());
    let out = text(
        &["--profile", "ci", "-n", "2", &img, "hello"],
        &[("CMPIRUN_CI_LIBFABRIC", &lib)],
    );
    assert!(
        out.contains(&format!(
            "{lib} -> /.cmpirun/lib/libfabric.so.1 [library, ro]"
        )),
        "{out}"
    );
    // Without the variable the profile names nothing, and says so.
    let j = json(&["--profile", "ci", &img, "hello"], &[]);
    assert_eq!(verdict(&j, "host-libfabric"), ["fail"]);
}

#[test]
fn hydra_with_a_hostfile_naming_this_machine() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let me = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let hf = t.path().join("hosts");
    std::fs::write(&hf, format!("{me}:4\n")).unwrap();
    let hf = hf.display().to_string();
    let j = json(&["-f", &hf, "-n", "4", &img, "hello"], &[]);
    if which::which("mpiexec.hydra").is_ok() {
        assert_eq!(j["launcher"]["kind"], "hydra");
        let argv = &j["launcher"]["commands"][0]["argv"];
        assert_eq!(argv[0], "mpiexec.hydra");
        // hydra gets the hosts as cmpirun read them, whichever form the hostfile has.
        assert_eq!(argv[1], "-hosts");
        assert_eq!(argv[2], format!("{me}:4").as_str());
    } else {
        assert_eq!(j["launcher"]["kind"], "local");
    }
    // --launcher local overrides it.
    let j = json(&["--launcher", "local", "-f", &hf, &img, "hello"], &[]);
    assert_eq!(j["launcher"]["kind"], "local");
    assert_eq!(j["layout"]["size"], 4);
}

#[test]
fn a_thousand_nodes_of_128_ranks_give_every_task_a_plan_of_a_few_kib() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let env = [
        ("SLURM_JOB_ID", "9"),
        ("SLURM_JOB_NODELIST", "nid[0001-1000]"),
        ("SLURM_TASKS_PER_NODE", "128(x1000)"),
    ];
    for mapping in [&[][..], &["--map-by", "node"][..]] {
        let mut args = vec!["--launcher", "slurm", "-n", "128000"];
        args.extend_from_slice(mapping);
        args.extend([img.as_str(), "hello"]);
        let out = text(&args, &env);
        let bytes: usize = out
            .split("every task gets the plan in CMPIRUN_PLAN: ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{out}"));
        // Far under the 131072 bytes of one environment string.
        assert!(bytes < 16 * 1024, "{bytes}");
        assert!(
            out.contains("layout: 128000 rank(s) on 1000 node(s)"),
            "{out}"
        );
        assert!(out.contains("node 999 nid1000: ranks "), "{out}");
    }
}

#[test]
fn mpmd_and_cyclic_layout() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let out = text(
        &[
            "--map-by", "node", "-n", "2", &img, "a", ":", "-n", "2", &img, "b",
        ],
        &SLURM,
    );
    assert!(out.contains("part 1: ranks 0-1 (2): a in "), "{out}");
    assert!(out.contains("part 2: ranks 2-3 (2): b in "), "{out}");
    assert!(out.contains("--distribution=cyclic"), "{out}");
    assert!(out.contains("node 0 nid001: ranks 0,2"), "{out}");
    assert!(
        out.contains("PMI_process_mapping: (vector,(0,2,1))"),
        "{out}"
    );
}

#[test]
fn failing_checks_stop_a_launch_with_exit_2() {
    let out = run(&["-n", "1", "/nonexistent/image.sif", "hello"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not launching") && err.contains("/nonexistent/image.sif"),
        "{err}"
    );
}

#[test]
fn output_flags_reach_srun_and_hydra_or_warn_once() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let flags = [
        "-outfile-pattern",
        "/o/out.%r.%h",
        "-errfile-pattern",
        "/o/err.%r",
        "--timestamp-output",
        "-print-all-exitcodes",
    ];
    let argv = |j: &Value| -> Vec<String> {
        j["launcher"]["commands"][0]["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let mut args = flags.to_vec();
    args.extend([img.as_str(), "hello"]);
    let j = json(&args, &SLURM);
    let a = argv(&j);
    assert!(a.contains(&"--output=/o/out.%t.%N".to_owned()), "{a:?}");
    assert!(a.contains(&"--error=/o/err.%t".to_owned()), "{a:?}");
    let warnings: Vec<&str> = j["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    for flag in ["--timestamp-output", "-print-all-exitcodes"] {
        assert_eq!(
            warnings.iter().filter(|w| w.starts_with(flag)).count(),
            1,
            "{flag}: {warnings:?}"
        );
    }
    let mut args = vec!["--launcher", "hydra", "-H", "a,b", "-bootstrap", "ssh"];
    args.extend(flags);
    args.extend([img.as_str(), "hello"]);
    let j = json(&args, &[]);
    assert_eq!(j["launcher"]["kind"], "hydra");
    let a = argv(&j).join(" ");
    assert!(
        a.contains("-bootstrap ssh -outfile-pattern /o/out.%r.%h -errfile-pattern /o/err.%r -print-all-exitcodes"),
        "{a}"
    );
    let w = j["warnings"].to_string();
    assert!(
        w.contains("--timestamp-output") && !w.contains("-print-all"),
        "{w}"
    );
    // The local launcher applies them all: no warning.
    let mut args = flags.to_vec();
    args.extend(["--merge-stderr-to-stdout", img.as_str(), "hello"]);
    let j = json(&args, &[]);
    assert_eq!(j["launcher"]["kind"], "local");
    assert_eq!(j["warnings"], serde_json::json!([]));
    // Open MPI's --output-filename pads the rank to the digits of the job's size: srun's %2t;
    // hydra cannot, and says so once.
    let j = json(
        &["-n", "12", "--output-filename", "/o", &img, "hello"],
        &SLURM,
    );
    let a = argv(&j);
    assert!(
        a.contains(&"--output=/o/1/rank.%2t/stdout".to_owned()),
        "{a:?}"
    );
    let j = json(
        &["-n", "9", "--output-filename", "/o", &img, "hello"],
        &SLURM,
    );
    assert!(argv(&j).contains(&"--output=/o/1/rank.%t/stdout".to_owned()));
    let hydra = |n: &str| {
        json(
            &[
                "--launcher",
                "hydra",
                "-H",
                "a",
                "-n",
                n,
                "--output-filename",
                "/o",
                &img,
                "hello",
            ],
            &[],
        )["warnings"]
            .to_string()
    };
    assert!(hydra("12").contains("without Open MPI's zero padding"));
    assert!(!hydra("2").contains("padding"));
}

#[test]
fn force_is_offered_only_where_it_helps() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("missing.sif");
    let missing = missing.to_str().unwrap();
    for args in [
        &["-n", "1", missing, "x"][..],
        &["--force", "-n", "1", missing, "x"],
    ] {
        let out = run(args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(missing) && !stderr.contains("--force to launch"),
            "a missing image is not fixed by --force: {stderr}"
        );
    }
    let out = text(&["-n", "1", missing, "x"], &[]);
    assert!(out.contains("--force cannot launch past"), "{out}");
    // A compatibility check that --force can override still offers it.
    let img = image(t.path());
    let profile = t.path().join("other.yaml");
    std::fs::write(
        &profile,
        "name: other\nmatch:\n  files: [/no-such-file-cmpirun]\npmi:\n  kind: pmi2\n",
    )
    .unwrap();
    let out = run(
        &["--profile", profile.to_str().unwrap(), "-n", "1", &img, "x"],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("profile-match") && stderr.contains("--force to launch anyway"),
        "{stderr}"
    );
}

#[test]
fn binding_is_srun_s_or_hydra_s_under_those_launchers() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let joined = argv_line;
    let j = json(
        &["--bind-to", "socket", "--report-bindings", &img, "hello"],
        &SLURM,
    );
    assert!(
        joined(&j).contains(" --cpu-bind=verbose,sockets "),
        "{}",
        joined(&j)
    );
    let j = json(&["--cpus-per-rank", "2", &img, "hello"], &SLURM);
    assert!(
        joined(&j).contains(" --cpu-bind=cores --cpus-per-task=2 "),
        "{}",
        joined(&j)
    );
    let out = text(&["--bind-to", "core", &img, "hello"], &SLURM);
    assert!(
        out.contains("binding: ranks bound to core: by srun (--cpu-bind=cores)"),
        "{out}"
    );
    let j = json(
        &[
            "--launcher",
            "hydra",
            "-H",
            "a,b",
            "--map-by",
            "slot:PE=2",
            &img,
            "hello",
        ],
        &[],
    );
    assert!(joined(&j).contains(" -bind-to core:2 "), "{}", joined(&j));
    // The local launcher binds itself and says how.
    let out = text(&["--bind-to", "core", &img, "hello"], &[]);
    assert!(
        out.contains("binding: ranks bound to core: by cmpirun"),
        "{out}"
    );
    let out = text(&[&img, "hello"], &[]);
    assert!(!out.contains("binding:"), "{out}");
}

#[test]
fn node_state_shows_where_each_node_keeps_it() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let uid = nix::unistd::Uid::current();
    let cache = t.path().join("cache");
    let env = [
        ("XDG_CACHE_HOME", cache.to_str().unwrap()),
        ("XDG_RUNTIME_DIR", ""),
    ];
    let out = text(&["-n", "2", &img, "/usr/bin/hello"], &env);
    assert!(
        out.contains(&format!(
            "node state: (each node's own; as this host sees the folders)\n  \
             rendezvous: /tmp/cmpirun-{uid} (local filesystem)\n    \
             why: in /tmp ($XDG_RUNTIME_DIR is not set); each node's instance socket and lock, \
             named by the job step, which is the same on every node: never on a folder the \
             nodes share\n"
        )),
        "{out}"
    );
    for (what, dir) in [
        ("library cache", "libraries"),
        ("extract cache", "extract"),
        ("image facts", "facts"),
    ] {
        assert!(
            out.contains(&format!(
                "  {what}: {} (local filesystem)\n",
                cache.join("cmpirun").join(dir).display()
            )),
            "{out}"
        );
    }
    // A runtime directory that is no directory of the user's is passed over, and says so; the FUSE backend
    // never extracts.
    let file = t.path().join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    let env = [("XDG_RUNTIME_DIR", file.to_str().unwrap())];
    let out = text(
        &["--image-mount", "fuse", "-n", "2", &img, "/usr/bin/hello"],
        &env,
    );
    assert!(
        out.contains(&format!(
            "why: in /tmp ($XDG_RUNTIME_DIR {} is not a directory of uid {uid});",
            file.display()
        )),
        "{out}"
    );
    assert!(!out.contains("extract cache:"), "{out}");
    let j = json(&["-n", "2", &img, "/usr/bin/hello"], &env);
    assert_eq!(j["mount"]["node_state"][0]["what"], "rendezvous");
    assert_eq!(
        j["mount"]["node_state"][0]["path"],
        format!("/tmp/cmpirun-{uid}")
    );
}

#[test]
fn overload_caches_user_sets_and_rankfiles_under_each_launcher() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let argv = argv_line;
    let warnings = |j: &Value| j["warnings"].to_string();
    // srun: ranks may share CPUs only with --overcommit; user sets are masks; caches are
    // srun's nearest object, with one warning.
    let j = json(
        &["--bind-to", "core:overload-allowed", &img, "hello"],
        &SLURM,
    );
    assert!(
        argv(&j).contains(" --cpu-bind=cores --overcommit "),
        "{}",
        argv(&j)
    );
    assert_eq!(warnings(&j), "[]");
    let j = json(&["-bind-to", "user:0+2,1+4,3", &img, "hello"], &SLURM);
    assert!(
        argv(&j).contains(" --cpu-bind=mask_cpu:0x5,0x12,0x8 "),
        "{}",
        argv(&j)
    );
    let j = json(&["-bind-to", "l3cache", &img, "hello"], &SLURM);
    assert!(argv(&j).contains(" --cpu-bind=sockets "), "{}", argv(&j));
    assert!(
        warnings(&j).contains("srun binds to no cache"),
        "{}",
        warnings(&j)
    );
    // hydra: its own names.
    for (bind, passed) in [
        ("user:0+2,1", "user:0+2,1"),
        ("l2dcache", "l2cache"),
        ("machine", "machine"),
        ("rr", "rr"),
    ] {
        let j = json(
            &[
                "--launcher",
                "hydra",
                "-H",
                "a,b",
                "-bind-to",
                bind,
                &img,
                "hello",
            ],
            &[],
        );
        assert!(
            argv(&j).contains(&format!(" -bind-to {passed} ")),
            "{}",
            argv(&j)
        );
        assert_eq!(warnings(&j), "[]", "{bind}");
    }
    // mpirun: Open MPI's modifier and names.
    for (bind, passed) in [
        ("core:overload-allowed", "core:overload-allowed"),
        ("board", "board"),
        ("l3cache", "l3cache"),
    ] {
        let j = json(
            &["--launcher", "mpirun", "--bind-to", bind, &img, "hello"],
            &[],
        );
        assert!(
            argv(&j).contains(&format!(" --bind-to {passed} ")),
            "{}",
            argv(&j)
        );
    }
    let j = json(
        &[
            "--launcher",
            "mpirun",
            "--oversubscribe",
            "--bind-to",
            "core",
            &img,
            "hello",
        ],
        &[],
    );
    assert!(argv(&j).contains(" --bind-to core "), "{}", argv(&j));
    // The local launcher says when ranks may share cores: with overload-allowed only.
    let out = text(&["--bind-to", "core:overload-allowed", &img, "hello"], &[]);
    assert!(out.contains("several per core"), "{out}");
    let out = text(
        &["--oversubscribe", "--bind-to", "core", &img, "hello"],
        &[],
    );
    assert!(!out.contains("several per core"), "{out}");
    // A rankfile: applied locally when it names this host only, warned once elsewhere.
    let rf = t.path().join("rankfile");
    std::fs::write(&rf, "rank 0=localhost slot=0\nrank 1=localhost slot=1\n").unwrap();
    let rf = rf.to_str().unwrap();
    let out = text(&["-n", "2", "--rankfile", rf, &img, "hello"], &[]);
    assert!(
        out.contains("binding: ranks bound to the slots of the rankfile: by cmpirun"),
        "{out}"
    );
    let j = json(&["--rankfile", rf, &img, "hello"], &SLURM);
    let w = warnings(&j);
    assert!(
        w.matches("--rankfile").count() == 1 && w.contains("not applied under the slurm launcher"),
        "{w}"
    );
    std::fs::write(
        t.path().join("rankfile"),
        "rank 0=localhost slot=0\nrank 1=elsewhere slot=1\n",
    )
    .unwrap();
    let out = run(
        &["--dry-run", "-n", "2", "--rankfile", rf, &img, "hello"],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{rf}:2: rank 1 is placed on elsewhere, which is not this host"
        )),
        "{stderr}"
    );
}
