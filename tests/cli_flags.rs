//! The mpirun-compatible command line, through the real binary: every flag lands in the JobSpec
//! (`--dry-run=job` prints it), and bad input exits 2 with a message naming the flag.

use std::process::{Command, Output};

use serde_json::Value;

fn cmpirun(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cmpirun"))
        .args(args)
        .env_remove("CMPIRUN_PROFILE")
        .env_remove("CMPIRUN_LOG")
        .output()
        .expect("run cmpirun")
}

/// Parses `args` with `--dry-run=job` and returns the JobSpec and stderr.
fn job(args: &[&str]) -> (Value, String) {
    let mut all = vec!["--dry-run=job"];
    all.extend_from_slice(args);
    let out = cmpirun(&all);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "cmpirun {all:?} failed: {stderr}");
    (serde_json::from_slice(&out.stdout).expect("JSON"), stderr)
}

/// Runs `args`, expects exit 2 and a one-line message containing every one of `needles`.
fn usage_error(args: &[&str], needles: &[&str]) {
    let out = cmpirun(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "cmpirun {args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: {stderr:?} should name {n:?}");
    }
}

#[test]
fn process_counts_in_every_spelling() {
    for flag in ["-n", "-np", "--np", "--n", "-c"] {
        let (j, _) = job(&[flag, "3", "img.sif", "prog"]);
        assert_eq!(j["apps"][0]["np"], 3, "{flag}");
    }
    let (j, _) = job(&["-n4", "img.sif", "prog"]);
    assert_eq!(j["apps"][0]["np"], 4);
    let (j, _) = job(&["--np=5", "img.sif", "prog"]);
    assert_eq!(j["apps"][0]["np"], 5);
    for flag in ["-N", "-ppn", "--ppn", "-npernode", "--npernode", "-perhost"] {
        let (j, _) = job(&[flag, "2", "img.sif", "prog"]);
        assert_eq!(j["ppn"], 2, "{flag}");
    }
    let (j, _) = job(&["img.sif", "prog"]);
    assert_eq!(j["apps"][0]["np"], Value::Null);
}

#[test]
fn image_program_and_arguments_verbatim() {
    let (j, _) = job(&["-n", "2", "img.sif", "./a.out", "-n", "7", "--weird", "-x"]);
    let app = &j["apps"][0];
    assert_eq!(app["image"], "img.sif");
    assert_eq!(app["program"], "./a.out");
    assert_eq!(app["args"], serde_json::json!(["-n", "7", "--weird", "-x"]));
    // `--` ends the flags even if the image name starts with a dash.
    let (j, _) = job(&["--", "-img.sif", "prog"]);
    assert_eq!(j["apps"][0]["image"], "-img.sif");
}

#[test]
fn hosts_from_command_line() {
    for flag in ["-H", "-host", "--host", "-hosts", "--hosts"] {
        let (j, _) = job(&[flag, "a,b:2", "img.sif", "prog"]);
        assert_eq!(
            j["hosts"],
            serde_json::json!([{"name": "a", "slots": null}, {"name": "b", "slots": 2}]),
            "{flag}"
        );
    }
    let (j, _) = job(&["-H", "a", "-H", "b:3", "img.sif", "prog"]);
    assert_eq!(j["hosts"][1]["slots"], 3);
}

#[test]
fn hostfiles_in_mpich_and_open_mpi_form() {
    let dir = tempfile::tempdir().unwrap();
    let mpich = dir.path().join("mpich");
    std::fs::write(&mpich, "# comment\nnode1:4\nnode2  # trailing\n\nnode3:2\n").unwrap();
    let ompi = dir.path().join("ompi");
    std::fs::write(&ompi, "node1 slots=4 max_slots=8\nnode2\n").unwrap();
    for flag in [
        "-f",
        "-hostfile",
        "--hostfile",
        "-machinefile",
        "--machinefile",
    ] {
        let (j, _) = job(&[flag, mpich.to_str().unwrap(), "img.sif", "prog"]);
        assert_eq!(
            j["hosts"],
            serde_json::json!([
                {"name": "node1", "slots": 4},
                {"name": "node2", "slots": null},
                {"name": "node3", "slots": 2}
            ]),
            "{flag}"
        );
        assert_eq!(j["hostfile"], mpich.to_str().unwrap());
    }
    let (j, _) = job(&["--hostfile", ompi.to_str().unwrap(), "img.sif", "prog"]);
    assert_eq!(j["hosts"][0]["slots"], 4);
    assert_eq!(j["hosts"][1]["slots"], Value::Null);
}

#[test]
fn hostfile_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("hosts");
    let p = bad.to_str().unwrap();
    std::fs::write(&bad, "node1:4\nnode2 slots=x\n").unwrap();
    usage_error(
        &["-f", p, "img.sif", "prog"],
        &[&format!("{p}:2:"), "slots=x"],
    );
    std::fs::write(&bad, "node1\nnode2:0\n").unwrap();
    usage_error(
        &["-f", p, "img.sif", "prog"],
        &[&format!("{p}:2:"), "node2:0"],
    );
    std::fs::write(&bad, "node1 frob=2\n").unwrap();
    usage_error(&["-f", p, "img.sif", "prog"], &[&format!("{p}:1:"), "frob"]);
    std::fs::write(&bad, "# nothing\n").unwrap();
    usage_error(&["-f", p, "img.sif", "prog"], &[p, "no host"]);
    missing_file_is_named("--hostfile", dir.path());
}

/// A file named by `flag` that does not exist is a usage error naming the flag and the file.
fn missing_file_is_named(flag: &str, dir: &std::path::Path) {
    let missing = dir.join("missing");
    let m = missing.to_str().unwrap();
    usage_error(&[flag, m, "img.sif", "prog"], &[flag, m]);
}

#[test]
fn environment_flags() {
    let (j, _) = job(&[
        "-x",
        "A=1",
        "-x",
        "B",
        "-genv",
        "C",
        "3",
        "-genvlist",
        "D,E",
        "--mca",
        "btl",
        "self,tcp",
        "--pmixmca",
        "gds",
        "hash",
        "-env",
        "F",
        "6",
        "-envlist",
        "G",
        "img.sif",
        "prog",
    ]);
    assert_eq!(
        j["env"],
        serde_json::json!([
            {"kind": "set", "name": "A", "value": "1"},
            {"kind": "pass", "name": "B"},
            {"kind": "set", "name": "C", "value": "3"},
            {"kind": "pass", "name": "D"},
            {"kind": "pass", "name": "E"},
            {"kind": "set", "name": "OMPI_MCA_btl", "value": "self,tcp"},
            {"kind": "set", "name": "PMIX_MCA_gds", "value": "hash"},
        ])
    );
    assert_eq!(
        j["apps"][0]["env"],
        serde_json::json!([
            {"kind": "set", "name": "F", "value": "6"},
            {"kind": "pass", "name": "G"},
        ])
    );
    assert_eq!(j["env_all"], "all");
    let (j, _) = job(&["-genvnone", "img.sif", "prog"]);
    assert_eq!(j["env_all"], "none");
    let (j, _) = job(&["-genvall", "img.sif", "prog"]);
    assert_eq!(j["env_all"], "all");
    // A value may contain '=' and spaces.
    let (j, _) = job(&["-x", "A=b=c d", "img.sif", "prog"]);
    assert_eq!(j["env"][0]["value"], "b=c d");
}

#[test]
fn directories_output_and_timeout() {
    let (j, _) = job(&["-wdir", "/w", "-gwdir", "/g", "img.sif", "prog"]);
    assert_eq!(j["apps"][0]["wdir"], "/w");
    assert_eq!(j["wdir"], "/g");
    for flag in ["--wdir", "-wd", "--wd"] {
        let (j, _) = job(&[flag, "/x", "img.sif", "prog"]);
        assert_eq!(j["apps"][0]["wdir"], "/x", "{flag}");
    }
    let (j, _) = job(&["--tag-output", "img.sif", "prog"]);
    assert_eq!(j["output_tag"], "tag-output");
    for flag in ["-l", "-prepend-rank", "--prepend-rank"] {
        let (j, _) = job(&[flag, "img.sif", "prog"]);
        assert_eq!(j["output_tag"], "prepend-rank", "{flag}");
    }
    let (j, _) = job(&["--timeout", "30", "img.sif", "prog"]);
    assert_eq!(j["timeout_secs"], 30);
    let (j, _) = job(&["-v", "-vv", "--verbose", "img.sif", "prog"]);
    assert_eq!(j["verbose"], 4);
}

#[test]
fn cmpirun_own_flags() {
    let (j, _) = job(&[
        "--profile",
        "slurm-pmi2",
        "--launcher",
        "hydra",
        "--pmi",
        "pmix",
        "--bind",
        "/scratch",
        "--bind",
        "/a:/b:ro",
        "--image-mount",
        "extract",
        "--force",
        "--no-inject",
        "--expect-provider",
        "cxi",
        "--shm",
        "4g",
        "img.sif",
        "prog",
    ]);
    assert_eq!(j["profile"], "slurm-pmi2");
    assert_eq!(j["launcher"], "hydra");
    assert_eq!(j["pmi"], "pmix");
    assert_eq!(
        j["binds"],
        serde_json::json!([
            {"source": "/scratch", "destination": "/scratch", "read_only": false},
            {"source": "/a", "destination": "/b", "read_only": true},
        ])
    );
    assert_eq!(j["image_mount"], "extract");
    assert_eq!(j["force"], true);
    assert_eq!(j["no_inject"], true);
    assert_eq!(j["expect_provider"], "cxi");
    assert_eq!(j["shm_size"], "4g");
    assert_eq!(j["dry_run"], "job");
}

#[test]
fn placement_flags_are_accepted_with_a_warning() {
    let cases: &[&[&str]] = &[
        &["--rank-by", "slot"],
        &["--nooversubscribe"],
        &["--map-by", "ppr:2:socket"],
        &["--allow-run-as-root"],
        &["--bind-to", "core:spread"],
        &["-bind-to", "gpu"],
        &["-bind-to", "pci:0000:01:00.0"],
    ];
    for flags in cases {
        let mut args = flags.to_vec();
        args.extend(["img.sif", "prog"]);
        let (j, stderr) = job(&args);
        let warning = j["warnings"][0].as_str().unwrap_or_default().to_owned();
        assert!(warning.starts_with(flags[0]), "{flags:?}: {warning}");
        assert_eq!(j["warnings"].as_array().unwrap().len(), 1, "{flags:?}");
        assert!(
            stderr.contains("WARN") && stderr.contains(flags[0]),
            "{flags:?}: {stderr}"
        );
    }
    let (j, _) = job(&["--map-by", "node", "img.sif", "prog"]);
    assert_eq!(j["mapping"], "cyclic");
    assert_eq!(j["warnings"], serde_json::json!([]));
    let (j, _) = job(&["-rr", "img.sif", "prog"]);
    assert_eq!(j["mapping"], "cyclic");
    let (j, _) = job(&["--map-by", "slot", "img.sif", "prog"]);
    assert_eq!(j["mapping"], "block");
}

#[test]
fn mpmd_parts_each_with_image_count_and_env() {
    let (j, _) = job(&[
        "-genv", "G", "1", "-n", "2", "-env", "A", "a", "one.sif", "p1", "x", ":", "-n", "3",
        "-wdir", "/w", "two.sif", "p2", ":", "one.sif", "p3",
    ]);
    let apps = j["apps"].as_array().unwrap();
    assert_eq!(apps.len(), 3);
    assert_eq!(apps[0]["image"], "one.sif");
    assert_eq!(apps[0]["args"], serde_json::json!(["x"]));
    assert_eq!(apps[0]["env"][0]["name"], "A");
    assert_eq!(apps[1]["np"], 3);
    assert_eq!(apps[1]["image"], "two.sif");
    assert_eq!(apps[1]["wdir"], "/w");
    assert_eq!(apps[1]["env"], serde_json::json!([]));
    assert_eq!(apps[2]["np"], Value::Null);
    assert_eq!(j["env"][0]["name"], "G");
}

#[test]
fn help_and_version() {
    for flag in ["--help", "-h", "-help"] {
        let out = cmpirun(&[flag]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("IMAGE PROGRAM") && text.contains("--dry-run"),
            "{flag}"
        );
        // The subcommands an admin and a user look for, and the binding flags.
        for word in [
            "cmpirun doctor",
            "cmpirun profile",
            "--rankfile",
            "overload-allowed",
        ] {
            assert!(text.contains(word), "{flag}: {word}");
        }
    }
    for flag in ["--version", "-V"] {
        let out = cmpirun(&[flag]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("cmpirun "));
    }
}

#[test]
fn bad_usage_exits_2_and_names_the_flag() {
    usage_error(&["--frobnicate", "img.sif", "prog"], &["--frobnicate"]);
    usage_error(&["-np", "zero", "img.sif", "prog"], &["-np", "zero"]);
    usage_error(&["-n", "0", "img.sif", "prog"], &["-n", "\"0\""]);
    usage_error(
        &["img.sif", "prog", ":", "-n"],
        &["-n", "number of processes"],
    );
    usage_error(&["-genv", "A"], &["-genv", "VAR VALUE"]);
    usage_error(&["-x", "1BAD=2", "img.sif", "prog"], &["-x", "1BAD"]);
    usage_error(
        &["--launcher", "pbs", "img.sif", "prog"],
        &["--launcher", "pbs"],
    );
    usage_error(&["--pmi", "pmi3", "img.sif", "prog"], &["--pmi", "pmi3"]);
    usage_error(
        &["--image-mount", "nfs", "img.sif", "prog"],
        &["--image-mount"],
    );
    usage_error(
        &["--bind", "rel:/x", "img.sif", "prog"],
        &["--bind", "absolute"],
    );
    usage_error(
        &["--bind", "/a:/b:rx", "img.sif", "prog"],
        &["--bind", "rx"],
    );
    for bad in [
        "lots",
        "4gb",
        "1.5g",
        "g",
        "%",
        "-1m",
        "50%%",
        "99999999999999999999k",
    ] {
        usage_error(&["--shm", bad, "img.sif", "prog"], &["--shm", bad]);
    }
    for good in ["1024", "512k", "2T", "50%", "0"] {
        let (j, _) = job(&["--shm", good, "img.sif", "prog"]);
        assert_eq!(j["shm_size"], good);
    }
    usage_error(&["--timeout", "-1", "img.sif", "prog"], &["--timeout"]);
    usage_error(&["--json", "img.sif", "prog"], &["--json", "--dry-run"]);
    usage_error(&["--force=yes", "img.sif", "prog"], &["--force"]);
    usage_error(
        &["-genvall", "-genvnone", "img.sif", "prog"],
        &["-genvall", "-genvnone"],
    );
    usage_error(&["-H", "a,,b", "img.sif", "prog"], &["-H"]);
    usage_error(&["-n", "2"], &["no image"]);
    usage_error(&["-n", "2", "img.sif"], &["no program", "img.sif"]);
    usage_error(&["img.sif", "p", ":", "-n", "2"], &["part 2", "no image"]);
    usage_error(&[], &["no image"]);
    usage_error(&["-n", "999999999", "img.sif", "prog"], &["-n", "at most"]);
    // Odd bytes and lengths are errors or accepted, never a crash.
    usage_error(&["-éx", "img.sif", "prog"], &["-éx"]);
    let many_v = format!("-{}", "v".repeat(300));
    let (j, _) = job(&[&many_v, "img.sif", "prog"]);
    assert_eq!(j["verbose"], 255);
}

#[test]
fn launching_without_dry_run_does_not_pretend() {
    // Until the launchers exist the binary must say so rather than do nothing.
    let out = cmpirun(&["-n", "1", "/nonexistent.sif", "true"]);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
}

/// A reader that has gone away (`cmpirun --help | head -0`) ends the command quietly with
/// status 0: no panic from a broken pipe, nothing on stderr.
#[test]
fn a_closed_stdout_ends_the_output_quietly() {
    let image =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sif/one-group.sif");
    let image = image.to_str().unwrap();
    for args in [
        &["--help"][..],
        &["--version"],
        &["image", "inspect", "--json", image],
        &["image", "inspect", image],
        &["--dry-run=job", "-n", "2", "image.sif", "/bin/true"],
    ] {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_cmpirun"))
            .args(args)
            .stdout(std::process::Stdio::from(writer))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    }
}

#[test]
fn hydra_env_forms_with_an_equals_sign() {
    let (j, _) = job(&[
        "-genv",
        "A=1",
        "-genv",
        "B",
        "2",
        "--genv=C=x=y",
        "-env",
        "D=",
        "img.sif",
        "prog",
    ]);
    assert_eq!(
        j["env"],
        serde_json::json!([
            {"kind": "set", "name": "A", "value": "1"},
            {"kind": "set", "name": "B", "value": "2"},
            {"kind": "set", "name": "C", "value": "x=y"},
        ])
    );
    assert_eq!(
        j["apps"][0]["env"],
        serde_json::json!([{"kind": "set", "name": "D", "value": ""}])
    );
    // The one-word form does not take the image as a value.
    assert_eq!(j["apps"][0]["image"], "img.sif");
    usage_error(&["-genv", "1A=2", "img.sif", "prog"], &["-genv", "1A"]);
}

#[test]
fn single_dash_long_flags_are_never_split() {
    // `-nameserver` is not `-n ameserver`; `-configfile` is not `-c onfigfile`.
    let (j, stderr) = job(&["-nameserver", "host:4000", "img.sif", "prog"]);
    assert_eq!(j["apps"][0]["np"], Value::Null);
    assert!(stderr.contains("-nameserver"), "{stderr}");
    assert!(
        j["warnings"][0]
            .as_str()
            .is_some_and(|w| w.starts_with("-nameserver host:4000")),
        "{j}"
    );
    for word in ["-nfoo", "-Nx", "-cpus", "-fhosts", "-xFOO=1", "-Hnode"] {
        usage_error(&[word, "img.sif", "prog"], &["unknown flag", word]);
    }
    // Attached values that are not words still work.
    let (j, _) = job(&["-n4", "-N2", "img.sif", "prog"]);
    assert_eq!(j["apps"][0]["np"], 4);
    assert_eq!(j["ppn"], 2);
}

#[test]
fn configfile_and_app_files_give_the_mpmd_parts() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parts");
    std::fs::write(
        &file,
        "# hydra's configfile: one part per line\n-n 2 -env A a one.sif p1 'x y'\n\n-n 1 two.sif p2\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    for flag in ["-configfile", "--configfile", "--app", "-app"] {
        let (j, _) = job(&["-genv", "G=1", flag, f]);
        let apps = j["apps"].as_array().unwrap();
        assert_eq!(apps.len(), 2, "{flag}: {j}");
        assert_eq!(apps[0]["np"], 2);
        assert_eq!(apps[0]["image"], "one.sif");
        assert_eq!(apps[0]["args"], serde_json::json!(["x y"]));
        assert_eq!(apps[0]["env"][0]["name"], "A");
        assert_eq!(apps[1]["program"], "p2");
        assert_eq!(j["env"][0]["name"], "G");
    }
    // Parts after the file follow it.
    let (j, _) = job(&["-configfile", f, "-n", "1", "three.sif", "p3"]);
    assert_eq!(j["apps"][2]["image"], "three.sif");
    // Errors name the file and the line.
    std::fs::write(&file, "-n 1 one.sif p1\n-n zero two.sif p2\n").unwrap();
    usage_error(&["-configfile", f], &[&format!("{f}:2:"), "-n", "zero"]);
    std::fs::write(&file, "-n 1 one.sif p1\n-n 2 two.sif\n").unwrap();
    usage_error(&["--app", f], &[&format!("{f}:2:"), "no program"]);
    std::fs::write(&file, "-n 1 'one.sif p1\n").unwrap();
    usage_error(&["--app", f], &[&format!("{f}:1:"), "quotes"]);
    std::fs::write(&file, "# nothing\n").unwrap();
    usage_error(&["--app", f], &[f, "no part"]);
    std::fs::write(&file, format!("-configfile {f}\n")).unwrap();
    usage_error(&["-configfile", f], &[&format!("{f}:1:"), "another"]);
    missing_file_is_named("-configfile", dir.path());
    missing_file_is_named("--rankfile", dir.path());
}

#[test]
fn output_and_exit_code_flags() {
    let (j, stderr) = job(&[
        "-outfile-pattern",
        "out.%r",
        "-errfile-pattern",
        "err.%h.%p.%g.%%",
        "--merge-stderr-to-stdout",
        "--timestamp-output",
        "-print-all-exitcodes",
        "--display-map",
        "img.sif",
        "prog",
    ]);
    assert_eq!(
        j["output_files"],
        serde_json::json!({"stdout": "out.%r", "stderr": "err.%h.%p.%g.%%", "pad_rank": false})
    );
    for key in [
        "merge_stderr",
        "timestamp_output",
        "print_all_exitcodes",
        "display_map",
    ] {
        assert_eq!(j[key], true, "{key}");
    }
    assert!(
        !stderr.contains("WARN"),
        "applied flags do not warn: {stderr}"
    );
    // Open MPI's directory: absolute, and its % kept literal.
    let (j, _) = job(&["--output-filename", "/x%y", "img.sif", "prog"]);
    assert_eq!(j["output_files"]["stdout"], "/x%%y/1/rank.%r/stdout");
    assert_eq!(j["output_files"]["stderr"], "/x%%y/1/rank.%r/stderr");
    assert_eq!(j["output_files"]["pad_rank"], true);
    // Open MPI's :nocopy directive is what cmpirun does: the files only.
    let (j, stderr) = job(&["--output-filename", "/x:NOCOPY", "img.sif", "prog"]);
    assert_eq!(j["output_files"]["stdout"], "/x/1/rank.%r/stdout");
    assert!(!stderr.contains("WARN"), "{stderr}");
    let (j, _) = job(&["--output-filename", "rel", "img.sif", "prog"]);
    assert!(
        j["output_files"]["stdout"]
            .as_str()
            .unwrap()
            .starts_with('/')
    );
    usage_error(
        &["-outfile-pattern", "out.%x", "img.sif", "prog"],
        &["-outfile-pattern", "%r (rank)"],
    );
}

#[test]
fn bootstrap_names_map_to_launchers() {
    for (flag, value, launcher) in [
        ("-bootstrap", "ssh", "hydra"),
        ("-bootstrap", "rsh", "hydra"),
        ("-bootstrap", "slurm", "slurm"),
        ("-bootstrap", "fork", "local"),
        ("-launcher", "ssh", "hydra"),
        ("-launcher", "fork", "local"),
        ("--launcher", "local", "local"),
    ] {
        let (j, _) = job(&[flag, value, "img.sif", "prog"]);
        assert_eq!(j["launcher"], launcher, "{flag} {value}");
        let bootstrap = if value == "ssh" || value == "rsh" {
            Value::from(value)
        } else {
            Value::Null
        };
        assert_eq!(j["hydra_bootstrap"], bootstrap, "{flag} {value}");
    }
    usage_error(
        &["-bootstrap", "lsf", "img.sif", "prog"],
        &["-bootstrap", "lsf"],
    );
}

#[test]
fn rankfiles_are_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let rf = dir.path().join("rankfile");
    std::fs::write(
        &rf,
        "# two ranks\nrank 0=n1 slot=0\nrank 1=n1 slot=1:0-1;0:*\n",
    )
    .unwrap();
    let p = rf.to_str().unwrap();
    let (j, stderr) = job(&["--rankfile", p, "img.sif", "prog"]);
    let read = &j["binding"]["rankfile"];
    assert_eq!(read["path"], p);
    assert_eq!(
        read["lines"][1],
        serde_json::json!({"line": 3, "rank": 1, "host": "n1", "slot": "1:0-1;0:*"})
    );
    // Whether it applies depends on the launcher: the plan says (tests/plan_dry_run.rs).
    assert!(!stderr.contains("WARN"), "{stderr}");
    std::fs::write(&rf, "rank 0=n1 slot=0\nrank 0=n1 slot=1\n").unwrap();
    usage_error(
        &["--rankfile", p, "img.sif", "prog"],
        &[&format!("{p}:2:"), "rank 0 is named on line 1 already"],
    );
    std::fs::write(&rf, "rank 0=n1 slot=0:x\n").unwrap();
    usage_error(
        &["--rankfile", p, "img.sif", "prog"],
        &[&format!("{p}:1:"), "slot=0:x", "SOCKET:CORES"],
    );
    std::fs::write(&rf, "rank 0=n1 slot=0\nrank x=n1 slot=1\n").unwrap();
    usage_error(
        &["--rankfile", p, "img.sif", "prog"],
        &[&format!("{p}:2:"), "rank"],
    );
    std::fs::write(&rf, "rank 0=n1\n").unwrap();
    usage_error(
        &["-rf", p, "img.sif", "prog"],
        &[&format!("{p}:1:"), "slot="],
    );
}

#[test]
fn binding_flags() {
    for (flags, to, per) in [
        (&["--bind-to", "core"][..], "core", Value::Null),
        (&["-bind-to", "socket"], "socket", Value::Null),
        (&["--bind-to", "numa"], "numa", Value::Null),
        (&["--bind-to", "hwthread"], "hwthread", Value::Null),
        (&["--bind-to", "none"], "none", Value::Null),
        (&["-bind-to", "core:2"], "core", Value::from(2)),
        (&["--bind-to-core"], "core", Value::Null),
        (&["--bind-to-socket"], "socket", Value::Null),
        (&["--bind-to", "core:overload-allowed"], "core", Value::Null),
        (
            &["--bind-to", "core:overload-allowed,if-supported"],
            "core",
            Value::Null,
        ),
        (&["-bind-to", "l1cache"], "l1cache", Value::Null),
        (&["-bind-to", "l2ucache"], "l2cache", Value::Null),
        (&["-bind-to", "l3cache"], "l3cache", Value::Null),
        (&["-bind-to", "l4cache"], "l3cache", Value::Null),
        (&["-bind-to", "machine"], "machine", Value::Null),
        (&["--bind-to", "board"], "machine", Value::Null),
        (&["-bind-to", "rr"], "rr", Value::Null),
        (&["-bind-to", "user:0+2,1"], "user", Value::Null),
    ] {
        let mut args = flags.to_vec();
        args.extend(["img.sif", "prog"]);
        let (j, stderr) = job(&args);
        assert_eq!(j["binding"]["to"], to, "{flags:?}");
        assert_eq!(j["binding"]["cpus_per_rank"], per, "{flags:?}");
        assert!(!stderr.contains("WARN"), "{flags:?}: {stderr}");
    }
    for flags in [
        &["--cpus-per-rank", "2"][..],
        &["--cpus-per-proc", "2"],
        &["--map-by", "slot:PE=2"],
        &["--map-by", "core:pe=2"],
    ] {
        let mut args = flags.to_vec();
        args.extend(["--report-bindings", "img.sif", "prog"]);
        let (j, _) = job(&args);
        assert_eq!(j["binding"]["cpus_per_rank"], 2, "{flags:?}");
        assert_eq!(j["binding"]["report"], true);
    }
    let (j, stderr) = job(&["--map-by", "slot:PE=2", "img.sif", "prog"]);
    assert_eq!(j["mapping"], "block");
    assert!(!stderr.contains("WARN"), "{stderr}");
    let overload = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["img.sif", "prog"]);
        job(&all).0["binding"]["overload"].clone()
    };
    assert_eq!(overload(&["--bind-to", "core:overload-allowed"]), true);
    // As in Open MPI, --oversubscribe is about slots (which the layout wraps anyway), not
    // about binding several ranks to a core: accepted without a warning, no overload.
    assert_eq!(overload(&["--oversubscribe"]), false);
    assert_eq!(overload(&["-oversubscribe", "--bind-to", "core"]), false);
    assert_eq!(
        job(&["--oversubscribe", "img.sif", "prog"]).0["warnings"],
        serde_json::json!([])
    );
    assert_eq!(overload(&["--bind-to", "core"]), false);
    let (j, _) = job(&["-bind-to", "user:0+2,1", "img.sif", "prog"]);
    assert_eq!(j["binding"]["user"], serde_json::json!([[0, 2], [1]]));
    usage_error(
        &["--bind-to", "l3", "img.sif", "prog"],
        &["--bind-to", "l3"],
    );
    usage_error(
        &["-bind-to", "user:0+x", "img.sif", "prog"],
        &["-bind-to", "user:0+x"],
    );
    usage_error(
        &["--cpus-per-rank", "0", "img.sif", "prog"],
        &["--cpus-per-rank"],
    );
    usage_error(
        &["--map-by", "slot:PE=x", "img.sif", "prog"],
        &["--map-by", "x"],
    );
}
