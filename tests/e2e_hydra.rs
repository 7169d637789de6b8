//! End-to-end test of the hydra launcher: `cmpirun -f hostfile -n 4 …` with a hostfile naming
//! this machine runs the ranks through MPICH's `mpiexec.hydra`, each as `cmpirun __rank`, all in
//! one container.

mod common;

use std::collections::BTreeSet;

use common::*;

#[test]
fn hostfile_naming_this_machine_launches_through_mpiexec_hydra() {
    let _serial = exclusive();
    let runtime = format!("/tmp/cmpirun-{}", tuser().uid);
    TuserCommand::new("mkdir")
        .args(["-p", "-m", "700", &runtime])
        .run()
        .assert_success();
    let dir = TuserDir::new();
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let hostfile = dir.path().join("hosts");
    std::fs::write(&hostfile, format!("{host}:4\n")).unwrap();
    let before = Snapshot::take();
    let dry = TuserCommand::cmpirun()
        .args(["-f"])
        .arg(&hostfile)
        .args(["-n", "4", "--dry-run"])
        .arg(staged_image("mpich4"))
        .arg("/usr/local/bin/mpitest")
        .run();
    dry.assert_success();
    assert!(dry.stdout.contains("launcher: hydra"), "{dry}");
    let out = TuserCommand::cmpirun()
        .args(["-f"])
        .arg(&hostfile)
        .args(["-n", "4", "-l"])
        .arg(staged_image("mpich4"))
        .arg("/usr/local/bin/mpitest")
        .run();
    out.assert_success();
    assert!(out.stdout.contains("[0] mpitest: OK size=4"), "{out}");
    let ns: BTreeSet<String> = out
        .stdout
        .lines()
        .filter(|l| l.contains("hello: rank="))
        .map(|l| {
            l.split_whitespace()
                .filter(|w| w.starts_with("userns=") || w.starts_with("mntns="))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    assert_eq!(ns.len(), 1, "one container for the four ranks:\n{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}
