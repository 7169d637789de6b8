//! End-to-end tests across the three-node test cluster (`ci/start-cluster.sh`), as the
//! unprivileged test user: `salloc -N3 -n6 cmpirun …` through srun, and `cmpirun -f hosts …`
//! through hydra over ssh, from the front end (the root namespace, as a login node).
//!
//! What they check: correct results of real MPI jobs whose traffic crosses the nodes' links, one
//! user namespace per node, the exit status of a rank that fails on another node than the front
//! end's (its report reaches the front end over the nodes' network, not loopback), a node lost
//! mid-job, and nothing of a job left on any node.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;

/// The MPICH 5 image's MPI over libfabric's tcp provider.
const MPICH5_OFI: [&str; 4] = ["-x", "FI_PROVIDER=tcp", "-x", "MPIR_CVAR_CH4_NETMOD=ofi"];

/// `salloc -N3 -n6 cmpirun -n 6` as the test user on the three-node cluster (add cmpirun's
/// arguments), through a shell that prints cmpirun's own status (`cmpirun-status=N` on stderr):
/// salloc exits 0 even when its command failed.
fn salloc3(cluster: &Cluster) -> TuserCommand {
    TuserCommand::new("salloc")
        .cluster(cluster)
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(180))
        .args([
            "-N3",
            "-n6",
            "/bin/sh",
            "-c",
            "\"$@\"; echo cmpirun-status=$? >&2",
            "sh",
        ])
        .arg(cmpirun_bin())
        .args(["-n", "6"])
}

/// The status cmpirun exited with inside [`salloc3`].
fn cmpirun_status(out: &RunOutput) -> i32 {
    out.stderr
        .lines()
        .find_map(|l| l.strip_prefix("cmpirun-status=")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cmpirun status:\n{out}"))
}

/// [`salloc3`] with cmpirun's arguments `args`: what it did, and cmpirun's status.
fn salloc3_status(cluster: &Cluster, args: &[&str]) -> (RunOutput, i32) {
    let out = salloc3(cluster).args(args).run();
    let status = cmpirun_status(&out);
    (out, status)
}

/// Checks an mpitest job of 6 ranks over the three nodes: correct results, two ranks per node,
/// ranks of a node in one user namespace, nodes in different ones.
fn check_spread(out: &RunOutput) {
    let hellos = assert_mpitest_ok(out, 6);
    assert_one_container_per_host(&hellos, tuser().uid);
    let mut per_node: BTreeMap<&str, BTreeSet<Option<u64>>> = BTreeMap::new();
    for h in &hellos {
        per_node.entry(&h.host).or_default().insert(h.userns);
    }
    assert_eq!(
        per_node.keys().copied().collect::<Vec<_>>(),
        NODES,
        "ranks not on every node:\n{out}"
    );
    let all: BTreeSet<Option<u64>> = per_node.values().flatten().copied().collect();
    assert_eq!(
        all.len(),
        3,
        "the nodes must have different user namespaces:\n{out}"
    );
}

#[test]
fn mpich5_over_ofi_tcp_across_three_nodes_through_srun() {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let bytes: Vec<u64> = NODES.iter().map(|n| cluster.link_bytes(n)).collect();
    let mut args = vec!["--pmi", "pmi2"];
    args.extend(MPICH5_OFI);
    let image = staged_image("mpich5");
    let image = image.to_str().unwrap();
    args.extend([image, "/usr/local/bin/bigmsg"]);
    let (out, status) = salloc3_status(&cluster, &args);
    assert_eq!(status, 0, "{out}");
    assert!(out.stdout.contains("bigmsg: OK size=6"), "{out}");
    // 16 MiB went round the ring: every node's link carried a good part of it.
    for (n, b) in NODES.iter().zip(bytes) {
        let grew = cluster.link_bytes(n) - b;
        assert!(
            grew > 8 << 20,
            "node {n}'s link carried only {grew} bytes:\n{out}"
        );
    }
    let (out, status) = salloc3_status(
        &cluster,
        &[&args[..args.len() - 2], &[image, "/usr/local/bin/mpitest"]].concat(),
    );
    assert_eq!(status, 0, "{out}");
    check_spread(&out);
    cluster.assert_nothing_left(&before);
}

/// A rank program: rank `rank` (by `var`, the launcher's rank variable) runs `fail`, the others
/// `mpitest` (which waits in `MPI_Init` for it forever: only a teardown ends the job).
fn one_rank_fails(var: &str, rank: u32, fail: &str) -> [String; 3] {
    [
        "/bin/sh".into(),
        "-c".into(),
        format!("if [ \"${var}\" = {rank} ]; then {fail}; fi; exec /usr/local/bin/mpitest"),
    ]
}

/// The failures of a 6-rank job of the MPICH 5 image over ofi tcp and what cmpirun must end it
/// with: (cmpirun's arguments after `first`, status, message), with the rank variable `var` of
/// the launcher.
fn failures(var: &str, first: &[&str]) -> Vec<(Vec<String>, i32, String)> {
    let image = staged_image("mpich5").display().to_string();
    let args = |flags: Vec<String>, program: Vec<String>| -> Vec<String> {
        let mut a: Vec<String> = first.iter().map(|s| s.to_string()).collect();
        a.extend(MPICH5_OFI.map(String::from));
        a.extend(flags);
        a.push(image.clone());
        a.extend(program);
        a
    };
    let abort = ["/usr/local/bin/abort", "abort", "7"]
        .map(String::from)
        .to_vec();
    let sleep = ["/bin/sleep", "600"].map(String::from).to_vec();
    vec![
        (
            args(vec![], one_rank_fails(var, 5, "exit 3").to_vec()),
            3,
            "cmpirun: rank 5 of 6 exited with status 3; the job was ended".into(),
        ),
        (
            args(vec![], one_rank_fails(var, 4, "kill -9 $$").to_vec()),
            137,
            "cmpirun: rank 4 of 6 was killed by signal 9 (SIGKILL)".into(),
        ),
        (
            args(vec![], abort),
            7,
            "cmpirun: rank 1 of 6 called MPI_Abort with code 7".into(),
        ),
        (
            args(vec!["--timeout".into(), "3".into()], sleep),
            124,
            "the job did not end within --timeout 3 s".into(),
        ),
    ]
}

#[test]
fn exit_statuses_across_nodes_through_srun() {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let image = staged_image("mpich5");
    for (args, code, message) in failures("SLURM_PROCID", &["--pmi", "pmi2"]) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (out, status) = salloc3_status(&cluster, &args);
        assert_eq!(status, code, "{out}");
        assert!(out.stderr.contains(&message), "{out}");
        assert!(!out.stderr.contains("could not report"), "{out}");
        // A step Slurm ended with SIGKILL (MPI_Abort, a failed rank) kills the node instances
        // too: their rendezvous files stay until the next instance on the node removes them.
        cluster.assert_nothing_left_but(&before, is_rendezvous_file);
    }
    let (ok, status) = salloc3_status(
        &cluster,
        &[
            &MPICH5_OFI[..],
            &[image.to_str().unwrap(), "/usr/local/bin/hello"],
        ]
        .concat(),
    );
    assert_eq!(status, 0, "{ok}");
    cluster.assert_nothing_left(&before);
}

/// A node instance's socket or lock in the runtime folder.
fn is_rendezvous_file(entry: &str) -> bool {
    entry.contains("/tmp/cmpirun-") && (entry.ends_with(".sock") || entry.ends_with(".lock"))
}

#[test]
fn openmpi4_over_pmix_across_three_nodes_through_srun() {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let image = staged_image("openmpi4");
    let (out, status) = salloc3_status(
        &cluster,
        &[
            "--pmi",
            "pmix",
            image.to_str().unwrap(),
            "/usr/local/bin/mpitest",
        ],
    );
    assert_eq!(status, 0, "{out}");
    check_spread(&out);
    assert!(!out.stderr.contains("PMIX ERROR"), "{out}");
    cluster.assert_nothing_left(&before);
}

/// `cmpirun HOSTS ARGS` as the test user through hydra over ssh (the cluster's ssh, the
/// launcher a site uses), from the front end. The node names resolve only in ssh's
/// configuration, so the front end's address on the nodes' network is set (cmpirun passes it
/// to hydra as `-localhost` too).
fn hydra3(cluster: &Cluster, hosts: &[&str], args: &[&str]) -> RunOutput {
    TuserCommand::cmpirun()
        .cluster(cluster)
        .env("CMPIRUN_REPORT_ADDR", FRONT_END_ADDR)
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(120))
        .args(hosts)
        .args(args)
        .run()
}

#[test]
fn mpich5_across_three_nodes_through_hydra_over_ssh() {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let dir = TuserDir::new();
    let mpich_form = dir.path().join("hosts-mpich");
    std::fs::write(&mpich_form, "n1:2\nn2:2\nn3:2\n").unwrap();
    let ompi_form = dir.path().join("hosts-ompi");
    std::fs::write(
        &ompi_form,
        "# Open MPI's form\nn1 slots=2\nn2 slots=2 max_slots=4\nn3 slots=2\n",
    )
    .unwrap();
    let image = staged_image("mpich5");
    let mut args: Vec<&str> = MPICH5_OFI.to_vec();
    args.extend([image.to_str().unwrap(), "/usr/local/bin/mpitest"]);
    let runs: [(Vec<&str>, Vec<&str>); 4] = [
        (vec!["-f", mpich_form.to_str().unwrap(), "-n", "6"], vec![]),
        (vec!["-f", ompi_form.to_str().unwrap(), "-n", "6"], vec![]),
        (vec!["-H", "n1:2,n2:2,n3:2", "-n", "6"], vec![]),
        // -ppn 2 over hosts of one slot each, then round-robin placement.
        (vec!["-H", "n1,n2,n3", "-n", "6", "-ppn", "2"], vec![]),
    ];
    for (hosts, _) in &runs {
        let out = hydra3(&cluster, hosts, &args);
        check_spread(&out);
        let hellos = hello_lines(&out.stdout);
        let host_of = |r: u32| hellos.iter().find(|h| h.rank == r).map(|h| h.host.clone());
        assert_eq!(host_of(1), Some("n1".into()), "block placement:\n{out}");
    }
    let out = hydra3(
        &cluster,
        &["-H", "n1:2,n2:2,n3:2", "-n", "6", "--map-by", "node"],
        &args,
    );
    check_spread(&out);
    let hellos = hello_lines(&out.stdout);
    let host_of = |r: u32| hellos.iter().find(|h| h.rank == r).map(|h| h.host.clone());
    assert_eq!(
        (0..6).map(host_of).collect::<Vec<_>>(),
        ["n1", "n2", "n3", "n1", "n2", "n3"].map(|h| Some(h.to_owned())),
        "--map-by node:\n{out}"
    );
    cluster.assert_nothing_left(&before);
}

#[test]
fn exit_statuses_across_nodes_through_hydra() {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    for (args, code, message) in failures("PMI_RANK", &[]) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = hydra3(&cluster, &["-H", "n1:2,n2:2,n3:2", "-n", "6"], &args);
        assert_eq!(out.code(), Some(code), "{out}");
        assert!(out.stderr.contains(&message), "{out}");
        // The other ranks wait in MPI_Init (or a barrier) for ever: the job ended because the
        // first failure reported ended hydra's job, not by itself.
        assert!(out.elapsed < Duration::from_secs(20), "{out}");
        cluster.assert_nothing_left_but(&before, is_rendezvous_file);
    }
}

/// Kills node `node`'s slurmd and every process of its jobs (all but the node's anchor and its
/// sshd), as a node that crashes.
fn crash_node(cluster: &Cluster, node: &str) {
    let keep: Vec<String> = [
        cluster.anchor(node).to_string(),
        std::fs::read_to_string(cluster.dir.join(format!("sshd-{node}.pid")))
            .unwrap_or_default()
            .trim()
            .to_owned(),
    ]
    .to_vec();
    let ns = format!("cmpn{}", node.trim_start_matches('n'));
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", &ns])
        .output()
        .expect("ip netns pids");
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        if !keep.iter().any(|k| k == pid)
            && let Ok(p) = pid.parse::<i32>()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Starts node `node`'s slurmd again and waits until the cluster has all its nodes idle.
fn revive_node(cluster: &Cluster, node: &str) {
    let status = std::process::Command::new("nsenter")
        .args([
            "-t",
            &cluster.anchor(node).to_string(),
            "-n",
            "-u",
            "-i",
            "-m",
            "slurmd",
            "-f",
        ])
        .arg(cluster.slurm_conf())
        .args(["-N", node])
        .status()
        .expect("slurmd");
    assert!(status.success());
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < until {
        let out = std::process::Command::new("sinfo")
            .env("SLURM_CONF", cluster.slurm_conf())
            .args(["-h", "-t", "idle", "-o", "%D"])
            .output()
            .expect("sinfo");
        if String::from_utf8_lossy(&out.stdout).trim() == "3" {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("node {node} did not come back");
}

#[test]
fn a_node_lost_mid_job_fails_the_job_naming_it() {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let image = staged_image("mpich5");
    // The ranks of n1 and n2 end well after 6 s; those of n3 are lost at about 2 s.
    let child = salloc3(&cluster)
        .timeout(Duration::from_secs(120))
        .args(["--pmi", "pmi2"])
        .arg(&image)
        .args(["/bin/sleep", "6"])
        .spawn();
    wait_for_tagged(child.tag(), Duration::from_secs(60), "six ranks", |p| {
        p.iter().filter(|p| p.comm == "sleep").count() >= 6
    });
    std::thread::sleep(Duration::from_millis(500));
    let lost_at = std::time::Instant::now();
    crash_node(&cluster, "n3");
    let out = child.wait();
    let took = lost_at.elapsed();
    revive_node(&cluster, "n3");
    let status = cmpirun_status(&out);
    eprintln!(
        "the job ended {took:?} after the loss of n3, with status {status}: {}",
        out.stderr
            .lines()
            .filter(|l| l.contains("cmpirun:") || l.contains("srun:"))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    assert_ne!(status, 0, "a lost node passed for a success:\n{out}");
    assert!(
        out.stderr.contains("n3"),
        "the message must name the lost node:\n{out}"
    );
    // Bounded by the cluster's SlurmdTimeout (20 s) and the kill grace.
    assert!(took < Duration::from_secs(45), "took {took:?}:\n{out}");
    // Nothing is left on the nodes that survived (n3's own state went with its processes,
    // but its rendezvous files, which the next instance there removes).
    cluster.assert_nothing_left_but(&before, |e| e.starts_with("n3:") && is_rendezvous_file(e));
}

#[test]
fn a_front_end_on_a_node_of_the_job() {
    // As in a batch script: cmpirun runs on n1, the first node of its allocation, whose own
    // ranks are local to it and whose other ranks are not; the node names do not resolve there.
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let image = staged_image("mpich5");
    let run = |program: &[&str]| {
        let out = salloc3(&cluster)
            .on_node("n1")
            .args(["--pmi", "pmi2"])
            .args(MPICH5_OFI)
            .arg(&image)
            .args(program)
            .run();
        let status = cmpirun_status(&out);
        (out, status)
    };
    let (out, status) = run(&["/usr/local/bin/mpitest"]);
    assert_eq!(status, 0, "{out}");
    check_spread(&out);
    let fail = one_rank_fails("SLURM_PROCID", 5, "exit 3");
    let fail: Vec<&str> = fail.iter().map(String::as_str).collect();
    let (out, status) = run(&fail);
    assert_eq!(status, 3, "{out}");
    assert!(
        out.stderr
            .contains("cmpirun: rank 5 of 6 exited with status 3"),
        "{out}"
    );
    cluster.assert_nothing_left_but(&before, is_rendezvous_file);
}

#[test]
fn a_plan_too_large_for_the_environment_is_refused_with_the_numbers() {
    // The plan the tasks get grows with the nodes only (their names), not with the ranks: 1000
    // nodes of 128 ranks fit in a few KiB (tests/plan_dry_run.rs). 40,000 nodes whose names
    // have nothing in common do not: nothing is started, and the numbers are given.
    let dir = TuserDir::new();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let hosts: String = (0..40_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            format!("h{state:016x}:1\n")
        })
        .collect();
    let hostfile = dir.path().join("hosts");
    std::fs::write(&hostfile, hosts).unwrap();
    let out = TuserCommand::cmpirun()
        .args(["--launcher", "hydra", "-f"])
        .arg(&hostfile)
        .args(["-n", "40000"])
        .arg(staged_image("mpich5"))
        .arg("/usr/local/bin/hello")
        .run();
    out.assert_code(2);
    assert!(
        out.stderr.contains("(40000 ranks on 40000 nodes)")
            && out.stderr.contains("more than the 131072 bytes")
            && out.stderr.contains("MAX_ARG_STRLEN"),
        "{out}"
    );
    assert!(!out.stderr.contains("mpiexec"), "{out}");
}
