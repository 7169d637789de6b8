//! Every profile shipped in `profiles/` parses, merges its `extends:` chain, says what it is
//! written from, and describes what its documentation says.

mod common;

use std::path::PathBuf;
use std::process::Command;

use cmpirun::jobspec::{LauncherKind, PmiKind};
use cmpirun::profile::{self, ProfileSearch, SiteProfile};

const SHIPPED: [&str; 9] = [
    "generic",
    "slurm-pmi2",
    "slurm-pmix",
    "hpe-slingshot",
    "hpe-slingshot-cray-pmi",
    "aws-efa",
    "infiniband-verbs",
    "tcp",
    "ci",
];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("profiles")
}

fn load(name: &str) -> SiteProfile {
    let search = ProfileSearch { dirs: vec![dir()] };
    let file = search
        .find(name)
        .unwrap_or_else(|| panic!("profiles/{name}.yaml"));
    profile::resolve_file(&file, &search).unwrap_or_else(|e| panic!("{e}"))
}

fn strs(v: &[impl AsRef<str>]) -> Vec<&str> {
    v.iter().map(AsRef::as_ref).collect()
}

#[test]
fn every_shipped_profile_validates() {
    let search = ProfileSearch { dirs: vec![dir()] };
    let names: Vec<String> = search
        .all()
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut expected: Vec<String> = SHIPPED.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(names, expected);
    for name in SHIPPED {
        let p = load(name);
        assert_eq!(p.name, name, "the name field matches the file name");
        assert!(p.description.is_some(), "{name} has a description");
    }
    // And through the binary.
    let out = Command::new(env!("CARGO_BIN_EXE_cmpirun"))
        .args(["profile", "check"])
        .env("CMPIRUN_PROFILE_DIRS", dir())
        .env_remove("CMPIRUN_PROFILE")
        .env_remove("SLURM_JOB_ID")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ok ")).count(),
        SHIPPED.len()
    );
}

#[test]
fn cluster_profiles_cite_their_sources() {
    for (name, cites) in [
        ("slurm-pmi2", "slurm.schedmd.com/mpi_guide"),
        ("slurm-pmix", "openpmix.github.io"),
        ("hpe-slingshot", "fi_cxi.7"),
        ("hpe-slingshot-cray-pmi", "srun(1)"),
        ("tcp", "fi_tcp(7)"),
        ("aws-efa", "docs.aws.amazon.com"),
        ("infiniband-verbs", "rdma-core"),
    ] {
        let text = std::fs::read_to_string(dir().join(format!("{name}.yaml"))).unwrap();
        assert!(
            text.contains("Written from") || text.contains("written from"),
            "{name}"
        );
        assert!(text.contains(cites), "{name} cites {cites}");
    }
}

#[test]
fn slurm_profiles() {
    let p = load("slurm-pmi2");
    assert_eq!(
        p.launcher.kind.and_then(|k| k.fixed()),
        Some(LauncherKind::Slurm)
    );
    assert_eq!(p.pmi.kind, Some(PmiKind::Pmi2));
    let x = load("slurm-pmix");
    assert_eq!(x.pmi.kind, Some(PmiKind::Pmix));
    assert_eq!(
        x.launcher.kind.and_then(|k| k.fixed()),
        Some(LauncherKind::Slurm),
        "inherited"
    );
    assert_eq!(
        strs(&x.pmi.pmix_dirs),
        ["$PMIX_SERVER_TMPDIR", "$PMIX_SYSTEM_TMPDIR"]
    );
    assert_eq!(x.chain.len(), 2);
    assert!(x.match_rules.unwrap().effective_weight() > p.match_rules.unwrap().effective_weight());
}

#[test]
fn hpe_slingshot() {
    let p = load("hpe-slingshot");
    assert_eq!(
        strs(&p.fabric.libfabric),
        ["/opt/cray/libfabric/*/lib64/libfabric.so.1"]
    );
    assert_eq!(strs(&p.fabric.providers), ["cxi"]);
    assert_eq!(strs(&p.fabric.devices), ["/dev/cxi*", "/dev/xpmem"]);
    let env = p.fabric.env.unwrap();
    assert!(strs(&env.pass).contains(&"SLINGSHOT_*"));
    assert_eq!(
        p.launcher.kind.and_then(|k| k.fixed()),
        Some(LauncherKind::Slurm)
    );
    assert_eq!(strs(&p.match_rules.as_ref().unwrap().files), ["/dev/cxi0"]);
    // xpmem where HPE's packages put it too.
    assert!(strs(&p.fabric.libraries).contains(&"/opt/cray/xpmem/default/lib64/libxpmem.so.0"));
    // The CXI runtime directory and Slurm's spool (the cray_shasta apinfo files), where they
    // exist; Cray PMI opens the apinfo file read-write.
    for dir in ["/run/cxi", "/var/spool/slurmd"] {
        assert!(
            p.binds
                .iter()
                .any(|b| b.source.as_str() == dir && b.optional && !b.read_only),
            "{dir}"
        );
    }
    // Cray PMI is the profile that extends it: srun --mpi=cray_shasta and the host's Cray PMI.
    let c = load("hpe-slingshot-cray-pmi");
    assert_eq!(
        c.launcher.srun_mpi.as_ref().unwrap().as_str(),
        "cray_shasta"
    );
    assert_eq!(c.pmi.inject, Some(true));
    assert_eq!(
        strs(&c.pmi.host_libraries),
        [
            "/opt/cray/pe/pmi/default/lib/libpmi2.so.0",
            "/opt/cray/pe/pmi/default/lib/libpmi.so.0"
        ]
    );
    assert_eq!(strs(&c.fabric.providers), ["cxi"], "inherited");
    assert_eq!(c.chain.len(), 3);
    let cm = c.match_rules.unwrap();
    assert!(cm.effective_weight() > p.match_rules.unwrap().effective_weight());
    assert_eq!(
        cm.env
            .iter()
            .find(|(k, _)| k.as_str() == "SLURM_MPI_TYPE")
            .and_then(|(_, v)| v.as_ref())
            .map(|g| g.as_ref()),
        Some("cray_shasta")
    );
}

#[test]
fn tcp_uses_the_images_libfabric_over_tcp_and_only_when_named() {
    let t = load("tcp");
    assert!(t.match_rules.is_none());
    assert_eq!(t.fabric.inject, Some(false));
    let env = t.fabric.env.unwrap();
    let set: Vec<(&str, &str)> = env
        .set
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(set, [("FI_PROVIDER", "tcp")]);
    assert!(strs(&env.pass).contains(&"FI_TCP_*"));
    assert_eq!(t.chain.len(), 2, "extends generic");
}

#[test]
fn aws_efa_and_infiniband() {
    let p = load("aws-efa");
    assert_eq!(
        strs(&p.fabric.libfabric),
        ["/opt/amazon/efa/lib64/libfabric.so.1"]
    );
    assert_eq!(strs(&p.fabric.devices), ["/dev/infiniband/uverbs*"]);
    assert_eq!(strs(&p.fabric.providers), ["efa"]);
    let ib = load("infiniband-verbs");
    assert_eq!(strs(&ib.fabric.devices), ["/dev/infiniband"]);
    assert!(
        ib.binds
            .iter()
            .any(|b| b.source.as_str() == "/etc/libibverbs.d" && b.read_only && !b.optional)
    );
    // EFA reaches its device through libibverbs too: the same driver configuration and driver
    // directories, bound the same way.
    assert_eq!(p.binds, ib.binds);
    // A UCX image on an InfiniBand node is not failed for loading no libfabric.
    assert_eq!(ib.fabric.required, None);
    // On an EFA node both match; EFA is the more specific.
    assert!(p.match_rules.unwrap().effective_weight() > ib.match_rules.unwrap().effective_weight());
}

#[test]
fn generic_matches_everywhere_lowest_and_ci_only_when_named() {
    let g = load("generic");
    let m = g.match_rules.unwrap();
    assert_eq!(m.effective_weight(), 0);
    assert!(profile::evaluate(&m, &profile::MatchContext::default()).matched);
    let ci = load("ci");
    assert!(ci.match_rules.is_none());
    assert_eq!(strs(&ci.fabric.libfabric), ["$CMPIRUN_CI_LIBFABRIC"]);
}

/// A real 2-rank job of the MPICH 5 image (MPICH over its own libfabric) under the tcp profile,
/// as the test user: both ranks map the image's libfabric and the job passes its checks.
#[test]
fn a_job_runs_over_the_images_libfabric_with_the_tcp_profile() {
    let _serial = common::exclusive();
    let before = common::Snapshot::take();
    let out = common::TuserCommand::cmpirun()
        .args([
            "-n",
            "2",
            "--profile",
            "tcp",
            "-genv",
            "MPITEST_FABRIC",
            "1",
        ])
        .arg(common::staged_image("mpich5"))
        .arg("/usr/local/bin/mpitest")
        .run();
    common::assert_mpitest_ok(&out, 2);
    let fabric = common::fabric_lines(&out.stdout);
    assert_eq!(fabric.len(), 2, "{out}");
    for f in &fabric {
        assert!(
            f.path.contains("/opt/mpich5/"),
            "the image's own libfabric: {out}"
        );
    }
    common::assert_no_leftovers(&before, &[out.tag.as_str()]);
}
